"""Checkpoint folders never lose a run, loading is all or nothing, and errors name the culprit (issue 16).

Runs to kill are children forked from tests/fork_script.py (torch already imported there), each running
tests/resume_script.py: shuffling, dropout, MixUp, GradientClip, float16 MixedPrecision, a one-cycle schedule. The
reference is the same script run once without any checkpointing; "bitwise" compares every weight with
torch.equal and every step's loss. Loading is checked against snapshots of the weights and optimizer state taken
before the call, compared tensor by tensor.
"""
import copy
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import looplab
import looplab.io
from looplab import Callback, DataLoaders, Learner
from looplab.averaging import average_checkpoints
from looplab.callbacks.checkpoint import FORMAT, Checkpoint, Resume, checkpoint_files, latest_checkpoint
from looplab.io import STALE_AFTER, atomic_save, is_stale_temporary, temporary_path

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import StopAt  # noqa: E402  (interrupts a fit after a step Checkpoint saved)

ROOT = Path(__file__).parent.parent
FORK_SCRIPT = Path(__file__).with_name("fork_script.py")
FAST = ["--workers", "0"]  # data workers are covered by test_resume.py; here the runs must be quick to kill


# ---- forked training runs ---------------------------------------------------------------------------------------
class Forker:
    """Talks to tests/fork_script.py: `start` a run (a forked child), `wait` for its exit status."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(FORK_SCRIPT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit status {self.proc.poll()})"
        return json.loads(line)

    def start(self, cwd: Path, *argv, entry="train") -> int:
        return self._ask({"start": entry, "argv": [str(a) for a in argv], "cwd": str(cwd)})["pid"]

    def wait(self, pid: int, timeout: float = 60) -> int:
        return self._ask({"wait": pid, "timeout": timeout})["rc"]

    def run(self, cwd: Path, *argv, rc=0, entry="train") -> tuple[str, str]:
        """Run to the end; returns (stdout, stderr) after checking the exit status."""
        code = self.wait(self.start(cwd, *argv, entry=entry))
        out, err = (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()
        assert code == rc, f"{argv}: exit status {code}, expected {rc}\n{out}\n{err}"
        return out, err

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forker():
    f = Forker()
    yield f
    f.close()


@pytest.fixture(scope="module")
def reference(forker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    forker.run(tmp, tmp / "ref.pt", *FAST)
    return torch.load(tmp / "ref.pt", weights_only=True)


def assert_same_run(result_file, reference):
    got = torch.load(result_file, weights_only=True)
    assert got["train_iter"] == reference["train_iter"] == 15
    for name, w in reference["model"].items():
        assert torch.equal(got["model"][name], w), name
    assert torch.equal(got["losses"], reference["losses"])  # every step's loss, the resumed ones included


def names(folder: Path) -> list[str]:
    return [p.name for p in checkpoint_files(folder)]


# ---- rollback ---------------------------------------------------------------------------------------------------
def test_rolling_back_keeps_the_new_runs_files_and_resume_from_the_folder_continues_it(forker, tmp_path):
    """A run stops at step 12 (5 steps an epoch, a checkpoint every 2 steps, keep_last=3). The user rolls back to
    step 10 with a smaller lr, into the same folder; that run is killed at step 14, and resumed from the folder."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "files.jsonl"
    common = ["--ckpt", ckpt, "--every", 2, "--keep", 3, *FAST]
    forker.run(tmp_path, tmp_path / "first.pt", *common, "--exit-at", 12, rc=3)
    assert names(ckpt) == ["ckpt-00000010.pt", "ckpt-00000010-epoch-1.pt", "ckpt-00000012.pt"]
    abandoned_bytes = {n: (ckpt / n).read_bytes() for n in ["ckpt-00000010-epoch-1.pt", "ckpt-00000012.pt"]}

    new_run = [*common, "--lr-from", 10, 0.005]
    _, stderr = forker.run(tmp_path, tmp_path / "out.pt", *new_run, "--resume-from", ckpt / "ckpt-00000010.pt",
                           "--log-files", log, "--exit-at", 14, rc=3)
    assert "ckpt-00000010-epoch-1.pt, ckpt-00000012.pt" in stderr and "abandoned-" in stderr  # the warning
    # after every step, the folder holds exactly the newest 3 files of the new run: its resume point, then its own
    listings = {step: [n for n in files if n.startswith("ckpt-") and not n.endswith(".tmp")]
                for step, files in map(json.loads, log.read_text().splitlines())}
    assert listings == {11: ["ckpt-00000010-epoch-1.pt", "ckpt-00000010.pt"],
                        12: ["ckpt-00000010-epoch-1.pt", "ckpt-00000010.pt", "ckpt-00000012.pt"],
                        13: ["ckpt-00000010-epoch-1.pt", "ckpt-00000010.pt", "ckpt-00000012.pt"],
                        14: ["ckpt-00000010-epoch-1.pt", "ckpt-00000012.pt", "ckpt-00000014.pt"]}
    abandoned, = ckpt.glob("abandoned-*")  # the old run's newer files, moved, byte for byte
    assert {p.name: p.read_bytes() for p in abandoned.iterdir()} == abandoned_bytes

    _, stderr = forker.run(tmp_path, tmp_path / "out.pt", *new_run, "--resume")  # resume_from=folder
    assert "abandoned" not in stderr
    assert names(ckpt) == ["ckpt-00000012.pt", "ckpt-00000014.pt", "ckpt-00000015-epoch-2.pt"]
    assert sorted(p.name for p in abandoned.iterdir()) == sorted(abandoned_bytes)
    forker.run(tmp_path, tmp_path / "ref.pt", *FAST, "--lr-from", 10, 0.005)  # never interrupted, no checkpoints
    assert_same_run(tmp_path / "out.pt", torch.load(tmp_path / "ref.pt", weights_only=True))


