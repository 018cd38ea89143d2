"""Sharded (FSDP) state: gather it into the plain format, shard plain state into it, and sharded checkpoints.

Under `looplab.callbacks.FSDP` every parameter is a DTensor holding this rank's shard, and so is every optimizer
state tensor shaped like its parameter (AdamW's moments). Three ways the state leaves or enters that form:

- `gather_model_state` / `gather_optimizer_state` (collectives): the plain `state_dict()` formats, full tensors, so
  `learn.save` under FSDP writes the file a plain Learner reads, and the FSDP callback hands back full weights.
- `load_full_state`: a plain (full) model / optimizer state into the sharded model and optimizer: each rank keeps
  its own chunk of each full tensor (`distribute_tensor` without communication: every rank has the full tensor).
- Sharded checkpoints (`write_sharded`, `read_sharded`, `load_sharded`): one folder per write. Model, optimizer
  and gradient tensors go through `torch.distributed.checkpoint` (DCP), each rank writing its own chunks; the
  plain rest (callbacks, every rank's RNG, loop, data position, optimizer hyper-parameters) is `state.pt`, read
  with `weights_only=True` (DCP's own loader would unpickle non-tensor objects with `weights_only=False`). The
  folder is written under a temporary name and renamed once every rank finished, so a crash mid-write never
  leaves a folder that `resume_from` would take. Only DCP's `.metadata` (tensor shapes and chunk offsets) is
  read with pickle, by DCP itself.

The optimizer's state is converted here rather than by `torch.distributed.checkpoint.state_dict`'s
`get_optimizer_state_dict`, which initialises an optimizer without state by taking a step (with lr 0): that
changes Adam's step count, so a save before the first step would change the training.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_sharded", "gather_model_state", "gather_optimizer_state", "load_full_state", "write_sharded",
           "read_sharded", "load_sharded", "check_world_size", "remove_stale_folders"]

STATE_FILE = "state.pt"  # the plain part of a sharded checkpoint folder
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^.+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmpdir$")
STALE_AFTER = 24 * 3600


def _dtensor_type():
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Does `model` hold DTensor parameters (FSDP's shards)?"""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full(t, to_cpu: bool):
    """The full tensor of a DTensor (a collective), a plain tensor as it is; on the CPU with `to_cpu`."""
    DTensor = _dtensor_type()
    if isinstance(t, DTensor):
        local, mesh = t.to_local(), t.device_mesh
        if local.device.type != mesh.device_type:  # CPU-offloaded shards under nccl: gather on the accelerator
            t = DTensor.from_local(local.to(mesh.device_type), mesh, t.placements, shape=t.shape, stride=t.stride())
        t = t.full_tensor()
    return t.cpu() if to_cpu and isinstance(t, torch.Tensor) else t


def gather_model_state(model: nn.Module, to_cpu: bool = True) -> dict:
    """`model.state_dict()` with full tensors, on every rank (a collective: every rank calls it)."""
    return {k: _full(v, to_cpu) for k, v in model.state_dict().items()}


