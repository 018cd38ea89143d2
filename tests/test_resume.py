"""Exact resume: a run killed anywhere and resumed ends bit-identical to a run never interrupted.

The subprocess runs (tests/resume_script.py) train with shuffling, dropout, MixedPrecision float16, MixUp,
GradientClip, a one-cycle schedule and an augmenting dataset loaded by two workers. The reference is the same
script run once without any checkpointing. The in-process tests cover the file handling: refusing pickles that
run code, missing paths, damaged files, finished runs, rotation, gradient accumulation mid-window.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from looplab import Callback, CancelFit, DataLoaders, Learner
from looplab.callbacks import (EMA, SWA, EarlyStopping, GradientAccumulation, GradientClip, MixedPrecision, MixUp,
                               ReduceLROnPlateau, TerminateOnNaN)
from looplab.callbacks.checkpoint import FORMAT, Checkpoint, checkpoint_files

SCRIPT = Path(__file__).with_name("resume_script.py")
ROOT = Path(__file__).parent.parent


def start(tmp_path, *args):
    """Start the script with output to files (not pipes: dying data workers must not hold up the test)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=out, stderr=err, env=env,
                                cwd=tmp_path)


def run(tmp_path, *args, rc=0):
    proc = start(tmp_path, *args)
    try:
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert code == rc, f"{args}: exit status {code}, expected {rc}\n{stdout}\n{stderr}"
    return stdout, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run(tmp, tmp / "ref.pt")
    return torch.load(tmp / "ref.pt", weights_only=True)


def assert_same_run(result_file, reference):
    got = torch.load(result_file, weights_only=True)
    assert got["train_iter"] == reference["train_iter"] == 15
    for name, w in reference["model"].items():
        assert torch.equal(got["model"][name], w), name
    assert torch.equal(got["losses"], reference["losses"])  # every step's loss, the resumed ones included
    strip = lambda history: [{k: v for k, v in row.items() if k != "time"} for row in history]
    assert strip(got["history"]) == strip(reference["history"])


def test_killed_mid_epoch_and_at_an_epoch_end_resumes_bit_identical(tmp_path, reference):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    common = (out, "--ckpt", ckpt, "--every", 3)
    run(tmp_path, *common, "--exit-at", 4, rc=3)  # mid-epoch 0, a step after the checkpoint at step 3
    run(tmp_path, *common, "--resume", "--exit-after-epoch", 1, rc=3)  # right after epoch 1's checkpoint
    run(tmp_path, *common, "--resume", "--exit-at", 14, rc=3)  # mid-epoch 2, two steps after step 12's
    assert not out.exists()
    run(tmp_path, *common, "--resume")
    assert_same_run(out, reference)


def test_sigterm_saves_stops_cleanly_and_resumes_bit_identical(tmp_path, reference):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    # step 10 is the last batch of epoch 1: the resumed run starts with that epoch's validation
    stdout, stderr = run(tmp_path, out, "--ckpt", ckpt, "--sigterm-at", 10)
    assert "SIGTERM: stopped after 10 steps" in stdout and str(ckpt / "ckpt-00000010.pt") in stdout
    assert "Traceback" not in stderr
    assert torch.load(out, weights_only=True)["train_iter"] == 10  # the fit returned there: 10 batches done
    run(tmp_path, out, "--ckpt", ckpt, "--resume")
    assert_same_run(out, reference)


def test_sigkill_at_random_moments_leaves_only_loadable_checkpoints(tmp_path, reference):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    rng = random.Random()
    delays = []
    for _ in range(3):
        args = [out, "--ckpt", ckpt, "--every", 1, "--slow", 0.02] + (["--resume"] if checkpoint_files(ckpt) else [])
        proc = start(tmp_path, *args)
        try:
            deadline = time.monotonic() + 60
            while "started" not in (tmp_path / "stdout.txt").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
                time.sleep(0.02)
            delays.append(rng.uniform(0.0, 0.4))
            time.sleep(delays[-1])
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        for file in checkpoint_files(ckpt):  # never a half-written file under a checkpoint's name
            state = torch.load(file, weights_only=True)
            assert state["format"] == FORMAT, (file, delays)
    run(tmp_path, *[out, "--ckpt", ckpt, "--every", 1] + (["--resume"] if checkpoint_files(ckpt) else []))
    assert not list(ckpt.glob("*.tmp"))
    assert_same_run(out, reference)


