"""Metrics: whole-set F1 and AUROC (ours and torchmetrics') against scikit-learn on a validation set of unequal
batches; metric functions as per-sample means; names; what a metric may return; data-parallel state."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

from looplab import AUROC, DataLoaders, F1Score, Learner
from looplab.metrics import binary_auroc, check_metrics, f1_from_confusion, metric_name

torch.set_num_threads(1)
SIZES = (7, 30, 13, 50)  # unequal batches: a per-batch mean is not the whole set's value


def scores_and_targets(n_classes, seed=0, n=sum(SIZES)):
    """Scores of a fixed 'model' (the identity below): noisy, so every metric is far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    scores = torch.randn(n, n_classes, generator=g) + 1.2 * F.one_hot(y, n_classes)
    return scores, y


def batches(x, y):
    out, start = [], 0
    for size in SIZES:
        out.append((x[start:start + size], y[start:start + size]))
        start += size
    return out


class Passthrough(nn.Module):
    """A 'model' whose predictions are its inputs (with a parameter, for the optimizer)."""
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x


def zero_loss(pred, target):
    return pred.float().sum() * 0


def validate(x, y, metrics):
    """Validation over the unequal batches, where the metrics see exactly `x` as predictions."""
    learn = Learner(Passthrough(), ([(x[:4], y[:4])], batches(x, y)), zero_loss, progress=False, metrics=metrics)
    return learn.validate(), learn


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_f1_is_the_whole_sets_f1(average):
    import torchmetrics
    x, y = scores_and_targets(4)
    ours = F1Score(average=average)
    theirs = torchmetrics.classification.MulticlassF1Score(num_classes=4, average=average)

    def per_batch_f1(pred, target):
        return f1_score(target, pred.argmax(1), average=average)
    result, _ = validate(x, y, [ours, theirs, per_batch_f1])
    expected = f1_score(y, x.argmax(1), average=average)
    assert result["F1Score"] == pytest.approx(expected, abs=1e-6)
    assert result["MulticlassF1Score"] == pytest.approx(expected, abs=1e-6)
    # a function is a per-sample mean of its batch values, which is not the F1 of the set
    weighted_mean = sum(len(t) * per_batch_f1(p, t) for p, t in batches(x, y)) / len(y)
    assert result["per_batch_f1"] == pytest.approx(weighted_mean, abs=1e-6)
    if average == "macro":  # (micro F1 is accuracy, a per-sample mean after all; weighted happens to be close)
        assert abs(weighted_mean - expected) > 0.02


def test_f1_binary_from_one_logit_or_probability_per_sample():
    x, y = scores_and_targets(2)
    logit = x[:, 1] - x[:, 0]
    expected = f1_score(y, (logit > 0).long())
    result, _ = validate(logit, y, [F1Score(average="binary")])
    assert result["F1Score"] == pytest.approx(expected, abs=1e-6)
    result, _ = validate(torch.sigmoid(logit).unsqueeze(1), y.float().unsqueeze(1), [F1Score(average="binary")])
    assert result["F1Score"] == pytest.approx(expected, abs=1e-6)


def test_f1_from_labels_and_absent_classes():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    labels = torch.tensor([0, 1, 1, 1, 0, 2, 0, 1])  # class 3 never occurs: left out of the macro mean
    for average in ("macro", "micro", "weighted"):
        metric = F1Score(num_classes=4, average=average)
        metric.update(labels[:3], y[:3])
        metric.update(labels[3:], y[3:])
        assert metric.compute().item() == pytest.approx(f1_score(y, labels, average=average), abs=1e-6)
    confusion = torch.zeros(4, 4, dtype=torch.int64)
    assert f1_from_confusion(confusion, "macro").item() == 0.0  # nothing seen: 0, not NaN
    with pytest.raises(ValueError, match="num_classes"):
        F1Score().update(labels, y)
    with pytest.raises(ValueError, match="average"):
        F1Score(average="samples")


def test_auroc_is_the_whole_sets_area():
    x, y = scores_and_targets(2)
    score = x[:, 1] - x[:, 0]
    result, _ = validate(score, y, [AUROC()])
    assert result["AUROC"] == pytest.approx(roc_auc_score(y, score), abs=1e-6)
    x, y = scores_and_targets(5, seed=1)
    result, _ = validate(x, y, [AUROC()])  # logits: softmax first, as sklearn wants probabilities
    assert result["AUROC"] == pytest.approx(roc_auc_score(y, x.softmax(1), multi_class="ovr"), abs=1e-6)


def test_binary_auroc_counts_ties_half():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    assert binary_auroc(scores, positive).item() == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert torch.isnan(binary_auroc(scores, torch.zeros(200, dtype=torch.bool)))


