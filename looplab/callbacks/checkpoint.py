"""Checkpoint: the complete training state, written atomically. Resume: continue from the very next batch.

A checkpoint holds everything the rest of a fit depends on: the model, the optimizer, every callback's
`state_dict()` (schedules, loss scaler, averages, Recorder history …), every PRNG state (of every rank), the
gradients when a step is mid-accumulation, the loop counters and the data loaders' position. Data loaders from
`looplab.data` start an epoch at any batch, so resuming jumps straight to the next batch without replaying the
ones before it, and the rest of the run is bit-identical to a run that was never interrupted.

Files are `ckpt-{steps:08d}.pt` (mid-epoch, after `steps` training batches) and `ckpt-{steps:08d}-epoch-{e}.pt`
(after epoch e); the newest is the one with the most steps, an epoch's end after its last step. Everything in them
is plain data: they load with `torch.load(weights_only=True)`, and loading never runs code.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import warnings
from pathlib import Path

import torch

from ..callback import Callback, CancelFit
from ..io import atomic_save, safe_load
from ..repro import get_rng_state, set_rng_state
from ..util import is_main_process, unwrap_model

__all__ = ["Checkpoint", "Resume", "checkpoint_files", "latest_checkpoint"]

FORMAT = "looplab-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d+)(-epoch-\d+)?\.pt$")


def _sort_key(path: Path) -> tuple[int, bool]:
    m = _NAME.match(path.name)
    return int(m[1]), m[2] is not None  # same step count: the epoch's end (after validation) is newer


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files in `folder`, oldest first ([] if there is no such folder; `*.tmp` leftovers of killed
    writes are not among them). `resume_from=folder if checkpoint_files(folder) else None` resumes when it can."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name) and p.is_file()), key=_sort_key)


def _remove_tmp(folder: Path) -> None:
    for tmp in folder.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rng_states_by_rank() -> list[dict]:
    """Every rank's RNG states, indexed by rank (a collective: every rank must call it at the same point)."""
    state = get_rng_state()
    if not _distributed():
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _named_callbacks(cbs) -> dict[str, Callback]:
    """Callbacks keyed by a name that is stable across runs: class name and index among that class, in list order."""
    seen: dict[str, int] = {}
    named = {}
    for cb in cbs:
        cls = type(cb).__name__
        named[f"{cls}_{seen.get(cls, 0)}"] = cb
        seen[cls] = seen.get(cls, 0) + 1
    return named


def training_state(learn, mid_epoch: bool, rng: list[dict]) -> dict:
    """The complete state of `learn` between two batches (`mid_epoch`) or after an epoch, as plain data.

    `loop` says where to continue: the epoch, the batch within it and the next `train_iter`.
    """
    model = unwrap_model(learn.model)
    data = learn.dls.state_dict()
    if mid_epoch:  # the train loader has already moved its counter to the next epoch: say where this one stands
        epoch, offset, train_iter = learn.epoch, learn.iter + 1, learn.train_iter + 1
        if "train" in data:
            data["train"] = {"epoch": epoch, "offset": offset}
    else:
        epoch, offset, train_iter = learn.epoch + 1, 0, learn.train_iter
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "opt": learn.opt.state_dict(),
        # the loop zeroes gradients after every step; they are non-zero here only mid-accumulation
        "grads": {name: p.grad for name, p in model.named_parameters() if p.grad is not None},
        "callbacks": {name: cb.state_dict() for name, cb in _named_callbacks(learn.cbs).items()},
        "rng": rng,
        "loop": {"epoch": epoch, "offset": offset, "train_iter": train_iter, "n_epochs": learn.n_epochs},
        "data": data,
    }


