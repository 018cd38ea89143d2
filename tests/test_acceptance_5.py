"""Acceptance tests for issue 5 (MixUp, CutMix, SWA, EMA, checkpoint averaging) and the training-control
callbacks of issue 6 (EarlyStopping, SaveBest, ReduceLROnPlateau, TerminateOnNaN), written from the issues'
contracts as a black-box user. References are independent: plain runs recording their weights, the papers'
formulas, torch.optim.swa_utils.update_bn, hand-written loops."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import (EMA, SWA, Callback, CutMix, DataLoaders, EarlyStopping, Learner, MixUp, ReduceLROnPlateau,
                     SaveBest, TerminateOnNaN)
from looplab.averaging import average_checkpoints, average_last


def data(n=64, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def mlp(seed=0, bn=False, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), *([nn.BatchNorm1d(16)] if bn else []), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, 3))


def learner(model, cbs=(), bs=16, n=64, lr=1e-2, shuffle=False, metrics=(), loss_func=F.cross_entropy, **kw):
    x, y = data(n)
    xv, yv = data(16, seed=2)
    dls = DataLoaders.from_tensors(x, y, valid=(xv, yv), bs=bs, shuffle=shuffle)
    return Learner(model, dls, loss_func, lr=lr, cbs=list(cbs), metrics=list(metrics), progress=False, **kw)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class EpochEndWeights(Callback):
    order = 99

    def before_fit(self):
        self.weights = []

    def after_epoch(self):
        self.weights.append(params(self.learn.model))


class StepWeights(Callback):
    order = 99

    def before_fit(self):
        self.initial = params(self.learn.model)
        self.steps = []

    def after_step(self):
        self.steps.append(params(self.learn.model))


# ---------------------------------------------------------------------------------------------------------------
# SWA
# ---------------------------------------------------------------------------------------------------------------
def test_swa_is_mean_of_epoch_end_weights_2_3_4():
    rec = EpochEndWeights()
    plain = learner(mlp(dropout=0.1), cbs=[rec], shuffle=True)
    plain.fit(5)
    swa = SWA(start_epoch=2)
    learn = learner(mlp(dropout=0.1), cbs=[swa], shuffle=True)
    learn.fit(5)
    got = params(learn.model)
    for k in got:
        want = torch.stack([rec.weights[e][k] for e in (2, 3, 4)]).mean(0)
        assert torch.allclose(got[k], want, atol=1e-6, rtol=0), k
    # and not simply the last weights
    assert not torch.allclose(got["0.weight"], rec.weights[4]["0.weight"], atol=1e-4)


def test_swa_batchnorm_stats_equal_update_bn():
    rec = EpochEndWeights()
    plain = learner(mlp(bn=True), cbs=[rec])
    plain.fit(4)
    learn = learner(mlp(bn=True), cbs=[SWA(start_epoch=1)])
    learn.fit(4)
    got = params(learn.model)
    for k in got:
        want = torch.stack([rec.weights[e][k] for e in (1, 2, 3)]).mean(0)
        assert torch.allclose(got[k], want, atol=1e-6, rtol=0), k
    # reference: torch's own update_bn on the final (averaged) weights, over the training data
    ref = copy.deepcopy(learn.model)
    x, y = data(64)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    torch.optim.swa_utils.update_bn(loader, ref)
    bn, ref_bn = learn.model[1], ref[1]
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-6)
    # the stats are not those left by training
    assert not torch.allclose(bn.running_mean, plain.model[1].running_mean, atol=1e-4)


def test_swa_lr_constant_from_start_epoch():
    swa_lr = 1e-3
    learn = learner(mlp(), cbs=[SWA(start_epoch=2, swa_lr=swa_lr)], lr=1e-2)
    learn.fit(4)
    lrs = learn.recorder.lrs
    assert len(lrs) == 16
    assert lrs[:8] == pytest.approx([1e-2] * 8)
    assert lrs[8:] == pytest.approx([swa_lr] * 8)


def test_swa_lr_cosine_anneal():
    swa_lr = 1e-3
    learn = learner(mlp(), cbs=[SWA(start_epoch=1, swa_lr=swa_lr, anneal_epochs=2)], lr=1e-2)
    learn.fit(5)
    lrs = learn.recorder.lrs
    assert lrs[:4] == pytest.approx([1e-2] * 4)
    ann = lrs[4:12]
    assert all(a >= b for a, b in zip(ann, ann[1:])) and ann[0] > ann[-1]
    assert swa_lr < ann[-1] < ann[0] <= 1e-2
    # halfway through the anneal, cosine gives the midpoint
    assert ann[4] == pytest.approx((1e-2 + swa_lr) / 2, rel=1e-6)
    assert lrs[12:] == pytest.approx([swa_lr] * 8)


def test_swa_lr_none_leaves_schedule_alone():
    a = learner(mlp())
    a.fit_one_cycle(3, 1e-2)
    b = learner(mlp(), cbs=[SWA(start_epoch=1)])
    b.fit_one_cycle(3, 1e-2)
    assert a.recorder.lrs == b.recorder.lrs


def test_swa_state_dict(tmp_path):
    swa = SWA(start_epoch=2)
    learn = learner(mlp(), cbs=[swa])
    learn.fit(5)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    state = torch.load(tmp_path / "swa.pt", weights_only=True)
    flat = str(state)
    assert "3" in flat  # the count of averaged epochs is in there
    for attach in (False, True):
        swa2 = SWA(start_epoch=2)
        if attach:
            learner(mlp(), cbs=[swa2])
        swa2.load_state_dict(state)
        again = swa2.state_dict()
        assert again.keys() == state.keys() and again["count"] == state["count"] == 3
        assert again["average"].keys() == state["average"].keys()
        assert all(torch.equal(again["average"][k], v) for k, v in state["average"].items())


# ---------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_equals_recurrence_from_plain_run(decay):
    rec = StepWeights()
    plain = learner(mlp(dropout=0.1), cbs=[rec], shuffle=True)
    plain.fit(3)
    ema = EMA(decay=decay)
    learn = learner(mlp(dropout=0.1), cbs=[ema], shuffle=True)
    learn.fit(3)
    ref = dict(rec.initial)
    for w in rec.steps:
        ref = {k: decay * ref[k] + (1 - decay) * w[k] for k in ref}
    got = params(ema.ema_model)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=0), k
    # the trained model is the plain run's
    for k, v in params(learn.model).items():
        assert torch.allclose(v, rec.steps[-1][k], atol=1e-6, rtol=0)


def test_ema_buffers_copied_and_validate_with_ema(tmp_path):
    ema = EMA(decay=0.8, validate_with_ema=True)
    learn = learner(mlp(bn=True), cbs=[ema], metrics=[lambda p, t: (p.argmax(1) == t).float().mean()])
    learn.fit(2)
    for (k, b), (_, eb) in zip(learn.model.named_buffers(), ema.ema_model.named_buffers()):
        assert torch.equal(b, eb), k
    # validation used the EMA model
    xv, yv = data(16, seed=2)
    em = copy.deepcopy(ema.ema_model).eval()
    tm = copy.deepcopy(learn.model).eval()
    with torch.no_grad():
        ema_loss = F.cross_entropy(em(xv), yv).item()
        trained_loss = F.cross_entropy(tm(xv), yv).item()
    assert abs(ema_loss - trained_loss) > 1e-4
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(ema_loss, abs=1e-6)
    assert learn.model is not ema.ema_model  # the trained model is back after validation
    # state dict: weights_only loadable, restores the average
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    ema2 = EMA(decay=0.8)
    ema2.load_state_dict(state)
    learn2 = learner(mlp(bn=True), cbs=[ema2])
    learn2.fit(0)
    for k, v in params(ema.ema_model).items():
        assert torch.equal(params(ema2.ema_model)[k], v)


def test_ema_validate_without_ema_uses_trained_model():
    ema = EMA(decay=0.8)
    learn = learner(mlp(), cbs=[ema])
    learn.fit(2)
    xv, yv = data(16, seed=2)
    with torch.no_grad():
        trained_loss = F.cross_entropy(learn.model.eval()(xv), yv).item()
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(trained_loss, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint averaging
# ---------------------------------------------------------------------------------------------------------------
def saved_run(tmp_path, n=3):
    learn = learner(mlp(bn=True))
    paths, states = [], []
    for e in range(n):
        learn.fit(1)
        p = tmp_path / f"epoch_{e}.pth"
        learn.save(p)
        paths.append(p)
        states.append(copy.deepcopy(learn.model.state_dict()))
    return learn, paths, states


def test_average_checkpoints_of_learn_save_files(tmp_path):
    _, paths, states = saved_run(tmp_path)
    avg = average_checkpoints(paths)
    assert set(avg) == set(states[0])
    for k, v in avg.items():
        if torch.is_floating_point(v):
            want = torch.stack([s[k] for s in states]).mean(0)
            assert torch.allclose(v, want, atol=1e-6, rtol=0), k


def test_average_checkpoints_of_plain_state_dicts(tmp_path):
    states = [mlp(seed=s).state_dict() for s in range(3)]
    paths = []
    for i, s in enumerate(states):
        torch.save(s, tmp_path / f"sd{i}.pt")
        paths.append(str(tmp_path / f"sd{i}.pt"))
    avg = average_checkpoints(paths)
    for k in states[0]:
        assert torch.allclose(avg[k], (states[0][k] + states[1][k] + states[2][k]) / 3, atol=1e-6, rtol=0)
    model = mlp(seed=9)
    model.load_state_dict(avg)


def test_average_checkpoints_of_in_memory_state_dicts():
    states = [mlp(seed=s).state_dict() for s in range(2)]
    avg = average_checkpoints(states)
    for k in states[0]:
        assert torch.allclose(avg[k], (states[0][k] + states[1][k]) / 2, atol=1e-6, rtol=0)


def test_average_checkpoints_refuses_mismatch_naming_file(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "good.pt")
    torch.save(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 3)).state_dict(),
               tmp_path / "other_shape.pt")
    torch.save(nn.Sequential(nn.Linear(8, 16)).state_dict(), tmp_path / "other_keys.pt")
    with pytest.raises(ValueError, match="other_shape"):
        average_checkpoints([tmp_path / "good.pt", tmp_path / "other_shape.pt"])
    with pytest.raises(ValueError, match="other_keys"):
        average_checkpoints([tmp_path / "good.pt", tmp_path / "other_keys.pt"])


def test_average_checkpoints_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        average_checkpoints([tmp_path / "evil.pt"])


def test_average_last_n_into_model(tmp_path):
    _, paths, states = saved_run(tmp_path, n=4)
    model = mlp(bn=True, seed=7)
    average_last(paths, 2, model)
    for k, v in model.state_dict().items():
        if torch.is_floating_point(v):
            assert torch.allclose(v, (states[2][k] + states[3][k]) / 2, atol=1e-6, rtol=0), k


# ---------------------------------------------------------------------------------------------------------------
# MixUp / CutMix
# ---------------------------------------------------------------------------------------------------------------
class Capture(Callback):
    """Order 0: sees the batch before MixUp (40); the model's pre-hook sees what the model gets."""

    def before_fit(self):
        self.raw, self.fed, self.preds, self.ys = [], [], [], []
        self.hook = self.learn.model.register_forward_pre_hook(
            lambda m, args: self.fed.append(args[0].detach().clone()) if self.learn.training else None)

    def before_batch(self):
        if self.learn.training:
            self.raw.append(self.learn.xb.clone())
            self.ys.append(self.learn.yb.clone())

    def after_pred(self):
        if self.learn.training:
            self.preds.append(self.learn.pred.detach().clone())

    def after_fit(self):
        self.hook.remove()


