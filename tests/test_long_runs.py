"""Long runs (issue 12, second part): TensorBoard visible while an epoch runs (flush_every), checkpoints by
wall-clock time (every_n_minutes) that are exact-resume points."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, Checkpoint, DataLoaders, Learner, TensorBoard
from looplab.callbacks.checkpoint import checkpoint_files


def make_learner(n=640, bs=2, seed=0, **kw):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    dls = DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=bs, seed=0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3))
    return Learner(model, dls, F.cross_entropy, lr=0.05, progress=False, **kw)


def test_tensorboard_is_readable_while_a_long_epoch_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    seen = {}

    class Reader(Callback):
        order = 1000

        def after_batch(self):
            if self.learn.training and self.learn.train_iter == 250:  # the epoch has 320 steps
                acc = EventAccumulator(str(tmp_path))
                acc.Reload()
                seen["steps"] = [e.step for e in acc.Scalars("train_loss")]
                seen["values"] = [e.value for e in acc.Scalars("train_loss")]

    learn = make_learner(cbs=[TensorBoard(tmp_path, histograms=False, flush_every=100), Reader()])
    learn.fit(1)
    assert seen["steps"] == list(range(200))
    assert seen["values"] == pytest.approx(learn.recorder.losses[:200])


@pytest.mark.parametrize("bad", [0, -1, True, "5", float("nan")])
def test_every_n_minutes_must_be_a_positive_number(bad, tmp_path):
    with pytest.raises(ValueError, match="every_n_minutes"):
        Checkpoint(tmp_path, every_n_minutes=bad)
    Checkpoint(tmp_path, every_n_minutes=0.5), Checkpoint(tmp_path, every_n_minutes=30)


class Slow(Callback):
    def after_batch(self):
        if self.learn.training:
            time.sleep(0.004)


class Crash(Exception):
    pass


class CrashAt(Callback):
    order = 1000

    def __init__(self, at):
        self.at = at

    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.at:
            raise Crash


def test_timed_checkpoints_within_an_epoch_resume_exactly(tmp_path):
    reference = make_learner(n=320)
    reference.fit(2)
    ckpt = tmp_path / "ck"
    run = make_learner(n=320)
    with pytest.raises(Crash):  # 160 steps an epoch; a checkpoint about every 0.3 s; crash in epoch 1
        run.fit(2, cbs=[Slow(), Checkpoint(ckpt, every_n_minutes=0.005, every_epoch=False, keep_last=None),
                        CrashAt(250)])
    steps = sorted(int(p.name[5:13]) for p in checkpoint_files(ckpt))
    assert len([s for s in steps if s <= 160]) >= 2  # several within the first epoch, none at its end only
    assert all(s % 1 == 0 for s in steps) and steps[-1] <= 251
    resumed = make_learner(n=320)
    resumed.fit(2, resume_from=ckpt)
    for a, b in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.recorder.losses == reference.recorder.losses
