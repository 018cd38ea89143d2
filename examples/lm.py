"""Train a byte-level causal Transformer on the Python standard library's own source, by steps, on a time budget.

The corpus is the top-level `*.py` files of `sysconfig.get_paths()["stdlib"]` (shipped with every Python: no
download), split by file: every tenth file is held out. The model is plain torch (token and position embeddings,
pre-LN blocks of causal self-attention and an MLP, a head tied to the embedding unless `--untied`), trained with
AdamW, a linear warmup then cosine decay over exactly the fit's steps (`fit_warmup_cos(steps=, warmup_steps=)`),
gradient clipping, validation on the held-out windows every `--valid-every` steps (`fit(..., valid_every=K)`; by
default four times: every ceil(steps / 4) steps, the last at the end), a checkpoint every few minutes of
wall-clock time (and at the last step), and TensorBoard logs (`train_loss` every step; `valid_loss` in nats and
`bits_per_byte` at each validation's step). At the end it prints the held-out bits per byte of the last weights (the fit's last
validation) and of the average of the last `--average` checkpoints (`average_last`), next to gzip -9 and xz -9e on
the whole held-out text. The model reads non-overlapping windows of `--ctx` bytes; by default it is evaluated on
128 KiB of them spread evenly over the held-out text (an estimate, cheap on a CPU); `--valid-bytes 0` evaluates
every window.

The time budget (`--minutes`): a short timing probe (a hand-written training step on a copy of the model, and a
validation batch) sets the number of steps so that the whole run, the validations during the fit and the final
evaluation of the averaged weights included, takes about that long; the
schedule then runs to its end. If the machine slows down so much that the fit overruns its share of the budget by
10% (+10 s), a callback stops it there (CancelFit) with a warning, and the schedule is cut short. `--steps N`
trains exactly N steps instead. The probe's step time, against the Learner's median step time, is printed as
the share of each step spent outside the model's own work (looplab's loop and the callbacks).

Writes under `--out` (default runs/lm): `tensorboard/`, `checkpoints/` (both replaced on each run), `loss.png`
(training loss per step, validation loss at its steps).

    python examples/lm.py [--minutes 3 | --steps N] [--valid-every K] [--out runs/lm] [--seed 0] [--layers 2 --dim 128 --ctx 64 --bs 64 ...]
"""
from __future__ import annotations

import argparse
import copy
import gzip
import lzma
import math
import shutil
import statistics
import sysconfig
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from looplab import (
    Callback,
    CancelFit,
    Checkpoint,
    DataLoaders,
    GradientClip,
    Learner,
    TensorBoard,
    average_last,
)
from looplab.data import TensorLoader
from looplab.repro import set_seed

VOCAB = 256  # bytes


# ---- data ------------------------------------------------------------------------------------------------------
def stdlib_bytes() -> tuple[bytes, bytes, int, int]:
    """The top-level stdlib modules' source, split by file: every tenth file (sorted by name) is held out.
    Returns `(train, held_out, n_train_files, n_held_out_files)`."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = files[::10]
    train = [f for f in files if f not in held_out]
    return (b"".join(f.read_bytes() for f in train), b"".join(f.read_bytes() for f in held_out),
            len(train), len(held_out))


def windows(data: bytes, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `ctx` input bytes and their next bytes: views of one tensor, no copies."""
    stream = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = (len(stream) - 1) // ctx
    return stream[:n * ctx].view(n, ctx), stream[1:n * ctx + 1].view(n, ctx)


