"""Acceptance tests for issue 2 (the Learner), written from the issue's contract only, as an outside user would.

References are hand-written loops and direct computations, never numbers looplab computed.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from looplab import (Callback, CancelBatch, CancelEpoch, CancelFit, CancelStep, CancelTrain, CancelValidate,
                     DataLoaders, Learner)
from looplab.metrics import accuracy

torch.set_num_threads(1)


def make_batches(n_batches=3, bs=8, n_in=4, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, n_in, generator=g), torch.randint(0, n_out, (bs,), generator=g))
            for _ in range(n_batches)]


def make_model(seed=0, n_in=4, n_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), nn.Linear(8, n_out))


def learner(train=None, valid=None, cbs=(), **kw):
    train = make_batches(3) if train is None else train
    valid = make_batches(2, seed=1) if valid is None else valid
    kw.setdefault("progress", False)
    return Learner(make_model(), (train, valid), nn.CrossEntropyLoss(), cbs=cbs, **kw)


# ---- public API ----------------------------------------------------------------------------------------------
def test_public_names_import():
    import looplab
    for name in ["Learner", "Callback", "DataLoaders", "CancelBatch", "CancelStep", "CancelTrain", "CancelValidate",
                 "CancelEpoch", "CancelFit"]:
        assert hasattr(looplab, name)
    from looplab.metrics import accuracy as acc
    assert callable(acc)
    assert looplab.Learner.__doc__ and "train_iter" in looplab.Learner.__doc__  # loop state documented


def test_defaults_adamw_and_lr():
    learn = Learner(make_model(), (make_batches(), make_batches(seed=1)), nn.CrossEntropyLoss(), progress=False)
    assert isinstance(learn.opt, torch.optim.AdamW)
    assert learn.opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_optimizer_built_from_opt_func_params_lr():
    seen = {}

    def opt_func(params, lr):
        seen["lr"] = lr
        return torch.optim.SGD(params, lr=lr)
    learn = Learner(make_model(), (make_batches(), make_batches(seed=1)), nn.CrossEntropyLoss(), opt_func=opt_func,
                    lr=0.05, progress=False)
    assert seen["lr"] == 0.05 and isinstance(learn.opt, torch.optim.SGD)
    n_params = sum(len(g["params"]) for g in learn.opt.param_groups)
    assert n_params == len(list(learn.model.parameters()))


def test_positional_arguments():
    model = make_model()
    learn = Learner(model, (make_batches(), make_batches(seed=1)), nn.CrossEntropyLoss(), torch.optim.SGD, 0.1,
                    progress=False)
    assert isinstance(learn.opt, torch.optim.SGD) and learn.opt.param_groups[0]["lr"] == 0.1
    learn.fit(1)


# ---- bit-identical to a hand-written loop -----------------------------------------------------------------------
def hand_loop(model, batches, n_epochs, lr, momentum):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_func = nn.CrossEntropyLoss()
    losses = []
    for _ in range(n_epochs):
        model.train()
        for x, y in batches:
            loss = loss_func(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("data_kind", ["tuple_of_lists", "dataloaders"])
def test_sgd_momentum_bit_identical_to_hand_written_loop(data_kind):
    batches = make_batches(5)
    valid = make_batches(2, seed=3)
    ref_model = make_model(1)
    ref_losses = hand_loop(ref_model, batches, 3, 0.1, 0.9)
    opt_func = lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)
    data = (batches, valid) if data_kind == "tuple_of_lists" else DataLoaders(batches, valid)
    learn = Learner(make_model(1), data, nn.CrossEntropyLoss(), opt_func=opt_func, lr=0.1, progress=False)
    learn.fit(3)
    for p, q in zip(learn.model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert learn.recorder.losses == ref_losses
    assert all(isinstance(v, float) for v in learn.recorder.losses)


def test_list_of_batches_without_validation_set_and_plain_list_data():
    # a list [train, valid] works as well as a tuple
    learn = Learner(make_model(), [make_batches(), make_batches(seed=1)], nn.CrossEntropyLoss(), progress=False)
    learn.fit(1)
    assert len(learn.recorder.losses) == 3


def test_torch_dataloaders_as_data():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    tr = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8)
    va = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)
    learn = Learner(make_model(), (tr, va), nn.CrossEntropyLoss(), progress=False)
    learn.fit(2)
    assert len(learn.recorder.losses) == 8
    assert "valid_loss" in learn.recorder.history[-1]


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, xa, xb):
        return self.a(xa) + self.b(xb)


def test_multi_input_models_get_a_tuple():
    g = torch.Generator().manual_seed(0)
    batches = [((torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)),
                torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    torch.manual_seed(0)
    model = TwoInput()
    ref = TwoInput()
    ref.load_state_dict(model.state_dict())
    learn = Learner(model, (batches, batches[:1]), nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1,
                    progress=False)
    learn.fit(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for (xa, xb), y in batches:
        nn.CrossEntropyLoss()(ref(xa, xb), y).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    preds, targs = learn.get_preds()
    assert preds.shape == (8, 3) and torch.equal(targs, batches[0][1])


def test_multi_input_from_tensors():
    x1, x2, y = torch.randn(50, 4), torch.randn(50, 2), torch.randint(0, 3, (50,))
    dls = DataLoaders.from_tensors((x1, x2), y, valid_pct=0.2, bs=16)
    torch.manual_seed(0)
    learn = Learner(TwoInput(), dls, nn.CrossEntropyLoss(), progress=False)
    learn.fit(1)
    assert set(learn.validate()) >= {"valid_loss"}


# ---- events --------------------------------------------------------------------------------------------------
ALL_EVENTS = ["before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
              "before_backward", "after_backward", "before_step", "after_step", "after_batch", "after_train",
              "before_validate", "after_validate", "after_epoch", "after_fit"]
CANCEL_EVENTS = [f"after_cancel_{l}" for l in ("batch", "step", "train", "validate", "epoch", "fit")]


class Log(Callback):
    def __init__(self, log=None):
        self.log = [] if log is None else log


for _ev in ALL_EVENTS + CANCEL_EVENTS:
    setattr(Log, _ev, (lambda ev: lambda self: self.log.append(ev))(_ev))


def expected_order(n_epochs, n_train, n_valid):
    train_batch = ["before_batch", "after_pred", "after_loss", "before_backward", "after_backward", "before_step",
                   "after_step", "after_batch"]
    valid_batch = ["before_batch", "after_pred", "after_loss", "after_batch"]
    out = ["before_fit"]
    for _ in range(n_epochs):
        out += ["before_epoch", "before_train"] + train_batch * n_train + ["after_train", "before_validate"]
        out += valid_batch * n_valid + ["after_validate", "after_epoch"]
    return out + ["after_fit"]


def test_event_order_exact():
    cb = Log()
    learn = learner(make_batches(3), make_batches(2, seed=1))
    learn.fit(2, cbs=[cb])
    assert cb.log == expected_order(2, 3, 2)
    assert cb not in learn.cbs  # fit-only callbacks are removed afterwards


def test_event_order_with_learner_cbs_and_handlers_taking_learn():
    seen = []

    class WithArg(Callback):
        def after_batch(self, learn):
            seen.append((learn.training, learn.iter))
    learn = learner(make_batches(2), make_batches(1, seed=1), cbs=[WithArg()])
    learn.fit(1)
    assert seen == [(True, 0), (True, 1), (False, 0)]


def raiser(event, exc, when=lambda learn: True):
    class R(Log):
        pass

    def handler(self):
        self.log.append(event)
        if when(self.learn):
            raise exc()
    setattr(R, event, handler)
    return R()


def test_cancel_batch():
    batches = make_batches(3)
    cb = raiser("after_loss", CancelBatch, lambda l: l.training and l.iter == 1)
    model_ref = make_model()
    hand_loop(model_ref, [batches[0], batches[2]], 1, 0.1, 0.0)
    learn = learner(batches, opt_func=torch.optim.SGD, lr=0.1)
    learn.fit(1, cbs=[cb])
    # batch 1 was skipped after its loss: no backward, no step
    for p, q in zip(learn.model.parameters(), model_ref.parameters()):
        assert torch.equal(p, q)
    i = [k for k, e in enumerate(cb.log) if e == "after_cancel_batch"]
    assert len(i) == 1
    assert cb.log[i[0] - 1] == "after_loss" and cb.log[i[0] + 1] == "after_batch"
    assert cb.log.count("before_backward") == 2 and cb.log.count("after_step") == 2


def test_cancel_step_skips_only_the_step():
    batches = make_batches(3)
    # step skipped on batch 0: gradients of batch 0 must not leak into batch 1's step (zero_grad still runs)
    cb = raiser("before_step", CancelStep, lambda l: l.train_iter == 0)
    model_ref = make_model()
    ref_losses = hand_loop(model_ref, batches[1:], 1, 0.1, 0.0)
    learn = learner(batches, opt_func=torch.optim.SGD, lr=0.1)
    learn.fit(1, cbs=[cb])
    for p, q in zip(learn.model.parameters(), model_ref.parameters()):
        assert torch.equal(p, q)
    assert cb.log.count("after_cancel_step") == 1
    assert cb.log.count("after_step") == 3 and cb.log.count("after_batch") == 5  # 3 train + 2 valid
    k = cb.log.index("after_cancel_step")
    assert cb.log[k + 1:k + 3] == ["after_step", "after_batch"]
    assert learn.recorder.losses[1:] == ref_losses


def test_cancel_step_always_leaves_weights_unchanged():
    learn = learner(opt_func=torch.optim.SGD, lr=0.5)
    before = [p.clone() for p in learn.model.parameters()]

    class NoStep(Callback):
        def before_step(self):
            raise CancelStep()
    learn.fit(2, cbs=[NoStep()])
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    assert len(learn.recorder.losses) == 6


def test_cancel_train_runs_validation():
    cb = raiser("before_batch", CancelTrain, lambda l: l.training and l.iter == 1)
    learn = learner(make_batches(3), make_batches(2, seed=1))
    learn.fit(1, cbs=[cb])
    k = cb.log.index("after_cancel_train")
    assert cb.log[k + 1] == "after_train" and cb.log[k + 2] == "before_validate"
    assert cb.log.count("after_validate") == 1 and cb.log[-1] == "after_fit"
    assert len(learn.recorder.losses) == 1
    assert "valid_loss" in learn.recorder.history[0]


def test_cancel_validate():
    cb = raiser("before_validate", CancelValidate)
    learn = learner()
    learn.fit(2, cbs=[cb])
    for k, e in enumerate(cb.log):
        if e == "after_cancel_validate":
            assert cb.log[k + 1] == "after_validate" and cb.log[k + 2] == "after_epoch"
    assert cb.log.count("after_cancel_validate") == 2
    assert "after_pred" not in cb.log[cb.log.index("before_validate"):cb.log.index("after_validate")]
    assert len(learn.recorder.history) == 2


def test_cancel_epoch_continues_with_next_epoch():
    cb = raiser("after_train", CancelEpoch, lambda l: l.epoch == 0)
    learn = learner()
    learn.fit(2, cbs=[cb])
    k = cb.log.index("after_cancel_epoch")
    assert cb.log[k + 1] == "after_epoch" and cb.log[k + 2] == "before_epoch"
    assert cb.log.count("before_validate") == 1  # only epoch 1 validated
    assert len(learn.recorder.losses) == 6


def test_cancel_fit():
    cb = raiser("after_batch", CancelFit, lambda l: l.training and l.train_iter == 1)
    learn = learner()
    learn.fit(5, cbs=[cb])
    assert cb.log[-3:] == ["after_batch", "after_cancel_fit", "after_fit"]
    assert len(learn.recorder.losses) == 2
    assert cb not in learn.cbs


def test_cancel_fit_in_before_fit():
    cb = raiser("before_fit", CancelFit)
    learn = learner()
    learn.fit(3, cbs=[cb])
    assert cb.log == ["before_fit", "after_cancel_fit", "after_fit"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("event", ["before_fit", "after_loss", "after_step", "after_validate", "after_epoch"])
def test_other_exceptions_propagate_unchanged_and_fit_cbs_are_removed(event):
    err = Boom("boom")

    class R(Callback):
        pass
    setattr(R, event, lambda self: (_ for _ in ()).throw(err))
    cb = R()
    learn = learner()
    n_before = len(learn.cbs)
    with pytest.raises(Boom) as info:
        learn.fit(1, cbs=[cb])
    assert info.value is err
    assert cb not in learn.cbs and len(learn.cbs) == n_before
    learn.fit(1)  # still usable


def test_misspelled_hooks_are_rejected_naming_the_method():
    class Typo(Callback):
        def after_bacth(self):
            pass
    with pytest.raises(Exception, match="after_bacth"):
        learner(cbs=[Typo()])
    learn = learner()
    with pytest.raises(Exception, match="after_bacth"):
        learn.add_cb(Typo())
    with pytest.raises(Exception, match="after_bacth"):
        learn.fit(1, cbs=[Typo()])

    class Typo2(Callback):
        def before_everything(self):
            pass
    with pytest.raises(Exception, match="before_everything"):
        learn.add_cb(Typo2())


def test_order_lower_first_ties_keep_given_order():
    log = []

    def mk(name, order):
        class C(Callback):
            def before_fit(self):
                log.append(name)
        c = C()
        c.order = order
        return c
    learn = learner(cbs=[mk("a", 5), mk("b", -1)])
    learn.fit(1, cbs=[mk("c", 5), mk("d", 0), mk("e", -1)])
    assert log == ["b", "e", "d", "a", "c"]


def test_order_as_class_attribute():
    log = []

    class Late(Callback):
        order = 10

        def before_batch(self):
            log.append("late")

    class Early(Callback):
        order = -10

        def before_batch(self):
            log.append("early")
    learner(make_batches(1), make_batches(1)).fit(1, cbs=[Late(), Early()])
    assert log == ["early", "late"] * 2


def test_callbacks_have_learn():
    class C(Callback):
        def before_fit(self):
            assert self.learn is learn
            self.ok = True
    c = C()
    learn = learner(cbs=[c])
    assert c.learn is learn
    learn.fit(1)
    assert c.ok


def test_add_cb_remove_cb():
    learn = learner()
    c = Log()
    learn.add_cb(c)
    learn.fit(1)
    assert "before_fit" in c.log
    learn.remove_cb(c)
    c.log.clear()
    learn.fit(1)
    assert c.log == []


def test_loop_state_visible_and_train_iter():
    seen = []

    class S(Callback):
        def before_batch(self):
            l = self.learn
            seen.append((l.epoch, l.training, l.iter, l.n_iter, l.train_iter if l.training else None, l.n_epochs))

        def after_pred(self):
            assert isinstance(self.learn.pred, torch.Tensor)
            assert self.learn.model is not None and self.learn.opt is not None and self.learn.loss_func is not None
            assert self.learn.dl is not None and self.learn.yb is not None and self.learn.xb is not None
    learn = learner(make_batches(3), make_batches(2, seed=1))
    learn.fit(2, cbs=[S()])
    train = [s for s in seen if s[1]]
    assert [s[4] for s in train] == list(range(6))
    assert [s[2] for s in train] == [0, 1, 2, 0, 1, 2]
    assert all(s[3] == 3 for s in train) and all(s[3] == 2 for s in seen if not s[1])
    assert [s[0] for s in train] == [0, 0, 0, 1, 1, 1]
    assert all(s[5] == 2 for s in seen)


def test_replacing_loss_in_after_loss():
    class Zero(Callback):
        def after_loss(self):
            self.learn.loss = self.learn.loss * 0.0
    learn = learner(opt_func=torch.optim.SGD, lr=1.0)
    before = [p.clone() for p in learn.model.parameters()]
    learn.fit(1, cbs=[Zero()])
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_callback_may_change_pred_and_xb():
    class Half(Callback):
        def before_batch(self):
            l = self.learn
            # xb may be a tensor or a tuple of inputs; either way a callback can scale the inputs
            l.xb = tuple(x * 0 for x in l.xb) if isinstance(l.xb, tuple) else l.xb * 0
    learn = learner(opt_func=torch.optim.SGD, lr=0.1)
    w0 = learn.model[0].weight.clone()
    learn.fit(1, cbs=[Half()])
    assert torch.equal(w0, learn.model[0].weight)  # zero input: no gradient for the first layer's weight


# ---- fit arguments -------------------------------------------------------------------------------------------
def test_fit_lr_overrides_for_this_fit_only():
    lrs = []

    class L(Callback):
        def before_step(self):
            lrs.append(self.learn.opt.param_groups[0]["lr"])
    learn = learner(opt_func=torch.optim.SGD, lr=0.01, cbs=[L()])
    learn.fit(1, lr=0.5)
    assert lrs == [0.5] * 3 and learn.recorder.lrs == [0.5] * 3
    lrs.clear()
    learn.fit(1)
    assert lrs == [0.01] * 3


def test_fit_lr_keyword_and_positional():
    learn = learner(opt_func=torch.optim.SGD, lr=0.01)
    learn.fit(1, 0.2)
    assert learn.recorder.lrs == [0.2] * 3
    learn.fit(n_epochs=1, lr=0.3)
    assert learn.recorder.lrs == [0.3] * 3


def test_fit_zero_epochs_is_a_noop():
    learn = learner()
    before = [p.clone() for p in learn.model.parameters()]
    learn.fit(0)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_fit_cbs_keyword_and_successive_fits():
    learn = learner()
    c = Log()
    learn.fit(1, cbs=[c])
    learn.fit(1)
    assert c.log.count("before_fit") == 1


# ---- validate / get_preds ------------------------------------------------------------------------------------
def test_validate_against_direct_computation():
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    valid = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 20, 6)]  # uneven last batch
    learn = learner(valid=valid, metrics=[accuracy])
    learn.fit(1)
    res = learn.validate()
    assert set(res) == {"valid_loss", "accuracy"}
    with torch.no_grad():
        learn.model.eval()
        out = learn.model(x)
    assert res["valid_loss"] == pytest.approx(nn.CrossEntropyLoss()(out, y).item(), rel=1e-5)
    assert res["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item(), rel=1e-6)
    assert isinstance(res["valid_loss"], float)


def test_validate_other_dl_and_custom_metric_name():
    def mae(pred, targ):
        return (pred.argmax(1) - targ).abs().float().mean()
    learn = learner(metrics=[accuracy, mae])
    other = make_batches(2, seed=7)
    res = learn.validate(other)
    assert set(res) == {"valid_loss", "accuracy", "mae"}
    x = torch.cat([b[0] for b in other]); y = torch.cat([b[1] for b in other])
    with torch.no_grad():
        out = learn.model(x)
    assert res["valid_loss"] == pytest.approx(nn.CrossEntropyLoss()(out, y).item(), rel=1e-5)
    assert res["mae"] == pytest.approx((out.argmax(1) - y).abs().float().mean().item(), rel=1e-5)
    res2 = learn.validate(dl=other)
    assert res2 == pytest.approx(res)


def test_validate_does_not_train_and_history_gets_metrics():
    learn = learner(metrics=[accuracy])
    before = [p.clone() for p in learn.model.parameters()]
    learn.validate()
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    learn.fit(2)
    h = learn.recorder.history
    assert len(h) == 2
    for k in ("epoch", "train_loss", "valid_loss", "accuracy", "time"):
        assert k in h[0]
    assert [r["epoch"] for r in h] == [0, 1]
    assert h[1]["train_loss"] == pytest.approx(np.mean(learn.recorder.losses[3:]))


def test_get_preds_in_order():
    valid = make_batches(3, seed=5)
    learn = learner(valid=valid)
    preds, targs = learn.get_preds()
    x = torch.cat([b[0] for b in valid]); y = torch.cat([b[1] for b in valid])
    with torch.no_grad():
        learn.model.eval()
        ref = learn.model(x)
    assert torch.allclose(preds, ref, atol=1e-6)
    assert torch.equal(targs, y)
    assert not preds.requires_grad
    p2, t2 = learn.get_preds(dl=make_batches(2, seed=9))
    assert p2.shape == (16, 3) and t2.shape == (16,)


def test_get_preds_with_unshuffled_tensor_loader():
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    dls = DataLoaders.from_tensors(x[:20], y[:20], valid=(x[20:], y[20:]), bs=4)
    learn = Learner(make_model(), dls, nn.CrossEntropyLoss(), progress=False)
    preds, targs = learn.get_preds()
    assert torch.equal(targs, y[20:])
    with torch.no_grad():
        assert torch.allclose(preds, learn.model(x[20:]), atol=1e-6)


# ---- save / load --------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    learn = learner(opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), lr=0.1)
    learn.fit(1)
    path = tmp_path / "model.pth"
    learn.save(path)
    w = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_state = {k: v["momentum_buffer"].clone() for k, v in learn.opt.state_dict()["state"].items()}
    learn.fit(1)
    assert not torch.equal(w["0.weight"], learn.model[0].weight)
    learn.load(path)
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, w[k])
    for k, v in learn.opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], opt_state[k])
    # a fresh learner loads it too (str path)
    other = learner(opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), lr=0.1)
    other.load(str(path))
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, w[k])
    # the file is loadable with weights_only=True
    torch.load(path, weights_only=True)


def test_load_missing_file_names_it(tmp_path):
    learn = learner()
    p = tmp_path / "nope.pth"
    with pytest.raises(Exception, match="nope.pth"):
        learn.load(p)


def test_load_truncated_file_names_it(tmp_path):
    learn = learner()
    p = tmp_path / "trunc.pth"
    learn.save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="trunc.pth"):
        learn.load(p)
    p.write_bytes(b"")
    with pytest.raises(Exception, match="trunc.pth"):
        learn.load(p)


def test_load_mismatched_file_names_it(tmp_path):
    p = tmp_path / "big.pth"
    torch.manual_seed(0)
    other = Learner(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), (make_batches(), make_batches()),
                    nn.CrossEntropyLoss(), progress=False)
    other.save(p)
    learn = learner()
    with pytest.raises(Exception, match="big.pth"):
        learn.load(p)


def test_load_foreign_file_names_it(tmp_path):
    p = tmp_path / "foreign.pth"
    torch.save({"something": torch.zeros(3)}, p)
    with pytest.raises(Exception, match="foreign.pth"):
        learner().load(p)
    p2 = tmp_path / "text.pth"
    p2.write_text("hello")
    with pytest.raises(Exception, match="text.pth"):
        learner().load(p2)


# ---- bad input -----------------------------------------------------------------------------------------------
def test_empty_training_data():
    learn = Learner(make_model(), ([], make_batches()), nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        learn.fit(1)


def test_empty_training_generator():
    class Empty:
        def __iter__(self):
            return iter(())
    learn = Learner(make_model(), (Empty(), make_batches()), nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        learn.fit(1)


@pytest.mark.parametrize("lr", [0, 0.0, -1e-3, float("nan"), float("inf")])
def test_bad_lr(lr):
    with pytest.raises(ValueError):
        learner(lr=lr)
    learn = learner()
    with pytest.raises(ValueError):
        learn.fit(1, lr=lr)


def test_negative_n_epochs():
    with pytest.raises(ValueError):
        learner().fit(-1)


def test_non_scalar_loss():
    learn = Learner(make_model(), (make_batches(), make_batches()), nn.CrossEntropyLoss(reduction="none"),
                    progress=False)
    with pytest.raises((ValueError, TypeError), match="scalar"):
        learn.fit(1)


# ---- data ---------------------------------------------------------------------------------------------------
def epoch_of(dl):
    return [(xb.clone(), yb.clone()) for xb, yb in dl]


def test_from_tensors_epochs_cover_every_sample_once_and_reshuffle():
    x = torch.arange(100).float().unsqueeze(1)
    y = torch.arange(100)
    dls = DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=16, seed=3)
    e1, e2 = epoch_of(dls.train), epoch_of(dls.train)
    ys1, ys2 = torch.cat([b[1] for b in e1]), torch.cat([b[1] for b in e2])
    assert len(ys1) == 80 and len(set(ys1.tolist())) == 80
    assert sorted(ys1.tolist()) == sorted(ys2.tolist())
    assert not torch.equal(ys1, ys2)  # fresh permutation each epoch
    for xb, yb in e1:
        assert torch.equal(xb[:, 0].long(), yb)  # pairs stay aligned
    assert len(dls.train) == 5 and [len(b[1]) for b in e1] == [16, 16, 16, 16, 16]
    yv = torch.cat([b[1] for b in dls.valid])
    assert len(yv) == 20 and not set(yv.tolist()) & set(ys1.tolist())
    # same seed -> same order, also for the split
    dls2 = DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=16, seed=3)
    f1, f2 = epoch_of(dls2.train), epoch_of(dls2.train)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(e1 + e2, f1 + f2))
    dls3 = DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=16, seed=4)
    assert not torch.equal(ys1, torch.cat([b[1] for b in dls3.train]))


def test_from_tensors_defaults():
    x, y = torch.randn(200, 3), torch.arange(200)
    dls = DataLoaders.from_tensors(x, y)
    ys = torch.cat([b[1] for b in dls.train])
    assert len(ys) == 160  # valid_pct defaults to 0.2
    assert max(len(b[1]) for b in dls.train) == 64  # bs=64
    assert not torch.equal(ys, ys.sort().values)  # shuffled by default
    assert len(torch.cat([b[1] for b in dls.valid])) == 40


def test_from_tensors_explicit_valid_and_drop_last_and_no_shuffle():
    x, y = torch.randn(50, 3), torch.arange(50)
    xv, yv = torch.randn(7, 3), torch.arange(7)
    dls = DataLoaders.from_tensors(x, y, valid=(xv, yv), bs=16, shuffle=False, drop_last=True)
    b = epoch_of(dls.train)
    assert [len(t[1]) for t in b] == [16, 16, 16]
    assert torch.equal(torch.cat([t[1] for t in b]), torch.arange(48))
    assert torch.equal(b[0][0], x[:16])
    v = epoch_of(dls.valid)
    assert torch.equal(torch.cat([t[1] for t in v]), yv) and torch.equal(torch.cat([t[0] for t in v]), xv)
    dls = DataLoaders.from_tensors(x, y, valid=(xv, yv), bs=16, shuffle=False)
    assert [len(t[1]) for t in dls.train] == [16, 16, 16, 2]
    dls = DataLoaders.from_tensors(x, y, valid=(xv, yv), bs=16, shuffle=True, drop_last=True)
    ys = torch.cat([t[1] for t in dls.train])
    assert len(ys) == 48 and len(set(ys.tolist())) == 48


def test_from_tensors_does_not_touch_global_rng():
    x, y = torch.randn(50, 3), torch.arange(50)
    torch.manual_seed(0)
    a = torch.rand(1)
    torch.manual_seed(0)
    dls = DataLoaders.from_tensors(x, y, bs=8)
    epoch_of(dls.train)
    b = torch.rand(1)
    # not required by the contract, but "same seed -> same order" must not depend on the global seed either
    torch.manual_seed(123)
    dls2 = DataLoaders.from_tensors(x, y, bs=8)
    dls3 = DataLoaders.from_tensors(x, y, bs=8)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(epoch_of(dls2.train), epoch_of(dls3.train)))
    del a, b


def test_from_datasets():
    x, y = torch.randn(40, 4), torch.arange(40)
    tr, va = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])
    dls = DataLoaders.from_datasets(tr, va, bs=8, num_workers=0, seed=1)
    e1, e2 = epoch_of(dls.train), epoch_of(dls.train)
    ys1 = torch.cat([b[1] for b in e1])
    assert sorted(ys1.tolist()) == list(range(30))
    assert not torch.equal(ys1, torch.cat([b[1] for b in e2]))
    for xb, yb in e1:
        assert torch.equal(xb, x[yb])
    assert torch.equal(torch.cat([b[1] for b in dls.valid]), y[30:])
    dls2 = DataLoaders.from_datasets(tr, va, bs=8, seed=1)
    assert torch.equal(ys1, torch.cat([b[1] for b in dls2.train]))
    learn = Learner(make_model(), DataLoaders.from_datasets(TensorDataset(x[:30], y[:30] % 3),
                                                            TensorDataset(x[30:], y[30:] % 3), bs=8),
                    nn.CrossEntropyLoss(), progress=False)
    learn.fit(1)
    assert len(learn.recorder.losses) == 4


def test_dataloaders_constructor():
    tr, va = make_batches(2), make_batches(1)
    dls = DataLoaders(tr, va)
    assert dls.train is tr and dls.valid is va


# ---- recorder ------------------------------------------------------------------------------------------------
def test_recorder_log_and_series():
    class LogIt(Callback):
        def after_batch(self):
            if self.learn.training:
                self.learn.recorder.log("double_iter", torch.tensor(2.0 * self.learn.train_iter))
                self.learn.recorder.log("const", 1.5)
    learn = learner()
    learn.fit(2, cbs=[LogIt()])
    s = learn.recorder.series("double_iter")
    assert [i for i, _ in s] == list(range(6))
    assert [v for _, v in s] == [2.0 * i for i in range(6)]
    assert all(isinstance(v, float) for _, v in s)
    assert learn.recorder.series("const") == [(i, 1.5) for i in range(6)]
    assert len(learn.recorder.losses) == 6 and len(learn.recorder.lrs) == 6
    assert all(isinstance(v, float) for v in learn.recorder.lrs)


def _tensors_in(obj, depth=0, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v, depth + 1, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v, depth + 1, seen)]
    return []


def test_recorder_holds_no_tensors_after_fit():
    class LogIt(Callback):
        def after_batch(self):
            if self.learn.training:
                self.learn.recorder.log("x", self.learn.loss * 2)
    learn = learner(metrics=[accuracy])
    learn.fit(2, cbs=[LogIt()])
    rec = learn.recorder
    state = {k: v for k, v in vars(rec).items() if k != "learn"}
    assert _tensors_in(state) == []
    assert _tensors_in(rec.history) == [] and _tensors_in(rec.losses) == []
    assert rec.series("x")[0][1] == pytest.approx(2 * rec.losses[0])


def test_recorder_plots_return_figures():
    from matplotlib.figure import Figure
    learn = learner()
    learn.fit(2)
    assert isinstance(learn.recorder.plot_loss(), Figure)
    assert isinstance(learn.recorder.plot_lr(), Figure)


def test_recorder_is_always_on():
    from looplab import Recorder
    learn = learner()
    assert isinstance(learn.recorder, Recorder) and learn.recorder in learn.cbs


# ---- progress bar --------------------------------------------------------------------------------------------
def test_progress_bar_on_by_default_and_prints_table(capsys):
    from looplab import ProgressBar
    learn = Learner(make_model(), (make_batches(), make_batches()), nn.CrossEntropyLoss(), metrics=[accuracy])
    assert any(isinstance(c, ProgressBar) for c in learn.cbs)
    learn.fit(2)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "train_loss" in text and "valid_loss" in text and "accuracy" in text


def test_progress_bar_can_be_turned_off(capsys):
    from looplab import ProgressBar
    learn = Learner(make_model(), (make_batches(), make_batches()), nn.CrossEntropyLoss(), progress=False)
    assert not any(isinstance(c, ProgressBar) for c in learn.cbs)
    learn.fit(1)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    learn2 = Learner(make_model(), (make_batches(), make_batches()), nn.CrossEntropyLoss())
    learn2.remove_cb(ProgressBar)
    learn2.fit(1)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_bar_uses_tqdm_auto():
    import looplab.callbacks.progress as pb
    from tqdm.auto import tqdm
    assert pb.tqdm is tqdm


# ---- tensorboard ---------------------------------------------------------------------------------------------
def test_tensorboard_read_back_with_event_accumulator(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from looplab import TensorBoard

    class LogIt(Callback):
        def after_batch(self):
            if self.learn.training:
                self.learn.recorder.log("my_series", float(self.learn.train_iter))
    learn = learner(metrics=[accuracy], lr=0.01)
    learn.fit(2, cbs=[TensorBoard(tmp_path / "tb"), LogIt()])
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "tb") for f in fs if "tfevents" in f]
    assert files
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = tags["scalars"]
    loss_tag = next(t for t in scalars if "loss" in t and "valid" not in t)
    lr_tag = next(t for t in scalars if t.split("/")[-1] == "lr")
    assert [e.value for e in acc.Scalars(loss_tag)] == pytest.approx(learn.recorder.losses, rel=1e-6)
    assert [e.value for e in acc.Scalars(lr_tag)] == pytest.approx([0.01] * 6)
    valid_tag = next(t for t in scalars if "valid_loss" in t)
    assert [e.value for e in acc.Scalars(valid_tag)] == pytest.approx([r["valid_loss"] for r in learn.recorder.history],
                                                                      rel=1e-6)
    acc_tag = next(t for t in scalars if "accuracy" in t)
    assert len(acc.Scalars(acc_tag)) == 2
    my = next(t for t in scalars if "my_series" in t)
    assert [e.value for e in acc.Scalars(my)] == [float(i) for i in range(6)]
    hists = tags["histograms"]
    assert len(hists) >= 4  # every weight and bias
    h = acc.Histograms(hists[0])
    assert len(h) == 2  # once per epoch
