"""Hyper-parameter sweeps on Optuna: random search (or TPE) over a space, pruning, failing trials, shared studies.

```python
def objective(params, cbs):
    learn = Learner(make_model(), dls, F.cross_entropy, lr=params["lr"], cbs=cbs, progress=False)
    learn.fit_one_cycle(5)
    return learn

result = sweep(objective, {"lr": lr_space(learn.lr_find()), "wd": loguniform(1e-4, 1e-1)}, n_trials=20, seed=0)
result.best_params, result.table(), result.plot()
```

Several processes (or machines, with a database server) run one sweep together by sharing a study:
`storage="sqlite:///sweep.db"` (or `"postgresql://…"`) and the same `study_name`; each process runs its
`n_trials`, and Optuna gives every trial its own number. `optuna` is the optional extra `looplab[sweep]`.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .callback import Callback, CancelFit
from .callbacks.loggers import row_step
from .callbacks.order import Order
from .callbacks.tensorboard import TensorBoard
from .checks import check_int, check_number
from .data import derive_seed

__all__ = ["PruneTrial", "SweepResult", "choice", "intuniform", "loguniform", "lr_space", "sweep", "uniform"]


def _import_optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError("looplab.sweep needs optuna, an optional extra: pip install 'looplab[sweep]'") from e
    return optuna


# ---- the space --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class loguniform:
    """A float drawn uniformly on a log scale in [low, high]."""
    low: float
    high: float

    def __post_init__(self):
        check_number("loguniform low", self.low, 0, low_open=True)
        check_number("loguniform high", self.high, self.low, low_open=True)

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=True)


@dataclass(frozen=True)
class uniform:
    """A float drawn uniformly in [low, high]."""
    low: float
    high: float

    def __post_init__(self):
        check_number("uniform low", self.low)
        check_number("uniform high", self.high, self.low, low_open=True)

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high)


@dataclass(frozen=True)
class intuniform:
    """An int drawn uniformly from low, low + 1, …, high."""
    low: int
    high: int

    def __post_init__(self):
        check_int("intuniform low", self.low)
        check_int("intuniform high", self.high, self.low)

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)


@dataclass(frozen=True)
class choice:
    """One of `values` (numbers, strings, bools or None), each equally likely."""
    values: tuple

    def __init__(self, values):
        values = tuple(values)
        if not values or not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise ValueError(f"choice takes a non-empty list of numbers, strings, bools or None, got {values!r}")
        object.__setattr__(self, "values", values)

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.values)


_SPACES = (loguniform, uniform, intuniform, choice)


def lr_space(learn_or_result, factor: float = 10) -> loguniform:
    """`loguniform(valley / factor, valley * factor)` around the LR finder's valley suggestion: of an
    `LRFindResult`, or of a Learner (runs `learn.lr_find()`, which leaves the Learner as it was)."""
    check_number("factor", factor, 1, low_open=True)
    result = learn_or_result if hasattr(learn_or_result, "suggestions") else learn_or_result.lr_find()
    valley = result.suggestions["valley"]
    return loguniform(valley / factor, valley * factor)


# ---- pruning ------------------------------------------------------------------------------------------------------
class PruneTrial(Callback):
    """Reports `metric` of every history row (after each validation) to an Optuna trial, at the row's step, and
    stops the fit (`CancelFit`) when the study's pruner says the trial is hopeless; `pruned` is then True."""
    order = Order.PRUNE
    during_lr_find = False

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned, self.n_rows, self.in_train = False, 0, False

    def before_fit(self):
        self.pruned, self.n_rows = False, 0

    def _report(self) -> None:
        learn = self.learn
        history = learn.recorder.history
        if len(history) <= self.n_rows:
            return
        rows, self.n_rows = history[self.n_rows:], len(history)
        for row in rows:
            value = row.get(self.metric)
            if isinstance(value, float) and math.isfinite(value):
                self.trial.report(value, row_step(learn, row))
        if self.trial.should_prune():
            self.pruned = True
            raise CancelFit()

    def before_train(self):
        self.in_train = True

    def after_train(self):
        self.in_train = False

    def after_validate(self):
        if self.in_train:  # a row of a mid-epoch validation (`valid_every`); in the epoch's slot: after_epoch
            self._report()

    def after_epoch(self):
        self._report()


