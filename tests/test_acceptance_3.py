"""Acceptance tests for issue 3 (schedules, optimizers, LR finder), written from the issue's contract only.

References: the issue's formulas re-implemented here, torch's own lr schedulers, hand-written recurrences.
"""
import math
import random
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.schedules import (combine_scheds, scale_for_batch, sched_const, sched_cos, sched_exp, sched_lin,
                               sched_poly)

torch.set_num_threads(1)


def cos_ref(start, end, pos):  # the formula
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def make_dls(n=80, bs=16, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=bs, seed=seed, shuffle=shuffle)


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))


def probe(base):
    """An optimizer subclass that records its param groups' hyper-parameters at every step."""
    class Probe(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen = []

        def step(self, closure=None):
            self.seen.append([{k: v for k, v in g.items() if k != "params"} for g in self.param_groups])
            return super().step(closure)
    return Probe


# ---- imports ---------------------------------------------------------------------------------------------------
def test_public_names():
    from looplab.lr_finder import LRFindResult, minimum, slide, steep, valley  # noqa: F401
    from looplab.optim import Lion  # noqa: F401
    from looplab import ParamScheduler  # noqa: F401
    from looplab.callbacks.schedule import ParamScheduler as P2  # noqa: F401
    import looplab.schedules as s
    for name in ["sched_lin", "sched_cos", "sched_exp", "sched_poly", "sched_const", "combine_scheds",
                 "scale_for_batch"]:
        assert callable(getattr(s, name))
    for fn in (minimum, steep, valley, slide):
        assert fn.__doc__ and len(fn.__doc__) > 40  # each rule documented


# ---- pure schedules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_sched_formulas(pos):
    assert sched_lin(2.0, 10.0, pos) == pytest.approx(2.0 + 8.0 * pos, abs=1e-12)
    assert sched_cos(2.0, 10.0, pos) == pytest.approx(cos_ref(2.0, 10.0, pos), abs=1e-12)
    assert sched_cos(1e-3, 1e-7, pos) == pytest.approx(cos_ref(1e-3, 1e-7, pos), abs=1e-15)
    assert sched_exp(1e-4, 1e-1, pos) == pytest.approx(1e-4 * 1000 ** pos, rel=1e-12)
    assert sched_const(3.0, 7.0, pos) == 3.0


def test_sched_cos_endpoints_and_shape():
    assert sched_cos(1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert sched_cos(1.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert sched_cos(1.0, 0.0, 0.5) == pytest.approx(0.5)
    # torch's CosineAnnealingLR closed form: eta_min + (base - eta_min) * (1 + cos(pi t / T)) / 2
    for t in range(11):
        assert sched_cos(0.3, 0.01, t / 10) == pytest.approx(0.01 + 0.29 * (1 + math.cos(math.pi * t / 10)) / 2)


def test_sched_poly():
    for p in (0.5, 1.0, 2.0, 3.0):
        assert sched_poly(5.0, 1.0, 0.0, p) == pytest.approx(5.0)
        assert sched_poly(5.0, 1.0, 1.0, p) == pytest.approx(1.0)
    for pos in (0.1, 0.4, 0.8):
        assert sched_poly(5.0, 1.0, pos, 1.0) == pytest.approx(sched_lin(5.0, 1.0, pos))
        # polynomial decay of the large-batch papers (seed 003): lr0 * (1 - t/T) ** p, to 0
        assert sched_poly(0.4, 0.0, pos, 2.0) == pytest.approx(0.4 * (1 - pos) ** 2)
    # matches torch's PolynomialLR (decays to 0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sch = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=2.0)
    for t in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(sched_poly(0.4, 0.0, t / 10, 2.0), rel=1e-9)
        opt.step()
        sch.step()


def test_combine_scheds_boundaries():
    f = combine_scheds([0.3, 0.7], [partial(sched_lin, 0.0, 1.0), partial(sched_lin, 5.0, 6.0)])
    assert f(0.0) == pytest.approx(0.0)
    assert f(0.15) == pytest.approx(0.5)
    assert f(0.3) == pytest.approx(5.0)  # at the boundary the later one applies
    assert f(0.3 - 1e-6) == pytest.approx(1.0, abs=1e-4)
    assert f(0.65) == pytest.approx(5.5)
    assert f(1.0) == pytest.approx(6.0)
    g = combine_scheds([0.25, 0.25, 0.5], [lambda p: 1.0, lambda p: 2.0 + p, lambda p: 10.0 * p])
    assert [g(x) for x in (0.0, 0.24, 0.25, 0.375, 0.5, 0.75, 1.0)] == pytest.approx([1, 1, 2, 2.5, 0, 5, 10])
    # boundaries reached as i / N (floating point) also switch to the later schedule
    N = 30
    h = combine_scheds([0.1, 0.9], [lambda p: 0.0, lambda p: 1.0])
    assert [h(i / N) for i in range(N)] == [0.0] * 3 + [1.0] * 27


def test_combine_scheds_bad_pcts():
    with pytest.raises(ValueError):
        combine_scheds([0.5, 0.6], [sched_const, sched_const])


def test_cyclic_triangular_against_torch_cycliclr():
    from looplab.schedules import cyclic_triangular
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sch = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=5, mode="triangular",
                                            cycle_momentum=False)
    for it in range(32):
        assert cyclic_triangular(0.01, 0.1, it, 5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sch.step()


def test_sgdr_against_torch_warm_restarts():
    from looplab.schedules import sched_sgdr
    # 3 cycles of 4, 8, 16 steps (cycle_mult=2) = 28 steps
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=0.01)
    for i in range(28):
        assert sched_sgdr(0.5, 0.01, i / 28, 3, 2) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sch.step()


def test_scale_for_batch():
    assert scale_for_batch(0.1, 5, 256, 1024, rule="linear") == pytest.approx((0.4, 5))
    assert scale_for_batch(0.1, 5, 256, 1024, rule="sqrt") == pytest.approx((0.2, 20))
    assert scale_for_batch(0.1, 5, 256, 1024) == pytest.approx((0.2, 20))  # default sqrt (LEGW)
    assert scale_for_batch(0.1, 2, 100, 50, "sqrt") == pytest.approx((0.1 * math.sqrt(0.5), 1.0))
    assert scale_for_batch(lr=0.1, warmup=1.0, base_bs=32, bs=32, rule="linear") == pytest.approx((0.1, 1.0))
    with pytest.raises(ValueError):
        scale_for_batch(0.1, 5, 256, 1024, rule="cubic")


# ---- ParamScheduler -----------------------------------------------------------------------------------------
def test_param_scheduler_position_i_over_n_and_logs():
    from looplab import ParamScheduler
    Probe = probe(torch.optim.SGD)
    dls = make_dls()  # 64 train samples, bs 16 -> 4 batches
    learn = Learner(make_model(), dls, nn.CrossEntropyLoss(), opt_func=partial(Probe, momentum=0.9), lr=0.1,
                    progress=False)
    f_lr, f_mom, f_wd = (lambda p: 0.1 * (1 - p)), (lambda p: 0.8 + 0.1 * p), (lambda p: 1e-3 * p)
    learn.fit(3, cbs=[ParamScheduler({"lr": f_lr, "mom": f_mom, "wd": f_wd})])
    N = 12
    assert len(learn.opt.seen) == N
    for i, groups in enumerate(learn.opt.seen):
        assert groups[0]["lr"] == pytest.approx(f_lr(i / N), abs=1e-12)
        assert groups[0]["momentum"] == pytest.approx(f_mom(i / N), abs=1e-12)
        assert groups[0]["weight_decay"] == pytest.approx(f_wd(i / N), abs=1e-15)
    rec = learn.recorder
    assert rec.lrs == pytest.approx([f_lr(i / N) for i in range(N)])
    assert [v for _, v in rec.series("mom")] == pytest.approx([f_mom(i / N) for i in range(N)])
    assert [i for i, _ in rec.series("mom")] == list(range(N))
    assert [v for _, v in rec.series("wd")] == pytest.approx([f_wd(i / N) for i in range(N)])


@pytest.mark.parametrize("opt_name", ["Adam", "AdamW", "RMSprop", "SGD", "Lion"])
def test_param_scheduler_mom_maps_per_optimizer(opt_name):
    from looplab import ParamScheduler
    from looplab.optim import Lion
    base = Lion if opt_name == "Lion" else getattr(torch.optim, opt_name)
    Probe = probe(base)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, lr=1e-3, progress=False)
    learn.fit(1, cbs=[ParamScheduler({"mom": lambda p: 0.5 + 0.25 * p})])
    for i, groups in enumerate(learn.opt.seen):
        g = groups[0]
        value = g["betas"][0] if "betas" in g else g["momentum"]
        assert value == pytest.approx(0.5 + 0.25 * i / 4)
        if "betas" in g:
            assert g["betas"][1] == learn.opt.defaults["betas"][1]


def test_param_scheduler_keeps_per_group_ratios():
    from looplab import ParamScheduler
    Probe = probe(torch.optim.SGD)
    model = make_model()
    learn = Learner(model, make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, lr=slice(1e-4, 1e-2),
                    splitter=lambda m: [m[0].parameters(), m[3].parameters()], progress=False)
    learn.fit(2, cbs=[ParamScheduler({"lr": lambda p: 0.05 * (1 - p) + 1e-3})])
    for i, groups in enumerate(learn.opt.seen):
        top = 0.05 * (1 - i / 8) + 1e-3
        assert groups[1]["lr"] == pytest.approx(top)
        assert groups[0]["lr"] == pytest.approx(top / 100)


# ---- fit_one_cycle ------------------------------------------------------------------------------------------
def one_cycle_ref(i, N, lr_max, pct=0.25, div=25.0, div_final=1e5, moms=(0.95, 0.85, 0.95)):
    pos = i / N
    if pos < pct:
        p = pos / pct
        return cos_ref(lr_max / div, lr_max, p), cos_ref(moms[0], moms[1], p)
    p = (pos - pct) / (1 - pct)
    return cos_ref(lr_max, lr_max / div_final, p), cos_ref(moms[1], moms[2], p)


@pytest.mark.parametrize("opt", ["SGD", "AdamW"])
def test_fit_one_cycle_formulas(opt):
    base = getattr(torch.optim, opt)
    Probe = probe(base)
    opt_func = partial(Probe, momentum=0.9) if opt == "SGD" else Probe
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=opt_func, lr=1e-3, progress=False)
    learn.fit_one_cycle(5, 0.02)  # lr_max positional; 20 steps
    N = 20
    assert len(learn.opt.seen) == N
    for i, groups in enumerate(learn.opt.seen):
        lr, mom = one_cycle_ref(i, N, 0.02)
        g = groups[0]
        assert abs(g["lr"] - lr) < 1e-9
        assert abs((g["betas"][0] if opt == "AdamW" else g["momentum"]) - mom) < 1e-9


