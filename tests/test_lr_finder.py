"""The LR finder: geometric lrs, early stop on divergence, and no trace left behind; suggestion rules on known curves."""
import copy
import math
import random

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.lr_finder import LRFindResult, lr_find, minimum, slide, steep, valley


class Probe(torch.optim.SGD):
    """Records the lr of every group at every step."""
    def step(self, closure=None):
        self.seen.append([g["lr"] for g in self.param_groups])
        return super().step(closure)


def probe_sgd(params, lr):
    opt = Probe(params, lr=lr, momentum=0.9)
    opt.seen = []
    return opt


def _data(n=96, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoaders.from_tensors(x, y, valid_pct=0.25, bs=bs, seed=seed)


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _learner(opt_func=probe_sgd, **kwargs):
    return Learner(_model(), _data(), nn.functional.cross_entropy, opt_func=opt_func, lr=1e-2, progress=False,
                   **kwargs)


class Count(Callback):
    def __init__(self):
        self.train_batches, self.valid_batches = 0, 0

    def after_batch(self):
        if self.learn.training:
            self.train_batches += 1
        else:
            self.valid_batches += 1

    def state_dict(self):
        return {"train_batches": self.train_batches, "valid_batches": self.valid_batches}

    def load_state_dict(self, state):
        self.train_batches, self.valid_batches = state["train_batches"], state["valid_batches"]


class Outsider(Count):
    during_lr_find = False


# ---- the range test ----------------------------------------------------------------------------------------------
def test_lrs_are_geometric_and_run_past_a_short_loader():
    learn = _learner()  # 72 training samples / 16 = 5 batches per epoch: 30 steps need 6+ epochs
    learn.opt.seen = []
    res = learn.lr_find(start_lr=1e-5, end_lr=1.0, num_it=30, stop_div=False)
    expected = [1e-5 * (1.0 / 1e-5) ** (i / 30) for i in range(30)]
    assert res.lrs == pytest.approx(expected, rel=1e-12)
    assert [s[0] for s in learn.opt.seen] == pytest.approx(expected, rel=1e-12)  # what the optimizer used
    assert len(res.raw_losses) == len(res.losses) == 30
    # smoothed = bias-corrected exponential moving average (beta 0.98) of the raw losses
    avg = 0.0
    for i, (raw, smooth) in enumerate(zip(res.raw_losses, res.losses)):
        avg = 0.98 * avg + 0.02 * raw
        assert smooth == pytest.approx(avg / (1 - 0.98 ** (i + 1)), rel=1e-12)
    assert set(res.suggestions) == {"valley", "steep", "minimum", "slide"}


def test_stops_when_the_loss_diverges():
    learn = _learner()
    res = learn.lr_find(start_lr=1e-3, end_lr=1e6, num_it=100)
    assert 5 < len(res.losses) < 100
    last, best = res.losses[-1], min(res.losses[:-1])
    assert not math.isfinite(last) or last > 4 * best
    assert all(math.isfinite(v) and v <= 4 * min(res.losses[:i + 1]) for i, v in enumerate(res.losses[:-1]))


def test_validation_is_skipped_and_opted_out_callbacks_sit_out():
    count, outsider = Count(), Outsider()
    learn = _learner(cbs=[outsider, count])
    order = list(learn.cbs)
    learn.lr_find(num_it=12)
    assert learn.cbs == order  # put back, in the same place
    assert (outsider.train_batches, outsider.valid_batches) == (0, 0)
    assert (count.train_batches, count.valid_batches) == (0, 0)  # its state was restored too

    class Spy(Callback):
        seen = []

        def after_batch(self):
            Spy.seen.append(self.learn.training)
    learn.add_cb(Spy())
    learn.lr_find(num_it=12)
    assert Spy.seen == [True] * 12


def _snapshot(learn):
    model, opt = learn.model, learn.opt
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),  # its tensors are the live ones: copy them
        "recorder": learn.recorder.state_dict(),
        "last_validation": dict(learn.recorder.last_validation),
        "cbs": [cb.state_dict() for cb in learn.cbs],
        "dls": learn.dls.state_dict(),
        "loop": {k: getattr(learn, k) for k in ("epoch", "n_epochs", "train_iter", "iter", "n_iter", "training")},
    }


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_everything_is_as_before():
    count = Count()
    learn = _learner(cbs=[count], splitter=lambda m: [m[:2].parameters(), m[4].parameters()])
    learn.fit(2)  # optimizer state, recorder history, loader position, counters: all non-trivial
    learn.model.eval()
    learn.model[1].train()  # a mixed mode must come back as it was
    next(learn.model.parameters()).grad = torch.full_like(next(learn.model.parameters()), 0.5)
    learn.opt.param_groups[0]["lr"] = 1.25e-3  # a hand-set lr
    before = _snapshot(learn)
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    learn.lr_find(num_it=20)
    rng_draws = (random.random(), np.random.rand(), torch.rand(3))
    after = _snapshot(learn)
    _assert_same(before, after)
    random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])
    assert rng_draws[:2] == (random.random(), np.random.rand()) and torch.equal(rng_draws[2], torch.rand(3))


