"""Training by steps (issue 12, first part): fit(steps=N), n_steps, fit policies by steps, warmup_steps, LEGW in
steps — against the formulas written out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.schedules import scale_for_batch


def make_learner(n=40, bs=4, **kw):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    dls = DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=bs, seed=0)
    return Learner(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), dls, F.cross_entropy,
                   opt_func=torch.optim.SGD, lr=0.1, progress=False, **kw)


class Steps(Callback):
    order = 1000

    def before_fit(self):
        self.seen, self.lrs, self.n_steps = [], [], self.learn.n_steps

    def before_step(self):
        self.seen.append(self.learn.train_iter)
        self.lrs.append(self.learn.opt.param_groups[-1]["lr"])


def test_fit_by_steps_runs_exactly_that_many_batches():
    learn, probe = make_learner(), Steps()  # 10 batches an epoch
    learn.fit(steps=25, cbs=[probe])
    assert probe.seen == list(range(25)) and probe.n_steps == 25
    assert learn.n_steps == 25 and learn.n_epochs == 3 and learn.train_iter == 25
    assert [r["epoch"] for r in learn.recorder.history] == [0, 1, 2]  # the last epoch still validated
    assert all("valid_loss" in r for r in learn.recorder.history)


def test_n_steps_in_a_fit_by_epochs():
    learn, probe = make_learner(), Steps()
    learn.fit(2, cbs=[probe])
    assert probe.n_steps == 20 and len(probe.seen) == 20


@pytest.mark.parametrize("args", [dict(), dict(n_epochs=2, steps=5), dict(steps=0), dict(steps=-3),
                                  dict(steps=True), dict(steps=2.5)])
def test_epochs_or_steps_exactly_one_and_valid(args):
    with pytest.raises(ValueError, match="steps|n_epochs"):
        make_learner().fit(**args)


def test_fit_one_cycle_by_steps_follows_the_formula():
    learn, probe = make_learner(), Steps()
    n, top, div, div_final, pct = 37, 0.1, 25.0, 1e5, 0.25
    learn.fit_one_cycle(steps=n, lr_max=top, moms=None, cbs=[probe])
    assert len(probe.lrs) == n
    for i, lr in enumerate(probe.lrs):
        pos = i / n
        if pos < pct:
            p = pos / pct
            expected = top / div + (top - top / div) * (1 - math.cos(math.pi * p)) / 2
        else:
            p = (pos - pct) / (1 - pct)
            expected = top + (top / div_final - top) * (1 - math.cos(math.pi * p)) / 2
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fit_warmup_cos_with_warmup_steps_follows_the_formula():
    learn, probe = make_learner(), Steps()
    n, w, lr, div, lr_min = 40, 8, 0.1, 100.0, 0.001
    learn.fit_warmup_cos(steps=n, lr=lr, warmup_steps=w, lr_min=lr_min, cbs=[probe])
    assert len(probe.lrs) == n
    for i, got in enumerate(probe.lrs):
        if i < w:
            expected = lr / div + (lr - lr / div) * i / w
        else:
            expected = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * (i - w) / (n - w))) / 2
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kw", [dict(warmup_steps=40), dict(warmup_steps=-1), dict(warmup_steps=4, warmup=0.2),
                                dict(warmup_steps=4, warmup_epochs=1)])
def test_bad_warmup_steps_are_errors(kw):
    with pytest.raises(ValueError, match="warmup"):
        make_learner().fit_warmup_cos(steps=40, **kw)


def test_scale_for_batch_in_steps():
    # LEGW keeps the warmup's step count (k x the epochs at 1/k the steps per epoch); linear divides it by k
    assert scale_for_batch(0.1, 400, 64, 256, unit="steps") == (pytest.approx(0.2), 400)
    assert scale_for_batch(0.1, 400, 64, 256, rule="linear", unit="steps") == (pytest.approx(0.4), 100)
    assert scale_for_batch(0.1, 2.0, 64, 256) == (pytest.approx(0.2), pytest.approx(8.0))
