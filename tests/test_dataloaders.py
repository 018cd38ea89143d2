"""DataLoaders.from_tensors: seeded order, a fresh permutation per epoch, every sample once, splits, errors."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from looplab import DataLoaders


def ids(dl):
    return torch.cat([y for _, y in dl]).tolist()


def make(n=50, **kw):
    x = torch.arange(n).float().unsqueeze(1)
    return DataLoaders.from_tensors(x, torch.arange(n), valid=(x[:5], torch.arange(5)), **kw)


def test_same_seed_same_order_new_permutation_each_epoch():
    a, b, c = make(bs=8, seed=3), make(bs=8, seed=3), make(bs=8, seed=4)
    e0, e1 = ids(a.train), ids(a.train)
    assert e0 == ids(b.train) and e1 == ids(b.train)
    assert e0 != e1 and e0 != ids(c.train)
    assert sorted(e0) == sorted(e1) == list(range(50))


def test_batches_index_the_tensors_and_match_torch_dataloader_without_shuffle():
    x, y = torch.randn(37, 3), torch.randint(0, 4, (37,))
    dls = DataLoaders.from_tensors(x, y, valid=(x, y), bs=10, shuffle=False)
    ours = list(dls.train)
    theirs = list(DataLoader(TensorDataset(x, y), batch_size=10))
    assert len(ours) == len(theirs) == len(dls.train) == 4
    for (xa, ya), (xb, yb) in zip(ours, theirs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_drop_last_and_validation_order():
    dls = make(bs=8, drop_last=True)
    assert len(dls.train) == 6 and all(len(y) == 8 for _, y in dls.train)
    assert ids(dls.valid) == list(range(5)) == ids(dls.valid)


def test_valid_pct_is_a_seeded_disjoint_split():
    x = torch.arange(100).float().unsqueeze(1)
    dls = DataLoaders.from_tensors(x, torch.arange(100), valid_pct=0.2, bs=16, seed=1)
    train, valid = ids(dls.train), ids(dls.valid)
    assert len(valid) == 20 and len(train) == 80 and not set(train) & set(valid)
    again = DataLoaders.from_tensors(x, torch.arange(100), valid_pct=0.2, bs=16, seed=1)
    assert ids(again.valid) == valid


def test_an_epoch_can_start_at_a_batch_offset():
    dls = make(bs=8)
    full = [y.tolist() for _, y in dls.train]
    dls.train.load_state_dict({"epoch": 0, "offset": 3})
    assert [y.tolist() for _, y in dls.train] == full[3:]
    assert dls.train.state_dict() == {"epoch": 1, "offset": 0}


@pytest.mark.parametrize("kw,match", [({"bs": 0}, "bs"), ({"bs": 2.5}, "bs"), ({"valid_pct": 1.5}, "valid_pct")])
def test_bad_arguments(kw, match):
    x = torch.zeros(10, 2)
    with pytest.raises(ValueError, match=match):
        DataLoaders.from_tensors(x, torch.zeros(10), **kw)


def test_mismatched_lengths_and_types():
    with pytest.raises(ValueError, match="length"):
        DataLoaders.from_tensors(torch.zeros(10, 2), torch.zeros(9), valid_pct=0.2)
    with pytest.raises(TypeError, match="list"):
        DataLoaders.from_tensors([[1, 2]], torch.zeros(1), valid=([[1, 2]], torch.zeros(1)))
