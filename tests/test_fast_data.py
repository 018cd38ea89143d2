"""DatasetLoader's one persistent torch DataLoader and its cheap RNG handling.

Worker processes start once for the loader's life (not once per epoch); an abandoned epoch leaves nothing behind;
the caller's generator states come back exactly, numpy's cached normal deviate included (the reference is
numpy's own `get_state`); a dataset's `__getitems__` gets whole batches, as torch's loader gives them.
"""
import copy
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, get_worker_info

from looplab import DataLoaders, Learner
from looplab.data import DatasetLoader, _mix64, batch_seed, derive_seed


class WhoLoads(Dataset):
    """Each sample says which process and which torch worker loaded it, plus one draw from each generator."""

    def __init__(self, n=24):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = get_worker_info()
        draws = torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()], dtype=torch.float64)
        return torch.tensor([os.getpid(), -1 if info is None else info.id]), draws, i


def pids_per_epoch(dl, n_epochs):
    return [{int(pid) for who, _, _ in dl for pid in who[:, 0]} for _ in range(n_epochs)]


def test_worker_processes_start_once_across_epochs():
    dl = DataLoaders.from_datasets(WhoLoads(), bs=3, num_workers=2, seed=0).train
    epochs = pids_per_epoch(dl, 3)
    assert len(epochs[0]) == 2 and os.getpid() not in epochs[0]
    assert epochs[1] == epochs[2] == epochs[0]


def test_worker_processes_start_once_across_fits():
    pids = set()

    def loss(pred, yb):
        return pred.pow(2).mean()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, who, draws):
            pids.update(who[:, 0].tolist())
            return self.lin(draws.float())

    class PairsAsInputs(WhoLoads):
        def __getitem__(self, i):
            who, draws, i = super().__getitem__(i)
            return (who, draws), i

    dls = DataLoaders.from_datasets(PairsAsInputs(), PairsAsInputs(8), bs=4, num_workers=2, seed=0)
    learn = Learner(Model(), dls, loss, lr=1e-3, progress=False)
    learn.fit(2)
    first = set(pids)
    learn.fit(2)
    assert len(first) == 4 and os.getpid() not in first  # two train and two valid workers
    assert pids == first


def test_an_abandoned_epoch_does_not_change_the_next():
    """Breaking out of an epoch leaves prefetched batches in the workers; the next epoch must not see them."""
    for num_workers in (0, 2):
        dl = DataLoaders.from_datasets(WhoLoads(), bs=3, num_workers=num_workers, seed=1).train
        next(iter(dl))  # epoch 0, one batch
        got = [(draws, i) for _, draws, i in dl]  # epoch 1
        fresh = DataLoaders.from_datasets(WhoLoads(), bs=3, num_workers=0, seed=1).train
        fresh.load_state_dict({"epoch": 1, "offset": 0})
        want = [(draws, i) for _, draws, i in fresh]
        assert len(got) == len(want) == 8
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want)), num_workers


def test_an_epoch_started_inside_an_unfinished_one_leaves_it_intact():
    """A nested iteration (get_preds on the training data mid-epoch) must not restart the persistent workers."""
    for num_workers in (0, 2):
        dl = DataLoaders.from_datasets(WhoLoads(), bs=3, num_workers=num_workers, seed=1).train
        outer, nested = [], None
        for k, (_, draws, i) in enumerate(dl):  # epoch 0
            outer.append((draws, i))
            if k == 2:
                nested = [(d, j) for _, d, j in dl]  # epoch 1, whole
        reference = DataLoaders.from_datasets(WhoLoads(), bs=3, num_workers=0, seed=1).train
        want = [[(d, j) for _, d, j in reference] for _ in range(2)]
        for got, expected in ((outer, want[0]), (nested, want[1])):
            assert len(got) == len(expected) == 8
            assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))
        assert pids_per_epoch(dl, 1)  # and the persistent loader still serves the next epoch


def alive(pid):
    return os.path.exists(f"/proc/{pid}")


def test_copies_and_close_keep_no_workers():
    dl = DataLoaders.from_datasets(WhoLoads(), bs=3, num_workers=2, seed=0).train
    first = pids_per_epoch(dl, 1)[0]
    twin = copy.deepcopy(dl)  # no handle on dl's workers travels with it
    pickle.loads(pickle.dumps(dl))
    assert twin.state_dict() == dl.state_dict() == {"epoch": 1, "offset": 0}
    assert twin._loader is None and pids_per_epoch(twin, 1)[0].isdisjoint(first)
    dl.close()
    if os.path.isdir("/proc"):
        assert not any(alive(pid) for pid in first)  # stopped and reaped
    assert pids_per_epoch(dl, 1)[0].isdisjoint(first)  # new workers after close()


