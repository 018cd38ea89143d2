"""DistributedDataParallel: data-parallel training under `torchrun`, on torch's own DDP engine.

The Learner adds this callback by itself when the environment says `WORLD_SIZE > 1` (torchrun sets it), so one
script runs alone or under `torchrun --nproc_per_node=N` unchanged. `bs` is per process: rank r takes its
contiguous share of every global batch of `bs * world_size` samples (see `looplab.data.epoch_batches`), so the
ranks' batches k together are the one-process batch k, and DDP's gradient average is the gradient of that
global batch's mean loss.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from ..callback import Callback
from .order import Order

__all__ = ["DistributedDataParallel", "skip_gradient_sync", "average_accumulated_grads"]


def _torch_ddp(model) -> TorchDDP | None:
    """torch's DDP wrapper of `model` (also inside a `torch.compile` wrapper), or None."""
    while type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper (by name: importing dynamo is slow)
        model = model._orig_mod
    return model if isinstance(model, TorchDDP) else None


def skip_gradient_sync(model) -> contextlib.AbstractContextManager:
    """For a micro-batch whose gradients only accumulate: torch DDP's `no_sync()` (its forward AND backward must
    run inside, DDP decides at forward time), so no gradient all-reduce runs; a no-op context for other models."""
    ddp = _torch_ddp(model)
    return ddp.no_sync() if ddp is not None else contextlib.nullcontext()


def average_accumulated_grads(model) -> None:
    """Average gradients accumulated under `no_sync` across the ranks (a collective: every rank calls it).

    A checkpoint written mid-accumulation keeps one copy of the gradients (rank 0's) for every rank: this makes
    them the same on every rank. The step's own all-reduce averages again, which leaves an already averaged part
    unchanged, so the step is the one without it (up to rounding); an uninterrupted run does the same averaging
    at the same checkpoint, so a resumed run stays bit-identical to it.
    """
    ddp = _torch_ddp(model)
    grads = [p.grad for p in ddp.parameters() if p.grad is not None] if ddp is not None else []
    if not grads or not dist.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


