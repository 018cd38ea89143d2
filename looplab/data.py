"""DataLoaders: a (train, valid) pair; in-memory tensor loaders; seeded, offset-able, shardable sampling.

All index sampling lives in `epoch_batches`: epoch e's order is a permutation derived from (seed, e) alone, so it
does not depend on how many epochs were run before, on global RNG state, or on `num_workers`. A loader starts an
epoch at any batch offset by slicing that plan (exact resume), and rank r of `world_size` takes its contiguous
share of every global batch (DDP), so the ranks' batches k together are the one-process batch k.
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DataLoaders", "TensorLoader", "DatasetLoader", "derive_seed", "epoch_order", "epoch_batches",
           "n_batches", "shard"]


# Domains, so the seeds of orders, the valid split, samples and worker base seeds never coincide.
_ORDER, _SPLIT, _SAMPLE, _WORKERS = 0, 1, 2, 3


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, epoch) or (seed, epoch, sample index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of epoch `epoch`: a permutation derived from (seed, epoch), or 0..n-1 when not shuffling."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _ORDER, epoch)))


def shard(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous share of one global batch of indices (sizes differ by at most one)."""
    if world_size == 1:
        return idx
    n = len(idx)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return idx[lo:hi]


def n_batches(n: int, bs: int, drop_last: bool, rank: int = 0, world_size: int = 1, even: bool = True) -> int:
    """How many batches `epoch_batches` gives rank `rank` each epoch.

    With several ranks, a last global batch too small to give every rank a sample is dropped when `even` (in
    training every rank must take the same number of steps), else kept, and a rank it leaves without a sample
    gets one batch fewer (in validation every sample counts once).
    """
    full, tail = divmod(n, bs * world_size)
    if not tail or drop_last:
        return full
    if world_size == 1:
        return full + 1
    return full + (tail >= world_size if even else (rank + 1) * tail // world_size > rank * tail // world_size)


def epoch_batches(n: int, bs: int, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                  rank: int = 0, world_size: int = 1, even: bool = True) -> list[torch.Tensor]:
    """This rank's batches of indices for one epoch; global batch k holds `bs * world_size` samples."""
    global_bs = bs * world_size
    order = epoch_order(n, seed, epoch, shuffle)
    return [shard(order[k * global_bs:(k + 1) * global_bs], rank, world_size)
            for k in range(n_batches(n, bs, drop_last, rank, world_size, even))]


def _check_bs(bs: Any) -> None:
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs must be a positive int, got {bs!r}")


class _SeededLoader:
    """What the tensor and dataset loaders share: an epoch counter, a start offset, sharding, and their state.

    `epoch` is the epoch the next `iter()` produces; each `iter()` starts it and moves the counter on.
    `offset` is the batch the next `iter()` starts at (then reset to 0): exact mid-epoch resume sets it.
    """

    def __init__(self, n: int, bs: int, shuffle: bool, seed: int, drop_last: bool):
        _check_bs(bs)
        self.n, self.bs, self.shuffle, self.seed, self.drop_last = n, bs, shuffle, seed, drop_last
        self.epoch, self.offset, self.rank, self.world_size, self.even = 0, 0, 0, 1, True

    def __len__(self) -> int:
        return n_batches(self.n, self.bs, self.drop_last, self.rank, self.world_size, self.even)

    def _next_plan(self) -> tuple[int, list[torch.Tensor]]:
        """Start the next epoch: its number and this rank's batches from the offset on; moves the counters on."""
        epoch, offset = self.epoch, self.offset
        batches = epoch_batches(self.n, self.bs, self.seed, epoch, self.shuffle, self.drop_last,
                                self.rank, self.world_size, self.even)
        self.epoch, self.offset = epoch + 1, 0
        return epoch, batches[offset:]

    def set_distributed(self, rank: int, world_size: int, even: bool = True) -> None:
        """Take rank `rank`'s share of every global batch of `bs * world_size` samples.

        `even`: every rank gets the same number of batches (training); False: every sample is used (validation).
        See `n_batches`.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if self.n < world_size:
            raise ValueError(f"{self.n} samples cannot be shared by {world_size} processes")
        self.rank, self.world_size, self.even = rank, world_size, even

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class TensorLoader(_SeededLoader):
    """Batches straight from in-memory tensors by indexing (no per-sample work, no collate).

    `x` is a tensor or a tuple of tensors (multi-input models); `y` a tensor. Yields `(x[idx], y[idx])`.
    """

    def __init__(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor, bs: int = 64,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        for t in (*xs, y):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"from_tensors takes tensors, got {type(t).__name__}")
            if len(t) != len(y):
                raise ValueError(f"inputs and targets differ in length: {len(t)} vs {len(y)}")
        super().__init__(len(y), bs, shuffle, seed, drop_last)
        self.xs, self.y, self.multi_input = xs, y, isinstance(x, (tuple, list))

    def __iter__(self):
        _, batches = self._next_plan()
        return self._batches(batches)

    def _batches(self, batches):
        xs, y = self.xs, self.y
        for idx in batches:
            yield (tuple(x[idx] for x in xs) if self.multi_input else xs[0][idx]), y[idx]


class _SeededDataset(Dataset):
    """Serves `(epoch, index)` keys: seeds python, numpy and torch's CPU RNG from (seed, epoch, index) first.

    So a sample's random augmentations are the same whichever worker (or the main process) loads it. The
    caller's RNG states are restored afterwards, so loading in the main process consumes none of them.
    """

    def __init__(self, ds: Dataset, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
        try:
            out = []
            for epoch, index in keys:
                s = derive_seed(self.seed, _SAMPLE, epoch, index)
                random.seed(s)
                np.random.seed(s % 2**32)
                torch.random.default_generator.manual_seed(s)
                out.append(self.ds[index])
            return out
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.default_generator.set_state(saved[2])


class DatasetLoader(_SeededLoader):
    """A map-style dataset through torch's `DataLoader`, with our seeded order and per-sample seeding.

    The results do not depend on `num_workers`: the order comes from (seed, epoch) and every sample's random
    draws from (seed, epoch, index). torch's loader gets a private generator, so it never draws its base seed
    from the global torch RNG (which would otherwise change with every epoch and break exact resume).
    """

    def __init__(self, ds: Dataset, bs: int = 64, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 num_workers: int = 0, collate_fn=None, pin_memory: bool = False, **dl_kwargs):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise TypeError(f"from_datasets takes map-style datasets (with __len__ and __getitem__), "
                            f"got {type(ds).__name__}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        super().__init__(len(ds), bs, shuffle, seed, drop_last)
        self.ds, self.num_workers = ds, num_workers
        self._seeded = _SeededDataset(ds, seed)
        self._dl_kwargs = dict(collate_fn=collate_fn or torch.utils.data.default_collate, pin_memory=pin_memory, **dl_kwargs)

    def __iter__(self):
        epoch, batches = self._next_plan()
        keys = [[(epoch, int(i)) for i in idx] for idx in batches]
        loader = DataLoader(self._seeded, batch_sampler=keys, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(derive_seed(self.seed, _WORKERS, epoch)),
                            **self._dl_kwargs)
        return iter(loader)


class DataLoaders:
    """The training and validation loaders: `dls.train`, `dls.valid` (any iterables of `(x, y)` batches)."""

    def __init__(self, train: Iterable, valid: Iterable | None = None):
        for name, dl in (("train", train), ("valid", valid)):
            if dl is not None and not hasattr(dl, "__iter__"):
                raise TypeError(f"{name} data must be an iterable of (x, y) batches, got {type(dl).__name__}")
        self.train, self.valid = train, valid

    @classmethod
    def from_tensors(cls, x, y, valid: tuple | None = None, valid_pct: float | None = None, bs: int = 64,
                     shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> "DataLoaders":
        """In-memory loaders. Give `valid=(xv, yv)`, or `valid_pct` to hold out a seeded random fraction of (x, y)."""
        if valid is not None and valid_pct is not None:
            raise ValueError("give either valid=(x, y) or valid_pct, not both")
        if valid is None:
            valid_pct = 0.2 if valid_pct is None else valid_pct
            if not 0 < valid_pct < 1:
                raise ValueError(f"valid_pct must be in (0, 1), got {valid_pct!r}")
            xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            n = len(y)
            if any(len(t) != n for t in xs):
                raise ValueError(f"inputs and targets differ in length: {[len(t) for t in xs]} vs {n}")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _SPLIT)))
            n_valid = max(1, round(n * valid_pct))
            vi, ti = perm[:n_valid], perm[n_valid:]
            pick = (lambda idx: tuple(t[idx] for t in xs)) if isinstance(x, (tuple, list)) else (lambda idx: x[idx])
            (x, y), valid = (pick(ti), y[ti]), (pick(vi), y[vi])
        return cls(TensorLoader(x, y, bs, shuffle=shuffle, seed=seed, drop_last=drop_last),
                   TensorLoader(*valid, bs=bs, shuffle=False, seed=seed))

    @classmethod
    def from_datasets(cls, train_ds: Dataset, valid_ds: Dataset | None = None, bs: int = 64, num_workers: int = 0,
                      seed: int = 0, shuffle: bool = True, drop_last: bool = False, **dl_kwargs) -> "DataLoaders":
        """Loaders over map-style datasets through torch's DataLoader; results independent of `num_workers`."""
        valid = None if valid_ds is None else DatasetLoader(valid_ds, bs, False, seed, False, num_workers,
                                                            **dl_kwargs)
        return cls(DatasetLoader(train_ds, bs, shuffle, seed, drop_last, num_workers, **dl_kwargs), valid)

    def state_dict(self) -> dict:
        """The loaders' positions (for those that have one)."""
        return {name: dl.state_dict() for name, dl in (("train", self.train), ("valid", self.valid))
                if hasattr(dl, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            getattr(self, name).load_state_dict(s)