def test_fit_one_cycle_defaults_to_learner_lr_and_keyword_args():
    Probe = probe(torch.optim.AdamW)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, lr=3e-3, progress=False)
    learn.fit_one_cycle(2)
    for i, groups in enumerate(learn.opt.seen):
        assert abs(groups[0]["lr"] - one_cycle_ref(i, 8, 3e-3)[0]) < 1e-9
    learn.opt.seen.clear()
    learn.fit_one_cycle(n_epochs=3, lr_max=0.01, pct_start=0.5, div=10.0, div_final=100.0, moms=(0.9, 0.8, 0.7))
    for i, groups in enumerate(learn.opt.seen):
        lr, mom = one_cycle_ref(i, 12, 0.01, 0.5, 10.0, 100.0, (0.9, 0.8, 0.7))
        assert abs(groups[0]["lr"] - lr) < 1e-9 and abs(groups[0]["betas"][0] - mom) < 1e-9
    # the ParamScheduler of a fit_one_cycle is removed afterwards: a plain fit uses the learner's lr
    learn.opt.seen.clear()
    learn.fit(1)
    assert all(g[0]["lr"] == 3e-3 for g in learn.opt.seen)


def test_fit_one_cycle_with_cbs_and_slice():
    Probe = probe(torch.optim.SGD)
    seen = []

    class C(Callback):
        def after_fit(self):
            seen.append(True)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=partial(Probe, momentum=0.9),
                    splitter=lambda m: [list(m[0].parameters()), list(m[3].parameters())], progress=False)
    learn.fit_one_cycle(2, lr_max=slice(1e-4, 1e-2), cbs=[C()])
    assert seen == [True]
    for i, groups in enumerate(learn.opt.seen):
        lr, _ = one_cycle_ref(i, 8, 1e-2)
        assert abs(groups[1]["lr"] - lr) < 1e-9
        assert groups[0]["lr"] == pytest.approx(lr / 100, rel=1e-9)


