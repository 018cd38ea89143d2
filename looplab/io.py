"""Atomic writes and safe, explaining reads of checkpoint files.

A write goes to a temporary file unique to its writer (`<name>.<host>.<pid>.<random>.tmp`), which only that writer
removes, or renames onto `<name>` once complete. A temporary left by a killed writer is stale once provably dead:
written on this host by a process that no longer runs, or older than `STALE_AFTER` seconds. Only writers remove
stale temporaries (`remove_stale_temporaries`); reading never deletes, renames or creates anything.
"""
from __future__ import annotations

import os
import pickle
import re
import secrets
import socket
import time
from pathlib import Path

import torch

__all__ = ["atomic_save", "safe_load", "temporary_path", "is_stale_temporary", "remove_stale_temporaries",
           "STALE_AFTER"]

STALE_AFTER = 24 * 3600  # seconds: a temporary this old is a dead writer's, whichever host wrote it
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^.+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")
# what `torch.save` files start with: a zip archive, or (the legacy format) a pickle of torch's magic number
_ZIP_MAGIC, _LEGACY_MAGIC = b"PK\x03\x04", b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def temporary_path(path: str | os.PathLike) -> Path:
    """A name next to `path` that no other writer uses: host, process id and a random token."""
    path = Path(path)
    return path.with_name(f"{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def is_stale_temporary(path: str | os.PathLike) -> bool:
    """Is the `*.tmp` file `path` provably a dead writer's (its process gone from this host, or it is older than
    `STALE_AFTER`)? A temporary of a live writer, or of another host's recent one, is not."""
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:  # its writer finished meanwhile
        return False
    if age > STALE_AFTER:
        return True
    m = _TEMPORARY.match(path.name)
    return m is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = "*.tmp") -> list[Path]:
    """Delete the provably stale temporaries matching `pattern` in `folder` (see `is_stale_temporary`); returns them.

    For writers only (`Checkpoint` calls it for its own `ckpt-*.tmp` before writing into a folder): readers never
    delete anything, and files of other names (a user's `notes.tmp`) are never touched.
    """
    stale = [tmp for tmp in Path(folder).glob(pattern) if is_stale_temporary(tmp)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically: write a temporary of this writer's own, fsync, then `os.replace`.

    A reader never sees a half-written file under `path`, and concurrent writers never share a temporary. A failed
    write (full disk, read-only folder) removes its temporary and raises an OSError naming `path`; a killed write
    leaves only its temporary behind.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as e:
        _discard(tmp, e)
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is None:
            raise
        raise OSError(cause.errno, f"cannot write {str(path)!r}: {cause.strerror or cause}") from e
    return path


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or one it was raised while handling (torch.save reports a failed write
    of its zip writer as a RuntimeError raised while closing the archive)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _discard(tmp: Path, error: BaseException) -> None:
    """Remove a failed write's temporary; a failure to do so is noted on the error that caused it."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError as cleanup:
        error.add_note(f"the temporary {str(tmp)!r} could not be removed: {cleanup}")


def safe_load(path: str | os.PathLike, map_location=None):
    """`torch.load(weights_only=True)` with errors that name the file and say what is wrong with it.

    Never runs code from the file: a checkpoint holding arbitrary pickled objects is refused. A file that
    `torch.save` did not write is "not a checkpoint"; one that it did but that is cut short is "damaged".
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # one open file: a file deleted meanwhile (rotated away) still reads to the end
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{str(path)!r} is a folder, not a checkpoint file") from None
    with f:
        head = f.read(32)
        if not (head.startswith(_ZIP_MAGIC) or (head.startswith(b"\x80") and _LEGACY_MAGIC in head)):
            what = "it is empty" if not head else f"it starts with {head[:8]!r}"
            raise ValueError(f"{str(path)!r} is not a checkpoint: torch.save did not write it ({what})")
        f.seek(0)
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            if "global" in str(e).lower():
                raise ValueError(f"refusing to load {str(path)!r}: it holds objects that are not plain weights "
                                 f"(loading them could run code): {reason}") from e
            raise ValueError(f"cannot read checkpoint {str(path)!r}: the file is damaged ({reason})") from e
        except Exception as e:  # RuntimeError (a cut-short zip), EOFError, OSError
            detail = str(e).splitlines()[0] if str(e) else "the file ends early"
            raise ValueError(f"cannot read checkpoint {str(path)!r}: the file is damaged or truncated "
                             f"({type(e).__name__}: {detail})") from e
