"""FSDP: sharded data-parallel training under torchrun, on PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each rank keeps only its shard of every parameter, gradient and optimizer state tensor: about 1/world_size of the
memory DDP needs for them (see benchmarks/sharding.py). Everything else is as under `DistributedDataParallel`,
whose subclass this is: the process group, the device, how batches are shared out, the global training loss and
validation values on every rank.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..sharded import gather_model_state, gather_optimizer_state, is_sharded, shard_optimizer_state
from ..util import module_selector
from .distributed import DistributedDataParallel

__all__ = ["FSDP"]


class FSDP(DistributedDataParallel):
    """Shards the model, its gradients and the optimizer's state over the processes of a torchrun job (FSDP2).

    - `modules`: module classes (or a tuple of them) or a predicate `(qualified name, module) -> bool`, as
      `ActivationCheckpointing` takes them: each chosen submodule is its own `fully_shard` unit (its parameters
      are gathered for its forward and backward only), innermost first, then the root. None: the root alone.
    - `reshard_after_forward`: free the gathered parameters after each unit's forward (gather them again in
      backward): less memory, more communication. `mixed_precision=torch.bfloat16`: FSDP2's
      `MixedPrecisionPolicy` computes with bfloat16 parameters and reduces gradients in bfloat16 (the sharded
      parameters and the optimizer stay float32). `cpu_offload=True`: shards, gradients and the optimizer step
      live on the CPU (`CPUOffloadPolicy`).
    - Given in `cbs`, it replaces the DistributedDataParallel callback the Learner adds under torchrun (which then
      stays idle). Rank 0's initial weights are broadcast first, as DDP does, and its buffers (BatchNorm's running
      statistics) after every training batch, so they are the same on every rank, as under DDP.
    - The model's output must be something torch's pytree can walk (a tensor, tuple, list, dict, dataclass, a
      transformers `ModelOutput`): FSDP2 hooks into the tensors inside it.
    - The fit trains a sharded twin of the model: a copy of its structure that takes over the parameters' storage
      and shards it; the user's module keeps its parameter objects, emptied for the fit. `learn.opt` is rebuilt by
      the Learner's `opt_func` over the sharded parameters, with the same groups, hyper-parameters and state.
      After the fit the full weights and optimizer state are gathered back into the user's module and optimizer
      on every rank (to the CPU with `cpu_offload`): `learn.model` / `learn.opt` are the very objects the user had.
      When the fit raised, nothing can be gathered (the other ranks may be gone): the user's module is given back
      with NaN parameters of the right shapes and the optimizer without state (with a warning); load a checkpoint
      (`learn.load`, `resume_from`) before using them.
    - `Checkpoint` writes sharded checkpoint folders (see `looplab.sharded`); `learn.save` is collective (every rank
      calls it, rank 0 writes the plain full file) and `learn.load` of a plain file shards it.
    - `GradientClip` clips by the global norm over all shards. `EMA` and `SWA` are refused: their average would be
      a copy of the sharded model, which is not an average of the full weights a later `validate` could use.
    """

    def __init__(self, modules: type | tuple[type, ...] | Callable[[str, nn.Module], bool] | None = None,
                 reshard_after_forward: bool = True, mixed_precision: torch.dtype | None = None,
                 cpu_offload: bool = False):
        super().__init__()
        self._select = None if modules is None else module_selector(modules)
        if isinstance(modules, (type, list)):
            modules = (modules,) if isinstance(modules, type) else tuple(modules)
        if mixed_precision is not None and not (isinstance(mixed_precision, torch.dtype)
                                                and mixed_precision.is_floating_point):
            raise TypeError(f"mixed_precision must be a floating-point torch.dtype (torch.bfloat16) or None, "
                            f"got {mixed_precision!r}")
        if not isinstance(reshard_after_forward, bool):
            raise TypeError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
        self.modules, self.reshard_after_forward = modules, reshard_after_forward
        self.mixed_precision, self.cpu_offload = mixed_precision, bool(cpu_offload)
        self.n_sharded = 0  # fully_shard units of the last fit, the root included
        self._twin = self._users_opt = None
        self._shapes: list = []  # the user's parameters and their shapes, emptied for the fit
        self._buffers: list = []  # the sharded model's buffers (BatchNorm statistics): rank 0's after each batch

    def claim(self) -> int:
        return 2  # over any DistributedDataParallel callback

    def check_callbacks(self) -> None:
        from .averaging import EMA, SWA
        averaging = [type(cb).__name__ for cb in self.learn.cbs if isinstance(cb, (EMA, SWA))]
        if averaging:
            raise ValueError(f"FSDP cannot run with {', '.join(averaging)}: its average would be taken over this "
                             f"rank's shards only. Train with DistributedDataParallel, or average checkpoints "
                             f"after the fit (looplab.average_checkpoints)")

    def _chosen(self, model: nn.Module) -> list[nn.Module]:
        """The submodules that become their own units, in `named_modules` order (parents before children)."""
        if self._select is None:
            return []
        chosen = [m for name, m in model.named_modules() if name and self._select(name, m)
                  and any(True for _ in m.parameters())]
        if not chosen:
            raise ValueError(f"FSDP: modules={self.modules!r} chose no submodule with parameters of "
                             f"{type(model).__name__}")
        return chosen

    def wrap(self, device: torch.device | None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        learn = self.learn
        model, users_opt = learn.model, learn.opt
        if isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model):
            raise TypeError(f"FSDP shards the user's plain module; got a {type(model).__name__} already wrapped")
        if device is not None:
            model.to(device)
        with torch.no_grad():  # rank 0's initial weights everywhere, as DDP does
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, src=0)
        mesh = init_device_mesh(device.type if device is not None else "cpu", (dist.get_world_size(),))
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward,
                   "mp_policy": MixedPrecisionPolicy(param_dtype=self.mixed_precision,
                                                     reduce_dtype=self.mixed_precision),
                   "offload_policy": CPUOffloadPolicy(pin_memory=device is not None) if self.cpu_offload
                   else OffloadPolicy()}
        names = {id(p): name for name, p in model.named_parameters()}
        # the twin shares the parameters' storage (no second copy) until fully_shard replaces them by shards
        memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
        twin = copy.deepcopy(model, memo)
        chosen = self._chosen(twin)
        for module in reversed(chosen):  # innermost first
            fully_shard(module, **options)
        fully_shard(twin, **options)
        self.n_sharded = len(chosen) + 1
        sharded = dict(twin.named_parameters())
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [sharded[names[id(p)]] for p in group["params"]]} for group in users_opt.param_groups]
        opt = learn.opt_func(groups, lr=groups[-1]["lr"])
        saved = users_opt.state_dict()
        if saved["state"]:  # a later fit: the moments it already has, each rank its chunks
            opt.load_state_dict(shard_optimizer_state(saved, opt))
        users_opt.state.clear()  # the full-size state and weights are the shards' now: free them for the fit
        self._shapes = [(p, p.shape) for p in model.parameters()]
        for p in model.parameters():
            p.data, p.grad = torch.empty(0, dtype=p.dtype, device=p.device), None
        self._twin, self._users_opt = twin, users_opt
        self._buffers = list(twin.buffers())
        learn.model, learn.opt = twin, opt

    @torch.no_grad()
    def after_batch(self):
        # as DDP (broadcast_buffers), every rank's buffers are rank 0's at each training forward: made so after each
        # batch, so running statistics never drift apart between ranks, and a checkpoint (one copy) or the gathered
        # model holds every rank's
        if self._buffers and self.learn.training:
            for b in self._buffers:
                dist.broadcast(b, src=0)

    def unwrap(self, failed: bool) -> None:
        learn, model, twin = self.learn, self.users_model, self._twin
        if model is None:
            return
        if twin is not None:
            sharded_opt = learn.opt
            learn.model, learn.opt = model, self._users_opt
            self._twin = self._users_opt = None
            self._buffers = []
            if not failed:  # every rank gathers the full weights and optimizer state (collectives)
                full = gather_model_state(twin, to_cpu=self.cpu_offload)
                opt_state = gather_optimizer_state(sharded_opt, to_cpu=self.cpu_offload)
                params = dict(model.named_parameters())
                for name, p in params.items():
                    p.data = full[name]
                with torch.no_grad():
                    for name, b in model.named_buffers():
                        if name in full:
                            b.copy_(full[name])
                learn.opt.load_state_dict(opt_state)
            else:  # the shards cannot be gathered: full-size parameters that say so, ready for learn.load
                for p, shape in self._shapes:
                    p.data = torch.full(shape, math.nan if p.is_floating_point() else 0, dtype=p.dtype,
                                        device=p.device)
                warnings.warn("FSDP: the fit raised before the sharded weights could be gathered: the model's "
                              "parameters are NaN and its optimizer has no state until a checkpoint is loaded "
                              "(learn.load, or fit(..., resume_from=...))", stacklevel=2)
            self._shapes = []
        learn.model = model
