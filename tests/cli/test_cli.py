"""The command line as a user runs it: subprocesses of the installed entry point, exit codes, messages."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from misguard.engines import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.mis.demo_data import synthetic_verdicts
from misguard.mis.infer import InferConfig, run_inference

ROOT = Path(__file__).resolve().parents[2]
NETBLOCK = Path(__file__).parent / "netblock"


def misguard(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "misguard.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from misguard.cli.main import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_data_is_one_line_error_naming_file_line_and_field(demo_dir, tmp_path):
    data = tmp_path / "mis"
    shutil.copytree(demo_dir, data)
    path = data / "mis_easy.json"
    items = json.loads(path.read_text())
    del items[1]["question"]
    path.write_text(json.dumps(items, indent=2))
    result = misguard("infer", "--model", str(tmp_path / "no-model"), "--data", str(data), "--split", "easy",
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "mis_easy.json" in err[0] and "question" in err[0]
    assert not (tmp_path / "out" / "easy").exists() or not any((tmp_path / "out" / "easy").glob("*.jsonl"))


def test_missing_model_folder_is_a_clear_error(demo_dir, tmp_path):
    result = misguard("infer", "--model", "Qwen/Qwen2-VL-7B-Instruct", "--data", str(demo_dir), "--split", "easy",
                      "--out", str(tmp_path / "out"), "--limit", "1")
    assert result.returncode == 1
    assert "not a local model folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_with_outbound_network_blocked(tmp_path):
    netlog = tmp_path / "net.log"
    env = {"PYTHONPATH": os.pathsep.join([str(NETBLOCK), str(ROOT)]), "MISGUARD_NETLOG": str(netlog)}
    # Prove the block works in a child process before trusting a clean log.
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 443), 1)"],
                           env={**os.environ, **env}, capture_output=True, text=True)
    assert probe.returncode != 0 and "network blocked by test" in probe.stderr
    netlog.unlink()

    result = misguard("demo", "--out", str(tmp_path / "demo"), "--items", "4", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not netlog.exists(), netlog.read_text()
    for split in ("easy", "hard", "real"):
        files = list((tmp_path / "demo" / "responses" / split).glob("*.jsonl"))
        assert len(files) == 2
        for f in files:
            assert len(f.read_text().splitlines()) == 4
    assert "responses" in result.stdout
    # infer -> score: one judgment per response (2 targets x 3 splits x 4 items), metrics per model and split.
    judgments = [json.loads(line) for line in (tmp_path / "demo" / "scores" / "judgments.jsonl").open()]
    # The calibration fits a trust threshold on its own rows (5% flagged by default), so a few verdicts may be
    # out_of_domain: labelled, and counted apart from the metrics.
    statuses = [j["status"] for j in judgments]
    assert len(judgments) == 24 and set(statuses) <= {"scored", "out_of_domain"}
    assert statuses.count("out_of_domain") <= 6
    assert all(abs(sum(j["p_perception"].values()) - 1) < 1e-6 for j in judgments)
    groups = json.loads((tmp_path / "demo" / "scores" / "metrics.json").read_text())["groups"]
    assert {(g["split"]) for g in groups} == {"easy", "hard", "real", "all"}
    pooled = [g for g in groups if g["split"] == "all"]
    assert sum(g["out_of_domain"] for g in pooled) == statuses.count("out_of_domain")
    assert sum(g["scored"] for g in pooled) == statuses.count("scored")
    assert "metrics.md" in result.stdout
    # ... and train -> calibrate -> score with the calibration -> agree, every stage's files where it says.
    demo = tmp_path / "demo"
    card = json.loads((demo / "models" / "tiny-judge" / "judge_card.json").read_text())
    assert card["template"] == "mis-judge-codes-v1"
    assert all(j["calibration"] and j["p_unsafe_raw"] is not None for j in judgments)
    agreement = json.loads((demo / "agreement" / "agreement.json").read_text())
    assert agreement["judge_vs_reference"]["overall"]["n_pairs"] == 24
    assert (demo / "agreement" / "escalate.jsonl").exists() and (demo / "calibration.json").exists()
    # ... and the lite judge (the real encoder from its wheel, offline too), calibrated, then the cascade.
    lite_spec = json.loads((demo / "models" / "lite-judge" / "judge.json").read_text())
    assert lite_spec["kind"] == "lite" and lite_spec["calibration"] is not None
    cascade = [json.loads(line) for line in (demo / "scores-cascade" / "judgments.jsonl").open()]
    assert len(cascade) == 24 and {j["judge"] for j in cascade} == {"demo-lite", "tiny-judge"}  # some escalated
    # Every count the demo prints is the count in the files it names.
    lite_decided = sum(j["judge"] == "demo-lite" for j in cascade)
    assert f"{lite_decided} of 24 decided by the lite judge, {24 - lite_decided} " in result.stdout
    review = len((demo / "agreement" / "escalate.jsonl").read_text().splitlines())
    assert f"{review} least confident responses listed for review" in result.stdout
    assert agreement["escalation"]["escalated"] == review
    coverage_90 = next(p for p in agreement["escalation"]["curve"] if p["coverage"] == 0.9)
    assert coverage_90["escalated"] == review  # 10% escalated: the curve and the list agree
    # It says where it runs, first; the training steps show progress (the Trainer's bar on stderr).
    assert re.match(r"misguard demo on (the CPU \(\d+ threads|cuda)", result.stdout.splitlines()[0])
    assert "it/s]" in result.stderr or "s/it]" in result.stderr


def test_score_bad_input_is_one_line_error_naming_file_line_and_field(demo_dir, tmp_path):
    items = json.loads((demo_dir / "mis_easy.json").read_text())
    verdicts = tmp_path / "gpt4o.jsonl"
    rows = [{"label_perception": "Perception Level1", "label_str": "Safe", "category": i["category"],
             "question": i["question"], "response": "r", "image_path1": i["image_path1"],
             "image_path2": i["image_path2"]} for i in items[:3]]
    del rows[1]["label_str"]
    verdicts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = misguard("score", "--from-labels", str(verdicts), "--data", str(demo_dir), "--out", str(tmp_path / "o"))
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "gpt4o.jsonl:2" in err[0] and "label_str" in err[0]
    assert not (tmp_path / "o" / "metrics.json").exists()

    responses = tmp_path / "responses.jsonl"
    rows = [{**i, "response": "r", "model": "m"} for i in items[:3]]
    rows[2]["question"] = "a question MIS never asked"
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = misguard("score", str(responses), "--judge", str(tmp_path / "no-judge"), "--data", str(demo_dir),
                      "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not a judge folder" in result.stderr
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "config.json").write_text("{}")  # a model folder: zero-shot spec; responses are checked before loading
    result = misguard("score", str(responses), "--judge", str(judge), "--data", str(demo_dir),
                      "--out", str(tmp_path / "o"))
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(err) == 1, result.stderr
    assert "responses.jsonl:3" in err[0] and "'id'" in err[0]
    assert not (tmp_path / "o" / "judgments.jsonl").exists()


def test_train_from_the_command_line(tiny_model, demo_dir, tmp_path):
    responses = run_inference(InferConfig(
        model=str(tiny_model("qwen2_vl")), data=demo_dir, split="easy", out=tmp_path / "runs", model_name="target",
        engine_options=EngineOptions(dtype="float32"), generation=GenerationParams(max_new_tokens=3)),
        progress=False).responses_path
    verdicts = synthetic_verdicts(responses, tmp_path / "gpt4o" / "target.jsonl")
    args = ["train", "--base", str(tiny_model("qwen2_vl")), "--responses", str(responses), "--labels", str(verdicts),
            "--data", str(demo_dir), "--out", str(tmp_path / "judge"), "--full", "--epochs", "1", "--batch-size", "4",
            "--val-frac", "0.25", "--quiet"]
    result = misguard(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best epoch 1" in result.stdout and (tmp_path / "judge" / "judge.json").exists()
    held_out = [json.loads(line) for line in (tmp_path / "judge" / "validation_reference.jsonl").open()]
    card = json.loads((tmp_path / "judge" / "judge_card.json").read_text())
    assert len(held_out) == card["split_sizes"]["val"]["examples"] > 0
    assert {r["label_str"] for r in held_out} <= {"Safe", "Unsafe"} and all(r["id"] for r in held_out)

    # Verdicts for another target model than the responses': one clear line, and no judge folder.
    result = misguard(*[a if a != str(tmp_path / "judge") else str(tmp_path / "judge2") for a in args],
                      "--label-model-name", "some-other-model")
    err = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("misguard: WARNING")]
    assert result.returncode == 1 and len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "target.jsonl" in err[0]
    assert not (tmp_path / "judge2" / "judge.json").exists()
