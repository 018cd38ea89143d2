"""Acceptance tests for issue 4 (MixedPrecision, GradientClip, GradientAccumulation, ActivationCheckpointing),
written from the issue's contract as a black-box user: every number is compared with a hand-written torch loop
(torch.amp.GradScaler, clip_grad_norm_, clip_grad_value_, plain batches) or an analytic fact."""
import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import (ActivationCheckpointing, GradientAccumulation, GradientClip, MixedPrecision,
                               TensorBoard)


def data(n=64, d=8, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y.clamp(max=c - 1)


def mlp(seed=0, d=8, h=16, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))


def learner(model, bs=16, cbs=(), opt_func=torch.optim.SGD, lr=0.1, n=64, shuffle=False, metrics=()):
    x, y = data(n)
    dls = DataLoaders.from_tensors(x, y, valid=(x[:16], y[:16]), bs=bs, shuffle=shuffle)
    return Learner(model, dls, F.cross_entropy, opt_func=opt_func, lr=lr, cbs=list(cbs), metrics=metrics,
                   progress=False)


def batches(bs=16, n=64):
    x, y = data(n)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def assert_same_weights(m1, m2, atol=1e-6):
    for (k, a), (k2, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k == k2
        assert torch.allclose(a.float(), b.float(), atol=atol, rtol=0), (k, (a - b).abs().max())


class InjectInf(Callback):
    """Multiplies the loss by inf at one training step (in after_loss, as the issue describes)."""

    def __init__(self, at):
        self.at = at

    def after_loss(self):
        if self.learn.training and self.learn.train_iter == self.at:
            self.learn.loss = self.learn.loss * float("inf")


class WeightsPerStep(Callback):
    order = 95

    def before_fit(self):
        self.before = []
        self.after = []

    def before_batch(self):
        if self.learn.training:
            self.before.append(copy.deepcopy(self.learn.model.state_dict()))

    def after_batch(self):
        if self.learn.training:
            self.after.append(copy.deepcopy(self.learn.model.state_dict()))


# ---------------------------------------------------------------------------------------------------------------
# MixedPrecision
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, "float16", None])
def test_mixed_precision_other_dtype_is_value_error(dtype):
    with pytest.raises(ValueError):
        MixedPrecision(dtype=dtype)


def test_mixed_precision_defaults():
    mp = MixedPrecision()
    assert mp.overflows == 0
    assert isinstance(mp.scale, float) and mp.scale == 2.0**16
    MixedPrecision(torch.bfloat16)


class DtypeProbe(Callback):
    order = 99  # after everything that touches pred

    def before_fit(self):
        self.pred_dtypes, self.loss_dtypes = set(), set()

    def after_loss(self):
        self.pred_dtypes.add(self.learn.pred.dtype)
        self.loss_dtypes.add(self.learn.loss.dtype)


class AutocastProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.seen = set()

    def forward(self, x):
        out = self.lin(x)
        self.seen.add(out.dtype)
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_and_float32_predictions(dtype):
    model = AutocastProbe()
    metric_dtypes = []

    def acc(pred, y):
        metric_dtypes.append(pred.dtype)
        return (pred.argmax(1) == y).float().mean()

    probe = DtypeProbe()
    learn = learner(model, cbs=[MixedPrecision(dtype), probe], metrics=[acc])
    learn.fit(1)
    assert dtype in model.seen  # the forward ran under autocast
    assert probe.pred_dtypes == {torch.float32}
    assert probe.loss_dtypes == {torch.float32}
    assert metric_dtypes and set(metric_dtypes) == {torch.float32}


