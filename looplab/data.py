"""DataLoaders: a (train, valid) pair; in-memory tensor loaders; seeded, offset-able, shardable sampling.

All index sampling lives in `epoch_batches`: epoch e's order is a permutation derived from (seed, e) alone, so it
does not depend on how many epochs were run before, on global RNG state, or on `num_workers`. A loader starts an
epoch at any batch offset by slicing that plan (exact resume), and rank r of `world_size` takes its contiguous
share of every global batch (DDP), so the ranks' batches k together are the one-process batch k.
"""
from __future__ import annotations

import ctypes
import random
import weakref
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .checks import check_int

__all__ = ["DataLoaders", "TensorLoader", "DatasetLoader", "derive_seed", "batch_seed", "epoch_order",
           "epoch_batches", "n_batches", "shard"]


# Domains, so the seeds of orders, the valid split, batches and worker base seeds never coincide.
_ORDER, _SPLIT, _BATCHES, _WORKERS = 0, 1, 2, 3


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, domain, epoch); once per epoch (it costs ~20 µs)."""
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
    check_int("bs", bs, 1)


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

    def _next_plan(self) -> tuple[int, int, list[torch.Tensor]]:
        """Start the next epoch: its number, the offset, and this rank's batches from the offset on; moves the
        counters on."""
        epoch, offset = self.epoch, self.offset
        batches = epoch_batches(self.n, self.bs, self.seed, epoch, self.shuffle, self.drop_last,
                                self.rank, self.world_size, self.even)
        self.epoch, self.offset = epoch + 1, 0
        return epoch, offset, batches[offset:]

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
        _, _, batches = self._next_plan()
        return self._batches(batches)

    def _batches(self, batches):
        xs, y = self.xs, self.y
        for idx in batches:
            yield (tuple(x[idx] for x in xs) if self.multi_input else xs[0][idx]), y[idx]


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's step: a 64-bit integer well mixed from `x` (about 1 µs; `derive_seed` costs 20)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def batch_seed(epoch_key: int, batch: int, rank: int = 0, world_size: int = 1) -> int:
    """The seed of rank `rank`'s share of global batch `batch` of an epoch; `epoch_key` is
    `derive_seed(seed, 2, epoch)`, computed once per epoch."""
    return _mix64(epoch_key + batch * world_size + rank)


class _NumpyGlobalState:
    """numpy's global RandomState, saved and put back in a few µs instead of the ~100 µs of get/set_state.

    The MT19937 key and position are copied through the bit generator's documented ctypes interface. What that
    misses is RandomState's cached second normal deviate: a probe draw finds it (a cached value comes back without
    touching the key), and only then does `restore` take the slow `set_state` path.
    """

    _N_WORDS = 625  # mt19937_state: uint32 key[624]; int pos

    def __init__(self):
        self.bit_generator, self.words = None, None

    def _words(self):
        bit_generator = np.random.mtrand._rand._bit_generator  # np.random.set_bit_generator can swap it
        if bit_generator is not self.bit_generator:
            self.bit_generator = bit_generator
            self.words = (ctypes.c_uint32 * self._N_WORDS).from_address(bit_generator.ctypes.state_address)
        return self.words

    def save(self):
        bit_generator = np.random.mtrand._rand._bit_generator
        if not isinstance(bit_generator, np.random.MT19937):  # np.random.seed could not seed it either
            raise TypeError(f"numpy's global generator must be the legacy MT19937 for per-batch seeding, got "
                            f"{type(bit_generator).__name__} (see np.random.set_bit_generator)")
        words = self._words()
        saved = bytes(words)
        probe = np.random.standard_normal()  # the cached deviate if there is one, else a fresh pair is drawn
        return saved, (probe if bytes(words) == saved else None)

    def restore(self, saved) -> None:
        words, cached_normal = saved
        if cached_normal is None:
            np.random.seed(0)  # clears any cached deviate the batch left; the key is overwritten next
            ctypes.memmove(self._words(), words, len(words))
        else:
            key = np.frombuffer(words, np.uint32, 624)
            np.random.set_state(("MT19937", key, int(np.frombuffer(words, np.int32, 1, 624 * 4)[0]), 1,
                                 cached_normal))


class _BatchSeededDataset(Dataset):
    """Serves `(seed, indices)` keys: seeds python, numpy and torch's CPU generator from `seed`, then loads the batch.

    So a batch's random augmentations are the same whichever worker (or the main process) loads it; a batch always
    goes whole to one process. In the main process the caller's generator states are put back afterwards, so
    loading there consumes none of their numbers (worker processes need no such care).
    """

    def __init__(self, ds: Dataset):
        self.ds, self._numpy_state = ds, _NumpyGlobalState()
        self._batched = getattr(ds, "__getitems__", None) is not None  # as torch's fetcher decides

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        raise TypeError("_BatchSeededDataset is read by whole batches: (seed, indices)")

    def __getstate__(self):  # the ctypes view is per process
        return {"ds": self.ds, "_batched": self._batched}

    def __setstate__(self, state):
        self.__dict__.update(state, _numpy_state=_NumpyGlobalState())

    def _load(self, seed: int, indices: list[int]) -> list:
        random.seed(seed)
        np.random.seed(_mix64(seed + 1) >> 32)  # three streams: torch's and numpy's Mersenne Twisters would
        torch.random.default_generator.manual_seed(_mix64(seed + 2))  # coincide if seeded with the same 32 bits
        ds = self.ds
        return ds.__getitems__(indices) if self._batched else [ds[i] for i in indices]

    def __getitems__(self, key):
        seed, indices = key
        if get_worker_info() is not None:
            return self._load(seed, indices)
        saved = random.getstate(), self._numpy_state.save(), torch.random.default_generator.get_state()
        try:
            return self._load(seed, indices)
        finally:
            random.setstate(saved[0])
            self._numpy_state.restore(saved[1])
            torch.random.default_generator.set_state(saved[2])


class _EpochPlan:
    """torch's `batch_sampler` for one DatasetLoader: the current epoch's `(seed, indices)` keys.

    Its `__iter__` runs when torch's iterator starts (or restarts) an epoch, so a single DataLoader with persistent
    workers serves every epoch: the loader replaces `batches` before each `iter()`.
    """

    def __init__(self, batches: list[tuple[int, list[int]]] = ()):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Epoch:
    """One epoch of a DatasetLoader's persistent torch loader; the loader is busy until it ends or is dropped."""

    def __init__(self, owner: "DatasetLoader", batches):
        self.owner, self.batches = owner, batches
        owner._busy = True

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.owner is not None:
            self.owner._busy, self.owner = False, None

    __del__ = release


