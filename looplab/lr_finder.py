"""The LR range test (Smith 2015): pure suggestion rules, the LRFinder callback, LRFindResult and `lr_find`.

`lr_find` runs a short trial fit with the lr growing geometrically, then puts back everything the trial touched —
weights, train/eval modes, gradients, optimizer state and lrs, the state of every callback that took part (those
with `during_lr_find = False` sit it out untouched), the loaders' position, the loop state and the python / numpy /
torch / CUDA RNG states — so a fit after it is bit-identical to the same fit on a fresh Learner (fastai restores
only weights and optimizer; its users see lr_find change later results, fastai #3013).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .callback import Callback, CancelFit, CancelValidate
from .callbacks.order import Order
from .checks import check_int, check_number
from .repro import get_rng_state, set_rng_state
from .schedules import group_ratios
from .util import unwrap_model

__all__ = ["minimum", "steep", "valley", "slide", "SUGGESTIONS", "LRFinder", "LRFindResult", "lr_find"]


# ---- suggestion rules: (lrs, losses) -> lr ----------------------------------------------------------------------
def _finite_prefix(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate and cut the curve at its first non-finite loss (the divergence that stopped the test)."""
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if lrs.ndim != 1 or lrs.shape != losses.shape:
        raise ValueError(f"lrs and losses must be 1-d and of equal length, got {lrs.shape} and {losses.shape}")
    if not (np.all(np.isfinite(lrs)) and np.all(lrs > 0) and np.all(np.diff(lrs) > 0)):
        raise ValueError(f"lrs must be positive, finite and increasing, got {lrs.tolist()!r}")
    bad = np.flatnonzero(~np.isfinite(losses))
    n = int(bad[0]) if len(bad) else len(losses)
    if n < 2:
        raise ValueError(f"need at least 2 finite losses at the start of the curve, got {losses.tolist()!r}")
    return lrs[:n], losses[:n]


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr at the lowest loss, divided by 10 (the loss is lowest just before it blows up: stay well below)."""
    lrs, losses = _finite_prefix(lrs, losses)
    return float(lrs[int(np.argmin(losses))] / 10)


def _slopes(lrs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """`d loss / d log(lr)` of each segment k -> k+1."""
    return np.diff(losses) / np.diff(np.log(lrs))


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the loss falls fastest: the start of the segment with the most negative `d loss / d log(lr)`.

    On a geometric lr sweep log(lr) is proportional to the step, so this is where training progressed fastest.
    """
    lrs, losses = _finite_prefix(lrs, losses)
    return float(lrs[int(np.argmin(_slopes(lrs, losses)))])


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The middle, on the log-lr axis, of the longest descending stretch at or before the minimum.

    A descending stretch is a run of consecutive points `a..b` with `losses[k+1] < losses[k]`, `b <= argmin`;
    of equally long ones the last (nearest the minimum) wins. Returns `sqrt(lrs[a] * lrs[b])`: far enough from
    the minimum to be safe, well inside the region where larger lrs still helped. (fastai's `valley` uses the
    longest decreasing subsequence instead, which tolerates noise but may skip bumps.)
    """
    lrs, losses = _finite_prefix(lrs, losses)
    end = int(np.argmin(losses))
    best, start = (0, 0), 0
    for k in range(1, end + 1):
        if losses[k] >= losses[k - 1]:
            start = k
        if k - start >= best[1] - best[0]:
            best = (start, k)
    a, b = best
    return float(math.sqrt(lrs[a] * lrs[b]))


def slide(lrs: Sequence[float], losses: Sequence[float], lr_diff: int = 15, thresh: float = 0.005) -> float:
    """Interval slide rule (as fastai's `slide`): a window `lr_diff` points wide starts at the end of the curve and
    slides left while the loss gradients (per step, `np.gradient`) at its two ends differ by more than `thresh`;
    the suggestion is the lr at the window's left end in its last position that still differed (the start of the
    region where the curve stops being calm). A window that never differs gives the left end of the first window.
    """
    lrs, losses = _finite_prefix(lrs, losses)
    grad = np.gradient(losses)
    lr_diff = min(int(lr_diff), len(losses) - 1)
    right, left = len(losses) - 1, len(losses) - 1 - lr_diff
    suggestion = lrs[left]
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        suggestion = lrs[left]
        right, left = right - 1, left - 1
    return float(suggestion)


SUGGESTIONS = {"valley": valley, "steep": steep, "minimum": minimum, "slide": slide}


# ---- the callback ------------------------------------------------------------------------------------------------
class LRFinder(Callback):
    """Sets the lr of training step i to `start_lr * (end_lr / start_lr) ** (i / num_it)` (the last param group's;
    the others keep their ratio, see `group_ratios`), records losses, stops after `num_it` steps or on
    divergence, skips validation.

    Reads each loss on the host (one sync per step): deciding when to stop needs the value.
    """
    order = Order.TRACKERS  # sees the loss the Recorder records; its before_validate ran before we cancel

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, stop_div: bool = True,
                 beta: float = 0.98):
        self.start_lr, self.end_lr, self.num_it, self.stop_div, self.beta = start_lr, end_lr, num_it, stop_div, beta

    def before_fit(self):
        self.ratios = group_ratios([g["lr"] for g in self.learn.opt.param_groups])
        self.lrs, self.raw_losses, self.losses = [], [], []
        self._avg, self._best = 0.0, math.inf

    def before_batch(self):
        learn = self.learn
        if learn.training:
            self._lr = self.start_lr * (self.end_lr / self.start_lr) ** (learn.train_iter / self.num_it)
            for group, ratio in zip(learn.opt.param_groups, self.ratios):
                group["lr"] = self._lr * ratio

    def after_loss(self):
        if not self.learn.training:
            return
        loss = float(self.learn.loss.detach())
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** (len(self.losses) + 1))
        self.lrs.append(self._lr)
        self.raw_losses.append(loss)
        self.losses.append(smooth)
        self._best = min(self._best, smooth)

    def after_batch(self):
        if not self.learn.training:
            return
        smooth = self.losses[-1]
        diverged = self.stop_div and (not math.isfinite(smooth) or smooth > 4 * self._best)
        if len(self.losses) >= self.num_it or diverged:
            raise CancelFit()

    def before_validate(self):
        raise CancelValidate()


# ---- the result --------------------------------------------------------------------------------------------------
@dataclass
class LRFindResult:
    """What `lr_find` measured: `lrs`, smoothed `losses`, `raw_losses`, and `suggestions` (rule name -> lr)."""
    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)

    def plot(self, skip_end: int = 0):
        """Smoothed loss vs lr (log axis) with each suggestion marked, as a matplotlib Figure."""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        n = len(self.lrs) - skip_end
        ax.plot(self.lrs[:n], self.losses[:n], label="loss (smoothed)")
        ax.set_xscale("log")
        for (name, lr), marker in zip(self.suggestions.items(), "ovs^Dp"):
            ax.plot([lr], [float(np.interp(math.log(lr), np.log(self.lrs), self.losses))], marker, ls="",
                    label=f"{name}: {lr:.2e}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.legend()
        plt.close(fig)
        return fig


# ---- lr_find: a trial fit that leaves no trace ---------------------------------------------------------------------
_MISSING = object()


def _to_cpu(obj):
    """A copy of `obj` (nested dicts / lists / tuples) with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _check_lr_find_args(start_lr, end_lr, num_it) -> None:
    check_number("start_lr", start_lr, 0, low_open=True)
    check_number("end_lr", end_lr, 0, low_open=True)
    if end_lr <= start_lr:
        raise ValueError(f"end_lr must be larger than start_lr, got start_lr={start_lr!r}, end_lr={end_lr!r}")
    check_int("num_it", num_it, 2)