def test_training_after_lr_find_is_bit_identical():
    """Shuffled data, dropout, BatchNorm, momentum: a fit after lr_find equals a fit without it, bit for bit."""
    plain = _learner()
    plain.fit_one_cycle(2, lr_max=0.05)
    found = _learner()
    res = found.lr_find(num_it=25)
    assert len(res.losses) > 5
    found.fit_one_cycle(2, lr_max=0.05)
    for a, b in zip(plain.model.state_dict().values(), found.model.state_dict().values()):
        assert torch.equal(a, b)
    assert plain.recorder.losses == found.recorder.losses


def test_discriminative_ratios_are_kept():
    learn = Learner(_model(), _data(), nn.functional.cross_entropy, opt_func=probe_sgd, lr=slice(1e-4, 1e-2),
                    splitter=lambda m: [m[0].parameters(), m[1].parameters(), m[4].parameters()], progress=False)
    learn.opt.seen = []
    res = lr_find(learn, num_it=10)
    for (a, b, c), lr in zip(learn.opt.seen, res.lrs):
        assert (a / c, b / c, c) == pytest.approx((1e-2, 1e-1, lr), rel=1e-12)


def test_bad_arguments():
    learn = _learner()
    for kwargs, shown in ((dict(start_lr=0), "0"), (dict(start_lr=1.0, end_lr=0.5), "0.5"), (dict(num_it=1), "1")):
        with pytest.raises(ValueError, match=shown):
            learn.lr_find(**kwargs)


# ---- suggestion rules on known curves --------------------------------------------------------------------------------
LRS = [10 ** (-6 + k / 10) for k in range(61)]  # 1e-6 .. 1, ten points a decade
LOG = [math.log10(lr) for lr in LRS]


def test_minimum_is_a_tenth_of_the_lowest_point():
    losses = [(x + 2) ** 2 + 1 for x in LOG]  # lowest at lr = 1e-2
    assert minimum(LRS, losses) == pytest.approx(1e-3, rel=1e-9)


def test_steep_is_the_start_of_the_steepest_segment():
    losses = [1 - math.tanh(2 * (x + 3.05)) for x in LOG]  # steepest at log10 lr = -3.05: segment [-3.1, -3.0]
    assert steep(LRS, losses) == pytest.approx(10 ** -3.1, rel=1e-9)


def test_valley_is_the_middle_of_the_longest_descent_before_the_minimum():
    losses = [2.0] * 10  # flat: not descending
    losses += [2.0 - (k + 1) / 20 for k in range(20)]  # indices 10..29 strictly down to 1.0 (stretch 9..29)
    losses += [1.0 + (k + 1) / 100 for k in range(5)]  # 30..34 bump up
    losses += [1.05 - (k + 1) / 30 for k in range(5)]  # 35..39 down to ~0.883: the minimum, at 39
    losses += [1.0 + k for k in range(len(LRS) - len(losses))]  # divergence
    assert int(np.argmin(losses)) == 39
    assert valley(LRS, losses) == pytest.approx(math.sqrt(LRS[9] * LRS[29]), rel=1e-9)
    losses[40:] = [math.nan] * (len(LRS) - 40)  # a non-finite tail is cut off, not an error
    assert valley(LRS, losses) == pytest.approx(math.sqrt(LRS[9] * LRS[29]), rel=1e-9)


def test_slide_finds_where_the_curve_stops_being_calm():
    # Flat up to index 50, then a parabola: per-step gradient 0 before index 49, 0.04 * (k - 50) after.
    losses = [1.0 if k <= 50 else 1.0 + 0.02 * (k - 50) ** 2 for k in range(len(LRS))]
    # Windows of 15 points slide left from [45, 60] while their end gradients differ (> 0.005); the first calm
    # one is [34, 49] (both gradients 0), so the answer is the left end of the window before it: index 35.
    assert slide(LRS, losses, lr_diff=15, thresh=0.005) == pytest.approx(LRS[35], rel=1e-12)


def test_rules_reject_bad_curves():
    for rule in (minimum, steep, valley, slide):
        with pytest.raises(ValueError, match="equal length"):
            rule(LRS, [1.0, 2.0])
        with pytest.raises(ValueError, match="increasing"):
            rule([1e-3, 1e-4, 1e-2], [1.0, 2.0, 3.0])


def test_plot_has_a_log_axis_and_marks_every_suggestion():
    res = LRFindResult(LRS, [(x + 2) ** 2 for x in LOG], [(x + 2) ** 2 for x in LOG],
                       {"valley": 1e-4, "steep": 1e-3, "minimum": 1e-3, "slide": 1e-5})
    fig = res.plot()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert all(any(label.startswith(name) for label in labels) for name in res.suggestions)
