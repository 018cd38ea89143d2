"""fit(..., valid_every=K): validation after every K-th training batch of the fit (mid-epoch too) and at the end of a
fit that ran all its batches; one history row per validation; trackers, loggers and checkpoints act on each row;
exact resume in the middle. References: a hand-written loop over the same batches."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, CancelFit, Checkpoint, CSVLogger, DataLoaders, Learner, TensorBoard
from looplab.callbacks import EarlyStopping, ReduceLROnPlateau, SaveBest

N_BATCHES, BS = 10, 8  # a 10-batch epoch


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N_BATCHES * BS, 5, generator=g), torch.randint(0, 3, (N_BATCHES * BS,), generator=g)
    xv, yv = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    train = [(x[i:i + BS], y[i:i + BS]) for i in range(0, len(x), BS)]  # a list: the same order every epoch
    valid = [(xv[i:i + 12], yv[i:i + 12]) for i in range(0, 24, 12)]
    return train, valid


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def learner(cbs=(), lr=0.05, **kw):
    return Learner(model(), data(), F.cross_entropy, opt_func=torch.optim.SGD, lr=lr, cbs=cbs, progress=False, **kw)


def hand_run(steps, lr=0.05, at=()):
    """The reference: SGD over the same batches; the validation loss (per-sample mean over the set) and the mean
    training loss since the previous point, at every step count in `at`."""
    net, (train, valid) = model(), data()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    points, losses = {}, []
    for i in range(steps):
        xb, yb = train[i % N_BATCHES]
        loss = F.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if i + 1 in at:
            with torch.no_grad():
                total = sum(F.cross_entropy(net(xb), yb, reduction="sum").item() for xb, yb in valid)
            points[i + 1] = (total / 24, sum(losses) / len(losses))
            losses = []
    return net, points


def test_steps_100_valid_every_25_rows_match_an_independent_evaluation():
    learn = learner()
    learn.fit(steps=100, valid_every=25)
    history = learn.recorder.history
    assert [r["train_iter"] for r in history] == [25, 50, 75, 100]
    assert [r["epoch"] for r in history] == [2, 4, 7, 9]  # the epoch of the last training batch done
    net, points = hand_run(100, at=(25, 50, 75, 100))
    for row in history:
        valid_loss, train_loss = points[row["train_iter"]]
        assert row["valid_loss"] == pytest.approx(valid_loss, abs=1e-6)
        assert row["train_loss"] == pytest.approx(train_loss, abs=1e-6)  # the mean since the previous row
        assert row["time"] >= 0
    for p, q in zip(learn.model.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert learn.n_steps == 100 and learn.valid_every == 25


def test_valid_every_with_epochs_validates_mid_epoch_and_at_the_end():
    learn = learner()
    learn.fit(3, valid_every=7)
    assert [r["train_iter"] for r in learn.recorder.history] == [7, 14, 21, 28, 30]
    assert [r["epoch"] for r in learn.recorder.history] == [0, 1, 2, 2, 2]
    _, points = hand_run(30, at=(7, 14, 21, 28, 30))
    assert [r["valid_loss"] for r in learn.recorder.history] == pytest.approx([points[k][0] for k in points], abs=1e-6)


def test_rows_without_valid_every_are_per_epoch_and_gain_train_iter():
    learn = learner()
    learn.fit(steps=25)
    assert [(r["epoch"], r["train_iter"]) for r in learn.recorder.history] == [(0, 10), (1, 20), (2, 25)]


def test_no_end_of_fit_validation_when_the_last_batch_was_validated_or_the_fit_was_cancelled():
    learn = learner()
    learn.fit(steps=20, valid_every=10)  # 10 and 20 are epoch ends: validated once each
    assert [r["train_iter"] for r in learn.recorder.history] == [10, 20]

    class Stop(Callback):
        def after_batch(self):
            if self.learn.training and self.learn.train_iter + 1 == 13:
                raise CancelFit()

    learn = learner(cbs=[Stop()])
    learn.fit(steps=30, valid_every=5)
    assert [r["train_iter"] for r in learn.recorder.history] == [5, 10]  # stopped after 13: no validation after it


def test_event_order_and_training_state_around_a_mid_epoch_validation():
    seen = []

    class Spy(Callback):
        order = 1000

        def before_validate(self):
            seen.append(("before_validate", self.learn.train_iter, self.learn.training))

        def after_validate(self):
            seen.append(("after_validate", self.learn.train_iter))

        def after_train(self):
            seen.append(("after_train", self.learn.train_iter))

        def before_batch(self):
            if self.learn.training:
                seen.append(("train_batch", self.learn.train_iter, self.learn.iter, self.learn.model.training,
                             torch.is_grad_enabled()))

    learn = Learner(nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)), data(), F.cross_entropy,
                    cbs=[Spy()], progress=False)
    learn.fit(steps=12, valid_every=5)
    events = [e[0] for e in seen]
    # after batch 5 (mid-epoch); after batch 10 in the epoch's slot (after after_train); at the end (12)
    assert [e for e in seen if e[0] != "train_batch"] == [
        ("before_validate", 5, False), ("after_validate", 5),
        ("after_train", 10), ("before_validate", 10, False), ("after_validate", 10),
        ("after_train", 12), ("before_validate", 12, False), ("after_validate", 12)]
    after_mid = seen[events.index("after_validate") + 1]
    assert after_mid == ("train_batch", 5, 5, True, True)  # training state, model mode and grad mode are back


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "5"])
def test_valid_every_must_be_a_positive_int(bad):
    learn = learner()
    with pytest.raises(ValueError, match=rf"valid_every must be a positive int.*got {bad!r}"):
        learn.fit(steps=10, valid_every=bad)


def test_valid_every_needs_validation_data():
    train, _ = data()
    learn = Learner(model(), DataLoaders(train, None), F.cross_entropy, progress=False)
    with pytest.raises(ValueError, match="valid_every=5 needs validation data"):
        learn.fit(steps=10, valid_every=5)


def test_early_stopping_counts_validations():
    learn = learner(cbs=[EarlyStopping(patience=2)], lr=1e-12)  # too small to move float32 weights: no improvement
    learn.fit(steps=100, valid_every=7)
    assert [r["train_iter"] for r in learn.recorder.history] == [7, 14, 21]
    assert len(learn.recorder.losses) == 21
    stopper = learn.cbs[-1]
    assert (stopper.stopped_epoch, stopper.stopped_iter, stopper.best_iter) == (2, 21, 7)


def test_reduce_lr_on_plateau_acts_on_each_row():
    cb = ReduceLROnPlateau(patience=1, factor=10)
    learn = learner(cbs=[cb], lr=1e-12)  # too small to move float32 weights: the loss never improves
    learn.fit(steps=15, valid_every=5)
    lrs = learn.recorder.lrs
    # row 1 (after 5 batches) is the first best; row 2 (after 10) does not improve: the 11th batch has lr / 10
    assert lrs[9] == pytest.approx(1e-12) and lrs[10] == pytest.approx(1e-13) and lrs[14] == pytest.approx(1e-13)


def test_save_best_saves_the_weights_of_a_mid_epoch_best_row(tmp_path):
    values = iter([0.1, 0.5, 0.9])

    def scripted(pred, yb):  # best (lowest) at the first row, after 5 batches: mid-epoch
        return next(values)
    scripted.__name__ = "scripted_loss"

    learn = learner(cbs=[SaveBest(tmp_path / "best.pt", monitor="scripted_loss")], metrics=[scripted])
    learn.valid_loaders_batches = None
    learn.dls.valid = learn.dls.valid[:1]  # one batch: one metric call per validation
    learn.fit(steps=15, valid_every=5)
    net, _ = hand_run(5)
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    for (name, p), q in zip(saved.items(), net.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_tensorboard_and_csv_get_every_row_at_its_train_iter(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = learner(cbs=[TensorBoard(tmp_path / "tb", histograms=False), CSVLogger(tmp_path / "log.csv")])
    learn.fit(steps=100, valid_every=25)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("valid_loss")
    assert [e.step for e in events] == [25, 50, 75, 100]
    assert [e.value for e in events] == pytest.approx([r["valid_loss"] for r in learn.recorder.history])
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["train_iter"]) for r in rows] == [25, 50, 75, 100]


def test_tensorboard_writes_a_mid_epoch_row_before_the_epoch_ends(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    seen = {}

    class Reader(Callback):
        order = 1000

        def after_batch(self):
            if self.learn.training and self.learn.train_iter == 7:  # row at 5 written; the epoch is at batch 7
                acc = EventAccumulator(str(tmp_path))
                acc.Reload()
                seen["steps"] = [e.step for e in acc.Scalars("valid_loss")]

    learn = learner(cbs=[TensorBoard(tmp_path, histograms=False, flush_every=None), Reader()])
    learn.fit(1, valid_every=5)
    assert seen["steps"] == [5]


class Crash(Exception):
    pass


class CrashAt(Callback):
    order = 1000

    def __init__(self, step):
        self.step = step

    def after_batch(self):
        if self.learn.training and self.learn.train_iter + 1 == self.step:
            raise Crash()


def resumable(tmp_path, cbs=()):
    from looplab.data import TensorLoader
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(80, 5, generator=g), torch.randint(0, 3, (80,), generator=g)
    dls = DataLoaders(TensorLoader(x, y, bs=8, shuffle=True, seed=0), TensorLoader(x[:16], y[:16], bs=8))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(net, dls, F.cross_entropy, lr=0.01, cbs=list(cbs), progress=False)


@pytest.mark.parametrize("every_n_steps, crash_at", [(25, 37), (10, 47), (7, 44)])
def test_a_run_killed_between_validations_resumes_bit_identically(tmp_path, every_n_steps, crash_at):
    ref = resumable(tmp_path, [EarlyStopping(patience=50)])
    ref.fit(steps=60, valid_every=25)
    crashed = resumable(tmp_path, [Checkpoint(tmp_path / "ck", every_n_steps=every_n_steps, every_epoch=False),
                                   CrashAt(crash_at), EarlyStopping(patience=50)])
    with pytest.raises(Crash):
        crashed.fit(steps=60, valid_every=25)
    resumed = resumable(tmp_path, [Checkpoint(tmp_path / "ck", every_n_steps=every_n_steps, every_epoch=False),
                                   EarlyStopping(patience=50)])
    resumed.fit(steps=60, valid_every=25, resume_from=tmp_path / "ck")
    for p, q in zip(resumed.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in ref.recorder.history]
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed.recorder.history] == strip
    assert [r["train_iter"] for r in resumed.recorder.history] == [25, 50, 60]
    assert resumed.recorder.losses == ref.recorder.losses
    assert resumed.cbs[-1].state_dict() == ref.cbs[-1].state_dict()


def test_a_checkpoint_due_with_a_validation_holds_its_row_and_is_not_validated_again(tmp_path):
    crashed = resumable(tmp_path, [Checkpoint(tmp_path / "ck", every_n_steps=25, every_epoch=False, keep_last=None),
                                   CrashAt(26)])
    with pytest.raises(Crash):
        crashed.fit(steps=60, valid_every=25)
    state = torch.load(tmp_path / "ck" / "ckpt-00000025.pt", weights_only=True)
    rows = state["callbacks"]["Recorder_0"]["history"]
    assert [r["train_iter"] for r in rows] == [25]  # written after the validation after batch 25
    validations = []

    class Count(Callback):
        def before_validate(self):
            validations.append(self.learn.train_iter)

    resumed = resumable(tmp_path, [Count()])
    resumed.fit(steps=60, valid_every=25, resume_from=tmp_path / "ck" / "ckpt-00000025.pt")
    assert validations == [50, 60]
    assert [r["train_iter"] for r in resumed.recorder.history] == [25, 50, 60]


def test_a_checkpoint_at_an_epochs_last_batch_before_its_validation_is_the_epochs_end(tmp_path):
    # the batch that ends the epoch is validated in the epoch's slot: the checkpoint comes after the whole epoch
    crashed = resumable(tmp_path, [Checkpoint(tmp_path / "ck", every_n_steps=10, every_epoch=False, keep_last=None),
                                   CrashAt(12)])
    with pytest.raises(Crash):
        crashed.fit(steps=30, valid_every=10)
    names = sorted(p.name for p in (tmp_path / "ck").glob("ckpt-*.pt"))
    assert names == ["ckpt-00000010-epoch-0.pt"]
    ref = resumable(tmp_path)
    ref.fit(steps=30, valid_every=10)
    resumed = resumable(tmp_path)
    resumed.fit(steps=30, valid_every=10, resume_from=tmp_path / "ck")
    for p, q in zip(resumed.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
    assert [r["valid_loss"] for r in resumed.recorder.history] == [r["valid_loss"] for r in ref.recorder.history]


def test_lr_find_after_a_valid_every_fit_leaves_the_next_fit_alone():
    a, b = learner(), learner()
    a.fit(steps=12, valid_every=5)
    b.fit(steps=12, valid_every=5)
    a.lr_find(num_it=5)
    assert a.valid_every == 5
    a.fit(steps=7)
    b.fit(steps=7)
    assert [r["train_iter"] for r in a.recorder.history] == [r["train_iter"] for r in b.recorder.history] == [7]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_the_recorder_bounds_its_pending_accelerator_tensors():
    class OffCPU(torch.Tensor):  # stands in for a loss on an accelerator: the Recorder keeps it pending
        @property
        def is_cpu(self):
            return False

    pending = []

    class Watch(Callback):
        order = 1000

        def after_batch(self):
            losses = self.learn.recorder._losses
            pending.append(sum(isinstance(v, torch.Tensor) for v in losses))

    learn = Learner(model(), data(), lambda p, y: F.cross_entropy(p, y).as_subclass(OffCPU), cbs=[Watch()],
                    progress=False)
    learn.fit(steps=250)
    assert max(pending) <= learn.recorder.flush_every and max(pending) > 0
    assert all(isinstance(v, float) for v in learn.recorder.losses)
    assert not math.isnan(learn.recorder.history[-1]["train_loss"])


def test_a_sweep_pruner_acts_on_a_mid_epoch_row():
    import optuna
    from looplab.sweep import PruneTrial
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss > 0 is pruned
    trial = study.ask()
    prune = PruneTrial(trial, "valid_loss")
    learn = learner(cbs=[prune])
    learn.fit(steps=30, valid_every=5)
    assert prune.pruned and len(learn.recorder.losses) == 5  # stopped right after the validation after batch 5
    assert list(study.trials[0].intermediate_values) == [5]


def test_early_stopping_at_an_epochs_last_validation_keeps_the_checkpoint_due_there(tmp_path):
    learn = learner(cbs=[EarlyStopping(patience=2), Checkpoint(tmp_path, every_n_steps=10, every_epoch=False,
                                                                keep_last=None)], lr=1e-12)
    learn.fit(steps=100, valid_every=10)  # rows at 10, 20, 30 (epoch ends): no improvement after the first
    assert [r["train_iter"] for r in learn.recorder.history] == [10, 20, 30]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))[-1] == "ckpt-00000030-epoch-2.pt"
    state = torch.load(tmp_path / "ckpt-00000030-epoch-2.pt", weights_only=True)
    assert len(state["callbacks"]["Recorder_0"]["history"]) == 3  # it holds the stopping row


def test_epochs_cut_short_still_validate_at_the_end_of_the_fit():
    class ShortEpoch(Callback):  # fastai-style: train 6 batches of each 10-batch epoch
        def after_batch(self):
            if self.learn.training and self.learn.iter == 5:
                from looplab import CancelTrain
                raise CancelTrain()

    learn = learner(cbs=[ShortEpoch()])
    learn.fit(3, valid_every=4)
    assert learn.train_iter == len(learn.recorder.losses) == 18  # batches done, the cancelling ones too
    assert [r["train_iter"] for r in learn.recorder.history] == [4, 8, 12, 16, 18]
    assert learn.recorder.history[-1]["epoch"] == 2


def test_a_validate_or_get_preds_inside_a_fit_adds_no_row():
    class Peek(Callback):
        def after_epoch(self):
            self.learn.get_preds()
            self.learn.validate()

    stopper = EarlyStopping(patience=50)
    learn = learner(cbs=[Peek(), stopper])
    learn.fit(3, valid_every=7)
    assert [r["train_iter"] for r in learn.recorder.history] == [7, 14, 21, 28, 30]
    _, points = hand_run(30, at=(7, 14, 21, 28, 30))
    assert [r["train_loss"] for r in learn.recorder.history] == pytest.approx([p[1] for p in points.values()])
    assert stopper.n_rows == 5


def test_valid_every_takes_a_numpy_integer():
    import numpy as np
    learn = learner()
    learn.fit(steps=10, valid_every=np.int64(5))
    assert [r["train_iter"] for r in learn.recorder.history] == [5, 10]


def test_resuming_with_another_valid_every_warns(tmp_path):
    learn = learner(cbs=[Checkpoint(tmp_path, every_n_steps=5)])
    learn.fit(steps=10, valid_every=5)
    with pytest.warns(UserWarning, match="valid_every=5; this fit has valid_every=2"):
        learner().fit(steps=10, valid_every=2, resume_from=tmp_path)


@pytest.mark.parametrize("valid_every", [None, 5])
def test_resuming_from_the_last_step_of_a_fit_by_steps_trains_no_more(tmp_path, valid_every):
    ref = resumable(tmp_path, [Checkpoint(tmp_path, every_n_steps=15, every_epoch=False)])
    ref.fit(steps=15, valid_every=valid_every)  # epochs of 10 batches: it ends mid-epoch
    resumed = resumable(tmp_path)
    resumed.fit(steps=15, valid_every=valid_every, resume_from=tmp_path)
    assert resumed.train_iter == len(resumed.recorder.losses) == 15
    strip = [{k: v for k, v in r.items() if k != "time"} for r in ref.recorder.history]
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed.recorder.history] == strip
    for p, q in zip(resumed.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