def smoothed_ce(pred, y):
    return F.cross_entropy(pred, y, label_smoothing=0.2)


@pytest.mark.parametrize("loss_func", [F.cross_entropy, nn.CrossEntropyLoss(), smoothed_ce])
def test_mixup_inputs_and_loss_are_the_convex_combination(loss_func):
    n = 8
    x = torch.eye(n).repeat(4, 1)  # sample i of each batch is the unit vector e_i
    y = torch.arange(32) % 3
    dls = DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=n, shuffle=False)
    torch.manual_seed(0)
    cap = Capture()
    learn = Learner(nn.Linear(n, 3), dls, loss_func, lr=0.1, cbs=[MixUp(0.4), cap], progress=False)
    learn.fit(1)
    lams = []
    for raw, fed, pred, yb, loss in zip(cap.raw, cap.fed, cap.preds, cap.ys, learn.recorder.losses):
        assert torch.equal(raw, torch.eye(n))
        off = fed - torch.diag(torch.diagonal(fed))
        perm = torch.where(off.abs().amax(1) > 1e-6, off.abs().argmax(1), torch.arange(n))
        assert sorted(perm.tolist()) == list(range(n))  # a shuffled copy of the batch
        movers = perm != torch.arange(n)
        lam = float(fed[movers][0][movers.nonzero()[0]]) if movers.any() else 1.0
        want = lam * torch.eye(n) + (1 - lam) * torch.eye(n)[perm]
        assert torch.allclose(fed, want, atol=1e-6)
        want_loss = lam * loss_func(pred, yb) + (1 - lam) * loss_func(pred, yb[perm])
        assert loss == pytest.approx(float(want_loss), abs=1e-5)
        lams.append(lam)
    assert len(set(lams)) > 1 and all(0 <= v <= 1 for v in lams)


