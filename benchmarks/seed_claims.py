"""Seed 003's two claims, measured at CPU scale: checkpoint averaging (Popel & Bojar) and LEGW (You et al.).

1. Checkpoint averaging: "averaging the last N checkpoints almost always helps". The byte-level Transformer of
   `examples/lm.py` (its model, data and loss, imported) is trained by steps with a linear warmup and then either
   cosine decay to 0 (the example's schedule) or a constant lr (closer to Popel & Bojar's slowly decaying
   inverse-square-root schedule, where averaging stands in for the annealing). `Checkpoint(every_n_steps=steps/40,
   keep_last=10)` keeps the last quarter of the run; held-out bits per byte of the last weights vs `average_last`
   of the last 2, 5, 10 checkpoints, per seed, then mean ± std over the seeds.
2. LEGW: "with batch ×k, scale the lr by √k and the warmup (in epochs) by k". scikit-learn's digits (shipped, no
   download; a fixed 80/20 split), an MLP 64-128-128-10, AdamW, `fit_warmup_cos`, the same number of epochs for
   every batch size. The small batch's lr is tuned by a sweep on other seeds than the ones reported; batch ×4 and ×8
   then get (a) the same lr and warmup in epochs, (b) linear scaling (lr × k, same warmup in epochs), (c) LEGW
   (`scale_for_batch(rule="sqrt", unit="steps")`: lr × √k, the same warmup in steps = k× the epochs).
   Final validation loss and accuracy, mean ± std over the seeds.

Numbers are printed, never asserted: a claim that does not hold at this scale is a result too. One torch thread
(the machine is shared). `--quick` is a short version (fewer steps, one seed, a smaller sweep).

    python benchmarks/seed_claims.py [--quick] [--part all|averaging|legw]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
from looplab import Checkpoint, DataLoaders, GradientClip, Learner, ParamScheduler, average_last  # noqa: E402
from looplab.data import TensorLoader  # noqa: E402
from looplab.metrics import accuracy  # noqa: E402
from looplab.repro import set_seed  # noqa: E402
from looplab.schedules import combine_scheds, scale_for_batch, sched_const, sched_lin  # noqa: E402
from lm import ByteTransformer, bits_per_byte, next_byte_loss, spread, stdlib_bytes, windows  # noqa: E402


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


# ---- 1. checkpoint averaging on the language model ------------------------------------------------------------
AVERAGE_OVER = (1, 2, 5, 10)


def warmup_constant(lr: float, warmup: float):
    """lr/100 -> lr linearly over the fraction `warmup` of the fit, then constant."""
    return combine_scheds([warmup, 1 - warmup], [functools.partial(sched_lin, lr / 100, lr),
                                                 functools.partial(sched_const, lr, lr)])


def averaging_run(seed: int, schedule: str, steps: int, lm: dict, data: tuple,
                  folder: Path) -> tuple[float, dict[int, float]]:
    """Train the LM for `steps` with `schedule` ("cosine" or "constant"). Returns the held-out bits per byte of the
    last weights (the fit's final validation) and of the average of the last n checkpoints for each n in
    AVERAGE_OVER (n = 1 is the checkpoint of the last step: the last weights again, read back from the file)."""
    x, y, xv, yv = data
    every = steps // 40
    dls = DataLoaders(TensorLoader(x, y, bs=lm["bs"], shuffle=True, seed=seed, drop_last=True),
                      TensorLoader(xv, yv, bs=4 * lm["bs"]))
    set_seed(seed)
    model = ByteTransformer(lm["ctx"], lm["dim"], lm["layers"], lm["heads"])
    learn = Learner(model, dls, next_byte_loss, opt_func=torch.optim.AdamW, lr=lm["lr"], metrics=bits_per_byte,
                    cbs=[GradientClip(1.0), Checkpoint(folder, every_n_steps=every, every_epoch=False, keep_last=10)],
                    progress=False)
    warmup_steps = steps // 10
    if schedule == "cosine":
        learn.fit_warmup_cos(lr=lm["lr"], warmup_steps=warmup_steps, steps=steps)
    else:
        learn.fit(steps=steps, cbs=[ParamScheduler({"lr": warmup_constant(lm["lr"], warmup_steps / steps)})])
    last = learn.recorder.history[-1]["bits_per_byte"]
    averaged = {}
    for n in AVERAGE_OVER:
        average_last(folder, n, learn.model)
        averaged[n] = learn.validate()["bits_per_byte"]
    return last, averaged


def averaging_claim(seeds: list[int], steps: int, lm: dict,
                    valid_bytes: int) -> dict[str, list[tuple[float, dict[int, float]]]]:
    """Per schedule, one `averaging_run` result per seed; prints each as it comes."""
    train_text, held_out_text, *_ = stdlib_bytes()
    x, y = windows(train_text, lm["ctx"])
    xv, yv = spread(*windows(held_out_text, lm["ctx"]), valid_bytes // lm["ctx"])
    print(f"LM: {lm['layers']} layers, {lm['dim']} wide, context {lm['ctx']}, {lm['bs']} windows a step, lr "
          f"{lm['lr']:g}, {steps} steps (warmup {steps // 10}), a checkpoint every {steps // 40} steps, the last 10 "
          f"kept; held-out bits per byte on {yv.numel():,} bytes")
    results: dict[str, list[tuple[float, dict[int, float]]]] = {"cosine": [], "constant": []}
    for seed in seeds:
        for schedule in results:
            start = time.monotonic()
            with tempfile.TemporaryDirectory() as folder:
                last, averaged = averaging_run(seed, schedule, steps, lm, (x, y, xv, yv), Path(folder))
            results[schedule].append((last, averaged))
            print(f"  seed {seed}, {schedule:8s}: last weights {last:.4f}; average of the last "
                  + ", ".join(f"{n}: {v:.4f}" for n, v in averaged.items())
                  + f"   ({time.monotonic() - start:.0f} s)", flush=True)
    return results


def print_averaging(results: dict[str, list[tuple[float, dict[int, float]]]]) -> None:
    n_seeds = len(next(iter(results.values())))
    print(f"\nheld-out bits per byte, mean ± std over {n_seeds} seed(s) (lower is better); Δ = averaged - last, per seed")
    rows = []
    for schedule, runs in results.items():
        row = [schedule, mean_std([last for last, _ in runs])]
        for n in AVERAGE_OVER[1:]:
            deltas = [averaged[n] - last for last, averaged in runs]
            better = sum(d < 0 for d in deltas)
            row.append(f"{mean_std([averaged[n] for _, averaged in runs])} "
                       f"(Δ {statistics.mean(deltas):+.3f}, better {better}/{len(runs)})")
        rows.append(row)
    print_table(["schedule", "last weights", *(f"average of last {n}" for n in AVERAGE_OVER[1:])], rows)


# ---- 2. LEGW on digits -----------------------------------------------------------------------------------------
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], a fixed 80/20 split (the same for every seed)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    train, valid = order[:n_train], order[n_train:]
    return x[train], y[train], x[valid], y[valid]


def digits_run(seed: int, bs: int, lr: float, warmup_steps: int, epochs: int, data: tuple) -> tuple[float, float]:
    """Final (valid_loss, accuracy) of an MLP trained `epochs` epochs at batch `bs`, AdamW, warmup + cosine."""
    x, y, xv, yv = data
    dls = DataLoaders(TensorLoader(x, y, bs=bs, shuffle=True, seed=seed, drop_last=True), TensorLoader(xv, yv, bs=512))
    set_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    learn = Learner(model, dls, nn.functional.cross_entropy, lr=lr, metrics=accuracy, progress=False)
    n_steps = epochs * len(dls.train)
    learn.fit_warmup_cos(epochs, lr=lr, warmup_steps=warmup_steps, valid_every=n_steps)  # validate at the end only
    row = learn.recorder.history[-1]
    return row["valid_loss"], row["accuracy"]


def legw_claim(seeds: list[int], tune_seeds: list[int], base_bs: int, lrs: list[float], epochs: int,
               warmup_epochs: float, ks: tuple[int, ...]) -> list[tuple[str, list[float], list[float]]]:
    """Tune the small batch's lr on `tune_seeds`, then run every condition on `seeds`; prints as it goes."""
    data = digits()
    steps_per_epoch = len(data[1]) // base_bs
    base_warmup = round(warmup_epochs * steps_per_epoch)
    print(f"digits: {len(data[1])} training images, {len(data[3])} held out; MLP 64-128-128-10, AdamW, "
          f"{epochs} epochs, warmup {warmup_epochs:g} epoch(s) at batch {base_bs} ({base_warmup} steps) then cosine")
    sweep = {}
    for lr in lrs:
        sweep[lr] = [digits_run(s, base_bs, lr, base_warmup, epochs, data)[0] for s in tune_seeds]
    base_lr = min(sweep, key=lambda lr: statistics.mean(sweep[lr]))
    print(f"lr sweep at batch {base_bs} (seeds {tune_seeds}, valid loss): "
          + ", ".join(f"{lr:g}: {statistics.mean(v):.3f}" for lr, v in sweep.items()) + f" -> lr {base_lr:g}")

    conditions = [(f"batch {base_bs}, tuned lr {base_lr:g}", base_bs, base_lr, base_warmup)]
    for k in ks:
        bs = k * base_bs
        same_epochs_warmup = round(base_warmup / k)  # the same warmup in epochs: 1/k the steps
        lin_lr, lin_warmup = scale_for_batch(base_lr, base_warmup, base_bs, bs, rule="linear", unit="steps")
        sqrt_lr, sqrt_warmup = scale_for_batch(base_lr, base_warmup, base_bs, bs, rule="sqrt", unit="steps")
        conditions += [(f"batch ×{k}, (a) same lr {base_lr:g}", bs, base_lr, same_epochs_warmup),
                       (f"batch ×{k}, (b) linear: lr {lin_lr:g}", bs, lin_lr, lin_warmup),
                       (f"batch ×{k}, (c) LEGW: lr {sqrt_lr:.3g}, warmup ×{k}", bs, sqrt_lr, sqrt_warmup)]
    results = []
    for name, bs, lr, warmup in conditions:
        steps = epochs * (len(data[1]) // bs)
        runs = [digits_run(s, bs, lr, warmup, epochs, data) for s in seeds]
        results.append((f"{name} ({warmup}/{steps} warmup steps)", [r[0] for r in runs], [r[1] for r in runs]))
        print(f"  {results[-1][0]}: valid loss {mean_std(results[-1][1])}, accuracy {mean_std(results[-1][2])}",
              flush=True)
    return results


def print_legw(results: list[tuple[str, list[float], list[float]]]) -> None:
    print(f"\nfinal validation loss and accuracy, mean ± std over {len(results[0][1])} seed(s)")
    print_table(["condition", "valid loss", "accuracy"], [[n, mean_std(lo), mean_std(a)] for n, lo, a in results])


# ---- the run ---------------------------------------------------------------------------------------------------
LM = {"layers": 2, "dim": 128, "heads": 4, "ctx": 64, "bs": 64, "lr": 3e-3}  # examples/lm.py's defaults


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one seed, a smaller sweep")
    parser.add_argument("--part", choices=("all", "averaging", "legw"), default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.monotonic()
    if args.part in ("all", "averaging"):
        print("== 1. checkpoint averaging (Popel & Bojar) ==")
        if args.quick:
            results = averaging_claim([0], steps=120, lm=LM, valid_bytes=2 ** 15)
        else:
            results = averaging_claim([0, 1, 2], steps=320, lm=LM, valid_bytes=2 ** 17)
        print_averaging(results)
    if args.part in ("all", "legw"):
        print("\n== 2. LEGW (You et al.): batch ×k, lr ×√k, warmup ×k ==")
        if args.quick:
            results = legw_claim([0], [100], base_bs=16, lrs=[1e-3, 3e-3], epochs=10, warmup_epochs=0.5,
                                 ks=(4, 8))
        else:
            results = legw_claim([0, 1, 2], [100, 101, 102], base_bs=16, lrs=[3e-4, 1e-3, 3e-3, 1e-2], epochs=20,
                                 warmup_epochs=1, ks=(4, 8))
        print_legw(results)
    print(f"\ntotal {(time.monotonic() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