# ---- the result ---------------------------------------------------------------------------------------------------
class SweepResult:
    """What a sweep did: `trials` (dicts of `number, params, value, state, duration` in seconds, `error`),
    `best_params` / `best_value` (of the best completed trial), `study` (the Optuna study), `table()`, `plot()`.
    Trials are the study's: with shared storage, every process's."""

    def __init__(self, study, space: dict, metric: str):
        self.study, self.space, self.metric = study, space, metric

    @property
    def trials(self) -> list[dict]:
        return [{"number": t.number, "params": dict(t.params), "value": t.value, "state": t.state.name,
                 "duration": t.duration.total_seconds() if t.duration is not None else None,
                 "error": t.user_attrs.get("error")}
                for t in self.study.get_trials(deepcopy=False)]

    def _best(self):
        try:
            return self.study.best_trial
        except ValueError as e:
            raise ValueError(f"no trial of study {self.study.study_name!r} completed: {e}") from None

    @property
    def best_params(self) -> dict:
        return dict(self._best().params)

    @property
    def best_value(self) -> float:
        return self._best().value

    def table(self) -> str:
        """The trials as a text table, best first (failed and pruned trials last)."""
        trials = self.trials
        sign = -1 if self.study.direction.name == "MAXIMIZE" else 1
        trials.sort(key=lambda t: (t["value"] is None, sign * t["value"] if t["value"] is not None else 0))
        names = list(self.space)
        header = ["number", self.metric, "state", "seconds", *names]
        rows = [[str(t["number"]), "" if t["value"] is None else f"{t['value']:.6g}", t["state"],
                 "" if t["duration"] is None else f"{t['duration']:.1f}",
                 *(_fmt(t["params"].get(n)) for n in names)] for t in trials]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])

    def __repr__(self) -> str:
        return self.table()

    def plot(self):
        """The completed trials' value against each parameter (log axis for `loguniform`), as a matplotlib Figure."""
        import matplotlib.pyplot as plt
        done = [t for t in self.trials if t["state"] == "COMPLETE"]
        names = list(self.space)
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            xs = [t["params"][name] for t in done if name in t["params"]]
            ys = [t["value"] for t in done if name in t["params"]]
            if isinstance(self.space[name], choice):
                labels = [str(v) for v in self.space[name].values]
                ax.set_xticks(range(len(labels)), labels)
                xs = [labels.index(str(x)) for x in xs]
            ax.scatter(xs, ys)
            if isinstance(self.space[name], loguniform):
                ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel(self.metric)
        fig.tight_layout()
        plt.close(fig)
        return fig


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- the sweep ----------------------------------------------------------------------------------------------------
def _check_sweep(objective, space, n_trials, direction, sampler, pruner) -> None:
    if not callable(objective):
        raise TypeError(f"objective must be a function (params, cbs) -> Learner, got {objective!r}")
    if not isinstance(space, dict) or not space or not all(isinstance(v, _SPACES) for v in space.values()):
        raise ValueError(f"space must be a non-empty dict of names to loguniform / uniform / intuniform / choice, "
                         f"got {space!r}")
    check_int("n_trials", n_trials, 1)
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if isinstance(sampler, str) and sampler not in ("random", "tpe"):
        raise ValueError(f"sampler must be 'random', 'tpe' or an Optuna sampler, got {sampler!r}")
    if isinstance(pruner, str) and pruner != "median":
        raise ValueError(f"pruner must be None, 'median' or an Optuna pruner, got {pruner!r}")


def _trial_value(learn, metric: str) -> float:
    history = getattr(getattr(learn, "recorder", None), "history", None)
    if history is None:
        raise TypeError(f"the objective must return the Learner it fitted, got {type(learn).__name__}")
    if not history or metric not in history[-1]:
        raise ValueError(f"metric {metric!r} is not in the last history row "
                         f"({sorted(history[-1]) if history else 'no rows: did the objective fit?'})")
    value = history[-1][metric]
    if not math.isfinite(value):
        raise ValueError(f"metric {metric!r} is {value} in the last history row")
    return float(value)


