"""CSVLogger and MLflowLogger, read back with csv and MLflow's own client; resumed fits continue without duplicates."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from looplab import Callback, Checkpoint, DataLoaders, Learner
from looplab.callbacks import CSVLogger, MLflowLogger, PredictionHistogram
from looplab.callbacks.order import Order
from looplab.metrics import accuracy

mlflow_tracking = pytest.importorskip("mlflow.tracking")  # imported once for the module (slow)
MlflowClient = mlflow_tracking.MlflowClient


def make_learner(cbs=(), n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    return Learner(model, DataLoaders.from_tensors(x, y, valid_pct=0.25, bs=16), F.cross_entropy, lr=1e-2,
                   metrics=[accuracy], progress=False, cbs=cbs)


class CrashAfterEpoch(Callback):
    """Raises in `after_epoch` of `epoch`: after the loggers wrote it, before the Checkpoint saved it."""
    order = (Order.LOGGERS + Order.CHECKPOINT) // 2

    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self):
        if self.learn.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_rows_equal_history(rows, history):
    assert len(rows) == len(history)
    for row, hist in zip(rows, history):
        assert list(row) == list(hist)
        for k, v in hist.items():
            assert math.isclose(float(row[k]), v, rel_tol=1e-6, abs_tol=1e-6), (k, row[k], v)


# ---- CSV ----------------------------------------------------------------------------------------------------------
def test_csv_rows_equal_the_history(tmp_path):
    path = tmp_path / "log.csv"
    learn = make_learner([CSVLogger(path)])
    learn.fit(3)
    assert_rows_equal_history(read_csv(path), learn.recorder.history)
    learn.fit(2)  # a fresh fit starts a new file
    assert_rows_equal_history(read_csv(path), learn.recorder.history)
    assert len(read_csv(path)) == 2


def test_csv_resumed_fit_has_every_epoch_once(tmp_path):
    path, ckpt = tmp_path / "log.csv", tmp_path / "ckpt"
    learn = make_learner([CSVLogger(path), Checkpoint(ckpt), CrashAfterEpoch(2)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        learn.fit(4)
    assert [r["epoch"] for r in read_csv(path)] == ["0", "1", "2"]  # epoch 2 was logged, never checkpointed
    resumed = make_learner([CSVLogger(path), Checkpoint(ckpt)])
    resumed.fit(4, resume_from=ckpt)
    rows = read_csv(path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert_rows_equal_history(rows, resumed.recorder.history)


def test_csv_new_column_rewrites_the_file(tmp_path):
    class LateKey(Callback):
        order = Order.RECORDER + 1

        def after_epoch(self):
            if self.learn.epoch == 1:
                self.learn.recorder.history[-1]["extra"] = 1.5

    path = tmp_path / "log.csv"
    make_learner([CSVLogger(path), LateKey()]).fit(3)
    rows = read_csv(path)
    assert [r["extra"] for r in rows] == ["", "1.5", ""]


# ---- MLflow -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")  # one database for the module: creating one takes seconds


@pytest.fixture
def tracking(tracking_db, monkeypatch):
    monkeypatch.chdir(tracking_db)  # artifacts go under ./mlruns
    return f"sqlite:///{tracking_db / 'mlflow.db'}"


def metric_steps(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_run_holds_params_steps_validation_and_artifacts(tracking, monkeypatch):
    logger = MLflowLogger(tracking, experiment_name="exp", run_name="first", log_model=True, flush_s=3600)
    hist = PredictionHistogram(8)
    learn = make_learner([logger, hist])
    calls = []
    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    learn.fit(3)
    client = MlflowClient(tracking)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert float(run.data.params["lr"]) == 1e-2 and run.data.params["opt_func"] == "AdamW"
    assert run.data.params["n_epochs"] == "3" and run.data.params["batch_size"] == "16"
    losses = learn.recorder.losses
    got = metric_steps(client, logger.run_id, "train_loss")
    assert [s for s, _ in got] == list(range(len(losses)))
    assert [v for _, v in got] == pytest.approx(losses, rel=1e-6)
    assert [v for _, v in metric_steps(client, logger.run_id, "lr")] == pytest.approx(learn.recorder.lrs)
    valid = metric_steps(client, logger.run_id, "valid_loss")
    assert [s for s, _ in valid] == [5, 10, 15]  # once per validation, at the steps done
    assert [v for _, v in valid] == pytest.approx([r["valid_loss"] for r in learn.recorder.history], rel=1e-6)
    assert len(metric_steps(client, logger.run_id, "accuracy")) == 3
    assert len([c for c in calls if c.get("metrics")]) == 1  # batched: one request for the whole (short) fit
    artifacts = {a.path for d in ("plots", "model", "histograms") for a in client.list_artifacts(logger.run_id, d)}
    assert artifacts == {"plots/loss.png", "plots/lr.png", "model/model_state_dict.pt", "histograms/pred_prob.json"}
    logged = json.loads(Path(client.download_artifacts(logger.run_id, "histograms/pred_prob.json")).read_text())
    assert [e["step"] for e in logged] == [5, 10, 15]
    assert logged[-1]["values"] == pytest.approx(hist.history[-1][1].tolist())
    path = client.download_artifacts(logger.run_id, "model/model_state_dict.pt")
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in learn.model.state_dict().items())


def test_mlflow_failed_fit_then_resume_continues_the_same_run(tracking, tmp_path):
    ckpt = tmp_path / "ckpt"
    logger = MLflowLogger(tracking, experiment_name="resume", flush_s=0)  # flush every step: the crashed fit sent steps past its checkpoint
    learn = make_learner([logger, Checkpoint(ckpt), CrashAfterEpoch(2)])
    with pytest.raises(RuntimeError):
        learn.fit(4)
    client = MlflowClient(tracking)
    assert client.get_run(logger.run_id).info.status == "FAILED"
    assert len(metric_steps(client, logger.run_id, "train_loss")) == 15

    resumed_logger = MLflowLogger(tracking, experiment_name="resume", flush_s=0)
    resumed = make_learner([resumed_logger, Checkpoint(ckpt)])
    resumed.fit(4, resume_from=ckpt)
    assert resumed_logger.run_id == logger.run_id
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    steps = [s for s, _ in metric_steps(client, logger.run_id, "train_loss")]
    assert steps == list(range(20))  # 0…19, none twice
    assert [v for _, v in metric_steps(client, logger.run_id, "train_loss")] == pytest.approx(
        resumed.recorder.losses, rel=1e-6)
    assert [s for s, _ in metric_steps(client, logger.run_id, "valid_loss")] == [5, 10, 15, 20]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_missing_is_an_import_error_naming_the_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    learn = make_learner([MLflowLogger()])
    with pytest.raises(ImportError, match=r"looplab\[mlflow\]"):
        learn.fit(1)


def test_mlflow_takes_metric_names_it_would_refuse_and_logs_the_fits_lr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    logger = MLflowLogger(uri, experiment_name="names")
    learn = make_learner([logger])
    learn.metrics = [lambda pred, y: (pred.argmax(-1) == y).float().mean()]  # named "<lambda>"
    learn.fit_one_cycle(2, lr_max=0.05)
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert float(run.data.params["lr"]) == pytest.approx(0.05)
    assert len(client.get_metric_history(logger.run_id, "train_loss")) == len(learn.recorder.losses)
    assert "_lambda_" in run.data.metrics


def test_prediction_histograms_ignore_validations_after_the_fit(tmp_path):
    hist = PredictionHistogram(n_samples=8)
    learn = make_learner([hist])
    learn.fit(2)
    before = [step for step, _ in hist.history]
    learn.validate()
    learn.get_preds(learn.dls.train)
    assert [step for step, _ in hist.history] == before == [len(learn.recorder.losses) // 2, len(learn.recorder.losses)]
