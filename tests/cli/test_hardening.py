"""The command line against hostile or careless use: one writer per --out, numbers out of range refused while the
options are parsed, and --out of the wrong kind refused, each with one line and never a traceback."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from misguard.cli.main import main
from misguard.core.errors import MisguardError
from misguard.core.jsonl import write_jsonl_atomic, write_verdicts
from misguard.core.labels import LabelSource
from misguard.core.locking import FOLDER_LOCK
from misguard.core.records import Judgment, Verdict
from misguard.engines import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.judge_training.lite import LiteTrainConfig
from misguard.judge_training.vlm import TrainConfig
from misguard.mis.agree import AgreeConfig
from misguard.mis.calibrate import CalibrateConfig
from misguard.mis.infer import InferConfig
from misguard.mis.score import ScoreConfig
from misguard.mis.train import TrainData
from tests.core.lock_holder import Holder


def misguard(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run the `misguard` entry point in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["misguard", *map(str, args)])
    with pytest.raises(SystemExit) as caught:
        main()
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def labels(demo_dir, tmp_path_factory):
    """A judgments file with probabilities and GPT-4o-style reference labels for the same responses (what
    `calibrate` and `agree` read), and a verdicts file that `score --from-labels` reads."""
    folder = tmp_path_factory.mktemp("labels")
    items = json.loads((demo_dir / "mis_easy.json").read_text())
    rng = np.random.default_rng(0)
    judgments, verdicts = [], []
    for n, item in enumerate(items):
        p = float(rng.uniform())
        fields = dict(category=item["category"], question=item["question"], response=f"response {n}",
                      image_path1=item["image_path1"], image_path2=item["image_path2"])
        judgments.append(Judgment(**fields, label_perception="Perception Level1", label_str="Unsafe" if p >= 0.5
                                  else "Safe", id=str(item["id"]), split="easy", sub_category=item["sub_category"],
                                  model="target", p_unsafe=p, judge="j", template="t"))
        verdicts.append(Verdict(**fields, label_perception="Perception Level1",
                                label_str="Unsafe" if p + rng.normal(0, 0.2) >= 0.6 else "Safe"))
    write_jsonl_atomic(folder / "judgments.jsonl", judgments)
    write_verdicts(folder / "reference.jsonl", verdicts)
    return {"judgments": folder / "judgments.jsonl", "reference": folder / "reference.jsonl"}


# --------------------------------------------------------------------------------------------------------
# One writer per --out
# --------------------------------------------------------------------------------------------------------

def test_infer_is_refused_while_another_run_writes_its_responses(tiny_model, demo_dir, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "out"
    responses = out / "easy" / "target.jsonl"
    command = ["infer", "--model", tiny_model("qwen2_vl"), "--data", demo_dir, "--split", "easy", "--out", out,
               "--model-name", "target", "--limit", 1, "--max-new-tokens", 2, "--dtype", "float32", "--quiet"]
    holder = Holder(responses, folder=False)
    try:
        code, _, err = misguard(capsys, monkeypatch, *command)
    finally:
        holder.release()
    assert code == 1 and f"pid {holder.pid}" in one_error_line(err) and str(responses) in err
    assert not responses.exists()
    # Another shard of the same --out has a lock of its own: shards run side by side.
    holder = Holder(responses, folder=False)
    try:
        code, _, err = misguard(capsys, monkeypatch, *command, "--shard", "0/2")
    finally:
        holder.release()
    assert code == 0, err
    # Resume still does only what is missing: one response per item, never duplicated.
    for limit in (1, 2):
        code, _, err = misguard(capsys, monkeypatch, *command[:-7], "--limit", limit, *command[-5:])
        assert code == 0, err
    ids = [json.loads(line)["id"] for line in responses.read_text().splitlines()]
    assert len(ids) == 2 == len(set(ids))


def test_score_is_refused_while_another_run_writes_out_and_goes_on_after_a_kill(labels, demo_dir, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "scores"
    command = ["score", "--from-labels", labels["reference"], "--data", demo_dir, "--out", out, "--bootstrap", 0]
    holder = Holder(out, folder=True)
    try:
        code, _, err = misguard(capsys, monkeypatch, *command)
        assert code == 1 and f"pid {holder.pid}" in one_error_line(err) and str(out) in err
        assert not (out / "judgments.jsonl").exists()
    finally:
        holder.kill()  # kill -9: the lock file stays, its flock goes with the process
    assert (out / FOLDER_LOCK).read_text().strip() == str(holder.pid)
    for _ in range(2):  # and a re-run keeps one judgment per response
        code, _, err = misguard(capsys, monkeypatch, *command)
        assert code == 0, err
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == len({(j["model"], j["split"], j["id"]) for j in judgments}) > 0


# --------------------------------------------------------------------------------------------------------
# --out of the wrong kind
# --------------------------------------------------------------------------------------------------------

def test_out_of_the_wrong_kind_is_one_line_naming_it(labels, demo_dir, tmp_path, capsys, monkeypatch):
    a_file, a_folder = tmp_path / "taken.json", tmp_path / "folder"
    a_file.write_text("keep me")
    a_folder.mkdir()
    calibrate = ["calibrate", labels["judgments"], "--reference", labels["reference"], "--out"]
    agree = ["agree", labels["judgments"], "--reference", labels["reference"], "--no-plots", "--bootstrap", 0,
             "--out"]
    score = ["score", "--from-labels", labels["reference"], "--data", demo_dir, "--bootstrap", 0, "--out"]
    for command, out in ((score, a_file), (agree, a_file), (calibrate, a_folder),
                         (agree, Path("/proc/self/misguard-out")), (calibrate, Path("/proc/self/status"))):
        code, _, err = misguard(capsys, monkeypatch, *command, out)
        assert code == 1 and str(out) in one_error_line(err), (command, err)
    assert a_file.read_text() == "keep me" and list(a_folder.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# Numbers out of range: refused by the options, and by the records the library builds
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,option,value", [
    ("infer", "--batch-size", "0"), ("infer", "--batch-size", "-3"), ("infer", "--limit", "-2"),
    ("infer", "--temperature", "nan"), ("infer", "--temperature", "inf"), ("infer", "--max-new-tokens", "0"),
    ("infer", "--top-p", "0"), ("infer", "--top-p", "1.5"), ("infer", "--concurrency", "0"),
    ("infer", "--timeout-s", "0"), ("infer", "--gpu-memory-utilization", "nan"), ("infer", "--seed", "-1"),
    ("score", "--bootstrap", "-5"), ("agree", "--max-unmatched", "2"), ("agree", "--bootstrap", "-1"),
    ("calibrate", "--flag-share", "nan"), ("train", "--lr", "0"), ("train", "--epochs", "0"),
    ("train", "--val-frac", "1"), ("train", "--lora-dropout", "-0.5"), ("train", "--max-tokens", "4096"),
    ("demo", "--items", "0"), ("make-demo-data", "--items", "0"), ("make-tiny-model", "--seed", "-1"),
])
def test_an_option_out_of_range_is_refused_at_parse_time(command, option, value, tmp_path, capsys, monkeypatch):
    required = {"infer": ["--model", tmp_path, "--data", tmp_path, "--split", "easy", "--out", tmp_path / "o"],
                "score": ["--from-labels", tmp_path / "v.jsonl", "--data", tmp_path, "--out", tmp_path / "o"],
                "agree": [tmp_path / "j.jsonl", "--reference", tmp_path / "r.jsonl", "--out", tmp_path / "o"],
                "calibrate": [tmp_path / "j.jsonl", "--reference", tmp_path / "r.jsonl", "--out", tmp_path / "c"],
                "train": ["--base", tmp_path, "--out", tmp_path / "o"], "demo": ["--out", tmp_path / "o"],
                "make-demo-data": [tmp_path / "o"], "make-tiny-model": [tmp_path / "o"]}[command]
    code, _, err = misguard(capsys, monkeypatch, command, *required, option, value)
    line = one_error_line(err)
    assert code == 2 and f"'{option}'" in line, err
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


@pytest.mark.parametrize("build,field", [
    (lambda: EngineOptions(batch_size=0), "batch_size"),
    (lambda: EngineOptions(gpu_memory_utilization=math.nan), "gpu_memory_utilization"),
    (lambda: EngineOptions(timeout_s=-1.0), "timeout_s"),
    (lambda: GenerationParams(temperature=math.nan), "temperature"),
    (lambda: GenerationParams(max_new_tokens=0), "max_new_tokens"),
    (lambda: TrainConfig(base=Path("b"), out=Path("o"), lr=0.0), "lr"),
    (lambda: LiteTrainConfig(out=Path("o"), epochs=0), "epochs"),
    (lambda: TrainData(val_frac=1.0), "val_frac"),
    (lambda: InferConfig(model="m", data=Path("d"), split="easy", out=Path("o"), limit=-2), "limit"),
    (lambda: ScoreConfig(responses=[], judge=Path("j"), data=Path("d"), out=Path("o"), n_bootstrap=-5),
     "n_bootstrap"),
    (lambda: AgreeConfig(judgments=LabelSource(Path("j")), reference=LabelSource(Path("r")), out=Path("o"),
                         max_unmatched_share=2.0), "max_unmatched_share"),
    (lambda: CalibrateConfig(judgments=LabelSource(Path("j")), reference=LabelSource(Path("r")), out=Path("o"),
                             max_unmatched_share=math.inf), "max_unmatched_share"),
])
def test_the_library_records_refuse_the_same_values(build, field):
    with pytest.raises(MisguardError, match=rf"\.{field} must be"):
        build()
