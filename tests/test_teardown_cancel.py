"""Issue 15's hardening contract: teardown however a fit ends, the cancel table, copies that stay independent,
a neutral lr_find, per-group schedules, TensorBoard across fits, atomic callback lists, clear errors."""
import copy
import math
import signal
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import (EMA, SWA, ActivationCheckpointing, Callback, CancelBackward, CancelBatch, CancelEpoch,
                     CancelFit, CancelStep, CancelTrain, CancelValidate, Checkpoint, DataLoaders, EarlyStopping,
                     GradientAccumulation, Learner, MixedPrecision, ParamScheduler, TensorBoard)
from looplab.callback import EVENTS


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def make_dls(n=64, bs=16, shuffle=True):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoaders.from_tensors(x, y, valid=(x[:24], y[:24]), bs=bs, shuffle=shuffle, seed=3)


def make_learner(cbs=(), model=None, **kw):
    kw = {"opt_func": partial(torch.optim.SGD, momentum=0.9), "lr": 0.05, "progress": False, **kw}
    return Learner(make_model() if model is None else model, make_dls(), F.cross_entropy, cbs=cbs, **kw)


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_same_opt_state(s1, s2):
    """Optimizer state dicts compared tensor by tensor (and every other value by ==)."""
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        a, b = s1["state"][k], s2["state"][k]
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name]), (k, name)
            else:
                assert a[name] == b[name]


# ---- copies are independent -------------------------------------------------------------------------------------
class LiveWeights(Callback):
    """Records the live weights after every optimizer step (order after EMA's update)."""
    order = 200

    def before_fit(self):
        self.steps = []

    def after_step(self):
        self.steps.append(params_of(self.learn.model))


def test_activation_checkpointing_with_ema_averages_the_live_weights():
    decay = 0.8
    live, ema = LiveWeights(), EMA(decay=decay)
    learn = make_learner([ActivationCheckpointing(nn.Linear), ema, live])
    start = params_of(learn.model)
    learn.fit(2)
    expected = start
    for w in live.steps:  # the EMA recurrence, by hand
        expected = [decay * e + (1 - decay) * x for e, x in zip(expected, w)]
    got = params_of(ema.ema_model)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(g, w) for g, w in zip(got, params_of(learn.model)))
    # the copy runs its own weights: its output differs from the live model's
    x = torch.randn(4, 6)
    assert not torch.allclose(ema.ema_model(x), learn.model(x))
    assert all("forward" not in m.__dict__ for m in learn.model.modules())


def test_a_copy_taken_during_a_fit_carries_no_hook_or_patch():
    copies = []

    class Snapshot(Callback):
        order = 1000

        def after_batch(self):
            if self.learn.training and not copies:
                copies.append(copy.deepcopy(self.learn.model))

    learn = make_learner([MixedPrecision(torch.bfloat16), ActivationCheckpointing(nn.Linear), Snapshot()])
    learn.fit(1)
    snap = copies[0]
    x = torch.randn(4, 6)
    with torch.no_grad():
        out = snap(x)
    assert out.dtype == torch.float32  # no autocast from a copied MixedPrecision
    ref = copy.deepcopy(snap)
    for m in ref.modules():
        m.__dict__.pop("forward", None)
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    with torch.no_grad():
        assert torch.equal(ref(x), out)


# ---- teardown on any exception ------------------------------------------------------------------------------------
class Boom(Exception):
    pass


class RaiseIn(Callback):
    order = 20

    def __init__(self, event, exc, at=3):
        self.exc, self.at = exc, at
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self):
        learn = self.learn
        if (learn.train_iter >= self.at and learn.training) or not learn.training:
            raise self.exc


class FailingLoader:
    """Yields the batches of `inner`, then raises at batch `at`."""

    def __init__(self, inner, exc, at):
        self.inner, self.exc, self.at = inner, exc, at

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if i == self.at:
                raise self.exc
            yield b


