"""mode="auto" for EarlyStopping / SaveBest / ReduceLROnPlateau: the direction from the name, or from a metric
object's `higher_is_better`; a name that says nothing is an error before any training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import EarlyStopping, ReduceLROnPlateau, SaveBest
from looplab.callbacks.tracking import name_direction, resolve_mode

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["loss", "valid_loss", "train_loss", "my_loss", "error_rate", "mse", "val_mae",
                                  "RMSE", "perplexity", "valid_bpb", "nll", "valid_ce", "wer", "cer",
                                  "MeanSquaredError", "dice_loss"])
def test_loss_and_error_like_names_are_minimised(name):
    assert name_direction(name) == "min" and resolve_mode(name, "auto") == "min"


@pytest.mark.parametrize("name", ["accuracy", "acc", "val_acc", "top5_acc", "f1", "F1Score", "MulticlassF1Score",
                                  "auc", "AUROC", "BinaryAUROC", "precision", "recall@5", "iou", "MeanIoU", "dice",
                                  "bleu", "bleu4", "r2", "R2Score", "map", "mAP"])
def test_score_like_names_are_maximised(name):
    assert name_direction(name) == "max" and resolve_mode(name, "auto") == "max"


@pytest.mark.parametrize("name", ["score", "my_metric", "learning_rate", "gap", "snr"])
def test_a_name_that_says_nothing_is_an_error_asking_for_mode(name):
    assert name_direction(name) is None
    with pytest.raises(ValueError, match="mode="):
        resolve_mode(name, "auto")
    assert resolve_mode(name, "min") == "min" and resolve_mode(name, "max") == "max"
    assert resolve_mode(name, "auto", higher_is_better=False) == "min"


def learner(metrics=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    torch.manual_seed(0)
    return Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, (x[:, 0] > 0).long(), bs=32, seed=0),
                   F.cross_entropy, lr=1e-2, progress=False, metrics=metrics)


class Scripted:
    """A metric object whose value at validation e is values[e]; declares `higher_is_better` if given."""

    def __init__(self, name, values, higher_is_better=None):
        self.name, self.values, self.calls = name, list(values), 0
        if higher_is_better is not None:
            self.higher_is_better = higher_is_better

    def reset(self):
        pass

    def update(self, pred, target):
        pass

    def compute(self):
        self.calls += 1
        return self.values[self.calls - 1]


def scripted_fn(name, values):
    it = iter(values)

    def metric(pred, target):
        return next(it)
    metric.__name__ = name
    return metric


def test_auto_stops_on_a_rising_mse():
    values = [1.0, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4]  # best at epoch 1, then rising: patience 2 stops at 3
    es = EarlyStopping("mse", patience=2)
    learn = learner(metrics=[scripted_fn("mse", values)])  # one validation batch per epoch: one value each
    learn.fit(len(values), cbs=[es])
    assert es.mode == "min" and es.best == pytest.approx(0.8) and es.best_epoch == 1
    assert es.stopped_epoch == 3 and len(learn.recorder.history) == 4


def test_unknown_name_raises_before_any_training():
    class Steps(Callback):
        def before_fit(self):
            self.steps = 0

        def after_step(self):
            self.steps += 1

    steps = Steps()
    learn = learner(metrics=[scripted_fn("score", [0.5] * 3)])
    es = EarlyStopping("score")  # construction cannot know yet: a metric object might declare it
    with pytest.raises(ValueError, match=r"EarlyStopping.*'score'.*mode="):
        learn.fit(3, cbs=[es, steps])
    assert steps.steps == 0 and learn.recorder.history == []
    for cb in (SaveBest("unused.pt", monitor="score"), ReduceLROnPlateau(monitor="score")):
        with pytest.raises(ValueError, match="mode="):
            learner(metrics=[scripted_fn("score", [0.5] * 3)]).fit(1, cbs=[cb])


def test_a_metric_object_declaring_lower_is_better_is_minimised():
    values = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8]
    for name in ("score", "agreement_acc"):  # the declaration wins over the name, even over a score-like one
        es = EarlyStopping(name, patience=2)
        learn = learner(metrics=[Scripted(name, values, higher_is_better=False)])
        learn.fit(len(values), cbs=[es])
        assert es.mode == "min" and (es.best, es.best_epoch, es.stopped_epoch) == (2.0, 1, 3)


def test_a_metric_object_declaring_higher_is_better_is_maximised():
    values = [0.1, 0.5, 0.3, 0.2, 0.9]
    es = EarlyStopping("consensus", patience=2)
    learn = learner(metrics=[Scripted("consensus", values, higher_is_better=True)])
    learn.fit(len(values), cbs=[es])
    assert es.mode == "max" and es.best == 0.5 and es.stopped_epoch == 3


def test_torchmetrics_objects_declare_their_direction():
    from torchmetrics import MeanSquaredError
    from torchmetrics.classification import MulticlassAccuracy

    class Rising(MeanSquaredError):  # an mse object under an unhelpful name: its declaration decides
        name = "fit_quality"

    es = EarlyStopping("fit_quality", patience=100)
    acc = EarlyStopping("MulticlassAccuracy", patience=100)
    learner(metrics=[Rising(), MulticlassAccuracy(num_classes=3)]).fit(0, cbs=[es, acc])  # resolved in before_fit
    assert (es.mode, acc.mode) == ("min", "max")


def test_explicit_mode_is_kept():
    es = EarlyStopping("valid_loss", mode="max", patience=1)
    learn = learner(metrics=[Scripted("valid_acc", [0.5] * 3, higher_is_better=True)])
    learn.fit(1, cbs=[es])
    assert es.mode == "max"
    with pytest.raises(ValueError, match="'sideways'"):
        EarlyStopping(mode="sideways")
