"""ParamScheduler: any optimizer hyper-parameter as a function of the position in training; the fit_* policies.

Position of training batch `i` of `N` in the fit (`N = learn.n_steps`: `n_epochs * len(train loader)`, or the
fit's `steps`) is `i / N`, with `i = learn.train_iter`, so a resumed fit continues the schedule exactly.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

from ..callback import Callback
from ..checks import check_int, check_number
from ..schedules import combine_scheds, group_ratios, sched_const, sched_cos, sched_lin, sgdr_schedule
from .order import Order

__all__ = ["ParamScheduler", "fit_one_cycle", "fit_warmup_cos", "fit_flat_cos", "fit_sgdr"]

# Friendly names -> optimizer param-group keys. "mom" is resolved per optimizer (momentum or betas[0]).
_ALIASES = {"wd": "weight_decay"}


def _group_key(group: dict, name: str) -> tuple[str, int | None]:
    """The param-group entry a hyper-parameter lives in: `(key, None)`, or `("betas", 0)` for Adam's momentum."""
    if name == "mom":
        if "betas" in group:
            return "betas", 0
        if "momentum" in group:
            return "momentum", None
        raise ValueError("cannot schedule 'mom': the optimizer's param groups have neither 'momentum' nor 'betas'")
    key = _ALIASES.get(name, name)
    if key not in group:
        raise ValueError(f"cannot schedule {name!r}: the optimizer's param groups have no {key!r} "
                         f"(they have {sorted(k for k in group if k != 'params')})")
    return key, None


def _read(group: dict, key: str, index: int | None) -> float:
    return float(group[key] if index is None else group[key][index])