def test_mixup_any_loss_func_regression():
    x, _ = data(64)
    y = x[:, :1] * 2 - 1
    dls = DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=16, shuffle=False)
    cap = Capture()
    torch.manual_seed(0)
    learn = Learner(nn.Linear(8, 1), dls, F.mse_loss, lr=0.1, cbs=[MixUp(), cap], progress=False)
    learn.fit(1)
    for raw, fed, pred, yb, loss in zip(cap.raw, cap.fed, cap.preds, cap.ys, learn.recorder.losses):
        # recover (λ, perm) by matching each mixed row against λ·x_i + (1-λ)·x_j
        i = 0
        diffs = fed[i] - raw[i]  # = (1-λ)(x_j - x_i)
        found = False
        for j in range(len(raw)):
            d = raw[j] - raw[i]
            if j == i or d.norm() == 0:
                continue
            c = float((diffs @ d) / (d @ d))
            if torch.allclose(diffs, c * d, atol=1e-5):
                lam = 1 - c
                found = True
                break
        if not found:
            continue
        perm = []
        for r in range(len(raw)):
            cands = [j for j in range(len(raw)) if torch.allclose(fed[r], lam * raw[r] + (1 - lam) * raw[j], atol=1e-5)]
            assert cands, r
            perm.append(cands[0])
        want = lam * F.mse_loss(pred, yb) + (1 - lam) * F.mse_loss(pred, yb[perm])
        assert loss == pytest.approx(float(want), abs=1e-5)