def test_fit_one_cycle_matches_torch_onecycle_shape():
    # torch's OneCycleLR ends at initial_lr / final_div_factor, with initial_lr = max_lr / div_factor
    Probe = probe(torch.optim.SGD)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=partial(Probe, momentum=0.9),
                    progress=False)
    learn.fit_one_cycle(4, 0.1)
    lrs = [g[0]["lr"] for g in learn.opt.seen]
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1)
    assert lrs.index(max(lrs)) == 4  # pct_start 0.25 of 16 steps
    assert lrs[-1] < 0.1 / 25


# ---- fit_warmup_cos / fit_flat_cos / fit_sgdr -----------------------------------------------------------------
def torch_warmup_cos_lrs(lr, n_steps, n_warmup, start_factor):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sch = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=n_warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps - n_warmup, eta_min=0.0)],
        milestones=[n_warmup])
    out = []
    for _ in range(n_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


@pytest.mark.parametrize("warmup_kw", [{"warmup": 0.2}, {"warmup_epochs": 1}, {"warmup": 1}])
def test_fit_warmup_cos_against_torch(warmup_kw):
    Probe = probe(torch.optim.SGD)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, progress=False)
    learn.fit_warmup_cos(5, 0.05, div=100.0, **warmup_kw)  # 20 steps, warmup 4 steps (0.2 or 1 epoch of 4)
    ours = [g[0]["lr"] for g in learn.opt.seen]
    ref = torch_warmup_cos_lrs(0.05, 20, 4, 1 / 100)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_fit_warmup_cos_no_warmup_is_torch_cosine():
    Probe = probe(torch.optim.SGD)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, progress=False)
    learn.fit_warmup_cos(3, lr=0.05, warmup=0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    for groups in learn.opt.seen:
        assert groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sch.step()


def test_fit_flat_cos():
    Probe = probe(torch.optim.SGD)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, progress=False)
    learn.fit_flat_cos(4, 0.05)  # 16 steps, flat for 75% = 12 steps
    lrs = [g[0]["lr"] for g in learn.opt.seen]
    assert lrs[:12] == [0.05] * 12
    for i in range(12, 16):
        assert lrs[i] == pytest.approx(cos_ref(0.05, 0.05 / 1e5, (i - 12) / 4), rel=1e-9)


