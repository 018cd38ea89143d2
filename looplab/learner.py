"""The Learner: its state, fit / validate / get_preds / save / load, and the training loop itself.

Every level of the loop has the same shape (`_with_events`): fire `before_X`, run the body; on `CancelX` fire
`after_cancel_X`; then fire `after_X`. Features are callbacks; the loop knows none of them."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from fastcore.basics import listify
from torch import nn

from .callback import LEVEL_EVENTS, Callback, CancelEpoch, CancelFit, CancelTrain, build_table
from .callbacks.gather import GatherPreds
from .callbacks.progress import ProgressBar
from .callbacks.recorder import Recorder
from .checks import bad_loss, check_callback, check_fit, check_learner, check_phase_loader, no_batches, no_grad_loss
from .data import DataLoaders
from .loading import load_learner, save_learner
from .metrics import check_metrics
from .optim import param_groups, set_group_lrs
from .shortcuts import FeatureMethods
from .util import batch_on, cat_batches, output_loss, run_teardown

__all__ = ["Learner"]


# level -> its event names and Cancel exception, built once
_LEVELS = {level: (f"before_{level}", f"after_cancel_{level}", f"after_{level}", exc)
           for level, exc in LEVEL_EVENTS.items()}


class Learner(FeatureMethods):
    """Trains `model` on `data` with `loss_func`, running callbacks at every event of the loop.

    Loop state (the one place it is documented). Callbacks may read all of it and change what is marked ✎:

    | name         | what                                                                                  |
    |--------------|---------------------------------------------------------------------------------------|
    | model ✎      | the module being trained (a DDP / FSDP / compiled form of it during such a fit)        |
    | opt ✎        | the optimizer, built once by `opt_func(param_groups, lr=lr)`                           |
    | loss_func ✎  | `loss_func(pred, yb) -> scalar tensor`; None: the model output's own `loss`            |
    | dls          | the DataLoaders; `dl` ✎ is the loader of the current phase                             |
    | xb ✎, yb ✎   | the batch on the model's device: `(xb, yb)` pairs as yielded (a tuple `xb` is several  |
    |              | inputs); a mapping batch is `xb` whole, and `yb = xb.get("labels")`                    |
    | pred ✎       | `model(xb)`, `model(*xb)` for a tuple, `model(**xb)` for a mapping; any structure      |
    | loss ✎       | the scalar tensor that will be back-propagated (replace it in `after_loss`)            |
    | training     | True in the training phase, False in validation                                        |
    | epoch ✎      | 0-based epoch; a callback may set it in `before_fit` to start later (resume)          |
    | n_epochs ✎   | epochs in this fit (`ceil(steps / len(train))` for a fit by steps; None if unsized)   |
    | n_steps ✎    | training batches this fit runs: `n_epochs * len(train)`, or `steps` (a callback that   |
    |              | reshapes the training loader in `before_fit`, as DDP's sharding does, updates both)    |
    | steps        | the fit's `steps=`: it stops after that many training batches; None: a fit by epochs  |
    | iter         | batch index in the current phase of the epoch                                          |
    | n_iter       | batches in the current phase (None for loaders without a length)                       |
    | train_iter ✎ | 0-based index of the current training batch over the whole fit (batches done, between) |
    | valid_every  | validate after every `valid_every`-th training batch of the fit; None: after each epoch |
    |              | (None also while a `validate()` / `get_preds()` runs inside a fit: not the fit's own)  |
    | device       | the device of the model's parameters; batches are moved there                          |
    | recorder     | the Recorder (always on)                                                               |
    | exception    | in `after_fit`: the exception ending the fit (None when it ran out or was cancelled)   |

    A loader may have an `offset` attribute: the batch its next epoch starts at (exact resume sets it); `iter`
    then starts from there. `LOOP_STATE` names the per-fit entries of this table (what `lr_find` puts back).
    """
    LOOP_STATE = ("model", "opt", "loss_func", "dl", "xb", "yb", "pred", "loss", "training", "epoch", "n_epochs",
                  "n_steps", "steps", "iter", "n_iter", "train_iter", "valid_every", "exception")

    def __init__(self, model: nn.Module, data: DataLoaders | tuple, loss_func: Callable | None = None,
                 opt_func: Callable = torch.optim.AdamW, lr: float | slice = 1e-3,
                 cbs: Callback | Iterable[Callback] = (), metrics: Callable | Iterable[Callable] = (),
                 splitter: Callable | None = None, progress: bool = True):
        self.dls = check_learner(model, data, loss_func, lr)
        self.model, self.loss_func, self.opt_func, self.lr = model, loss_func, opt_func, lr
        self.metrics, self.splitter = check_metrics(metrics), splitter
        self.opt = opt_func(param_groups(model, splitter, lr), lr=lr.stop if isinstance(lr, slice) else lr)
        self.training, self.epoch, self.n_epochs, self.n_steps, self.iter, self.n_iter = False, 0, 0, 0, 0, None
        self.train_iter, self.exception, self.steps, self.valid_every, self._valid_at = 0, None, None, None, 0
        self._yielded: set[int] = set()  # ids of the loaders that have yielded batches (to spot one-shot iterators)
        self.cbs: list[Callback] = []
        self._table: dict = build_table(self.cbs, self)
        self.recorder = Recorder()
        self.add_cbs([self.recorder, *([ProgressBar()] if progress else []), *listify(cbs)])
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: train data-parallel
            from .callbacks.distributed import DistributedDataParallel
            self.add_cb(DistributedDataParallel())

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    # ---- callbacks -------------------------------------------------------------------------------------------
    def add_cb(self, cb: Callback) -> Callback:
        """Add a callback (rejecting misspelled event methods); returns it."""
        self.add_cbs([cb])
        return cb

    def add_cbs(self, cbs: Iterable[Callback]) -> None:
        """Add several callbacks: all of them, or (if one is rejected) none."""
        cbs = listify(cbs)
        if not cbs:
            return
        for i, cb in enumerate(cbs):
            check_callback(cb, self.cbs + cbs[:i])
        table = build_table(self.cbs + cbs, self)  # may reject a handler's signature: nothing is attached yet
        for cb in cbs:
            cb.learn = self
        self.cbs.extend(cbs)
        self._table = table  # rebuilt only when the callbacks change

    def remove_cb(self, cb: Callback | type) -> None:
        """Remove a callback instance, or every callback of a class."""
        gone = [c for c in self.cbs if c is cb or (isinstance(cb, type) and isinstance(c, cb))]
        if not gone:
            raise ValueError(f"{cb!r} is not among this Learner's callbacks: {self.cbs}")
        self.cbs = [c for c in self.cbs if not any(c is g for g in gone)]
        self._table = build_table(self.cbs, self)

    def remove_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            if any(c is cb for c in self.cbs):
                self.remove_cb(cb)

    def _fire(self, event: str) -> None:
        for handler in self._table[event]:
            handler()

    def _with_events(self, body: Callable[[], None], level: str) -> bool:
        """before_X; body; on CancelX: after_cancel_X; then after_X. False if cancelled. (The hot path.)"""
        before, after_cancel, after, cancel_exc = _LEVELS[level]
        table = self._table
        done = True
        try:
            for handler in table[before]:
                handler()
            body()
        except cancel_exc:
            done = False
            for handler in table[after_cancel]:
                handler()
        for handler in table[after]:
            handler()
        return done

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, n_epochs: int | None = None, lr: float | slice | None = None, cbs: Callback | Iterable[Callback] = (),
            resume_from: str | os.PathLike | None = None, *, steps: int | None = None,
            valid_every: int | None = None) -> None:
        """Train for `n_epochs`, or exactly `steps` training batches (the last epoch stops after batch `steps`, its
        validation still runs). `valid_every=K`: validate after every K-th training batch of the fit, mid-epoch too,
        and at its end if the last batch was not just validated, instead of after each epoch (one history row each).
        `lr` overrides the Learner's lr for this fit; `cbs` are used for this fit only. `resume_from`: a checkpoint
        file or folder written by `Checkpoint`; training continues from its next batch. However the fit ends,
        `after_fit` runs (see `exception`); an exception then propagates unchanged."""
        n_epochs, n_steps = check_fit(n_epochs, steps, lr, self.dls, self.model, valid_every)
        cbs = [*listify(cbs)]
        if resume_from is not None:
            from .callbacks.checkpoint import Resume  # resuming is a feature; the loop only runs it
            cbs.insert(0, Resume(resume_from))
        self.add_cbs(cbs)
        try:
            set_group_lrs(self.opt, self.lr if lr is None else lr)
            self.n_epochs, self.n_steps, self.steps, self.epoch, self.train_iter = n_epochs, n_steps, steps, 0, 0
            self.valid_every = valid_every
            self._run_fit()
        finally:
            self.remove_cbs(cbs)

    def _run_fit(self) -> None:
        """The fit level, as `_with_events`, but `after_fit` runs however the fit ends: an exception (any, Ctrl-C
        too) is `self.exception` meanwhile, so callbacks undo what they set up; then it propagates unchanged."""
        table, self.exception = self._table, None
        try:
            try:
                self._fire("before_fit")
                self._do_fit()
            except CancelFit:
                self._fire("after_cancel_fit")
        except BaseException as exc:
            self.exception = exc
            raise
        finally:
            run_teardown(table["after_fit"], self.exception)

    def _do_fit(self) -> None:
        self._valid_at = self.train_iter  # after before_fit (Resume): a resumed fit does not validate its start again
        while self.epoch < self.n_epochs if self.n_epochs is not None else self.train_iter < self.steps:
            self._with_events(self._do_epoch, "epoch")
            self.epoch += 1

    def _do_epoch(self) -> None:
        self._with_phase(self.dls.train, True, "train")
        if self.dls.valid is not None and self._valid_due(epoch_end=True):
            self._with_phase(self.dls.valid, False, "validate")

    def _valid_due(self, epoch_end: bool) -> bool:
        """Validate now? At each epoch's end; with `valid_every`, after a K-th batch and at the end of the fit's last
        epoch, unless no training batch ran since the last validation (then marked as done)."""
        every, done = self.valid_every, self.train_iter
        if every is None or done == self._valid_at:
            return every is None and epoch_end
        last = self.epoch + 1 == self.n_epochs if self.n_epochs is not None else done == self.steps
        due = done % every == 0 or (epoch_end and last)
        self._valid_at = done if due else self._valid_at
        return due

    def _with_phase(self, dl, training: bool, level: str) -> None:
        """Set the phase's state (so `before_train` / `before_validate` see it), then run it with its events."""
        self.dl, self.training, self.iter = dl, training, getattr(dl, "offset", 0)
        self.n_iter = len(dl) if hasattr(dl, "__len__") else None
        self._with_events(self._run_batches, level)

    def _run_batches(self) -> None:
        dl, device, training = self.dl, self.device, self.training
        self.model.train(training)
        if training and self.train_iter == self.steps:  # resumed where a fit by steps ended: no more batches
            return
        start = getattr(dl, "offset", 0)
        n_batches = 0
        with torch.set_grad_enabled(training):
            for self.iter, batch in enumerate(dl, start):
                self.xb, self.yb = batch_on(batch, device)
                try:
                    self._with_events(self._do_batch, "batch")
                except (CancelTrain, CancelEpoch, CancelFit):  # a batch the loader yielded counts, however it ended
                    self.train_iter += training
                    raise
                n_batches += 1
                if training:
                    self.train_iter += 1
                    if self.train_iter == self.steps:
                        break
                    if self.valid_every and self.iter + 1 != self.n_iter and self._valid_due(epoch_end=False):
                        self._run_phase(None, scheduled=True)  # mid-epoch (an epoch's last batch: in its slot)
                        self.model.train()
        if n_batches:
            self._yielded.add(id(dl))
        elif self.n_iter is None or self.n_iter > start:
            no_batches(dl, "training" if training else "validation", id(dl) in self._yielded)

    def _do_batch(self) -> None:
        xb, model = self.xb, self.model
        if isinstance(xb, torch.Tensor):
            self.pred = model(xb)
        else:
            self.pred = model(*xb) if isinstance(xb, tuple) else model(**xb) if isinstance(xb, Mapping) else model(xb)
        self._fire("after_pred")
        loss_func = self.loss_func
        self.loss = loss = output_loss(self.pred, self.training) if loss_func is None else loss_func(self.pred, self.yb)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            bad_loss(loss)
        self._fire("after_loss")
        if self.training:
            if self._with_events(self._do_backward, "backward"):  # CancelBackward skips the step too
                self._with_events(self._do_step, "step")
            self.opt.zero_grad()

    def _do_backward(self) -> None:
        if not self.loss.requires_grad:
            no_grad_loss()
        self.loss.backward()

    def _do_step(self) -> None:
        self.opt.step()

    def _run_phase(self, dl, cbs: Iterable[Callback] = (), scheduled: bool = False) -> None:
        """Run one validation phase over `dl` (with the callbacks' events), outside or inside a fit. Unless it is the
        fit's own (`scheduled`), `valid_every` is None meanwhile: a `validate()` in a fit writes no history row."""
        cbs, dl = listify(cbs), check_phase_loader(self.dls.valid if dl is None else dl)
        saved = {k: getattr(self, k, None) for k in ("model", "dl", "training", "iter", "n_iter", "valid_every")}
        self.add_cbs(cbs)
        try:
            self.valid_every = saved["valid_every"] if scheduled else None
            self._with_phase(dl, False, "validate")
        finally:
            self.remove_cbs(cbs)
            for k, v in saved.items():
                setattr(self, k, v)

    def validate(self, dl: Iterable | None = None) -> dict[str, float]:
        """Loss and metrics over `dl` (default: the validation data): `{"valid_loss": …, <metric name>: …}`."""
        self._run_phase(dl)
        return dict(self.recorder.last_validation)

    def get_preds(self, dl: Iterable | None = None) -> tuple[Any, Any]:
        """`(preds, targets)` over `dl` (default: the validation data), joined along the batch dimension, structure
        kept (a mapping / `ModelOutput` gives a dict of its non-scalar tensors); targets None when batches have none."""
        gather = GatherPreds()
        self._run_phase(dl, [gather])
        return cat_batches(gather.preds), cat_batches(gather.targets)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model's and the optimizer's state (and the optimizer's class name) to `path` (atomically)."""
        save_learner(self, path)

    def load(self, path: str | os.PathLike, with_opt: bool = True) -> None:
        """Load what `save` (or `Checkpoint`) wrote (`weights_only=True`), all or nothing: a file that does not fit
        the model (keys, shapes) or the optimizer (class, groups) is a ValueError naming it, and changes nothing."""
        load_learner(self, path, with_opt)
