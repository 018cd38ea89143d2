"""TensorBoard: every value the Recorder gets, as scalars, and weight histograms each epoch."""
from __future__ import annotations

import os

from torch.utils.tensorboard import SummaryWriter

from ..callback import Callback
from ..checks import check_int
from ..display import markdown_table
from ..util import is_main_process, unwrap_model
from .loggers import published, row_step
from .order import Order

__all__ = ["TensorBoard", "check_hparams", "write_hparams"]


def check_hparams(hparams: dict | None) -> dict | None:
    """`hparams` for TensorBoard's HParams plugin: None, or a dict of names to numbers, strings or bools."""
    if hparams is None:
        return None
    if not isinstance(hparams, dict) or not all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                                for k, v in hparams.items()):
        raise ValueError(f"hparams must be a dict of names to numbers, strings or bools, got {hparams!r}")
    return dict(hparams)


def write_hparams(writer: SummaryWriter, hparams: dict, history: list[dict]) -> None:
    """One HParams session in `writer`'s run: `hparams`, and as its metrics the last history row's values, written
    as scalars `hparams/<name>` (the HParams tab reads a metric's value from the scalar of its name)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries
    row = history[-1] if history else {}
    metrics = {f"hparams/{k}": v for k, v in row.items()
               if k not in ("epoch", "time", "train_iter") and isinstance(v, float)}
    for summary in hparams_summaries(hparams, metrics):
        writer.file_writer.add_summary(summary)
    for name, value in metrics.items():
        writer.add_scalar(name, value)


class TensorBoard(Callback):
    """Writes `train_loss` and `lr` per step, every `recorder.log` series, each history row's `valid_loss` and
    metrics at the row's `train_iter` (per epoch, or per validation with `valid_every`, as soon as the row is
    written), and a histogram of every parameter each epoch. Only rank 0 writes. Published
    histograms and tables (the loggers' channel, `looplab/callbacks/loggers.py`) are written as histograms and as
    markdown text (the Text tab) at their steps.

    Values are written from the Recorder's floats at every epoch's end and, within an epoch, after every
    `flush_every`-th training batch of the fit (all values recorded so far, at their usual steps), so a long epoch
    is visible while it runs; between those points logging costs the per-step path one modulo. On an accelerator
    reading the values is the Recorder's one batched transfer, which also keeps its device memory bounded.
    `flush_every=None` writes at epoch ends only.

    Across fits with the same callback, a later fit continues the step count where the last one stopped (its
    step 0 is written at the earlier fits' total number of steps), so no step of the run is ever written twice;
    `step_base` is that offset, and a checkpoint carries it, so a resumed fit writes where the interrupted one
    would have. Use a new `log_dir` (or a new TensorBoard callback) for a separate run.

    `hparams` (a dict of numbers, strings, bools): the end of the fit writes an HParams session with them, whose
    metrics are the last history row's values, so TensorBoard's HParams tab compares runs (one `log_dir` each).
    """
    order = Order.TENSORBOARD
    during_lr_find = False
    active = False  # this process writes (set in before_fit)

    def __init__(self, log_dir: str | os.PathLike = "runs", histograms: bool = True, hparams: dict | None = None,
                 flush_every: int | None = 100):
        self.log_dir, self.histograms = str(log_dir), histograms
        self.flush_every = check_int("flush_every", flush_every, 1, none_ok=True)
        self.hparams = check_hparams(hparams)  # with hparams: an HParams session at the end of the fit
        self.writer = None
        self.step_base, self._next_base, self._started = 0, 0, False

    def before_fit(self):
        self.active = is_main_process()
        if self.active and self.writer is None:
            self.writer = SummaryWriter(self.log_dir)
        self.n_written: dict[str, int] = {}
        self.n_rows = 0  # history rows written
        self.step_base, self._started = self._next_base, True

    def _write_series(self, name: str, pairs) -> None:
        start = self.n_written.get(name, 0)
        base = self.step_base
        for step, value in pairs[start:]:
            self.writer.add_scalar(name, value, base + step)
        self.n_written[name] = len(pairs)

    def _write_recorded(self) -> int:
        """Every per-step value the Recorder holds that is not written yet; returns the steps recorded."""
        rec = self.learn.recorder
        losses = rec.losses  # reading turns pending device tensors into floats (one transfer)
        self._write_series("train_loss", list(enumerate(losses)))
        self._write_series("lr", list(enumerate(rec.lrs)))
        for name in rec.series_names:
            self._write_series(name, rec.series(name))
        return len(losses)

    def after_batch(self):
        every, learn = self.flush_every, self.learn
        if every is not None and learn.training and (learn.train_iter + 1) % every == 0 and self.active:
            self._write_recorded()
            self.writer.flush()

    def _write_rows(self) -> None:
        history = self.learn.recorder.history
        for row in history[self.n_rows:]:
            step = self.step_base + row_step(self.learn, row)
            for name, value in row.items():
                if name not in ("epoch", "train_iter", "train_loss", "time"):
                    self.writer.add_scalar(name, value, step)
        self.n_rows = len(history)

    def after_validate(self):
        if self.active and self.writer is not None and len(self.learn.recorder.history) > self.n_rows:
            self._write_recorded()  # a row of a validation (`valid_every`): everything up to it, then the row
            self._write_rows()
            self.writer.flush()

    def after_epoch(self):
        if not self.active:
            return
        step = self.step_base + self._write_recorded()
        self._write_rows()
        if self.histograms:
            for name, p in unwrap_model(self.learn.model).named_parameters():
                self.writer.add_histogram(name, p.detach().float().cpu(), step)
        for name, entries in published(self.learn, "histograms").items():  # e.g. PredictionHistogram's
            for at, values in entries[self.n_written.get(name, 0):]:
                self.writer.add_histogram(name, values, self.step_base + at)
            self.n_written[name] = len(entries)
        for name, entries in published(self.learn, "tables").items():  # e.g. SamplePredictions', as text
            key = f"{name}/text_summary"  # the text plugin's tag; a distinct key in n_written
            for at, rows in entries[self.n_written.get(key, 0):]:
                self.writer.add_text(name, markdown_table(rows), self.step_base + at)
            self.n_written[key] = len(entries)
        self.writer.flush()

    def state_dict(self) -> dict:
        return {"n_written": dict(self.n_written), "step_base": self.step_base, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        self.n_written = dict(state["n_written"])
        self.step_base = int(state.get("step_base", 0))
        self.n_rows = int(state.get("n_rows", len(self.learn.recorder.history) if self.learn is not None else 0))

    def after_fit(self):
        if self._started:  # not when an earlier callback's before_fit failed before ours ran
            self._next_base, self._started = self.step_base + len(self.learn.recorder.losses), False
        if self.writer is not None and self.hparams is not None:
            write_hparams(self.writer, self.hparams, self.learn.recorder.history)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
