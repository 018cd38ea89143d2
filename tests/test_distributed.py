"""Data-parallel training under torchrun: real processes, CPU, gloo (the runs are in tests/ddp_script.py).

Three launches: `train` (the equivalence run and a checkpointed run), `elastic` (a worker dies, torchrun restarts
the job, it resumes) and `raise` (a rank raises). Each starts torch in three processes, so they are shared by the
tests through module fixtures.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

from looplab import Callback, Learner
from looplab.callbacks.distributed import DistributedDataParallel
from looplab.data import DataLoaders, epoch_batches

sys.path.insert(0, str(Path(__file__).parent))
from ddp_script import KILL_STEP, DictModel, accuracy, make_data, make_dict_data, make_model  # noqa: E402

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = Path(__file__).parent.parent


def torchrun(script: Path, *args: str, flags: tuple = (), timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags,
           str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def check(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_train")
    check(torchrun(SCRIPT, "train", str(out), flags=("--tee=3", f"--log-dir={out / 'logs'}")))  # each rank's output in its own file
    return out


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_elastic")
    run = torchrun(SCRIPT, "elastic", str(out), flags=("--max-restarts=1",))
    check(run)
    return out, run


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ---- 2 processes x bs 32 == 1 process x bs 64 ----------------------------------------------------------------
def test_two_processes_give_the_weights_of_one_process_with_twice_the_batch(trained):
    torch.manual_seed(100)  # rank 0's seed: DDP broadcasts rank 0's initial weights
    ref = Learner(make_model(), make_data(64), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1, progress=False)
    ref.fit(2)  # 161 samples: batches 64, 64 and an uneven 33 (16 + 17 on two ranks)
    for rank in (0, 1):
        result = load(trained / f"equiv_rank{rank}.pt")
        for name, w in ref.model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], w, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")
        # the recorded training losses are the global batches' (the second fit's three steps), on every rank
        assert result["losses"] == pytest.approx(ref.recorder.losses[3:], abs=1e-6)


def test_dict_batches_are_shared_out_like_pairs(trained):
    """2 ranks x bs 32 of dict samples (model(**batch), yb = batch["labels"]) = 1 process x bs 64."""
    torch.manual_seed(100)
    ref = Learner(DictModel(), make_dict_data(64), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1, progress=False)
    ref.fit(2)
    for rank in (0, 1):
        result = load(trained / f"dict_rank{rank}.pt")
        for name, w in ref.model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], w, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")
        assert result["valid"]["valid_loss"] == pytest.approx(ref.recorder.last_validation["valid_loss"], abs=1e-5)


def test_schedules_run_over_the_global_batches(trained):
    """fit_one_cycle by epochs and by steps under DDP = one process x bs 64: the fit's length (n_steps, n_epochs)
    is counted in global batches, so every step gets the one-process lr."""
    torch.manual_seed(100)
    ref = Learner(make_model(), make_data(64), F.cross_entropy, opt_func=torch.optim.SGD, lr=0.1, progress=False)
    ref.fit_one_cycle(2, 0.2)
    lengths = [(ref.n_epochs, ref.n_steps)]
    ref.fit_one_cycle(lr_max=0.2, steps=7)
    lengths.append((ref.n_epochs, ref.n_steps))
    assert lengths == [(2, 6), (3, 7)]
    for rank in (0, 1):
        result = load(trained / f"sched_rank{rank}.pt")
        assert result["lengths"] == lengths
        assert result["lrs"] == pytest.approx(ref.recorder.lrs, rel=1e-12)
        for name, w in ref.model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], w, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")


def test_every_rank_sees_the_same_training_loss_so_lr_find_stops_together(trained):
    losses = [load(trained / f"equiv_rank{rank}.pt")["lr_find_losses"] for rank in (0, 1)]
    assert len(losses[0]) > 3 and losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_valid_loss_and_metrics_are_the_full_dataset_values_on_every_rank(trained):
    weights = load(trained / "equiv_rank0.pt")["weights"]
    model = make_model()
    model.load_state_dict(weights)
    valid = make_data(64).valid  # 75 samples: each rank validated its share (32 + 5 and 32 + 6); the metric
    #                              objects (ours and torchmetrics') combined their state across the ranks
    x, y = valid.xs[0], valid.y
    with torch.no_grad():
        pred = model(x)
    expected = {"valid_loss": F.cross_entropy(pred, y).item(), "accuracy": accuracy(pred, y).item(),
                "F1Score": f1_score(y, pred.argmax(1), average="macro"),
                "MulticlassF1Score": f1_score(y, pred.argmax(1), average="macro"),
                "AUROC": roc_auc_score(y, pred.softmax(1), multi_class="ovr")}
    for rank in (0, 1):
        result = load(trained / f"equiv_rank{rank}.pt")
        for key, value in expected.items():
            assert result["valid"][key] == pytest.approx(value, abs=1e-6), (rank, key)
            # after the fit the loaders are whole again: validate() sees every sample on each rank
            assert result["valid_after_fit"][key] == pytest.approx(value, abs=1e-6), (rank, key)


def test_after_fit_the_model_is_the_users_module_and_the_loaders_are_unsharded(trained):
    for rank in (0, 1):
        result = load(trained / f"equiv_rank{rank}.pt")
        assert result["model_type"] == "Sequential"
        assert result["loader_world_sizes"] == [1, 1]
        assert not result["group_after_fit"]  # the group this callback created is torn down after each fit


def test_only_rank_0_writes_files_and_shows_progress(trained):
    rank1 = [p for p in (trained / "rank1").rglob("*") if p.is_file()]
    assert rank1 == []  # TensorBoard, SaveBest and Checkpoint were given the same relative paths on both ranks
    assert list((trained / "rank0" / "runs").glob("events.out.tfevents.*"))
    assert (trained / "rank0" / "best.pt").is_file()
    assert list((trained / "rank0" / "ckpt").glob("ckpt-*.pt"))
    logs = {rank: next((trained / "logs").rglob(f"attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)}
    assert "epoch 0 train" in logs[0] and "epoch 0 train" not in logs[1]


def test_checkpoints_hold_every_ranks_rng_state(trained):
    newest = max((trained / "rank0" / "ckpt").glob("ckpt-*.pt"))
    rng = load(newest)["rng"]
    assert len(rng) == 2  # the ranks were seeded differently, so their states differ
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])


# ---- elastic restart -------------------------------------------------------------------------------------------
def test_killed_worker_is_restarted_and_resumes_bit_identical(trained, elastic):
    out, run = elastic
    assert "exitcode  : 3" in run.stdout + run.stderr or "exitcode: 3" in run.stdout + run.stderr
    for rank in (0, 1):
        result = load(out / f"elastic_rank{rank}.pt")
        assert result["attempt"] == 1  # the run that finished is torchrun's restart
        assert result["resumed_from"] == f"ckpt-{KILL_STEP - 1:08d}.pt"  # the newest before the kill
        uninterrupted = load(trained / f"ckpt_run_rank{rank}.pt")["weights"]
        for name, w in uninterrupted.items():
            assert torch.equal(result["weights"][name], w), (rank, name)


# ---- errors ----------------------------------------------------------------------------------------------------
def test_a_rank_that_raises_takes_the_job_down_with_its_traceback(tmp_path):
    t0 = time.perf_counter()
    run = torchrun(SCRIPT, "raise", str(tmp_path), timeout=90)
    assert run.returncode != 0
    assert "ValueError: boom from rank 1" in run.stdout + run.stderr
    assert time.perf_counter() - t0 < 90


def test_plain_iterables_are_refused_with_a_clear_error():
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    learn = Learner(torch.nn.Linear(2, 1), ([(x, y)], None), F.mse_loss, progress=False,
                    cbs=[DistributedDataParallel()])
    with pytest.raises(TypeError, match="from_tensors"):
        learn.fit(1)


def test_fewer_samples_than_ranks_is_a_clear_error():
    dls = DataLoaders.from_tensors(torch.randn(3, 2), torch.randn(3), valid_pct=0.5)
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        dls.train.set_distributed(0, 4)


@pytest.mark.parametrize("n", [129, 130, 131, 161])
def test_ranks_batches_k_together_are_the_one_process_batch_k(n):
    """Training: every rank the same number of non-empty batches (a tail smaller than the world is dropped).
    Validation: every sample exactly once."""
    world, bs = 3, 16
    one = epoch_batches(n, bs * world, seed=0, epoch=1, shuffle=True, drop_last=False)
    train = [epoch_batches(n, bs, 0, 1, True, False, rank, world, even=True) for rank in range(world)]
    assert len({len(b) for b in train}) == 1 and all(len(idx) for b in train for idx in b)
    for k in range(len(train[0])):
        assert torch.equal(torch.cat([b[k] for b in train]), one[k])
    assert len(train[0]) == len(one) - (0 < n % (bs * world) < world)
    valid = [epoch_batches(n, bs, 0, 1, False, False, rank, world, even=False) for rank in range(world)]
    assert sorted(torch.cat([idx for b in valid for idx in b]).tolist()) == list(range(n))


def test_example_runs_under_torchrun(tmp_path):
    run = torchrun(REPO / "examples" / "ddp.py", "--epochs=1", f"--out={tmp_path}")
    check(run)
    assert "2 process(es) x bs 64: valid_loss" in run.stdout
    assert (tmp_path / "final.pt").is_file()


# ---- in this process, with a one-process gloo group of the user's --------------------------------------------
@pytest.fixture
def user_group():
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


class _SeeModel(Callback):
    def __init__(self, fail: bool = False):
        self.fail, self.seen = fail, []

    def after_batch(self):
        model = self.learn.model
        self.seen.append((type(model), getattr(model, "bucket_bytes_cap", None)))
        if self.fail:
            raise RuntimeError("fit failed")


def test_wraps_once_during_fit_and_gives_the_module_back(user_group):
    model = torch.nn.Linear(2, 1)
    dls = DataLoaders.from_tensors(torch.randn(16, 2), torch.randn(16, 1), bs=4)
    mine = DistributedDataParallel(bucket_cap_mb=1)  # kwargs for torch's DDP
    learn = Learner(model, dls, F.mse_loss, progress=False, cbs=[DistributedDataParallel()])  # as torchrun's
    see = _SeeModel()
    learn.fit(1, cbs=[mine, see])
    assert set(see.seen) == {(torch.nn.parallel.DistributedDataParallel, 2**20)}  # the configured one, once
    assert learn.model is model and torch.distributed.is_initialized()  # the user's group is kept
    assert learn.recorder.reduce_valid_sums is None
    with pytest.raises(RuntimeError, match="fit failed"):
        learn.fit(1, cbs=[_SeeModel(fail=True)])
    assert learn.model is model and len(dls.train) == 4  # after_fit ran: module back, loaders whole
    assert torch.distributed.is_initialized()  # and the user's group is still the user's
    learn.fit(1)
    assert learn.model is model and len(dls.train) == 4


def test_a_model_the_user_wrapped_is_not_wrapped_again(user_group):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    dls = DataLoaders.from_tensors(torch.randn(16, 2), torch.randn(16, 1), bs=4, valid_pct=0.25)
    learn = Learner(wrapped, dls, F.mse_loss, opt_func=torch.optim.SGD, lr=0.1, progress=False,
                    cbs=[DistributedDataParallel()])
    models = []

    class SeeModel(Callback):
        def after_batch(self):
            models.append(self.learn.model)

    before = model.weight.detach().clone()
    learn.fit(2, cbs=[SeeModel()])
    assert models and all(m is wrapped for m in models)  # the user's wrapper itself, not a wrapper of it
    assert learn.model is wrapped  # after the fit: the object the user gave
    assert not torch.equal(model.weight, before)  # and it trained
    with pytest.raises(RuntimeError, match="fit failed"):
        learn.fit(1, cbs=[_SeeModel(fail=True)])
    assert learn.model is wrapped


@pytest.fixture
def torchrun_env(monkeypatch):
    """torchrun's environment for one process, so that the callback creates (and owns) the process group."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("error", [RuntimeError("fit failed"), KeyboardInterrupt()])
