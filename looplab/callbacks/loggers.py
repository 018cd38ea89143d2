"""Experiment loggers: CSVLogger (a file of the history rows) and MLflowLogger (a run in an MLflow tracking store).

Both follow `learn.recorder.history`: every row appended since they last looked (at the end of an epoch, or
mid-epoch after a validation) is logged once, at the step `row["train_iter"]` (training batches done when it was
written; rows without that key are taken at the number of recorded steps). Both carry how far they got in their
`state_dict`, so a fit resumed from a checkpoint continues the same file or run without a duplicated row or step.
Only rank 0 writes.

Non-scalar results reach the loggers through one channel: a callback that produces them publishes them as the
attribute `published_histograms` (`{name: [(train_iter, 1-d numpy array), ...]}`) and/or `published_tables`
(`{name: [(train_iter, list of row dicts), ...]}`), appending in order (`PredictionHistogram`, `SamplePredictions`).
`published(learn, "histograms")` collects them; a logger writes the entries it has not written yet.
"""
from __future__ import annotations

import csv
import inspect
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from ..callback import Callback
from ..util import is_main_process, unwrap_model
from .order import Order

__all__ = ["CSVLogger", "MLflowLogger", "published", "row_step", "simple_params"]


def row_step(learn, row: dict) -> int:
    """The training step a history row belongs to: its `train_iter`, else the steps recorded so far."""
    step = row.get("train_iter")
    return int(step) if step is not None else len(learn.recorder.losses)


def published(learn, kind: str) -> dict[str, list]:
    """Every callback's `published_histograms` or `published_tables` (`kind` "histograms" or "tables"; see the
    module docstring), merged by name."""
    merged: dict[str, list] = {}
    for cb in learn.cbs:
        for name, entries in (getattr(cb, f"published_{kind}", None) or {}).items():
            merged.setdefault(name, []).extend(entries)
    return merged


