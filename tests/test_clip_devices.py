"""GradientClip with gradients in several groups of device and dtype, against torch's own clip_grad_norm_.

This machine may have only a CPU: the numbers are checked on CPU with float32 and float64 gradients (two groups),
with torch's `get_total_norm` and with our fallback for torch < 2.6; the per-device path is checked by where the
coefficient goes (a 'meta' device needs no memory); a real second device is used when CUDA is there.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import GradientClip
from looplab.callbacks.clip import group_by_device, scale_, total_norm


class TwoDevices(nn.Module):
    """A model split over two devices (and two dtypes, so even one device gives two foreach groups)."""

    def __init__(self, first="cpu", second="cpu"):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = first, second
        self.a = nn.Linear(6, 16).to(first)
        self.b = nn.Linear(16, 3).to(second, torch.float64)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.first))).to(self.second, torch.float64)).float().cpu()


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def reference(model_factory, max_norm, norm_type, n_steps=4):
    """The textbook loop with torch.nn.utils.clip_grad_norm_ (foreach=None: torch decides)."""
    model = model_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = data()
    norms = []
    for i in range(n_steps):
        F.cross_entropy(model(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type).item())
        opt.step()
        opt.zero_grad()
    return model, norms


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 6, generator=g) * 4, torch.randint(0, 3, (64,), generator=g)


def ours(model_factory, max_norm, norm_type):
    x, y = data()
    dls = DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=16, shuffle=False)
    learn = Learner(model_factory(), dls, F.cross_entropy, opt_func=torch.optim.SGD, lr=0.3,
                    cbs=[GradientClip(max_norm, norm_type)], progress=False)
    learn.fit(1)
    return learn.model, [v for _, v in learn.recorder.series("grad_norm")]


def assert_same(model_a, model_b):
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("fallback", [False, True])
def test_clipping_two_dtype_groups_is_clip_grad_norm_(norm_type, fallback, monkeypatch):
    if fallback:
        monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # torch < 2.6
    model, norms = ours(TwoDevices, 0.1, norm_type)
    ref_model, ref_norms = reference(TwoDevices, 0.1, norm_type)
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    assert min(ref_norms) > 0.1  # every step clipped
    assert_same(model, ref_model)


def test_total_norm_fallback_equals_get_total_norm(monkeypatch):
    torch.manual_seed(3)
    grads = [torch.randn(5, 4), torch.randn(7, dtype=torch.float64), torch.randn(3)]
    for norm_type in (2.0, 1.0, 3.0, math.inf):
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        want = torch.nn.utils.clip_grad_norm_(params, 1e9, norm_type)
        with monkeypatch.context() as m:
            m.delattr(torch.nn.utils, "get_total_norm", raising=False)
            got = total_norm(grads, norm_type)
        assert got.device == grads[0].device
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=0)


def test_group_by_device_keeps_first_seen_order():
    a, b, c = torch.zeros(2), torch.zeros(3, device="meta"), torch.zeros(4, dtype=torch.float64)
    d, e = torch.zeros(5), torch.zeros(1, device="meta")
    groups = group_by_device([a, b, c, d, e])
    assert list(groups) == [(a.device, torch.float32), (b.device, torch.float32), (c.device, torch.float64)]
    assert [[t.shape[0] for t in g] for g in groups.values()] == [[2, 5], [3, 1], [4]]


def test_the_coefficient_goes_to_each_devices_gradients(monkeypatch):
    """A coefficient on the first device must be moved: a tensor on one accelerator cannot scale another's."""
    calls = []
    real = torch._foreach_mul_

    def recording(tensors, scalar):
        calls.append(({t.device.type for t in tensors}, scalar.device.type))
        return real(tensors, scalar)

    monkeypatch.setattr(torch, "_foreach_mul_", recording)
    cpu_grads = [torch.full((3,), 2.0), torch.full((2,), 4.0)]
    meta_grads = [torch.zeros(4, device="meta")]
    scale_(group_by_device(cpu_grads + meta_grads), torch.tensor(0.5))
    assert calls == [({"cpu"}, "cpu"), ({"meta"}, "meta")]
    assert torch.equal(cpu_grads[0], torch.full((3,), 1.0)) and torch.equal(cpu_grads[1], torch.full((2,), 2.0))


class GradsAt(Callback):
    """Copies of the gradients in before_step at its order; at step `poison_at` it first makes one infinite."""

    def __init__(self, order, poison_at=None):
        self.order, self.poison_at, self.grads = order, poison_at, []

    def before_step(self):
        if self.learn.train_iter == self.poison_at:
            next(self.learn.model.parameters()).grad[0, 0] = math.inf
        self.grads.append([p.grad.clone() for p in self.learn.model.parameters()])


def test_non_finite_norms_leave_every_group_untouched():
    x, y = data()
    dls = DataLoaders.from_tensors(x[:32], y[:32], valid=(x[:16], y[:16]), bs=16, shuffle=False)
    before, after = GradsAt(15, poison_at=1), GradsAt(25)  # GradientClip is 20
    learn = Learner(TwoDevices(), dls, F.cross_entropy, opt_func=torch.optim.SGD, lr=0.3,
                    cbs=[GradientClip(0.1), before, after], progress=False)
    learn.fit(1)
    norms = [v for _, v in learn.recorder.series("grad_norm")]
    assert math.isfinite(norms[0]) and norms[1] == math.inf
    assert any(not torch.equal(a, b) for a, b in zip(before.grads[0], after.grads[0]))  # step 0 was clipped
    assert all(torch.equal(a, b) for a, b in zip(before.grads[1], after.grads[1]))  # step 1: both groups as they were


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_split_between_cpu_and_cuda_clips_like_clip_grad_norm_():
    def split():
        return TwoDevices("cpu", "cuda")

    for norm_type in (2.0, math.inf):
        model, norms = ours(split, 0.5, norm_type)
        ref_model, ref_norms = reference(split, 0.5, norm_type)
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        assert_same(model, ref_model)
