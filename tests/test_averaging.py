"""SWA, EMA and checkpoint averaging against independent references: torch.optim.swa_utils, hand-written training
loops, the EMA recurrence and plain means of state dicts."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn

from looplab import Callback, CancelStep, DataLoaders, Learner
from looplab.averaging import average_checkpoints, average_last
from looplab.callbacks import EMA, SWA

torch.set_num_threads(1)
LR = 0.05


def data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 0).long()


def dls():
    x, y = data()
    return DataLoaders.from_tensors(x, y, bs=32, seed=0)


def mlp(bn=False, dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), *([nn.BatchNorm1d(16)] if bn else []), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, 3))


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def learner(model, cbs=()):
    return Learner(model, dls(), F.cross_entropy, opt_func=sgd, lr=LR, cbs=cbs, progress=False)


def hand_loop(model, loaders, epochs, after_epoch=lambda epoch: None, after_step=lambda: None):
    """The plain training loop, written out: what a Learner with no callbacks does."""
    opt = sgd(model.parameters(), LR)
    for epoch in range(epochs):
        model.train()
        for xb, yb in loaders.train:
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            after_step()
            opt.zero_grad()
        after_epoch(epoch)
    return model


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- SWA -------------------------------------------------------------------------------------------------------
def test_swa_is_the_mean_of_epoch_end_weights():
    ends, plain = [], mlp()
    hand_loop(plain, dls(), 5, after_epoch=lambda e: ends.append(params(plain)) if e >= 2 else None)
    assert len(ends) == 3
    learn = learner(mlp())
    swa = SWA(start_epoch=2)
    learn.fit(5, cbs=[swa])
    assert swa.count == 3
    for p, *epoch_ends in zip(learn.model.parameters(), *ends):
        torch.testing.assert_close(p.detach(), torch.stack(epoch_ends).mean(0), atol=1e-6, rtol=0)
    # the state is plain data: the average (by parameter name) and the count
    state = swa.state_dict()
    assert state["count"] == 3 and set(state["average"]) == {n for n, _ in learn.model.named_parameters()}


def test_swa_with_batchnorm_matches_torch_swa_utils():
    # reference: torch's AveragedModel + update_bn around a hand-written loop (dropout too: RNG use must match)
    torch.manual_seed(7)
    plain, loaders = mlp(bn=True, dropout=0.2), dls()
    torch.manual_seed(7)
    swa_model = AveragedModel(plain)
    hand_loop(plain, loaders, 5, after_epoch=lambda e: swa_model.update_parameters(plain) if e >= 2 else None)
    rng_after_training = torch.get_rng_state()
    torch_update_bn(loaders.train, swa_model)  # iterates the loader's next epoch (5)

    learn = learner(mlp(bn=True, dropout=0.2))
    torch.manual_seed(7)
    learn.fit(5, cbs=[SWA(start_epoch=2)])
    assert learn.dls.train.epoch == 5  # the BN pass left the loader's position alone …
    assert torch.equal(torch.get_rng_state(), rng_after_training)  # … and the RNG (dropout in train mode)
    expected = swa_model.module.state_dict()
    for name, value in learn.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)


def test_swa_lr_anneals_by_cosine_from_start_epoch():
    learn = learner(mlp())
    learn.fit(5, cbs=[SWA(start_epoch=1, swa_lr=0.01, anneal_epochs=2)])
    n = len(learn.dls.train)
    expected = []
    for epoch in range(5):
        for i in range(n):
            t = min(max((epoch - 1 + i / n) / 2, 0), 1)
            expected.append(LR if epoch < 1 else 0.01 + (LR - 0.01) * (1 + math.cos(math.pi * t)) / 2)
    assert learn.recorder.lrs == pytest.approx(expected, abs=1e-12)
    learn.fit(2, cbs=[SWA(start_epoch=0)])  # swa_lr=None: the lr is left alone
    assert learn.recorder.lrs == [LR] * 2 * n


def test_swa_before_start_epoch_leaves_the_model():
    learn = learner(mlp())
    with pytest.warns(UserWarning, match="start_epoch"):
        learn.fit(2, cbs=[SWA(start_epoch=3)])
    plain = hand_loop(mlp(), dls(), 2)
    for p, q in zip(learn.model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ---- EMA -------------------------------------------------------------------------------------------------------
def ema_recurrence(start, steps, decay):
    ema = [p.clone() for p in start]
    for weights in steps:
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    return ema


def test_ema_follows_the_recurrence_over_every_step():
    steps = []
    plain = mlp(bn=True)
    start = params(plain)
    hand_loop(plain, dls(), 3, after_step=lambda: steps.append(params(plain)))
    learn = learner(mlp(bn=True))
    ema = EMA(decay=0.9)
    learn.fit(3, cbs=[ema])
    for e, r in zip(ema.ema_model.parameters(), ema_recurrence(start, steps, 0.9)):
        torch.testing.assert_close(e, r, atol=1e-6, rtol=0)
    for e, b in zip(ema.ema_model.buffers(), plain.buffers()):  # buffers are copied, not averaged
        torch.testing.assert_close(e, b, atol=1e-6, rtol=0)
    assert all(not p.requires_grad for p in ema.ema_model.parameters())


class StepsItselfOrSkips(Callback):
    """Even steps: step the optimizer itself, then CancelStep (as MixedPrecision does); odd steps: skip (CancelStep)."""
    order = 5

    def __init__(self):
        self.weights_after_real_steps = []

    def before_step(self):
        if self.learn.train_iter % 2 == 0:
            self.learn.opt.step()
            self.weights_after_real_steps.append(params(self.learn.model))
        raise CancelStep()


def test_ema_counts_steps_that_really_happened():
    learn = learner(mlp())
    start, stepper, ema = params(learn.model), StepsItselfOrSkips(), EMA(decay=0.8)
    learn.fit(2, cbs=[stepper, ema])
    assert len(stepper.weights_after_real_steps) == len(learn.dls.train)  # 2 epochs, half the steps
    for e, r in zip(ema.ema_model.parameters(), ema_recurrence(start, stepper.weights_after_real_steps, 0.8)):
        torch.testing.assert_close(e, r, atol=1e-6, rtol=0)


def test_validate_with_ema():
    learn = learner(mlp())
    learn.metrics = []
    ema = EMA(decay=0.9, validate_with_ema=True)
    learn.fit(2, cbs=[ema])
    trained = learn.model
    assert trained is not ema.ema_model  # swapped back after validation
    reference = learner(copy.deepcopy(ema.ema_model).requires_grad_(True)).validate()
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-6)
    assert learn.validate()["valid_loss"] != pytest.approx(reference["valid_loss"], abs=1e-6)  # fit cb is gone


def test_states_round_trip_weights_only(tmp_path):
    """Saved states load (weights_only) into fresh callbacks, which then hold exactly what was saved."""
    learn = learner(mlp(bn=True))
    swa, ema = SWA(start_epoch=1), EMA()
    learn.fit(3, cbs=[swa, ema])
    fresh_learn = learner(mlp(bn=True))
    fresh_swa, fresh_ema = SWA(start_epoch=1), EMA()
    fresh_learn.add_cbs([fresh_swa, fresh_ema])
    fresh_learn.fit(2)  # both have a (different) state of their own now
    for cb, fresh in ((swa, fresh_swa), (ema, fresh_ema)):
        torch.save(cb.state_dict(), tmp_path / "s.pt")
        state = torch.load(tmp_path / "s.pt", weights_only=True)
        before = copy.deepcopy(fresh.state_dict())
        fresh.load_state_dict(state)
        after, saved = fresh.state_dict(), cb.state_dict()
        tensors = [(k, v) for k, v in (saved["average"] or {}).items()] if cb is swa else list(saved["ema"].items())
        got = after["average"] if cb is swa else after["ema"]
        old = before["average"] if cb is swa else before["ema"]
        assert tensors and all(torch.equal(got[k], v) for k, v in tensors)
        assert any(not torch.equal(old[k], v) for k, v in tensors)  # a no-op load would have kept these
    assert fresh_swa.count == swa.count == 2 and fresh_swa.average is not None


def test_resume_mid_run_is_exact(tmp_path):
    """SWA's average and EMA's weights travel in checkpoints: a resumed run ends bit-identical."""
    from looplab.callbacks.checkpoint import Checkpoint

    def run(**fit_kwargs):
        learn = learner(mlp(bn=True))
        swa, ema = SWA(start_epoch=1, swa_lr=0.02, anneal_epochs=1), EMA(decay=0.9)
        learn.fit(3, cbs=[swa, ema, Checkpoint(tmp_path / "ck", every_n_steps=4, keep_last=None)], **fit_kwargs)
        return learn, ema

    full, full_ema = run()
    files = sorted((tmp_path / "ck").glob("ckpt-*.pt"))
    middle = [f for f in files if f.name.startswith("ckpt-00000008")][0]  # epoch 1, mid-way, SWA under way
    with pytest.warns(UserWarning, match="abandoned"):  # the newer files of the full run are set aside
        resumed, resumed_ema = run(resume_from=middle)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_ema.ema_model.state_dict().values(), resumed_ema.ema_model.state_dict().values()):
        assert torch.equal(a, b)


# ---- checkpoint averaging --------------------------------------------------------------------------------------
def saved_run(tmp_path, n=3):
    """A run saved after each epoch (learn.save), and the state dicts saved."""
    learn, states, paths = learner(mlp(bn=True)), [], []
    for epoch in range(n):
        learn.fit(1)
        paths.append(tmp_path / f"epoch_{epoch}.pt")
        learn.save(paths[-1])
        states.append({k: v.clone() for k, v in learn.model.state_dict().items()})
    return learn, states, paths


def test_average_checkpoints_is_the_mean(tmp_path):
    _, states, paths = saved_run(tmp_path)
    torch.save(states[1], tmp_path / "plain.pt")  # a plain state dict works too
    avg = average_checkpoints([paths[0], tmp_path / "plain.pt", paths[2]])
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, torch.stack([s[k] for s in states]).mean(0), atol=1e-6, rtol=0)
        else:
            assert torch.equal(v, states[-1][k])  # num_batches_tracked: the last file's


def test_average_checkpoints_refuses_mismatches(tmp_path):
    _, states, paths = saved_run(tmp_path, n=1)
    extra = dict(states[0], extra=torch.zeros(1))
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="extra.pt.*extra"):
        average_checkpoints([paths[0], tmp_path / "extra.pt"])
    wrong = dict(states[0], **{"0.weight": torch.zeros(16, 7)})
    torch.save(wrong, tmp_path / "wrong_shape.pt")
    with pytest.raises(ValueError, match=r"wrong_shape.pt.*0\.weight.*\(16, 7\)"):
        average_checkpoints([paths[0], tmp_path / "wrong_shape.pt"])
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt"):
        average_checkpoints([tmp_path / "junk.pt"])
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])


def test_average_last_of_a_checkpoint_folder(tmp_path):
    from looplab.callbacks.checkpoint import Checkpoint

    class EpochEnds(Callback):
        order = 80  # before Checkpoint (90) writes this epoch

        def __init__(self):
            self.states = []

        def after_epoch(self):
            self.states.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})

    learn, ends = learner(mlp()), EpochEnds()
    learn.fit(12, cbs=[ends, Checkpoint(tmp_path / "run", keep_last=3)])  # 12 epochs: names sort past 9 and 10
    model = mlp()
    avg = average_last(tmp_path / "run", 3, model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, torch.stack([s[k] for s in ends.states[-3:]]).mean(0), atol=1e-6, rtol=0)
        assert torch.equal(avg[k], v)
    with pytest.raises(ValueError, match="last 4 checkpoints"):
        average_last(tmp_path / "run", 4)


def test_ema_with_mixed_precision_skips_overflowed_steps():
    """With float16, GradScaler skips the steps whose gradients overflow: EMA counts only the steps it took."""
    from looplab.callbacks import MixedPrecision

    class WeightsAfterBatch(Callback):
        order = 200

        def __init__(self):
            self.weights = []

        def after_batch(self):
            if self.learn.training:
                self.weights.append(params(self.learn.model))

    learn, probe = learner(mlp()), WeightsAfterBatch()
    start, ema, mp = params(learn.model), EMA(decay=0.8), MixedPrecision(torch.float16, init_scale=2.0**24)
    learn.fit(2, cbs=[mp, ema, probe])
    assert 0 < mp.overflows < len(probe.weights)  # the first steps overflowed and were skipped
    previous, taken = start, []
    for w in probe.weights:  # a step happened iff the weights moved
        if any(not torch.equal(a, b) for a, b in zip(w, previous)):
            taken.append(w)
        previous = w
    assert len(taken) == len(probe.weights) - mp.overflows
    for e, r in zip(ema.ema_model.parameters(), ema_recurrence(start, taken, 0.8)):
        torch.testing.assert_close(e, r, atol=1e-6, rtol=0)
