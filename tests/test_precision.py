"""MixedPrecision: autocast, a visible / logged / checkpointed loss scale, skipped overflow steps — checked
against torch.amp.GradScaler driven by a hand-written loop."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, CancelStep, DataLoaders, Learner
from looplab.callbacks import MixedPrecision, TensorBoard

INIT_SCALE, GROWTH_INTERVAL, INF_AT = 2.0**10, 3, 5  # small scale: no natural fp16 overflow in these tiny nets


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make_data(n=64):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return x, y


def make_learner(cbs=(), **mp_kwargs):
    x, y = make_data()
    dls = DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=16, shuffle=False)
    mp = MixedPrecision(init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL, **mp_kwargs)
    learn = Learner(make_model(), dls, F.cross_entropy, opt_func=partial(torch.optim.SGD, momentum=0.9), lr=0.1,
                    cbs=[mp, *cbs], progress=False)
    return learn, mp


class InjectInf(Callback):
    """Multiplies the loss of training step `at` by inf. Ordered after the Recorder (50), which so records the
    finite loss, while backward gets the infinite one."""
    order = 60

    def __init__(self, at):
        self.at = at

    def after_loss(self):
        if self.learn.training and self.learn.train_iter == self.at:
            self.learn.loss = self.learn.loss * math.inf


class WeightsPerStep(Callback):
    order = 100

    def before_fit(self):
        self.weights = []

    def after_batch(self):
        if self.learn.training:
            self.weights.append([p.detach().clone() for p in self.learn.model.parameters()])


def reference_loop(n_epochs, inf_at=None, scaler_state=None):
    """What torch's GradScaler documentation prescribes, by hand: returns the model and the scale of every step."""
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    scales, step = [], 0
    for _ in range(n_epochs):
        for i in range(0, len(y), 16):
            with torch.autocast("cpu", dtype=torch.float16):
                pred = model(x[i:i + 16])
            loss = F.cross_entropy(pred.float(), y[i:i + 16])
            if step == inf_at:
                loss = loss * math.inf
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            step += 1
    return model, scales


def test_overflow_step_is_skipped_and_scale_backs_off_like_gradscaler():
    probe = WeightsPerStep()
    learn, mp = make_learner([InjectInf(INF_AT), probe])
    learn.fit(3)
    ref_model, ref_scales = reference_loop(3, inf_at=INF_AT)

    assert mp.overflows == 1
    scales = [v for _, v in learn.recorder.series("loss_scale")]
    assert scales == ref_scales  # the scale each batch's loss was multiplied by, batch for batch
    assert [i for i, _ in learn.recorder.series("loss_scale")] == list(range(12))  # every batch logged
    assert scales[INF_AT + 1] == scales[INF_AT] * 0.5  # backoff_factor
    assert scales[INF_AT + 1] != scales[INF_AT - 1] and scales[INF_AT] == scales[INF_AT - 1]  # both values visible
    assert max(scales) > INIT_SCALE  # and it grew again: growth_interval=3
    assert mp.scale == ref_scales[-1] * 2  # grown after the last 3 good steps, like the reference
    for before, after in zip(probe.weights[INF_AT - 1], probe.weights[INF_AT]):
        assert torch.equal(before, after)  # the overflowed step left the weights untouched
    assert not all(torch.equal(a, b) for a, b in zip(probe.weights[INF_AT], probe.weights[INF_AT + 1]))
    assert all(math.isfinite(v) for v in learn.recorder.losses)  # the recorder saw the true (finite) loss
    for p, q in zip(learn.model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


class Dtypes(Callback):
    """What the first Linear produces inside the forward, and what the loss sees afterwards."""
    order = 100

    def before_fit(self):
        self.inner, self.pred = [], []
        self.hook = self.learn.model[0].register_forward_hook(lambda m, a, out: self.inner.append(out.dtype))

    def after_loss(self):
        self.pred.append(self.learn.pred.dtype)

    def after_fit(self):
        self.hook.remove()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_during_forward_float32_predictions_and_off_afterwards(dtype):
    dtypes = Dtypes()
    learn, mp = make_learner([dtypes], dtype=dtype)
    learn.fit(1)
    assert set(dtypes.inner) == {dtype} and len(dtypes.inner) == 5  # 4 training + 1 validation batch
    assert set(dtypes.pred) == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")
    assert learn.model(torch.randn(2, 8)).dtype == torch.float32  # the model is left as it was
    assert learn.recorder.series_names == ["loss_scale"]  # bfloat16 logs its scale too: 1.0
    if dtype is torch.bfloat16:
        assert mp.scale == 1.0 and mp.state_dict()["scaler"] == {}
        assert [v for _, v in learn.recorder.series("loss_scale")] == [1.0] * 4


def test_autocast_is_switched_off_when_the_forward_raises():
    learn, _ = make_learner()
    learn.model.register_forward_hook(lambda m, a, out: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1)
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "float16", None])
def test_other_dtypes_are_rejected(dtype):
    with pytest.raises(ValueError, match="dtype"):
        MixedPrecision(dtype=dtype)


