"""MixUp and CutMix: the mixed inputs and losses follow the papers' formulas for λ and a permutation re-derived
from the same torch seed; training works on digits; validation is untouched."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from looplab import Callback, DataLoaders, Learner
from looplab.callbacks import CutMix, MixUp

torch.set_num_threads(1)
BS = 64


def digits(n=640):
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16
    return x, torch.tensor(d.target[:n])


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def accuracy(pred, y):
    return (pred.argmax(1) == y).float().mean()


class Probe(Callback):
    """Keeps each training batch as loaded (before MixUp, order 40) and as mixed, with pred and final loss."""
    order = 30

    def __init__(self):
        self.batches = []

    def before_batch(self):
        if self.learn.training:
            self.batches.append({"x": self.learn.xb.clone(), "y": self.learn.yb.clone()})

    def after_batch(self):
        if self.learn.training:
            b = self.batches[-1]
            b["mixed"], b["pred"], b["loss"] = self.learn.xb, self.learn.pred.detach(), self.learn.loss.detach()


def fit_probed(cb, loss_func=F.cross_entropy, seed=1, epochs=1, x=None, y=None):
    x, y = digits() if x is None else (x, y)
    learn = Learner(cnn(), DataLoaders.from_tensors(x, y, bs=BS, seed=0), loss_func, lr=3e-3, metrics=[accuracy],
                    progress=False)
    probe = Probe()
    torch.manual_seed(seed)  # nothing else in this fit draws from torch's RNG (no dropout, seeded loaders)
    learn.fit(epochs, cbs=[cb, probe])
    return learn, probe


def beta(alpha):
    a = torch.tensor(alpha, dtype=torch.float64)
    return float(torch.distributions.Beta(a, a).sample())


@pytest.mark.parametrize("loss_func", [F.cross_entropy, partial(F.cross_entropy, label_smoothing=0.2)],
                         ids=["cross_entropy", "label_smoothing"])
def test_mixup_inputs_and_loss_follow_the_formula(loss_func):
    learn, probe = fit_probed(MixUp(alpha=0.4), loss_func)
    torch.manual_seed(1)  # re-derive every batch's permutation and λ from the same seed, in draw order
    for b in probe.batches:
        perm = torch.randperm(len(b["x"]))
        lam = beta(0.4)
        torch.testing.assert_close(b["mixed"], lam * b["x"] + (1 - lam) * b["x"][perm], atol=1e-6, rtol=0)
        expected = lam * loss_func(b["pred"], b["y"]) + (1 - lam) * loss_func(b["pred"], b["y"][perm])
        torch.testing.assert_close(b["loss"], expected, atol=1e-6, rtol=0)
    # the Recorder records the mixed loss
    assert learn.recorder.losses == pytest.approx([float(b["loss"]) for b in probe.batches], abs=1e-6)


def test_cutmix_pastes_a_box_and_lambda_is_the_unpasted_area():
    torch.manual_seed(0)
    x, y = torch.rand(256, 3, 12, 10) + 0.5, torch.randint(0, 10, (256,))  # every pixel differs between samples
    model = nn.Sequential(nn.Flatten(), nn.Linear(360, 10))
    learn = Learner(model, DataLoaders.from_tensors(x, y, bs=BS, seed=0), F.cross_entropy, progress=False)
    probe = Probe()
    torch.manual_seed(3)
    learn.fit(2, cbs=[CutMix(alpha=1.0), probe])
    torch.manual_seed(3)
    for b in probe.batches:
        n, _, h, w = b["x"].shape
        perm = torch.randperm(n)
        lam = beta(1.0)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        # Yun et al.: a box of sides √(1−λ)·(H, W) centred at (cy, cx), clipped at the borders
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        box = torch.zeros(h, w, dtype=torch.bool)
        box[max(cy - cut_h // 2, 0):min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0):min(cx + cut_w // 2, w)] = True
        expected = torch.where(box, b["x"][perm], b["x"])
        assert torch.equal(b["mixed"], expected)
        # λ is the true unpasted fraction, read off the pixels that changed
        moved = perm != torch.arange(n)
        changed = (b["mixed"][moved] != b["x"][moved]).all(1)  # (m, H, W): pixel came from the partner
        true_lam = 1 - changed[0].float().mean().item()
        assert (changed == changed[0]).all()
        expected_loss = true_lam * F.cross_entropy(b["pred"], b["y"]) + (1 - true_lam) * F.cross_entropy(
            b["pred"], b["y"][perm])
        torch.testing.assert_close(b["loss"], expected_loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make_cb", [MixUp, CutMix], ids=["MixUp", "CutMix"])
def test_trains_on_digits_and_leaves_validation_untouched(make_cb):
    learn, _ = fit_probed(make_cb(), epochs=4)
    row = learn.recorder.history[-1]
    assert row["accuracy"] > 0.75  # it learns, mixed inputs notwithstanding
    plain = Learner(cnn(), learn.dls, F.cross_entropy, metrics=[accuracy], progress=False)
    plain.model.load_state_dict(learn.model.state_dict())
    reference = plain.validate()
    # validation inside the fit (last epoch) and after it equal a Learner without the callback, same weights
    assert row["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-6)
    assert row["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
    assert learn.validate() == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("make_cb", [MixUp, CutMix], ids=["MixUp", "CutMix"])
def test_same_seed_same_run(make_cb):
    weights = []
    for seed in (5, 5, 6):
        learn, _ = fit_probed(make_cb(), seed=seed)
        weights.append(torch.cat([p.detach().flatten() for p in learn.model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha=0)
    with pytest.raises(ValueError, match=r"\(64, 16\)"):
        fit_probed(CutMix(), x=torch.rand(128, 16), y=torch.randint(0, 10, (128,)))
    with pytest.raises(TypeError, match="int64"):
        fit_probed(MixUp(), x=torch.randint(0, 5, (128, 1, 8, 8)), y=torch.randint(0, 10, (128,)))