def _create_study(optuna, **kwargs):
    """`optuna.create_study`, retried a few times: processes creating one new SQLite study at once race on its
    schema (an IntegrityError / OperationalError for all but one); the retry then loads the created study."""
    import sqlalchemy.exc
    for attempt in range(5):
        try:
            return optuna.create_study(**kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def sweep(objective: Callable[[dict, list], Any], space: dict, n_trials: int, metric: str = "valid_loss",
          direction: str = "minimize", sampler: str | Any = "random", seed: int | None = None,
          storage: str | None = None, study_name: str | None = None, pruner: str | Any | None = None,
          log_dir: str | os.PathLike | None = None) -> SweepResult:
    """Run `n_trials` trials: each draws params from `space`, calls `objective(params, cbs)` (which builds a
    Learner with the callbacks `cbs` added, fits it and returns it) and scores it by `metric` in the Learner's
    last history row.

    `sampler`: "random" (Optuna's RandomSampler) or "tpe"; the same `seed` draws the same params.
    `pruner="median"`: `cbs` holds a `PruneTrial` that stops a trial whose `metric` is worse than the median of
    earlier trials at the same step (recorded as PRUNED). A trial that raises is recorded as FAIL with its error
    (`trials[i]["error"]`, and a warning) and the sweep goes on; Ctrl-C records the trial as failed and stops.
    `storage` / `study_name`: an Optuna storage URL and study name, to share one study between processes (an
    existing study of that name is continued). `log_dir`: each trial logs TensorBoard to `log_dir/trial-{number}`
    with its params as hparams.
    """
    optuna = _import_optuna()
    _check_sweep(objective, space, n_trials, direction, sampler, pruner)
    per_trial = None
    if isinstance(sampler, str):
        kind = optuna.samplers.RandomSampler if sampler == "random" else optuna.samplers.TPESampler
        sampler = kind(seed=seed)
        if seed is not None:  # each trial's draws come from (seed, trial number): processes sharing a study with
            #                   the same seed draw different trials, and one process repeats its trials exactly
            per_trial = lambda number: kind(seed=derive_seed(seed, number) % 2**32)  # noqa: E731
    if pruner == "median":
        pruner = optuna.pruners.MedianPruner()
    study = _create_study(optuna, storage=storage, study_name=study_name, direction=direction, sampler=sampler,
                          pruner=pruner, load_if_exists=True)
    TrialState = optuna.trial.TrialState
    for _ in range(n_trials):
        trial = study.ask()
        if per_trial is not None:
            study.sampler = per_trial(trial.number)  # the trial draws its params through the study's sampler
        started = time.perf_counter()
        params: dict = {}
        try:
            params = {name: p.suggest(trial, name) for name, p in space.items()}
            cbs: list[Callback] = []
            prune = PruneTrial(trial, metric) if pruner is not None else None
            if prune is not None:
                cbs.append(prune)
            if log_dir is not None:
                hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
                cbs.append(TensorBoard(Path(log_dir) / f"trial-{trial.number}", histograms=False, hparams=hparams))
            learn = objective(dict(params), cbs)
            if prune is not None and prune.pruned:
                study.tell(trial, state=TrialState.PRUNED)
                continue
            value = _trial_value(learn, metric)
        except Exception as e:  # noqa: BLE001 - any error of a trial is that trial's failure; the sweep goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            study.tell(trial, state=TrialState.FAIL)
            warnings.warn(f"sweep: trial {trial.number} ({params}) failed after {time.perf_counter() - started:.1f}"
                          f" s: {type(e).__name__}: {e}", RuntimeWarning)
            continue
        except BaseException:  # Ctrl-C: the trial is not left RUNNING in the study; the sweep stops
            trial.set_user_attr("error", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
    return SweepResult(study, space, metric)
