"""Time per epoch of looplab's in-memory TensorLoader vs torch's DataLoader(TensorDataset) (shuffled).

TensorLoader builds each batch with one index per tensor; DataLoader fetches samples one by one and collates
them. Printed, never asserted.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from looplab.data import TensorLoader  # noqa: E402


def epoch_time(loader) -> float:
    t0 = time.perf_counter()
    for xb, yb in loader:
        pass
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    n, d, bs = 20_000, 64, 64
    x, y = torch.randn(n, d), torch.randint(0, 10, (n,))
    ours = TensorLoader(x, y, bs=bs, shuffle=True, seed=0)
    theirs = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    ratios = []
    for _ in range(5):
        a, b = epoch_time(ours), epoch_time(theirs)
        ratios.append(b / a)
    print(f"{n} samples x {d} features, bs {bs}: TensorLoader {a * 1e3:.1f} ms/epoch, "
          f"DataLoader(TensorDataset) {b * 1e3:.1f} ms/epoch")
    print(f"DataLoader(TensorDataset) / TensorLoader time ratio (median of 5): {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
