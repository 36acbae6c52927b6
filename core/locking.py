"""One writer per output: every command that writes an `--out` holds that output's lock for the whole run.

Two runs appending to one responses or judgments file at once would each resume from what the other had not yet
written, and leave duplicates that every later run refuses. The lock is a file beside the output (`<file>.lock`)
or inside it (`<folder>/.misguard.lock`), locked with flock through filelock; the holder writes its pid into it, so
a second writer is refused at once with a message naming the holder. The kernel drops an flock when its process
ends, however it ends: a run killed with SIGKILL leaves only a file with an old pid in it, which the next run
locks and overwrites (a lock is stale exactly when nobody holds the flock, so taking it over is safe). The lock
files stay after the run: removing them would race with a run that has just opened one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from misguard.core.errors import MisguardError

FOLDER_LOCK = ".misguard.lock"
"""The lock of a folder output, inside the folder."""
LOCK_SUFFIX = ".lock"
"""The lock of a file output, beside the file: `<file>.lock`."""


@contextmanager
def exclusive_output(path: str | Path, *, folder: bool, create: bool = True) -> Iterator[Path]:
    """Hold the one-writer lock of the output `path` (a folder if `folder`, else a file) for the with-block; yields
    `path`. A folder output is created first (`create`; else it must exist), a file output's folder too; a folder
    created here is removed again when the block raises before anything but the lock was written in it.

    Raises MisguardError naming the path, before anything is written: another process holds the lock (the
    message names its pid), `path` is a file where a folder is expected, a folder (or a device, a pipe) where a
    file is expected, or it cannot be created or locked (a read-only place, /proc, ...).
    """
    path = Path(path)
    made = folder and not path.exists()
    lock_path = _lock_path(path, folder=folder, create=create)
    lock = FileLock(lock_path, blocking=False, on_acquired=_write_pid)
    try:
        lock.acquire()
    except Timeout:
        if not lock_path.exists():  # filelock reports a lock file it could not create (e.g. under /proc) as taken
            raise MisguardError(f"{path}: cannot lock it for writing (cannot create {lock_path})") from None
        raise MisguardError(f"{path}: another misguard run ({_holder(lock_path)}) is writing it, holding {lock_path}; "
                            "wait for it to finish or write elsewhere") from None
    except OSError as exc:
        raise MisguardError(f"{path}: cannot lock it for writing ({_reason(exc)}: {lock_path})") from None
    try:
        yield path
    except BaseException:
        lock.release()
        if made and [p.name for p in path.iterdir()] == [lock_path.name]:
            # A run that failed before writing anything leaves no folder behind (only its lock was in it).
            lock_path.unlink(missing_ok=True)
            path.rmdir()
        raise
    else:
        lock.release()


def _lock_path(path: Path, *, folder: bool, create: bool) -> Path:
    """Where `path`'s lock lives, after checking that `path` is (or can be made) the kind of output expected."""
    if folder:
        if path.exists() and not path.is_dir():
            raise MisguardError(f"{path}: not a folder; this output is a folder (give a folder's path)")
        if not create and not path.is_dir():
            raise MisguardError(f"{path}: no such folder")
        _make_folder(path)
        return path / FOLDER_LOCK
    if path.is_dir():
        raise MisguardError(f"{path}: is a folder; this output is a file (give a file's path)")
    if path.exists() and not path.is_file():
        raise MisguardError(f"{path}: not a regular file (a device, a pipe or a socket); this output is a file")
    _make_folder(path.parent)
    return _beside(path)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MisguardError(f"{folder}: cannot create the folder ({_reason(exc)})") from None


def _beside(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def _write_pid(fd: int) -> None:
    # filelock hands over the locked descriptor; the previous holder's pid (if any) is replaced.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(lock_path: Path) -> str:
    # The holder writes its pid right after it takes the lock: a refusal in between waits a moment for it.
    for _ in range(10):
        pid = _read_pid(lock_path)
        if pid is not None:
            return f"pid {pid}"
        time.sleep(0.02)
    return "pid unknown"


def _read_pid(lock_path: Path) -> int | None:
    try:
        text = lock_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
