"""Defects a fresh-eyes review found at the seams of issues 15, 16 and 11, each checked against a reference."""
import os
import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import (EMA, SWA, Callback, CancelBackward, CancelBatch, Checkpoint, EarlyStopping,
                     GradientAccumulation, Learner, MixedPrecision, MixUp, ParamScheduler, TensorBoard)


def batches(n=4, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 4, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def run(cbs, fp16, data=None):
    model = linear()
    learn = Learner(model, (data or batches(), None), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1,
                    progress=False, cbs=cbs + ([MixedPrecision(torch.float16)] if fp16 else []))
    learn.fit(1)
    return [p.detach().clone() for p in model.parameters()]


class At(Callback):
    """Raises `exc` in `event` at training step `at`."""

    def __init__(self, event, exc, at, order):
        self.exc, self.at, self.order = exc, at, order
        setattr(self, event, self._raise)

    def _raise(self):
        if self.learn.training and self.learn.train_iter == self.at:
            raise self.exc


@pytest.mark.parametrize("cbs", [
    lambda: [GradientAccumulation(2), At("before_backward", CancelBackward, 0, -1000)],
    lambda: [At("before_step", CancelBatch, 1, 0)],  # gradients kept after MixedPrecision unscaled them
    lambda: [At("after_backward", CancelBatch, 1, 1000)],
], ids=["accumulate+cancel_backward", "cancel_batch_in_before_step", "cancel_batch_after_unscale"])
def test_float16_follows_float32_through_cancels(cbs):
    """float16 with the loss scale must give the float32 result (to fp16 rounding), cancels or not."""
    ref, got = run(cbs(), fp16=False), run(cbs(), fp16=True)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_swa_updates_batch_norm_over_dict_batches():
    from torch.optim.swa_utils import update_bn as torch_update_bn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x, labels=None):
            return self.out(self.bn(self.lin(x)))

    pairs = batches()
    dicts = [{"x": x, "labels": y} for x, y in pairs]
    model = Net()
    learn = Learner(model, (dicts, None), lambda out, y: F.cross_entropy(out, y), lr=0.01, progress=False,
                    cbs=[SWA(start_epoch=0)])
    learn.fit(2)
    reference = Net()
    reference.load_state_dict(model.state_dict())
    torch_update_bn([x for x, _ in pairs], reference)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)


def test_tensorboard_keeps_counting_after_a_fit_that_failed_in_before_fit(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = TensorBoard(tmp_path, histograms=False)
    learn = Learner(linear(), (batches(), batches(2)), F.cross_entropy, progress=False, cbs=[tb])
    learn.fit(1)
    with pytest.raises(ValueError, match="mode="):
        learn.fit(1, cbs=[EarlyStopping(monitor="my_custom_thing")])
    learn.fit(1)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == list(range(8))


def test_a_zero_weight_decay_group_stays_zero_after_a_schedule_that_reached_zero():
    model = linear()
    opt_func = partial(torch.optim.AdamW, [{"params": [model.weight], "weight_decay": 0.1},
                                           {"params": [model.bias], "weight_decay": 0.0}])
    learn = Learner(model, (batches(), None), F.cross_entropy, opt_func=lambda groups, lr: opt_func(lr=lr),
                    progress=False)
    seen = []

    class Probe(Callback):
        order = 20

        def before_step(self):
            seen.append([g["weight_decay"] for g in self.learn.opt.param_groups])

    for _ in range(2):
        learn.fit(1, cbs=[ParamScheduler({"wd": lambda pos: 0.1 * (1 - pos) if pos < 0.7 else 0.0}), Probe()])
    assert all(wds[1] == 0.0 for wds in seen)
    assert [g["weight_decay"] for g in learn.opt.param_groups] == [0.1, 0.0]  # put back after each fit


def test_validation_on_the_ema_after_a_validate_that_raised():
    def metric(pred, y):
        if fail:
            raise RuntimeError("metric failed")
        return (pred.argmax(-1) == y).float().mean()

    fail = False
    ema = EMA(decay=0.5, validate_with_ema=True)
    learn = Learner(linear(), (batches(), batches(2, seed=5)), F.cross_entropy, progress=False, cbs=[ema],
                    metrics=[metric], lr=0.1)
    learn.fit(2)
    expected = learn.validate()["valid_loss"]
    fail = True
    with pytest.raises(RuntimeError):
        learn.validate()
    fail = False
    assert learn.validate()["valid_loss"] == expected and learn.model is not ema.ema_model


def test_get_preds_pads_dynamically_padded_batches_and_stacks_scalars():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, ids, labels=None):
            logits = self.emb(ids)
            return logits, logits.mean()

    g = torch.Generator().manual_seed(0)
    dl = [{"ids": torch.randint(0, 10, (2, n), generator=g), "labels": torch.randint(0, 3, (2, n), generator=g)}
          for n in (3, 5)]
    learn = Learner(Seq(), (dl, dl), lambda out, y: F.cross_entropy(out[0].flatten(0, 1), y.flatten()),
                    progress=False)
    (logits, scalars), labels = learn.get_preds()
    assert logits.shape == (4, 5, 3) and labels.shape == (4, 5) and scalars.shape == (2,)
    assert (labels[:2, 3:] == -100).all() and (logits[:2, 3:] == -100).all()
    assert torch.equal(labels[2:], dl[1]["labels"])


@pytest.mark.parametrize("name", ["neg_mean_squared_error", "neg_log_loss", "accuracy_drop", "loss_reduction"])
def test_mode_auto_refuses_names_that_may_turn_the_direction_around(name):
    learn = Learner(linear(), (batches(), batches(2)), F.cross_entropy, progress=False)
    with pytest.raises(ValueError, match="mode="):
        learn.fit(1, cbs=[EarlyStopping(monitor=name)])


def test_the_same_callback_twice_is_refused_and_stays_attached_once():
    cb = EMA()
    learn = Learner(linear(), (batches(), None), F.cross_entropy, progress=False, cbs=[cb])
    with pytest.raises(ValueError, match="attached already"):
        learn.fit(1, cbs=[cb])
    assert sum(c is cb for c in learn.cbs) == 1


def test_lr_find_puts_back_non_persistent_buffers():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros(()), persistent=False)

        def forward(self, x):
            self.calls += 1
            return self.lin(x) * (1 + 0 * self.calls)

    def final(find):
        model = Counting()
        learn = Learner(model, (batches(), None), F.cross_entropy, progress=False)
        if find:
            learn.lr_find(num_it=3)
        learn.fit(1)
        return model.calls.item()

    assert final(True) == final(False) == 4


def test_checkpoint_leaves_a_users_old_tmp_file_alone(tmp_path):
    notes = tmp_path / "notes.tmp"
    notes.write_text("mine")
    old = time.time() - 3 * 24 * 3600
    os.utime(notes, (old, old))
    Learner(linear(), (batches(), None), F.cross_entropy, progress=False).fit(1, cbs=[Checkpoint(tmp_path)])
    assert notes.read_text() == "mine"


def test_mixup_keeps_a_batch_encoding_a_batch_encoding():
    BatchEncoding = pytest.importorskip("transformers").BatchEncoding
    seen = []

    class Look(Callback):
        order = 100

        def before_batch(self):
            seen.append(type(self.learn.xb).__name__)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, pixel_values, labels=None):
            return self.lin(pixel_values)

    dl = [BatchEncoding({"pixel_values": x, "labels": y}) for x, y in batches()]
    Learner(Net(), (dl, None), F.cross_entropy, progress=False, cbs=[MixUp(key="pixel_values"), Look()]).fit(1)
    assert seen and set(seen) == {"BatchEncoding"}
