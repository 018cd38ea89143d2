"""Run by tests/test_fsdp.py under torchrun (also imported there for the data and the model).

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_script.py MODE OUT`; every rank works
in OUT/rank{r} and writes its results to OUT/{name}_rank{r}.pt. MODE: `main` (DDP with accumulation; FSDP parity,
save and load; FSDP with clipping, accumulation and activation checkpointing; bfloat16 and lr_find; a
checkpointed FSDP run), `elastic` (the checkpointed FSDP run, rank 1 dying at step KILL_STEP of the first
attempt; the restart resumes).
Ends with `exit_cleanly()`: gloo may abort at interpreter exit after its group is destroyed (torch 2.13).
"""
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ddp_script  # (next to this file: on sys.path when run as a script, and in the tests)
from looplab import (FSDP, ActivationCheckpointing, Callback, Checkpoint, DataLoaders, GradientAccumulation,
                     GradientClip, Learner)

N_TRAIN, N_VALID, N_IN, N_OUT = 256, 70, 8, 3
KILL_STEP = 5


def make_data(bs: int) -> DataLoaders:
    return ddp_script.make_data(bs, N_TRAIN, N_VALID)  # the same data, 256 samples: even batches on 2 ranks


def make_model(p_drop: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(N_IN, 32), nn.Tanh(), nn.Dropout(p_drop), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, N_OUT))


def exit_cleanly(code: int = 0) -> None:
    """Flush and leave without the interpreter's teardown: gloo can abort there after destroy_process_group."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Shares(Callback):
    """After each epoch: the fraction of the parameters' elements this rank holds; the parameters' types."""
    def __init__(self):
        self.shares = []

    def after_epoch(self):
        params = list(self.learn.model.parameters())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        self.shares.append(local / sum(p.numel() for p in params))


class _SaveAtEnd(Callback):
    """`learn.save` during the fit (collective under FSDP), after the last epoch."""
    def __init__(self, path: Path):
        self.path = path

    def after_epoch(self):
        if self.learn.epoch + 1 == self.learn.n_epochs:
            self.learn.save(self.path)


class _LoadAtStart(Callback):
    """`learn.load` into the sharded model, at the start of the fit's training."""
    def __init__(self, path: Path):
        self.path = path

    def before_train(self):
        if self.learn.epoch == 0:
            self.learn.load(self.path)