def test_fit_sgdr_against_torch_warm_restarts():
    Probe = probe(torch.optim.SGD)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, progress=False)
    learn.fit_sgdr(3, 1, 0.05)  # cycles of 1, 2, 4 epochs = 7 epochs of 4 steps
    assert len(learn.opt.seen) == 28
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2)
    for groups in learn.opt.seen:
        assert groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sch.step()
    assert len(learn.recorder.history) == 7


# ---- optimizers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_func", [torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adam, torch.optim.AdamW])
def test_torch_optimizers_unchanged(opt_func):
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=opt_func, lr=1e-2, progress=False)
    assert type(learn.opt) is opt_func
    learn.fit(1)
    assert len(learn.recorder.losses) == 4


def lion_ref(theta, m, g, lr, b1, b2, wd):
    c = b1 * m + (1 - b1) * g
    theta = theta * (1 - lr * wd) - lr * torch.sign(c)
    m = b2 * m + (1 - b2) * g
    return theta, m


def test_lion_recurrence_with_weight_decay_and_groups():
    from looplab.optim import Lion
    torch.manual_seed(0)
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
    opt = Lion([{"params": [pa]}, {"params": [pb], "lr": 0.05, "weight_decay": 0.0, "betas": (0.5, 0.9)}],
               lr=0.01, betas=(0.9, 0.99), weight_decay=0.3)
    ma, mb = torch.zeros_like(a), torch.zeros_like(b)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        ga, gb = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
        pa.grad, pb.grad = ga.clone(), gb.clone()
        opt.step()
        a, ma = lion_ref(a, ma, ga, 0.01, 0.9, 0.99, 0.3)
        b, mb = lion_ref(b, mb, gb, 0.05, 0.5, 0.9, 0.0)
        assert torch.allclose(pa.detach(), a, rtol=0, atol=1e-14)
        assert torch.allclose(pb.detach(), b, rtol=0, atol=1e-14)


