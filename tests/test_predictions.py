"""PredictionHistogram (read back by TensorBoard's EventAccumulator) and learn.interpret() (against sklearn)."""
import matplotlib.figure
import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F

from looplab import Callback, CancelFit, Checkpoint, DataLoaders, Learner, TensorBoard
from looplab.callbacks.predictions import PredictionHistogram

g = torch.Generator().manual_seed(0)
X = torch.randn(120, 6, generator=g)
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # 3 classes
XV, YV = X[80:], Y[80:]


def make_learner(cbs=(), out=3, loss=F.cross_entropy, y=Y):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, out))
    dls = DataLoaders.from_tensors(X[:80], y[:80], valid=(XV, y[80:]), bs=16, seed=0)
    return Learner(model, dls, loss, lr=1e-2, progress=False, cbs=cbs)


def test_histograms_one_per_validation_with_the_target_class_probabilities(tmp_path):
    hist = PredictionHistogram(n_samples=30)
    learn = make_learner([hist, TensorBoard(tmp_path, histograms=False)])
    sums = []

    class Reference(Callback):  # after each validation: an independent computation on the same items
        def after_validate(self):
            with torch.no_grad():
                probs = self.learn.model(XV[:30]).softmax(1)[torch.arange(30), YV[:30]]
            sums.append(float(probs.sum()))

    learn.add_cb(Reference())
    learn.fit(3)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    events = acc.Histograms("pred_prob")
    assert [e.step for e in events] == [5, 10, 15]  # at train_iter
    assert all(e.histogram_value.num == 30 for e in events)
    assert [e.histogram_value.sum for e in events] == pytest.approx(sums, rel=1e-5)
    assert [step for step, _ in hist.history] == [5, 10, 15] and all(len(v) == 30 for _, v in hist.history)
    assert all(0 <= v.min() and v.max() <= 1 for _, v in hist.history)
    assert isinstance(hist.plot(), matplotlib.figure.Figure)


def test_binary_single_logit_uses_the_sigmoid():
    hist = PredictionHistogram(n_samples=100)  # more than the 40 validation items: takes them all
    yb = (Y > 0).float()
    learn = make_learner([hist], out=1, loss=lambda p, t: F.binary_cross_entropy_with_logits(p.squeeze(1), t), y=yb)
    learn.fit(1)
    with torch.no_grad():
        expected = learn.model(XV).squeeze(1).sigmoid().numpy()
    assert np.allclose(hist.history[-1][1], expected, atol=1e-6)


def test_histograms_survive_a_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    class StopAfterEpoch1(Callback):
        order = 99  # after the Checkpoint saved epoch 1

        def after_epoch(self):
            if self.learn.epoch == 1:
                raise CancelFit()

    make_learner([PredictionHistogram(8), TensorBoard(tmp_path / "tb", histograms=False), Checkpoint(ckpt),
                  StopAfterEpoch1()]).fit(3)
    hist = PredictionHistogram(8)
    resumed = make_learner([hist, TensorBoard(tmp_path / "tb", histograms=False), Checkpoint(ckpt)])
    resumed.fit(3, resume_from=ckpt)
    assert [step for step, _ in hist.history] == [5, 10, 15]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms("pred_prob")] == [5, 10, 15]


def test_interpret_against_sklearn_and_per_item_cross_entropy():
    learn = make_learner()
    learn.fit(2)
    interp = learn.interpret()
    with torch.no_grad():
        logits = learn.model(XV)
    expected = confusion_matrix(YV.numpy(), logits.argmax(1).numpy(), labels=[0, 1, 2])
    assert isinstance(interp.confusion_matrix(), np.ndarray)
    assert (interp.confusion_matrix() == expected).all()
    losses, indices = interp.top_losses(5)
    ref_losses, ref_indices = F.cross_entropy(logits, YV, reduction="none").topk(5)
    assert torch.equal(indices, ref_indices) and torch.allclose(losses, ref_losses, atol=1e-6)
    assert isinstance(interp.plot_confusion_matrix(), matplotlib.figure.Figure)
    assert isinstance(interp.plot_top_losses(4), matplotlib.figure.Figure)
    assert isinstance(interp.plot_top_losses(4, inputs=XV.reshape(-1, 2, 3)), matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="k must be"):
        interp.top_losses(0)