def hand_gradscaler_loop(model, n_epochs, init_scale, growth_interval, inf_at, lr=0.1, bs=16):
    """The reference: torch.amp.GradScaler in a hand-written loop on CPU."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    scales, step, weights_before_inf, weights_after_inf = [], 0, None, None
    for _ in range(n_epochs):
        for x, y in batches(bs):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            if step == inf_at:
                loss = loss * float("inf")
                weights_before_inf = copy.deepcopy(model.state_dict())
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if step == inf_at:
                weights_after_inf = copy.deepcopy(model.state_dict())
            step += 1
    return scales, scaler, weights_before_inf, weights_after_inf


def test_inf_loss_skips_step_backs_off_and_matches_gradscaler():
    init, gi, at = 2.0**12, 3, 5
    ref_model = mlp()
    ref_scales, ref_scaler, ref_before, ref_after = hand_gradscaler_loop(ref_model, 2, init, gi, at)
    assert ref_before is not None

    mp = MixedPrecision(torch.float16, init_scale=init, growth_interval=gi)
    w = WeightsPerStep()
    learn = learner(mlp(), cbs=[mp, InjectInf(at), w])
    learn.fit(2)

    assert mp.overflows == 1
    series = learn.recorder.series("loss_scale")
    assert [i for i, _ in series] == list(range(8))  # every training batch, skipped step included
    assert [v for _, v in series] == ref_scales
    # the scale backed off by backoff_factor right after the injected step
    assert series[at + 1][1] == series[at][1] * 0.5
    assert len({v for _, v in series}) >= 2
    # the skipped step left the weights untouched
    for k in w.before[at]:
        assert torch.equal(w.before[at][k], w.after[at][k]), k
    # training continued afterwards, and the whole run is what GradScaler does
    assert any(not torch.equal(w.before[at + 1][k], w.after[at + 1][k]) for k in w.before[at + 1])
    assert mp.scale == ref_scaler.get_scale()
    assert_same_weights(learn.model, ref_model, atol=1e-6)


def test_scale_state_dict_restores_scale(tmp_path):
    init = 2.0**12
    mp = MixedPrecision(torch.float16, init_scale=init, growth_interval=1000)
    learn = learner(mlp(), cbs=[mp, InjectInf(1), InjectInf(2)])
    learn.fit(1)
    assert mp.overflows == 2
    assert mp.scale == init / 4
    torch.save(mp.state_dict(), tmp_path / "mp.pt")
    state = torch.load(tmp_path / "mp.pt", weights_only=True)

    mp2 = MixedPrecision(torch.float16, init_scale=init, growth_interval=1000)
    mp2.load_state_dict(state)
    assert mp2.scale == init / 4
    assert mp2.overflows == 2
    learn2 = learner(mlp(), cbs=[mp2])
    learn2.fit(1)
    assert learn2.recorder.series("loss_scale")[0][1] == init / 4  # not restarted at init_scale


def test_loss_scale_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    init = 2.0**8
    mp = MixedPrecision(torch.float16, init_scale=init, growth_interval=2)
    learn = learner(mlp(), cbs=[mp, TensorBoard(tmp_path / "tb")])
    learn.fit(1)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    tag = [t for t in tags if "loss_scale" in t]
    assert tag, tags
    got = [e.value for e in acc.Scalars(tag[0])]
    assert got == [v for _, v in learn.recorder.series("loss_scale")]
    assert got[0] == init and max(got) > init  # grew every 2 steps


def test_bfloat16_trains_like_float32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    accs = {}
    for name, cbs in (("fp32", []), ("bf16", [MixedPrecision(torch.bfloat16)])):
        dls = DataLoaders.from_tensors(x[:384], y[:384], valid=(x[384:], y[384:]), bs=32, shuffle=True)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        learn = Learner(model, dls, F.cross_entropy, lr=1e-2, cbs=cbs,
                        metrics=[lambda p, t: (p.argmax(1) == t).float().mean()], progress=False)
        learn.fit(4)
        accs[name] = list(learn.recorder.history[-1].values())[-2]
    assert accs["fp32"] > 0.85
    assert abs(accs["bf16"] - accs["fp32"]) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# GradientClip
# ---------------------------------------------------------------------------------------------------------------
def grad_norm(params, norm_type=2.0):
    gs = [p.grad.detach().float() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in gs]), norm_type)


class ProbeSGD(torch.optim.SGD):
    """Records the gradient norm the optimizer actually sees at each step."""
    seen = []

    def step(self, closure=None):
        ProbeSGD.seen.append(float(grad_norm([p for g in self.param_groups for p in g["params"]])))
        return super().step(closure)


def test_clip_under_float16_optimizer_sees_at_most_max_norm():
    ProbeSGD.seen = []
    max_norm = 0.05
    mp = MixedPrecision(torch.float16, init_scale=2.0**10)
    learn = learner(mlp(), cbs=[GradientClip(max_norm), mp, InjectInf(2)], opt_func=ProbeSGD, lr=0.5)
    learn.fit(2)
    logged = [v for _, v in learn.recorder.series("grad_norm")]
    assert len(logged) == 8  # every step
    assert max(v for v in logged if math.isfinite(v)) > max_norm  # clipping had work to do
    assert mp.overflows == 1
    assert len(ProbeSGD.seen) == 7  # the overflowed step never reached the optimizer
    assert all(v <= max_norm * (1 + 1e-4) for v in ProbeSGD.seen), ProbeSGD.seen
    # unscaled: the norms the optimizer sees are of the order of max_norm, not max_norm * scale
    assert all(v > max_norm * 0.5 for v in ProbeSGD.seen)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_matches_clip_grad_norm(norm_type):
    max_norm = 0.1
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_norms = []
    for x, y in batches() * 2:
        F.cross_entropy(ref(x), y).backward()
        ref_norms.append(float(nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)))
        opt.step()
        opt.zero_grad()

    learn = learner(mlp(), cbs=[GradientClip(max_norm, norm_type=norm_type)], lr=0.5)
    learn.fit(2)
    got = [v for _, v in learn.recorder.series("grad_norm")]
    assert got == pytest.approx(ref_norms, rel=1e-5)
    assert_same_weights(learn.model, ref, atol=1e-6)


def test_clip_by_value_matches_clip_grad_value():
    clip = 0.01
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for x, y in batches() * 2:
        F.cross_entropy(ref(x), y).backward()
        nn.utils.clip_grad_value_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad()
    learn = learner(mlp(), cbs=[GradientClip(clip_value=clip)], lr=0.5)
    learn.fit(2)
    assert_same_weights(learn.model, ref, atol=1e-6)
    assert len(learn.recorder.series("grad_norm")) == 8


@pytest.mark.parametrize("kwargs", [dict(max_norm=0), dict(max_norm=-1.0), dict(max_norm=float("nan"))])
def test_clip_bad_arguments(kwargs):
    with pytest.raises((ValueError, TypeError)):
        GradientClip(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# GradientAccumulation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_func", [torch.optim.SGD, partial(torch.optim.SGD, momentum=0.9), torch.optim.AdamW])
@pytest.mark.parametrize("shuffle", [False, True])
def test_accumulate_4x16_equals_64(opt_func, shuffle):
    big = learner(mlp(), bs=64, n=256, opt_func=opt_func, lr=0.05, shuffle=shuffle)
    big.fit(2)
    small = learner(mlp(), bs=16, n=256, opt_func=opt_func, lr=0.05, shuffle=shuffle,
                    cbs=[GradientAccumulation(4)])
    small.fit(2)
    assert_same_weights(small.model, big.model, atol=1e-6)
    # steps actually happened
    assert not torch.allclose(small.model[0].weight, mlp()[0].weight)


def test_accumulate_records_true_loss():
    """Recorder gets each micro-batch's own loss: undivided and unscaled."""
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_losses = []
    bs = batches(16, 128)
    for k, (x, y) in enumerate(bs):
        loss = F.cross_entropy(ref(x), y)
        ref_losses.append(loss.item())
        (loss / 4).backward()
        if k % 4 == 3:
            opt.step()
            opt.zero_grad()
    for cbs in ([GradientAccumulation(4)],
                [GradientAccumulation(4), MixedPrecision(torch.float16, init_scale=2.0**10)]):
        learn = learner(mlp(), n=128, cbs=cbs)
        learn.fit(1)
        tol = 1e-6 if len(cbs) == 1 else 5e-3
        assert learn.recorder.losses == pytest.approx(ref_losses, abs=tol)
    assert_same_weights(learn.model, ref, atol=2e-2)


