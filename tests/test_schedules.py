"""Schedules: the pure functions against torch's schedulers and the papers' formulas; ParamScheduler and the fit_*
policies, probed at every optimizer step."""
import math
from functools import partial

import pytest
import torch
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks.schedule import ParamScheduler, fit_one_cycle
from looplab.schedules import (combine_scheds, cyclic_triangular, scale_for_batch, sched_const, sched_cos,
                               sched_exp, sched_lin, sched_poly, sched_sgdr)

N_SAMPLES, BS = 64, 8  # 8 training batches per epoch


# ---- helpers ------------------------------------------------------------------------------------------------------
def _probe(base):
    """An optimizer class that records, at every step(), each group's lr and momentum (or betas) in force."""
    class Probe(base):
        def step(self, closure=None):
            self.seen.append([{k: g[k] for k in ("lr", "momentum", "betas", "weight_decay") if k in g}
                              for g in self.param_groups])
            return super().step(closure)
    Probe.seen = None
    return Probe


def _learner(opt_cls=torch.optim.SGD, lr=1e-2, splitter=None, **opt_kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(N_SAMPLES, 4), torch.randn(N_SAMPLES, 1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    probe = _probe(opt_cls)

    def opt_func(params, lr):
        opt = probe(params, lr=lr, **opt_kwargs)
        opt.seen = []
        return opt

    dls = DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=BS)
    return Learner(model, dls, nn.functional.mse_loss, opt_func=opt_func, lr=lr, splitter=splitter, progress=False)


def _one_cycle_reference(i, n, lr_max, pct, div, div_final, moms):
    """The issue's formulas, written out: cosine up then down, position i / n."""
    def cos(a, b, p):
        return a + (1 + math.cos(math.pi * (1 - p))) * (b - a) / 2
    pos = i / n
    if pos < pct:
        return cos(lr_max / div, lr_max, pos / pct), cos(moms[0], moms[1], pos / pct)
    p = (pos - pct) / (1 - pct)
    return cos(lr_max, lr_max / div_final, p), cos(moms[1], moms[2], p)


# ---- pure functions -----------------------------------------------------------------------------------------------
def test_basic_schedules_match_their_formulas():
    for pos in (0.0, 0.1, 0.5, 0.77, 1.0):
        assert sched_lin(2.0, 4.0, pos) == pytest.approx(2.0 + 2.0 * pos, abs=1e-15)
        assert sched_cos(1.0, 0.0, pos) == pytest.approx((1 + math.cos(math.pi * pos)) / 2, abs=1e-15)
        assert sched_exp(1e-4, 1e-2, pos) == pytest.approx(1e-4 * 100 ** pos, rel=1e-14)
        assert sched_const(3.0, 9.0, pos) == 3.0
    assert sched_cos(0.1, 0.3, 0.0) == pytest.approx(0.1) and sched_cos(0.1, 0.3, 1.0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="-1"):
        sched_exp(-1, 1.0, 0.5)


def test_sched_poly_is_torch_polynomial_lr():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    total, power = 10, 2.0
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=power)
    for t in range(total + 1):
        assert sched_poly(0.5, 0.0, t / total, power) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()
    assert sched_poly(1.0, 0.2, 0.5, 1.0) == pytest.approx(0.6)