def spread(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows evenly spaced over all of them (all for None), so a cheap evaluation still sees every file."""
    if n is None or n >= len(x):
        return x, y
    keep = torch.linspace(0, len(x) - 1, n).round().long()
    return x[keep], y[keep]


# ---- model -----------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteTransformer(nn.Module):
    """Bytes (batch, time) -> next-byte logits (batch, time, 256)."""

    def __init__(self, ctx: int, dim: int, n_layers: int, n_heads: int, tied: bool = True):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.Sequential(*[Block(dim, n_heads) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = None if tied else nn.Linear(dim, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init: small normal weights, residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[:idx.shape[1]]
        x = self.norm(self.blocks(x))
        return x @ self.tok.weight.T if self.head is None else self.head(x)


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per predicted byte, in nats (bits per byte = loss / ln 2)."""
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The validation metric: mean cross-entropy per predicted byte, in bits."""
    return next_byte_loss(logits, targets) / math.log(2)


# ---- timing ----------------------------------------------------------------------------------------------------
def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, eval_bs: int, lr: float, clip: float,
          n_steps: int, n_warm: int = 2) -> tuple[float, float]:
    """Median seconds of a hand-written training step (forward, loss, backward, clip, AdamW step, zero_grad) on a
    copy of `model`, over the first batches of `x, y`; and of a forward pass of one validation-sized batch."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times = []
    for i in range(n_warm + n_steps):
        j = i * bs % max(len(x) - bs, 1)
        xb, yb = x[j:j + bs], y[j:j + bs]
        start = time.perf_counter()
        loss = next_byte_loss(model(xb), yb)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    model.eval()
    eval_times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            next_byte_loss(model(x[:eval_bs]), y[:eval_bs])
            eval_times.append(time.perf_counter() - start)
    return statistics.median(times[n_warm:]), statistics.median(eval_times)


class StepTimer(Callback):
    """Wall-clock time between consecutive training batches' ends (`durations`, seconds): the whole step as the
    loop runs it, callbacks included. Costs one clock read per batch."""

    def before_fit(self):
        self.durations, self._last = [], None

    def before_train(self):
        self._last = time.perf_counter()

    def after_validate(self):  # a validation mid-epoch (`valid_every`) is not part of the next step
        self._last = time.perf_counter()

    def after_batch(self):
        if self.learn.training:
            now = time.perf_counter()
            self.durations.append(now - self._last)
            self._last = now


class StopAt(Callback):
    """Stop the fit (CancelFit) after the first training batch that ends past `deadline` (a `time.monotonic()`)."""

    def __init__(self, deadline: float):
        self.deadline, self.stopped_at = deadline, None

    def after_batch(self):
        if self.learn.training and time.monotonic() > self.deadline:
            self.stopped_at = self.learn.train_iter + 1
            raise CancelFit()


# ---- the run ---------------------------------------------------------------------------------------------------
def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)