def test_metric_objects_are_reset_before_each_validation():
    x, y = scores_and_targets(3)
    _, learn = validate(x, y, [F1Score(), AUROC()])
    some = batches(x, y)[:2]  # then validate on part of the set: its values alone, nothing left from before
    xs, ys = torch.cat([p for p, _ in some]), torch.cat([t for _, t in some])
    result = learn.validate(some)
    assert result["F1Score"] == pytest.approx(f1_score(ys, xs.argmax(1), average="macro"), abs=1e-6)
    assert result["AUROC"] == pytest.approx(roc_auc_score(ys, xs.softmax(1), multi_class="ovr"), abs=1e-6)


def test_metric_names():
    def f(pred, target):
        return 0.0

    class Named:
        name = "mine"
        __name__ = "ignored"

    assert (metric_name(f), metric_name(Named()), metric_name(F1Score()), metric_name(F1Score(name="f1_micro")),
            metric_name(torch.nn.L1Loss())) == ("f", "mine", "F1Score", "f1_micro", "L1Loss")
    assert check_metrics(f) == [f]  # a lone metric needs no list
    lone = F1Score()
    assert check_metrics(lone) == [lone]
    g = eval("lambda pred, target: 1.0")
    g.__name__ = "f"
    with pytest.raises(ValueError, match="'f'"):
        check_metrics([f, g])
    with pytest.raises(ValueError, match="'F1Score'"):
        check_metrics([F1Score(), F1Score(average="micro")])
    check_metrics([F1Score(), F1Score(average="micro", name="f1_micro")])
    with pytest.raises(ValueError, match="'valid_loss'"):
        check_metrics([F1Score(name="valid_loss")])
    with pytest.raises(TypeError, match="metric"):
        check_metrics(["accuracy"])


def test_duplicate_metric_names_are_refused():
    def f(pred, target):
        return 0.0

    def g(pred, target):
        return 1.0
    g.__name__ = "f"
    x, y = scores_and_targets(3)
    with pytest.raises(ValueError, match="'f'"):  # at construction once the Learner checks; at the latest here
        validate(x, y, [f, g])


@pytest.mark.parametrize("value,ok", [(0.5, True), (1, True), (torch.tensor(0.5), True), (torch.tensor([[0.5]]), True),
                                      (None, False), ("0.5", False), (torch.tensor([0.5, 0.5]), False),
                                      (True, False)])
def test_what_a_metric_may_return(value, ok):
    def odd(pred, target):
        return value
    x, y = scores_and_targets(3)
    if ok:
        assert validate(x, y, [odd])[0]["odd"] == pytest.approx(float(value))
    else:
        with pytest.raises(ValueError, match=r"metric 'odd' must return a number or a one-element tensor, got"):
            validate(x, y, [odd])


def test_a_metric_objects_compute_is_checked_too():
    class Many:
        def reset(self):
            pass

        def update(self, pred, target):
            pass

        def compute(self):
            return torch.ones(3)
    x, y = scores_and_targets(3)
    with pytest.raises(ValueError, match=r"'Many'.*shape \(3,\)"):
        validate(x, y, [Many()])


def test_trains_with_metric_objects_in_the_history():
    x, y = scores_and_targets(3, n=96)
    dls = DataLoaders.from_tensors(x, y, valid_pct=0.25, bs=16, seed=0)
    torch.manual_seed(0)
    learn = Learner(nn.Linear(3, 3), dls, F.cross_entropy, lr=0.1, progress=False, metrics=[F1Score(), AUROC()])
    learn.fit(2)
    row = learn.recorder.history[-1]
    assert set(row) == {"epoch", "train_iter", "train_loss", "valid_loss", "F1Score", "AUROC", "time"}
    preds, targets = learn.get_preds()
    assert row["F1Score"] == pytest.approx(f1_score(targets, preds.argmax(1), average="macro"), abs=1e-6)
    assert row["AUROC"] == pytest.approx(roc_auc_score(targets, preds.softmax(1), multi_class="ovr"), abs=1e-6)


# ---- several processes: the state is combined in compute() -----------------------------------------------------
def _two_ranks(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x, y = scores_and_targets(4, seed=5)
        mine = slice(0, 70) if rank == 0 else slice(70, 100)
        f1, auroc = F1Score(average="weighted"), AUROC()
        for metric in (f1, auroc):
            metric.update(x[mine], y[mine])
        nothing = F1Score()  # this metric saw no batch on rank 1, and does not know the number of classes there
        if rank == 0:
            nothing.update(x[:40], y[:40])
        torch.save({"f1": f1.compute(), "auroc": auroc.compute(), "nothing": nothing.compute()},
                   Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_every_process_gets_the_value_of_the_union(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_ranks, args=(2, port, str(tmp_path)), nprocs=2)
    x, y = scores_and_targets(4, seed=5)
    expected = {"f1": f1_score(y[:100], x[:100].argmax(1), average="weighted"),
                "auroc": roc_auc_score(y[:100], x[:100].softmax(1), multi_class="ovr"),
                "nothing": f1_score(y[:40], x[:40].argmax(1), average="macro")}
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in expected.items():
            assert result[key].item() == pytest.approx(value, abs=1e-6), (rank, key)
