"""scripts/test.sh builds and uses its own environment (.venv-test), never the user's .venv: the scripts are run
in a copy of the repository with a stand-in `python3` on PATH that records every call instead of installing."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Records its argv; `-m venv DIR` makes DIR/bin/{python,lint-imports} (copies of itself); `-c CHECK` fails (the
# scripts ask "is this already installed?"), everything else succeeds.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$0 $*" >> "$CALLS"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; cp "$0" "$3/bin/lint-imports"; exit 0
fi
[ "$1" = "-c" ] && exit 1
exit 0
"""


def _run(script: str, tmp_path: Path) -> list[str]:
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    user_venv = repo / ".venv"
    (user_venv / "bin").mkdir(parents=True)
    (user_venv / "bin" / "marker").write_text("the user's own environment\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(FAKE_PYTHON)
    (fake_bin / "python3").chmod(stat.S_IRWXU)
    calls = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISGUARD_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{fake_bin}:/usr/bin:/bin", CALLS=str(calls))
    subprocess.run(["bash", f"scripts/{script}"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert sorted(p.name for p in (user_venv / "bin").iterdir()) == ["marker"]  # the user's .venv untouched
    return calls.read_text().splitlines()


def test_install_creates_and_fills_its_own_environment(tmp_path):
    calls = _run("install-test-env.sh", tmp_path)
    assert calls[0].endswith("python3 -m venv .venv-test")
    assert all(line.split()[0] == ".venv-test/bin/python" for line in calls[1:]), calls
    assert any("install" in line and "-e .[test]" in line for line in calls)


def test_the_tests_run_in_that_environment(tmp_path):
    calls = _run("test.sh", tmp_path)
    assert ".venv-test/bin/python -m pytest" in calls
    assert not any(line.startswith(".venv/") for line in calls)