def default_valid_every(steps: int) -> int:
    """Four validations in a fit of `steps` (at most): at K, 2K, 3K and the last step, K = ceil(steps / 4); K =
    steps // 4 would add a fifth a few steps after the fourth when 4 does not divide `steps`."""
    return max(1, -(-steps // 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None,
                        help="time budget of the whole run, evaluation included (default 3): steps come from a "
                             "timing probe")
    budget.add_argument("--steps", type=int, default=None, help="train exactly this many steps (no time budget)")
    parser.add_argument("--out", default="runs/lm", help="TensorBoard logs, checkpoints, loss.png (default runs/lm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=64, help="context in bytes")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--untied", action="store_true", help="a separate output head (default: tied to the "
                                                              "token embedding)")
    parser.add_argument("--bs", type=int, default=64, help="training windows per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup, a fraction of the steps")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping, max global norm")
    parser.add_argument("--valid-every", type=int, default=None,
                        help="validate every K training steps, and at the end (default: ceil(steps / 4), so 4 "
                             "validations)")
    parser.add_argument("--average", type=int, default=3, help="average the last N checkpoints")
    parser.add_argument("--checkpoints", type=int, default=10,
                        help="about how many timed checkpoints the run writes (every planned-time / N minutes)")
    parser.add_argument("--valid-bytes", type=int, default=2 ** 17,
                        help="evaluate on about N held-out bytes: windows evenly spaced over all held-out files "
                             "(default 131072; 0: all of them, ~15 s an evaluation for the default model on one core)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the faster of 1 and torch's default in the probe; on a "
                             "shared machine one thread can be several times faster than two)")
    args = parser.parse_args()
    minutes = 3.0 if args.steps is None and args.minutes is None else args.minutes
    t0 = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    for sub in ("tensorboard", "checkpoints"):  # this run's logs and checkpoints only: averaging reads the folder
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    train_text, held_out_text, n_train_files, n_held_out_files = stdlib_bytes()
    x, y = windows(train_text, args.ctx)
    xv, yv = spread(*windows(held_out_text, args.ctx), args.valid_bytes // args.ctx or None)
    eval_bs = 4 * args.bs
    valid_loader = TensorLoader(xv, yv, bs=eval_bs, shuffle=False)
    dls = DataLoaders(TensorLoader(x, y, bs=args.bs, shuffle=True, seed=args.seed, drop_last=True), valid_loader)
    print(f"stdlib: {n_train_files} training files ({len(train_text):,} bytes, {len(x):,} windows of {args.ctx}), "
          f"{n_held_out_files} held out ({len(held_out_text):,} bytes; the model is evaluated on {yv.numel():,} of them)")

    set_seed(args.seed)
    model = ByteTransformer(args.ctx, args.dim, args.layers, args.heads, tied=not args.untied)
    print(f"model: {args.layers} layers, {args.dim} wide, {args.heads} heads, context {args.ctx}, "
          f"{'untied' if args.untied else 'tied'} head, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{args.bs} windows per step")

    if args.threads is None and torch.get_num_threads() > 1:
        candidates = {}
        for n_threads in (1, torch.get_num_threads()):
            torch.set_num_threads(n_threads)
            candidates[n_threads] = probe(model, x, y, args.bs, eval_bs, args.lr, args.clip, n_steps=1, n_warm=1)[0]
        torch.set_num_threads(min(candidates, key=candidates.get))
        print("threads: " + ", ".join(f"{n}: {1e3 * s:.0f} ms a step" for n, s in candidates.items())
              + f" -> {torch.get_num_threads()}")
    hand_step, eval_batch = probe(model, x, y, args.bs, eval_bs, args.lr, args.clip, n_steps=8)
    eval_s = len(valid_loader) * eval_batch  # one pass over the held-out windows
    step_s = 1.15 * hand_step  # margin: a shared machine's step varies ±15%
    if args.steps is not None:
        steps = args.steps
    else:
        # the rest of the budget, less the final evaluation of the averaged weights and a margin for the loop,
        # checkpoints, plots, shared by the steps and the validations during the fit (each an eval_s): with
        # K = valid_every, steps·step + (steps / K + 1)·eval_s = budget; by default 4 of them
        budget_s = 60 * minutes - (time.monotonic() - t0) - eval_s - 5
        if args.valid_every is None:
            steps = int((budget_s - 4 * eval_s) / step_s)
        else:
            steps = int((budget_s - eval_s) / (step_s + eval_s / args.valid_every))
        steps = max(steps, 10)
    valid_every = args.valid_every or default_valid_every(steps)
    n_validations = steps // valid_every + (steps % valid_every != 0)
    fit_s = steps * step_s + n_validations * eval_s  # the fit's planned time, margin included
    warmup_steps = min(round(args.warmup * steps), steps - 1)
    print(f"probe: hand-written step {1e3 * hand_step:.0f} ms, validation batch {1e3 * eval_batch:.0f} ms -> "
          f"{steps} steps (warmup {warmup_steps}), validation every {valid_every} steps ({n_validations} of "
          f"{eval_s:.1f} s), about {fit_s / 60:.1f} min of fit")

    every_n_minutes = max(fit_s / 60 / args.checkpoints, 0.01)
    timer = StepTimer()
    cbs = [GradientClip(max_norm=args.clip), timer,
           TensorBoard(out / "tensorboard", flush_every=50, histograms=False),
           Checkpoint(out / "checkpoints", every_n_minutes=every_n_minutes, every_n_steps=steps, every_epoch=False,
                      keep_last=args.average)]
    stop = StopAt(time.monotonic() + 1.1 * fit_s + 10) if args.steps is None else None
    learn = Learner(model, dls, next_byte_loss, opt_func=torch.optim.AdamW, lr=args.lr, metrics=bits_per_byte,
                    cbs=cbs + ([stop] if stop else []))
    fit_start = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already holds.*")  # none: the folder was just emptied
        learn.fit_warmup_cos(lr=args.lr, warmup_steps=warmup_steps, steps=steps, valid_every=valid_every)
    fit_time = time.monotonic() - fit_start
    done = len(learn.recorder.losses)
    if stop is not None and stop.stopped_at is not None:
        print(f"WARNING: the fit overran its time budget and was stopped after {done} of {steps} steps "
              f"(the machine is slower than the probe measured); the schedule did not finish")

    losses = learn.recorder.losses
    k = max(1, min(10, done // 4))
    print(f"train loss (nats per byte): first {k} steps {statistics.mean(losses[:k]):.3f} -> "
          f"last {k} steps {statistics.mean(losses[-k:]):.3f}")
    loop_step = statistics.median(timer.durations)
    print(f"steps: {done} in {fit_time / 60:.2f} min; median step: looplab {1e3 * loop_step:.0f} ms, "
          f"hand-written (probe) {1e3 * hand_step:.0f} ms: loop and callbacks {100 * (1 - hand_step / loop_step):.0f}% "
          f"of the step")

    history = learn.recorder.history
    print("validations (bits per byte): " + ", ".join(
        f"step {row['train_iter']}: train {nats_to_bits(row['train_loss']):.3f} valid {row['bits_per_byte']:.3f}"
        for row in history))
    # the fit's last validation saw the last weights, unless the fit was stopped between two validations
    if history and history[-1]["train_iter"] == done:
        last = history[-1]["bits_per_byte"]
    else:
        last = learn.validate(valid_loader)["bits_per_byte"]
    n_ckpt = len(list((out / "checkpoints").glob("ckpt-*.pt")))
    n_avg = min(args.average, n_ckpt)
    if n_avg:
        average_last(out / "checkpoints", n_avg, learn.model)
        averaged = learn.validate(valid_loader)["bits_per_byte"]
    # the compressors get the whole held-out text (their context is everything before): sampled windows would
    # cut their context to the window, as the model's is, and flatter the model
    gzip_bpb = 8 * len(gzip.compress(held_out_text, 9)) / len(held_out_text)
    xz_bpb = 8 * len(lzma.compress(held_out_text, preset=9 | lzma.PRESET_EXTREME)) / len(held_out_text)

    learn.recorder.plot_loss().savefig(out / "loss.png", dpi=100)
    sample = "all of them" if yv.numel() >= len(held_out_text) - args.ctx else \
        f"model on {len(xv):,} windows of {args.ctx} spread over them"
    print(f"\nheld-out bits per byte ({len(held_out_text):,} bytes of {n_held_out_files} files never trained on; "
          f"{sample}):")
    print(f"  model, last weights               {last:.3f}")
    if n_avg:
        print(f"  model, average of last {n_avg} ckpts     {averaged:.3f}")
    print(f"  gzip -9                           {gzip_bpb:.3f}")
    print(f"  xz -9e                            {xz_bpb:.3f}")
    print(f"\nTensorBoard logs: {out / 'tensorboard'}   loss plot: {out / 'loss.png'}   "
          f"checkpoints: {out / 'checkpoints'}")
    print(f"wall time: {(time.monotonic() - t0) / 60:.2f} min")


if __name__ == "__main__":
    main()