def test_a_fit_that_raises_is_undone_without_a_barrier(torchrun_env, monkeypatch, error):
    """The other ranks may be stuck in a collective: a barrier would hang. The group this callback created is
    dropped locally, the model and the loaders are given back, and the next fit works."""
    barriers = []
    real_barrier = torch.distributed.barrier
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))
    model = torch.nn.Linear(2, 1)
    dls = DataLoaders.from_tensors(torch.randn(16, 2), torch.randn(16, 1), bs=4, valid_pct=0.25)
    learn = Learner(model, dls, F.mse_loss, progress=False, cbs=[DistributedDataParallel()])
    sharded = []

    class Fail(Callback):
        def after_batch(self):
            sharded.append((type(self.learn.model), self.learn.dls.train.world_size))
            raise error

    with pytest.raises(type(error)) as raised:
        learn.fit(1, cbs=[Fail()])
    assert raised.value is error
    assert sharded == [(torch.nn.parallel.DistributedDataParallel, 1)]
    assert learn.model is model and learn.recorder.reduce_valid_sums is None
    assert barriers == [] and not torch.distributed.is_initialized()  # dropped, without waiting for anyone
    learn.fit(1)  # a new group, and on success the usual barrier before tearing it down
    assert learn.model is model and barriers == [1] and not torch.distributed.is_initialized()