def test_batches_are_seeded_from_seed_epoch_batch_and_rank():
    """An independent reference: seed the three generators for batch k by hand, then call __getitem__ in order."""
    ds, bs, seed = WhoLoads(10), 4, 7
    dl = DatasetLoader(ds, bs, shuffle=True, seed=seed)
    dl.load_state_dict({"epoch": 2, "offset": 0})
    got = [(draws, i) for _, draws, i in dl]
    order = [int(i) for _, idx in got for i in idx]
    for k, (draws, idx) in enumerate(got):
        s = batch_seed(derive_seed(seed, 2, 2), k)
        random.seed(s)
        np.random.seed(_mix64(s + 1) >> 32)
        torch.manual_seed(_mix64(s + 2))
        want = torch.stack([ds[i][1] for i in order[k * bs:(k + 1) * bs]])
        assert torch.equal(draws, want)
    assert batch_seed(5, 3, rank=1, world_size=2) == batch_seed(5, 7) != batch_seed(5, 3)


class Gaussians(Dataset):
    """Draws one legacy normal deviate per sample: an odd count leaves numpy's second deviate cached."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.tensor(np.random.standard_normal())


def numpy_state_equal(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize("cached", [False, True])
def test_the_callers_numpy_state_comes_back_exactly_with_or_without_a_cached_deviate(cached):
    dl = DataLoaders.from_datasets(Gaussians(), bs=5, num_workers=0, seed=0).train
    np.random.seed(3)
    if cached:
        np.random.standard_normal()  # draws a pair, returns one, caches the other
    before = np.random.get_state()
    assert before[3] == int(cached)
    batches = [xb for xb in dl]
    after = np.random.get_state()
    assert numpy_state_equal(before, after)
    assert np.random.standard_normal() == (np.random.set_state(before), np.random.standard_normal())[1]
    # the loads themselves were seeded: the same batch again, whatever the caller's state
    np.random.seed(99)
    dl.load_state_dict({"epoch": 0, "offset": 0})
    assert torch.equal(next(iter(dl)), batches[0])


@pytest.mark.skipif(not hasattr(np.random, "set_bit_generator"), reason="numpy < 1.25")
def test_a_non_legacy_global_numpy_generator_is_refused_clearly():
    old = np.random.mtrand._rand._bit_generator
    np.random.set_bit_generator(np.random.PCG64(0))
    try:
        with pytest.raises(TypeError, match="MT19937"):
            next(iter(DataLoaders.from_datasets(Gaussians(), bs=5).train))
    finally:
        np.random.set_bit_generator(old)


class Batched(WhoLoads):
    """A dataset that loads whole batches (as torch's loader asks with `__getitems__`)."""

    def __init__(self, n=24):
        super().__init__(n)
        self.calls = []

    def __getitems__(self, indices):
        self.calls.append(list(indices))
        return [self[i] for i in indices]


def test_getitems_gets_whole_batches_and_stays_independent_of_num_workers():
    ds = Batched()
    dl = DataLoaders.from_datasets(ds, bs=5, num_workers=0, seed=2).train
    batches0 = [(draws, i) for _, draws, i in dl]
    assert [len(c) for c in ds.calls] == [5, 5, 5, 5, 4] and [i.tolist() for _, i in batches0] == ds.calls
    batches2 = [(draws, i) for _, draws, i in DataLoaders.from_datasets(Batched(), bs=5, num_workers=2, seed=2).train]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches0, batches2))


def test_arguments_the_loader_sets_itself_are_refused():
    for kw in ({"persistent_workers": False}, {"batch_size": 4}, {"sampler": None}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            DataLoaders.from_datasets(WhoLoads(), **kw)


def test_a_collected_learner_stops_its_loaders_workers_through_the_finalizer(monkeypatch):
    """A Learner and its callbacks refer to each other, so the cycle collector frees its loaders; their workers
    must be stopped by the loader's finalizer while the queues still work (torch's own `__del__` would wait out a
    timeout per worker)."""
    import gc

    import torch.nn.functional as F
    from torch import nn

    import looplab.data as data
    from looplab import DataLoaders, Learner
    stopped = []
    real = data._stop_workers
    monkeypatch.setattr(data, "_stop_workers", lambda loader: (stopped.append(loader), real(loader)))

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return torch.full((4,), float(i)), i % 3

    learn = Learner(nn.Linear(4, 3), DataLoaders.from_datasets(Items(), Items(), bs=8, num_workers=2),
                    F.cross_entropy, progress=False)
    learn.fit(1)
    workers = [w for dl in (learn.dls.train, learn.dls.valid) for w in dl._loader._iterator._workers]
    assert len(workers) == 4 and all(w.is_alive() for w in workers)
    del learn
    gc.collect()
    assert len(stopped) == 2 and not any(w.is_alive() for w in workers)
