"""Lion against the paper's recurrence; torch's optimizers as opt_func; splitter, slice lrs and freezing."""
import pytest
import torch
from torch import nn

from looplab import DataLoaders, Learner
from looplab.optim import Lion, lrs_for_groups


# ---- Lion ---------------------------------------------------------------------------------------------------------
def _lion_reference(theta, m, grads, lr, b1, b2, wd):
    """Chen et al. 2023, Algorithm 2, written out step by step (no looplab code)."""
    theta, m = theta.clone(), m.clone()
    for g in grads:
        c = b1 * m + (1 - b1) * g
        theta = theta * (1 - lr * wd) - lr * torch.sign(c)
        m = b2 * m + (1 - b2) * g
    return theta, m


def test_lion_follows_the_recurrence_with_weight_decay():
    torch.manual_seed(0)
    w0, b0 = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    grads_w = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    grads_b = [torch.randn(3, dtype=torch.float64) for _ in range(6)]
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = Lion([{"params": [w]}, {"params": [b], "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2,
               betas=(0.8, 0.95), weight_decay=0.5)
    for gw, gb in zip(grads_w, grads_b):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    ref_w, ref_mw = _lion_reference(w0, torch.zeros_like(w0), grads_w, 1e-2, 0.8, 0.95, 0.5)
    ref_b, ref_mb = _lion_reference(b0, torch.zeros_like(b0), grads_b, 3e-3, 0.8, 0.95, 0.0)
    torch.testing.assert_close(w.detach(), ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach(), ref_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[w]["exp_avg"], ref_mw, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[b]["exp_avg"], ref_mb, rtol=0, atol=1e-12)
    # weight decay really acted: without it the weights differ
    no_wd, _ = _lion_reference(w0, torch.zeros_like(w0), grads_w, 1e-2, 0.8, 0.95, 0.0)
    assert not torch.allclose(no_wd, ref_w)


def test_lion_state_dict_resumes_identically():
    torch.manual_seed(0)
    grads = [torch.randn(4) for _ in range(6)]
    p1 = nn.Parameter(torch.ones(4))
    opt1 = Lion([p1], lr=0.1, weight_decay=0.1)
    for g in grads:
        p1.grad = g.clone()
        opt1.step()
    p2 = nn.Parameter(torch.ones(4))
    opt2 = Lion([p2], lr=0.1, weight_decay=0.1)
    for g in grads[:3]:
        p2.grad = g.clone()
        opt2.step()
    state = opt2.state_dict()
    p3 = nn.Parameter(p2.detach().clone())
    opt3 = Lion([p3], lr=0.1, weight_decay=0.1)
    opt3.load_state_dict(state)
    for g in grads[3:]:
        p3.grad = g.clone()
        opt3.step()
    assert torch.equal(p1, p3)


def test_lion_rejects_bad_hyper_parameters():
    p = [nn.Parameter(torch.zeros(1))]
    for kwargs, shown in ((dict(lr=-1.0), "-1.0"), (dict(betas=(1.0, 0.9)), "1.0"), (dict(betas=(0.9,)), r"\(0.9,\)"),
                          (dict(weight_decay=-0.1), "-0.1")):
        with pytest.raises(ValueError, match=shown):
            Lion(p, **kwargs)


# ---- optimizers as opt_func, discriminative lrs, freezing ----------------------------------------------------------
def _data():
    torch.manual_seed(0)
    x = torch.randn(48, 4)
    y = x @ torch.randn(4, 1)
    return DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=8)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _three_groups(model):
    return [model[0].parameters(), model[2].parameters(), model[4].parameters()]


@pytest.mark.parametrize("opt_func", [torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adam, torch.optim.AdamW, Lion])
def test_optimizers_train_unchanged_as_opt_func(opt_func):
    learn = Learner(_model(), _data(), nn.functional.mse_loss, opt_func=opt_func, lr=1e-2, progress=False)
    learn.fit_one_cycle(3)  # schedules lr and mom (momentum or betas[0]) on every one of them
    losses = learn.recorder.losses
    assert sum(losses[-6:]) < sum(losses[:6])


def test_slice_lr_spreads_geometrically_over_groups():
    learn = Learner(_model(), _data(), nn.functional.mse_loss, lr=slice(1e-5, 1e-1), splitter=_three_groups,
                    progress=False)
    assert [g["lr"] for g in learn.opt.param_groups] == pytest.approx([1e-5, 1e-3, 1e-1], rel=1e-12)
    assert lrs_for_groups(slice(1e-4, 1e-2), 1) == [1e-2]
    assert lrs_for_groups(3e-3, 2) == [3e-3, 3e-3]
    learn.fit(1, lr=slice(1e-6, 1e-4))
    assert [g["lr"] for g in learn.opt.param_groups] == pytest.approx([1e-6, 1e-5, 1e-4], rel=1e-12)


def test_freeze_to_and_unfreeze():
    model = _model()
    learn = Learner(model, _data(), nn.functional.mse_loss, opt_func=torch.optim.AdamW, lr=1e-2,
                    splitter=_three_groups, progress=False)
    learn.fit(1)  # gives every parameter optimizer state and (zeroed) history
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # stale gradients must not move frozen weights either
    before = [p.detach().clone() for p in model.parameters()]
    learn.freeze_to(-1)  # train only the head
    learn.fit(1)  # AdamW's weight decay would move anything it steps
    after = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after[:4], before[:4]))
    assert not any(torch.equal(a, b) for a, b in zip(after[4:], before[4:]))
    learn.freeze_to(1)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]
    learn.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    learn.fit(1)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    for bad in (3, -4, 1.0):
        with pytest.raises(ValueError, match=repr(bad)):
            learn.freeze_to(bad)
