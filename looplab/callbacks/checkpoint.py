"""Checkpoint: the complete training state, written atomically. Resume: continue from the very next batch.

A checkpoint holds everything the rest of a fit depends on: the model, the optimizer (and its class name), every
callback's `state_dict()` (schedules, loss scaler, averages, Recorder history …), every PRNG state (of every rank),
the gradients when a step is mid-accumulation, the loop counters, the data loaders' position and the data's shape
(batches per epoch, samples, processes). Data loaders from `looplab.data` start an epoch at any batch, so resuming
jumps straight to the next batch without replaying the ones before it, and the rest of the run is bit-identical to
a run that was never interrupted.

Files are `ckpt-{steps:08d}.pt` (mid-epoch, after `steps` training batches) and `ckpt-{steps:08d}-epoch-{e}.pt`
(after epoch e); the newest is the one with the most steps, an epoch's end after its last step. Everything in them
is plain data: they load with `torch.load(weights_only=True)`, and loading never runs code.

Under FSDP (a sharded model) each write is a folder `ckpt-….dcp` instead: every rank writes its shards of the
model, optimizer and gradients, rank 0 the plain rest, and the folder appears under its name once all finished
(see `looplab.sharded`). It resumes on the same number of processes, exactly.

Folders never lose a run:
- Reading (`latest_checkpoint`, `Resume`) never deletes, renames or creates anything. Writes go through a
  temporary unique to the writer (`looplab.io.atomic_save`); a `Checkpoint` removes only provably stale ones.
- A run's files are its lineage: the names a `Checkpoint` wrote (its `state_dict`, so they survive a resume),
  and `keep_last` deletes only those. Resuming from a file older than others in its folder moves the newer ones
  (a run that went on from there) into `abandoned-<time>/`, with a warning, so `resume_from=folder` continues the
  resumed run.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch

from ..callback import Callback, CancelFit
from ..checks import check_int, check_number
from ..io import atomic_save, remove_stale_temporaries, safe_load
from ..loading import check_grads, check_model_state, check_optimizer_state, load_callback_states
from ..repro import get_rng_state, set_rng_state
from ..sharded import check_world_size, is_sharded, load_sharded, read_sharded, remove_stale_folders, write_sharded
from ..util import is_main_process, unwrap_model
from .distributed import average_accumulated_grads
from .order import Order

__all__ = ["Checkpoint", "Resume", "checkpoint_files", "latest_checkpoint"]

FORMAT = "looplab-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d+)(-epoch-\d+)?\.(pt|dcp)$")  # .dcp: a sharded checkpoint folder (FSDP)
_PARTS = ("model", "opt", "grads", "callbacks", "rng", "loop", "data")  # what every checkpoint holds
_LOOP = ("epoch", "offset", "train_iter", "n_epochs")


def _sort_key(path: Path) -> tuple[int, bool]:
    m = _NAME.match(path.name)
    return int(m[1]), m[2] is not None  # same step count: the epoch's end (after validation) is newer


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files in `folder`, oldest first ([] if there is no such folder; `*.tmp` leftovers of killed
    writes are not among them). `resume_from=folder if checkpoint_files(folder) else None` resumes when it can."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_checkpoint(p)), key=_sort_key)


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a (complete: renamed once written) sharded checkpoint folder."""
    return _NAME.match(path.name) is not None and (path.is_dir() if path.suffix == ".dcp" else path.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def _length(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:  # no length (an iterable dataset; torch's DataLoader over one)
        return None


def _data_shape(dl) -> dict:
    """What a mid-epoch position depends on: batches per epoch, samples and processes (None: not known)."""
    sources = [getattr(dl, "dataset", None), getattr(dl, "ds", None)]  # torch's DataLoader; looplab.data's
    n_samples = next((n for n in (_length(s) for s in sources if s is not None) if n is not None), None)
    if n_samples is None and isinstance(getattr(dl, "n", None), int):  # looplab.data's in-memory loader
        n_samples = dl.n
    return {"n_batches": _length(dl), "n_samples": n_samples,
            "world_size": torch.distributed.get_world_size() if _distributed() else 1}


def training_state(learn, position: tuple[int, int, int] | None, rng: list[dict]) -> dict:
    """The complete state of `learn` between two batches or after an epoch, as plain data. `position`: mid-epoch,
    `(epoch, offset, train_iter)` of the next batch (None: after the epoch).

    `loop` says where to continue (the epoch, the batch within it and the next `train_iter`) and what that
    position depends on (`n_batches` per epoch, `n_samples`, `world_size`).
    """
    model = unwrap_model(learn.model)
    data = learn.dls.state_dict()
    if position is not None:  # the train loader has already moved its counter to the next epoch: say where it is
        epoch, offset, train_iter = position
        if "train" in data:
            data["train"] = {"epoch": epoch, "offset": offset}
    else:
        epoch, offset, train_iter = learn.epoch + 1, 0, learn.train_iter
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "opt": learn.opt.state_dict(),
        "opt_class": type(learn.opt).__name__,
        # the loop zeroes gradients after every step; they are non-zero here only mid-accumulation
        "grads": {name: p.grad for name, p in model.named_parameters() if p.grad is not None},
        "callbacks": {name: cb.state_dict() for name, cb in _named_callbacks(learn.cbs).items()},
        "rng": rng,
        "loop": {"epoch": epoch, "offset": offset, "train_iter": train_iter, "n_epochs": learn.n_epochs,
                 "n_steps": learn.n_steps, "valid_every": learn.valid_every, **_data_shape(learn.dls.train)},
        "data": data,
    }


class Checkpoint(Callback):
    """Save the complete training state to `dir` every `every_n_steps` training batches, whenever
    `every_n_minutes` of wall-clock time passed since the fit started or since the last write (checked between
    training batches), and/or after every epoch — any combination.

    Keeps the newest `keep_last` files of this run's lineage (None: all): the files it wrote, and after a resume
    the files of the run it continues, up to the resume point. Older ones are deleted only once the new one is
    complete; other files in `dir` are never deleted. Resuming from a file older than others in `dir` moves those
    newer files into `dir/abandoned-<time>/` (with a warning) at the start of the fit. SIGTERM or SIGINT during fit
    (preemption, a notebook interrupt) finishes the current step, writes a checkpoint and stops the fit cleanly;
    `stopped_by` then names the signal (a second signal acts at once).
    In a distributed run only rank 0 writes; every rank's RNG states are saved (callbacks' states are rank 0's: they
    agree across ranks, except the per-step training losses each rank's Recorder keeps), and the ranks agree to stop
    at the next scheduled checkpoint (`every_n_steps` or the epoch's end), so there is no extra sync per step.
    With `every_n_minutes` under DDP, rank 0's clock decides and the ranks agree on the step in one small
    all-reduce every `TIME_SYNC_STEPS` (16) training batches, so a timed checkpoint lands within 16 steps of due.
    Every such file is an exact-resume point. Seed 003's recipe (average the last checkpoints of a long run) is
    `Checkpoint(dir, every_n_minutes=30, keep_last=10)`, then `looplab.average_last(dir, 10, model)`.
    With `fit(..., valid_every=K)`, a checkpoint due after a batch that a validation follows is written after that
    validation and holds its history row, so resuming from it goes on training without validating again; when that
    batch ends an epoch (or a fit by steps), the file is that epoch's end (`ckpt-…-epoch-e.pt`).
    Resume with `learn.fit(..., resume_from=dir)`; use one folder per fit.
    """
    TIME_SYNC_STEPS = 16
    order = Order.CHECKPOINT  # after everything that updates state for the step / epoch (callbacks/order.py)
    during_lr_find = False

    def __init__(self, dir: str | os.PathLike, every_n_steps: int | None = None, every_epoch: bool = True,
                 keep_last: int | None = 3, every_n_minutes: float | None = None):
        check_int("every_n_steps", every_n_steps, 1, none_ok=True)
        check_int("keep_last", keep_last, 1, none_ok=True)
        if every_n_minutes is not None:
            check_number("every_n_minutes", every_n_minutes, 0, low_open=True)
        self.dir, self.every_n_steps, self.every_epoch = Path(dir), every_n_steps, every_epoch
        self.every_n_minutes = every_n_minutes
        self._last_write = time.monotonic()
        self.keep_last = keep_last
        self.last_path: Path | None = None
        self.stopped_by: str | None = None
        self._signal: int | None = None
        self._previous_handlers: dict = {}
        self._own: list[Path] = []  # this run's lineage in `dir`, oldest first
        self._resumed_files: list[str] | None = None  # the lineage a Resume loaded (None: the file had none)
        self._resume: Resume | None = None  # the Resume of this fit, when it continues a run in `dir`
        self._starting = False  # before the first epoch of a fit
        self._pending: tuple | None = None  # (position, stop): a write waiting for the validation after its batch

    # ---- lineage -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The names of this run's files in `dir` (while a file is written: the ones kept once it is complete)."""
        return {"files": [p.name for p in self._own]}

    def load_state_dict(self, state: dict) -> None:
        files = state.get("files")
        # plain names of checkpoint files only: a crafted lineage must not point rotation anywhere else
        self._resumed_files = None if files is None else [str(n) for n in files if _NAME.match(str(n))]

    def _continue_resumed_run(self) -> None:
        """The start of a resumed fit (rank 0): abandon newer files of `dir`, take on the resumed run's lineage."""
        loaded = self._resume.loaded if self._resume is not None else None
        if loaded is None or loaded.parent.resolve() != self.dir.resolve():
            return
        if _NAME.match(loaded.name):
            newer = [p for p in checkpoint_files(self.dir) if _sort_key(p) > _sort_key(loaded)]
            if newer:
                self._abandon(newer, loaded)
        if self._resumed_files is not None:
            self._own = [self.dir / name for name in self._resumed_files if _is_checkpoint(self.dir / name)]
        else:  # written before files carried their lineage: the folder's files up to the resume point
            self._own = [p for p in checkpoint_files(self.dir)
                         if not _NAME.match(loaded.name) or _sort_key(p) <= _sort_key(loaded)]

    def _abandon(self, newer: list[Path], loaded: Path) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, i = self.dir / f"abandoned-{stamp}", 1
        while dest.exists():
            dest, i = self.dir / f"abandoned-{stamp}-{i}", i + 1
        dest.mkdir()
        for p in newer:
            os.replace(p, dest / p.name)
        warnings.warn(f"resumed from {loaded.name}, older than {len(newer)} checkpoint(s) in {str(self.dir)!r} "
                      f"({', '.join(p.name for p in newer)}): a run that went on from there. They are moved to "
                      f"{str(dest)!r}, not deleted, so that resume_from={str(self.dir)!r} continues this run")

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

    def _time_due(self) -> bool:
        """Have `every_n_minutes` passed since the fit started or since the last write (this process's clock)?"""
        return self.every_n_minutes is not None and time.monotonic() - self._last_write >= 60 * self.every_n_minutes

    def _agree(self, check: bool) -> tuple[bool, bool]:
        """`(stop, timed)`: a stop signal came / a timed checkpoint is due. Distributed, the ranks agree (any rank's
        signal, rank 0's clock) in one all-reduce at the points `check` marks only: there is no per-step sync."""
        if not self._distributed:
            return self._signal is not None, self._time_due()
        if not check:
            return False, False
        due = self._time_due() and is_main_process()
        flags = torch.tensor([int(self._signal is not None), int(due)], device=self.learn.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, timed = bool(flags[0].item()), bool(flags[1].item())
        if stop and self._signal is None:
            self._signal = signal.SIGTERM  # another rank was signalled
        return stop, timed

    def _stop_requested(self, scheduled: bool) -> bool:
        """Did a stop signal come? Distributed: the ranks agree, at scheduled checkpoints only (no per-step sync)."""
        return self._agree(scheduled)[0]

    # ---- events ------------------------------------------------------------------------------------------------
    def before_fit(self):
        learn = self.learn
        self._distributed, self._signal, self.stopped_by = _distributed(), None, None
        self._last_write = time.monotonic()  # the fit (or resumed fit) starts the clock
        if self.every_n_steps and not hasattr(learn.dls.train, "load_state_dict"):
            warnings.warn(f"the training loader ({type(learn.dls.train).__name__}) cannot start an epoch mid-way: "
                          f"resuming from a mid-epoch checkpoint will restart that epoch")
        self._own, self._resumed_files = [], None
        resume = next((cb for cb in learn.cbs if isinstance(cb, Resume)), None)
        self._resume = resume if resume is not None and resume.folder.resolve() == self.dir.resolve() else None
        self._starting, self._pending = True, None
        if is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.dir, "ckpt-*.tmp")
            remove_stale_folders(self.dir)
            existing = checkpoint_files(self.dir)
            if existing and self._resume is None:
                warnings.warn(f"{str(self.dir)!r} already holds {len(existing)} checkpoint(s) of another run "
                              f"(newest {existing[-1].name}); they are left alone, but resume_from this folder "
                              f"picks the newest by step count: use a fresh folder per run")
        self._restore_handlers()  # left installed by a fit that raised before after_fit always ran
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def before_epoch(self):
        if self._starting:  # the first epoch of the fit: Resume (the last before_fit) has loaded by now
            self._starting = False
            if is_main_process():
                self._continue_resumed_run()

    def after_batch(self):
        learn = self.learn
        if not learn.training:
            return
        done = learn.train_iter + 1
        scheduled = self.every_n_steps is not None and done % self.every_n_steps == 0
        timed_check = self.every_n_minutes is not None and done % self.TIME_SYNC_STEPS == 0
        stop, timed = self._agree(scheduled or timed_check)
        if not (scheduled or stop or timed):
            return
        position = (learn.epoch, learn.iter + 1, done)
        every = learn.valid_every
        if every is not None and (done % every == 0 or done == learn.n_steps):  # a validation follows this batch
            ends_epoch = learn.iter + 1 == learn.n_iter or done == learn.n_steps  # it validates in the epoch's slot
            self._pending = (None if ends_epoch else position, stop)  # None: written as the epoch's end
            return
        self._save(position)
        if stop:
            self._stop()

    def after_validate(self):
        if self._pending is not None and self._pending[0] is not None:  # mid-epoch: the validation it waited for
            (position, stop), self._pending = self._pending, None
            self._save(position)
            if stop:
                self._stop()

    def after_epoch(self):
        # a write waiting for the epoch's validation is the epoch's end; one a Cancel left waiting mid-epoch too (a
        # mid-epoch position would resume the part of the epoch the Cancel skipped)
        pending, self._pending = self._pending, None
        stop = self._stop_requested(True) or (pending is not None and pending[1])
        if self.every_epoch or stop or pending is not None:
            self._save(None)
        if stop:
            self._stop()

    def after_cancel_fit(self):
        self._restore_handlers()

    def after_fit(self):
        # runs however the fit ended (with `learn.exception` set when it raised): undo, never write
        self._restore_handlers()

    # ---- writing -----------------------------------------------------------------------------------------------
    def _save(self, position: tuple[int, int, int] | None) -> None:
        """Write a checkpoint: mid-epoch at `position` (see `training_state`), or after the epoch (None)."""
        learn = self.learn
        rng = _rng_states_by_rank()  # every rank takes part
        if self._distributed:
            average_accumulated_grads(learn.model)  # no_sync left each rank its own: make rank 0's everyone's
        sharded = is_sharded(unwrap_model(learn.model))  # FSDP: every rank writes its shards into one folder
        steps = learn.train_iter if position is None else position[2]
        name = f"ckpt-{steps:08d}" if position else f"ckpt-{steps:08d}-epoch-{learn.epoch}"
        path = self.dir / (name + (".dcp" if sharded else ".pt"))
        if not is_main_process():
            if sharded:
                write_sharded(training_state(learn, position, rng), path)
            return
        self._last_write = time.monotonic()  # the next timed write is due m minutes from now (rank 0 decides)
        lineage = sorted([p for p in self._own if p != path] + [path], key=_sort_key)
        kept = lineage if self.keep_last is None else lineage[-self.keep_last:]
        previous, self._own = self._own, kept  # the file names the lineage it will have once it is complete
        try:
            state = training_state(learn, position, rng)
            written = write_sharded(state, path) if sharded else atomic_save(state, path)
            self.last_path, self._last_loop = written, state["loop"]
        except BaseException:
            self._own = previous
            raise
        for old in lineage[:len(lineage) - len(kept)]:  # the new file is complete: only now drop the oldest
            _remove(old)

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

    Returns `(file, state)`. Reads only: never deletes, renames or creates anything, so it is safe while another
    process writes into the folder. A missing path raises FileNotFoundError; a file that is not a complete looplab
    checkpoint, or holds anything but plain data, raises ValueError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"resume_from: {str(path)!r} does not exist")
    if _is_checkpoint(path) or path.is_file():
        return path, _load(path)
    for _ in range(10):
        candidates = checkpoint_files(path)
        if not candidates:
            raise FileNotFoundError(f"resume_from: no checkpoint (ckpt-*.pt, ckpt-*.dcp) in folder {str(path)!r}")
        for file in reversed(candidates):
            try:
                return file, _load(file)
            except FileNotFoundError:  # a writer rotated it away since the listing: list again
                break
            except ValueError as e:
                warnings.warn(f"skipping damaged checkpoint {str(file)!r}: {e}")
        else:
            raise ValueError(f"resume_from: none of the {len(candidates)} checkpoints in {str(path)!r} is readable")
    raise FileNotFoundError(f"resume_from: the checkpoints in {str(path)!r} kept disappearing while being read")


