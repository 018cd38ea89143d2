"""A tiny training run for tests/test_resume.py, meant to be interrupted and resumed in subprocesses.

The run has everything that makes exact resume hard: shuffling, dropout, MixedPrecision float16, MixUp,
GradientClip, a one-cycle schedule, and a dataset that augments with torch, numpy and python random draws,
loaded by two worker processes. Usage:

    python resume_script.py OUT [--ckpt DIR] [--every N] [--keep N] [--resume] [--resume-from PATH]
                                [--exit-at STEP] [--exit-after-epoch E] [--sigterm-at STEP] [--slow SECONDS]
                                [--workers N] [--lr-from STEP LR] [--log-files FILE]

Writes OUT (final weights and per-step losses) when the fit returns. `--resume` continues from `--ckpt`,
`--resume-from` from any file or folder; `--lr-from` changes the lr from a step on (a rollback that tries another
lr); `--log-files` appends the checkpoint folder's listing after every step. tests/fork_script.py runs `main` in
forked children.
"""
import argparse
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks.checkpoint import Checkpoint
from looplab.callbacks.clip import GradientClip
from looplab.callbacks.mixup import MixUp
from looplab.callbacks.precision import MixedPrecision
from looplab.repro import set_seed

N_EPOCHS = 3


class Augmenting(Dataset):
    """Gaussian blobs; every sample gets noise (torch), a random scale (numpy) and a random flip (python)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) + self.y[:, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] + 0.1 * torch.randn(8)
        x = x * float(1 + 0.1 * np.random.randn())
        if random.random() < 0.5:
            x = x.flip(0)
        return x, self.y[i]


class Exit(Callback):
    """Kill the process the hard way (os._exit) after a training step or after an epoch's checkpoint."""
    order = 99  # after Checkpoint (95)

    def __init__(self, at_step=None, after_epoch=None):
        self.at_step, self.epoch = at_step, after_epoch

    def after_batch(self):
        if self.learn.training and self.learn.train_iter + 1 == self.at_step:
            os._exit(3)

    def after_epoch(self):
        if self.learn.epoch == self.epoch:
            os._exit(3)


class SelfSignal(Callback):
    """Send SIGTERM to this process in the middle of training step `at_step` (as a preemption would)."""

    def __init__(self, at_step):
        self.at_step = at_step

    def after_pred(self):
        if self.learn.training and self.learn.train_iter + 1 == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class LrFrom(Callback):
    """Set every group's lr to `lr` from training step `step` on (steps counted from 1, as the file names do)."""
    order = 20  # after ParamScheduler (10): this lr replaces the one-cycle schedule's

    def __init__(self, step, lr):
        self.step, self.lr = step, lr

    def before_batch(self):
        if self.learn.training and self.learn.train_iter + 1 > self.step:
            for group in self.learn.opt.param_groups:
                group["lr"] = self.lr


class LogFiles(Callback):
    """After every training step (and its checkpoint), append `[step, sorted file names in folder]` to `log`."""
    order = 98  # after Checkpoint (95), before Exit (99)

    def __init__(self, folder, log):
        self.folder, self.log = folder, log

    def after_batch(self):
        if self.learn.training:
            with open(self.log, "a") as f:
                f.write(json.dumps([self.learn.train_iter + 1, sorted(os.listdir(self.folder))]) + "\n")


class Slow(Callback):
    """Sleep a little every step, so a SIGKILL from outside lands at a random point of the run."""

    def __init__(self, seconds):
        self.seconds = seconds

    def before_fit(self):
        print("started", flush=True)

    def after_batch(self):
        time.sleep(self.seconds)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--ckpt")
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--resume-from")
    p.add_argument("--exit-at", type=int)
    p.add_argument("--exit-after-epoch", type=int)
    p.add_argument("--sigterm-at", type=int)
    p.add_argument("--slow", type=float)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr-from", nargs=2, type=float)
    p.add_argument("--log-files")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    set_seed(0)  # a resumed run seeds too; the checkpoint's RNG states then replace these
    dls = DataLoaders.from_datasets(Augmenting(80, 1), Augmenting(32, 2), bs=16, num_workers=a.workers, seed=5)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    cbs = [MixUp(0.4), GradientClip(0.5), MixedPrecision(dtype=torch.float16, init_scale=2.0**20, growth_interval=3)]
    if a.ckpt:
        cbs.append(Checkpoint(a.ckpt, every_n_steps=a.every, keep_last=a.keep))
    if a.exit_at or a.exit_after_epoch is not None:
        cbs.append(Exit(a.exit_at, a.exit_after_epoch))
    if a.sigterm_at:
        cbs.append(SelfSignal(a.sigterm_at))
    if a.slow:
        cbs.append(Slow(a.slow))
    if a.lr_from:
        cbs.append(LrFrom(int(a.lr_from[0]), a.lr_from[1]))
    if a.log_files:
        cbs.append(LogFiles(a.ckpt, a.log_files))
    learn = Learner(model, dls, nn.CrossEntropyLoss(), lr=1e-2, cbs=cbs, progress=False)
    learn.fit_one_cycle(N_EPOCHS, 3e-2, resume_from=a.resume_from or (a.ckpt if a.resume else None))
    torch.save({"model": model.state_dict(), "losses": torch.tensor(learn.recorder.losses, dtype=torch.float64),
                "history": learn.recorder.history, "train_iter": learn.train_iter},
               a.out + (f".rank{os.environ['RANK']}" if "RANK" in os.environ else ""))  # under torchrun: one per rank


if __name__ == "__main__":
    sys.exit(main())