def test_lion_defaults_and_state_dict():
    from looplab.optim import Lion
    p = torch.zeros(3, requires_grad=True)
    opt = Lion([p])
    assert opt.defaults["lr"] == 1e-4 and tuple(opt.defaults["betas"]) == (0.9, 0.99)
    assert opt.defaults["weight_decay"] == 0.0
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    opt = Lion([w], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        w.grad = torch.randn(4)
        opt.step()
    sd = opt.state_dict()
    w2 = w.detach().clone().requires_grad_()
    opt2 = Lion([w2], lr=0.1, weight_decay=0.1)
    opt2.load_state_dict(sd)
    torch.save(sd, "/dev/null")
    for _ in range(3):
        gr = torch.randn(4)
        w.grad, w2.grad = gr.clone(), gr.clone()
        opt.step()
        opt2.step()
    assert torch.equal(w, w2)


def test_lion_as_opt_func_trains():
    from looplab.optim import Lion
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Lion, lr=1e-3, progress=False)
    learn.fit_one_cycle(2)
    assert isinstance(learn.opt, Lion) and len(learn.recorder.losses) == 8


# ---- splitter, slice lrs, freezing ----------------------------------------------------------------------------
def three_groups(m):
    return [list(m[0].parameters()), [m[3].weight], [m[3].bias]]


def test_splitter_and_slice_spread_geometrically():
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), lr=slice(1e-5, 1e-1), splitter=three_groups,
                    progress=False)
    assert len(learn.opt.param_groups) == 3
    assert [g["lr"] for g in learn.opt.param_groups] == pytest.approx([1e-5, 1e-3, 1e-1])
    Probe = probe(torch.optim.SGD)
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=Probe, splitter=three_groups,
                    progress=False)
    learn.fit(1, lr=slice(1e-4, 1e-2))
    assert [g["lr"] for g in learn.opt.seen[0]] == pytest.approx([1e-4, 1e-3, 1e-2])


def test_freeze_to_and_unfreeze():
    learn = Learner(make_model(), make_dls(), nn.CrossEntropyLoss(), opt_func=torch.optim.AdamW, lr=1e-2,
                    splitter=three_groups, progress=False)
    snap = lambda: [p.detach().clone() for p in learn.model.parameters()]
    learn.freeze_to(2)  # only the last group (m[3].bias) trains
    w0 = snap()
    learn.fit(1)
    w1 = snap()
    changed = [not torch.equal(a, b) for a, b in zip(w0, w1)]
    assert changed == [False, False, False, True]
    learn.freeze_to(1)
    learn.fit(1)
    w2 = snap()
    assert [not torch.equal(a, b) for a, b in zip(w1, w2)] == [False, False, True, True]
    learn.unfreeze()
    learn.fit(1)
    w3 = snap()
    assert all(not torch.equal(a, b) for a, b in zip(w2, w3))


# ---- LR finder ----------------------------------------------------------------------------------------------
def lr_learner(dropout=0.2, shuffle=True, opt_func=None, **kw):
    opt_func = opt_func or partial(torch.optim.SGD, momentum=0.9)
    return Learner(make_model(0, dropout), make_dls(shuffle=shuffle), nn.CrossEntropyLoss(), opt_func=opt_func,
                   lr=1e-2, progress=False, **kw)


