"""How a run stops without a traceback: Ctrl-C says what was saved and how to resume; a wrong model path or a
missing optional package fails before anything is written, in one line."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from misguard.core.errors import EXTRAS
from misguard.core.manifests import InferManifest
from misguard.mis.demo_data import synthetic_verdicts
from tests.cli.test_cli import ROOT, misguard

NOEXTRAS = Path(__file__).parent / "noextras"
QUICK = ["--batch-size", "1", "--max-new-tokens", "3", "--dtype", "float32", "--quiet"]


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_ctrl_c_during_infer_says_what_was_saved_and_the_printed_command_resumes(tiny_model, demo_dir, tmp_path):
    out = tmp_path / "out"
    args = ["infer", "--model", str(tiny_model("qwen2_vl")), "--data", str(demo_dir), "--split", "easy",
            "--out", str(out), "--model-name", "target", *QUICK]
    responses = out / "easy" / "target.jsonl"
    # SIGINT as a terminal sends it; the default disposition, whatever the test runner's own is.
    process = subprocess.Popen([sys.executable, "-m", "misguard.cli.main", *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not (responses.exists() and responses.stat().st_size) and process.poll() is None:
        assert time.monotonic() < deadline, "no response saved in 10 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    notes = [line for line in stderr.splitlines() if line.startswith("misguard: interrupted")]
    assert len(notes) == 1, stderr
    match = re.fullmatch(r"misguard: interrupted: (\d+) of 12 responses saved in (.+); resume with: (misguard .+)",
                         notes[0])
    assert match, notes[0]
    saved = int(match[1])
    assert Path(match[2]) == responses and 0 < saved < 12
    assert len(responses.read_text().splitlines()) == saved
    command = shlex.split(match[3])
    assert command == ["misguard", *args]

    resumed = misguard(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{12 - saved} new responses ({saved} already there" in resumed.stdout
    ids = [json.loads(line)["id"] for line in responses.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12


def test_a_wrong_model_path_writes_nothing_and_the_corrected_run_starts_cleanly(tiny_model, demo_dir, tmp_path):
    out = tmp_path / "out"
    not_a_vlm = tmp_path / "bert"
    not_a_vlm.mkdir()
    (not_a_vlm / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for wrong, complaint in [(tmp_path / "typo" / "model", "not a local model folder"),
                             (not_a_vlm, "model_type 'bert'")]:
        result = misguard("infer", "--model", str(wrong), "--data", str(demo_dir), "--split", "easy", "--out",
                          str(out), "--model-name", "target", "--limit", "2", *QUICK)
        assert result.returncode == 1 and len(stderr_lines(result)) == 1, result.stderr
        assert complaint in result.stderr and "Traceback" not in result.stderr
        assert not out.exists(), sorted(out.rglob("*"))

    result = misguard("infer", "--model", str(tiny_model("qwen2_vl")), "--data", str(demo_dir), "--split", "easy",
                      "--out", str(out), "--model-name", "target", "--limit", "2", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "easy" / "target.jsonl").read_text().splitlines()) == 2


def test_a_manifest_of_a_run_that_saved_nothing_does_not_block_the_corrected_run(tiny_model, demo_dir, tmp_path):
    # What a wrong --model left behind before the model was checked first: a manifest, no response.
    out = tmp_path / "out"
    (out / "easy").mkdir(parents=True)
    InferManifest(settings={"model": str(tmp_path / "typo"), "model_name": "target"}, data=str(demo_dir),
                  items=2).save(out / "easy" / "target.manifest.json")
    (out / "easy" / "target.jsonl").write_text("")
    run = ["infer", "--model", str(tiny_model("qwen2_vl")), "--data", str(demo_dir), "--split", "easy", "--out",
           str(out), "--model-name", "target", "--limit", "2", *QUICK]
    result = misguard(*run)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "easy" / "target.manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["model"] == str(tiny_model("qwen2_vl"))

    # Once the file holds responses, other settings are a real conflict, refused as before.
    result = misguard(*run[:-len(QUICK)], "--max-new-tokens", "5", "--quiet")
    assert result.returncode == 1 and "started with other settings" in result.stderr, result.stderr


def _train_inputs(demo_dir: Path, tmp_path: Path) -> list[str]:
    """--responses, --labels and --data for a small `misguard train`: written responses, synthetic verdicts."""
    items = json.loads((demo_dir / "mis_easy.json").read_text())
    responses = tmp_path / "target.jsonl"
    answers = ["I can't help with that.", "Sure, first mix them."]
    responses.write_text("".join(json.dumps({**item, "response": answers[n % 2], "model": "target"}) + "\n"
                                 for n, item in enumerate(items)))
    verdicts = synthetic_verdicts(responses, tmp_path / "gpt4o" / "target.jsonl")
    return ["--responses", str(responses), "--labels", str(verdicts), "--data", str(demo_dir)]


@pytest.mark.parametrize("package", ["fastapi", "peft", "accelerate", "vllm"])
def test_a_missing_extra_is_one_line_with_the_pip_command(package, tiny_model, demo_dir, tmp_path):
    model, out = str(tiny_model("qwen2_vl")), tmp_path / "out"
    command, args = {
        "fastapi": ("serve", ["--judge", model, "--upstream", "http://127.0.0.1:9/v1"]),
        "peft": ("train", ["--base", model, *_train_inputs(demo_dir, tmp_path), "--out", str(out), "--epochs", "1"]),
        "accelerate": ("train", ["--kind", "lite", *_train_inputs(demo_dir, tmp_path), "--out", str(out)]),
        "vllm": ("infer", ["--model", model, "--data", str(demo_dir), "--split", "easy", "--out", str(out),
                           "--engine", "vllm"]),
    }[package]
    result = misguard(command, *args, env={"PYTHONPATH": os.pathsep.join([str(NOEXTRAS), str(ROOT)]),
                                           "MISGUARD_TEST_UNINSTALLED": package})
    extra = EXTRAS[package]
    assert result.returncode == 1
    assert stderr_lines(result) == [f"misguard: error: misguard {command} needs {package} (the [{extra}] extra): "
                                    f"pip install 'misguard[{extra}]'"], result.stderr[-3000:]
    assert not out.exists()
