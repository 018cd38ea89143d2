"""Dataset loaders whose results do not depend on num_workers, offsets or the global RNG.

The reference for "independent of workers" is the same loader with another `num_workers` (0 = main process);
for offsets, the same epoch loaded from its start.
"""
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from looplab import DataLoaders, Learner


class Augmenting(Dataset):
    """Every sample draws from torch, numpy and python's global generators, as augmentations do."""

    def __init__(self, n=24):
        self.x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = torch.randn(3) * 0.1 + float(np.random.rand()) + random.random()
        return self.x[i] + noise, i


def epoch(dl):
    """One epoch as (sample ids in order, {id: augmented sample})."""
    ids, samples = [], {}
    for x, y in dl:
        for xi, yi in zip(x, y.tolist()):
            ids.append(yi)
            samples[yi] = xi
    return ids, samples


def loader(num_workers=0, bs=5, seed=3, shuffle=True, n=24):
    return DataLoaders.from_datasets(Augmenting(n), bs=bs, num_workers=num_workers, seed=seed, shuffle=shuffle).train


def same_samples(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_order_and_augmentations_do_not_depend_on_num_workers():
    dl0, dl2 = loader(0), loader(2)
    for _ in range(2):
        (ids0, s0), (ids2, s2) = epoch(dl0), epoch(dl2)
        assert ids0 == ids2
        assert same_samples(s0, s2)


def test_ranks_draw_different_augmentations_for_their_shares():
    """Batches are seeded by (seed, epoch, batch number, rank): two ranks' shares of a global batch differ."""
    shares = []
    for rank in (0, 1):
        dl = loader(0, bs=4)
        dl.set_distributed(rank, 2)
        shares.append(epoch(dl))
    (ids0, _), (ids1, _) = shares
    assert not set(ids0) & set(ids1) and sorted(ids0 + ids1) == list(range(24))
    noise = [s[i] - torch.tensor([float(i)] * 3) for ids, s in shares for i in ids[:4]]  # first global batch
    assert all(not torch.equal(noise[a], noise[b]) for a in range(8) for b in range(a))


def test_every_epoch_has_a_new_order_and_new_augmentations_and_seeds_differ():
    dl = loader(0)
    (ids_a, a), (ids_b, b) = epoch(dl), epoch(dl)
    assert sorted(ids_a) == sorted(ids_b) == list(range(24))
    assert ids_a != ids_b and not torch.equal(a[0], b[0])
    ids_c, c = epoch(loader(0, seed=4))
    assert ids_c != ids_a and not torch.equal(c[0], a[0])
    ids_plain, _ = epoch(loader(0, shuffle=False))
    assert ids_plain == list(range(24))


def test_the_global_seed_does_not_change_the_data():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    first = epoch(loader(0))
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    second = epoch(loader(0))
    assert first[0] == second[0] and same_samples(first[1], second[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loading_consumes_no_global_random_numbers(num_workers):
    """torch's DataLoader draws a base seed from the global torch RNG unless it has its own generator."""
    dl = loader(num_workers)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    epoch(dl)
    after = torch.rand(3), np.random.rand(), random.random()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    untouched = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(after[0], untouched[0]) and after[1:] == untouched[1:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_started_at_an_offset_is_the_tail_of_the_full_epoch(num_workers):
    dl = loader(num_workers)
    epoch(dl)  # epoch 0
    full = [(x, y) for x, y in dl]  # epoch 1
    dl.load_state_dict({"epoch": 1, "offset": 3})
    tail = [(x, y) for x, y in dl]
    assert len(tail) == len(full) - 3 == len(dl) - 3
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(tail, full[3:]))
    assert dl.state_dict() == {"epoch": 2, "offset": 0}


def fit(num_workers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    dls = DataLoaders.from_datasets(Augmenting(24), Augmenting(8), bs=5, num_workers=num_workers, seed=1)
    learn = Learner(model, dls, lambda pred, i: ((pred.squeeze(1) - i.float() / 24) ** 2).mean(), lr=1e-2,
                    progress=False)
    learn.fit(2)
    return learn.recorder.losses, learn.recorder.history[-1]["valid_loss"], model.state_dict()


def test_training_is_bit_identical_for_0_and_2_workers():
    losses0, valid0, weights0 = fit(0)
    losses2, valid2, weights2 = fit(2)
    assert losses0 == losses2 and valid0 == valid2
    assert all(torch.equal(weights0[k], weights2[k]) for k in weights0)


def test_from_datasets_basics():
    dls = DataLoaders.from_datasets(Augmenting(24), Augmenting(8), bs=5, num_workers=0)
    assert len(dls.train) == 5 and len(dls.valid) == 2
    assert epoch(dls.valid)[0] == list(range(8))  # validation is never shuffled
    assert len(DataLoaders.from_datasets(Augmenting(24), bs=5, drop_last=True).train) == 4
    with pytest.raises(ValueError, match="num_workers"):
        DataLoaders.from_datasets(Augmenting(), num_workers=-1)
    with pytest.raises(TypeError, match="map-style"):
        DataLoaders.from_datasets(iter(range(3)))
