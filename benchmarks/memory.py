"""Peak memory and time per training step: ActivationCheckpointing and MixedPrecision against plain float32.

A deep residual MLP with wide (4x) hidden activations, trained by `Learner.fit` on pre-made batches. Peak memory
is what one training step allocates beyond what was already held (measured after a warm-up step: activations,
gradients and low-precision casts count, the weights do not): on CUDA with `torch.cuda.max_memory_allocated`, on the CPU by replaying the
allocator's allocations and frees recorded by `torch.profiler` (`cpu_peak_bytes`). Time per step is the median
over alternating repeats (outside the profiler). Printed, never asserted: timings are not something a test can
promise (tests/test_activation_checkpointing.py checks only that checkpointing lowers the measured peak).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from looplab import Learner  # noqa: E402
from looplab.callbacks import ActivationCheckpointing, MixedPrecision  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width) for _ in range(depth)], nn.Linear(width, 10))


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes the CPU allocator holds during `step()` (beyond what it held before), replayed from
    torch.profiler's memory events in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type != "cuda":
        return cpu_peak_bytes(step)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


CONFIGS: dict[str, Callable[[], list]] = {
    "float32": lambda: [],
    "float32 + ActivationCheckpointing": lambda: [ActivationCheckpointing(Block)],
    "bfloat16 autocast": lambda: [MixedPrecision(torch.bfloat16)],
    "float16 autocast + GradScaler": lambda: [MixedPrecision(torch.float16)],
    "bfloat16 + ActivationCheckpointing": lambda: [MixedPrecision(torch.bfloat16), ActivationCheckpointing(Block)],
}


def make_learner(config: str, batches, args, device) -> Learner:
    model = make_model(args.width, args.depth).to(device)
    return Learner(model, (batches, None), F.cross_entropy, opt_func=torch.optim.SGD, lr=1e-3,
                   cbs=CONFIGS[config](), progress=False)


def seconds_per_step(learn: Learner, n_steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    learn.fit(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="residual width (hidden is 4x); CPU 128, CUDA 1024")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--bs", type=int, default=None, help="batch size; CPU 512, CUDA 4096")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.width = args.width or (1024 if cuda else 128)
    args.bs = args.bs or (4096 if cuda else 512)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.bs, args.width, generator=g).to(device),
                torch.randint(0, 10, (args.bs,), generator=g).to(device)) for _ in range(args.steps)]

    peaks = {}
    for c in CONFIGS:  # one step after a warm-up step: the model exists, its gradients do not (zero_grad frees them)
        learn = make_learner(c, batches[:1], args, device)
        learn.fit(1)
        peaks[c] = peak_bytes(lambda: learn.fit(1), device)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):  # alternate configurations so drifts in machine load hit all of them
        for c in CONFIGS:
            times[c].append(seconds_per_step(make_learner(c, batches, args, device), args.steps, device))

    print(f"device {device} ({torch.get_num_threads()} CPU threads), residual MLP: {args.depth} blocks "
          f"{args.width}->{4 * args.width}->{args.width}, batch {args.bs}; median of {args.repeats} x {args.steps} steps")
    base_t, base_m = statistics.median(times["float32"]), peaks["float32"]
    print(f"{'configuration':36} {'ms/step':>9} {'x fp32':>7} {'peak MiB':>9} {'x fp32':>7}")
    for c in CONFIGS:
        t = statistics.median(times[c])
        print(f"{c:36} {t * 1e3:9.2f} {t / base_t:7.2f} {peaks[c] / 2**20:9.1f} {peaks[c] / base_m:7.2f}")


if __name__ == "__main__":
    main()