# ---- reading never writes ---------------------------------------------------------------------------------------
def test_a_reader_polling_latest_checkpoint_never_disturbs_a_run_writing_every_step(forker, tmp_path, reference):
    ckpt, reads, errors, done = tmp_path / "ckpt", [], [], threading.Event()

    def poll():
        while not done.is_set():
            time.sleep(0.002)
            try:
                file, state = latest_checkpoint(ckpt)
                reads.append((file.name, state["format"]))
            except FileNotFoundError:  # no folder or no file yet
                pass
            except Exception as e:  # noqa: BLE001 — reported below, with the reads so far
                errors.append(e)

    reader = threading.Thread(target=poll)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pid = forker.start(tmp_path, tmp_path / "out.pt", "--ckpt", ckpt, "--every", 1, "--slow", 0.01, *FAST)
        reader.start()
        try:
            code = forker.wait(pid)
        finally:
            done.set()
            reader.join(timeout=30)
    assert code == 0, (tmp_path / "stderr.txt").read_text()
    assert not errors and not [w for w in caught if "checkpoint" in str(w.message)]
    assert len(reads) >= 5 and all(fmt == FORMAT for _, fmt in reads)
    steps = [int(name[5:13]) for name, _ in reads]
    assert steps == sorted(steps)  # never an older file once a newer one was seen
    assert_same_run(tmp_path / "out.pt", reference)
    assert not list(ckpt.glob("*.tmp"))


def snapshot(folder: Path) -> dict:
    """Every entry of `folder` (and the folder itself) with its modification time and size."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in [folder, *folder.iterdir()]}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_reading_a_folder_with_stale_temporaries_writes_nothing_and_resumes(forker, tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    forker.run(tmp_path, tmp_path / "killed.pt", "--ckpt", ckpt, "--every", 1, *FAST, "--exit-at", 7, rc=3)
    # a dead writer's temporary, a temporary from long ago, and a live writer's (this process's)
    dead = temporary_path(ckpt / "ckpt-00000008.pt").name.replace(f".{os.getpid()}.", f".{dead_pid()}.")
    (ckpt / dead).write_bytes(b"PK\x03\x04half a zip")
    (ckpt / "ckpt-00000009.pt.tmp").write_bytes(b"\x80half a pickle")
    os.utime(ckpt / "ckpt-00000009.pt.tmp", (time.time() - STALE_AFTER - 60,) * 2)
    live = temporary_path(ckpt / "ckpt-00000010.pt")
    live.write_bytes(b"being written")
    before = snapshot(ckpt)

    # latest_checkpoint, average_last and a resumed fit without Checkpoint, watched by python's audit hooks
    forker.run(tmp_path, ckpt, tmp_path / "read.pt", entry="read_only")
    assert snapshot(ckpt) == before
    assert_same_run(tmp_path / "read.pt", reference)

    # a writer resuming there removes the provably stale temporaries only
    forker.run(tmp_path, tmp_path / "out.pt", "--ckpt", ckpt, "--every", 1, *FAST, "--resume")
    assert sorted(p.name for p in ckpt.glob("*.tmp")) == [live.name]
    assert_same_run(tmp_path / "out.pt", reference)


# ---- fault injection --------------------------------------------------------------------------------------------
def test_sigkill_at_random_moments_then_every_resume_is_bitwise_equal(forker, tmp_path, reference):
    """Runs checkpointing every step are SIGKILLed at random moments, again while resuming, then resumed to the
    end: never a torn file under a checkpoint's name, every finished run equal to the uninterrupted one."""
    rng, kills, torn_writes, runs, deadline = random.Random(), 0, 0, 0, time.monotonic() + 150
    while kills < 12:  # a kill that comes after the run finished does not count: on a loaded machine, run more
        assert runs < 40 and time.monotonic() < deadline, f"{runs} runs: only {kills} SIGKILLs landed in a run"
        ckpt, out, history = tmp_path / f"ckpt{runs}", tmp_path / f"out{runs}.pt", []
        args = [out, "--ckpt", ckpt, "--every", 1, *FAST]
        for attempt in range(2):  # a fresh run (a run takes ~0.3 s), then its resumption
            pid = forker.start(tmp_path, *args, *(["--resume"] if checkpoint_files(ckpt) else []))
            delay = rng.uniform(0.0, 0.3)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            code = forker.wait(pid)
            history.append((round(delay, 3), code, names(ckpt), sorted(p.name for p in ckpt.glob("*.tmp"))))
            assert code in (0, -signal.SIGKILL), (history, (tmp_path / "stderr.txt").read_text())
            kills += code == -signal.SIGKILL
            torn_writes += bool(history[-1][3])
            for file in checkpoint_files(ckpt):
                assert torch.load(file, weights_only=True)["format"] == FORMAT, (file, history)
        forker.run(tmp_path, *args, *(["--resume"] if checkpoint_files(ckpt) else []))
        try:
            assert_same_run(out, reference)
        except AssertionError as e:
            raise AssertionError(f"run {runs} (kill delay, exit status, files, temporaries): {history}") from e
        assert not list(ckpt.glob("*.tmp")), history  # the killed writers' temporaries, removed by the next writer
        runs += 1
    print(f"{kills} SIGKILLs ({torn_writes} during a write), {runs} runs resumed bitwise equal")


