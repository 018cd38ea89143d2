"""SamplePredictions: a table of fixed validation items after each validation, checked against the model's own
outputs computed independently, read back from TensorBoard (EventAccumulator, text plugin) and MLflow."""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch import nn
from torch.nn import functional as F

from looplab import Callback, Checkpoint, DataLoaders, Learner, SamplePredictions, TensorBoard
from looplab.callbacks.order import Order
from looplab.display import markdown_table

g = torch.Generator().manual_seed(0)
X = torch.randn(120, 6, generator=g)
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # 3 classes
XV, YV = X[80:], Y[80:]  # 40 validation items, batches of 16: 16, 16, 8
INDICES = [33, 0, 17, 15, 16]  # any order; items in the first, second and last batch, at batch edges


def make_learner(cbs=(), out=3, loss=F.cross_entropy, y=Y):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, out))
    dls = DataLoaders.from_tensors(X[:80], y[:80], valid=(XV, y[80:]), bs=16, seed=0)
    return Learner(model, dls, loss, lr=1e-2, progress=False, cbs=cbs)


class Reference(Callback):
    """After each validation: the expected rows, from the model called on the items directly."""
    def __init__(self, indices):
        self.indices, self.tables = indices, []

    def after_validate(self):
        with torch.no_grad():
            probs = self.learn.model(XV[self.indices]).softmax(1)
        self.tables.append([{"index": i, "target": int(YV[i]), "prediction": int(probs[k].argmax()),
                             "probability": float(probs[k].max())} for k, i in enumerate(self.indices)])


def assert_rows_match(rows, expected):
    assert [r["index"] for r in rows] == [e["index"] for e in expected]
    for r, e in zip(rows, expected):
        assert (r["target"], r["prediction"]) == (e["target"], e["prediction"])
        assert r["probability"] == pytest.approx(e["probability"], rel=1e-5)


def test_one_table_per_validation_equal_to_an_independent_computation(tmp_path):
    samples, ref = SamplePredictions(INDICES), Reference(INDICES)
    make_learner([samples, ref, TensorBoard(tmp_path, histograms=False)]).fit(3)
    assert [t.step for t in samples.history] == [5, 10, 15]  # at train_iter
    for table, expected in zip(samples.history, ref.tables):
        assert_rows_match(table.rows, expected)
    assert samples.published_tables == {"sample_predictions": [(t.step, t.rows) for t in samples.history]}

    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("sample_predictions/text_summary")  # TensorBoard's text plugin
    assert [e.step for e in events] == [5, 10, 15]
    texts = [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in events]
    assert texts == [markdown_table(t.rows) for t in samples.history]
    header, _, *lines = texts[-1].splitlines()
    assert header == "| index | target | prediction | probability |" and len(lines) == len(INDICES)
    assert lines[1].startswith(f"| 0 | {int(YV[0])} | {ref.tables[-1][1]['prediction']} | ")


def test_decode_gives_a_readable_input_and_html_shows_the_table():
    samples = SamplePredictions([3, 20], decode=lambda x: f"x0={float(x[0]):.3f}")
    make_learner([samples]).fit(1)
    rows = samples.history[-1].rows
    assert list(rows[0]) == ["index", "input", "target", "prediction", "probability"]
    assert [r["input"] for r in rows] == [f"x0={float(XV[3, 0]):.3f}", f"x0={float(XV[20, 0]):.3f}"]
    markup = samples.history[-1]._repr_html_()
    assert markup.startswith('<table class="looplab"><caption>predictions at step 5</caption>')
    assert markup.count("<tr>") == 3 and f"<td>x0={float(XV[20, 0]):.3f}</td>" in markup
    assert "predictions at step 5" in repr(samples.history[-1])


def test_single_logit_predicts_class_1_above_one_half():
    samples = SamplePredictions(range(40))
    yb = (Y > 0).float()
    learn = make_learner([samples], out=1, loss=lambda p, t: F.binary_cross_entropy_with_logits(p.squeeze(1), t),
                         y=yb)
    learn.fit(1)
    with torch.no_grad():
        p1 = learn.model(XV).squeeze(1).sigmoid()
    rows = samples.history[-1].rows
    assert [r["prediction"] for r in rows] == (p1 > 0.5).long().tolist()
    assert [r["probability"] for r in rows] == pytest.approx(torch.where(p1 > 0.5, p1, 1 - p1).tolist(), rel=1e-5)
    assert [r["target"] for r in rows] == yb[80:].tolist()


def test_indices_are_checked():
    with pytest.raises(ValueError, match="indices"):
        SamplePredictions([])
    with pytest.raises(ValueError, match=r"indices\[i\] must be an int >= 0, got -1"):
        SamplePredictions([-1])
    with pytest.raises(TypeError, match="decode"):
        SamplePredictions([0], decode="x")
    with pytest.raises(ValueError, match=r"indices \[40\] are beyond the 40 validation items"):
        make_learner([SamplePredictions([1, 40])]).fit(1)


def test_tables_survive_a_resume_in_tensorboard_and_mlflow(tmp_path, monkeypatch):
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under ./mlruns
    from looplab import MLflowLogger
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class CrashAfterEpoch1(Callback):  # after the loggers wrote epoch 1, before the Checkpoint saved it
        order = (Order.LOGGERS + Order.CHECKPOINT) // 2

        def after_epoch(self):
            if self.learn.epoch == 1:
                raise RuntimeError("simulated crash")

    def callbacks(samples):
        return [samples, TensorBoard(tmp_path / "tb", histograms=False), MLflowLogger(tracking, flush_s=0),
                Checkpoint(tmp_path / "ckpt")]

    logger_cbs = callbacks(SamplePredictions([1, 2]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_learner([*logger_cbs, CrashAfterEpoch1()]).fit(3)
    run_id = logger_cbs[2].run_id
    samples = SamplePredictions([1, 2])
    resumed = make_learner(callbacks(samples))
    resumed.fit(3, resume_from=tmp_path / "ckpt")
    assert [t.step for t in samples.history] == [5, 10, 15]

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    text_steps = sorted(e.step for e in acc.Tensors("sample_predictions/text_summary"))
    # the crash came after TensorBoard wrote epoch 1 and before the checkpoint: like every scalar of that epoch,
    # its text is written again by the resumed fit (TensorBoard shows the later one); nothing else repeats
    assert text_steps == sorted(e.step for e in acc.Scalars("valid_loss")) == [5, 10, 10, 15]

    import pandas as pd
    client = mlflow_tracking.MlflowClient(tracking)
    assert resumed.cbs[[type(c).__name__ for c in resumed.cbs].index("MLflowLogger")].run_id == run_id
    table = pd.read_json(client.download_artifacts(run_id, "tables/sample_predictions.json", str(tmp_path)),
                         orient="split")
    assert list(table.columns) == ["step", "index", "target", "prediction", "probability"]
    assert table["step"].tolist() == [5, 5, 10, 10, 15, 15]  # every validation once, none repeated
    last = samples.history[-1].rows
    assert table["probability"].tolist()[-2:] == pytest.approx([r["probability"] for r in last], rel=1e-6)