class Checkpoint(Callback):
    """Save the complete training state to `dir` every `every_n_steps` training batches and/or after every epoch.

    Keeps the newest `keep_last` files it wrote (None: all); older ones are deleted only once the new one is
    complete. SIGTERM or SIGINT during fit (preemption, a notebook interrupt) finishes the current step, writes a
    checkpoint and stops the fit cleanly; `stopped_by` then names the signal (a second signal acts at once).
    In a distributed run only rank 0 writes; every rank's RNG states are saved (callbacks' states are rank 0's: they
    agree across ranks, except the per-step training losses each rank's Recorder keeps), and the ranks agree to stop
    at the next scheduled checkpoint (`every_n_steps` or the epoch's end), so there is no extra sync per step.
    Resume with `learn.fit(..., resume_from=dir)`; use one folder per fit.
    """
    # After everything that updates state in after_batch / after_epoch (the Recorder 50, trackers 55, SWA 90), so a
    # checkpoint holds the finished step or epoch; before EarlyStopping (100), which stops in after_epoch.
    order = 95
    during_lr_find = False

    def __init__(self, dir: str | os.PathLike, every_n_steps: int | None = None, every_epoch: bool = True,
                 keep_last: int | None = 3):
        for name, v in (("every_n_steps", every_n_steps), ("keep_last", keep_last)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        self.dir, self.every_n_steps, self.every_epoch = Path(dir), every_n_steps, every_epoch
        self.keep_last = keep_last
        self.last_path: Path | None = None
        self.stopped_by: str | None = None
        self._signal: int | None = None
        self._previous_handlers: dict = {}

    # ---- signals -----------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # a second signal: the user insists (or the fit is gone) — act at once
            self._restore_handlers()
            signal.raise_signal(signum)
            return
        self._signal = signum

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _stop_requested(self, scheduled: bool) -> bool:
        """Did a stop signal come? Distributed: the ranks agree, at scheduled checkpoints only (no per-step sync)."""
        if not self._distributed:
            return self._signal is not None
        if not scheduled:
            return False
        flag = torch.tensor([int(self._signal is not None)], device=self.learn.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self._signal is None:
            self._signal = signal.SIGTERM  # another rank was signalled
        return stop

    # ---- events ------------------------------------------------------------------------------------------------
    def before_fit(self):
        learn = self.learn
        self._distributed, self._signal, self.stopped_by = _distributed(), None, None
        if self.every_n_steps and not hasattr(learn.dls.train, "load_state_dict"):
            warnings.warn(f"the training loader ({type(learn.dls.train).__name__}) cannot start an epoch mid-way: "
                          f"resuming from a mid-epoch checkpoint will restart that epoch")
        self._own: list[Path] = []
        if is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
            _remove_tmp(self.dir)
            existing = checkpoint_files(self.dir)
            resuming_here = any(isinstance(cb, Resume) and cb.folder.resolve() == self.dir.resolve()
                                for cb in learn.cbs)
            if resuming_here:
                self._own = existing  # the run being continued: rotate its files too
            elif existing:
                warnings.warn(f"{str(self.dir)!r} already holds {len(existing)} checkpoint(s) of another run "
                              f"(newest {existing[-1].name}); they are left alone, but resume_from this folder "
                              f"picks the newest by step count: use a fresh folder per run")
        self._restore_handlers()  # left installed by a fit that raised (its after_fit never ran)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def after_batch(self):
        learn = self.learn
        if not learn.training:
            return
        scheduled = self.every_n_steps is not None and (learn.train_iter + 1) % self.every_n_steps == 0
        stop = self._stop_requested(scheduled)
        if scheduled or stop:
            self._save(mid_epoch=True)
        if stop:
            self._stop()

    def after_epoch(self):
        stop = self._stop_requested(True)
        if self.every_epoch or stop:
            self._save(mid_epoch=False)
        if stop:
            self._stop()

    def after_cancel_fit(self):
        self._restore_handlers()

    def after_fit(self):
        self._restore_handlers()

    # ---- writing -----------------------------------------------------------------------------------------------
    def _save(self, mid_epoch: bool) -> None:
        learn = self.learn
        rng = _rng_states_by_rank()  # every rank takes part
        if not is_main_process():
            return
        state = training_state(learn, mid_epoch, rng)
        steps = state["loop"]["train_iter"]
        name = f"ckpt-{steps:08d}.pt" if mid_epoch else f"ckpt-{steps:08d}-epoch-{learn.epoch}.pt"
        self.last_path, self._last_loop = atomic_save(state, self.dir / name), state["loop"]
        self._own = [p for p in self._own if p != self.last_path] + [self.last_path]
        if self.keep_last is not None:  # the new file is complete: only now drop the oldest
            self._own.sort(key=_sort_key)
            for old in self._own[:-self.keep_last]:
                old.unlink(missing_ok=True)
            self._own = self._own[-self.keep_last:]

    def _stop(self) -> None:
        self.stopped_by = signal.Signals(self._signal).name
        if is_main_process():
            loop = self._last_loop
            print(f"{self.stopped_by}: stopped after {loop['train_iter']} steps (epoch {loop['epoch']}, batch "
                  f"{loop['offset']} next); saved {self.last_path}; continue with fit(..., resume_from="
                  f"{str(self.dir)!r})", flush=True)
        raise CancelFit()


def latest_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """Load the checkpoint at `path`, or the newest readable one in the folder `path` (skipping damaged ones).

    Returns `(file, state)`. A missing path raises FileNotFoundError; a file that is not a looplab checkpoint, or
    holds anything but plain data, raises ValueError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"resume_from: {str(path)!r} does not exist")
    if path.is_file():
        return path, _load(path)
    _remove_tmp(path)
    candidates = checkpoint_files(path)
    if not candidates:
        raise FileNotFoundError(f"resume_from: no checkpoint (ckpt-*.pt) in folder {str(path)!r}")
    for file in reversed(candidates):
        try:
            return file, _load(file)
        except ValueError as e:
            warnings.warn(f"skipping damaged checkpoint {str(file)!r}: {e}")
    raise ValueError(f"resume_from: none of the {len(candidates)} checkpoints in {str(path)!r} is readable")


def _load(file: Path) -> dict:
    state = safe_load(file, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} is not a looplab training checkpoint (written by Checkpoint)")
    return state


class Resume(Callback):
    """Restore a checkpoint at the start of a fit, so it continues at the very next batch.

    Added by `learn.fit(..., resume_from=path_or_dir)`. Its `before_fit` runs last (after every other callback's
    `before_fit` has reset that callback), then overwrites all of the training state with the checkpoint's.
    """
    order = 10_000
    during_lr_find = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"resume_from: {str(self.path)!r} does not exist")
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.loaded: Path | None = None

    def before_fit(self):
        learn = self.learn
        self.loaded, state = latest_checkpoint(self.path)
        model = unwrap_model(learn.model)
        try:
            model.load_state_dict(state["model"])
            learn.opt.load_state_dict(state["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {str(self.loaded)!r} does not match this model/optimizer: {e}") from e
        grads = state["grads"]
        for name, p in model.named_parameters():
            p.grad = grads[name].to(p.device) if name in grads else None
        self._load_callbacks(state["callbacks"])
        for name, position in state["data"].items():
            dl = getattr(learn.dls, name, None)
            if hasattr(dl, "load_state_dict"):
                dl.load_state_dict(position)
        loop = state["loop"]
        if loop["n_epochs"] != learn.n_epochs:
            warnings.warn(f"{str(self.loaded)!r} was written by a fit of {loop['n_epochs']} epochs; this fit has "
                          f"{learn.n_epochs}: schedules that depend on the length will not match")
        learn.epoch, learn.train_iter = loop["epoch"], loop["train_iter"]
        rngs = state["rng"]
        rank = torch.distributed.get_rank() if _distributed() else 0
        if rank >= len(rngs):
            warnings.warn(f"{str(self.loaded)!r} holds RNG states of {len(rngs)} rank(s); rank {rank} takes rank 0's")
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])

    def _load_callbacks(self, saved: dict) -> None:
        named = _named_callbacks(self.learn.cbs)
        for name, cb in named.items():
            if name in saved:
                cb.load_state_dict(saved[name])
            elif not isinstance(cb, Resume) and cb.state_dict():
                warnings.warn(f"{str(self.loaded)!r} holds no state for callback {name}: it starts afresh")
        extra = [name for name, s in saved.items() if name not in named and s]
        if extra:
            warnings.warn(f"{str(self.loaded)!r} holds state for callbacks this fit does not have: {extra}")
