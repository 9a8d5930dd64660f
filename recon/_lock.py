"""One writer per run folder: an exclusive OS file lock (``fcntl.flock``) on a stage folder or on ``run.json``.

The lock lives in a hidden file beside what it guards (``runs/x/train/.pcgrad.lock`` guards
``runs/x/train/pcgrad``) and records the holder's PID, start time and command, so a refused command can name it.
The OS releases a flock when its holder exits, however it exits; a lock still held although the recorded PID is
gone (a forked child kept the file open) is stale and is broken by replacing the lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from recon._errors import ReconError
from recon._io import pid_alive

#: Locks this process holds, by lock file: taking one again is free, and a command holds its stage lock for life.
_HELD: dict[Path, FolderLock] = {}


def lock_file(target: str | os.PathLike) -> Path:
    """The hidden lock file guarding ``target`` (a folder or a file)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


class FolderLock:
    """An exclusive, non-blocking lock on ``target``; :meth:`acquire` refuses with the holder's PID."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.path = lock_file(self.target)
        self.fd: int | None = None

    def acquire(self, *, wait: bool = False) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock file is replaced, then taken
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if holder.get("pid") and not pid_alive(int(holder["pid"])):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise ReconError(_in_use(self.target, holder)) from None
            if not _same_file(fd, self.path):  # replaced while we waited: take the new one
                os.close(fd)
                continue
            self.fd = fd
            _write_holder(fd)
            return self
        raise ReconError(f"{self.target} is locked by a process that keeps replacing {self.path}; wait, or pass --out")

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def hold(target: str | os.PathLike) -> FolderLock:
    """Take the lock on ``target`` for the rest of this process (or until :func:`release`); free if held."""
    path = Path(os.path.abspath(lock_file(target)))
    if path not in _HELD:
        _HELD[path] = FolderLock(target).acquire()
    return _HELD[path]


def release(target: str | os.PathLike) -> None:
    """Give back a lock taken with :func:`hold` (no-op when not held)."""
    lock = _HELD.pop(Path(os.path.abspath(lock_file(target))), None)
    if lock is not None:
        lock.release()


@contextlib.contextmanager
def updating(target: str | os.PathLike) -> Iterator[None]:
    """Hold ``target``'s lock for a short read-modify-write, waiting for another writer to finish."""
    lock = FolderLock(target).acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write_holder(fd: int) -> None:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _in_use(target: Path, holder: dict) -> str:
    who = f"PID {holder['pid']}" if holder.get("pid") else "another process"
    what = f" ({holder['command']})" if holder.get("command") else ""
    when = f", started {holder['started']}" if holder.get("started") else ""
    return f"{target} is in use by {who}{what}{when}; wait for it to finish, or write into another run folder (--out)"
