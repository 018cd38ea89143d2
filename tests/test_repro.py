"""looplab.repro: seeding, and every PRNG state captured as plain data and restored exactly."""
import io
import random

import numpy as np
import pytest
import torch

from looplab.repro import get_rng_state, set_rng_state, set_seed


def draws():
    """One draw from every generator the state covers, including the cached-gaussian parts of python and numpy."""
    return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(4), torch.randn(2))


def same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_set_seed_seeds_python_numpy_and_torch_like_their_own_seeding():
    set_seed(1234)
    got = random.random(), np.random.rand(), torch.rand(3)
    assert got[0] == random.Random(1234).random()
    assert got[1] == np.random.RandomState(1234).rand()
    assert torch.equal(got[2], torch.rand(3, generator=torch.Generator().manual_seed(1234)))


def test_set_seed_rejects_bad_seeds():
    for bad in (-1, 1.5, "3", True, 2**63):
        with pytest.raises(ValueError, match="seed"):
            set_seed(bad)


def test_deterministic_turns_on_torch_deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        set_seed(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_state_round_trip_repeats_every_generator_exactly():
    set_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave a cached gaussian in both python and numpy
    state = get_rng_state()
    first = draws()
    set_seed(99)
    draws()
    set_rng_state(state)
    assert same(draws(), first)


def test_state_is_plain_data_that_weights_only_loading_accepts():
    set_seed(5)
    random.gauss(0, 1)
    state = get_rng_state()
    first = draws()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    set_rng_state(loaded)
    assert same(draws(), first)


def test_capturing_does_not_start_cuda():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised in this process")
    state = get_rng_state()
    assert state["cuda"] == []
    assert not torch.cuda.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_round_trip():
    torch.cuda.init()
    torch.cuda.manual_seed_all(7)
    state = get_rng_state()
    first = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(8)
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


def test_set_rng_state_rejects_something_else():
    with pytest.raises(ValueError, match="missing"):
        set_rng_state({"python": None})
