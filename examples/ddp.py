"""Data-parallel training on scikit-learn's bundled digits: the same script alone or under torchrun, unchanged.

    python examples/ddp.py                                              # one process
    torchrun --standalone --nproc_per_node=2 examples/ddp.py            # two processes (CPU: gloo; GPUs: nccl)
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 examples/ddp.py --resume   # survives a crash

Under torchrun the Learner sees WORLD_SIZE > 1 and trains through `looplab.callbacks.distributed.
DistributedDataParallel`. `--global-bs` is the batch of one optimizer step over all processes: each process loads
`global_bs / world_size` of it, so the run follows the same steps whatever the number of processes (the weights
agree up to float rounding). Only rank 0 prints and writes (checkpoints every epoch, the final weights).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from looplab import DataLoaders, Learner
from looplab.callbacks.checkpoint import Checkpoint
from looplab.metrics import accuracy
from looplab.util import is_main_process


def digits_dls(bs: int, seed: int = 0) -> DataLoaders:
    """The digits as flat 64-pixel vectors in [0, 1], split 80/20 by `seed`."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=bs, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--global-bs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--out", default="runs/ddp")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if args.global_bs % world_size:
        raise SystemExit(f"--global-bs {args.global_bs} is not divisible by {world_size} processes")
    ckpt_dir = Path(args.out) / "checkpoints"

    t0 = time.perf_counter()
    torch.manual_seed(0)  # every rank builds the same model (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    learn = Learner(model, digits_dls(bs=args.global_bs // world_size), F.cross_entropy,
                    opt_func=torch.optim.SGD, lr=args.lr, metrics=[accuracy],
                    cbs=[Checkpoint(ckpt_dir, keep_last=2)])
    resume = args.resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("ckpt-*.pt"))
    learn.fit(args.epochs, resume_from=ckpt_dir if resume else None)

    if is_main_process():  # rank 0 reports and saves
        learn.save(Path(args.out) / "final.pt")
        final = learn.recorder.history[-1]
        print(f"{world_size} process(es) x bs {args.global_bs // world_size}: valid_loss {final['valid_loss']:.4f}, "
              f"accuracy {final['accuracy']:.4f}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torch 2.13 + gloo may abort at interpreter exit after the
        sys.stdout.flush()                            # group is destroyed: flush, then skip that teardown
        sys.stderr.flush()
        os._exit(0)
