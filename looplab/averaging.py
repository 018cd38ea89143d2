"""Weight averaging: the mean of several saved checkpoints, and batch-norm statistics recomputed for averaged weights.

Averaging the last few checkpoints of a run "almost always leads to better performance" (Popel & Bojar 2018, on
Transformers) at no training cost. Files are read with `weights_only=True` (`looplab.io.safe_load`): averaging
never runs code from a file.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .checks import check_int
from .io import safe_load
from .util import batch_on, unwrap_model

__all__ = ["average_checkpoints", "average_last", "run_files", "update_bn"]


def _model_state(obj, path: Path | str) -> dict[str, torch.Tensor]:
    """The model weights in a loaded file: the "model" entry of a `learn.save` / `Checkpoint` file, or a state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{str(path)!r} holds neither a looplab checkpoint (a dict with a 'model' state dict) "
                     f"nor a state dict of tensors")


def _check_same_layout(state: dict, ref: dict, path: Path | str, ref_path: Path | str) -> None:
    if state.keys() != ref.keys():
        missing, extra = sorted(ref.keys() - state.keys()), sorted(state.keys() - ref.keys())
        raise ValueError(f"checkpoint {str(path)!r} has other weights than {str(ref_path)!r}: "
                         f"missing {missing}, extra {extra}")
    for k, v in state.items():
        if v.shape != ref[k].shape:
            raise ValueError(f"checkpoint {str(path)!r}: {k!r} has shape {tuple(v.shape)}, "
                             f"but {tuple(ref[k].shape)} in {str(ref_path)!r}")


def _load(item, i: int) -> tuple[dict, Path | str]:
    """The model weights of one `average_checkpoints` input (a file, or a state dict in memory) and its name."""
    if isinstance(item, dict):
        name = f"state dict #{i}"
        return {k: v.cpu() for k, v in _model_state(item, name).items()}, name
    path = Path(item)
    return _model_state(safe_load(path, map_location="cpu"), path), path


def average_checkpoints(paths: Iterable[str | os.PathLike | dict]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the model weights saved in `paths` (as a state dict, on the CPU).

    Each file is one written by `learn.save` or `Checkpoint` (a dict with a "model" entry) or a plain state dict;
    state dicts already in memory may be given instead of files.
    Floating-point tensors are averaged (summed in float64, returned in their own dtype); others (e.g. batch norm's
    `num_batches_tracked`) are taken from the last file. Files whose keys or shapes disagree are refused, by name.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"average_checkpoints takes a list of paths, got the single path {str(paths)!r}")
    paths = list(paths)
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint, got none")
    ref = ref_path = None
    sums: dict[str, torch.Tensor] = {}
    for i, item in enumerate(paths):  # one file in memory at a time
        state, path = _load(item, i)
        if ref is None:
            ref, ref_path = state, path
        _check_same_layout(state, ref, path, ref_path)
        for k, v in state.items():
            sums[k] = v.double() + sums.get(k, 0) if torch.is_floating_point(v) else v.clone()
    return {k: (s / len(paths)).to(ref[k].dtype) if torch.is_floating_point(ref[k]) else s for k, s in sums.items()}


def _natural_key(path: Path) -> list:
    """Sort key that puts `ckpt_9` before `ckpt_10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def run_files(folder: str | os.PathLike, pattern: str = "*.pt") -> list[Path]:
    """The checkpoint files in `folder` matching `pattern`, oldest first by name (numbers sorted as numbers).

    Unfinished writes (`*.tmp`) are never included.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {str(folder)!r}")
    return sorted((p for p in folder.glob(pattern) if p.is_file() and not p.name.endswith(".tmp")), key=_natural_key)


def average_last(source: str | os.PathLike | Iterable[str | os.PathLike], n: int, model: nn.Module | None = None,
                 pattern: str = "*.pt") -> dict[str, torch.Tensor]:
    """Average the last `n` checkpoints of a run and, if `model` is given, load the result into it.

    `source` is a folder (its files matching `pattern`, ordered by `run_files`) or a list of files, oldest
    first. `Checkpoint`'s names (`ckpt-{steps:08d}[-epoch-{e}].pt`) sort by step; when it saves both every n steps
    and every epoch, `pattern="*-epoch-*.pt"` averages epoch ends only. Returns the averaged state dict.
    """
    check_int("n", n, 1)
    is_folder = isinstance(source, (str, os.PathLike))
    paths = run_files(source, pattern) if is_folder else [Path(p) for p in source]
    if len(paths) < n:
        where = f"folder {str(source)!r} has {len(paths)} matching {pattern!r}" if is_folder else \
            f"got {len(paths)} paths"
        raise ValueError(f"cannot average the last {n} checkpoints: {where}")
    state = average_checkpoints(paths[-n:])
    if model is not None:
        target = unwrap_model(model)
        device = next(target.parameters(), torch.empty(0)).device
        target.load_state_dict({k: v.to(device) for k, v in state.items()})
    return state


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> None:
    """Recompute every batch norm's running statistics over `batches`, as `torch.optim.swa_utils.update_bn` does.

    Statistics are reset, then accumulated as a plain average (momentum None) in training mode; momenta and the
    model's mode are restored. `batches` yields what a Learner's loader does: `(x, y)` pairs (`x` a tensor or a
    tuple of model inputs) or mappings of model inputs (`model(**batch)`).
    Needed after averaging weights: running statistics of the individual weights do not fit their average.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta, was_training = [m.momentum for m in bns], model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                xb, _ = batch_on(batch, device)
                if isinstance(xb, Mapping):
                    model(**xb)
                else:
                    model(*xb) if isinstance(xb, tuple) else model(xb)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
