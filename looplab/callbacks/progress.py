"""ProgressBar: a tqdm bar per phase with the running loss, and one table row per epoch."""
from __future__ import annotations

import math

from tqdm.auto import tqdm

from ..callback import Callback
from ..util import is_main_process

__all__ = ["ProgressBar"]


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) and not math.isnan(v) else str(v) if not isinstance(v, float) else "nan"


class ProgressBar(Callback):
    """On by default (`Learner(..., progress=False)` turns it off). Only rank 0 of a distributed run shows it.

    The bar is advanced about `updates_per_epoch` times per phase, not every batch, so it costs the per-batch
    path one integer comparison.
    """
    order = 60  # after the Recorder, whose values it shows

    def __init__(self, updates_per_epoch: int = 20):
        self.updates_per_epoch = updates_per_epoch
        self.bar = None

    def before_fit(self):
        self.show = is_main_process()
        self.header_done = False

    def _open(self, desc: str):
        learn = self.learn
        if not self.show:
            self.next_update = math.inf
            return
        self.bar = tqdm(total=learn.n_iter, desc=f"epoch {learn.epoch} {desc}", leave=False, dynamic_ncols=True)
        self.done = learn.iter if learn.n_iter is None else 0
        self.every = max(1, (learn.n_iter or 100) // self.updates_per_epoch)
        self.next_update = getattr(learn.dl, "offset", 0) + self.every - 1

    def before_train(self):
        self._open("train")

    def before_validate(self):
        if getattr(self, "show", False):  # validate() outside fit shows no bar
            self._open("valid")
        else:
            self.next_update = math.inf

    def after_batch(self):
        learn = self.learn
        if learn.iter < self.next_update:
            return
        self.next_update = learn.iter + self.every
        self.bar.update(learn.iter + 1 - self.bar.n)
        if learn.training:
            recent = learn.recorder.losses[-self.every:]
            if recent:
                self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)

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