class DistributedDataParallel(Callback):
    """Joins (or creates) the process group, wraps `learn.model` in torch's DDP and shards the loaders for a fit.

    - Process group: one the user initialised is kept; otherwise each fit creates it from torchrun's environment
      (nccl when CUDA is available, else gloo) and tears it down in `after_fit`. Under torchrun's agent store every
      group gets store keys of its own, so creating one per fit is safe (a new group reading an old one's keys can
      hang: pytorch/pytorch#55967, #119196). Between fits `looplab.util.is_main_process()` falls back to torchrun's
      `RANK`. With nccl each process trains on `cuda:LOCAL_RANK` and the model is moved there.
    - `learn.model` is the DDP wrapper during the fit (`learn.save` and `Checkpoint` unwrap it) and, after it,
      however the fit ended, the very object the user gave. A model the user wrapped in torch's
      `DistributedDataParallel` already is used as it is (not wrapped twice; `ddp_kwargs` then go unused).
    - When the fit raised (`learn.exception`), `after_fit` still gives the model back and unshards the loaders,
      but calls no barrier: the other processes may be stuck in a collective, and waiting for them would hang.
      A group it created is then torn down locally (see `_drop_group`).
    - Data: the loaders must be looplab's (`DataLoaders.from_tensors` / `from_datasets`). Training gives every rank
      the same number of batches (a last global batch with fewer samples than ranks is dropped); validation uses
      every sample once. `valid_loss` and the metric functions' sums are all-reduced through the Recorder's
      documented `reduce_valid_sums` channel, and metric objects (`F1Score`, torchmetrics) combine their own
      state in `compute()`, so every rank gets the full dataset's values (EarlyStopping & co. decide alike).
    - The training loss's value is made the global batch's (one scalar all-reduce per step) while its gradient
      stays this rank's, so the Recorder, the progress bar, `lr_find`, TerminateOnNaN and anything deciding on
      `train_loss` see the one-process value on every rank, and decide alike (a rank that stopped alone would
      leave the others waiting). A callback that replaces the loss later in `after_loss` (MixUp) makes it this
      rank's again.
    - An uneven last training batch (e.g. 33 samples on 2 ranks) weights each rank's loss by its share of the
      batch, so the step still follows the global batch's mean loss. This assumes `loss_func` averages over the
      batch, as torch's losses do by default.
    - BatchNorm statistics stay per-process (DDP broadcasts rank 0's buffers); convert the model with
      `torch.nn.SyncBatchNorm.convert_sync_batchnorm` first for global batch statistics.

    `ddp_kwargs` go to `torch.nn.parallel.DistributedDataParallel` (e.g. `find_unused_parameters=True`). To pass
    them, give this callback in `cbs` (the Learner's or the fit's): when several are present, the first one with
    `ddp_kwargs` works (else the first) and the others, such as the one the Learner adds, stay idle.
    """
    order = Order.DISTRIBUTED  # see looplab/callbacks/order.py

    def __init__(self, **ddp_kwargs):
        self.ddp_kwargs = ddp_kwargs
        self.active, self.tail_iter, self.created_group, self.users_model = False, None, False, None

    # ---- fit ---------------------------------------------------------------------------------------------------
    def before_fit(self):
        learn = self.learn
        if self.active:  # a fit raised and its after_fit never ran (a core without `learn.exception`): undo it
            self._teardown(failed=True)
        candidates = [cb for cb in learn.cbs if isinstance(cb, DistributedDataParallel)]
        self.active = max(candidates, key=lambda cb: cb.claim()) is self  # the first of the highest claim
        if not self.active:
            return
        self.check_callbacks()
        self.users_model = learn.model  # first: whatever fails below, after_fit gives this back
        for dl in (learn.dls.train, learn.dls.valid):
            if dl is not None and not hasattr(dl, "set_distributed"):
                raise TypeError(f"distributed training needs looplab's loaders (DataLoaders.from_tensors or "
                                f"from_datasets), which give each process its share of every batch; got "
                                f"{type(dl).__name__}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if "WORLD_SIZE" not in os.environ:
                raise RuntimeError("DistributedDataParallel needs a process group: launch with torchrun, or call "
                                   "torch.distributed.init_process_group() before fit")
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)  # before init: nccl binds each process to its GPU
            self.created_group = _init_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        learn.dls.train.set_distributed(rank, world_size, even=True)
        if learn.dls.valid is not None:
            learn.dls.valid.set_distributed(rank, world_size, even=False)
        n_batches = len(learn.dls.train)  # global batches now: the fit's length follows (schedules read it)
        if learn.steps is None:
            learn.n_steps = learn.n_epochs * n_batches
        else:
            learn.n_epochs = -(-learn.steps // n_batches) if n_batches else None
        self._plan_tail(learn.dls.train, rank, world_size)
        learn.recorder.reduce_valid_sums = self._reduce_valid_sums
        device = None
        if dist.get_backend() == "nccl":  # one process per GPU
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.wrap(device)

    # ---- what a subclass (FSDP) does differently -----------------------------------------------------------
    def claim(self) -> int:
        """Which of several such callbacks works: the first of the highest claim (FSDP 2, DDP with kwargs 1)."""
        return 1 if self.ddp_kwargs else 0

    def check_callbacks(self) -> None:
        """Refuse, before anything is set up, callbacks that cannot work with this way of training."""

    def wrap(self, device: torch.device | None) -> None:
        """Make `learn.model` data-parallel; `device`: this process's accelerator (None: the model stays put)."""
        learn = self.learn
        if isinstance(learn.model, TorchDDP):  # the user wrapped it: their wrapper, their device placement
            if self.ddp_kwargs:
                warnings.warn(f"the model is already a torch DistributedDataParallel: {self.ddp_kwargs} go unused",
                              stacklevel=2)
            return
        model = learn.model
        if device is not None:
            model.to(device)  # in place: the optimizer keeps the same parameters
        device_ids = None if device is None else [device.index]
        learn.model = TorchDDP(model, device_ids=device_ids, **self.ddp_kwargs)  # broadcasts rank 0's weights

    def unwrap(self, failed: bool) -> None:
        """Give the user's model back (`failed`: the fit raised, so no collective may be called)."""
        if self.users_model is not None:
            self.learn.model = self.users_model

    def _plan_tail(self, dl, rank: int, world_size: int) -> None:
        """Find the last training batch, and this rank's loss weight there if its share is not 1/world_size."""
        last = len(dl) - 1
        global_bs = dl.bs * world_size
        size = min(global_bs, dl.n - last * global_bs)
        share = (rank + 1) * size // world_size - rank * size // world_size
        self.tail_iter = last if share * world_size != size else None
        self.tail_weight = share * world_size / size
        self.world_size = world_size

    def _weight(self) -> float:
        """This rank's share of the global batch's mean loss, times world_size (1 but on an uneven last batch)."""
        return self.tail_weight if self.tail_iter is not None and self.learn.iter == self.tail_iter else 1.0

    def after_loss(self):
        learn = self.learn
        if not (self.active and learn.training):
            return
        loss = learn.loss
        weight = self._weight()
        global_loss = loss.detach() * weight if weight != 1.0 else loss.detach().clone()
        dist.all_reduce(global_loss)
        learn.loss = loss + (global_loss / self.world_size - loss).detach()  # the global value, this rank's gradient

    def before_backward(self):
        weight = self._weight()
        if weight != 1.0:
            self.learn.loss = self.learn.loss * weight

    def _reduce_valid_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """The Recorder's `reduce_valid_sums` channel: this rank's validation sums -> every rank's, added up."""
        if getattr(self.learn.dl, "world_size", 1) == 1:  # not a sharded loader (e.g. a plain list to validate())
            return sums
        dist.all_reduce(sums)
        return sums

    def after_fit(self):
        """Give the user's model back, unshard the loaders, and tear down the process group if this fit made it."""
        if self.active:
            self._teardown(failed=getattr(self.learn, "exception", None) is not None)

    def _teardown(self, failed: bool) -> None:
        """Undo `before_fit`, also a part of it: the model first (FSDP gathers it: collectives, unless `failed`),
        then the loaders and the channel (local), then the group (which may raise)."""
        learn = self.learn
        try:
            self.unwrap(failed)
        except BaseException:
            failed = True  # the others may be stuck in the gather: drop the group without waiting
            raise
        finally:
            for dl in (learn.dls.train, learn.dls.valid):
                if dl is not None and hasattr(dl, "set_distributed"):
                    dl.set_distributed(0, 1)
            if learn.recorder.reduce_valid_sums == self._reduce_valid_sums:
                learn.recorder.reduce_valid_sums = None
            created = self.created_group
            self.active, self.tail_iter, self.created_group, self.users_model = False, None, False, None
            if created and dist.is_initialized():  # a user's group is kept
                self._end_group(failed)

    @staticmethod
    def _end_group(failed: bool) -> None:
        if failed:
            _drop_group()
            return
        try:
            dist.barrier()  # no rank leaves while another still needs the group
        except BaseException:
            _drop_group()
            raise
        dist.destroy_process_group()


def _drop_group() -> None:
    """Tear down this process's default group without waiting for the other processes.

    After a failure the others may be stuck in a collective that this process will never join: a barrier (or a
    graceful nccl shutdown, which waits for pending collectives) would hang. Leaving the group would not hang
    either, but the next fit in this process would then take the stale group for a user's. So: nccl is aborted
    (`ncclCommAbort` returns without waiting); gloo's destroy is local (it closes this process's connections,
    which makes peers blocked on it fail at once instead of at their timeout, and waits only for this process's
    own queued work — none by the time an exception reaches the loop: looplab's collectives are waited on where
    they are issued, and DDP waits for its gradient all-reduces within backward).
    """
    c10d = dist.distributed_c10d
    if dist.get_backend() == "nccl" and hasattr(c10d, "_abort_process_group"):
        c10d._abort_process_group()
    else:
        dist.destroy_process_group()


_n_groups = 0  # process groups this process created: each gets store keys of its own


def _init_group(backend: str) -> bool:
    """`init_process_group` from torchrun's environment; True once the group exists.

    Under torchrun's agent store, every group gets its own key prefix (per restart attempt and per group created
    in this process): the store outlives groups and elastic restarts, and a new group reading an old one's keys
    (a dead worker's address) fails or hangs (pytorch/pytorch#167288). So a group can be created for every fit.
    """
    global _n_groups
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return True
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    prefix = f"looplab/attempt_{attempt}/group_{_n_groups}"
    _n_groups += 1
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size)
    return True