def lr_find(learn, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
            stop_div: bool = True) -> LRFindResult:
    """LR range test: train up to `num_it` steps with the lr growing geometrically from `start_lr` towards
    `end_lr`, then restore everything as it was. Stops early (with `stop_div`) when the smoothed loss exceeds 4x
    its minimum or is not finite. Callbacks with `during_lr_find = False` sit the trial out.
    """
    _check_lr_find_args(start_lr, end_lr, num_it)
    model = unwrap_model(learn.model)
    cbs = list(learn.cbs)
    trial_cbs = [cb for cb in cbs if cb.during_lr_find]
    # Undo, not resume: a snapshot on the CPU (no second copy on the accelerator), put back as it was. Callbacks
    # that sit the trial out are not touched at all; those in it get their own state back.
    saved = {
        "weights": _to_cpu(model.state_dict()),
        # every buffer by module and name: non-persistent ones are not in the state dict; one replaced is set back
        "buffers": [(model.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], b, _to_cpu(b))
                    for path, b in model.named_buffers()],
        "modes": [(m, m.training) for m in model.modules()],
        "grads": [(p, None if p.grad is None else _to_cpu(p.grad)) for p in model.parameters()],
        "opt": _to_cpu(learn.opt.state_dict()),
        "cb_states": [(cb, _to_cpu(cb.state_dict())) for cb in trial_cbs],
        "last_validation": copy.deepcopy(learn.recorder.last_validation),
        "dls": copy.deepcopy(learn.dls.state_dict()),
        "loop": {k: getattr(learn, k, _MISSING) for k in learn.LOOP_STATE},
        "rng": get_rng_state(),
    }
    finder = LRFinder(start_lr, end_lr, num_it, stop_div)
    n_train = len(learn.dls.train) if hasattr(learn.dls.train, "__len__") else 0
    n_epochs = math.ceil(num_it / n_train) + 1 if n_train else num_it  # enough epochs; the finder stops the fit
    try:
        learn.remove_cbs([cb for cb in cbs if not cb.during_lr_find])
        learn.fit(n_epochs, lr=learn.lr, cbs=[finder])
    finally:
        learn.remove_cbs(list(learn.cbs))
        learn.add_cbs(cbs)  # the same callbacks, in the same order
        for k, v in saved["loop"].items():
            if v is _MISSING:
                learn.__dict__.pop(k, None)
            else:
                setattr(learn, k, v)
        model.load_state_dict(saved["weights"])
        with torch.no_grad():
            for module, name, buffer, value in saved["buffers"]:
                if getattr(module, name) is buffer:
                    buffer.copy_(value)  # in place: whoever holds the buffer (EMA, a hook) sees it restored
                else:
                    setattr(module, name, value.to(buffer.device))
        for m, mode in saved["modes"]:
            m.training = mode
        for p, g in saved["grads"]:
            p.grad = None if g is None else g.to(p.device)
        learn.opt.load_state_dict(saved["opt"])
        for cb, state in saved["cb_states"]:
            cb.load_state_dict(state)
        learn.recorder.last_validation = saved["last_validation"]
        learn.dls.load_state_dict(saved["dls"])
        set_rng_state(saved["rng"])
    lrs, losses = finder.lrs, finder.losses
    suggestions = {}
    if len(losses) >= 2 and math.isfinite(losses[0]) and math.isfinite(losses[1]):
        suggestions = {name: rule(lrs, losses) for name, rule in SUGGESTIONS.items()}
    return LRFindResult(list(lrs), list(losses), list(finder.raw_losses), suggestions)
