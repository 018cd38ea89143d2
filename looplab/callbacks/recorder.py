"""Recorder: per-step losses and lrs, any logged series, validation results and the history rows."""
from __future__ import annotations

import math
import numbers
import time
from typing import Any, Callable

import torch
from torch import nn

from ..callback import Callback
from ..metrics import check_metrics, is_metric_object, metric_name
from ..util import first_tensor
from .order import Order

__all__ = ["Recorder"]


def _as_scalar(metric, value, device: torch.device) -> torch.Tensor:
    """A metric's value as a 0-dim float32 tensor on `device`; a clear error for anything but a number or a
    one-element tensor (metadata checks only: no host sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {metric_name(metric)!r} must return a number or a one-element tensor, got a "
                             f"tensor of shape {tuple(value.shape)}")
        if value.ndim:
            value = value.reshape(())
        return value.to(device=device, dtype=torch.float32)  # no copy when it is already so
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), device=device)
    raise ValueError(f"metric {metric_name(metric)!r} must return a number or a one-element tensor, got {value!r}")


def _batch_size(learn) -> int:
    """Samples in the batch: the length of `yb`, else of the first tensor in `xb` (a tuple's, a mapping's)."""
    yb = learn.yb
    if isinstance(yb, torch.Tensor) and yb.ndim:
        return len(yb)
    first = first_tensor(learn.xb)
    if first is None or not first.ndim:
        raise ValueError(f"cannot tell the batch size: no targets and no tensor among the inputs "
                         f"({type(learn.xb).__name__})")
    return first.shape[0]


class Recorder(Callback):
    """Always on as `learn.recorder`. Reset at the start of every fit.

    Per training step it keeps the loss (after callbacks such as MixUp set it, before anything scales it for
    backward) and the lr of the last parameter group. Tensors on an accelerator are kept (detached) and turned into
    floats in one batch (one transfer) every `flush_every` steps, at each history row and when read, so recording
    costs no host sync per step and its device memory stays bounded however long an epoch is; CPU tensors are read
    at once (no sync there). What it exposes and saves is plain floats, never tensors or graphs.

    `history` has one row per epoch (at its end), or with `fit(..., valid_every=K)` one per validation of the fit:
    `epoch` (of the last training batch done), `train_iter` (training batches done), `train_loss` (the mean since
    the previous row; per epoch: over the epoch), `valid_loss` and every metric when there was validation, and
    `time` (seconds since the previous row or the fit's start). `validate()` outside a fit adds no row.

    Validation (one host sync per phase): the loss and every metric function's value are summed, times the batch
    size, on the device, so `valid_loss` and those metrics are per-sample means over the whole set; a metric
    object (`update` / `compute` / `reset`, see `looplab.metrics`) is reset in `before_validate`, updated with
    every batch and computed once in `after_validate`. A metric must give a number or a one-element tensor.

    `reduce_valid_sums` is the channel for data-parallel training: a function (or None) that a distributed callback
    may set for the duration of a fit. At the end of each validation phase the Recorder passes it a float64 tensor
    of this process's sums, `[loss·n, f·n for each metric function f, n]` (zeros if the process saw no batch), on
    `learn.device`, and takes what it returns (the sums over all processes) in its place. Metric objects combine
    their own state across processes in `compute()`.
    """
    order = Order.RECORDER
    flush_every = 100  # training steps between two transfers of pending accelerator tensors

    def __init__(self):
        self._reset()
        self.last_validation: dict[str, float] = {}
        self.reduce_valid_sums: Callable[[torch.Tensor], torch.Tensor] | None = None  # see the class docstring
        self._valid_sums: torch.Tensor | None = None  # this phase's sums: loss·n, then each function's value·n
        self._valid_count = 0
        self._metrics: list = []  # this phase's metrics; of them, the functions and the metric objects
        self._functions: list = []
        self._objects: list = []

    def _reset(self) -> None:
        self._losses: list[Any] = []
        self.lrs: list[float] = []
        self._series: dict[str, list[list]] = {}
        self._n_flushed, self._series_flushed = 0, {}  # how much of each list holds floats already
        self.history: list[dict[str, float]] = []
        self.epoch_start = 0  # index in `losses` of the current epoch's first step
        self.row_start = 0  # index in `losses` of the first step after the last history row
        self.epoch_ends: list[int] = []  # index in `losses` of each history row's last step (for plots)
        self._in_fit = False

    # ---- reading -------------------------------------------------------------------------------------------
    @property
    def losses(self) -> list[float]:
        """Training loss of every step of the last fit."""
        self.flush()
        return self._losses

    def series(self, name: str) -> list[tuple[int, float]]:
        """The `(train_iter, value)` pairs logged under `name`."""
        if name not in self._series:
            raise KeyError(f"no series named {name!r}; logged: {sorted(self._series)}")
        self.flush()
        return [(int(i), v) for i, v in self._series[name]]

    @property
    def series_names(self) -> list[str]:
        return list(self._series)

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Record `value` under `name` at the current `train_iter` (a tensor is read later, without a sync now)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"series name must be a non-empty string, got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"recorder.log({name!r}, …) takes a scalar, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            value = value.item() if value.is_cpu else value.detach()
        self._series.setdefault(name, []).append([self.learn.train_iter, value])

    def flush(self) -> None:
        """Turn the tensors recorded since the last flush into floats (one host transfer)."""
        slots = [(self._losses, i) for i in range(self._n_flushed, len(self._losses))]
        self._n_flushed = len(self._losses)
        for name, entries in self._series.items():
            done = self._series_flushed.get(name, 0)
            slots += [(entries[i], 1) for i in range(done, len(entries)) if isinstance(entries[i][1], torch.Tensor)]
            self._series_flushed[name] = len(entries)
        slots = [(holder, i) for holder, i in slots if isinstance(holder[i], torch.Tensor)]
        if not slots:
            return
        tensors = [holder[i] for holder, i in slots]
        try:  # one stack, one transfer (a per-tensor reshape or cast here would cost ~3 µs per step)
            values = torch.stack(tensors).reshape(-1).tolist()
        except RuntimeError:  # shapes (), (1,) mixed, or tensors on several devices
            values = [t.item() for t in tensors]
        for (holder, i), v in zip(slots, values):
            holder[i] = float(v)

    # ---- events --------------------------------------------------------------------------------------------
    def before_fit(self):
        self._reset()
        self._row_t0, self._in_fit = time.perf_counter(), True

    def after_fit(self):
        self._in_fit = False

    def before_epoch(self):
        self.last_validation = {}

    def before_train(self):
        if self.learn.iter == 0:  # an epoch resumed mid-way (at an offset) keeps the start its restored state holds
            self.epoch_start = len(self._losses)

    def before_validate(self):
        learn = self.learn
        self._metrics = metrics = check_metrics(learn.metrics)
        self._functions = [m for m in metrics if not is_metric_object(m)]
        self._objects = [m for m in metrics if is_metric_object(m)]
        for m in self._objects:
            if isinstance(m, nn.Module):  # torchmetrics keeps its state in the module: on the batches' device
                m.to(learn.device)
            m.reset()
        self._valid_sums, self._valid_count = None, 0
        self.last_validation = {}

    def after_loss(self):
        learn = self.learn
        if learn.training:
            loss = learn.loss
            # On the CPU reading the value is no sync and is cheaper than keeping a tensor alive until the flush;
            # on an accelerator the tensor is kept and read in one batch every `flush_every` steps.
            if loss.is_cpu:
                self._losses.append(loss.item())
            else:
                self._losses.append(loss.detach())
                if len(self._losses) - self._n_flushed >= self.flush_every:
                    self.flush()
            self.lrs.append(learn.opt.param_groups[-1]["lr"])
            return
        n = _batch_size(learn)
        loss = learn.loss.detach().float()
        pred, yb = learn.pred, learn.yb
        values = [loss, *(_as_scalar(m, m(pred, yb), loss.device) for m in self._functions)]
        for m in self._objects:
            m.update(pred, yb)
        sums = torch.stack(values) * n
        self._valid_sums = sums if self._valid_sums is None else self._valid_sums + sums
        self._valid_count += n

    def _finish_validation(self) -> None:
        learn = self.learn
        sums, count = self._valid_sums, self._valid_count
        self._valid_sums, self._valid_count = None, 0
        if self.reduce_valid_sums is not None:
            mine = (torch.zeros(len(self._functions) + 2, dtype=torch.float64, device=learn.device) if sums is None
                    else torch.cat([sums.double(), sums.new_tensor([count], dtype=torch.float64)]))
            reduced = self.reduce_valid_sums(mine)
            sums, count = reduced[:-1], int(reduced[-1].item())
        if count == 0:  # no validation batch ran (in any process)
            return
        means = iter((sums / count).float())
        loss = next(means)
        values = [loss, *(_as_scalar(m, m.compute(), loss.device) if is_metric_object(m) else next(means)
                          for m in self._metrics)]
        names = ["valid_loss", *map(metric_name, self._metrics)]
        self.last_validation = dict(zip(names, torch.stack(values).tolist()))

    def after_validate(self):
        self._finish_validation()
        if self._in_fit and self.learn.valid_every is not None:
            self._add_row()

    def after_epoch(self):
        if self.learn.valid_every is None:
            self._add_row()
        else:
            self.flush()

    def _add_row(self) -> None:
        self.flush()
        learn = self.learn
        losses = self._losses[self.epoch_start if learn.valid_every is None else self.row_start:]
        now = time.perf_counter()
        self.history.append({"epoch": learn.epoch, "train_iter": learn.train_iter,
                             "train_loss": sum(losses) / len(losses) if losses else math.nan,
                             **self.last_validation, "time": now - self._row_t0})
        self._row_t0, self.row_start = now, len(self._losses)
        self.epoch_ends.append(len(self._losses) - 1)

    # ---- plots -----------------------------------------------------------------------------------------------
    def plot_loss(self, skip_start: int = 0):
        """Training loss per step, and validation loss at each history row's last step, as a matplotlib Figure."""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        losses = self.losses
        ax.plot(range(skip_start, len(losses)), losses[skip_start:], label="train")
        if any("valid_loss" in row for row in self.history):
            valid = [row.get("valid_loss", math.nan) for row in self.history]
            ax.plot(self.epoch_ends, valid, "o-", label="valid")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.legend()
        plt.close(fig)
        return fig

    def plot_lr(self):
        """The lr of every training step, as a matplotlib Figure."""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs)
        ax.set_xlabel("training step")
        ax.set_ylabel("lr")
        plt.close(fig)
        return fig

    # ---- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.flush()
        return {"losses": list(self._losses), "lrs": list(self.lrs), "history": [dict(r) for r in self.history],
                "series": {k: [list(e) for e in v] for k, v in self._series.items()},
                "epoch_start": self.epoch_start, "row_start": self.row_start, "epoch_ends": list(self.epoch_ends)}

    def load_state_dict(self, state: dict) -> None:
        self._losses, self.lrs = list(state["losses"]), list(state["lrs"])
        self.history = [dict(r) for r in state["history"]]
        self._series = {k: [list(e) for e in v] for k, v in state["series"].items()}
        self._n_flushed, self._series_flushed = len(self._losses), {k: len(v) for k, v in self._series.items()}
        self.epoch_start = int(state["epoch_start"])
        self.row_start = int(state.get("row_start", len(self._losses)))
        self.epoch_ends = [int(i) for i in state["epoch_ends"]]