def hooks_of(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def feature_cbs(tmp_path):
    return [MixedPrecision(torch.bfloat16), ActivationCheckpointing(nn.Linear), EMA(validate_with_ema=True),
            SWA(start_epoch=0), Checkpoint(tmp_path / "ck", every_n_steps=2)]


@pytest.mark.parametrize("where", ["callback", "validation", "loss", "data", "keyboard"])
def test_any_exception_leaves_the_learner_as_a_finished_fit_does(tmp_path, where):
    exc = KeyboardInterrupt() if where == "keyboard" else Boom(where)
    model = make_model()
    learn = make_learner(model=model)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    n_cbs, hooks = len(learn.cbs), hooks_of(model)
    cbs = feature_cbs(tmp_path)
    if where in ("callback", "keyboard"):
        cbs.append(RaiseIn("after_loss", exc))
    elif where == "validation":
        cbs.append(RaiseIn("after_pred", exc))
    elif where == "loss":
        calls = []

        def loss_func(pred, y):
            calls.append(1)
            if len(calls) == 4:
                raise exc
            return F.cross_entropy(pred, y)
        learn.loss_func = loss_func
    else:
        learn.dls.train = FailingLoader(learn.dls.train, exc, at=2)
    before = params_of(model)
    with pytest.raises(type(exc)) as info:
        learn.fit(2, cbs=cbs)
    assert info.value is exc  # the same object propagates
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert hooks_of(model) == hooks and all("forward" not in m.__dict__ for m in model.modules())
    assert learn.model is model and learn.exception is exc
    assert len(learn.cbs) == n_cbs
    assert torch.is_autocast_enabled("cpu") is False
    # the weights trained so far, no average copied in (a fit that raised did not finish)
    if where != "validation":
        assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model))) or where == "data"
    swa = cbs[3]
    if swa.average is not None:
        assert any(not torch.equal(a, p) for a, p in zip(swa.average, params_of(model)))
    # a later fit with the same callbacks trains
    learn.loss_func = F.cross_entropy
    if where == "data":
        learn.dls.train = learn.dls.train.inner
    again = [cb for cb in cbs if not isinstance(cb, RaiseIn)]  # the very same callback objects
    w = params_of(model)
    learn.fit(1, cbs=again)
    assert learn.exception is None and learn.model is model
    assert any(not torch.equal(a, b) for a, b in zip(w, params_of(model)))
    assert hooks_of(model) == hooks and all("forward" not in m.__dict__ for m in model.modules())


def test_after_fit_sees_the_exception_and_teardown_errors_are_not_lost():
    seen = []

    class Watch(Callback):
        def after_fit(self):
            seen.append(self.learn.exception)

    class BadTeardown(Callback):
        def after_fit(self):
            raise ValueError("teardown failed")

    err = Boom("x")
    learn = make_learner([Watch()])
    with pytest.raises(Boom), pytest.warns(RuntimeWarning, match="teardown failed"):
        learn.fit(1, cbs=[RaiseIn("after_step", err, at=0), BadTeardown()])
    assert seen == [err]
    with pytest.raises(ValueError, match="teardown failed"):  # a fit that ran out: the teardown error is raised
        learn.fit(1, cbs=[BadTeardown()])
    assert seen[-1] is None


# ---- the cancel table ---------------------------------------------------------------------------------------------
LEVELS = {"fit": CancelFit, "epoch": CancelEpoch, "train": CancelTrain, "validate": CancelValidate,
          "batch": CancelBatch, "backward": CancelBackward, "step": CancelStep}


