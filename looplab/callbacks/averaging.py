"""Weight averaging during training: SWA (an average of epoch-end weights) and EMA (an average of every step's)."""
from __future__ import annotations

import copy
import warnings

import torch
from fastcore.basics import store_attr
from torch import nn

from ..averaging import update_bn
from ..callback import Callback
from ..checks import check_int, check_number
from ..optim import lrs_for_groups
from ..schedules import sched_cos
from ..util import unwrap_model
from .order import Order

__all__ = ["SWA", "EMA"]


def _float_params(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if torch.is_floating_point(p)]
    return [n for n, _ in named], [p.detach() for _, p in named]


class SWA(Callback):
    """Stochastic Weight Averaging (Izmailov et al. 2018): the running mean of the weights at the end of each epoch.

    From epoch `start_epoch` (0-based) on, the floating-point parameters at the end of every epoch's training phase
    join the average (in `after_train`: validation does not change the weights, and a Checkpoint written in
    `after_epoch` then already holds this epoch's average; an epoch stopped by CancelEpoch mid-training is not
    averaged). `swa_lr` (a float, or a slice over parameter groups): from `start_epoch` on, each group's lr moves by
    cosine from its lr at that moment to `swa_lr` over `anneal_epochs` (per batch), then stays; this overrides any
    schedule (order 90, after schedulers). `None` leaves the lr alone.

    At the end of fit (run out, or stopped by a Cancel; not one that raised) the model holds the average, and with
    `update_bn` its batch-norm statistics are recomputed
    over the training data (`looplab.averaging.update_bn`, as torch's `swa_utils.update_bn`). That pass leaves the
    training loader's position and the torch RNG (dropout) as they were. With DDP each rank recomputes the
    statistics on its own shard.
    """
    order = Order.SWA
    during_lr_find = False

    def __init__(self, start_epoch: int, swa_lr: float | slice | None = None, anneal_epochs: int = 0,
                 update_bn: bool = True):
        check_int("start_epoch", start_epoch, 0)
        check_int("anneal_epochs", anneal_epochs, 0)
        for v in [] if swa_lr is None else [swa_lr.start, swa_lr.stop] if isinstance(swa_lr, slice) else [swa_lr]:
            check_number(f"swa_lr ({swa_lr!r})", v, 0)
        store_attr("start_epoch, swa_lr, anneal_epochs, update_bn")
        self._reset()

    def _reset(self) -> None:
        self.average: list[torch.Tensor] | None = None  # aligned with self._names
        self.count = 0
        self._start_lrs: list[float] | None = None  # each group's lr when annealing began

    def before_fit(self):
        self._reset()  # a fit starts a fresh average (Resume loads a saved one after every before_fit)
        self._names, self._params = _float_params(unwrap_model(self.learn.model))
        groups = self.learn.opt.param_groups
        self._swa_lrs = None if self.swa_lr is None else lrs_for_groups(self.swa_lr, len(groups))

    def before_batch(self):
        learn = self.learn
        if self._swa_lrs is None or not learn.training or learn.epoch < self.start_epoch:
            return
        groups = learn.opt.param_groups
        if self._start_lrs is None:
            self._start_lrs = [g["lr"] for g in groups]
        if self.anneal_epochs == 0:
            progress = 1.0
        else:
            within = (learn.iter / learn.n_iter) if learn.n_iter else 0.0
            progress = (learn.epoch - self.start_epoch + within) / self.anneal_epochs
        for group, start, end in zip(groups, self._start_lrs, self._swa_lrs):
            group["lr"] = sched_cos(start, end, min(progress, 1.0))

    @torch.no_grad()
    def after_train(self):
        if self.learn.epoch < self.start_epoch:
            return
        if self.average is None:
            self.average = [p.clone() for p in self._params]
        else:  # avg + (w - avg) / (n + 1): the running mean
            torch._foreach_lerp_(self.average, self._params, 1.0 / (self.count + 1))
        self.count += 1

    @torch.no_grad()
    def after_fit(self):
        if self.learn.exception is not None:  # a fit that failed did not finish: the model keeps its weights
            return
        if self.average is None:
            warnings.warn(f"SWA: the fit ended before epoch {self.start_epoch} (start_epoch); the model keeps its "
                          f"trained weights")
            return
        torch._foreach_copy_(self._params, self.average)
        if self.update_bn:
            self._update_bn()

    def _update_bn(self) -> None:
        learn, dl = self.learn, self.learn.dls.train
        position = dl.state_dict() if hasattr(dl, "state_dict") else None  # iterating moves the epoch counter
        device = learn.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            update_bn(unwrap_model(learn.model), dl, device)  # dropout would draw from the RNG: forked
        if position is not None:
            dl.load_state_dict(position)

    def state_dict(self) -> dict:
        average = None if self.average is None else dict(zip(self._names, self.average))
        return {"average": average, "count": self.count, "start_lrs": self._start_lrs}

    def load_state_dict(self, state: dict) -> None:
        average, self.count, self._start_lrs = state["average"], int(state["count"]), state["start_lrs"]
        if self.learn is None:  # not attached to a Learner yet: keep the saved tensors as they are
            self._names = [] if average is None else list(average)
            self.average = None if average is None else [average[n].clone() for n in self._names]
            return
        self._names, params = _float_params(unwrap_model(self.learn.model))
        self.average = None if average is None else [average[n].to(p.device, p.dtype).clone()
                                                     for n, p in zip(self._names, params)]