def _load(file: Path) -> dict:
    state = read_sharded(file) if file.is_dir() else safe_load(file, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} is not a looplab training checkpoint (written by Checkpoint)")
    missing = [part for part in _PARTS if part not in state]
    if isinstance(state.get("loop"), dict):
        missing += [f"loop[{key!r}]" for key in _LOOP if key not in state["loop"]]
    if missing:
        raise ValueError(f"{str(file)!r} is an incomplete checkpoint: it has no {', '.join(missing)}")
    return state


class Resume(Callback):
    """Restore a checkpoint at the start of a fit, so it continues at the very next batch.

    Added by `learn.fit(..., resume_from=path_or_dir)`, or give `Resume(path, strict=False)` in `cbs`. Its
    `before_fit` runs last (after every other callback's `before_fit` has reset that callback), checks that the
    whole checkpoint fits (model, optimizer, gradients, data), then loads it: a ValueError naming the file leaves
    everything as it was. A mid-epoch checkpoint of other data (batches per epoch, samples, processes) is an error;
    with `strict=False`, a warning, and that epoch restarts from its first batch.
    `folder` is where it reads and `loaded` the file it loaded (None before): a `Checkpoint` writing into `folder`
    continues that file's run.
    """
    order = Order.RESUME
    during_lr_find = False

    def __init__(self, path: str | os.PathLike, strict: bool = True):
        self.path, self.strict = Path(path), strict
        if not self.path.exists():
            raise FileNotFoundError(f"resume_from: {str(self.path)!r} does not exist")
        self.folder = self.path if self.path.is_dir() and not _is_checkpoint(self.path) else self.path.parent
        self.loaded: Path | None = None

    def before_fit(self):
        learn = self.learn
        file, state = latest_checkpoint(self.path)
        model = unwrap_model(learn.model)
        if file.is_dir():
            check_world_size(file, state, model)
        check_model_state(model, state["model"], file)
        check_optimizer_state(learn.opt, state["opt"], state.get("opt_class"), file)
        check_grads(model, state["grads"], file)
        loop, data = self._checked_position(file, dict(state["loop"]), dict(state["data"]))
        saved_steps = loop.get("n_steps", learn.n_steps)  # files from before fits by steps have none
        if saved_steps != learn.n_steps and (self.strict or learn.n_epochs is None):
            raise ValueError(f"{str(file)!r} was written by a fit of {saved_steps} training steps; this fit has "
                             f"{learn.n_steps}: its schedules would not continue where they stopped (resume with the "
                             f"same n_epochs / steps)")
        rngs = state["rng"]
        rank = torch.distributed.get_rank() if _distributed() else 0
        if rank >= len(rngs):
            warnings.warn(f"{str(file)!r} holds RNG states of {len(rngs)} rank(s); rank {rank} takes rank 0's")

        # everything that can be checked fits: load what only loading can check first, undoing it on failure
        undo = [(set_rng_state, get_rng_state())]
        named = _named_callbacks(learn.cbs)
        try:
            set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
            for name, position in data.items():
                dl = getattr(learn.dls, name, None)
                if hasattr(dl, "load_state_dict"):
                    undo.append((dl.load_state_dict, dl.state_dict()))
                    dl.load_state_dict(position)
            load_callback_states(named, state["callbacks"], file)  # all or nothing by itself
        except Exception as e:
            for restore, saved in reversed(undo):
                restore(saved)
            if isinstance(e, ValueError) and str(file) in str(e):
                raise
            raise ValueError(f"{str(file)!r} does not load: {type(e).__name__}: {e}") from e
        if file.is_dir():  # sharded: each rank reads its chunks (a collective)
            load_sharded(file, model, learn.opt, state)
        else:
            model.load_state_dict(state["model"])
            learn.opt.load_state_dict(state["opt"])
            grads = state["grads"]
            for name, p in model.named_parameters():
                p.grad = grads[name].to(p.device) if name in grads else None
        self._warn_about_callbacks(named, state["callbacks"], file)
        if loop["n_epochs"] != learn.n_epochs:
            warnings.warn(f"{str(file)!r} was written by a fit of {loop['n_epochs']} epochs; this fit has "
                          f"{learn.n_epochs}: schedules that depend on the length will not match")
        if loop.get("valid_every", learn.valid_every) != learn.valid_every:
            warnings.warn(f"{str(file)!r} was written by a fit with valid_every={loop['valid_every']}; this fit has "
                          f"valid_every={learn.valid_every}: its history rows will not continue the same way")
        learn.epoch, learn.train_iter = loop["epoch"], loop["train_iter"]
        self.loaded = file

    def _checked_position(self, file: Path, loop: dict, data: dict) -> tuple[dict, dict]:
        """`loop` and `data` to continue from; a mid-epoch position in other data is an error (or, not `strict`,
        a warning and a restart of that epoch)."""
        if loop["offset"] == 0:
            return loop, data
        now = _data_shape(self.learn.dls.train)
        labels = {"world_size": "processes", "n_samples": "training samples", "n_batches": "batches per epoch"}
        differences = [f"{labels[k]}: {loop[k]} there, {now[k]} here" for k in labels
                       if loop.get(k) is not None and now[k] is not None and loop[k] != now[k]]
        if not differences:
            return loop, data
        where = (f"{str(file)!r} was written mid-epoch {loop['epoch']} (after its batch {loop['offset']}) by a run "
                 f"with other data ({'; '.join(differences)}): continuing there would skip or repeat samples")
        if self.strict:
            raise ValueError(f"{where}. Resume with the same data, batch size and number of processes, or pass "
                             f"cbs=[Resume(path, strict=False)] to restart epoch {loop['epoch']} from its start")
        warnings.warn(f"{where}; restarting epoch {loop['epoch']} from its first batch (strict=False)")
        loop["train_iter"], loop["offset"] = loop["train_iter"] - loop["offset"], 0
        if "train" in data:
            data["train"] = {**data["train"], "offset": 0}
        return loop, data

    def _warn_about_callbacks(self, named: dict, saved: dict, file: Path) -> None:
        for name, cb in named.items():
            if name not in saved and not isinstance(cb, (Resume, Checkpoint)) and cb.state_dict():
                warnings.warn(f"{str(file)!r} holds no state for callback {name}: it starts afresh")
        # a Checkpoint's state is the writer's own bookkeeping (its files): a fit that writes none needs none
        extra = [name for name, s in saved.items()
                 if name not in named and s and not name.startswith(f"{Checkpoint.__name__}_")]
        if extra:
            warnings.warn(f"{str(file)!r} holds state for callbacks this fit does not have: {extra}")