def test_combine_scheds_chains_and_later_phase_wins_at_boundary():
    f = combine_scheds([0.25, 0.75], [partial(sched_lin, 0.0, 1.0), partial(sched_lin, 10.0, 20.0)])
    assert f(0.0) == 0.0
    assert f(0.125) == pytest.approx(0.5)
    assert f(0.25) == 10.0  # boundary: the later schedule, at its start
    assert f(1.0) == pytest.approx(20.0)
    thirds = combine_scheds([1 / 3, 1 / 3, 1 / 3], [partial(sched_const, k, k) for k in range(3)])
    assert [thirds(i / 9) for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 3/9 vs 1/3: rounding-safe
    with pytest.raises(ValueError, match="sum to 1"):
        combine_scheds([0.5, 0.6], [sched_lin, sched_lin])
    with pytest.raises(ValueError, match="-0.5"):
        combine_scheds([-0.5, 1.5], [sched_lin, sched_lin])
    with pytest.raises(ValueError, match="as many"):
        combine_scheds([1.0], [sched_lin, sched_lin])


def test_cyclic_triangular_is_torch_cyclic_lr():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    step_size = 4
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=step_size,
                                              mode="triangular", cycle_momentum=False)
    for it in range(30):
        assert cyclic_triangular(0.01, 0.1, it, step_size) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="0"):
        cyclic_triangular(0.01, 0.1, 3, 0)


def test_sgdr_is_torch_cosine_annealing_warm_restarts():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    t0, n_cycles = 5, 3  # cycles of 5, 10 and 20 steps
    total = t0 * (1 + 2 + 4)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=2, eta_min=0.001)
    for i in range(total):
        expected = opt.param_groups[0]["lr"]
        assert sched_sgdr(0.1, 0.001, i / total, n_cycles, cycle_mult=2) == pytest.approx(expected, rel=1e-9)
        opt.step()
        sched.step()


def test_scale_for_batch_follows_seed_003():
    # Seed 003: batch size × k -> linear scaling multiplies the lr by k; LEGW multiplies it by sqrt(k) and the
    # warmup length in epochs by k.
    lr, warmup, base_bs, bs = 0.1, 2.0, 256, 1024
    k = 4
    assert scale_for_batch(lr, warmup, base_bs, bs, rule="linear") == pytest.approx((lr * k, warmup))
    assert scale_for_batch(lr, warmup, base_bs, bs, rule="sqrt") == pytest.approx((lr * 2, warmup * 4))
    assert scale_for_batch(lr, warmup, base_bs, bs) == pytest.approx((0.2, 8.0))  # sqrt is the default
    assert scale_for_batch(0.4, 1.0, 1024, 256, rule="sqrt") == pytest.approx((0.2, 0.25))
    for bad in (dict(lr=-0.1), dict(bs=0), dict(base_bs=1.5), dict(warmup=-1.0), dict(rule="cubic")):
        args = dict(lr=0.1, warmup=1.0, base_bs=256, bs=512, **{}) | bad
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            scale_for_batch(**args)


# ---- fit_one_cycle, probed at every optimizer step ----------------------------------------------------------------
@pytest.mark.parametrize("opt_cls, kwargs", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {})])
def test_one_cycle_lr_and_momentum_at_every_step(opt_cls, kwargs):
    learn = _learner(opt_cls, lr=1e-2, **kwargs)
    n_epochs = 3
    learn.fit_one_cycle(n_epochs, lr_max=0.05, pct_start=0.3, div=20.0, div_final=1e4)
    seen = learn.opt.seen
    n = n_epochs * N_SAMPLES // BS
    assert len(seen) == n
    for i, (group,) in enumerate(seen):
        lr, mom = _one_cycle_reference(i, n, 0.05, 0.3, 20.0, 1e4, (0.95, 0.85, 0.95))
        assert abs(group["lr"] - lr) < 1e-9
        in_force = group["betas"][0] if "betas" in group else group["momentum"]
        assert abs(in_force - mom) < 1e-9
        if "betas" in group:
            assert isinstance(group["betas"], tuple) and group["betas"][1] == 0.999
    # what is logged is what was in force
    assert [v for _, v in learn.recorder.series("mom")] == [
        g[0]["betas"][0] if "betas" in g[0] else g[0]["momentum"] for g in seen]
    assert learn.recorder.lrs == [g[0]["lr"] for g in seen]


