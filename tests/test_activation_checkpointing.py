"""ActivationCheckpointing: same training as without it, recomputation only in training, the model untouched."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import ActivationCheckpointing, MixedPrecision


class Block(nn.Module):
    """A residual MLP block with dropout: recomputation must replay the same dropout masks."""

    def __init__(self, width=16):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(0.2), nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.inner(x)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), Block(), Block(), Block(), nn.Linear(16, 3))


def fit(cbs=(), n_epochs=2, model=None):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    dls = DataLoaders.from_tensors(x, y, valid=(x[:32], y[:32]), bs=16, seed=0)
    learn = Learner(model or make_model(), dls, F.cross_entropy, lr=1e-2, cbs=cbs, progress=False)
    torch.manual_seed(2)  # dropout draws from the global RNG: same start for both runs
    learn.fit(n_epochs)
    return learn


def test_same_weights_as_without_it():
    plain = fit()
    ac = ActivationCheckpointing(Block)
    checkpointed = fit([ac])
    assert ac.n_wrapped == 3
    for p, q in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert plain.recorder.losses == pytest.approx(checkpointed.recorder.losses, rel=1e-6)


class CountCalls(Callback):
    """How often the first Linear of each block runs, per phase: twice per training batch when recomputed."""
    order = 100

    def before_fit(self):
        self.calls = {True: 0, False: 0}
        self.hooks = [m.inner[0].register_forward_hook(self.count) for m in self.learn.model if isinstance(m, Block)]

    def count(self, module, args, out):
        self.calls[self.learn.training] += 1

    def before_batch(self):
        self.keys = list(self.learn.model.state_dict())  # what a checkpoint written now would hold

    def after_fit(self):
        for h in self.hooks:
            h.remove()


def test_recomputes_in_training_only_and_leaves_the_model_as_it_was():
    model = make_model()
    modules, keys = list(model.modules()), list(model.state_dict())
    counter = CountCalls()
    fit([ActivationCheckpointing(Block), counter], n_epochs=1, model=model)
    assert counter.calls == {True: 6 * 3 * 2, False: 2 * 3}  # 6 training batches x 3 blocks x (forward + backward)
    assert counter.keys == keys  # unchanged during the fit too
    assert list(model.modules()) == modules and all(a is b for a, b in zip(model.modules(), modules))
    assert list(model.state_dict()) == keys
    assert not any("forward" in vars(m) for m in model.modules())
    plain_counter = CountCalls()
    fit([plain_counter], n_epochs=1)
    assert plain_counter.calls == {True: 6 * 3, False: 2 * 3}


def test_predicate_selector_and_nested_modules_are_not_wrapped_twice():
    ac = ActivationCheckpointing(lambda name, m: isinstance(m, (Block, nn.Linear)) and name != "0" and name != "4")
    fit([ac], n_epochs=1)
    assert ac.n_wrapped == 3  # the blocks; the Linears inside them are covered already


def test_a_forward_of_its_own_is_restored():
    model = make_model()
    block = model[1]
    own = block.forward
    block.forward = lambda x: own(x)  # e.g. a user's instance-level override
    marker = block.forward
    fit([ActivationCheckpointing(Block)], n_epochs=1, model=model)
    assert block.forward is marker


def test_with_mixed_precision():
    plain = fit([MixedPrecision(torch.bfloat16)])
    checkpointed = fit([MixedPrecision(torch.bfloat16), ActivationCheckpointing(Block)])
    for p, q in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_matching_nothing_is_an_error_naming_the_selector():
    with pytest.raises(ValueError, match="Conv2d"):
        fit([ActivationCheckpointing(nn.Conv2d)])


@pytest.mark.parametrize("bad", [3, (Block, 3), (), "Block", (int,)])
def test_bad_selector(bad):
    with pytest.raises(TypeError, match="modules"):
        ActivationCheckpointing(bad)


def cpu_peak_bytes(step) -> int:
    """The benchmark's measurement (benchmarks/memory.py): the CPU allocator's peak replayed from the profiler."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("looplab_memory_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_peak_bytes(step)


def test_checkpointing_lowers_the_peak_memory_of_a_training_step():
    peaks = {}
    for name, cbs in (("plain", []), ("checkpointed", [ActivationCheckpointing(Block)])):
        torch.manual_seed(0)
        model = nn.Sequential(*[Block(64) for _ in range(6)])
        x = torch.randn(256, 64)
        learn = Learner(model, ([(x, x)], None), F.mse_loss, cbs=cbs, progress=False)
        learn.fit(1)  # warm up: what the step allocates is measured, not the weights
        peaks[name] = cpu_peak_bytes(lambda: learn.fit(1))
    assert peaks["checkpointed"] < 0.6 * peaks["plain"]
