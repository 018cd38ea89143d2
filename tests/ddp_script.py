"""Run by tests/test_distributed.py under torchrun (also imported there for the data and the model).

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_script.py MODE OUT`; every rank works
in OUT/rank{r} (so any file a rank writes lands there) and writes its results to OUT/{name}_rank{r}.pt.
MODE: `train` (data-parallel run with a progress bar, TensorBoard, SaveBest and whole-set metrics, ours and
torchmetrics', then a checkpointed run with dropout), `elastic` (the
checkpointed run, with rank 1 dying at step 5 of the first attempt; restarts resume), `raise` (rank 1 raises).
"""
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from looplab import AUROC, Callback, DataLoaders, F1Score, Learner, SaveBest, TensorBoard

N_TRAIN, N_VALID, N_IN, N_OUT = 161, 75, 8, 3  # 161 = 64 + 64 + 33: an uneven last batch on 2 ranks
KILL_STEP = 5


def make_data(bs: int, n_train: int = N_TRAIN, n_valid: int = N_VALID) -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, N_IN, generator=g)
    y = (x[:, :N_OUT] + 0.5 * torch.randn(len(x), N_OUT, generator=g)).argmax(1)
    return DataLoaders.from_tensors(x[:n_train], y[:n_train], valid=(x[n_train:], y[n_train:]), bs=bs, seed=0)


def make_model(p_drop: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(N_IN, 16), nn.Tanh(), nn.Dropout(p_drop), nn.Linear(16, N_OUT))


class DictSamples(torch.utils.data.Dataset):
    """The same data as `make_data`, as dict samples (the way tokenized Hugging Face datasets yield them)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class DictModel(nn.Module):
    """`make_model`'s network called as `model(**batch)`."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x, labels=None):
        return self.net(x)


def make_dict_data(bs: int) -> DataLoaders:
    dls = make_data(bs)
    return DataLoaders.from_datasets(DictSamples(dls.train.xs[0], dls.train.y), DictSamples(dls.valid.xs[0],
                                     dls.valid.y), bs=bs, seed=0)


def accuracy(pred, y):
    return (pred.argmax(1) == y).float().mean()


class _Die(Callback):
    """Kills this process at training step `step` (the first attempt only), as a crashed worker would."""
    def __init__(self, step: int):
        self.step = step

    def before_batch(self):
        if self.learn.training and self.learn.train_iter == self.step:
            os._exit(3)


class _Raise(Callback):
    def before_batch(self):
        if self.learn.training and self.learn.train_iter == 1:
            raise ValueError("boom from rank 1")


def checkpointed_run(out: Path, rank: int, extra_cbs=()) -> tuple[Learner, str | None]:
    """3 epochs with dropout (so every rank's RNG matters), checkpointing every 2 steps (rank 0 writes)."""
    from looplab.callbacks.checkpoint import Checkpoint
    torch.manual_seed(200 + rank)
    learn = Learner(make_model(0.3), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                    progress=False, cbs=[Checkpoint("ckpt", every_n_steps=2), *extra_cbs])
    ckpt_dir = out / "rank0" / "ckpt"  # every rank restores rank 0's checkpoints
    newest = max(ckpt_dir.glob("ckpt-*.pt"), default=None) if ckpt_dir.is_dir() else None
    learn.fit(3, resume_from=ckpt_dir if newest else None)
    return learn, newest and newest.name


def main(mode: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    workdir = out / f"rank{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if mode == "train":
        torch.manual_seed(100 + rank)  # different inits: DDP must broadcast rank 0's
        from torchmetrics.classification import MulticlassF1Score
        metrics = [accuracy, F1Score(), AUROC(), MulticlassF1Score(num_classes=N_OUT, validate_args=False)]
        learn = Learner(make_model(), make_data(32), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1,
                        metrics=metrics, cbs=[TensorBoard("runs"), SaveBest("best.pt")])
        learn.fit(1)
        learn.fit(1)  # a second fit: the group is created again, the model wrapped again
        found = learn.lr_find(num_it=30)  # its stop rule reads the loss: the ranks must stop together
        torch.save({"weights": learn.model.state_dict(), "valid": learn.recorder.last_validation,
                    "losses": learn.recorder.losses, "lr_find_losses": found.losses,
                    "model_type": type(learn.model).__name__,
                    "group_after_fit": torch.distributed.is_initialized(),
                    "loader_world_sizes": [learn.dls.train.world_size, learn.dls.valid.world_size],
                    "valid_after_fit": learn.validate()}, out / f"equiv_rank{rank}.pt")
        learn, _ = checkpointed_run(out, rank)
        torch.save({"weights": learn.model.state_dict()}, out / f"ckpt_run_rank{rank}.pt")
        torch.manual_seed(100 + rank)  # dict batches: each rank takes its share of every tensor of the batch
        learn = Learner(DictModel(), make_dict_data(32), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1,
                        progress=False)
        learn.fit(2)
        torch.save({"weights": learn.model.state_dict(), "valid": learn.recorder.last_validation},
                   out / f"dict_rank{rank}.pt")
        torch.manual_seed(100 + rank)  # schedules: the fit's length is counted in global batches
        learn = Learner(make_model(), make_data(32), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1,
                        progress=False)
        learn.fit_one_cycle(2, 0.2)
        lengths = [(learn.n_epochs, learn.n_steps)]
        learn.fit_one_cycle(lr_max=0.2, steps=7)  # 3 batches an epoch: epochs 3, the last one cut after 1
        lengths.append((learn.n_epochs, learn.n_steps))
        torch.save({"weights": learn.model.state_dict(), "lrs": learn.recorder.lrs, "lengths": lengths},
                   out / f"sched_rank{rank}.pt")
    elif mode == "elastic":
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        learn, resumed_from = checkpointed_run(out, rank, [_Die(KILL_STEP)] if attempt == 0 and rank == 1 else [])
        torch.save({"weights": learn.model.state_dict(), "attempt": attempt, "resumed_from": resumed_from},
                   out / f"elastic_rank{rank}.pt")
    elif mode == "raise":
        learn = Learner(make_model(), make_data(32), F.cross_entropy, progress=False,
                        cbs=[_Raise()] if rank == 1 else [])
        learn.fit(2)
    else:
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo may abort at interpreter exit after its group is destroyed (torch 2.13): skip that teardown
