"""Per-step overhead of `Learner.fit` (default callbacks: Recorder + ProgressBar) over a hand-written loop.

Both train the same MLP (32→64→10) on the same pre-made batches (bs 64) with SGD + momentum, on one thread.
Runs come in ABBA groups (loop, Learner, Learner, loop), which cancels a linear drift in machine load within a
group; the ratio of each group's sums is taken, and the last line is the median over groups.
Printed, never asserted: wall-clock time is not something a test can promise.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from looplab import Learner  # noqa: E402


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def opt_func(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def hand_written(batches, epochs: int) -> float:
    model = make_model()
    opt = opt_func(model.parameters(), lr=0.01)
    loss_func = nn.functional.cross_entropy
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for xb, yb in batches:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return time.perf_counter() - t0


def with_learner(batches, epochs: int) -> float:
    learn = Learner(make_model(), (batches, None), nn.functional.cross_entropy, opt_func=opt_func, lr=0.01)
    t0 = time.perf_counter()
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):  # the bar runs; its text is not shown
        learn.fit(epochs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
               for _ in range(args.steps)]
    hand_written(batches, 1), with_learner(batches, 1)  # warm up
    ratios, loop_times, learner_times = [], [], []
    for _ in range(args.repeats):
        a1 = hand_written(batches, args.epochs)
        b1 = with_learner(batches, args.epochs)
        b2 = with_learner(batches, args.epochs)
        a2 = hand_written(batches, args.epochs)
        loop_times += [a1, a2]
        learner_times += [b1, b2]
        ratios.append((b1 + b2) / (a1 + a2))
    n = args.steps * args.epochs
    print(f"hand-written loop: {statistics.median(loop_times) / n * 1e6:.1f} us/step")
    print(f"Learner.fit:       {statistics.median(learner_times) / n * 1e6:.1f} us/step")
    print(f"overhead ratio (median of {args.repeats} ABBA groups): {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