def expected_events(exc_type, where, n_train=2, n_valid=1):
    """The README's cancel table, executed: the events a fit(1) fires when `exc_type` is raised at the first
    firing of `where` (a training batch's for batch events). Returns (events, escaped exception type or None)."""
    seen, state = [], {"fired": False}

    def fire(event, training=True):
        seen.append(event)
        if event == where and not state["fired"] and (training or event not in BATCH_EVENTS):
            state["fired"] = True
            raise exc_type()

    def level(name, body, training=True):
        try:
            fire(f"before_{name}", training)
            body()
        except LEVELS[name]:
            fire(f"after_cancel_{name}", training)
        fire(f"after_{name}", training)
        return seen[-2] != f"after_cancel_{name}"

    def train_batch():
        fire("after_pred")
        fire("after_loss")
        if level("backward", lambda: None):
            level("step", lambda: None)

    def valid_batch():
        fire("after_pred", False)
        fire("after_loss", False)

    def phase(n, batch, training):
        for _ in range(n):
            level("batch", batch, training)

    def epoch():
        level("train", lambda: phase(n_train, train_batch, True))
        level("validate", lambda: phase(n_valid, valid_batch, False), training=False)

    def fit():
        level("epoch", epoch)

    try:
        try:
            fire("before_fit")
            fit()
        except CancelFit:
            fire("after_cancel_fit")
    except Exception as e:
        seen.append("after_fit")  # teardown, however the fit ended
        return seen, type(e)
    try:
        fire("after_fit")
    except Exception as e:
        return seen, type(e)
    return seen, None


BATCH_EVENTS = {"before_batch", "after_pred", "after_loss", "after_batch"}


class Recording(Callback):
    def __init__(self, order, exc_type=None, where=None):
        self.order, self.exc_type, self.where, self.events, self.fired = order, exc_type, where, [], False
        for event in EVENTS:
            setattr(self, event, partial(self._on, event))

    def _on(self, event):
        self.events.append(event)
        if event == self.where and not self.fired and (self.learn.training or event not in BATCH_EVENTS):
            self.fired = True
            raise self.exc_type()


def run_recorded(exc_type, where, order, fp16):
    learn = Learner(make_model(), make_dls(n=40, bs=16), F.cross_entropy, lr=0.01, progress=False)
    learn.dls.valid = [next(iter(learn.dls.valid))]
    rec = Recording(order, exc_type, where)
    cbs = [rec] + ([MixedPrecision(torch.float16)] if fp16 else [])
    learn.dls.train = list(learn.dls.train)[:2]
    escaped = None
    try:
        learn.fit(1, cbs=cbs)
    except Exception as e:
        escaped = type(e)
    return rec.events, escaped


TABLE_EVENTS = [e for e in EVENTS if not e.startswith("after_cancel_")]


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("exc_type", list(LEVELS.values()), ids=lambda e: e.__name__)
def test_every_cancel_in_every_event_gives_the_documented_sequence(exc_type, fp16):
    for where in TABLE_EVENTS:
        expected, escaped = expected_events(exc_type, where)
        for order in (-1000, 1000):
            got, got_escaped = run_recorded(exc_type, where, order, fp16)
            assert (got, got_escaped) == (expected, escaped), (exc_type.__name__, where, order, fp16)


def test_the_cancel_table_in_the_readme_matches_the_reference():
    """Spot checks of the rows the README states in words."""
    seq, esc = expected_events(CancelBackward, "before_backward")
    i = seq.index("after_cancel_backward")
    assert seq[i:i + 3] == ["after_cancel_backward", "after_backward", "after_batch"] and esc is None
    seq, esc = expected_events(CancelStep, "before_step")
    i = seq.index("after_cancel_step")
    assert seq[i:i + 3] == ["after_cancel_step", "after_step", "after_batch"]
    seq, esc = expected_events(CancelStep, "after_loss")
    assert esc is CancelStep and seq[-1] == "after_fit"


class ZeroedAfter(Callback):
    order = 1000

    def before_fit(self):
        self.zeroed = []

    def after_batch(self):
        if self.learn.training:
            self.zeroed.append(all(p.grad is None or not p.grad.any() for p in self.learn.model.parameters()))


@pytest.mark.parametrize("fp16", [False, True])
def test_cancel_backward_skips_backward_and_step_and_zeroes_gradients(fp16):
    class Skip(Callback):
        def before_backward(self):
            if self.learn.train_iter == 1:
                raise CancelBackward

    class SawGrads(Callback):
        order = 500

        def before_fit(self):
            self.steps = 0

        def after_step(self):
            self.steps += 1

    zero, saw = ZeroedAfter(), SawGrads()
    learn = make_learner([Skip(), zero, saw] + ([MixedPrecision(torch.float16)] if fp16 else []))
    learn.fit(1)
    assert saw.steps == 3 and all(zero.zeroed)


