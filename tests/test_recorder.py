"""Recorder, ProgressBar and TensorBoard: what they record, show and write (read back by TensorBoard itself)."""
import math

import matplotlib.figure
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from looplab import Callback, DataLoaders, Learner, TensorBoard
from looplab.metrics import accuracy


def digits_like(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long()


def make_learner(**kw):
    x, y = digits_like()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    kw = {"progress": False, "metrics": [accuracy], **kw}
    return Learner(model, DataLoaders.from_tensors(x, y, valid_pct=0.25, bs=16), F.cross_entropy, lr=1e-2, **kw)


class LogGradNorm(Callback):
    def after_backward(self):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.learn.model.parameters()]))
        self.learn.recorder.log("grad_norm", norm)


def test_recorder_records_plain_floats_per_step_and_per_epoch():
    learn = make_learner(cbs=[LogGradNorm()])
    learn.fit(3)
    rec = learn.recorder
    assert len(rec.losses) == 3 * 5 and all(type(v) is float for v in rec.losses)
    assert rec.lrs == [1e-2] * 15
    assert [r["epoch"] for r in rec.history] == [0, 1, 2]
    assert set(rec.history[0]) == {"epoch", "train_iter", "train_loss", "valid_loss", "accuracy", "time"}
    assert rec.history[1]["train_loss"] == pytest.approx(sum(rec.losses[5:10]) / 5)
    assert rec.history[-1]["valid_loss"] == pytest.approx(learn.validate()["valid_loss"])
    series = rec.series("grad_norm")
    assert [i for i, _ in series] == list(range(15)) and all(type(v) is float and v > 0 for _, v in series)
    with pytest.raises(KeyError, match="nope"):
        rec.series("nope")
    state = rec.state_dict()

    def tensors_in(obj):
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, dict):
            obj = list(obj.values())
        return [t for o in obj for t in tensors_in(o)] if isinstance(obj, (list, tuple)) else []
    assert tensors_in(state) == []  # plain data: no tensors or graphs anywhere in it
    assert tensors_in([v for k, v in vars(rec).items() if k != "learn"]) == []


class OnAccelerator(torch.Tensor):
    """A CPU tensor that says it is not on the CPU: drives the Recorder's deferred (accelerator) path here."""

    @property
    def is_cpu(self):
        return False


def test_values_kept_as_tensors_on_an_accelerator_become_floats_at_the_epoch_end():
    class LogDeferred(Callback):
        def after_loss(self):
            if self.learn.training:
                self.learn.recorder.log("deferred", (self.learn.loss.detach() * 2).as_subclass(OnAccelerator))

        def after_batch(self):  # within the epoch the value is still a tensor: no host sync was made
            if self.learn.training:
                entry = self.learn.recorder._series["deferred"][-1][1]
                self.kept = isinstance(entry, torch.Tensor)

    cb = LogDeferred()
    learn = make_learner(cbs=[cb])
    learn.fit(2)
    assert cb.kept
    values = learn.recorder.series("deferred")
    assert all(type(v) is float for _, v in values)
    assert [v for _, v in values] == pytest.approx([2 * x for x in learn.recorder.losses])
    assert all(type(e[1]) is float for e in learn.recorder.state_dict()["series"]["deferred"])


def test_recorder_losses_match_a_hand_computed_loss():
    learn = make_learner()
    first = learn.dls.train  # batch order of epoch 0 is a pure function of (seed, epoch)
    xb, yb = next(iter(first))
    first.load_state_dict({"epoch": 0, "offset": 0})
    with torch.no_grad():
        expected = F.cross_entropy(learn.model(xb), yb).item()
    learn.fit(1)
    assert learn.recorder.losses[0] == pytest.approx(expected, rel=1e-6)


def test_recorder_log_rejects_bad_values():
    learn = make_learner()
    with pytest.raises(ValueError, match="shape"):
        learn.recorder.log("x", torch.ones(3))
    with pytest.raises(ValueError, match="name"):
        learn.recorder.log("", 1.0)


def test_plots_are_figures():
    learn = make_learner()
    learn.fit(2)
    assert isinstance(learn.recorder.plot_loss(), matplotlib.figure.Figure)
    assert isinstance(learn.recorder.plot_lr(), matplotlib.figure.Figure)


def test_progress_bar_prints_one_row_per_epoch(capsys):
    learn = make_learner(progress=True)
    learn.fit(2)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].split() == ["epoch", "train_iter", "train_loss", "valid_loss", "accuracy", "time"]
    assert [line.split()[0] for line in out[1:]] == ["0", "1"]
    learn2 = make_learner(progress=False)
    learn2.fit(1)
    assert capsys.readouterr().out == ""


def test_tensorboard_writes_what_tensorboard_reads(tmp_path):
    learn = make_learner(cbs=[LogGradNorm(), TensorBoard(tmp_path)])
    learn.fit(2)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train_loss", "lr", "grad_norm", "valid_loss", "accuracy"} <= set(tags["scalars"])
    train = acc.Scalars("train_loss")
    assert [e.step for e in train] == list(range(10))
    assert [e.value for e in train] == pytest.approx(learn.recorder.losses, rel=1e-6)
    assert [e.value for e in acc.Scalars("grad_norm")] == pytest.approx([v for _, v in learn.recorder.series("grad_norm")], rel=1e-6)
    assert [e.value for e in acc.Scalars("valid_loss")] == pytest.approx([r["valid_loss"] for r in learn.recorder.history], rel=1e-6)
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(tags["histograms"])
    hist = acc.Histograms("0.weight")
    assert len(hist) == 2 and hist[-1].histogram_value.num == 48
    w = learn.model[0].weight.detach()
    assert hist[-1].histogram_value.min == pytest.approx(w.min().item()) and hist[-1].histogram_value.max == pytest.approx(w.max().item())
    assert math.isclose(hist[-1].histogram_value.sum, w.sum().item(), rel_tol=1e-4, abs_tol=1e-4)
