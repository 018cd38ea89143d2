"""ProgressBar: a tqdm bar per phase with the running loss, and one table row per epoch."""
from __future__ import annotations

import math
import time

from tqdm.auto import tqdm

from ..callback import Callback
from ..util import is_main_process
from .order import Order

__all__ = ["ProgressBar"]


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) and not math.isnan(v) else str(v) if not isinstance(v, float) else "nan"


class ProgressBar(Callback):
    """On by default (`Learner(..., progress=False)` turns it off). Only rank 0 of a distributed run shows it.

    The bar is redrawn at most every `refresh_s` seconds, not every batch, so it costs the per-batch path one
    clock read and a comparison; the running loss it shows is the mean since the last redraw.
    """
    order = Order.PROGRESS

    def __init__(self, refresh_s: float = 0.25):
        self.refresh_s = refresh_s
        self.bar = None

    show = False  # validate() outside a fit shows no bar

    def before_fit(self):
        self.show = is_main_process()
        self.header_done = False

    def _open(self, desc: str):
        learn = self.learn
        self.next_refresh = math.inf
        if not self.show:
            return
        self.bar = tqdm(total=learn.n_iter, desc=f"epoch {learn.epoch} {desc}", leave=False, dynamic_ncols=True,
                        initial=learn.iter)
        self.shown_losses = len(learn.recorder.losses)
        self.next_refresh = time.perf_counter() + self.refresh_s

    def before_train(self):
        self._open("train")

    def before_validate(self):
        self._open("valid")

    def after_batch(self):
        if time.perf_counter() < self.next_refresh:
            return
        learn = self.learn
        self.bar.update(learn.iter + 1 - self.bar.n)
        if learn.training:
            losses = learn.recorder.losses
            recent = losses[self.shown_losses:]
            self.shown_losses = len(losses)
            if recent:
                self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
        self.next_refresh = time.perf_counter() + self.refresh_s

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_train(self):
        self._close()

    def after_validate(self):
        self._close()

    def after_epoch(self):
        if not self.show:
            return
        row = self.learn.recorder.history[-1]
        names = list(row)
        if not self.header_done:
            tqdm.write("  ".join(f"{n:>10}" for n in names))
            self.header_done = True
        tqdm.write("  ".join(f"{_fmt(row[n]) if n != 'time' else f'{row[n]:.2f}s':>10}" for n in names))

    def after_fit(self):
        self._close()
        self.show = False  # validate() after the fit shows no bar
