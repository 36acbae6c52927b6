"""Another process holding an output's lock (core/locking.py), for tests of one writer per output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys
from pathlib import Path
from misguard.core.locking import exclusive_output
with exclusive_output(Path(sys.argv[1]), folder=sys.argv[2] == "folder"):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


class Holder:
    """Another process that holds the lock of `path` until it is released or killed."""

    def __init__(self, path: Path, *, folder: bool):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "folder" if folder else "file"],
                                        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line == "held\n", line

    @property
    def pid(self) -> int:
        return self.process.pid

    def release(self) -> None:
        self.process.communicate(timeout=30)
        assert self.process.returncode == 0

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        assert self.process.returncode == -signal.SIGKILL
