"""MixedPrecision: autocast forward passes, with a dynamic loss scale that is logged, exposed and checkpointed."""
from __future__ import annotations

import torch

from ..callback import Callback, CancelStep
from ..checks import check_int, check_number
from ..util import CopySafeHook, tree_map
from .order import Order

__all__ = ["MixedPrecision"]


def _to_float32(pred):
    """`pred` with its float16 / bfloat16 tensors cast to float32, keeping its structure and type (tuples, dicts,
    dataclasses, a transformers `ModelOutput` with attribute access)."""
    return tree_map(lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, pred)


class MixedPrecision(Callback):
    """Runs the model's forward under `torch.autocast(device type, dtype)` in a fit's training and validation
    (`learn.validate` / `get_preds` outside a fit run in full precision).

    float16 scales the loss with a `torch.amp.GradScaler` for the model's device: a step whose gradients overflow
    is skipped (weights untouched) and the scale backs off. Unlike a scaler hidden inside the loop, its scale is
    visible: `.scale`, `.overflows`, a `loss_scale` series logged every training batch (the scale that batch's loss
    was multiplied by, i.e. before this step's update), and the callback's `state_dict`, so a checkpoint resumes at
    the scale it had. bfloat16 needs no scaler (its `loss_scale` series is 1.0).

    Predictions go back to float32 in `after_pred`, before the loss and metrics. Gradients are unscaled once per
    step in `after_backward`, so every `before_step` callback (e.g. `GradientClip`) sees true gradients. A step
    whose gradients hold inf/NaN is skipped by raising `CancelStep` in `before_step` (counted in `.overflows`;
    reading that flag is the one host sync per step GradScaler's own `step` makes too); any other step is the
    loop's own `opt.step()`, so callbacks ordered after this one get `before_step` / `after_step` as usual, and
    `after_cancel_step` fires exactly on the skipped steps. The scale is updated in `after_step`.

    The autocast hooks on the model are removed after every fit, however it ends, and a `deepcopy` of the model
    taken during the fit (EMA, a user's snapshot) gets inert hooks, never this callback.
    """
    order = Order.PRECISION

    def __init__(self, dtype: torch.dtype = torch.float16, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
        check_number("init_scale", init_scale, 0, low_open=True)
        check_number("growth_factor", growth_factor, 1, low_open=True)
        check_number("backoff_factor", backoff_factor, 0, 1, low_open=True, high_open=True)
        check_int("growth_interval", growth_interval, 1)
        self.dtype = dtype
        self._scaler_args = dict(init_scale=float(init_scale), growth_factor=float(growth_factor),
                                 backoff_factor=float(backoff_factor), growth_interval=growth_interval)
        self.scaler: torch.amp.GradScaler | None = None
        self._scaler_device: str | None = None
        self._loaded_scaler_state: dict | None = None  # loaded before the scaler exists; applied when it is built
        self._overflows = 0
        self._hooks: tuple = ()
        self._armed, self._autocast, self._unscaled, self._backward_cancelled = False, None, False, False

    # ---- what it exposes -------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The current loss scale (1.0 for bfloat16)."""
        if self.dtype is torch.bfloat16:
            return 1.0
        state = self._scaler_state()
        return float(state["scale"]) if state else self._scaler_args["init_scale"]

    @property
    def overflows(self) -> int:
        """How many optimizer steps were skipped because their gradients overflowed."""
        return self._overflows

    # ---- autocast around exactly the model's forward -----------------------------------------------------------
    # Forward hooks rather than entering autocast in before_batch and leaving it in after_pred: the forward hook
    # runs even when the forward raises (`always_call`), so autocast can never stay switched on for the thread.
    def _enter_autocast(self, module, args) -> None:
        if self._armed:
            self._armed = False
            self._autocast = torch.autocast(self._device_type, dtype=self.dtype)
            self._autocast.__enter__()

    def _exit_autocast(self, module, args, output) -> None:
        if self._autocast is not None:
            ctx, self._autocast = self._autocast, None
            ctx.__exit__(None, None, None)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._armed = (), False

    # ---- events ------------------------------------------------------------------------------------------------
    def before_fit(self):
        learn = self.learn
        self._device_type = learn.device.type
        self._remove_hooks()  # left over if an earlier fit ended with an exception
        self._hooks = (learn.model.register_forward_pre_hook(CopySafeHook(self._enter_autocast)),
                       learn.model.register_forward_hook(CopySafeHook(self._exit_autocast), always_call=True))
        if self.dtype is torch.float16 and self._scaler_device != self._device_type:
            state = self._scaler_state()
            self.scaler = torch.amp.GradScaler(self._device_type, **self._scaler_args)
            self._scaler_device = self._device_type
            if state is not None:
                self.scaler.load_state_dict(state)  # before the scaler's lazy init: it starts from this state
            self._loaded_scaler_state = None
        self._one = torch.ones((), device=learn.device)  # `scaler.scale(one)` reads the scale without a sync
        self._end_cancelled_iteration()  # an earlier fit may have stopped between unscale_ and step

    def before_batch(self):
        self._armed, self._backward_cancelled = True, False
        self._end_cancelled_iteration()  # a CancelTrain / CancelEpoch skipped the last batch's after_batch

    def after_pred(self):
        self._armed = False
        self.learn.pred = _to_float32(self.learn.pred)

    def before_backward(self):
        learn = self.learn
        if self.scaler is None:  # bfloat16: nothing is scaled; the series still says so, batch by batch
            learn.recorder.log("loss_scale", 1.0)
            return
        learn.loss = self.scaler.scale(learn.loss)
        learn.recorder.log("loss_scale", self.scaler.scale(self._one))

    def after_cancel_backward(self):
        self._backward_cancelled = True  # no gradients were made: nothing to unscale

    def after_backward(self):
        # Reached only by micro-batches that step (GradientAccumulation cancels the others first).
        if self.scaler is not None and not self._backward_cancelled:
            self.scaler.unscale_(self.learn.opt)  # also records whether the gradients overflowed
            self._unscaled = True
        self._backward_cancelled = False

    def before_step(self):
        if not self._unscaled:
            return
        # unscale_ recorded a found-inf flag per device: any non-zero means this step must not happen
        found_inf = self.scaler._found_inf_per_device(self.learn.opt)
        if sum(v.item() for v in found_inf.values()):
            self._overflows += 1
            raise CancelStep  # weights untouched; after_step still updates (backs off) the scale

    def after_step(self):
        if self._unscaled:  # the step happened or was skipped; the loop zeroes the gradients next
            self.scaler.update()
            self._unscaled = False

    def after_batch(self):
        self._armed = False
        self._end_cancelled_iteration()

    def _end_cancelled_iteration(self) -> None:
        """Unscaled, but the batch was cancelled before its step events (CancelBatch keeps the gradients for a
        later step): end the scaler's iteration (it refuses a second unscale_ before update()) and put the kept
        gradients back into the scale the next backward adds to and the next unscale_ divides by."""
        if not self._unscaled:
            return
        self.scaler.update()
        self._unscaled = False
        grads = [p.grad for group in self.learn.opt.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.scaler.scale(self._one))

    def after_fit(self):
        self._remove_hooks()
        self._exit_autocast(None, None, None)  # a forward that raised before its hook could close it

    # ---- checkpointing ---------------------------------------------------------------------------------------
    def _scaler_state(self) -> dict | None:
        if self.scaler is not None:
            return self.scaler.state_dict()
        return None if self._loaded_scaler_state is None else dict(self._loaded_scaler_state)

    def state_dict(self) -> dict:
        state = self._scaler_state()
        if state is None and self.dtype is torch.float16:
            a = self._scaler_args
            state = {"scale": a["init_scale"], "growth_factor": a["growth_factor"],
                     "backoff_factor": a["backoff_factor"], "growth_interval": a["growth_interval"],
                     "_growth_tracker": 0}
        return {"scaler": state or {}, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        scaler_state = dict(state["scaler"])
        if scaler_state and self.dtype is torch.float16:
            if self.scaler is not None:
                self.scaler.load_state_dict(scaler_state)
            else:
                self._loaded_scaler_state = scaler_state
        self._overflows = int(state["overflows"])