def test_lr_find_geometric_lrs_and_attributes():
    from looplab.lr_finder import LRFindResult
    Probe = probe(torch.optim.SGD)
    learn = lr_learner(opt_func=Probe)
    res = learn.lr_find(start_lr=1e-5, end_lr=1e-1, num_it=20, stop_div=False)
    assert isinstance(res, LRFindResult)
    assert len(res.lrs) == len(res.losses) == len(res.raw_losses) == 20
    for i, lr in enumerate(res.lrs):
        assert lr == pytest.approx(1e-5 * (1e-1 / 1e-5) ** (i / 20), rel=1e-12)
    stepped = [g[0]["lr"] for g in learn.opt.seen]
    assert stepped == pytest.approx(res.lrs, rel=1e-12)  # the lr actually in force at each step
    assert set(res.suggestions) == {"valley", "steep", "minimum", "slide"}
    for v in res.suggestions.values():
        assert 1e-5 / 10 <= v <= 1e-1 and math.isfinite(v)
    # smoothed losses are smoother than the raw ones and start at the first raw loss
    assert res.losses[0] == pytest.approx(res.raw_losses[0], rel=1e-6)
    fig = res.plot()
    from matplotlib.figure import Figure
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = " ".join(t.get_text() for t in ax.get_legend().get_texts()) if ax.get_legend() else ""
    assert all(name in labels for name in ("valley", "steep", "minimum", "slide"))


def test_lr_find_defaults_and_positional():
    learn = lr_learner()
    res = learn.lr_find()  # start 1e-7, end 10, num_it 100, stop_div True
    assert res.lrs[0] == pytest.approx(1e-7)
    assert len(res.lrs) <= 100
    for i, lr in enumerate(res.lrs):
        assert lr == pytest.approx(1e-7 * (1e8) ** (i / 100), rel=1e-12)
    res2 = learn.lr_find(1e-6, 1.0, 10)
    assert len(res2.lrs) <= 10 and res2.lrs[0] == pytest.approx(1e-6)


def divergent_learner(**kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g) * 10
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1
    dls = DataLoaders.from_tensors(x, y.unsqueeze(1), valid_pct=0.25, bs=8)
    torch.manual_seed(0)
    return Learner(nn.Linear(4, 1), dls, nn.MSELoss(), opt_func=torch.optim.SGD, lr=1e-3, progress=False, **kw)


def test_lr_find_stops_on_divergence():
    learn = divergent_learner()
    res = learn.lr_find(start_lr=1e-5, end_lr=10, num_it=100)
    n = len(res.losses)
    assert n < 100
    last = res.losses[-1]
    assert (not math.isfinite(last)) or last > 4 * min(res.losses[:-1])
    for k in range(1, n - 1):  # it did not stop before it had to
        assert math.isfinite(res.losses[k]) and res.losses[k] <= 4 * min(res.losses[:k + 1])
    res2 = divergent_learner().lr_find(start_lr=1e-5, end_lr=10, num_it=100, stop_div=False)
    assert len(res2.losses) == 100


def rng_snapshot():
    return (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())


def rng_equal(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_lr_find_leaves_everything_as_before():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    learn = lr_learner(dropout=0.3)
    learn.fit(1)  # optimizer state, recorder, loader position all non-trivial
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_sd = learn.opt.state_dict()
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt_sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_sd["param_groups"]]
    rec = learn.recorder
    losses, lrs, history = list(rec.losses), list(rec.lrs), [dict(h) for h in rec.history]
    cbs = list(learn.cbs)
    rng = rng_snapshot()
    training = learn.model.training
    learn.lr_find(num_it=30)
    assert rng_equal(rng, rng_snapshot())
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, weights[k])
    sd = learn.opt.state_dict()
    for k, v in sd["state"].items():
        for kk, vv in v.items():
            assert torch.equal(vv, opt_state[k][kk])
    assert [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]] == groups
    assert learn.recorder.losses == losses and learn.recorder.lrs == lrs and learn.recorder.history == history
    assert learn.cbs == cbs
    assert learn.model.training == training


