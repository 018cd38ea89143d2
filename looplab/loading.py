"""Transactional loading: check that a saved state fits before changing anything, so a failed load changes nothing.

`learn.load` and `Resume` check the model's keys and shapes and the optimizer's type and parameter groups first,
then load; callbacks' states, which only their `load_state_dict` can check, are loaded all or nothing
(`load_callback_states`). Every error is a ValueError naming the file and what differs.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

__all__ = ["check_model_state", "check_optimizer_state", "check_grads", "load_callback_states", "save_learner",
           "load_learner"]


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_model_state(model: nn.Module, saved, file: str | os.PathLike) -> None:
    """Raise a ValueError naming `file` unless `model.load_state_dict(saved)` (strict) fits: same keys, same shapes."""
    if not isinstance(saved, dict):
        raise ValueError(f"{str(file)!r}: its model entry is a {type(saved).__name__}, not a state dict")
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in saved], [k for k in saved if k not in own]
    problems = []
    if missing:
        problems.append(f"this model has {_listed(missing)}, which the file lacks")
    if unexpected:
        problems.append(f"the file has {_listed(unexpected)}, which this model lacks")
    for k, v in own.items():
        s = saved.get(k)
        if isinstance(v, torch.Tensor) and isinstance(s, torch.Tensor) and s.shape != v.shape:
            problems.append(f"{k!r} has shape {tuple(s.shape)} in the file, {tuple(v.shape)} in this model")
    if problems:
        raise ValueError(f"{str(file)!r} does not fit this model: " + "; ".join(problems))


def check_optimizer_state(opt: torch.optim.Optimizer, saved, saved_class: str | None,
                          file: str | os.PathLike) -> None:
    """Raise a ValueError naming `file` unless `opt.load_state_dict(saved)` fits and `opt` can step with it.

    Compares the optimizer's class name (`saved_class`, None for files that do not record it), the number of
    parameter groups and their sizes. Hyper-parameter names are compared only for files without the class name
    (they are then the evidence of the optimizer's type): with it, torch's own compatibility code fills in a
    hyper-parameter that another torch version did not have.
    """
    name = type(opt).__name__
    if saved_class is not None and saved_class != name:
        raise ValueError(f"{str(file)!r} was saved with {saved_class}, this Learner's optimizer is {name}")
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or "state" not in saved:
        raise ValueError(f"{str(file)!r}: its optimizer entry is not an optimizer state dict")
    groups, saved_groups = opt.param_groups, saved["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"{str(file)!r} holds {len(saved_groups)} optimizer parameter group(s), this Learner's "
                         f"optimizer ({name}) has {len(groups)}")
    for i, (group, s) in enumerate(zip(groups, saved_groups)):
        if not isinstance(s, dict) or not isinstance(s.get("params"), list):
            raise ValueError(f"{str(file)!r}: its optimizer parameter group {i} is not a parameter group")
        if len(s["params"]) != len(group["params"]):
            raise ValueError(f"{str(file)!r}: optimizer parameter group {i} holds {len(s['params'])} parameters "
                             f"in the file, {len(group['params'])} in this Learner's optimizer")
        if saved_class is None:
            keys, saved_keys = set(group) - {"params", "param_names"}, set(s) - {"params", "param_names"}
            if keys != saved_keys:
                raise ValueError(f"{str(file)!r} was saved with another optimizer: its parameter group {i} has "
                                 f"the hyper-parameters {sorted(saved_keys)}, this Learner's {name} has "
                                 f"{sorted(keys)}")


def check_grads(model: nn.Module, grads, file: str | os.PathLike) -> None:
    """Raise a ValueError naming `file` unless every saved gradient belongs to a parameter of the same shape."""
    params = dict(model.named_parameters())
    for k, g in grads.items():
        if k not in params or not isinstance(g, torch.Tensor) or g.shape != params[k].shape:
            raise ValueError(f"{str(file)!r}: its gradient for {k!r} fits no parameter of this model")


def load_callback_states(callbacks: dict, saved: dict, file: str | os.PathLike) -> None:
    """`cb.load_state_dict(saved[name])` for each `name, cb` in `callbacks` that `saved` has: all or nothing.

    Each callback's state is taken first; if any load fails, those already (or partly) loaded get their state back
    (their `load_state_dict` restores what they changed in place, then their attributes are rebound as they were),
    and a ValueError names the file and the callback.
    """
    loading = [(name, cb) for name, cb in callbacks.items() if name in saved]
    before = {name: (dict(vars(cb)), copy.deepcopy(cb.state_dict())) for name, cb in loading}
    done = []
    for name, cb in loading:
        done.append((name, cb))
        try:
            cb.load_state_dict(saved[name])
        except Exception as e:
            for restored_name, restored in reversed(done):
                attributes, state = before[restored_name]
                restored.load_state_dict(state)
                vars(restored).clear()
                vars(restored).update(attributes)
            raise ValueError(f"{str(file)!r}: the state saved for callback {name} does not load into it "
                             f"({type(e).__name__}: {e}); nothing was loaded") from e


def save_learner(learn, path: str | os.PathLike) -> None:
    """`learn.save`: the model's and the optimizer's state and the optimizer's class name, written atomically."""
    from .io import atomic_save
    from .sharded import gather_model_state, gather_optimizer_state, is_sharded
    from .util import is_main_process, unwrap_model
    model = unwrap_model(learn.model)
    if is_sharded(model):  # FSDP: every rank gathers (a collective), rank 0 writes the plain full file
        state = {"model": gather_model_state(model), "opt": gather_optimizer_state(learn.opt)}
        if not is_main_process():
            return
    else:
        state = {"model": model.state_dict(), "opt": learn.opt.state_dict()}
    atomic_save({**state, "opt_class": type(learn.opt).__name__}, path)


def load_learner(learn, path: str | os.PathLike, with_opt: bool = True) -> None:
    """`learn.load`: everything is checked before anything changes (see the module docstring)."""
    from .io import safe_load
    from .sharded import is_sharded, load_full_state
    from .util import unwrap_model
    model = unwrap_model(learn.model)
    sharded = is_sharded(model)  # FSDP: the full file stays on the CPU, each rank takes its chunks from there
    state = safe_load(path, map_location="cpu" if sharded else learn.device)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is not a looplab checkpoint: expected a dict with a 'model' entry")
    with_opt = with_opt and "opt" in state
    check_model_state(model, state["model"], path)
    if with_opt:
        check_optimizer_state(learn.opt, state["opt"], state.get("opt_class"), path)
    if sharded:
        load_full_state(model, state["model"], learn.opt if with_opt else None, state.get("opt"))
        return
    model.load_state_dict(state["model"])
    if with_opt:
        learn.opt.load_state_dict(state["opt"])