def test_cutmix_pastes_a_box_and_lambda_is_the_area():
    n, h, w = 8, 6, 6
    x = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 1, h, w).repeat(3, 1, 1, 1)
    y = torch.arange(3 * n) % 3
    dls = DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=n, shuffle=False)
    torch.manual_seed(1)
    cap = Capture()
    model = nn.Sequential(nn.Flatten(), nn.Linear(h * w, 3))
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[CutMix(1.0), cap], progress=False)
    learn.fit(2)
    lams = []
    for raw, fed, pred, yb, loss in zip(cap.raw, cap.fed, cap.preds, cap.ys, learn.recorder.losses):
        own = fed == raw
        pasted = ~own  # where another image's value shows
        perm = []
        for i in range(n):
            vals = fed[i][pasted[i]].unique()
            assert len(vals) <= 1
            perm.append(int(vals[0]) - 1 if len(vals) else i)
        movers = [i for i in range(n) if perm[i] != i]
        if movers:
            box = pasted[movers[0], 0]
            rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
            if len(rows):  # a rectangle
                assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
                assert int(box.sum()) == len(rows) * len(cols)
            for i in movers:
                assert torch.equal(pasted[i, 0], box)  # the same box in every image
            lam = 1 - float(box.float().mean())
        else:
            lam = 1.0
        want = lam * F.cross_entropy(pred, yb) + (1 - lam) * F.cross_entropy(pred, yb[perm])
        assert loss == pytest.approx(float(want), abs=1e-5)
        lams.append(lam)
    assert any(0 < v < 1 for v in lams)