def digits_accuracy(cbs):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    dls = DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=64, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    accuracy = lambda pred, yb: (pred.argmax(1) == yb).float().mean()
    learn = Learner(model, dls, F.cross_entropy, lr=1e-2, metrics=[accuracy], cbs=cbs, progress=False)
    learn.fit(4)
    return learn.validate()["<lambda>"]


def test_bfloat16_trains_digits_as_well_as_float32():
    fp32, bf16 = digits_accuracy([]), digits_accuracy([MixedPrecision(torch.bfloat16)])
    assert fp32 > 0.93 and bf16 > 0.93  # measured: 0.964 for both
    assert abs(fp32 - bf16) < 0.02


def test_loss_scale_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn, _ = make_learner([InjectInf(INF_AT), TensorBoard(tmp_path, histograms=False)])
    learn.fit(2)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    written = [(e.step, e.value) for e in events.Scalars("loss_scale")]
    _, ref_scales = reference_loop(2, inf_at=INF_AT)
    assert written == list(enumerate(ref_scales))
    assert len(set(v for _, v in written)) >= 2


def test_scale_survives_state_dict_save_and_load(tmp_path):
    learn, mp = make_learner([InjectInf(INF_AT)])
    learn.fit(3)
    torch.save(mp.state_dict(), tmp_path / "mp.pt")
    state = torch.load(tmp_path / "mp.pt", weights_only=True)
    saved_scale = mp.scale
    assert saved_scale != INIT_SCALE

    fresh = MixedPrecision(init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    fresh.load_state_dict(state)  # before its scaler exists (GradScaler initialises lazily)
    assert fresh.scale == saved_scale and fresh.overflows == 1

    reference = torch.amp.GradScaler("cpu")
    reference.load_state_dict(state["scaler"])  # torch's own scaler accepts it
    assert reference.get_scale() == saved_scale

    x, y = make_data()
    learn2 = Learner(make_model(), DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=16, shuffle=False),
                     F.cross_entropy, opt_func=partial(torch.optim.SGD, momentum=0.9), lr=0.1, cbs=[fresh],
                     progress=False)
    learn2.fit(1)
    _, ref_scales = reference_loop(1, scaler_state=state["scaler"])
    assert learn2.recorder.series("loss_scale")[0][1] == saved_scale  # continued where it was, not at init_scale
    assert [v for _, v in learn2.recorder.series("loss_scale")] == ref_scales

    fresh.load_state_dict(state)  # loading into a scaler that is already running also restores the scale
    assert fresh.scale == saved_scale


def test_a_second_fit_continues_at_the_scale_reached():
    learn, mp = make_learner([InjectInf(INF_AT)])
    learn.fit(2)
    reached = mp.scale
    learn.fit(1)
    assert learn.recorder.series("loss_scale")[0][1] == reached


class CancelStepAt(Callback):
    """Cancels the optimizer step of training step `at` in before_step, before MixedPrecision (30) steps."""
    order = 25

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.learn.train_iter == self.at:
            raise CancelStep


def test_a_step_cancelled_by_another_callback_ends_the_scaler_iteration():
    probe = WeightsPerStep()
    learn, mp = make_learner([CancelStepAt(2), probe])
    learn.fit(2)  # no "unscale_() has already been called" at the next step
    assert all(torch.equal(a, b) for a, b in zip(probe.weights[1], probe.weights[2]))
    assert mp.overflows == 0
    # torch's scaler counts that iteration as a good one (unscale_ found no inf, update() grows the tracker)
    _, ref_scales = reference_loop(2)
    assert [v for _, v in learn.recorder.series("loss_scale")] == ref_scales
