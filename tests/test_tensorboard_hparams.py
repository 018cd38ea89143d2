"""TensorBoard(hparams=...): an HParams session read back with TensorBoard's EventAccumulator and plugin protos."""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata, plugin_data_pb2
from torch import nn
from torch.nn import functional as F

from looplab import DataLoaders, Learner, TensorBoard
from looplab.metrics import accuracy


def make_learner(cbs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    return Learner(model, DataLoaders.from_tensors(x, (x[:, 0] > 0).long(), valid_pct=0.25, bs=16), F.cross_entropy,
                   lr=1e-2, metrics=[accuracy], progress=False, cbs=cbs)


def hparams_plugin_data(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    return acc, data


def test_hparams_session_holds_the_hparams_and_the_last_rows_metrics(tmp_path):
    hp = {"lr": 1e-2, "arch": "mlp", "depth": 2, "bn": False}
    learn = make_learner([TensorBoard(tmp_path, histograms=False, hparams=hp)])
    learn.fit(2)
    acc, data = hparams_plugin_data(tmp_path)
    experiment = data[metadata.EXPERIMENT_TAG].experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert metric_tags == {"hparams/train_loss", "hparams/valid_loss", "hparams/accuracy"}
    session = data[metadata.SESSION_START_INFO_TAG].session_start_info
    got = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}
    assert got == {"lr": pytest.approx(1e-2), "arch": "mlp", "depth": 2, "bn": False}
    assert data[metadata.SESSION_END_INFO_TAG].session_end_info.status  # the session was closed
    last = learn.recorder.history[-1]
    for name in ("train_loss", "valid_loss", "accuracy"):
        assert acc.Scalars(f"hparams/{name}")[-1].value == pytest.approx(last[name], rel=1e-6)


def test_hparams_must_be_simple_values(tmp_path):
    with pytest.raises(ValueError, match="hparams must be a dict"):
        TensorBoard(tmp_path, hparams={"layers": [1, 2]})