# ---- in process: loading is all or nothing ----------------------------------------------------------------------
def data(n=40, bs=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    return DataLoaders.from_tensors(x, y, valid=(x[:8], y[:8]), bs=bs, seed=3)


def make_learner(hidden=8, opt_func=torch.optim.AdamW, splitter=None, cbs=(), n=40, bs=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return Learner(model, data(n, bs), nn.MSELoss(), opt_func=opt_func, lr=1e-2, splitter=splitter,
                   cbs=list(cbs), progress=False)


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def two_groups(model):
    return [list(model[0].parameters()), list(model[2].parameters())]


def assert_identical(a, b, where="state"):
    """Equal structure, and every tensor equal in dtype, shape and bits (never compared through str())."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def trained_state(learn) -> tuple[dict, dict]:
    """Deep copies of the model's and the optimizer's state, to compare with after a failed load."""
    return copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())


def mismatches(tmp_path):
    """(what differs, the source Learner, the target Learner's arguments, the message the error must hold)."""
    return {
        "AdamW file into an SGD Learner": (make_learner(), dict(opt_func=sgd),
                                           "was saved with AdamW, this Learner's optimizer is SGD"),
        "2 parameter groups into 1": (make_learner(splitter=two_groups), {},
                                      "holds 2 optimizer parameter group(s), this Learner's optimizer (AdamW) has 1"),
        "other shapes": (make_learner(hidden=16), {},
                         "'0.weight' has shape (16, 4) in the file, (8, 4) in this model"),
    }


@pytest.mark.parametrize("how", ["learn.load", "resume_from"])
@pytest.mark.parametrize("case", ["AdamW file into an SGD Learner", "2 parameter groups into 1", "other shapes"])
def test_a_file_that_does_not_fit_is_refused_by_name_and_changes_nothing(tmp_path, case, how):
    source, target_kw, message = mismatches(tmp_path)[case]
    source.fit(1, cbs=[Checkpoint(tmp_path / "ckpt")])
    file = tmp_path / "saved.pt"
    source.save(file)
    if how == "resume_from":
        file = checkpoint_files(tmp_path / "ckpt")[-1]
    target = make_learner(**target_kw)
    target.fit(1)  # an optimizer with state of its own
    model_before, opt_before = trained_state(target)
    with pytest.raises(ValueError) as info:
        target.load(file) if how == "learn.load" else target.fit(2, resume_from=file)
    assert str(file) in str(info.value) and message in str(info.value)
    assert_identical(target.model.state_dict(), model_before, "model")
    assert_identical(target.opt.state_dict(), opt_before, "optimizer")


def test_files_without_the_optimizer_class_name_still_load_and_another_optimizer_is_still_refused(tmp_path):
    source = make_learner()
    source.fit(1)
    source.save(tmp_path / "new.pt")
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["opt_class"]  # as files written before the class name was saved
    torch.save(old, tmp_path / "old.pt")
    same = make_learner()
    same.load(tmp_path / "old.pt")
    assert_identical(same.opt.state_dict(), source.opt.state_dict())
    other = make_learner(opt_func=sgd)
    model_before, opt_before = trained_state(other)
    with pytest.raises(ValueError, match="old.pt.*saved with another optimizer.*'betas'.*'momentum'"):
        other.load(tmp_path / "old.pt")
    assert_identical(other.model.state_dict(), model_before)
    assert_identical(other.opt.state_dict(), opt_before)


class Counter(Callback):
    def __init__(self):
        self.n = 0

    def after_batch(self):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class Picky(Callback):
    """Loads only a state with a list "seen" of ints; a wrong one fails half-way, after changing itself."""

    def __init__(self):
        self.seen = [1, 2]

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen.clear()  # changed in place before the check: restoring must undo this too
        self.seen.extend(int(v) for v in state["seen"])


def test_a_callback_state_that_does_not_load_leaves_every_callback_and_the_model_as_they_were(tmp_path):
    make_learner(cbs=[Counter(), Picky(), Checkpoint(tmp_path, every_n_steps=3), StopAt(3)]).fit(2)
    file = checkpoint_files(tmp_path)[-1]
    state = torch.load(file, weights_only=True)
    assert state["callbacks"]["Counter_0"] == {"n": 3}
    state["callbacks"]["Picky_0"] = {"seen": ["not a number"]}
    torch.save(state, tmp_path / "bad.pt")
    counter, picky = Counter(), Picky()
    learn = make_learner(cbs=[counter, picky])
    model_before, opt_before = trained_state(learn)
    position, rng = learn.dls.train.state_dict(), torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"bad.pt.*callback Picky_0"):
        learn.fit(2, resume_from=tmp_path / "bad.pt")
    assert counter.n == 0 and picky.seen == [1, 2]  # Counter was loaded first, then put back
    assert learn.dls.train.state_dict() == position and torch.equal(torch.random.get_rng_state(), rng)
    assert_identical(learn.model.state_dict(), model_before)
    assert_identical(learn.opt.state_dict(), opt_before)


# ---- in process: resume checks the data -------------------------------------------------------------------------
class CountBatches(Callback):
    def __init__(self):
        self.batches = 0

    def after_batch(self):
        self.batches += self.learn.training


def mid_epoch_checkpoint(tmp_path) -> Path:
    """5 batches an epoch (40 samples, bs 8); the checkpoint after step 6 is mid-epoch 1, batch 1 done."""
    make_learner(cbs=[Checkpoint(tmp_path / "ckpt", every_n_steps=3), StopAt(6)]).fit(3)
    file = checkpoint_files(tmp_path / "ckpt")[-1]
    assert file.name == "ckpt-00000006.pt"
    return file


@pytest.mark.parametrize("data_kw, message", [(dict(bs=16), "batches per epoch: 5 there, 3 here"),
                                              (dict(n=48), "training samples: 40 there, 48 here")])
def test_resuming_mid_epoch_into_other_data_is_an_error_naming_both_or_restarts_the_epoch(tmp_path, data_kw,
                                                                                       message):
    file = mid_epoch_checkpoint(tmp_path)
    learn = make_learner(**data_kw)
    model_before, _ = trained_state(learn)
    with pytest.raises(ValueError, match=message) as info:
        learn.fit(3, resume_from=file)
    assert str(file) in str(info.value) and "strict=False" in str(info.value)
    assert_identical(learn.model.state_dict(), model_before)
    count = CountBatches()
    with pytest.warns(UserWarning, match=f"{message}.*restarting epoch 1 from its first batch"):
        learn.fit(3, cbs=[Resume(file, strict=False), count])
    assert count.batches == 2 * len(learn.dls.train)  # all of epoch 1, then epoch 2


def test_resuming_mid_epoch_with_another_number_of_processes_is_an_error(tmp_path):
    file = mid_epoch_checkpoint(tmp_path)
    state = torch.load(file, weights_only=True)
    state["loop"]["world_size"] = 2
    torch.save(state, tmp_path / "two_processes.pt")
    with pytest.raises(ValueError, match="two_processes.pt.*processes: 2 there, 1 here"):
        make_learner().fit(3, resume_from=tmp_path / "two_processes.pt")


def test_resuming_mid_epoch_into_the_same_data_needs_no_check_to_pass(tmp_path):
    file = mid_epoch_checkpoint(tmp_path)
    reference = make_learner()
    reference.fit(3)
    learn = make_learner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learn.fit(3, resume_from=file)
    assert_identical(learn.model.state_dict(), reference.model.state_dict())


# ---- in process: errors name the culprit ------------------------------------------------------------------------
def test_random_bytes_are_not_a_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    file = folder / "ckpt-00000005.pt"
    file.write_bytes(random.Random(0).randbytes(1000))
    for load in (lambda: make_learner().fit(1, resume_from=file), lambda: make_learner().load(file),
                 lambda: average_checkpoints([file])):
        with pytest.raises(ValueError, match=f"'{file}' is not a checkpoint: torch.save did not write it"):
            load()
    with pytest.warns(UserWarning, match="ckpt-00000005.pt' is not a checkpoint"), \
            pytest.raises(ValueError, match="none of the 1 checkpoints"):
        make_learner().fit(1, resume_from=folder)


def test_a_checkpoint_missing_a_part_names_the_file_and_the_part(tmp_path):
    make_learner(cbs=[Checkpoint(tmp_path)]).fit(1)
    state = torch.load(checkpoint_files(tmp_path)[-1], weights_only=True)
    del state["loop"]
    torch.save(state, tmp_path / "no_loop.pt")
    with pytest.raises(ValueError, match="no_loop.pt' is an incomplete checkpoint: it has no loop"):
        make_learner().fit(1, resume_from=tmp_path / "no_loop.pt")


class FillsUp(io.FileIO):
    """A file on a disk with `room` bytes left: writing past it fails with ENOSPC, as a full disk does."""
    room = 0

    def write(self, b):
        if FillsUp.room < len(b):
            super().write(bytes(b[:FillsUp.room]))  # what fits is written: the file is left half-written
            FillsUp.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FillsUp.room -= len(b)
        return super().write(b)


def test_a_full_disk_names_the_file_leaves_no_half_written_file_and_keeps_the_older_checkpoints(tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setattr(looplab.io, "open", lambda path, mode: FillsUp(path, mode), raising=False)
    FillsUp.room = 10**9
    learn = make_learner(cbs=[Checkpoint(tmp_path, every_n_steps=2, keep_last=2)])

    class DiskFull(Callback):
        def before_batch(self):
            if self.learn.training and self.learn.train_iter == 5:  # step 6 will not fit
                FillsUp.room = 3000

    with pytest.raises(OSError, match=r"cannot write '.*ckpt-00000006.pt': No space left on device") as info:
        learn.fit(2, cbs=[DiskFull()])
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000005-epoch-0.pt"]
    for file in checkpoint_files(tmp_path):
        assert latest_checkpoint(file)[1]["format"] == FORMAT
    FillsUp.room = 100
    with pytest.raises(OSError, match="cannot write '.*saved.pt': No space left on device"):
        learn.save(tmp_path / "saved.pt")
    assert not (tmp_path / "saved.pt").exists() and not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_path_names_the_file(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match="cannot write '.*a_file/model.pt'"):
        make_learner().save(tmp_path / "a_file" / "model.pt")


# ---- in process: temporaries ------------------------------------------------------------------------------------
def test_temporaries_are_unique_per_writer_and_stale_only_when_provably_dead(tmp_path):
    target = tmp_path / "ckpt-00000001.pt"
    a, b = temporary_path(target), temporary_path(target)
    assert a != b and a.name.startswith("ckpt-00000001.pt.") and f".{os.getpid()}." in a.name
    a.write_bytes(b"a live writer's")
    dead = tmp_path / a.name.replace(f".{os.getpid()}.", f".{dead_pid()}.")
    dead.write_bytes(b"a dead writer's")
    other_host = tmp_path / f"ckpt-00000001.pt.elsewhere.{dead_pid()}.0123abcd.tmp"
    other_host.write_bytes(b"another host's")
    unnamed = tmp_path / "ckpt-00000001.pt.tmp"
    unnamed.write_bytes(b"no writer named")
    assert [is_stale_temporary(p) for p in (a, dead, other_host, unnamed)] == [False, True, False, False]
    for p in (other_host, unnamed):
        os.utime(p, (time.time() - STALE_AFTER - 60,) * 2)
        assert is_stale_temporary(p)
    atomic_save({"x": torch.ones(2)}, target)  # writes next to the others' temporaries, leaving them alone
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    assert sorted(tmp_path.glob("*.tmp")) == sorted([a, dead, other_host, unnamed])


def test_latest_checkpoint_is_exported():
    assert looplab.latest_checkpoint is latest_checkpoint and "latest_checkpoint" in looplab.__all__