def _stop_workers(loader: DataLoader) -> None:
    """Shut a persistent torch loader's workers down while everything they talk through is still intact.

    A DatasetLoader is often freed by the cycle collector (a Learner and its callbacks refer to each other); left
    to torch's iterator `__del__` at that point, the shutdown waits out a timeout for every worker (about 10 s a
    loader, measured). A finalizer runs before the collector tears the objects apart, so the workers stop at once.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class DatasetLoader(_SeededLoader):
    """A map-style dataset through torch's `DataLoader`, with our seeded order and per-batch seeding.

    The results do not depend on `num_workers`: the order comes from (seed, epoch), and each batch's random draws
    (python's `random`, numpy's and torch's global generators) from (seed, epoch, batch number, rank), seeded just
    before the batch is loaded, by whichever process loads it. The draws therefore change with `bs` and with the
    number of DDP processes (seeding every sample instead would cost ~8 µs a sample: python's `random.seed` alone
    is 4 µs). A dataset with `__getitems__` gets whole batches, as torch's loader gives them.

    One torch `DataLoader` serves every epoch: its workers (`persistent_workers`) start with the first epoch and
    live as long as this loader (or until `close()`), so, as with torch, they keep the dataset as it was then. An
    iteration started inside an unfinished epoch (a nested `get_preds`) gets a loader of its own for that epoch.
    torch's loader gets a private generator, so it never draws from the global torch RNG.
    """

    def __init__(self, ds: Dataset, bs: int = 64, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 num_workers: int = 0, collate_fn=None, pin_memory: bool = False, **dl_kwargs):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise TypeError(f"from_datasets takes map-style datasets (with __len__ and __getitem__), "
                            f"got {type(ds).__name__}")
        check_int("num_workers", num_workers, 0)
        taken = sorted({"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "generator",
                        "persistent_workers"} & dl_kwargs.keys())
        if taken:
            raise ValueError(f"DatasetLoader sets {', '.join(taken)} itself (bs, shuffle, seed, drop_last; workers "
                             f"always persist)")
        super().__init__(len(ds), bs, shuffle, seed, drop_last)
        self.ds, self.num_workers = ds, num_workers
        self._dl_kwargs = dict(collate_fn=collate_fn or torch.utils.data.default_collate, pin_memory=pin_memory,
                               **dl_kwargs)
        self._plan, self._loader, self._busy = _EpochPlan(), None, False

    def __iter__(self):
        epoch, first, batches = self._next_plan()
        epoch_key = derive_seed(self.seed, _BATCHES, epoch)
        plan = [(batch_seed(epoch_key, k, self.rank, self.world_size), idx.tolist())
                for k, idx in enumerate(batches, first)]
        if self._busy:  # a second iteration inside one of its own epochs: torch's loader would restart the first
            return iter(self._torch_loader(_EpochPlan(plan), persistent=False))
        if self._loader is None:
            self._loader = self._torch_loader(self._plan, persistent=True)
            if self.num_workers > 0:  # see _stop_workers
                weakref.finalize(self, _stop_workers, self._loader)
        self._plan.batches = plan
        return _Epoch(self, iter(self._loader))

    def _torch_loader(self, plan: "_EpochPlan", persistent: bool) -> DataLoader:
        return DataLoader(_BatchSeededDataset(self.ds), batch_sampler=plan, num_workers=self.num_workers,
                          persistent_workers=persistent and self.num_workers > 0,
                          generator=torch.Generator().manual_seed(derive_seed(self.seed, _WORKERS)),
                          **self._dl_kwargs)

    def close(self) -> None:
        """Stop the worker processes now (the next epoch starts new ones); otherwise they end with the loader."""
        if self._loader is not None:
            _stop_workers(self._loader)
        self._loader = None

    def __getstate__(self):  # a copy (deepcopy, pickle) gets no handle on this loader's worker processes
        return {**self.__dict__, "_loader": None, "_plan": _EpochPlan(), "_busy": False}


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