def test_accumulate_with_float16_and_clip_matches_gradscaler_loop():
    init, max_norm = 2.0**10, 0.05
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=2)
    ref_scales, ref_norms, ref_seen = [], [], []
    for epoch in range(2):
        for k, (x, y) in enumerate(batches(16, 128)):
            with torch.autocast("cpu", dtype=torch.float16):
                out = ref(x)
            ref_scales.append(scaler.get_scale())
            scaler.scale(F.cross_entropy(out.float(), y) / 4).backward()
            if k % 4 == 3:
                scaler.unscale_(opt)
                ref_norms.append(float(nn.utils.clip_grad_norm_(ref.parameters(), max_norm)))
                ref_seen.append(float(grad_norm(ref.parameters())))
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()

    ProbeSGD.seen = []
    mp = MixedPrecision(torch.float16, init_scale=init, growth_interval=2)
    learn = learner(mlp(), n=128, opt_func=ProbeSGD, lr=0.5,
                    cbs=[GradientAccumulation(4), GradientClip(max_norm), mp])
    learn.fit(2)
    assert [v for _, v in learn.recorder.series("loss_scale")] == ref_scales  # every micro-batch logs it
    assert [v for _, v in learn.recorder.series("grad_norm")] == pytest.approx(ref_norms, rel=1e-5)
    assert len(ProbeSGD.seen) == 4
    assert all(v <= max_norm * (1 + 1e-4) for v in ProbeSGD.seen)
    assert mp.scale == scaler.get_scale()
    assert_same_weights(learn.model, ref, atol=1e-6)


