"""Train a small CNN on scikit-learn's bundled handwritten digits with looplab's headline features on.

1,797 real 8×8 digits ship inside scikit-learn (no download). A seeded 80/20 split, a one-cycle schedule,
bfloat16 autocast, gradient clipping, EMA weights, atomic checkpoints and
TensorBoard logs. Writes under `runs/digits/` (TensorBoard events, PNG plots, checkpoints), prints the epoch
table, the final accuracy and the wall time.

    python examples/digits.py [--epochs 12] [--out runs/digits]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from looplab import DataLoaders, Learner, TensorBoard
from looplab.callbacks import EMA, Checkpoint, GradientClip, MixedPrecision
from looplab.metrics import accuracy
from looplab.repro import set_seed


def digits_dls(bs: int = 64, seed: int = 0) -> DataLoaders:
    """The digits as (N, 1, 8, 8) float tensors in [0, 1], split 80/20 by `seed`."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=bs, seed=seed)


def digits_cnn() -> nn.Module:
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
    return nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2),  # 8x8 -> 4x4
                         block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/digits")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    set_seed(args.seed)
    ema = EMA(decay=0.99)
    learn = Learner(digits_cnn(), digits_dls(seed=args.seed), F.cross_entropy, lr=args.lr, metrics=[accuracy],
                    cbs=[MixedPrecision(torch.bfloat16), GradientClip(max_norm=1.0), ema,
                         TensorBoard(out / "tensorboard"), Checkpoint(out / "checkpoints", keep_last=2)])
    learn.fit_one_cycle(args.epochs, lr_max=args.lr)

    final = learn.validate()
    learn.model, trained = ema.ema_model, learn.model
    with_ema = learn.validate()
    learn.model = trained

    learn.recorder.plot_loss().savefig(out / "loss.png", dpi=100)
    learn.recorder.plot_lr().savefig(out / "lr.png", dpi=100)
    elapsed = time.perf_counter() - t0
    print(f"\nvalidation accuracy: {final['accuracy']:.4f} (EMA weights: {with_ema['accuracy']:.4f})")
    print(f"TensorBoard logs: {out / 'tensorboard'}   plots: {out / 'loss.png'}, {out / 'lr.png'}")
    print(f"wall time: {elapsed:.1f} s")


if __name__ == "__main__":
    main()