def gather_optimizer_state(opt: torch.optim.Optimizer, to_cpu: bool = True) -> dict:
    """`opt.state_dict()` with full tensors, on every rank (a collective): what the plain optimizer would hold."""
    saved = opt.state_dict()
    state = {i: {k: _full(v, to_cpu) for k, v in entries.items()} for i, entries in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def _params(opt: torch.optim.Optimizer) -> list:
    """The optimizer's parameters in the order of its state dict's indices."""
    return [p for group in opt.param_groups for p in group["params"]]


def _shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's chunk of `full` placed as `param`'s (a DTensor); no communication (every rank has `full`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    local = param.to_local()
    chunk = distribute_tensor(full.to(local.device), param.device_mesh, param.placements, src_data_rank=None)
    # a storage of its own: a view would keep the full tensor alive
    # (on the shard's own device: distribute_tensor moves it to the mesh's, e.g. cuda, also for CPU-offloaded shards)
    return DTensor.from_local(chunk.to_local().to(local.device, copy=True), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())


def shard_optimizer_state(saved: dict, opt: torch.optim.Optimizer) -> dict:
    """A plain optimizer state dict with every tensor shaped like its (sharded) parameter made that rank's chunk."""
    DTensor, params = _dtensor_type(), _params(opt)
    state = {}
    for i, entries in saved["state"].items():
        p = params[int(i)]
        state[i] = {k: _shard_like(v, p) if isinstance(p, DTensor) and isinstance(v, torch.Tensor)
                    and v.shape == p.shape and v.ndim > 0 else v for k, v in entries.items()}
    return {"state": state, "param_groups": saved["param_groups"]}


@torch.no_grad()
def load_full_state(model: nn.Module, model_state: dict, opt: torch.optim.Optimizer | None = None,
                    opt_state: dict | None = None) -> None:
    """Load plain (full) states into a sharded model and, given both, its optimizer. Checked by the caller."""
    DTensor = _dtensor_type()
    own = model.state_dict()  # sharded parameters (views of the shards) and plain buffers
    for k, target in own.items():
        if isinstance(target, DTensor):
            target.to_local().copy_(_shard_like(model_state[k], target).to_local())
        else:
            target.copy_(model_state[k])
    if opt is not None and opt_state is not None:
        opt.load_state_dict(shard_optimizer_state(opt_state, opt))


# ---- sharded checkpoints -------------------------------------------------------------------------------------
def _split(state: dict) -> tuple[dict, dict]:
    """A `training_state` -> (tensors for DCP, flat keys), (the plain rest, with the optimizer's non-tensors)."""
    tensors = {f"model/{k}": v for k, v in state["model"].items()}
    tensors.update({f"grads/{k}": v for k, v in state["grads"].items()})
    opt_plain = {}
    for i, entries in state["opt"]["state"].items():
        opt_plain[int(i)] = {}
        for k, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{i}/{k}"] = v
            else:
                opt_plain[int(i)][k] = v
    plain = {k: v for k, v in state.items() if k not in ("model", "opt", "grads")}
    plain.update(opt_groups=state["opt"]["param_groups"], opt_plain=opt_plain, model_keys=list(state["model"]),
                 grad_keys=list(state["grads"]), shards=dist.get_world_size())
    return tensors, plain


def write_sharded(state: dict, path: str | os.PathLike) -> Path:
    """Write a `training_state` of a sharded model as the folder `path` (a collective: every rank calls it).

    Every rank writes its chunks into a temporary folder named by rank 0; rank 0 adds `state.pt`; after a barrier
    (every rank finished) rank 0 renames the folder to `path`, replacing an older one of that name.
    """
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    names = [f"{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmpdir"]
    dist.broadcast_object_list(names, src=0)  # one temporary for all ranks: rank 0's
    tmp = path.with_name(names[0])
    tensors, plain = _split(state)
    rank0 = dist.get_rank() == 0
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))
        if rank0:
            torch.save(plain, tmp / STATE_FILE)
        dist.barrier()  # every rank's chunks are complete
        if rank0:
            if path.exists():  # a rewrite of the same position: the new one replaces it
                # moved aside under a temporary's name: if a crash leaves it there, a later writer removes it
                old = path.with_name(f"{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmpdir")
                os.replace(path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _meta_like(size, dtype) -> torch.Tensor:
    return torch.empty(tuple(size), dtype=dtype, device="meta")


def read_sharded(folder: str | os.PathLike) -> dict:
    """The checkpoint in `folder` as `training_state` wrote it, its tensors as meta placeholders (shape and dtype
    only, for the checks): `load_sharded` reads them. Only the plain part is read (`weights_only=True`)."""
    import torch.distributed.checkpoint as dcp

    from .io import safe_load
    folder = Path(folder)
    plain = safe_load(folder / STATE_FILE, map_location="cpu")
    if not isinstance(plain, dict) or not {"opt_groups", "opt_plain", "model_keys", "grad_keys"} <= set(plain):
        raise ValueError(f"{str(folder)!r} is not a looplab sharded checkpoint (its {STATE_FILE} is not one)")
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    except Exception as e:
        raise ValueError(f"{str(folder)!r}: its tensors' metadata does not load ({type(e).__name__}: {e})") from e

    def placeholder(key: str) -> torch.Tensor:
        md = metadata.get(key)
        if md is None or not hasattr(md, "size"):
            raise ValueError(f"{str(folder)!r} is incomplete: it holds no tensor {key!r}")
        return _meta_like(md.size, md.properties.dtype)

    opt_state = {}
    for i, entries in plain["opt_plain"].items():
        tensor_keys = [key.split("/", 2)[2] for key in metadata if key.startswith(f"opt/{i}/")]
        opt_state[int(i)] = {**entries, **{k: placeholder(f"opt/{i}/{k}") for k in tensor_keys}}
    state = {k: v for k, v in plain.items() if k not in ("opt_groups", "opt_plain", "model_keys", "grad_keys")}
    state.update(model={k: placeholder(f"model/{k}") for k in plain["model_keys"]},
                 grads={k: placeholder(f"grads/{k}") for k in plain["grad_keys"]},
                 opt={"state": opt_state, "param_groups": plain["opt_groups"]})
    return state


def check_world_size(folder: str | os.PathLike, state: dict, model: nn.Module) -> None:
    """Raise a ValueError naming both sizes unless `state` (read from a sharded `folder`) loads into `model` here."""
    shards = state.get("shards")
    if not is_sharded(model):
        raise ValueError(f"{str(folder)!r} is a sharded (FSDP) checkpoint of {shards} processes: resume it with "
                         f"the FSDP callback under torchrun with {shards} processes")
    here = dist.get_world_size()
    if shards != here:
        raise ValueError(f"{str(folder)!r} was written by {shards} processes, this run has {here}: a sharded "
                         f"checkpoint resumes exactly on the same number of processes only")


@torch.no_grad()
def load_sharded(folder: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load the model, optimizer and gradients of the sharded checkpoint `folder` (checked by `read_sharded`'s
    caller) into the sharded `model` and `opt`, each rank its own chunks (a collective)."""
    import torch.distributed.checkpoint as dcp
    DTensor = _dtensor_type()
    own = model.state_dict()
    targets = {f"model/{k}": own[k] for k in state["model"]}  # the parameters' shards themselves: loaded in place
    params = dict(model.named_parameters())
    grads = {k: torch.zeros_like(params[k]) for k in state["grads"]}
    targets.update({f"grads/{k}": g for k, g in grads.items()})
    opt_params = _params(opt)
    opt_state = {}
    for i, entries in state["opt"]["state"].items():
        p = opt_params[int(i)]
        opt_state[i] = {}
        for k, v in entries.items():
            if isinstance(v, torch.Tensor) and v.is_meta:
                like_param = isinstance(p, DTensor) and v.ndim > 0 and v.shape == p.shape
                v = torch.zeros_like(p, dtype=v.dtype) if like_param else torch.zeros(v.shape, dtype=v.dtype)
                targets[f"opt/{i}/{k}"] = v
            opt_state[i][k] = v
    dcp.load(targets, storage_reader=dcp.FileSystemReader(folder))
    opt.load_state_dict({"state": opt_state, "param_groups": state["opt"]["param_groups"]})
    for k, p in params.items():
        p.grad = grads.get(k)


def remove_stale_folders(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint folders of dead writers in `folder` (rank 0's process gone from this host, or
    older than `STALE_AFTER`); returns them. For writers only."""
    stale = []
    for tmp in Path(folder).glob("ckpt-*.tmpdir"):
        m = _TEMPORARY.match(tmp.name)
        try:
            old = time.time() - tmp.stat().st_mtime > STALE_AFTER
        except FileNotFoundError:
            continue
        if old or (m is not None and m["host"] == _HOST and not _alive(int(m["pid"]))):
            shutil.rmtree(tmp, ignore_errors=True)
            stale.append(tmp)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