def test_fp16_overflow_fires_after_cancel_step_once_and_leaves_the_weights():
    class InjectInf(Callback):
        order = 60

        def after_loss(self):
            if self.learn.training and self.learn.train_iter == 2:
                self.learn.loss = self.learn.loss * math.inf

    class Weights(Callback):
        order = 1000

        def before_fit(self):
            self.before_step, self.cancelled, self.after = [], [], []

        def before_step(self):
            self.before_step.append(self.learn.train_iter)

        def after_cancel_step(self):
            self.cancelled.append(self.learn.train_iter)

        def after_batch(self):
            if self.learn.training:
                self.after.append(params_of(self.learn.model))

    watch, mp = Weights(), MixedPrecision(torch.float16, init_scale=2.0**10)
    learn = make_learner([InjectInf(), watch, mp])
    learn.fit(1)
    assert watch.cancelled == [2] and mp.overflows == 1
    assert watch.before_step == [0, 1, 3]  # every step that happens, though ordered after MixedPrecision
    assert_same_tensors(watch.after[1], watch.after[2])
    assert mp.scale == 2.0**9


def test_a_cancel_step_from_another_callback_is_not_an_overflow():
    class Cancel(Callback):
        order = 1000  # after MixedPrecision

        def before_step(self):
            if self.learn.train_iter == 1:
                raise CancelStep

    zero = ZeroedAfter()
    mp = MixedPrecision(torch.float16)
    learn = make_learner([Cancel(), mp, zero])
    learn.fit(1)
    assert mp.overflows == 0 and all(zero.zeroed)


# ---- lr_find is neutral -------------------------------------------------------------------------------------------
def two_groups(model):
    return [list(model[0].parameters()), list(model[2].parameters()) + list(model[4].parameters())]


def neutral_run(find, earlier):
    torch.manual_seed(0)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-3,
                    splitter=two_groups, progress=False)
    if earlier:
        learn.fit(1, cbs=[EMA(decay=0.9), ParamScheduler({"lr": lambda pos: 1e-3 * (1 - pos)})])
    ema, swa = EMA(decay=0.9), SWA(start_epoch=1)
    cbs = [ema, swa, ParamScheduler({"lr": lambda pos: 1e-2 * (1 - pos) + 1e-4}), MixedPrecision(torch.float16),
           GradientAccumulation(2), EarlyStopping(patience=5)]
    learn.add_cbs(cbs)
    if earlier:  # the earlier fit's EMA state must not leak into the next fit
        learn.fit(1)
    if find:
        learn.lr_find(num_it=10)
    learn.fit(3, lr=slice(1e-4, 1e-2))
    return learn, ema


@pytest.mark.parametrize("earlier", [False, True])
def test_a_fit_after_lr_find_is_bit_identical_to_one_without(earlier):
    a, ema_a = neutral_run(find=False, earlier=earlier)
    b, ema_b = neutral_run(find=True, earlier=earlier)
    assert_same_tensors(params_of(a.model), params_of(b.model))
    assert_same_tensors(params_of(ema_a.ema_model), params_of(ema_b.ema_model))
    assert_same_opt_state(a.opt.state_dict(), b.opt.state_dict())
    strip = [{k: v for k, v in row.items() if k != "time"} for row in a.recorder.history]
    assert strip == [{k: v for k, v in row.items() if k != "time"} for row in b.recorder.history]
    assert a.recorder.losses == b.recorder.losses and a.recorder.lrs == b.recorder.lrs


def test_lr_find_on_a_fresh_learner_with_a_scheduler_then_a_sliced_fit():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=1e-3, splitter=two_groups, progress=False,
                    cbs=[ParamScheduler({"lr": lambda pos: 1e-2})])
    learn.lr_find(num_it=5)
    learn.fit(1, lr=slice(1e-4, 1e-2))
    groups = learn.opt.param_groups
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-2)


