"""The Learner's contract: the loop equals a hand-written one, events and cancellation, errors, persistence."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import looplab.learner
from looplab.callback import EVENTS
from looplab import (Callback, CancelBackward, CancelBatch, CancelEpoch, CancelFit, CancelStep, CancelTrain,
                     CancelValidate, DataLoaders, Learner)
from looplab.metrics import accuracy


def make_batches(n=6, bs=8, seed=0, n_in=5, n_out=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, n_in, generator=g), torch.randint(0, n_out, (bs,), generator=g)) for _ in range(n)]


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def make_learner(train=None, valid=None, **kw):
    train = make_batches() if train is None else train
    valid = make_batches(2, seed=1) if valid is None else valid
    kw = {"opt_func": sgd, "lr": 0.1, "progress": False, **kw}
    return Learner(make_model(), (train, valid), F.cross_entropy, **kw)




def test_fit_is_bit_identical_to_a_hand_written_loop():
    train, valid = make_batches(7), make_batches(2, seed=1)
    model = make_model()
    opt = sgd(model.parameters(), lr=0.1)
    for _ in range(3):
        model.train()
        for xb, yb in train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
    learn = make_learner(train, valid)
    learn.fit(3)
    for p, q in zip(model.parameters(), learn.model.parameters()):
        assert torch.equal(p, q)


def test_events_fire_in_the_documented_order():
    class Tracer(Callback):
        pass
    seen = []
    tracer = Tracer()
    for event in EVENTS:
        setattr(tracer, event, (lambda e: lambda: seen.append(e))(event))
    learn = make_learner(make_batches(2), make_batches(1, seed=1), cbs=[tracer])
    learn.fit(2)
    train_batch = ["before_batch", "after_pred", "after_loss", "before_backward", "after_backward", "before_step",
                   "after_step", "after_batch"]
    valid_batch = ["before_batch", "after_pred", "after_loss", "after_batch"]
    epoch = ["before_epoch", "before_train", *train_batch * 2, "after_train", "before_validate", *valid_batch,
             "after_validate", "after_epoch"]
    assert seen == ["before_fit", *epoch * 2, "after_fit"]


@pytest.mark.parametrize("exc,where,skipped,cancel_event", [
    (CancelBatch, "after_pred", "after_loss", "after_cancel_batch"),
    (CancelStep, "before_step", None, "after_cancel_step"),
    (CancelBackward, "before_backward", "before_step", "after_cancel_backward"),
    (CancelTrain, "before_batch", "after_pred", "after_cancel_train"),
    (CancelValidate, "before_validate", None, "after_cancel_validate"),
    (CancelEpoch, "after_train", "before_validate", "after_cancel_epoch"),
    (CancelFit, "after_train", "before_validate", "after_cancel_fit"),
])
def test_cancellation_skips_the_rest_of_its_level_then_runs_after(exc, where, skipped, cancel_event):
    seen = []

    cb = Callback()
    for event in EVENTS:
        def handler(e=event):
            seen.append((e, cb.learn.training))
            if e == where and (exc is not CancelTrain or cb.learn.training):
                raise exc()
        setattr(cb, event, handler)
    learn = make_learner(make_batches(2), make_batches(1, seed=1), cbs=[cb])
    learn.fit(2)
    names = [e for e, _ in seen]
    assert cancel_event in names
    level = cancel_event.removeprefix("after_cancel_")
    after = "after_" + level
    assert names.index(after) == names.index(cancel_event) + 1
    if skipped is not None:
        # the event right after the raise point in the normal order never comes before the cancel handler
        first_raise = names.index(where)
        assert skipped not in names[first_raise:names.index(cancel_event)]
    if exc is CancelFit:
        assert names[-2:] == ["after_cancel_fit", "after_fit"] and names.count("before_epoch") == 1
    if exc is CancelBackward:  # backward and the whole step level skipped, every batch
        assert "before_step" not in names and "after_step" not in names
        assert names.count("after_cancel_backward") == names.count("after_backward") == 4  # 2 batches, 2 epochs
    if exc is CancelEpoch:
        assert names.count("before_epoch") == 2 and "before_validate" not in names
    if exc is CancelTrain:
        assert "before_validate" in names and names.count("after_pred") == 2  # validation batches only
    if exc is CancelValidate:
        assert "after_pred" in names and all(t for e, t in seen if e == "after_pred")


def test_cancel_step_skips_only_the_optimizer_step():
    class NoStep(Callback):
        def before_step(self):
            self.grads = [p.grad.clone() for p in self.learn.model.parameters()]
            raise CancelStep

        def after_batch(self):
            self.zeroed = all(p.grad is None for p in self.learn.model.parameters())

    learn, cb = make_learner(), NoStep()
    before = copy.deepcopy(learn.model.state_dict())
    learn.fit(1, cbs=[cb])
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert cb.zeroed and any(g.abs().sum() > 0 for g in cb.grads)
    assert len(learn.recorder.losses) == 6  # the batches still ran


def test_other_exceptions_propagate_unchanged_and_fit_cbs_are_removed():
    boom = RuntimeError("boom")

    class Boom(Callback):
        def after_loss(self):
            raise boom

    learn, cb = make_learner(), Boom()
    with pytest.raises(RuntimeError) as info:
        learn.fit(1, cbs=[cb])
    assert info.value is boom
    assert cb not in learn.cbs


def test_misspelled_event_methods_are_rejected_with_their_name():
    class Typo(Callback):
        def after_bacth(self):
            pass

    with pytest.raises(ValueError, match="after_bacth"):
        make_learner(cbs=[Typo()])
    with pytest.raises(ValueError, match="after_bacth"):
        make_learner().add_cb(Typo())
    with pytest.raises(TypeError, match="Typo"):
        make_learner().add_cb(Typo)


def test_order_runs_lower_first_and_ties_keep_the_given_order():
    seen = []

    def cb(name, order):
        c = type(name, (Callback,), {"order": order, "before_fit": lambda self: seen.append(name)})
        return c()

    make_learner(cbs=[cb("a", 5), cb("b", -1), cb("c", 5), cb("d", 0)]).fit(1)
    assert seen == ["b", "d", "a", "c"]


def test_handlers_may_take_the_learner_as_argument():
    got = []

    class WithArg(Callback):
        def after_loss(self, learn):
            got.append(learn)

    learn = make_learner()
    learn.fit(1, cbs=[WithArg()])
    assert got and all(g is learn for g in got)


def test_dispatch_table_is_built_when_callbacks_change_not_per_batch(monkeypatch):
    calls = []
    real = looplab.learner.build_table
    monkeypatch.setattr(looplab.learner, "build_table", lambda *a: calls.append(1) or real(*a))
    learn = make_learner(make_batches(20))
    calls.clear()
    learn.fit(3)
    assert len(calls) == 0  # 60 batches, 3 epochs: no rebuild
    learn.fit(1, cbs=[Callback()])
    assert len(calls) == 2  # added for the fit, removed after it


def test_a_callback_added_during_fit_runs_from_then_on():
    seen = []

    class Late(Callback):
        def after_batch(self):
            seen.append((self.learn.train_iter, self.learn.training))

    class Adder(Callback):
        def after_epoch(self):
            if self.learn.epoch == 0:
                self.learn.add_cb(Late())

    learn = make_learner(make_batches(3))
    learn.fit(2, cbs=[Adder()])
    assert seen == [(3, True), (4, True), (5, True), (6, False), (6, False)]


def test_loop_state_is_visible_to_callbacks():
    rows = []

    class State(Callback):
        def after_batch(self):
            learn = self.learn
            rows.append((learn.epoch, learn.iter, learn.train_iter, learn.n_iter, learn.training, learn.n_epochs))

    learn = make_learner(make_batches(3), make_batches(2, seed=1))
    learn.fit(2, cbs=[State()])
    train_rows = [r for r in rows if r[4]]
    assert [r[:3] for r in train_rows] == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4), (1, 2, 5)]
    assert all(r[3] == 3 and r[5] == 2 for r in train_rows)
    assert [r[1] for r in rows if not r[4]] == [0, 1, 0, 1]


def test_a_callback_may_replace_the_loss_in_after_loss():
    class Double(Callback):
        order = 0

        def after_loss(self):
            self.learn.loss = self.learn.loss * 0  # zero gradient: weights only move by weight decay

    learn = make_learner(opt_func=torch.optim.SGD)
    before = copy.deepcopy(learn.model.state_dict())
    learn.fit(1, cbs=[Double()])
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert learn.recorder.losses == [0.0] * 6


def test_fit_lr_overrides_for_that_fit_only():
    learn = make_learner(lr=0.1)
    learn.fit(1, lr=0.5)
    assert learn.recorder.lrs == [0.5] * 6
    learn.fit(1)
    assert learn.recorder.lrs == [0.1] * 6


def test_validate_and_get_preds_against_direct_computation():
    valid = make_batches(3, seed=1, bs=5) + [make_batches(1, seed=2, bs=2)[0]]  # uneven last batch
    learn = make_learner(valid=valid, metrics=[accuracy])
    learn.fit(1)
    x = torch.cat([b[0] for b in valid])
    y = torch.cat([b[1] for b in valid])
    with torch.no_grad():
        out = learn.model.eval()(x)
    res = learn.validate()
    assert set(res) == {"valid_loss", "accuracy"}
    assert res["valid_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert res["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item(), rel=1e-6)
    preds, targets = learn.get_preds()
    assert torch.allclose(preds, out) and torch.equal(targets, y)
    preds2, _ = learn.get_preds(dl=valid[:1])
    assert preds2.shape == (5, 3)


def test_multi_input_models_take_a_tuple():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    x1, x2, y = torch.randn(40, 3), torch.randn(40, 4), torch.randint(0, 2, (40,))
    dls = DataLoaders.from_tensors((x1, x2), y, valid_pct=0.25, bs=8)
    learn = Learner(Two(), dls, F.cross_entropy, progress=False)
    learn.fit(1)
    assert len(learn.recorder.losses) == 4 and math.isfinite(learn.validate()["valid_loss"])


def test_xb_is_the_batch_as_yielded_on_the_models_device():
    seen = []

    class Look(Callback):
        def before_batch(self):
            seen.append(self.learn.xb)

    learn = make_learner(make_batches(1), make_batches(1, seed=1))
    learn.fit(1, cbs=[Look()])
    assert all(isinstance(xb, torch.Tensor) and xb.shape == (8, 5) for xb in seen)
    seen.clear()
    x1, x2, y = torch.randn(8, 3), torch.randn(8, 4), torch.randint(0, 2, (8,))
    two = nn.Bilinear(3, 4, 2)
    Learner(two, ([([x1, x2], y)], None), F.cross_entropy, progress=False, cbs=[Look()]).fit(1)
    assert isinstance(seen[0], tuple) and torch.equal(seen[0][0], x1) and torch.equal(seen[0][1], x2)


def test_a_single_callback_or_metric_needs_no_list():
    class A(Callback):
        pass

    a = A()
    learn = make_learner(cbs=A(), metrics=accuracy)
    learn.fit(1, cbs=a)
    assert "accuracy" in learn.recorder.history[0] and a not in learn.cbs


def test_save_load_round_trip(tmp_path):
    learn = make_learner()
    learn.fit(1)
    learn.save(tmp_path / "m.pt")
    other = make_learner()
    other.load(tmp_path / "m.pt")
    for p, q in zip(learn.model.parameters(), other.model.parameters()):
        assert torch.equal(p, q)
    mine, theirs = learn.opt.state_dict()["state"], other.opt.state_dict()["state"]
    assert mine.keys() == theirs.keys() and mine
    for k in mine:
        assert mine[k].keys() == theirs[k].keys()
        for name, v in mine[k].items():
            assert torch.equal(v, theirs[k][name]) if isinstance(v, torch.Tensor) else v == theirs[k][name]
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {"model", "opt"} <= set(raw)


def test_load_errors_name_the_file(tmp_path):
    learn = make_learner()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        learn.load(tmp_path / "missing.pt")
    learn.save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.pt"):
        learn.load(tmp_path / "trunc.pt")
    torch.save({"model": nn.Linear(2, 2).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        learn.load(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        learn.load(tmp_path / "list.pt")


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), float("inf"), "0.1"])
def test_bad_lr_is_rejected(lr):
    with pytest.raises(ValueError, match="lr"):
        make_learner(lr=lr)
    with pytest.raises(ValueError, match="lr"):
        make_learner().fit(1, lr=lr)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="n_epochs"):
        make_learner().fit(-1)
    with pytest.raises(ValueError, match="empty"):
        make_learner(train=[]).fit(1)
    with pytest.raises(ValueError, match="empty"):
        make_learner(train=iter([])).fit(1)
    learn = Learner(make_model(), (make_batches(), None), lambda p, y: F.cross_entropy(p, y, reduction="none"),
                    progress=False)
    with pytest.raises(ValueError, match="scalar"):
        learn.fit(1)
    with pytest.raises(TypeError, match="model"):
        Learner("not a model", (make_batches(), None), F.cross_entropy)
    with pytest.raises(TypeError, match="data"):
        Learner(make_model(), make_batches(), F.cross_entropy)


def test_add_and_remove_callbacks():
    class A(Callback):
        pass

    learn = make_learner()
    a = learn.add_cb(A())
    assert a in learn.cbs and a.learn is learn
    learn.remove_cb(a)
    assert a not in learn.cbs
    learn.add_cb(A())
    learn.remove_cb(A)
    assert not any(isinstance(c, A) for c in learn.cbs)
    with pytest.raises(ValueError, match="A"):
        learn.remove_cb(A)