# ---- in-process: the files themselves ---------------------------------------------------------------------------

def make_learner(cbs=(), seed=0, n=40, bs=8):
    """The same data every time; `seed` sets the initial weights and the global RNG (dropout)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    dls = DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=bs, seed=3)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    return Learner(model, dls, nn.MSELoss(), lr=1e-2, cbs=list(cbs), progress=False)


def weights(learn):
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def assert_equal_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StopAt(Callback):
    """Interrupt a fit after training step `step` (after Checkpoint has saved it)."""
    order = 99

    def __init__(self, step):
        self.step = step

    def after_batch(self):
        if self.learn.training and self.learn.train_iter + 1 == self.step:
            raise CancelFit()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "ckpts" / "ckpt-00000005.pt"
    evil.parent.mkdir()
    torch.save({"format": FORMAT, "model": Evil(marker)}, evil)
    with pytest.raises(ValueError, match="refusing to load"):
        make_learner().fit(1, resume_from=evil)
    with pytest.warns(UserWarning, match="ckpt-00000005.pt"), pytest.raises(ValueError, match="none of the 1"):
        make_learner().fit(1, resume_from=evil.parent)
    assert not marker.exists()


def test_a_missing_path_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "no" / "such.pt"
    with pytest.raises(FileNotFoundError, match="such.pt"):
        make_learner().fit(1, resume_from=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        make_learner().fit(1, resume_from=tmp_path / "empty")


class Count(Callback):
    def __init__(self):
        self.events = []

    def before_epoch(self):
        self.events.append("epoch")

    def after_batch(self):
        self.events.append("batch")

    def before_validate(self):
        self.events.append("validate")


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    learn = make_learner([Checkpoint(tmp_path, every_n_steps=2)])
    learn.fit(2)
    done, files = weights(learn), {p.name: p.stat().st_mtime_ns for p in checkpoint_files(tmp_path)}
    resumed, count = make_learner([Checkpoint(tmp_path, every_n_steps=2)], seed=1), Count()
    resumed.fit(2, cbs=[count], resume_from=tmp_path)
    assert_equal_weights(weights(resumed), done)
    assert count.events == []  # no epoch, no batch, no validation
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint_files(tmp_path)} == files  # nothing written
    assert resumed.recorder.losses == learn.recorder.losses and resumed.train_iter == 10


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_tmp_leftovers_are_left_alone(tmp_path):
    reference = make_learner()
    reference.fit(2)
    make_learner([Checkpoint(tmp_path, every_n_steps=3, keep_last=None), StopAt(7)]).fit(2)
    newest = checkpoint_files(tmp_path)[-1]
    assert newest.name == "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a disk-full write might leave it
    (tmp_path / "ckpt-00000007.pt.tmp").write_bytes(b"half a write")
    resumed = make_learner(seed=1)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*ckpt-00000006.pt"):
        resumed.fit(2, resume_from=tmp_path)  # from ckpt-00000005-epoch-0.pt
    assert_equal_weights(weights(resumed), weights(reference))
    assert [p.name for p in tmp_path.glob("*.tmp")] == ["ckpt-00000007.pt.tmp"]  # reading never deletes


def test_rotation_keeps_the_newest_files(tmp_path):
    make_learner([Checkpoint(tmp_path, every_n_steps=2, keep_last=2)]).fit(2)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["ckpt-00000010.pt", "ckpt-00000010-epoch-1.pt"]
    with pytest.warns(UserWarning, match="already holds 2 checkpoint"):  # another run into the same folder
        make_learner([Checkpoint(tmp_path, every_n_steps=2, keep_last=2)]).fit(1)  # writes steps 2, 4, 5
    # the other run's files are left alone; this run's rotate
    assert sorted(p.name for p in checkpoint_files(tmp_path)) == sorted(
        ["ckpt-00000004.pt", "ckpt-00000005-epoch-0.pt", "ckpt-00000010.pt", "ckpt-00000010-epoch-1.pt"])
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_in_the_middle_of_gradient_accumulation_resumes_exactly(tmp_path):
    # 5 batches per epoch, windows of 2: steps 1 and 3 end mid-window, with gradients accumulated but not applied
    reference = make_learner([GradientAccumulation(2)])
    reference.fit(2)
    interrupted = make_learner([GradientAccumulation(2), Checkpoint(tmp_path, every_n_steps=3), StopAt(3)])
    interrupted.fit(2)
    state = torch.load(checkpoint_files(tmp_path)[-1], weights_only=True)
    assert state["grads"]  # the half-accumulated gradients were saved
    resumed = make_learner([GradientAccumulation(2)], seed=1)
    resumed.fit(2, resume_from=tmp_path)
    assert_equal_weights(weights(resumed), weights(reference))


def every_stateful_callback():
    return [EMA(0.9), SWA(start_epoch=2, swa_lr=1e-3), EarlyStopping(patience=5), TerminateOnNaN(),
            GradientAccumulation(2), GradientClip(0.3), MixUp(0.4),
            MixedPrecision(torch.float16, init_scale=2.0**20, growth_interval=2)]  # the scale grows and backs off


@pytest.mark.filterwarnings("ignore:SWA. the fit ended")  # the interrupted fit
@pytest.mark.parametrize("stop", [7, 12])  # mid-window in epoch 1; the first step of epoch 2 (SWA's start)
def test_every_stateful_callback_resumes_exactly(tmp_path, stop):
    reference = make_learner(every_stateful_callback())
    reference.fit_one_cycle(4, 1e-2)
    interrupted = make_learner([*every_stateful_callback(), Checkpoint(tmp_path, every_n_steps=3), StopAt(stop)])
    interrupted.fit_one_cycle(4, 1e-2)
    resumed = make_learner(every_stateful_callback(), seed=1)
    resumed.fit_one_cycle(4, 1e-2, resume_from=tmp_path)
    assert_equal_weights(weights(resumed), weights(reference))  # SWA's average, after_fit
    assert_equal_weights(resumed.cbs[1].ema_model.state_dict(), reference.cbs[1].ema_model.state_dict())
    assert resumed.recorder.losses == reference.recorder.losses
    assert [r["valid_loss"] for r in resumed.recorder.history] == [r["valid_loss"] for r in reference.recorder.history]


def test_a_plateau_lr_reduction_resumes_exactly(tmp_path):
    cbs = lambda: [ReduceLROnPlateau(patience=1, factor=2.0, monitor="train_loss", mode="max")]  # reduces often
    reference = make_learner(cbs())
    reference.fit(4, 1e-2)
    make_learner([*cbs(), Checkpoint(tmp_path), StopAt(13)]).fit(4, 1e-2)
    resumed = make_learner(cbs(), seed=1)
    resumed.fit(4, 1e-2, resume_from=tmp_path)
    assert resumed.opt.param_groups[0]["lr"] == reference.opt.param_groups[0]["lr"] < 1e-2
    assert_equal_weights(weights(resumed), weights(reference))


def test_signal_handlers_are_restored_after_fit_and_after_a_cancel(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    make_learner([Checkpoint(tmp_path / "a")]).fit(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    make_learner([Checkpoint(tmp_path / "b"), StopAt(2)]).fit(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    class Boom(Callback):
        def after_batch(self):
            raise RuntimeError("boom")

    ckpt = Checkpoint(tmp_path / "c")
    learn = make_learner([ckpt])
    with pytest.raises(RuntimeError):
        learn.fit(1, cbs=[Boom()])  # after_fit runs however the fit ends: it restores them, and writes nothing
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert checkpoint_files(tmp_path / "c") == []
    learn.fit(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint(tmp_path, capsys):
    class Interrupt(Callback):
        def after_pred(self):
            if self.learn.training and self.learn.train_iter == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C or a notebook's interrupt button

    ckpt = Checkpoint(tmp_path)
    learn = make_learner([ckpt, Interrupt()])
    learn.fit(2)
    assert ckpt.stopped_by == "SIGINT" and learn.train_iter == 3  # training batches done
    assert "SIGINT: stopped after 3 steps" in capsys.readouterr().out
    assert checkpoint_files(tmp_path)[-1].name == "ckpt-00000003.pt"


def test_bad_arguments():
    for kw in ({"every_n_steps": 0}, {"keep_last": 0}, {"every_n_steps": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Checkpoint("x", **kw)