def test_lr_find_keeps_its_snapshot_on_the_cpu(monkeypatch):
    import looplab.lr_finder as lf
    seen = []
    real = lf._to_cpu

    def spy(obj):
        out = real(obj)
        seen.append(out)
        return out
    monkeypatch.setattr(lf, "_to_cpu", spy)
    make_learner().lr_find(num_it=5)
    tensors = [t for s in seen for t in _tensors(s)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


# ---- schedules per group ------------------------------------------------------------------------------------------
def test_a_weight_decay_schedule_keeps_a_zero_group_at_zero_and_the_others_ratios():
    model = make_model()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]

    def opt_func(groups, lr):
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": no_decay[:1], "weight_decay": 0.05},
                                  {"params": no_decay[1:], "weight_decay": 0.0}], lr=lr)
    seen = []

    class Probe(Callback):
        order = 20

        def before_step(self):
            seen.append([g["weight_decay"] for g in self.learn.opt.param_groups])

    learn = Learner(model, make_dls(), F.cross_entropy, opt_func=opt_func, progress=False)
    learn.fit(1, cbs=[ParamScheduler({"wd": lambda pos: 0.2 * (1 - pos)}), Probe()])
    n = 4
    for i, wds in enumerate(seen):
        value = 0.2 * (1 - i / n)
        assert wds[2] == 0.0
        assert wds[1] == pytest.approx(value)  # the last non-zero group is the reference
        assert wds[0] == pytest.approx(value * 0.1 / 0.05)


# ---- TensorBoard across fits --------------------------------------------------------------------------------------
def test_tensorboard_never_rewrites_a_step_across_fits(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = TensorBoard(tmp_path, histograms=False)
    learn = make_learner([tb])
    learn.fit(2)
    first = list(learn.recorder.losses)
    learn.fit(1)
    second = list(learn.recorder.losses)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("train_loss")
    steps = [e.step for e in events]
    assert steps == list(range(len(first) + len(second)))
    assert [e.value for e in events] == pytest.approx(first + second)
    assert [e.step for e in acc.Scalars("valid_loss")] == [4, 8, 12]


# ---- callback lists, empty and one-shot loaders, frozen models, detached losses -----------------------------------
def test_fit_attaches_all_of_its_callbacks_or_none():
    class Good(Callback):
        def after_batch(self):
            pass

    class Bad(Callback):
        def after_bacth(self):
            pass

    learn = make_learner()
    n = len(learn.cbs)
    good = Good()
    with pytest.raises(ValueError, match="after_bacth"):
        learn.fit(1, cbs=[good, Bad()])
    assert len(learn.cbs) == n and good not in learn.cbs


@pytest.mark.parametrize("call", ["validate", "get_preds"])
def test_validate_on_an_empty_loader_is_an_error(call):
    learn = make_learner()
    learn.fit(1)
    with pytest.raises(ValueError, match="empty"):
        getattr(learn, call)(dl=[])
    with pytest.raises(ValueError, match="empty"):
        getattr(learn, call)(dl=iter([]))


def test_a_single_pass_generator_is_named_as_such():
    dls = make_dls()
    batches = list(dls.valid)
    learn = make_learner()
    learn.dls.valid = (b for b in batches)
    with pytest.raises(ValueError, match="single-pass"):
        learn.fit(2)
    learn = make_learner()
    learn.dls.train = (b for b in list(dls.train))
    learn.dls.valid = batches
    with pytest.raises(ValueError, match="single-pass"):
        learn.fit(2)


def test_fit_with_an_empty_validation_loader_is_an_error():
    learn = make_learner()
    learn.dls.valid = []
    with pytest.raises(ValueError, match="validation data is empty"):
        learn.fit(1)


def test_a_frozen_model_and_a_detached_loss_are_named():
    learn = make_learner()
    learn.model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        learn.fit(1)
    learn = make_learner()
    learn.loss_func = lambda pred, y: F.cross_entropy(pred.detach(), y)
    with pytest.raises(ValueError, match="does not require grad"):
        learn.fit(1)


def test_a_batch_that_is_not_a_pair_is_a_type_error_naming_it():
    learn = make_learner()
    x, y = next(iter(make_dls().train))
    learn.dls.train = [(x, y, y)]
    with pytest.raises(TypeError, match="tuple of length 3"):
        learn.fit(1)

