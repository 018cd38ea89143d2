"""GradientClip and GradientAccumulation, alone and with MixedPrecision, against hand-written loops that use
torch's clip_grad_norm_ / clip_grad_value_ / GradScaler, and against training on the concatenated batch."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import GradientAccumulation, GradientClip, MixedPrecision
from test_precision import InjectInf  # multiplies one training step's loss by inf

LR, N = 0.5, 128


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))


def make_data(n=N):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g) * 3, torch.randint(0, 3, (n,), generator=g)


class NormProbeSGD(torch.optim.SGD):
    """SGD that records the total 2-norm of the gradients it is given at every step it takes."""

    def __init__(self, params, lr, momentum=0.9):
        super().__init__(params, lr=lr, momentum=momentum)
        self.norms = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return super().step(closure)


def fit(n_epochs, cbs=(), bs=16, n=N, shuffle=False):
    x, y = make_data(n)
    dls = DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=bs, shuffle=shuffle, seed=3)
    learn = Learner(make_model(), dls, F.cross_entropy, opt_func=NormProbeSGD, lr=LR, cbs=cbs, progress=False)
    learn.fit(n_epochs)
    return learn


def reference(n_epochs, n_acc=1, max_norm=None, clip_value=None, fp16=False, inf_at=None):
    """The textbook loop: micro-batches of 16 in order, loss / n_acc, optional GradScaler, unscale_, clipping."""
    model, (x, y) = make_model(), make_data()
    opt = NormProbeSGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if fp16 else None
    norms, scales, k = [], [], 0
    for _ in range(n_epochs):
        for i in range(0, N, 16):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                pred = model(x[i:i + 16])
            loss = F.cross_entropy(pred.float(), y[i:i + 16]) / n_acc
            if k == inf_at:
                loss = loss * math.inf
            if scaler:
                scales.append(scaler.get_scale())
                loss = scaler.scale(loss)
            loss.backward()
            k += 1
            if k % n_acc:
                continue
            if scaler:
                scaler.unscale_(opt)
            if max_norm is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
            if clip_value is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    return model, opt, norms, scales


def assert_same_weights(m1, m2, atol=1e-6):
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


def logged(learn, name):
    return [v for _, v in learn.recorder.series(name)]


# ---- GradientClip -------------------------------------------------------------------------------------------------
def test_clip_norm_is_clip_grad_norm_and_logs_the_norm_before_clipping():
    learn = fit(2, [GradientClip(max_norm=1.0)])
    ref_model, _, ref_norms, _ = reference(2, max_norm=1.0)
    assert_same_weights(learn.model, ref_model)
    assert logged(learn, "grad_norm") == pytest.approx(ref_norms, rel=1e-5)  # clip_grad_norm_ returns it unclipped
    assert min(ref_norms) < 1.0 < max(ref_norms)  # some steps clipped, some not
    assert max(learn.opt.norms) <= 1.0 * (1 + 1e-5)


def test_clip_value_is_clip_grad_value_():
    learn = fit(2, [GradientClip(clip_value=0.05)])
    ref_model, *_ = reference(2, clip_value=0.05)
    assert_same_weights(learn.model, ref_model)
    unclipped = fit(2)
    with pytest.raises(AssertionError):
        assert_same_weights(unclipped.model, ref_model)  # the clipping mattered


class GradsAt(Callback):
    """Copies of the gradients in before_step, at its order (to look just before and just after GradientClip)."""

    def __init__(self, order):
        self.order, self.grads = order, []

    def before_step(self):
        self.grads.append([p.grad.clone() for p in self.learn.model.parameters()])


def test_float16_clips_unscaled_gradients_once_and_never_an_overflowed_step():
    before, after = GradsAt(15), GradsAt(25)  # GradientClip is 20, MixedPrecision steps at 30
    learn = fit(2, [MixedPrecision(init_scale=2.0**10), GradientClip(max_norm=0.5), InjectInf(5), before, after])
    ref_model, ref_opt, ref_norms, _ = reference(2, max_norm=0.5, fp16=True, inf_at=5)
    assert_same_weights(learn.model, ref_model)
    assert len(learn.opt.norms) == 15  # 16 steps, one skipped
    assert max(learn.opt.norms) <= 0.5 * (1 + 1e-5)  # what the optimizer saw, at every step
    assert learn.opt.norms == pytest.approx(ref_opt.norms, rel=1e-5)
    norms = logged(learn, "grad_norm")
    assert not math.isfinite(norms[5]) and not math.isfinite(ref_norms[5])
    del norms[5], ref_norms[5]
    assert norms == pytest.approx(ref_norms, rel=1e-5)  # norms of the unscaled gradients
    for g_before, g_after in zip(before.grads[5], after.grads[5]):
        torch.testing.assert_close(g_before, g_after, rtol=0, atol=0, equal_nan=True)  # left as they were
    assert any(not torch.equal(a, b) for a, b in zip(before.grads[0], after.grads[0]))  # step 0 was clipped


def test_clip_rejects_bad_values():
    for kwargs in ({"max_norm": 0}, {"max_norm": -1.0}, {"norm_type": 0}, {"clip_value": 0}, {"max_norm": "1"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GradientClip(**kwargs)


# ---- GradientAccumulation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [128, 112])  # 112: the epoch's last window holds 3 micro-batches (and bs 64: 64 + 48)
def test_accumulating_4_batches_of_16_is_one_batch_of_64(n):
    small = fit(2, [GradientAccumulation(4)], bs=16, n=n, shuffle=True)
    big = fit(2, bs=64, n=n, shuffle=True)
    assert_same_weights(small.model, big.model)
    assert len(small.opt.norms) == len(big.opt.norms) == 2 * math.ceil(n / 64)


def test_recorder_keeps_the_true_loss_of_every_micro_batch():
    learn = fit(1, [GradientAccumulation(4)])
    x, y = make_data()
    assert len(learn.recorder.losses) == 8
    assert learn.recorder.losses[0] == pytest.approx(F.cross_entropy(make_model()(x[:16]), y[:16]).item(), rel=1e-6)


def test_accumulation_with_clipping_clips_the_accumulated_gradient():
    learn = fit(2, [GradientAccumulation(4), GradientClip(max_norm=0.3)])
    ref_model, _, ref_norms, _ = reference(2, n_acc=4, max_norm=0.3)
    assert_same_weights(learn.model, ref_model)
    assert logged(learn, "grad_norm") == pytest.approx(ref_norms, rel=1e-5)  # one norm per step, not per batch
    big = fit(2, [GradientClip(max_norm=0.3)], bs=64)
    assert_same_weights(learn.model, big.model)


def test_accumulation_with_float16_matches_gradscaler_loop():
    mp = MixedPrecision(init_scale=2.0**10)
    learn = fit(2, [GradientAccumulation(4), mp, InjectInf(6)])
    ref_model, ref_opt, _, ref_scales = reference(2, n_acc=4, fp16=True, inf_at=6)
    assert_same_weights(learn.model, ref_model)
    assert logged(learn, "loss_scale") == ref_scales  # every micro-batch logs the scale
    assert mp.overflows == 1 and len(learn.opt.norms) == len(ref_opt.norms) == 3  # 4 windows, one skipped
    big = fit(2, [MixedPrecision(init_scale=2.0**10)], bs=64)  # no overflow here: all 4 steps taken
    small = fit(2, [GradientAccumulation(4), MixedPrecision(init_scale=2.0**10)])
    assert_same_weights(small.model, big.model, atol=1e-3)  # float16 rounds partial and whole sums differently


def test_accumulation_drops_an_unfinished_window_of_an_unsized_loader():
    x, y = make_data(80)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 80, 16)]
    unsized = (lambda: (b for b in batches))
    loader = type("Unsized", (), {"__iter__": lambda self: unsized()})()
    learn = Learner(make_model(), (loader, None), F.cross_entropy, opt_func=NormProbeSGD, lr=LR,
                    cbs=[GradientAccumulation(4)], progress=False)
    with pytest.warns(UserWarning, match="dropped"):
        learn.fit(1)
    assert len(learn.opt.norms) == 1
    assert all(p.grad is None or not p.grad.any() for p in learn.model.parameters())


@pytest.mark.parametrize("n_steps", [0, -2, 1.5, True, "4"])
def test_accumulation_rejects_bad_n_steps(n_steps):
    with pytest.raises(ValueError, match="n_steps"):
        GradientAccumulation(n_steps)
