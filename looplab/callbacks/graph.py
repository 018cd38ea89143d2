"""ShowGraph: the loss curves, redrawn whenever a validation adds a history row."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

from ..callback import Callback
from ..display import NotebookDisplay, in_notebook
from ..util import is_main_process
from .order import Order

__all__ = ["ShowGraph", "loss_figure"]


def loss_figure(recorder):
    """Training loss per step and `valid_loss` per history row (at the row's last training step: its
    `train_iter - 1`, or the end of its epoch), as a matplotlib Figure (made without pyplot: no global state)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    losses = recorder.losses
    ax.plot(range(len(losses)), losses, label="train")
    steps, valid = [], []
    for i, row in enumerate(recorder.history):
        step = row["train_iter"] - 1 if "train_iter" in row else (
            recorder.epoch_ends[i] if i < len(recorder.epoch_ends) else None)
        if step is not None and isinstance(row.get("valid_loss"), float) and not math.isnan(row["valid_loss"]):
            steps.append(step)
            valid.append(row["valid_loss"])
    if valid:
        ax.plot(steps, valid, "o-", label="valid")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


class ShowGraph(Callback):
    """Redraw the loss curves (`loss_figure`: train per step, valid per history row) whenever a new history row
    appears (checked after each validation and at the end of each epoch).

    In a notebook (`html=None`: detected; True / False to force) the plot is one output below the cell, redrawn in
    place. Elsewhere (a script, a terminal) it is written as a PNG to `path` (default `loss.png` in the current
    directory), replaced atomically at every redraw so an image viewer can keep it open. `figure` is the last
    Figure drawn. Only rank 0 draws."""
    order = Order.PROGRESS
    during_lr_find = False

    def __init__(self, path: str | os.PathLike = "loss.png", html: bool | None = None):
        self.path, self.html = Path(path), html
        self.figure = None
        self.active = False

    def before_fit(self):
        self.active = is_main_process()
        self.in_html = self.active and (in_notebook() if self.html is None else bool(self.html))
        self.display = NotebookDisplay()
        self.n_rows = 0

    def _redraw(self) -> None:
        history = self.learn.recorder.history
        if not self.active or len(history) <= self.n_rows:
            return
        self.n_rows = len(history)
        self.figure = fig = loss_figure(self.learn.recorder)
        if self.in_html:
            from IPython.display import Image
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=80)
            self.display.show(Image(data=buf.getvalue(), format="png"))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp{self.path.suffix}")
        fig.savefig(tmp)
        os.replace(tmp, self.path)

    def after_validate(self):
        self._redraw()

    def after_epoch(self):
        self._redraw()