@pytest.mark.parametrize("make", [lambda: MixUp(0.4), lambda: CutMix(1.0)])
def test_mix_validation_untouched_and_reproducible(make):
    def run(seed):
        x, y = data(64)
        x4 = x.view(64, 2, 2, 2)
        xv, yv = data(16, seed=2)
        dls = DataLoaders.from_tensors(x4, y, valid=(xv.view(16, 2, 2, 2), yv), bs=16, shuffle=True)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        acc = lambda p, t: (p.argmax(1) == t).float().mean()  # noqa: E731
        learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[make()], metrics=[acc], progress=False)
        learn.fit(2)
        return learn

    a, b, c = run(0), run(0), run(0)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert a.recorder.losses == c.recorder.losses
    # validation: plain loss of the final model
    xv, yv = data(16, seed=2)
    with torch.no_grad():
        pred = a.model.eval()(xv.view(16, 2, 2, 2))
    assert a.recorder.history[-1]["valid_loss"] == pytest.approx(F.cross_entropy(pred, yv).item(), abs=1e-6)
    assert list(a.recorder.history[-1].values())[-2] == pytest.approx(
        (pred.argmax(1) == yv).float().mean().item(), abs=1e-6)
    assert a.validate()["valid_loss"] == pytest.approx(F.cross_entropy(pred, yv).item(), abs=1e-6)


def test_mixup_cutmix_train_on_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, va = perm[:1400], perm[1400:]
    for cb in (MixUp(0.4), CutMix(1.0)):
        dls = DataLoaders.from_tensors(x[tr], y[tr], valid=(x[va], y[va]), bs=64, shuffle=True)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        acc = lambda p, t: (p.argmax(1) == t).float().mean()  # noqa: E731
        learn = Learner(model, dls, F.cross_entropy, lr=1e-2, cbs=[cb], metrics=[acc], progress=False)
        learn.fit(6)
        assert list(learn.recorder.history[-1].values())[-2] > 0.85, (cb, learn.recorder.history[-1])


# ---------------------------------------------------------------------------------------------------------------
# Training control (issue 6)
# ---------------------------------------------------------------------------------------------------------------
def scripted(name, values):
    """A metric whose value at epoch e is values[e] (validation is one batch)."""
    it = iter(values)

    def metric(pred, y):
        return torch.tensor(float(next(it)))
    metric.__name__ = name
    return metric


class LrPerEpoch(Callback):
    order = 99

    def before_fit(self):
        self.lrs = []

    def before_epoch(self):
        self.lrs.append(self.learn.opt.param_groups[0]["lr"])


@pytest.mark.parametrize("mode,name,values,patience,min_delta,n_run", [
    ("max", "score", [0.5, 0.6, 0.6, 0.59, 0.6, 0.9, 0.9, 0.9], 3, 0.0, 5),
    ("auto", "accuracy", [0.5, 0.6, 0.6, 0.59, 0.6, 0.9, 0.9, 0.9], 3, 0.0, 5),
    ("min", "score", [3.0, 2.0, 2.5, 1.9, 2.0, 2.0, 2.0, 2.0], 2, 0.0, 6),
    ("auto", "my_loss", [3.0, 2.0, 2.5, 1.9, 2.0, 2.0, 2.0, 2.0], 2, 0.0, 6),
    ("max", "score", [0.5, 0.505, 0.509, 0.515, 0.6, 0.7, 0.7, 0.7], 2, 0.01, 3),
    ("min", "score", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], 1, 0.0, 8),
])
def test_early_stopping(mode, name, values, patience, min_delta, n_run):
    es = EarlyStopping(monitor=name, mode=mode, patience=patience, min_delta=min_delta)
    learn = learner(mlp(), n=32, bs=32, metrics=[scripted(name, values)], cbs=[es])
    learn.fit(8)
    assert len(learn.recorder.history) == n_run


def test_early_stopping_on_valid_loss_default():
    es = EarlyStopping(patience=2, min_delta=1e-3)
    learn = learner(mlp(), lr=1e-9, cbs=[es])  # nothing improves by 1e-3
    learn.fit(10)
    assert len(learn.recorder.history) == 3
    with pytest.raises(ValueError):
        EarlyStopping(mode="sideways")


def test_save_best_atomic_and_loadable(tmp_path):
    path = tmp_path / "best.pth"

    class Snap(Callback):
        order = 99

        def before_fit(self):
            self.w = []

        def after_epoch(self):
            self.w.append(copy.deepcopy(self.learn.model.state_dict()))

    snap = Snap()
    sb = SaveBest(path, monitor="accuracy")  # auto: max
    learn = learner(mlp(), n=32, bs=32, lr=0.1, metrics=[scripted("accuracy", [0.1, 0.5, 0.3, 0.7, 0.2])],
                    cbs=[sb, snap])
    learn.fit(5)
    assert path.exists()
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary left over
    torch.load(path, weights_only=True)
    learn2 = learner(mlp(seed=5), n=32, bs=32)
    learn2.load(path)
    for k, v in learn2.model.state_dict().items():
        assert torch.equal(v, snap.w[3][k]), k  # epoch 3: the best accuracy
    assert not torch.equal(learn.model.state_dict()["0.weight"], snap.w[3]["0.weight"])


