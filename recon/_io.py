"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the previous version intact. The
temporary file's name carries the writer's PID, so a later write removes the leftovers of a killed writer; the
written file gets the mode any other tool would give it (0666 less the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from recon._errors import ReconError

#: errno values that mean "the disk (or the user's quota) is full".
_FULL = (errno.ENOSPC, errno.EDQUOT)


def file_mode() -> int:
    """The mode a new file gets under the current umask (0666 less the umask), as ``open()`` would give it."""
    try:  # Linux: read it without changing it (setting it, even back, races with other threads)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts as gone only once reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` files beside ``path`` whose writer is no longer running."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            try:
                tmp.unlink()
            except FileNotFoundError:  # another writer cleaned it first
                pass


def disk_full(e: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or torch.save's "N requested and M written"."""
    if isinstance(e, OSError):
        return e.errno in _FULL
    text = str(e)
    return isinstance(e, RuntimeError) and "requested and" in text and "written" in text


def disk_full_error(path: Path) -> ReconError:
    return ReconError(
        f"no space left on the device while writing {path}; free some space (or pass --out on another disk) "
        "and run again"
    )


def _atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if disk_full(e):
            raise disk_full_error(path) from None
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return _atomic(path, lambda f: torch.save(obj, f))


def save_figure(path: str | os.PathLike, fig: Any, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic(path, lambda f: fig.savefig(f, format=fmt, **kwargs))
