"""EarlyStopping, SaveBest, ReduceLROnPlateau and TerminateOnNaN, on scripted monitored values, against rules written
out by hand and torch's own ReduceLROnPlateau."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import EarlyStopping, ReduceLROnPlateau, SaveBest, TerminateOnNaN
from looplab.callbacks.tracking import resolve_mode

torch.set_num_threads(1)


def learner(loss_func=F.cross_entropy, lr=0.1, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return Learner(model, DataLoaders.from_tensors(x, (x[:, 0] > 0).long(), bs=32, seed=0), loss_func,
                   opt_func=torch.optim.SGD, lr=lr, progress=False, **kwargs)


class Script(Callback):
    """Overwrites the monitored value of each epoch's history row with a scripted one (after the Recorder wrote it,
    before the trackers read it), and keeps each epoch's weights and lr as the trackers left them."""
    order = 52

    def __init__(self, name, values):
        self.key, self.values, self.weights = name, values, {}

    def after_epoch(self):
        self.learn.recorder.history[-1][self.key] = self.values[self.learn.epoch]
        self.weights[self.learn.epoch] = {k: v.clone() for k, v in self.learn.model.state_dict().items()}


class LrAfterEpoch(Callback):
    order = 99

    def __init__(self):
        self.lrs = []

    def after_epoch(self):
        self.lrs.append(self.learn.opt.param_groups[0]["lr"])


def stop_epoch(values, patience, mode="min", min_delta=0.0):
    """The rule, written out: the epoch after which `patience` epochs in a row failed to improve on the best."""
    best, wait = None, 0
    for epoch, v in enumerate(values):
        better = best is None or (v < best - min_delta if mode == "min" else v > best + min_delta)
        best, wait = (v, 0) if better else (best, wait + 1)
        if wait >= patience:
            return epoch
    return None


@pytest.mark.parametrize("monitor,values,patience,min_delta", [
    ("valid_loss", [1.0, 0.9, 0.95, 0.91, 0.92, 0.5, 0.4, 0.3], 3, 0.0),
    ("valid_loss", [1.0, 0.9, 0.89, 0.88, 0.87, 0.5, 0.4, 0.3], 3, 0.05),  # small gains do not count
    ("accuracy", [0.5, 0.6, 0.6, 0.7, 0.65, 0.69, 0.8, 0.9], 2, 0.0),  # "auto": maximised
    ("train_loss", [3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1], 1, 0.0),  # never stops
])
def test_early_stopping_stops_at_the_right_epoch(monitor, values, patience, min_delta):
    learn, es = learner(), EarlyStopping(monitor, patience=patience, min_delta=min_delta)
    learn.fit(len(values), cbs=[Script(monitor, values), es])
    expected = stop_epoch(values, patience, resolve_mode(monitor, "auto"), min_delta)
    assert es.stopped_epoch == expected
    assert len(learn.recorder.history) == (len(values) if expected is None else expected + 1)


def test_mode_and_monitor_errors():
    assert (resolve_mode("valid_loss", "auto"), resolve_mode("error_rate", "auto"),
            resolve_mode("accuracy", "auto"), resolve_mode("valid_loss", "max")) == ("min", "min", "max", "max")
    with pytest.raises(ValueError, match="'smallest'"):
        EarlyStopping(mode="smallest")
    learn = learner()
    with pytest.raises(ValueError, match=r"'valid_acc'.*available.*'train_loss'.*'valid_loss'"):
        learn.fit(1, cbs=[EarlyStopping("valid_acc")])
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(factor=0.5)


def test_save_best_writes_the_best_model(tmp_path):
    path = tmp_path / "best.pt"
    values = [0.8, 0.6, 0.7, 0.5, 0.55, 0.9]
    learn, script = learner(), Script("valid_loss", values)
    save_best = SaveBest(path)
    learn.fit(len(values), cbs=[script, save_best])
    saved = torch.load(path, weights_only=True)  # plain data, the learn.save format
    assert {"model", "opt"} <= set(saved)
    for k, v in script.weights[3].items():  # epoch 3 had the lowest valid_loss
        assert torch.equal(saved["model"][k], v)
    assert (save_best.best, save_best.best_epoch) == (0.5, 3)
    assert not list(tmp_path.glob("*.tmp"))
    learn.load(path)  # and the Learner reads it back


@pytest.mark.parametrize("patience,factor,min_lr,min_delta", [(2, 10.0, 0.0, 0.0), (1, 2.0, 0.02, 0.0),
                                                               (3, 5.0, 0.0, 0.05)])
