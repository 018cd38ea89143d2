"""Cost of checkpointing: time to write one checkpoint vs model size, and per-step overhead of `every_n_steps`.

1. Write time: an MLP of growing size trained one step with AdamW (so the optimizer holds two moments per weight,
   and the file is about 3x the weights), then `Checkpoint` writes its complete state (tmp file, fsync, rename)
   a few times; the median is printed with the file size and the throughput.
2. Per-step overhead: the same small training run without a Checkpoint, with one that only watches for signals
   (`every_epoch=False`), and with `every_n_steps` 100 / 20; runs alternate in ABBA order; medians per step.
Printed, never asserted: timings depend on the machine and its disk.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from looplab import Checkpoint, DataLoaders, Learner  # noqa: E402


def mlp(width: int, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def data(n: int = 2048) -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoaders.from_tensors(x, y, valid=(x[:64], y[:64]), bs=32)


def write_times(folder: Path) -> None:
    print("1. time to write one checkpoint (model + AdamW state + RNG + callbacks; tmp, fsync, rename)")
    print(f"{'params':>12} {'file MB':>9} {'write ms':>9} {'MB/s':>8}")
    for width in (64, 256, 1024, 2048):
        ckpt = Checkpoint(folder / f"w{width}", every_epoch=False, keep_last=1)
        learn = Learner(mlp(width), data(64), nn.functional.cross_entropy, progress=False, cbs=[ckpt])
        learn.fit(1)  # one epoch of 2 steps: creates the optimizer state; the Checkpoint sets itself up
        learn.iter, learn.training = 0, True
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            ckpt._save(mid_epoch=True)
            times.append(time.perf_counter() - t0)
        n_params = sum(p.numel() for p in learn.model.parameters())
        mb = ckpt.last_path.stat().st_size / 2**20
        ms = statistics.median(times) * 1e3
        print(f"{n_params:>12,} {mb:>9.1f} {ms:>9.1f} {mb / (ms / 1e3):>8.0f}")


def step_time(cbs, epochs: int = 2) -> float:
    learn = Learner(mlp(128), data(), nn.functional.cross_entropy, progress=False, cbs=cbs)
    t0 = time.perf_counter()
    learn.fit(epochs)
    return (time.perf_counter() - t0) / (epochs * len(learn.dls.train))


def step_overheads(folder: Path, groups: int = 5) -> None:
    print("\n2. per-step time of a small MLP (128 wide, bs 32, 64 steps/epoch) with checkpointing")
    runs = iter(range(10**6))  # a fresh folder per run

    def checkpoint(**kw):
        return lambda: [Checkpoint(folder / f"run{next(runs)}", every_epoch=False, **kw)]
    variants = {"no Checkpoint": lambda: [], "Checkpoint, signals only": checkpoint(),
                "every_n_steps=100": checkpoint(every_n_steps=100), "every_n_steps=20": checkpoint(every_n_steps=20)}
    step_time([])  # warm up
    results = {name: [] for name in variants}
    for _ in range(groups):
        for name, make in [*variants.items(), *reversed(variants.items())]:
            results[name].append(step_time(make()))
    base = statistics.median(results["no Checkpoint"])
    for name, times in results.items():
        t = statistics.median(times)
        print(f"{name:>26}: {t * 1e6:8.1f} µs/step ({(t - base) * 1e6:+7.1f} µs vs none)")


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_times(Path(tmp))
        step_overheads(Path(tmp))


if __name__ == "__main__":
    main()