def test_lr_find_does_not_change_later_training():
    def run(with_find):
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)
        learn = lr_learner(dropout=0.3)
        learn.fit(1)
        if with_find:
            learn.lr_find(num_it=25)
        # the next epoch's batch order, and dropout masks, must be what they would have been
        learn.fit(2)
        return [p.detach().clone() for p in learn.model.parameters()], learn.recorder.losses, torch.rand(3)
    a, b = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(a[0], b[0]))
    assert a[1] == b[1]
    assert torch.equal(a[2], b[2])


def test_lr_find_keeps_loader_position():
    learn = lr_learner()
    ref = make_dls()
    for _ in ref.train:  # advance the reference one epoch, as the learner's fit will
        pass
    learn.fit(1)
    learn.lr_find(num_it=12)
    got = [yb for _, yb in learn.dls.train]
    exp = [yb for _, yb in ref.train]
    assert all(torch.equal(a, b) for a, b in zip(got, exp))


# ---- suggestion rules on known curves --------------------------------------------------------------------------
LRS = np.geomspace(1e-6, 1.0, 61)  # 10 points per decade


def test_minimum_rule():
    from looplab.lr_finder import minimum
    losses = (np.log10(LRS) + 2) ** 2 + 1  # lowest at lr = 1e-2
    assert minimum(LRS, losses) == pytest.approx(1e-3, rel=1e-9)
    assert minimum(list(LRS), list(losses)) == pytest.approx(1e-3, rel=1e-9)


def test_steep_rule():
    from looplab.lr_finder import steep
    losses = 2 - np.tanh(3 * (np.log10(LRS) + 3))  # falls fastest at lr = 1e-3
    s = steep(LRS, losses)
    assert 10 ** -3.1 <= s <= 10 ** -2.9
    # a single cliff between two points: the steepest segment is there
    cliff = np.where(np.arange(61) < 30, 3.0, 1.0) - 0.001 * np.arange(61)
    assert steep(LRS, cliff) == pytest.approx(LRS[29], rel=0.3)


def test_valley_rule():
    from looplab.lr_finder import valley
    # noisy-flat start, long descent from index 20 to 45, then rising
    rng = np.random.default_rng(0)
    losses = np.concatenate([2.5 + 0.01 * rng.standard_normal(20), np.linspace(2.5, 0.5, 26)[1:],
                             np.linspace(0.5, 5, 17)[1:]])
    assert len(losses) == 61
    v = valley(LRS, losses)
    assert LRS[19] <= v <= LRS[45]


def test_slide_rule():
    from looplab.lr_finder import slide
    losses = 2 - np.tanh(3 * (np.log10(LRS) + 3)) + np.where(LRS > 1e-1, 50 * (LRS - 1e-1), 0.0)
    s = slide(LRS, losses)
    assert LRS[0] <= s <= LRS[-1] and math.isfinite(s)


def test_suggestion_rules_ignore_the_divergent_tail():
    from looplab.lr_finder import minimum, steep, valley, slide
    losses = list((np.log10(LRS) + 2) ** 2 + 1)
    losses[-3:] = [float("nan"), float("inf"), float("nan")]
    for rule in (minimum, steep, valley, slide):
        v = rule(LRS, losses)
        assert math.isfinite(v) and v > 0
    assert minimum(LRS, losses) == pytest.approx(1e-3, rel=1e-9)


def test_lr_find_with_plain_torch_dataloader_shuffling_from_the_global_rng():
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)

    def run(with_find):
        torch.manual_seed(3)
        data = (DataLoader(TensorDataset(x[:40], y[:40]), batch_size=8, shuffle=True),
                DataLoader(TensorDataset(x[40:], y[40:]), batch_size=8))
        learn = Learner(make_model(0, 0.2), data, nn.CrossEntropyLoss(), lr=1e-2, progress=False)
        if with_find:
            learn.lr_find(num_it=15)
        learn.fit(2)
        return [p.detach().clone() for p in learn.model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(run(False), run(True)))