def test_save_best_valid_loss_min(tmp_path):
    path = tmp_path / "sub" / "best.pth"
    rec = EpochEndWeights()
    learn = learner(mlp(), lr=0.05, cbs=[SaveBest(path), rec])
    learn.fit(3)
    learn2 = learner(mlp(seed=5))
    learn2.load(path)
    best = min(range(3), key=lambda e: learn.recorder.history[e]["valid_loss"])
    for k, v in params(learn2.model).items():
        assert torch.equal(v, rec.weights[best][k]), k


def test_reduce_lr_on_plateau():
    lrs = LrPerEpoch()
    values = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.8]
    cb = ReduceLROnPlateau(monitor="my_loss", patience=2, factor=10.0)
    learn = learner(mlp(), n=32, bs=32, lr=1e-2, metrics=[scripted("my_loss", values)], cbs=[cb, lrs])
    learn.fit(8)
    # epochs 2, 3 do not improve -> divided by 10 after epoch 3; 4, 5 -> again after epoch 5
    assert lrs.lrs == pytest.approx([1e-2] * 4 + [1e-3] * 2 + [1e-4] * 2)


def test_reduce_lr_on_plateau_min_lr():
    lrs = LrPerEpoch()
    values = [1.0] * 8
    cb = ReduceLROnPlateau(monitor="my_loss", patience=1, factor=10.0, min_lr=5e-4)
    learn = learner(mlp(), n=32, bs=32, lr=1e-2, metrics=[scripted("my_loss", values)], cbs=[cb, lrs])
    learn.fit(5)
    assert lrs.lrs == pytest.approx([1e-2, 1e-2, 1e-3, 5e-4, 5e-4])  # reduced after epochs 1, 2, 3


def nan_at_batch(k, n=64, bs=16):
    x, y = data(n)
    x = x.clone()
    x[k * bs + 3, 0] = float("nan")
    return x, y


def test_terminate_on_nan_weights_untouched(capsys):
    x, y = nan_at_batch(2)
    ref = mlp()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for i in range(2):
        F.cross_entropy(ref(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]).backward()
        opt.step()
        opt.zero_grad()
    dls = DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=16, shuffle=False)
    term = TerminateOnNaN()
    learn = Learner(mlp(), dls, F.cross_entropy, lr=1e-2, cbs=[term], progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        learn.fit(3)
    out = capsys.readouterr()
    said = out.out + out.err + " ".join(str(m.message) for m in w)
    assert "2" in said and ("step" in said.lower() or "iter" in said.lower()), said
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.isfinite(p).all()
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert len(learn.recorder.losses) <= 3 and learn.epoch == 0  # stopped at the third step, nothing after


def test_terminate_on_nan_injected_inf_loss():
    class Inf(Callback):
        def after_loss(self):
            if self.learn.training and self.learn.train_iter == 5:
                self.learn.loss = self.learn.loss * float("inf")

    rec = StepWeights()
    learn = learner(mlp(), cbs=[Inf(), TerminateOnNaN(), rec])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit(3)
    assert len(rec.steps) == 5
    for k, v in params(learn.model).items():
        assert torch.equal(v, rec.steps[-1][k])
    assert learn.epoch < 2


@pytest.mark.parametrize("make", [lambda: EarlyStopping(monitor="my_loss", patience=3),
                                  lambda: ReduceLROnPlateau(monitor="my_loss"),
                                  lambda p: SaveBest(p / "b.pt", monitor="my_loss"),
                                  lambda: TerminateOnNaN()])
def test_control_state_dicts_load_weights_only(make, tmp_path):
    cb = make(tmp_path) if make.__code__.co_argcount else make()
    learn = learner(mlp(), n=32, bs=32, metrics=[scripted("my_loss", [1.0, 0.5, 0.7])], cbs=[cb])
    learn.fit(3)
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    cb2 = make(tmp_path) if make.__code__.co_argcount else make()
    cb2.load_state_dict(state)
    assert cb2.state_dict() == cb.state_dict()
