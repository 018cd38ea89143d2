"""Step time of looplab's Lion (torch._foreach_* ops) vs torch.optim.AdamW(foreach=True) on a ~1M-parameter model.

Only `opt.step()` is timed, on fixed gradients; the per-tensor Lion (a loop of `lion_update`, what Lion did
before) is shown for reference. Steps alternate between the optimizers (ABC ABC …) and the ratio is the median of
the per-round ratios, so a slow patch of a shared machine hits all of them. Printed, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from looplab.optim import Lion, lion_update  # noqa: E402


class PerTensorLion(Lion):
    """Lion as it stepped before: one `lion_update` call (three kernels and a temporary) per tensor."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p)
                    lion_update(p, p.grad, state["exp_avg"], group["lr"], *group["betas"], group["weight_decay"])


def model(device: str) -> nn.Module:
    """An MLP of 1.02M parameters in 8 tensors (a few large, a few small: biases)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 640), nn.ReLU(), nn.Linear(640, 160),
                        nn.ReLU(), nn.Linear(160, 10)).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    return net


def step_time(opt, n_steps: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per optimizer per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    opts = {"AdamW(foreach=True)": torch.optim.AdamW(model(args.device).parameters(), lr=1e-3, weight_decay=0.01,
                                                     foreach=True),
            "Lion (foreach)": Lion(model(args.device).parameters(), lr=1e-4, weight_decay=0.1),
            "Lion (per tensor)": PerTensorLion(model(args.device).parameters(), lr=1e-4, weight_decay=0.1)}
    n_params = sum(p.numel() for p in opts["Lion (foreach)"].param_groups[0]["params"])
    for opt in opts.values():
        step_time(opt, 3, args.device)  # warm up; creates the state
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            times[name].append(step_time(opt, args.steps, args.device))
    print(f"{n_params:,} parameters in {len(opts['Lion (foreach)'].param_groups[0]['params'])} tensors, "
          f"{args.device}, one thread")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, times["AdamW(foreach=True)"]))
        print(f"{name:20s} {statistics.median(t) * 1e6:8.0f} us/step   / AdamW(foreach=True) = {ratio:.2f}x")


if __name__ == "__main__":
    main()
