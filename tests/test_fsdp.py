"""Sharded training (FSDP2) and DDP accumulation under torchrun: real processes, CPU, gloo (runs: fsdp_script.py).

Two launches, shared through module fixtures: `main` (DDP + accumulation, FSDP parity / save / load, FSDP with
clipping, and an uninterrupted checkpointed FSDP run) and `elastic` (a rank dies, torchrun restarts the job and it
resumes from the sharded checkpoint). Every reference is a one-process run of plain looplab in this process.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplab import EMA, FSDP, GradientClip, Learner

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_script import KILL_STEP, make_data, make_model  # noqa: E402
from test_distributed import check, torchrun  # noqa: E402

SCRIPT = Path(__file__).with_name("fsdp_script.py")


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_main")
    check(torchrun(SCRIPT, "main", str(out), timeout=180))
    return out


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_elastic")
    run = torchrun(SCRIPT, "elastic", str(out), flags=("--max-restarts=1",), timeout=180)
    check(run)
    return out, run


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def reference(bs: int, n_epochs: int, opt_func=torch.optim.AdamW, lr: float = 1e-2, cbs=()) -> Learner:
    torch.manual_seed(100)  # rank 0's seed: its initial weights are broadcast
    learn = Learner(make_model(), make_data(bs), F.cross_entropy, opt_func=opt_func, lr=lr, progress=False, cbs=cbs)
    learn.fit(n_epochs)
    return learn


def assert_weights(result: dict, expected: dict, what: str) -> None:
    assert result.keys() == expected.keys(), what
    for name, w in expected.items():
        torch.testing.assert_close(result[name], w, atol=1e-5, rtol=0, msg=f"{what}: {name}")


# ---- DDP + GradientAccumulation ----------------------------------------------------------------------------------
def test_ddp_accumulation_all_reduces_once_per_step_and_equals_the_big_batch(main_run):
    ref = reference(64, 2, torch.optim.SGD, 0.1)  # 2 ranks x bs 16 x 2 micro-batches = 1 process x bs 64
    for rank in (0, 1):
        result = load(main_run / f"ddp_accumulate_rank{rank}.pt")
        assert result["steps"] == 8  # 256 samples / 64 per step x 2 epochs
        assert result["all_reduces"] == result["steps"]  # one bucket, all-reduced once per step (not per micro-batch)
        assert_weights(result["weights"], ref.model.state_dict(), f"rank {rank}")


# ---- FSDP ------------------------------------------------------------------------------------------------------
def test_fsdp_two_processes_give_the_weights_and_valid_loss_of_one_process_with_twice_the_batch(main_run):
    ref = reference(64, 3)
    for rank in (0, 1):
        result = load(main_run / f"fsdp_rank{rank}.pt")
        assert_weights(result["weights"], ref.model.state_dict(), f"rank {rank}")
        assert result["valid"]["valid_loss"] == pytest.approx(ref.recorder.last_validation["valid_loss"], abs=1e-5)
        assert result["losses"] == pytest.approx(ref.recorder.losses, abs=1e-5)  # the global batches' losses
        assert result["n_sharded"] == 4  # three nn.Linear units, then the root


def test_a_schedule_under_fsdp_runs_over_the_global_batches(main_run):
    torch.manual_seed(100)
    ref = Learner(make_model(), make_data(64), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2, progress=False)
    ref.fit_one_cycle(2, 1e-2)
    for rank in (0, 1):
        result = load(main_run / f"fsdp_sched_rank{rank}.pt")
        assert result["lrs"] == pytest.approx(ref.recorder.lrs, rel=1e-12)
        assert_weights(result["weights"], ref.model.state_dict(), f"rank {rank}")


def test_batchnorm_statistics_are_the_same_on_every_rank(main_run):
    ranks = [load(main_run / f"fsdp_bn_rank{rank}.pt")["weights"] for rank in (0, 1)]
    assert "1.running_mean" in ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def test_fsdp_each_rank_holds_its_share_of_the_parameters_after_every_epoch(main_run):
    shares = [load(main_run / f"fsdp_rank{rank}.pt")["shares"] for rank in (0, 1)]
    for rank_shares in shares:
        assert len(rank_shares) == 3 and all(0 < s <= 0.6 for s in rank_shares)
    assert [a + b for a, b in zip(*shares)] == pytest.approx([1.0] * 3)  # together: every element once


def test_after_the_fit_the_model_is_the_users_plain_module_and_the_group_is_gone(main_run):
    for rank in (0, 1):
        result = load(main_run / f"fsdp_rank{rank}.pt")
        assert result["model_type"] == "Sequential"
        assert result["param_types"] == ["Parameter"] and result["opt_state_types"] == ["Tensor"]  # no DTensors
        assert not result["group_after_fit"]


def test_save_during_an_fsdp_fit_writes_the_plain_full_file_a_plain_learner_loads(main_run):
    ref = reference(64, 3)
    saved = load(main_run / "fsdp_saved.pt")  # learn.save after the last epoch, inside the fit (rank 0 wrote it)
    assert list(saved["model"]) == list(make_model().state_dict())  # the plain module's keys, no prefixes
    assert_weights(saved["model"], ref.model.state_dict(), "saved")
    plain = Learner(make_model(), make_data(64), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                    progress=False)
    plain.load(main_run / "fsdp_saved.pt")  # optimizer included
    for p, q in zip(plain.model.parameters(), ref.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(plain.opt.state[p][key], ref.opt.state[q][key], atol=1e-6, rtol=1e-4)


def test_load_of_a_plain_file_into_a_sharded_model_continues_like_a_plain_learner(main_run):
    plain = Learner(make_model(), make_data(64), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                    progress=False)
    plain.load(main_run / "fsdp_saved.pt")
    plain.fit(1)
    for rank in (0, 1):  # ranks that loaded the file into their shards at the start of the fit, then one epoch
        assert_weights(load(main_run / f"fsdp_load_rank{rank}.pt")["weights"], plain.model.state_dict(), "loaded")


def test_gradient_clip_under_fsdp_clips_by_the_global_norm_of_one_process(main_run):
    # FSDP with GradientClip(0.05), GradientAccumulation(2), ActivationCheckpointing: 2 x bs 16 x 2 = bs 64
    ref = reference(64, 2, cbs=[GradientClip(0.05)])
    norms = [v for _, v in ref.recorder.series("grad_norm")]
    assert min(norms) > 0.05  # every step was clipped
    for rank in (0, 1):
        result = load(main_run / f"fsdp_clip_rank{rank}.pt")
        assert result["grad_norm"] == pytest.approx(norms, abs=1e-5)
        assert_weights(result["weights"], ref.model.state_dict(), f"rank {rank}")


def test_bfloat16_policy_and_lr_find_under_fsdp(main_run):
    results = [load(main_run / f"fsdp_bf16_rank{rank}.pt") for rank in (0, 1)]
    assert results[0]["lr_find_losses"] == results[1]["lr_find_losses"]  # the global loss: ranks stop together
    ref = reference(64, 1)  # float32: bfloat16 compute lands near it, and the weights handed back are float32
    for result in results:
        assert all(torch.equal(result["after_lr_find"][k], v) for k, v in result["before"].items())  # undone
        assert all(w.dtype == torch.float32 for w in result["weights"].values())
        assert result["valid"]["valid_loss"] == pytest.approx(ref.recorder.last_validation["valid_loss"], abs=0.05)
        assert not all(torch.equal(result["weights"][k], v) for k, v in result["before"].items())  # it trained


def test_sharded_checkpoints_are_folders_of_shards_and_plain_data(main_run):
    folders = sorted((main_run / "ckpt").iterdir())
    assert [f.name for f in folders] == ["ckpt-00000010.dcp", "ckpt-00000012-epoch-2.dcp", "ckpt-00000012.dcp"]
    newest = folders[1]
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a chunk per rank
    state = torch.load(newest / "state.pt", weights_only=True)  # callbacks, RNG, loop, data: plain data
    assert len(state["rng"]) == 2 and state["loop"]["train_iter"] == 12 and state["shards"] == 2


def test_a_killed_rank_resumes_from_the_sharded_checkpoint_bit_identical(main_run, elastic):
    out, run = elastic
    assert "exitcode  : 3" in run.stdout + run.stderr or "exitcode: 3" in run.stdout + run.stderr
    for rank in (0, 1):
        result = load(out / f"elastic_rank{rank}.pt")
        assert result["attempt"] == 1 and result["resumed_from"].startswith(f"ckpt-{KILL_STEP - 1:08d}")
        uninterrupted = load(main_run / f"ckpt_run_rank{rank}.pt")["weights"]
        for name, w in uninterrupted.items():
            assert torch.equal(result["weights"][name], w), (rank, name)


# ---- in this process ---------------------------------------------------------------------------------------------
def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="modules must be"):
        FSDP(modules=[int])
    with pytest.raises(TypeError, match="mixed_precision"):
        FSDP(mixed_precision="bf16")


def test_ema_is_refused_at_the_start_of_the_fit(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    learn = Learner(nn.Linear(2, 1), make_data(16), F.mse_loss, progress=False, cbs=[FSDP(), EMA()])
    with pytest.raises(ValueError, match="FSDP cannot run with EMA"):
        learn.fit(1)


def test_resuming_on_another_number_of_processes_is_a_clear_error(main_run):
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        learn = Learner(make_model(0.3), make_data(32), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-2,
                        progress=False, cbs=[FSDP(modules=nn.Linear)])
        with pytest.warns(UserWarning, match="parameters are NaN"), \
                pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
            learn.fit(3, resume_from=main_run / "ckpt")
        # nothing could be gathered after a failure; the shapes are back, so a plain checkpoint loads
        assert type(learn.model) is nn.Sequential and all(p.isnan().all() for p in learn.model.parameters())
        learn.load(main_run / "fsdp_saved.pt")
        assert_weights(dict(learn.model.state_dict()), load(main_run / "fsdp_saved.pt")["model"], "loaded")
    finally:
        torch.distributed.destroy_process_group()