def test_reduce_lr_on_plateau_matches_torch(patience, factor, min_lr, min_delta):
    values = [1.0, 0.9, 0.9, 0.95, 0.85, 0.86, 0.87, 0.88, 0.84, 0.84, 0.84, 0.84, 0.7, 0.71, 0.72, 0.73]
    learn, lrs = learner(lr=0.1), LrAfterEpoch()
    learn.fit(len(values), cbs=[Script("valid_loss", values),
                                ReduceLROnPlateau(patience=patience, factor=factor, min_lr=min_lr, min_delta=min_delta),
                                lrs])
    # torch: factor multiplies, and it acts after `patience` tolerated bad epochs (ours on the `patience`-th)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=1 / factor, patience=patience - 1,
                                                       threshold=min_delta, threshold_mode="abs", min_lr=min_lr)
    expected = []
    for v in values:
        sched.step(v)
        expected.append(opt.param_groups[0]["lr"])
    assert lrs.lrs == pytest.approx(expected, rel=1e-12)
    assert len(set(expected)) > 1  # the script does reduce the lr


class NaNAt:
    """cross_entropy, except that the training loss of call `at` is `value`."""

    def __init__(self, at, value=math.nan):
        self.at, self.value, self.calls = at, value, 0

    def __call__(self, pred, y):
        loss = F.cross_entropy(pred, y)
        if pred.requires_grad:
            self.calls += 1
            if self.calls == self.at + 1:
                return loss * self.value
        return loss


class WeightsBeforeStep(Callback):
    def __init__(self):
        self.weights = {}

    def before_batch(self):
        if self.learn.training:
            self.weights[self.learn.train_iter] = [p.detach().clone() for p in self.learn.model.parameters()]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_terminate_on_nan_stops_before_the_weights_change(value):
    learn, before = learner(NaNAt(5, value)), WeightsBeforeStep()
    terminate = TerminateOnNaN()
    with pytest.warns(RuntimeWarning, match="step 5"):
        learn.fit(3, cbs=[terminate, before])
    assert terminate.stopped_at == 5
    for p, w in zip(learn.model.parameters(), before.weights[5]):
        assert torch.equal(p.detach(), w)  # the non-finite loss never reached them
    assert len(learn.recorder.losses) == 5 and all(map(math.isfinite, learn.recorder.losses))
    plain = learner(NaNAt(5, value))  # without the callback the weights are ruined
    plain.fit(3)
    assert not all(torch.isfinite(p).all() for p in plain.model.parameters())


def test_states_round_trip_weights_only(tmp_path):
    values = [1.0, 0.5, 0.6, 0.7, 0.8]
    cbs = [EarlyStopping(patience=10), SaveBest(tmp_path / "b.pt"), ReduceLROnPlateau(patience=2), TerminateOnNaN()]
    learner().fit(len(values), cbs=[Script("valid_loss", values), *cbs])
    for cb in cbs:
        torch.save(cb.state_dict(), tmp_path / "s.pt")
        state = torch.load(tmp_path / "s.pt", weights_only=True)
        fresh = type(cb)(tmp_path / "b.pt") if isinstance(cb, SaveBest) else type(cb)()
        fresh.load_state_dict(state)
        assert fresh.state_dict() == cb.state_dict()
    assert cbs[0].state_dict() == {"best": 0.5, "best_epoch": 1, "best_iter": 6, "wait": 3, "n_rows": 5}


def test_early_stopping_resumes_exactly(tmp_path):
    """Counters travel in checkpoints (written before EarlyStopping stops the fit, yet counting that epoch)."""
    from looplab.callbacks.checkpoint import Checkpoint
    values = [1.0, 0.8, 0.9, 0.85, 0.95, 0.5]  # patience 3: stops after epoch 4

    def run(**kwargs):
        learn, es = learner(), EarlyStopping(patience=3)
        learn.fit(len(values), cbs=[Script("valid_loss", values), es, Checkpoint(tmp_path, keep_last=None)], **kwargs)
        return learn, es

    full, es = run()
    assert es.stopped_epoch == 4
    for epoch in (2, 4):  # resume mid-count, and from the very checkpoint it stopped after
        resumed, _ = run(resume_from=next(tmp_path.glob(f"ckpt-*-epoch-{epoch}.pt")))
        assert len(resumed.recorder.history) == 5
        for a, b in zip(full.model.parameters(), resumed.model.parameters()):
            assert torch.equal(a, b)