def _simple(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def mlflow_key(name: str) -> str:
    """`name` as an MLflow metric key: characters MLflow refuses (e.g. the `<lambda>` of a lambda metric's name)
    become `_`; the mapping is fixed, so a resumed run finds its keys again."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def simple_params(learn) -> dict[str, Any]:
    """What a fit was run with, as flat `name: value` pairs of numbers / strings: the Learner's lr, optimizer,
    loss, model class, batch size and number of epochs, and each callback's constructor arguments that are simple
    values (as `CallbackName.argument`)."""
    lrs = [g["lr"] for g in learn.opt.param_groups]  # set for this fit before before_fit (fit(lr=), lr_max=)
    params = {"lr": lrs[-1] if len(set(lrs)) == 1 else f"slice({lrs[0]}, {lrs[-1]})",
              "opt_func": getattr(learn.opt_func, "__name__", type(learn.opt_func).__name__),
              "loss_func": getattr(learn.loss_func, "__name__", type(learn.loss_func).__name__),
              "model": type(unwrap_model(learn.model)).__name__,
              "n_epochs": learn.n_epochs, "n_steps": learn.n_steps}
    bs = getattr(learn.dls.train, "bs", None) or getattr(learn.dls.train, "batch_size", None)
    if bs is not None:
        params["batch_size"] = bs
    for cb in learn.cbs:
        try:
            names = [p.name for p in inspect.signature(type(cb).__init__).parameters.values()
                     if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            continue
        for name in names:
            value = getattr(cb, name, None)
            if isinstance(value, Path):
                value = str(value)
            if _simple(value) and value is not None:
                params[f"{cb.name}.{name}"] = value
    return params


def _cell(value: Any) -> str:
    """A CSV cell: floats in full precision (repr), so reading back gives the same number."""
    return repr(value) if isinstance(value, float) else str(value)


class CSVLogger(Callback):
    """Write every history row to the CSV file `path`, one line per row; the columns are the rows' keys.

    A fresh fit starts a new file. A fit resumed from a checkpoint keeps the rows written up to the checkpoint,
    drops any written after it (by the run that was interrupted), and appends: no row appears twice. A row with
    a key the file has no column for rewrites the file with that column added (earlier rows leave it empty).
    """
    order = Order.LOGGERS
    during_lr_find = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.n_rows = 0  # history rows written to the file
        self.columns: list[str] = []
        self._resumed_rows: int | None = None
        self._starting = False
        self.active = False

    def state_dict(self) -> dict:
        return {"n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        self._resumed_rows = int(state["n_rows"])

    def before_fit(self):
        self.active = is_main_process()
        self.n_rows, self._resumed_rows, self._starting = 0, None, True

    def before_epoch(self):
        if self._starting:  # Resume (the last before_fit) has loaded by now: start the file or continue it
            self._starting = False
            if self.active:
                self._start_file()

    def _start_file(self) -> None:
        kept: list[dict] = []
        if self._resumed_rows is not None:
            kept = self._read_rows()[:self._resumed_rows]
            if len(kept) < self._resumed_rows:  # the file is gone or shorter: rebuild it from the history
                kept = [{k: _cell(v) for k, v in row.items()}
                        for row in self.learn.recorder.history[:self._resumed_rows]]
        self.n_rows = len(kept)
        self.columns = list(dict.fromkeys(k for row in kept for k in row))
        self._rewrite(kept)

    def _read_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        """Write the whole file (header and `rows`) to a temporary next to it, then rename it into place."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def _write_new_rows(self) -> None:
        history = self.learn.recorder.history
        if len(history) <= self.n_rows or self._starting:
            return
        new = [{k: _cell(v) for k, v in row.items()} for row in history[self.n_rows:]]
        self.n_rows = len(history)
        added = [k for row in new for k in row if k not in self.columns]
        if added or not self.path.is_file():
            old = self._read_rows()
            self.columns += list(dict.fromkeys(added))
            self._rewrite(old + new)
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerows(new)

    def after_validate(self):
        if self.active:
            self._write_new_rows()  # a row of a validation (`valid_every`: mid-epoch too)

    def after_epoch(self):
        if self.active:
            self._write_new_rows()

    def after_fit(self):
        if self.active and not self._starting:
            self._write_new_rows()


def _import_mlflow():
    try:
        import mlflow.entities
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ImportError("MLflowLogger needs mlflow, an optional extra: pip install 'looplab[mlflow]'") from e
    return MlflowClient, mlflow.entities


class MLflowLogger(Callback):
    """Track the fit as an MLflow run: params at the start, every recorded series per step, validation values per
    history row, the loss/lr plots, published histograms (`histograms/<name>.json`: each entry's step and values),
    published tables (`tables/<name>.json`, an MLflow table with a `step` column) and with `log_model=True` the
    model's `state_dict` as artifacts.

    `tracking_uri`: e.g. `"sqlite:///mlflow.db"` (a local database) or a tracking server's URL; None: MLflow's
    default (`MLFLOW_TRACKING_URI`, else `./mlruns`). `run_id` names the run once the first epoch starts.

    Per step it only reads a clock: values are read from the Recorder and sent in batches (`log_batch`) at most
    every `flush_s` seconds, and at the end of the fit. `train_loss`, `lr` and every `recorder.log` series are
    logged at `step = train_iter`; each history row's other values (`valid_loss`, metrics) at the row's step.
    The run ends FINISHED, FAILED when the fit raises, KILLED on Ctrl-C or when a `Checkpoint` stopped the fit on
    a signal. The run id and how far it got travel in `state_dict`: a fit resumed from a checkpoint continues the
    same run, and skips steps the interrupted fit had already sent.
    """
    order = Order.LOGGERS
    during_lr_find = False
    ROW_SKIP = ("epoch", "train_loss", "time", "train_iter")  # row keys that are not validation values

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "looplab", run_name: str | None = None,
                 log_model: bool = False, flush_s: float = 5.0):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.log_model, self.flush_s = log_model, flush_s
        self.run_id: str | None = None
        self.active = False
        self._client = None
        self._resumed: dict | None = None
        self._starting = False

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.active and self.run_id is not None and not self._starting:
            self._flush()  # so what the checkpoint says was sent has been sent
        return {"run_id": self.run_id, "sent": dict(getattr(self, "_sent", {})), "n_rows": getattr(self, "n_rows", 0)}

    def load_state_dict(self, state: dict) -> None:
        self._resumed = dict(state)

    # ---- events ------------------------------------------------------------------------------------------------
    def before_fit(self):
        self.active = is_main_process()
        self._resumed, self._starting = None, True
        self._sent: dict[str, int] = {}  # series -> entries of the Recorder sent
        self.n_rows = 0
        self._row_steps: list[tuple[int, dict]] = []  # rows seen, not yet sent
        self._done_steps: dict[str, int] = {}  # after a resume: the last step the run already holds, per key
        self._table_steps: dict[str, int] = {}  # published table -> the last step the run holds
        if self.active:
            MlflowClient, self._entities = _import_mlflow()
            self._client = MlflowClient(self.tracking_uri)

    def before_epoch(self):
        if not self._starting:
            return
        self._starting = False  # Resume (the last before_fit) has loaded by now: continue its run or start one
        if not self.active:
            return
        client, learn = self._client, self.learn
        if self._resumed is not None and self._resumed.get("run_id"):
            self.run_id = self._resumed["run_id"]
            self._sent, self.n_rows = dict(self._resumed["sent"]), int(self._resumed["n_rows"])
            client.update_run(self.run_id, status="RUNNING")
            for key in client.get_run(self.run_id).data.metrics:
                self._done_steps[key] = max(m.step for m in client.get_metric_history(self.run_id, key))
            self._next_flush = time.perf_counter() + self.flush_s
            return
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(self.experiment_name))
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        Param = self._entities.Param
        params = [Param(k, str(v)[:6000]) for k, v in simple_params(learn).items()]
        for i in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[i:i + 100])
        self._next_flush = time.perf_counter() + self.flush_s

    def _note_rows(self) -> None:
        history = self.learn.recorder.history
        if len(history) > self.n_rows:
            self._row_steps += [(row_step(self.learn, row), row) for row in history[self.n_rows:]]
            self.n_rows = len(history)

    def after_batch(self):
        if not self.active or self._starting or not self.learn.training:
            return
        self._note_rows()
        if time.perf_counter() >= self._next_flush:
            self._flush()

    def after_epoch(self):
        if self.active and not self._starting:
            self._note_rows()
            if time.perf_counter() >= self._next_flush:
                self._flush()

    def _flush(self) -> None:
        """Send everything recorded since the last flush, in batches of at most 1000 values."""
        rec, Metric = self.learn.recorder, self._entities.Metric
        now = int(time.time() * 1000)
        values: list[tuple[str, float, int]] = []

        def take(key: str, pairs) -> None:
            start = self._sent.get(key, 0)
            values.extend((key, v, step) for step, v in pairs[start:])
            self._sent[key] = len(pairs)

        take("train_loss", list(enumerate(rec.losses)))
        take("lr", list(enumerate(rec.lrs)))
        for name in rec.series_names:
            take(name, rec.series(name))
        self._note_rows()
        for step, row in self._row_steps:
            values += [(k, v, step) for k, v in row.items()
                       if k not in self.ROW_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._row_steps = []
        metrics = [Metric(mlflow_key(k), float(v), now, int(step)) for k, v, step in values
                   if step > self._done_steps.get(mlflow_key(k), -1)]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self._next_flush = time.perf_counter() + self.flush_s

    def after_fit(self):
        if not self.active or self.run_id is None or self._starting:
            return
        learn, client = self.learn, self._client
        exc = learn.exception
        stopped = any(getattr(cb, "stopped_by", None) for cb in learn.cbs)
        status = ("KILLED" if isinstance(exc, KeyboardInterrupt) or (exc is None and stopped)
                  else "FAILED" if exc is not None else "FINISHED")
        try:
            self._flush()
            self._log_artifacts()
        except BaseException:
            status = "FAILED"  # what was logged is incomplete: the run says so
            raise
        finally:
            client.set_terminated(self.run_id, status)

    def _log_table(self, name: str, entries: list) -> None:
        """Append the entries of the published table `name` newer than what the run's `tables/<name>.json` holds
        (MLflow's `log_table` appends; a resumed run must not repeat a step) as rows with a `step` column."""
        client, path = self._client, f"tables/{name}.json"
        done = self._table_steps.get(name)
        if done is None:  # first time this fit: what the run already holds (a resumed run may hold some)
            done = -1
            if any(f.path == path for f in client.list_artifacts(self.run_id, "tables")):
                import pandas as pd
                with tempfile.TemporaryDirectory() as tmp:
                    held = pd.read_json(client.download_artifacts(self.run_id, path, tmp), orient="split")
                done = int(held["step"].max()) if len(held) else -1
        rows = [{"step": int(step), **row} for step, table in entries if step > done for row in table]
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            client.log_table(self.run_id, {c: [row.get(c) for row in rows] for c in columns}, path)
            done = max(row["step"] for row in rows)
        self._table_steps[name] = done

    def _log_artifacts(self) -> None:
        learn, client = self.learn, self._client
        with tempfile.TemporaryDirectory() as tmp:
            if learn.recorder.losses:
                for name, fig in (("loss.png", learn.recorder.plot_loss()), ("lr.png", learn.recorder.plot_lr())):
                    fig.savefig(os.path.join(tmp, name))
                    client.log_artifact(self.run_id, os.path.join(tmp, name), "plots")
            for name, entries in published(learn, "histograms").items():  # e.g. PredictionHistogram's pred_prob
                client.log_dict(self.run_id, [{"step": int(step), "values": [float(v) for v in values]}
                                              for step, values in entries], f"histograms/{name}.json")
            for name, entries in published(learn, "tables").items():  # e.g. SamplePredictions'
                self._log_table(name, entries)
            if self.log_model:
                import torch
                path = os.path.join(tmp, "model_state_dict.pt")
                torch.save(unwrap_model(learn.model).state_dict(), path)
                client.log_artifact(self.run_id, path, "model")