@pytest.mark.parametrize("opt_cls, kwargs", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {})])
def test_one_cycle_matches_torch_one_cycle_lr(opt_cls, kwargs):
    """torch's OneCycleLR reaches its final lr at step total_steps - 1 and ends phase 1 at pct_start*total - 1;
    ours is at position i/N. They coincide on our N steps for total_steps = N + 1 and pct_start = (pN + 1)/(N + 1);
    torch's min lr is initial_lr / final_div_factor, so final_div_factor = div_final / div."""
    learn = _learner(opt_cls, **kwargs)
    n_epochs, lr_max, pct, div, div_final = 2, 0.02, 0.25, 25.0, 1e5
    learn.fit_one_cycle(n_epochs, lr_max=lr_max, pct_start=pct, div=div, div_final=div_final)
    n = n_epochs * N_SAMPLES // BS
    param = nn.Parameter(torch.zeros(1))
    ref_opt = opt_cls([param], lr=lr_max, **kwargs)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=lr_max, total_steps=n + 1, pct_start=(pct * n + 1) / (n + 1),
                                              anneal_strategy="cos", div_factor=div, final_div_factor=div_final / div,
                                              three_phase=False, base_momentum=0.85, max_momentum=0.95)
    for (ours,) in learn.opt.seen:
        theirs = ref_opt.param_groups[0]
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-9, abs=1e-12)
        key = "betas" if "betas" in theirs else "momentum"
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9)
        ref_opt.step()
        ref.step()


def test_one_cycle_defaults_to_learner_lr_and_passes_fit_kwargs():
    learn = _learner(lr=0.03, momentum=0.9)
    calls = []
    real_fit = learn.fit

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_fit(*args, **{k: v for k, v in kwargs.items() if k != "marker"})
    learn.fit = spy  # a test spy on this instance only
    fit_one_cycle(learn, 1, marker="passed through")
    assert calls[0]["marker"] == "passed through"
    assert max(g[0]["lr"] for g in learn.opt.seen) == pytest.approx(0.03, rel=1e-3)


