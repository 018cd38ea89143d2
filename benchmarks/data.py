"""Loader cost against torch's DataLoader on the same data. Printed, never asserted.

1. `TensorLoader` vs `DataLoader(TensorDataset)` (shuffled), time per epoch: TensorLoader builds each batch with
   one index per tensor; DataLoader fetches samples one by one and collates them.
2. `DatasetLoader` (what `DataLoaders.from_datasets` builds) vs `DataLoader` on the same map-style datasets, per
   sample, in the main process (`num_workers=0`, so the time is all CPU cost): a plain one (the worst case for our
   per-batch seeding and RNG save/restore) and one that draws from python's, numpy's and torch's generators.
3. The same with `num_workers=2`, over 3 epochs (workers start once for both: torch with `persistent_workers`).

Epochs alternate between the two loaders (ABAB) and the ratio is the median of the per-round ratios, so a slow
patch of a shared machine hits both.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from looplab.data import DatasetLoader, TensorLoader  # noqa: E402


class Augmenting(Dataset):
    """A tensor sample plus noise (torch), a scale (numpy) and a random flip (python), as augmentations draw."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] * float(np.random.uniform(0.9, 1.1)) + 0.01 * torch.randn(self.x.shape[1])
        return (x.flip(0) if random.random() < 0.5 else x), self.y[i]


def epoch_time(loader, n_epochs: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n_epochs):
        for xb, yb in loader:
            pass
    return time.perf_counter() - t0


def compare(ours, theirs, rounds: int, n_epochs: int = 1) -> tuple[float, float, float]:
    """Median times of ours and theirs, and the median of the per-round ratios ours / theirs."""
    epoch_time(ours, n_epochs), epoch_time(theirs, n_epochs)  # warm up (and start any workers)
    a, b = [], []
    for _ in range(rounds):
        a.append(epoch_time(ours, n_epochs))
        b.append(epoch_time(theirs, n_epochs))
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-workers", action="store_true", help="skip the num_workers=2 comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, d, bs = 20_000, 64, 64
    x, y = torch.randn(n, d), torch.randint(0, 10, (n,))

    ours, theirs, ratio = compare(TensorLoader(x, y, bs=bs, shuffle=True, seed=0),
                                  DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True), args.rounds)
    print(f"{n} samples x {d} features, bs {bs}, shuffled, one thread")
    print(f"TensorLoader {ours * 1e3:.1f} ms/epoch, DataLoader(TensorDataset) {theirs * 1e3:.1f} ms/epoch: "
          f"DataLoader / TensorLoader = {1 / ratio:.1f}x")

    for name, ds in (("TensorDataset", TensorDataset(x, y)), ("augmenting dataset", Augmenting(x, y))):
        ours, theirs, ratio = compare(DatasetLoader(ds, bs, shuffle=True, seed=0),
                                      DataLoader(ds, batch_size=bs, shuffle=True), args.rounds)
        print(f"{name}, num_workers=0: DatasetLoader {ours / n * 1e6:.2f} us/sample, DataLoader "
              f"{theirs / n * 1e6:.2f} us/sample: DatasetLoader / DataLoader = {ratio:.2f}x")

    if not args.skip_workers:
        ds = Augmenting(x, y)
        ours, theirs, ratio = compare(DatasetLoader(ds, bs, shuffle=True, seed=0, num_workers=2),
                                      DataLoader(ds, batch_size=bs, shuffle=True, num_workers=2,
                                                 persistent_workers=True), max(3, args.rounds // 2), n_epochs=3)
        print(f"augmenting dataset, num_workers=2, 3 epochs: DatasetLoader {ours * 1e3:.0f} ms, DataLoader "
              f"(persistent_workers) {theirs * 1e3:.0f} ms: DatasetLoader / DataLoader = {ratio:.2f}x")


if __name__ == "__main__":
    main()