@pytest.mark.parametrize("n", [0, -1, 1.5, "4"])
def test_accumulate_bad_n(n):
    with pytest.raises((ValueError, TypeError)):
        GradientAccumulation(n)


# ---------------------------------------------------------------------------------------------------------------
# ActivationCheckpointing
# ---------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    calls = 0

    def __init__(self, h=16):
        super().__init__()
        self.lin, self.drop = nn.Linear(h, h), nn.Dropout(0.2)

    def forward(self, x):
        Block.calls += 1
        return x + self.drop(torch.relu(self.lin(x)))


def resnet_mlp(seed=0, h=16, depth=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, h), *[Block(h) for _ in range(depth)], nn.Linear(h, 3))


def fingerprint(model):
    return (repr(model), [(n, type(m)) for n, m in model.named_modules()], list(model.state_dict()),
            [sorted(m.__dict__) for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


@pytest.mark.parametrize("selector", [(Block,), Block, lambda name, m: isinstance(m, Block)])
def test_activation_checkpointing_same_weights_and_model_unchanged(selector):
    plain = learner(resnet_mlp(), cbs=[], lr=0.1, shuffle=True)
    plain.fit(2)

    model = resnet_mlp()
    before = fingerprint(model)
    ac = ActivationCheckpointing(selector)
    learn = learner(model, cbs=[ac], lr=0.1, shuffle=True)
    learn.fit(2)
    assert ac.n_wrapped == 3
    assert_same_weights(learn.model, plain.model, atol=1e-6)  # dropout included
    assert fingerprint(learn.model) == before
    assert plain.recorder.losses == pytest.approx(learn.recorder.losses, abs=1e-6)


def test_activation_checkpointing_gradients_identical():
    grads = {}

    class GradProbe(Callback):
        order = 99

        def __init__(self, key):
            self.key = key

        def before_step(self):
            if self.learn.train_iter == 0:
                grads[self.key] = [p.grad.clone() for p in self.learn.model.parameters()]

    learner(resnet_mlp(), cbs=[GradProbe("plain")]).fit(1)
    learner(resnet_mlp(), cbs=[GradProbe("ac"), ActivationCheckpointing((Block,))]).fit(1)
    for a, b in zip(grads["plain"], grads["ac"]):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)


def test_activation_checkpointing_recomputes_in_training_only(monkeypatch):
    import torch.utils.checkpoint as tuc
    calls = {"n": 0}
    real = tuc.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", counting)
    Block.calls = 0
    learn = learner(resnet_mlp(depth=2), n=32, cbs=[ActivationCheckpointing((Block,))])  # 2 train, 1 valid batch
    learn.fit(1)
    # training: 2 batches x 2 blocks x (forward + recompute) ; validation: 1 batch x 2 blocks, once
    assert Block.calls == 2 * 2 * 2 + 1 * 2
    assert calls["n"] == 2 * 2  # through torch.utils.checkpoint, in training only
    # outside a fit the model is plain: validation / get_preds normal
    Block.calls, calls["n"] = 0, 0
    learn.validate()
    assert Block.calls == 2 and calls["n"] == 0
    loss = learn.validate()["valid_loss"]
    x, y = data(32)
    learn.model.eval()
    with torch.no_grad():
        assert loss == pytest.approx(F.cross_entropy(learn.model(x[:16]), y[:16]).item(), abs=1e-6)


def test_activation_checkpointing_validation_loss_matches_plain():
    plain = learner(resnet_mlp(), lr=0.1)
    plain.fit(2)
    learn = learner(resnet_mlp(), lr=0.1, cbs=[ActivationCheckpointing((Block,))])
    learn.fit(2)
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(plain.recorder.history[-1]["valid_loss"],
                                                                     abs=1e-6)


def test_activation_checkpointing_with_batchnorm_same_state():
    """Running statistics too: a recomputed forward must not update batch norm twice."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()),
                             nn.Linear(16, 3))
    plain = learner(model())
    plain.fit(1)
    ac = ActivationCheckpointing(lambda name, m: name == "1")
    learn = learner(model(), cbs=[ac])
    learn.fit(1)
    assert ac.n_wrapped == 1
    assert_same_weights(learn.model, plain.model, atol=1e-6)


def test_activation_checkpointing_wrapping_nothing_names_selector():
    def my_selector(name, module):
        return False

    with pytest.raises(ValueError, match="my_selector"):
        learner(mlp(), cbs=[ActivationCheckpointing(my_selector)]).fit(1)
    with pytest.raises(ValueError, match="Conv2d"):
        learner(mlp(), cbs=[ActivationCheckpointing((nn.Conv2d,))]).fit(1)
