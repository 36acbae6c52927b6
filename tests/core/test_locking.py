"""One writer per output: the lock is held across processes, names its holder, and dies with it (kill -9)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from misguard.core.errors import MisguardError
from misguard.core.locking import FOLDER_LOCK, exclusive_output
from tests.core.lock_holder import Holder


@pytest.mark.parametrize("folder", [True, False])
def test_a_second_writer_is_refused_naming_the_holders_pid(tmp_path, folder):
    out = tmp_path / ("out" if folder else "calibration.json")
    holder = Holder(out, folder=folder)
    try:
        with pytest.raises(MisguardError, match=rf"another misguard run \(pid {holder.pid}\) is writing it"):
            with exclusive_output(out, folder=folder):
                pass
    finally:
        holder.release()
    with exclusive_output(out, folder=folder):  # released: the next writer gets it
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = Holder(out, folder=True)
    lock = out / FOLDER_LOCK
    assert lock.read_text().strip() == str(holder.pid)
    holder.kill()
    assert lock.exists()  # the file stays, with the dead run's pid; the kernel dropped its flock
    with exclusive_output(out, folder=True):
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(MisguardError, match=rf"pid {os.getpid()}"):  # and it is held again
            with exclusive_output(out, folder=True):
                pass


def test_outputs_of_the_wrong_kind_are_refused_naming_the_path(tmp_path):
    a_file, a_folder = tmp_path / "file.json", tmp_path / "folder"
    a_file.write_text("{}")
    a_folder.mkdir()
    cases = [(a_file, True, "not a folder"), (a_folder, False, "is a folder"),
             (a_file / "inside", True, "cannot create the folder"), (Path(os.devnull), False, "not a regular file"),
             (Path("/proc/self/misguard-out"), True, "cannot create the folder"),
             (Path("/proc/self/status"), False, "cannot lock it"), (tmp_path / "missing", True, "no such folder")]
    for path, folder, reason in cases:
        with pytest.raises(MisguardError, match=reason) as caught:
            with exclusive_output(path, folder=folder, create=path.name != "missing"):
                pass
        assert str(caught.value).startswith(f"{path}: "), caught.value
    assert a_file.read_text() == "{}" and not (tmp_path / "missing").exists()