class EMA(Callback):
    """Exponential moving average of the weights: after every optimizer step, `ema ← decay·ema + (1−decay)·w`.

    The average lives in `.ema_model`, a copy of the model taken at `before_fit`; parameters are averaged, buffers
    (batch-norm statistics) copied. A step counts when the optimizer really stepped: a step post-hook registered on
    `learn.opt` flags it and `after_batch` updates the average. So a step skipped by gradient accumulation or by a
    GradScaler that found infinities is not counted, and one taken by a callback itself (MixedPrecision steps
    through its scaler and then raises CancelStep) is. `validate_with_ema`: validation (loss, metrics,
    `get_preds`) runs on the EMA model, swapped in for the phase and swapped back after it (and in `after_fit`,
    however the fit ends).
    """
    order = Order.EMA
    during_lr_find = False

    def __init__(self, decay: float = 0.999, validate_with_ema: bool = False):
        check_number("decay", decay, 0, 1)
        self.decay, self.validate_with_ema = float(decay), validate_with_ema
        self.ema_model: nn.Module | None = None
        self._loaded: dict | None = None  # a state loaded before this fit's copy existed
        self._trained_model = None  # learn.model while the EMA model stands in for validation
        self._hook = None

    def before_fit(self):
        learn = self.learn
        if not hasattr(learn.opt, "register_step_post_hook"):
            raise TypeError(f"EMA needs a torch.optim.Optimizer (to see its steps), got {type(learn.opt).__name__}")
        model = unwrap_model(learn.model)
        self._trained_model = None
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        if self._loaded is not None:
            self.ema_model.load_state_dict(self._loaded)
        self._ema_params, self._params = _float_params(self.ema_model)[1], _float_params(model)[1]
        self._ema_buffers, self._buffers = list(self.ema_model.buffers()), list(model.buffers())
        self._stepped = False
        self._hook = learn.opt.register_step_post_hook(self._on_step)

    def _on_step(self, opt, args, kwargs) -> None:
        self._stepped = True

    @torch.no_grad()
    def after_batch(self):
        if not self._stepped:
            return
        self._stepped = False
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.decay)
        if self._buffers:
            torch._foreach_copy_(self._ema_buffers, self._buffers)

    def before_validate(self):
        # (a validate() that raised left `_trained_model` set, with `learn.model` already put back: swap again)
        if self.validate_with_ema and self.ema_model is not None and self.learn.model is not self.ema_model:
            self._trained_model, self.learn.model = self.learn.model, self.ema_model

    def after_validate(self):
        if self._trained_model is not None:
            self.learn.model, self._trained_model = self._trained_model, None

    after_epoch = after_validate  # in case CancelEpoch/CancelFit skipped after_validate

    def after_fit(self):
        self.after_validate()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._loaded = None

    def state_dict(self) -> dict:
        return {"ema": None if self.ema_model is None else self.ema_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = state["ema"]
        if self._loaded is not None and self.ema_model is not None:
            self.ema_model.load_state_dict(self._loaded)
