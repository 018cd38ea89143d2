"""Atomic writes and safe, explaining reads of checkpoint files."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

__all__ = ["atomic_save", "safe_load"]


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically: write `<path>.tmp` in the same folder, fsync, then `os.replace`.

    A reader never sees a half-written file under `path`; a killed write leaves only the `.tmp` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def safe_load(path: str | os.PathLike, map_location=None):
    """`torch.load(weights_only=True)` with errors that name the file and say what is wrong with it.

    Never runs code from the file: a checkpoint holding arbitrary pickled objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {str(path)!r}: it holds objects that are not plain weights "
                         f"(loading them could run code): {e}") from e
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, OSError; KeyError for a non-torch file
        raise ValueError(f"cannot read checkpoint {str(path)!r}: the file is truncated or not a torch "
                         f"checkpoint ({type(e).__name__}: {e})") from e