class _CountAllReduces(Callback):
    """Counts DDP's gradient all-reduces (comm-hook calls) and the optimizer's steps."""
    def __init__(self):
        self.all_reduces = self.steps = 0

    def before_fit(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.all_reduces += 1
            return allreduce_hook(state, bucket)

        self.learn.model.register_comm_hook(None, hook)
        self._handle = self.learn.opt.register_step_post_hook(lambda *a: setattr(self, "steps", self.steps + 1))

    def after_fit(self):
        self._handle.remove()


class _Die(Callback):
    def __init__(self, step: int):
        self.step = step

    def before_batch(self):
        if self.learn.training and self.learn.train_iter == self.step:
            os._exit(3)


def plain(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpointed_run(out: Path, rank: int, extra_cbs=()) -> tuple[Learner, str | None]:
    """FSDP, 3 epochs with dropout (every rank's RNG matters), a sharded checkpoint every 2 steps."""
    torch.manual_seed(200 + rank)
    ckpt = out / "ckpt"  # one folder for all ranks: each writes its shards into it
    learn = Learner(make_model(0.3), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                    progress=False, cbs=[FSDP(modules=nn.Linear), Checkpoint(ckpt, every_n_steps=2), *extra_cbs])
    newest = max(ckpt.glob("ckpt-*.dcp"), default=None) if ckpt.is_dir() else None
    learn.fit(3, resume_from=ckpt if newest else None)
    return learn, newest and newest.name


def main(mode: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    workdir = out / f"rank{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if mode == "main":
        # DDP (the Learner adds it) with accumulation: 2 ranks x bs 16 x 2 micro-batches = 1 process x bs 64
        torch.manual_seed(100 + rank)
        count = _CountAllReduces()
        learn = Learner(make_model(), make_data(16), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1,
                        progress=False, cbs=[GradientAccumulation(2), count])
        learn.fit(2)
        torch.save({"weights": plain(learn.model), "all_reduces": count.all_reduces, "steps": count.steps},
                   out / f"ddp_accumulate_rank{rank}.pt")

        # FSDP parity: 2 ranks x bs 32 = 1 process x bs 64; learn.save during the fit; shares per epoch
        torch.manual_seed(100 + rank)  # different inits: rank 0's are broadcast
        shares = _Shares()
        fsdp = FSDP(modules=nn.Linear)
        learn = Learner(make_model(), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                        progress=False, cbs=[fsdp, shares, _SaveAtEnd(out / "fsdp_saved.pt")])
        learn.fit(3)
        torch.save({"weights": plain(learn.model), "valid": learn.recorder.last_validation,
                    "shares": shares.shares, "n_sharded": fsdp.n_sharded, "model_type": type(learn.model).__name__,
                    "param_types": sorted({type(p).__name__ for p in learn.model.parameters()}),
                    "opt_state_types": sorted({type(v).__name__ for s in learn.opt.state.values() for v in s.values()}),
                    "group_after_fit": torch.distributed.is_initialized(), "losses": learn.recorder.losses},
                   out / f"fsdp_rank{rank}.pt")

        # learn.load of that plain file into a sharded model, then one more epoch (optimizer state included)
        torch.manual_seed(300 + rank)
        learn = Learner(make_model(), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                        progress=False, cbs=[FSDP(modules=nn.Linear), _LoadAtStart(out / "fsdp_saved.pt")])
        learn.fit(1)
        torch.save({"weights": plain(learn.model)}, out / f"fsdp_load_rank{rank}.pt")

        # clipping by the global norm, with accumulation and activation checkpointing: 2 x bs 16 x 2 = bs 64
        torch.manual_seed(100)
        learn = Learner(make_model(), make_data(16), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                        progress=False, cbs=[FSDP(modules=nn.Linear), GradientClip(0.05), GradientAccumulation(2),
                                             ActivationCheckpointing(nn.Linear)])
        learn.fit(2)
        torch.save({"weights": plain(learn.model), "grad_norm": [v for _, v in learn.recorder.series("grad_norm")]},
                   out / f"fsdp_clip_rank{rank}.pt")

        # bfloat16 through FSDP2's MixedPrecisionPolicy; lr_find under FSDP puts the weights back
        torch.manual_seed(100)
        learn = Learner(make_model(), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                        progress=False, cbs=[FSDP(modules=nn.Linear, mixed_precision=torch.bfloat16)])
        before = plain(learn.model)
        found = learn.lr_find(num_it=8)
        after_lr_find = plain(learn.model)
        learn.fit(1)
        torch.save({"before": before, "after_lr_find": after_lr_find, "lr_find_losses": found.losses,
                    "weights": plain(learn.model), "valid": learn.recorder.last_validation},
                   out / f"fsdp_bf16_rank{rank}.pt")

        # a schedule: the fit's length is counted in global batches
        torch.manual_seed(100)
        learn = Learner(make_model(), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                        progress=False, cbs=[FSDP(modules=nn.Linear)])
        learn.fit_one_cycle(2, 1e-2)
        torch.save({"weights": plain(learn.model), "lrs": learn.recorder.lrs}, out / f"fsdp_sched_rank{rank}.pt")

        # BatchNorm statistics: rank 0's on every rank (as DDP's broadcast_buffers), so one copy holds them all
        torch.manual_seed(100 + rank)
        bn = nn.Sequential(nn.Linear(N_IN, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, N_OUT))
        learn = Learner(bn, make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2, progress=False,
                        cbs=[FSDP(modules=nn.Linear)])
        learn.fit(2)
        torch.save({"weights": plain(learn.model)}, out / f"fsdp_bn_rank{rank}.pt")

        learn, _ = checkpointed_run(out, rank)
        torch.save({"weights": plain(learn.model)}, out / f"ckpt_run_rank{rank}.pt")
    elif mode == "elastic":
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        learn, resumed_from = checkpointed_run(out, rank, [_Die(KILL_STEP)] if attempt == 0 and rank == 1 else [])
        torch.save({"weights": plain(learn.model), "attempt": attempt, "resumed_from": resumed_from},
                   out / f"elastic_rank{rank}.pt")
    else:
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_cleanly()
