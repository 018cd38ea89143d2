"""ShowGraph in a script: the loss curves written as a PNG (read back with matplotlib), redrawn after every
validation with the Recorder's values."""
import matplotlib.image
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from looplab import Callback, DataLoaders, Learner, ShowGraph

x = torch.randn(120, 4, generator=torch.Generator().manual_seed(0))
y = (x[:, 0] > 0).long()


def make_learner(cbs):
    torch.manual_seed(0)
    dls = DataLoaders.from_tensors(x[:80], y[:80], valid=(x[80:], y[80:]), bs=16, seed=0)
    return Learner(nn.Linear(4, 2), dls, F.cross_entropy, lr=1e-2, progress=False, cbs=cbs)


def test_a_script_writes_the_loss_curves_as_a_png_after_every_validation(tmp_path):
    path = tmp_path / "plots" / "loss.png"
    graph = ShowGraph(path, html=False)
    sizes = []

    class WatchFile(Callback):
        order = graph.order + 1  # after ShowGraph redrew

        def after_epoch(self):
            sizes.append(path.stat().st_mtime_ns if path.exists() else None)

    learn = make_learner([graph, WatchFile()])
    learn.fit(3)
    assert None not in sizes and len(set(sizes)) == 3  # written (and replaced) at every epoch's row
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    train, valid = graph.figure.axes[0].get_lines()
    assert list(train.get_ydata()) == pytest.approx(learn.recorder.losses)
    assert list(valid.get_ydata()) == pytest.approx([r["valid_loss"] for r in learn.recorder.history])
    assert list(valid.get_xdata()) == [4, 9, 14]  # the last training step of each epoch
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary left behind


def test_the_default_path_is_loss_png_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_learner([ShowGraph(html=False)]).fit(1)
    assert matplotlib.image.imread(tmp_path / "loss.png").ndim == 3
