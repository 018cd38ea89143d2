"""Lion's foreach step against the single-tensor reference `lion_update`, tensor by tensor, bit for bit.

The reference itself is checked against the paper's recurrence in test_optim.py.
"""
import torch
from torch import nn

from looplab.optim import Lion, lion_update, lion_update_foreach


def make_params():
    torch.manual_seed(0)
    shapes = [(6, 5), (5,), (4, 3, 2), (7,), (3, 3), (2,)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    params.append(nn.Parameter(torch.randn(4, dtype=torch.float64)))  # another dtype: its own foreach list
    return params


def groups(params):
    return [{"params": params[:3]},
            {"params": params[3:5], "lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.0},
            {"params": params[5:], "lr": 2e-2, "weight_decay": 0.3}]


def test_foreach_lion_equals_lion_update_per_tensor_over_several_steps():
    params, reference = make_params(), make_params()
    opt = Lion(groups(params), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref_groups = groups(reference)
    ref_state = {}
    torch.manual_seed(1)
    for step in range(8):
        for k, (p, q) in enumerate(zip(params, reference)):
            # params 1 and 4 have no gradient on some steps, param 6 never (it must keep no state)
            skip = k == 6 or (k in (1, 4) and step % 3 == 1)
            g = None if skip else torch.randn_like(p)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        for group in ref_groups:
            lr = group.get("lr", 1e-2)
            beta1, beta2 = group.get("betas", (0.9, 0.99))
            wd = group.get("weight_decay", 0.1)
            for q in group["params"]:
                if q.grad is not None:
                    exp_avg = ref_state.setdefault(q, torch.zeros_like(q))
                    lion_update(q.data, q.grad, exp_avg, lr, beta1, beta2, wd)
        for k, (p, q) in enumerate(zip(params, reference)):
            assert torch.equal(p, q), f"param {k} at step {step}"
            if q in ref_state:
                assert torch.equal(opt.state[p]["exp_avg"], ref_state[q]), f"exp_avg {k} at step {step}"
            else:
                assert p not in opt.state
    assert len(opt.state) == 6 and torch.equal(params[6], make_params()[6])  # never stepped, no state


def test_lion_update_foreach_is_lion_update_on_each_tensor():
    torch.manual_seed(2)
    ps = [torch.randn(5, 4), torch.randn(3)]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.randn_like(p) for p in ps]
    ps2, ms2 = [p.clone() for p in ps], [m.clone() for m in ms]
    lion_update_foreach(ps, gs, ms, 0.1, 0.9, 0.99, 0.5)
    for p, g, m in zip(ps2, gs, ms2):
        lion_update(p, g, m, 0.1, 0.9, 0.99, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ps + ms, ps2 + ms2))


def test_lion_step_uses_foreach_ops(monkeypatch):
    """One foreach call per list, not a loop of per-tensor updates."""
    calls = []
    real = torch._foreach_sign_
    monkeypatch.setattr(torch, "_foreach_sign_", lambda tensors: (calls.append(len(tensors)), real(tensors))[1])
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    Lion(groups(params), lr=1e-3).step()
    assert sorted(calls) == [1, 1, 2, 3]  # groups: 3 float32; 2 float32; one float32 and one float64 list
