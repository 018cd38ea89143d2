"""A python with torch and looplab already imported that forks a child per run: training processes to kill, in ms.

tests/test_checkpoint_safety.py starts it once and sends one JSON command a line on stdin; each answer is one JSON
line on stdout:

    {"start": ENTRY, "argv": [...], "cwd": DIR}  ->  {"pid": PID}    fork; the child runs ENTRY(argv) with its
                                                                      stdout / stderr in DIR/stdout.txt, stderr.txt
    {"wait": PID, "timeout": SECONDS}            ->  {"rc": RC}      its exit status (-9: SIGKILL), killed first
                                                                      with SIGKILL if it runs past the timeout

ENTRY is "train" (`resume_script.main`, the training run of tests/test_resume.py) or "read_only" (below). The
server runs torch single-threaded only (one warm-up run), so forking it is safe; every child starts from the same
state. Importing torch takes seconds; a fork takes milliseconds, so a test can kill and resume many runs.
"""
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch  # noqa: F401  (imported once, here, for every child)

import resume_script
from looplab.averaging import average_last
from looplab.callbacks.checkpoint import latest_checkpoint

_WRITING_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
                   "os.link", "os.symlink", "shutil.rmtree", "shutil.move"}


def read_only(argv):
    """`read_only FOLDER OUT`: read FOLDER the ways a user does (latest_checkpoint, average_last, a resumed fit
    without Checkpoint, which writes OUT) and fail, listing them, if anything deleted, renamed, created or opened
    for writing a path inside FOLDER (seen through python's audit hooks)."""
    folder, out = Path(argv[0]).resolve(), argv[1]
    writes = []

    def inside(path) -> bool:
        if isinstance(path, int):  # a file descriptor: what it refers to was opened (and audited) before
            return False
        path = Path(os.fsdecode(path))
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        return path == folder or folder in path.parents

    def audit(event, args):
        if event in _WRITING_EVENTS and any(isinstance(a, (str, bytes, os.PathLike)) and inside(a) for a in args):
            writes.append((event, [str(a) for a in args]))
        elif event == "open" and args[0] is not None and inside(args[0]):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing:
                writes.append((event, [str(a) for a in args]))

    sys.addaudithook(audit)  # in this child only: it ends with it
    file, _ = latest_checkpoint(folder)
    print(f"latest: {file.name}", flush=True)
    average_last(folder, 2, pattern="ckpt-*.pt")
    resume_script.main([out, "--resume-from", str(folder)])
    if writes:
        print(f"reading wrote into {folder}: {writes}", flush=True)
        return 1
    return 0


ENTRIES = {"train": resume_script.main, "read_only": read_only}


def _child(command) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        cwd = command["cwd"]
        os.chdir(cwd)
        for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
            target = os.open(os.path.join(cwd, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.close(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        result = ENTRIES[command["start"]](command["argv"])
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _warm_up() -> None:
    """Run one short training here, single-threaded (so forking stays safe: no thread pool exists), so that
    children do not each pay torch's lazy first-use costs (imports, kernel registration)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        resume_script.main([os.path.join(tmp, "out.pt"), "--ckpt", os.path.join(tmp, "ckpt"), "--every", "1",
                            "--workers", "0"])


def main() -> None:
    _warm_up()
    reply = sys.stdout
    children = set()
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if "start" in command:
                reply.flush()
                pid = os.fork()
                if pid == 0:
                    _child(command)
                children.add(pid)
                answer = {"pid": pid}
            else:
                children.discard(command["wait"])
                answer = {"rc": _wait(command["wait"], command["timeout"])}
            reply.write(json.dumps(answer) + "\n")
            reply.flush()
    finally:  # the test is gone: so are its runs
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
