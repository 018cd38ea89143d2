"""Memory per rank and step time: DDP vs FSDP on a ~20 M-parameter MLP with AdamW, under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/sharding.py [--steps 12]

(`make bench` runs it so.) Per rank, while the fit runs (after an optimizer step, before zero_grad): the bytes of
the parameters, gradients and optimizer state this rank holds (a DTensor counts its local shard only), and the
median time of a training step. Rank 0 prints the table. CPU and gloo here; nccl on GPUs the same way.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from looplab import FSDP, Callback, DataLoaders, Learner


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


class Measure(Callback):
    """The bytes this rank holds after the first optimizer step, and each step's wall-clock time."""
    def __init__(self):
        self.bytes, self.times, self._t0 = None, [], None

    def before_batch(self):
        self._t0 = time.perf_counter()

    def after_step(self):
        if self.bytes is None:
            learn = self.learn
            params = list(learn.model.parameters())
            self.bytes = {"parameters": _bytes(params), "gradients": _bytes(p.grad for p in params),
                          "optimizer state": _bytes(v for s in learn.opt.state.values() for v in s.values())}

    def after_batch(self):
        self.times.append(time.perf_counter() - self._t0)


def make_model(width: int, depth: int) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def run(cbs, width: int, depth: int, steps: int, bs: int) -> Measure:
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n = bs * world * steps
    g = torch.Generator().manual_seed(0)
    dls = DataLoaders.from_tensors(torch.randn(n, width, generator=g), torch.randn(n, width, generator=g), bs=bs)
    measure = Measure()
    learn = Learner(make_model(width, depth), dls, F.mse_loss, opt_func=torch.optim.AdamW, lr=1e-4, progress=False,
                    cbs=[*cbs, measure])
    learn.fit(1)
    return measure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=5)  # 5 x (2048 x 2048 + 2048) = 21.0 M parameters
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--bs", type=int, default=16)
    args = parser.parse_args()
    n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    results = {"DDP": run([], args.width, args.depth, args.steps, args.bs),
               "FSDP": run([FSDP(modules=nn.Linear)], args.width, args.depth, args.steps, args.bs)}
    if int(os.environ.get("RANK", "0")) == 0:
        world = os.environ.get("WORLD_SIZE", "1")
        print(f"{n_params / 1e6:.1f} M parameters, AdamW, {world} processes x bs {args.bs}, {torch.__version__}, "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}; per rank (rank 0), MB:")
        print(f"| {'':16} | {'DDP':>8} | {'FSDP':>8} | {'FSDP/DDP':>8} |")
        print(f"|{'-' * 18}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
        ddp, fsdp = results["DDP"].bytes, results["FSDP"].bytes
        for key in [*ddp, "total"]:
            a = sum(ddp.values()) if key == "total" else ddp[key]
            b = sum(fsdp.values()) if key == "total" else fsdp[key]
            print(f"| {key:16} | {a / 2**20:8.1f} | {b / 2**20:8.1f} | {b / a:8.2f} |")
        times = {name: statistics.median(m.times[1:]) for name, m in results.items()}  # the first step warms up
        print(f"step time (median of {args.steps - 1}): DDP {times['DDP'] * 1e3:.0f} ms, FSDP "
              f"{times['FSDP'] * 1e3:.0f} ms, FSDP/DDP {times['FSDP'] / times['DDP']:.2f}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo may abort at interpreter exit after its group is destroyed (torch 2.13): skip that teardown


if __name__ == "__main__":
    main()