class ParamScheduler(Callback):
    """Sets optimizer hyper-parameters before every training batch: `ParamScheduler({"lr": f, "mom": g, "wd": h})`.

    Each `f(pos)` gives the value for the last param group whose value is non-zero when the fit starts; every group
    keeps its ratio to that group (discriminative lrs survive scheduling) and a group at 0 (`weight_decay=0` for
    biases) stays at 0: see `group_ratios`. `mom` is `momentum` (SGD, RMSprop) or `betas[0]`
    (Adam family, Lion); `wd` is `weight_decay`; any other name is a param-group key. The values in force are
    logged to the Recorder under their names (the Recorder logs `lr` itself). After the fit every scheduled
    hyper-parameter is back at the value it had when the fit started.
    """
    order = Order.SCHEDULE
    during_lr_find = False  # the LR finder sets the lr itself

    def __init__(self, scheds: dict[str, Callable[[float], float]]):
        if not isinstance(scheds, dict) or not scheds:
            raise ValueError(f"scheds must be a non-empty dict of name -> f(pos), got {scheds!r}")
        for name, f in scheds.items():
            if not isinstance(name, str) or not callable(f):
                raise TypeError(f"scheds must map names to callables f(pos), got {name!r}: {f!r}")
        self.scheds = dict(scheds)
        self.ratios: dict[str, list[float]] = {}
        self._ratios_loaded = False
        self._bases: list = []  # (key, index, each group's value when the fit started): put back after it

    def before_fit(self):
        groups = self.learn.opt.param_groups
        self._plan, self._bases = [], []
        ratios = {}
        for name, f in self.scheds.items():
            key, index = _group_key(groups[0], name)
            bases = [_read(g, key, index) for g in groups]
            ratios[name] = group_ratios(bases)
            self._bases.append((key, index, bases))
            self._plan.append((name, f, key, index, name != "lr"))
        if not self._ratios_loaded:  # a resumed fit keeps the ratios it saved (exact to the bit)
            self.ratios = ratios
        self._ratios_loaded = False

    def after_fit(self):
        self._ratios_loaded = False  # state loaded during the fit (by Resume) was for this fit only
        # the groups get back the values they had before the fit: a later fit's ratios start from them (a group
        # at 0 stays at 0 even if the schedule ended at 0), as they would on a fresh Learner
        for key, index, bases in self._bases:
            for group, base in zip(self.learn.opt.param_groups, bases):
                group[key] = base if index is None else (base, *group[key][1:])

    def before_train(self):
        if not self.learn.n_steps:
            raise ValueError("ParamScheduler needs the fit's length: a training loader with a length, or fit(steps=)")
        self.n_total = self.learn.n_steps

    def before_batch(self):
        learn = self.learn
        if not learn.training:
            return
        pos = min(learn.train_iter / self.n_total, 1.0)
        groups = learn.opt.param_groups
        for name, f, key, index, log in self._plan:
            value = f(pos)
            if index is None:
                for group, ratio in zip(groups, self.ratios[name]):
                    group[key] = value * ratio
            else:
                for group, ratio in zip(groups, self.ratios[name]):
                    group[key] = (value * ratio, *group[key][1:])
            if log:
                learn.recorder.log(name, value)

    def state_dict(self) -> dict:
        return {"ratios": {k: list(v) for k, v in self.ratios.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ratios = {k: [float(r) for r in v] for k, v in state["ratios"].items()}
        self._ratios_loaded = True


# ---- the fit policies ------------------------------------------------------------------------------------------
def _lr_max(learn, lr) -> float | slice:
    return learn.lr if lr is None else lr


def _top(lr: float | slice) -> float:
    return float(lr.stop) if isinstance(lr, slice) else float(lr)


def _check(name: str, value, low: float = 0.0, high: float | None = None, closed_low: bool = False) -> None:
    check_number(name, value, low, high, low_open=not closed_low)


def _fit(learn, n_epochs: int, lr, scheds: dict, cbs: Iterable[Callback], fit_kwargs: dict) -> None:
    learn.fit(n_epochs, lr=lr, cbs=[ParamScheduler(scheds), *cbs], **fit_kwargs)


def fit_one_cycle(learn, n_epochs: int | None = None, lr_max: float | slice | None = None, pct_start: float = 0.25,
                  div: float = 25.0, div_final: float = 1e5,
                  moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
                  cbs: Iterable[Callback] = (), **fit_kwargs) -> None:
    """One-cycle policy: lr cosine up from `lr_max/div` to `lr_max` over the first `pct_start` of training, then
    cosine down to `lr_max/div_final`; momentum (if `moms`) cosine from moms[0] to moms[1] and back to moms[2].

    `lr_max=None` uses the Learner's lr; a slice schedules the last group and keeps the others' ratios.
    `fit_kwargs` (e.g. `resume_from=`, or `steps=` instead of `n_epochs`) go to `learn.fit`.
    """
    lr_max = _lr_max(learn, lr_max)
    _check("pct_start", pct_start, 0.0, 1.0, closed_low=True)
    _check("div", div)
    _check("div_final", div_final)
    top = _top(lr_max)
    phases = [pct_start, 1 - pct_start]
    scheds = {"lr": combine_scheds(phases, [partial(sched_cos, top / div, top),
                                            partial(sched_cos, top, top / div_final)])}
    if moms is not None:
        if len(moms) != 3:
            raise ValueError(f"moms must be (start, middle, end) or None, got {moms!r}")
        scheds["mom"] = combine_scheds(phases, [partial(sched_cos, moms[0], moms[1]),
                                                partial(sched_cos, moms[1], moms[2])])
    _fit(learn, n_epochs, lr_max, scheds, cbs, fit_kwargs)


def fit_warmup_cos(learn, n_epochs: int | None = None, lr: float | slice | None = None, warmup: float | None = None,
                   warmup_epochs: float | None = None, div: float = 100.0, lr_min: float = 0.0,
                   cbs: Iterable[Callback] = (), *, warmup_steps: int | None = None, **fit_kwargs) -> None:
    """Linear warmup from `lr/div` to `lr`, then cosine decay to `lr_min`.

    The warmup is one of: `warmup`, a fraction of training if < 1 or a number of epochs if >= 1 (default 0.1);
    `warmup_epochs` (epochs, may be fractional, e.g. from `scale_for_batch`); `warmup_steps=W`, exactly W
    training steps: step i (0-based) gets `lr/div + (lr - lr/div)·i/W` for i < W, then the cosine over the rest.
    `lr=None` uses the Learner's lr. Train for `n_epochs`, or pass `steps=N` (in `fit_kwargs`) instead.
    """
    lr = _lr_max(learn, lr)
    given = [name for name, v in (("warmup", warmup), ("warmup_epochs", warmup_epochs),
                                  ("warmup_steps", warmup_steps)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one warmup, got {' and '.join(given)}")
    n_steps = fit_kwargs.get("steps")
    if n_steps is None and n_epochs is not None and hasattr(learn.dls.train, "__len__"):
        n_steps = n_epochs * len(learn.dls.train)
    if warmup_steps is not None:
        check_int("warmup_steps", warmup_steps, 0)
        if n_steps is None or not warmup_steps < n_steps:
            raise ValueError(f"warmup_steps must be in [0, steps={n_steps}) (the fit's training steps), "
                             f"got {warmup_steps!r}")
        warmup = warmup_steps / n_steps
    warmup = 0.1 if warmup is None and warmup_epochs is None else warmup
    if warmup_epochs is None and not isinstance(warmup, bool) and isinstance(warmup, (int, float)) and warmup >= 1:
        warmup_epochs = warmup
    if warmup_epochs is not None:
        if n_epochs is None:
            raise ValueError("a warmup in epochs (warmup >= 1 or warmup_epochs=) needs n_epochs: with steps=, give "
                             "warmup_steps= or a fraction")
        if not (not isinstance(warmup_epochs, bool) and isinstance(warmup_epochs, (int, float))
                and 0 <= warmup_epochs < max(n_epochs, 1)):
            raise ValueError(f"a warmup in epochs (warmup >= 1 or warmup_epochs=) must be in [0, n_epochs={n_epochs}), "
                             f"got {warmup_epochs!r}")
        warmup = warmup_epochs / n_epochs if n_epochs else 0.0
    if not (not isinstance(warmup, bool) and isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise ValueError(f"warmup must be a fraction of training in [0, 1), got {warmup!r} "
                         f"(give a number of epochs as warmup_epochs=, of steps as warmup_steps=)")
    _check("div", div)
    _check("lr_min", lr_min, closed_low=True)
    top = _top(lr)
    scheds = {"lr": combine_scheds([warmup, 1 - warmup], [partial(sched_lin, top / div, top),
                                                         partial(sched_cos, top, lr_min)])}
    _fit(learn, n_epochs, lr, scheds, cbs, fit_kwargs)


def fit_flat_cos(learn, n_epochs: int | None = None, lr: float | slice | None = None, pct_start: float = 0.75,
                 div_final: float = 1e5, cbs: Iterable[Callback] = (), **fit_kwargs) -> None:
    """Flat lr for the first `pct_start` of training, then cosine down to `lr/div_final`."""
    lr = _lr_max(learn, lr)
    _check("pct_start", pct_start, 0.0, 1.0, closed_low=True)
    _check("div_final", div_final)
    top = _top(lr)
    scheds = {"lr": combine_scheds([pct_start, 1 - pct_start], [partial(sched_const, top, top),
                                                               partial(sched_cos, top, top / div_final)])}
    _fit(learn, n_epochs, lr, scheds, cbs, fit_kwargs)


def fit_sgdr(learn, n_cycles: int, cycle_len: int = 1, lr_max: float | slice | None = None,
             cycle_mult: int = 2, lr_min: float = 0.0, cbs: Iterable[Callback] = (), **fit_kwargs) -> None:
    """SGDR: `n_cycles` cosine cycles from `lr_max` to `lr_min`, the first `cycle_len` epochs long, each next one
    `cycle_mult` times longer (so the fit lasts `cycle_len * (1 + m + … + m**(n_cycles-1))` epochs). With `steps=N`
    (in `fit_kwargs`) the cycles, in the same proportions, fill N training steps instead."""
    for name, v in (("n_cycles", n_cycles), ("cycle_len", cycle_len), ("cycle_mult", cycle_mult)):
        check_int(name, v, 1)
    _check("lr_min", lr_min, closed_low=True)
    lr_max = _lr_max(learn, lr_max)
    n_epochs = None if "steps" in fit_kwargs else cycle_len * sum(cycle_mult ** k for k in range(n_cycles))
    scheds = {"lr": sgdr_schedule(_top(lr_max), lr_min, n_cycles, cycle_mult)}
    _fit(learn, n_epochs, lr_max, scheds, cbs, fit_kwargs)
