"""ProgressBar: progress of each phase with the running loss, and a table of the history rows: text in a terminal
(a tqdm bar, one printed line per row), one HTML table redrawn in place in a notebook."""
from __future__ import annotations

import html as html_escape
import math
import time

from tqdm.auto import tqdm  # the text bar (a widget in a notebook with ipywidgets when html=False)

from ..callback import Callback
from ..display import NotebookDisplay, html_table, in_notebook
from ..util import is_main_process
from .order import Order

__all__ = ["ProgressBar"]


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) and not math.isnan(v) else str(v) if not isinstance(v, float) else "nan"


def _shown_row(row: dict) -> dict:
    return {k: f"{v:.2f}s" if k == "time" and isinstance(v, float) else v for k, v in row.items()}


class ProgressBar(Callback):
    """On by default (`Learner(..., progress=False)` turns it off). Only rank 0 of a distributed run shows it.

    `html`: None shows one HTML table of the history rows with an HTML `<progress>` bar under it when running in a
    Jupyter kernel (`looplab.display.in_notebook`), and text elsewhere; True / False forces either. In a notebook the
    whole display is one output, redrawn in place (one display handle per fit); when the fit ends only the table
    stays. In a terminal each new history row is printed as a line under a header line.

    A row is shown when it appears: checked after each validation and at the end of each epoch. The bar is
    redrawn at most every `refresh_s` seconds, not every batch, so it costs the per-batch path one clock read and a
    comparison; the running loss it shows is the mean since the last redraw.
    """
    order = Order.PROGRESS

    def __init__(self, refresh_s: float = 0.25, html: bool | None = None):
        self.refresh_s, self.html = refresh_s, html
        self.bar = None
        self.display: NotebookDisplay | None = None

    show = False  # validate() outside a fit shows no bar
    in_html = False
    next_refresh = math.inf  # no phase open
    training_open = False  # the open phase is training
    reopen = False  # a validation interrupted the training phase (`valid_every`): its bar comes back after it

    def before_fit(self):
        self.show = is_main_process()
        self.in_html = self.show and (in_notebook() if self.html is None else bool(self.html))
        self.display = NotebookDisplay() if self.in_html else None
        self.header_done = False
        self.n_rows = 0  # history rows shown so far
        self.status = ""  # html: the running loss shown after the bar
        self.reopen = False

    def _open(self, desc: str):
        learn = self.learn
        self.next_refresh, self.training_open = math.inf, learn.training
        if not self.show:
            return
        self.shown_losses = len(learn.recorder.losses)
        if self.in_html:
            self.phase, self.done, self.status = f"epoch {learn.epoch} {desc}", learn.iter, ""
            self._draw()
        else:
            self.bar = tqdm(total=learn.n_iter, desc=f"epoch {learn.epoch} {desc}", leave=False,
                            dynamic_ncols=True, initial=learn.iter)
        self.next_refresh = time.perf_counter() + self.refresh_s

    def before_train(self):
        self._open("train")

    def before_validate(self):
        self.reopen = self.bar_open and self.training_open  # mid-epoch: the training bar makes way
        self._close()
        self._open("valid")

    def after_batch(self):
        if time.perf_counter() < self.next_refresh:
            return
        learn = self.learn
        if self.reopen and learn.training:
            self.reopen = False
            self._open("train")
            if not self.show:
                return
        loss = None
        if learn.training:
            losses = learn.recorder.losses
            recent = losses[self.shown_losses:]
            self.shown_losses = len(losses)
            loss = sum(recent) / len(recent) if recent else None
        if self.in_html:
            self.done = learn.iter + 1
            if loss is not None:
                self.status = f" · loss {loss:.4f}"
            self._draw()
        else:
            self.bar.update(learn.iter + 1 - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.next_refresh = time.perf_counter() + self.refresh_s

    # ---- html -------------------------------------------------------------------------------------------------
    def _draw(self, bar: bool = True) -> None:
        """Redraw the one notebook output: the table of rows shown so far, and the bar while a phase runs."""
        rows = [_shown_row(r) for r in self.learn.recorder.history[:self.n_rows]]
        parts = [html_table(rows)] if rows else []
        if bar:
            total = self.learn.n_iter
            value = f' value="{self.done}" max="{total}"' if total else ""  # no length: an indeterminate bar
            count = f" {self.done}/{total}" if total else f" {self.done}"
            parts.append(f'<div><progress{value} style="width:40ex"></progress> '
                         f"{html_escape.escape(self.phase)}{count}{html_escape.escape(self.status)}</div>")
        self.display.show_html("".join(parts))

    # ---- rows -------------------------------------------------------------------------------------------------
    def _show_new_rows(self) -> None:
        history = self.learn.recorder.history
        if not self.show or len(history) <= self.n_rows:
            return
        new, self.n_rows = history[self.n_rows:], len(history)
        if self.in_html:
            self._draw(bar=self.bar_open)
            return
        for row in new:
            names = list(row)
            if not self.header_done:
                tqdm.write("  ".join(f"{n:>10}" for n in names))
                self.header_done = True
            tqdm.write("  ".join(f"{_fmt(row[n]) if n != 'time' else f'{row[n]:.2f}s':>10}" for n in names))

    @property
    def bar_open(self) -> bool:
        return self.next_refresh != math.inf

    def _close(self):
        self.next_refresh = math.inf
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_train(self):
        self._close()
        self.reopen = False

    def after_validate(self):
        self._close()
        self._show_new_rows()  # a row written after a validation (mid-epoch)
        if self.reopen:
            self.next_refresh = 0.0  # the next training batch reopens the training bar

    def after_epoch(self):
        self._show_new_rows()

    def after_fit(self):
        self._close()
        if self.in_html and self.display is not None and self.display.handle is not None:
            self._show_new_rows()
            self._draw(bar=False)  # what stays: the table alone
        self.show = self.in_html = False  # validate() after the fit shows no bar
