"""ActivationCheckpointing: chosen submodules recompute their activations in backward instead of storing them."""
from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..callback import Callback
from ..util import module_selector, unwrap_model
from .order import Order

__all__ = ["ActivationCheckpointing"]


@contextmanager
def _restoring(buffers: list[torch.Tensor]):
    """Puts `buffers` back as they were on entry: the recomputation must not update batch norm's statistics twice."""
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)


class _CheckpointedForward:
    """`module`'s own forward, run through non-reentrant `checkpoint` whenever gradients are being recorded.

    Set as the module's instance `forward` for a fit. A `deepcopy` of the module (EMA, SWA, a snapshot) gets its
    class's plain forward bound to the copy instead: the copy runs its own weights and is not checkpointed.
    """

    def __init__(self, module: nn.Module, forward: Callable):
        self.module, self.forward = module, forward
        bn_buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      for b in m.buffers()]
        self.options = {"context_fn": lambda: (nullcontext(), _restoring(bn_buffers))} if bn_buffers else {}

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            # looked up at call time (not bound at import), so a patched or profiled `checkpoint` is the one used
            return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False, **self.options,
                                                     **kwargs)
        return self.forward(*args, **kwargs)  # validation, get_preds: nothing to recompute

    def __deepcopy__(self, memo):
        copy = memo.get(id(self.module))
        if copy is None:  # the forward alone is being copied, not its module
            return self
        return types.MethodType(type(copy).forward, copy)


class ActivationCheckpointing(Callback):
    """During training, the submodules chosen by `modules` keep only their inputs in the forward pass and
    recompute their activations in backward (`torch.utils.checkpoint`, non-reentrant): memory for time.

    `modules`: a module class or tuple of classes, or a predicate `(qualified name, module) -> bool`. A module
    inside one already chosen is not wrapped again. Gradients are identical (random ops such as dropout replay
    the same random numbers). `.n_wrapped` is how many modules were wrapped; matching none is a ValueError.

    Wrapping sets an instance `forward` on each chosen module for the fit and removes it after, however the fit
    ends: the modules, the model's structure and its `state_dict` keys never change, so checkpoints written mid-fit
    load anywhere. A `deepcopy` of the model taken during the fit (EMA's average, a snapshot) runs its own weights
    through its class's plain forward.
    Batch norm inside a wrapped module updates its running statistics once, as without checkpointing: they are
    restored after the recomputation in backward.
    """

    order = Order.ACTIVATION_CKPT

    def __init__(self, modules: type | tuple[type, ...] | Callable[[str, nn.Module], bool]):
        self._select = module_selector(modules)
        self.modules = (modules,) if isinstance(modules, type) else modules
        self.n_wrapped = 0
        self._wrapped: list[tuple[nn.Module, object]] = []  # (module, its own instance `forward` or None)

    def before_fit(self):
        self._unwrap()  # left over if an earlier fit ended with an exception
        model = unwrap_model(self.learn.model)
        chosen: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") or prefix == "" for prefix in chosen):
                continue  # inside a module that is already wrapped
            if self._select(name, module):
                chosen.append(name)
                self._wrapped.append((module, module.__dict__.get("forward")))
                module.forward = _CheckpointedForward(module, module.forward)
        if not chosen:
            raise ValueError(f"ActivationCheckpointing(modules={self.modules!r}) matched no submodule of "
                             f"{type(model).__name__}")
        self.n_wrapped = len(chosen)

    def _unwrap(self) -> None:
        for module, own_forward in reversed(self._wrapped):
            del module.forward
            if own_forward is not None:
                module.forward = own_forward
        self._wrapped = []

    def after_fit(self):
        self._unwrap()
