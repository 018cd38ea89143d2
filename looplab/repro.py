"""Seeding, and capturing / restoring every PRNG state as plain data.

A seed only fixes where a run starts; exact resume needs the generators' *states* at the moment of the checkpoint
(python's `random`, numpy's global generator, torch's CPU generator and every CUDA device's). `get_rng_state`
returns them as tensors, ints, floats and strings, so a checkpoint holding them loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from .checks import check_int

__all__ = ["set_seed", "get_rng_state", "set_rng_state"]


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and every CUDA device).

    `deterministic=True` also makes torch pick deterministic algorithms (erroring on ops that have none) and turns
    off cuDNN's autotuner, whose choice of kernel can change between runs. `False` leaves those settings alone.
    """
    if check_int("seed", seed, 0) >= 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too (lazily, without initialising CUDA)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _cuda_in_use() -> bool:
    """Only capture CUDA states where CUDA is already initialised: asking would otherwise start it."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_rng_state() -> dict[str, Any]:
    """Every PRNG state of this process as plain data (tensors, ints, floats, strings, lists)."""
    version, mt, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if _cuda_in_use() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned (tensors may come back on any device)."""
    missing = {"python", "numpy", "torch", "cuda"} - set(state)
    if missing:
        raise ValueError(f"not an RNG state from get_rng_state: missing {sorted(missing)}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state["cuda"]
    if cuda:
        if not torch.cuda.is_available() or len(cuda) > torch.cuda.device_count():
            raise ValueError(f"the RNG state holds {len(cuda)} CUDA device state(s), but this process sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