# ---- warmup + cosine, flat + cosine, SGDR ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["fraction", "epochs"])
def test_warmup_cos_matches_torch_linear_then_cosine(how):
    learn = _learner(momentum=0.9)
    n_epochs, lr, div, lr_min = 4, 0.05, 10.0, 1e-4
    n = n_epochs * N_SAMPLES // BS  # 32 steps
    warm = dict(warmup=0.25) if how == "fraction" else dict(warmup_epochs=1)  # both: 8 steps
    learn.fit_warmup_cos(n_epochs, lr=lr, div=div, lr_min=lr_min, **warm)
    param = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([param], lr=lr)
    n_warm = 8
    ref = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / div, end_factor=1.0, total_iters=n_warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=n - n_warm, eta_min=lr_min)], milestones=[n_warm])
    assert len(learn.opt.seen) == n
    for (ours,) in learn.opt.seen:
        assert ours["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9)
        ref_opt.step()
        ref.step()


def test_warmup_rule_is_explicit():
    learn = _learner()
    with pytest.raises(ValueError, match="warmup_epochs"):
        learn.fit_warmup_cos(2, warmup=2)  # warmup >= 1 counts epochs: it must end before the fit does
    with pytest.raises(ValueError, match="warmup_epochs"):
        learn.fit_warmup_cos(2, warmup_epochs=2)
    with pytest.raises(ValueError, match="warmup"):
        learn.fit_warmup_cos(2, warmup=-0.1)


def test_flat_cos_formula():
    learn = _learner(momentum=0.9)
    learn.fit_flat_cos(2, lr=0.04, pct_start=0.5, div_final=100.0)
    n = 16
    for i, (g,) in enumerate(learn.opt.seen):
        pos = i / n
        expected = 0.04 if pos < 0.5 else 0.0004 + (1 + math.cos(math.pi * (pos - 0.5) / 0.5)) / 2 * (0.04 - 0.0004)
        assert abs(g["lr"] - expected) < 1e-12


def test_fit_sgdr_matches_torch_warm_restarts():
    learn = _learner(momentum=0.9)
    learn.fit_sgdr(3, cycle_len=1, lr_max=0.05, cycle_mult=2, lr_min=1e-4)  # 1 + 2 + 4 epochs
    nb = N_SAMPLES // BS
    assert learn.n_epochs == 7 and len(learn.opt.seen) == 7 * nb
    param = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([param], lr=0.05)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=nb, T_mult=2, eta_min=1e-4)
    for (ours,) in learn.opt.seen:
        assert ours["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9)
        ref_opt.step()
        ref.step()


# ---- ParamScheduler ------------------------------------------------------------------------------------------------
def _two_groups(model):
    return [model[0].parameters(), model[2].parameters()]


def test_param_scheduler_keeps_discriminative_ratios_and_logs_wd():
    learn = _learner(torch.optim.AdamW, lr=slice(1e-4, 1e-2), splitter=_two_groups, weight_decay=0.1)
    wd = partial(sched_lin, 0.1, 0.0)
    learn.fit_one_cycle(2, cbs=[ParamScheduler({"wd": wd})])
    n = 16
    for i, (first, last) in enumerate(learn.opt.seen):
        assert first["lr"] / last["lr"] == pytest.approx(1e-2, rel=1e-12)  # slice(1e-4, 1e-2) over 2 groups
        assert first["betas"][0] == pytest.approx(last["betas"][0], rel=1e-15)
        assert last["weight_decay"] == pytest.approx(0.1 * (1 - i / n), abs=1e-15)
    lr_max_seen = max(last["lr"] for _, last in learn.opt.seen)
    assert lr_max_seen == pytest.approx(1e-2, rel=1e-2)  # the slice's top is the last group's lr_max
    assert [v for _, v in learn.recorder.series("wd")] == [last["weight_decay"] for _, last in learn.opt.seen]


def test_param_scheduler_position_comes_from_train_iter():
    """A fit that starts at epoch 2 (as a resumed one does) continues the schedule there."""
    class StartLater(Callback):
        def before_fit(self):
            self.learn.epoch, self.learn.train_iter = 2, 2 * (N_SAMPLES // BS)

    full = _learner(momentum=0.9)
    full.fit_one_cycle(4, lr_max=0.05)
    later = _learner(momentum=0.9)
    later.fit_one_cycle(4, lr_max=0.05, cbs=[StartLater()])
    assert [g[0]["lr"] for g in later.opt.seen] == [g[0]["lr"] for g in full.opt.seen][16:]


def test_param_scheduler_state_round_trip_and_errors(tmp_path):
    learn = _learner(torch.optim.AdamW, lr=slice(1e-3, 1e-2), splitter=_two_groups)
    sched = ParamScheduler({"lr": partial(sched_cos, 1e-2, 1e-4)})
    learn.fit(1, cbs=[sched])
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    fresh = ParamScheduler({"lr": partial(sched_cos, 1e-2, 1e-4)})
    fresh.load_state_dict(state)
    assert fresh.ratios == sched.ratios == {"lr": [pytest.approx(0.1, rel=1e-12), 1.0]}

    with pytest.raises(ValueError, match="'nesterov_power'"):
        learn.fit(1, cbs=[ParamScheduler({"nesterov_power": sched_lin})])
    adagrad = _learner(torch.optim.Adagrad)
    with pytest.raises(ValueError, match="'mom'"):
        adagrad.fit_one_cycle(1)
    adagrad.fit_one_cycle(1, moms=None)  # lr only: fine
    with pytest.raises(TypeError):
        ParamScheduler({"lr": 0.1})


@pytest.mark.parametrize("opt_cls, key", [(torch.optim.RMSprop, "momentum"), (torch.optim.Adam, "betas")])
def test_mom_maps_to_each_optimizer(opt_cls, key):
    learn = _learner(opt_cls)
    learn.fit_one_cycle(1, lr_max=1e-3)
    first = learn.opt.seen[0][0][key]
    assert (first[0] if key == "betas" else first) == pytest.approx(0.95)
