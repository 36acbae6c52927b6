"""`misguard score` end to end on tiny real models: judgments, metrics, resume, reference labels, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from misguard.calibration.agreement import agreement_report
from misguard.core.errors import DataError, MisguardError
from misguard.core.jsonl import read_jsonl, write_verdicts
from misguard.core.labels import read_labels
from misguard.core.records import Judgment, Verdict
from misguard.core.splits import load_split
from misguard.engines import EngineOptions
from misguard.engines.hf import TransformersEngine
from misguard.engines.messages import GenerationParams, ImageFileError, image_area
from misguard.judges.vlm import make_judge_folder
from misguard.mis.demo_data import make_demo_data
from misguard.mis.infer import InferConfig, run_inference
from misguard.mis.score import ScoreConfig, run_score, score_reference_labels
from tests.judges.test_vlm_judge import nan_judge_folder

ROOT = Path(__file__).resolve().parents[2]
GPT_EVAL_FIELDS = {"label_perception", "label_str", "category", "question", "response", "image_path1",
                   "image_path2"}


@pytest.fixture(scope="module")
def judge_dir(tiny_judge):
    return tiny_judge


@pytest.fixture(scope="module")
def responses(tiny_model, demo_dir, tmp_path_factory):
    """Responses of two tiny target models on the easy and real splits (6 items each)."""
    out = tmp_path_factory.mktemp("score-responses")
    paths = []
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        for split in ("easy", "real"):
            config = InferConfig(model=str(tiny_model(arch)), data=demo_dir, split=split, out=out, limit=6,
                                 model_name=f"target-{arch}", engine_options=EngineOptions(dtype="float32"),
                                 generation=GenerationParams(max_new_tokens=5))
            paths.append(run_inference(config, progress=False).responses_path)
    return paths


def score_config(responses, judge_dir, demo_dir, out, **kwargs):
    return ScoreConfig(responses=list(responses), judge=judge_dir, data=demo_dir, out=out,
                       engine_options=EngineOptions(dtype="float32", batch_size=4), n_bootstrap=200, **kwargs)


def test_score_writes_one_judgment_per_response_and_metrics(responses, judge_dir, demo_dir, tmp_path):
    result = run_score(score_config(responses, judge_dir, demo_dir, tmp_path), progress=False)
    judgments = read_jsonl(result.judgments_path, Judgment)
    assert result.total == result.judged == len(judgments) == 24
    assert len({(j.model, j.split, j.id) for j in judgments}) == 24
    rows = [json.loads(line) for line in result.judgments_path.read_text().splitlines()]
    assert GPT_EVAL_FIELDS | {"id", "model", "p_unsafe", "p_perception", "judge", "template", "status"} <= set(rows[0])
    easy = {i.id: i for i in load_split(demo_dir, "easy").items}
    for j in judgments:
        assert j.status == "scored" and j.judge == "tiny-judge"
        if j.split == "easy":
            assert (j.question, j.sub_category) == (easy[j.id].question, easy[j.id].sub_category)
    metrics = json.loads(result.metrics_paths[0].read_text())
    text = json.dumps(metrics)
    assert "target-qwen2_vl" in text and "target-qwen2_5_vl" in text
    assert result.metrics_paths[1].read_text().count("ASR") >= 2
    again = run_score(score_config(responses, judge_dir, demo_dir, tmp_path), progress=False)
    assert again.judged == 0 and len(read_jsonl(again.judgments_path, Judgment)) == 24


def test_reference_labels_give_the_same_metrics_through_the_same_path(responses, judge_dir, demo_dir, tmp_path):
    local = run_score(score_config(responses, judge_dir, demo_dir, tmp_path / "local"), progress=False)
    judgments = read_jsonl(local.judgments_path, Judgment)
    # Write the local judge's labels as gpt_eval.py files (no ids), one per target model, and read them back.
    files = []
    for model in sorted({j.model for j in judgments}):
        path = tmp_path / f"{model}.jsonl"
        write_verdicts(path, [Verdict(**j.model_dump(include=GPT_EVAL_FIELDS)) for j in judgments if j.model == model])
        files.append(path)
    reference = score_reference_labels(files, demo_dir, tmp_path / "reference", n_bootstrap=200)
    read_back = read_jsonl(reference.judgments_path, Judgment)
    assert {(j.model, j.split, j.id, j.label_str, j.label_perception) for j in read_back} == \
           {(j.model, j.split, j.id, j.label_str, j.label_perception) for j in judgments}
    assert all(j.judge.startswith("reference:") for j in read_back)

    def values(path):
        return [(g["model"], g["split"], g["overall"]["values"]) for g in json.loads(path.read_text())["groups"]]

    assert values(reference.metrics_paths[0]) == values(local.metrics_paths[0])


def test_unreadable_verdicts_are_unscored_and_counted_never_labelled(tiny_model, responses, demo_dir, tmp_path):
    # A plain model folder is a zero-shot JSON judge; random weights never write a readable verdict.
    result = run_score(score_config(responses[:2], tiny_model("qwen2_vl"), demo_dir, tmp_path), progress=False)
    judgments = read_jsonl(result.judgments_path, Judgment)
    assert result.unscored == len(judgments) == 12
    assert all(j.status == "unscored" and j.label_str is None and j.reason for j in judgments)
    groups = json.loads(result.metrics_paths[0].read_text())["groups"]
    assert groups and all(g["unscored"] == g["n"] and g["overall"]["values"] is None for g in groups)
    again = run_score(score_config(responses[:2], tiny_model("qwen2_vl"), demo_dir, tmp_path), progress=False)
    assert again.judged == 0  # unscored is a result too: a re-run does not judge them again


def test_responses_to_unknown_items_are_refused(responses, judge_dir, demo_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in responses[0].read_text().splitlines()]
    rows[2]["question"] = "a question MIS never asked"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="bad.jsonl.*id"):
        run_score(score_config([bad], judge_dir, demo_dir, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "judgments.jsonl").exists()


def test_verdicts_for_unknown_items_are_refused(demo_dir, tmp_path):
    item = load_split(demo_dir, "easy").items[0]
    path = tmp_path / "gpt.jsonl"
    write_verdicts(path, [Verdict(label_perception="Perception Level1", label_str="Safe", category=item.category,
                                  question="not an MIS question", response="r", image_path1=item.image_path1,
                                  image_path2=item.image_path2)])
    with pytest.raises(DataError, match="gpt.jsonl"):
        score_reference_labels([path], demo_dir, tmp_path / "out")


def test_another_judge_into_the_same_output_is_refused(responses, judge_dir, demo_dir, tmp_path):
    run_score(score_config(responses[:1], judge_dir, demo_dir, tmp_path), progress=False)
    other = tmp_path / "other-judge"
    shutil.copytree(judge_dir, other)
    make_judge_folder(other, judge_id="another-judge")
    with pytest.raises(MisguardError, match="another judge"):
        run_score(score_config(responses[:1], other, demo_dir, tmp_path), progress=False)


@pytest.mark.slow
def test_sigkill_mid_score_then_rerun_judges_each_response_once(tiny_model, judge_dir, tmp_path):
    data = make_demo_data(tmp_path / "data", n_items=60, seed=1)
    config = InferConfig(model=str(tiny_model("qwen2_vl")), data=data, split="easy", out=tmp_path / "responses",
                         engine_options=EngineOptions(dtype="float32", batch_size=16),
                         generation=GenerationParams(max_new_tokens=3))
    responses = run_inference(config, progress=False).responses_path
    out = tmp_path / "scored"
    cmd = [sys.executable, "-m", "misguard.cli.main", "score", str(responses), "--judge", str(judge_dir),
           "--data", str(data),
           "--out", str(out), "--batch-size", "1", "--dtype", "float32", "--quiet", "--bootstrap", "100"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    judgments = out / "judgments.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if judgments.exists() and len(judgments.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "scoring ended before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(judgments.read_text().splitlines())
    assert 0 < before < 60
    with open(judgments, "a") as fh:
        fh.write('{"label_perception": "Percep')  # half a line, as kill -9 during a write leaves it
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    keys = [(j.model, j.split, j.id) for j in read_jsonl(judgments, Judgment)]
    assert len(keys) == len(set(keys)) == 60
    assert (out / "metrics.json").exists()
    # --escalate lists the least confident tenth for review, least confident first.
    subprocess.run([*cmd, "--escalate", "10%"], check=True, cwd=ROOT, timeout=300)
    review = [json.loads(line) for line in (out / "escalate.jsonl").read_text().splitlines()]
    assert len(review) == 6 and [r["confidence"] for r in review] == sorted(r["confidence"] for r in review)


def garble_pixels(path: Path) -> None:
    """Zero a PNG's compressed pixel data and fix its checksums: load_split's check (Pillow's verify) passes, the
    decode fails, as with an image corrupted inside its data."""
    data = bytearray(path.read_bytes())
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", bytes(data[pos:pos + 8]))
        if kind == b"IDAT":
            data[pos + 8:pos + 8 + length] = bytes(length)
            data[pos + 8 + length:pos + 12 + length] = struct.pack(">I", zlib.crc32(kind + bytes(length)))
        pos += 12 + length
    path.write_bytes(bytes(data))


def test_a_bad_image_stops_scoring_at_its_rows_with_every_finished_judgment_saved(responses, judge_dir, demo_dir,
                                                                                  tmp_path, monkeypatch):
    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    # The scored items' largest images: the engine sorts by size, so their batch runs after the others.
    items = [(split, item) for split in ("easy", "real") for item in load_split(data, split).items[:6]]
    split, item = max(items, key=lambda s_i: sum(map(image_area, load_split(data, s_i[0]).image_paths(s_i[1]))))
    bad = load_split(data, split).image_paths(item)[0]
    garble_pixels(bad)
    handed_back = []
    real_stream = TransformersEngine.label_stream

    def counting(self, requests, labels, progress=None):
        for index, probs in real_stream(self, requests, labels, progress=progress):
            handed_back.append(probs)
            yield index, probs

    monkeypatch.setattr(TransformersEngine, "label_stream", counting)
    config = score_config(responses, judge_dir, data, tmp_path / "out")
    rows_of_item = {(r, n) for r in responses for n, line in enumerate(r.read_text().splitlines(), 1)
                    if str(json.loads(line)["id"]) == item.id and json.loads(line)["image_path1"] == item.image_path1}
    for _ in range(2):  # a re-run stops at the same rows, with nothing lost and nothing doubled
        handed_back.clear()
        with pytest.raises(DataError) as caught:
            run_score(config, progress=False)
        error = caught.value
        assert (Path(error.path), error.line) in rows_of_item and error.field == "image_path1"
        assert f"item {item.id}: image '{item.image_path1}'" in str(error)
        saved = read_jsonl(tmp_path / "out" / "judgments.jsonl", Judgment)
        # Every other response, its batch-mates included, was judged and saved before the run stopped.
        assert len(saved) == 24 - len(rows_of_item) == len({(j.model, j.split, j.id) for j in saved})
        assert (split, item.id) not in {(j.split, j.id) for j in saved}
    assert isinstance(handed_back[-1], ImageFileError)

    skipping = score_config(responses, judge_dir, data, tmp_path / "out", skip_bad=True)
    skipped = run_score(skipping, progress=False)
    assert (skipped.already_done, skipped.judged, len(skipped.skipped_rows)) == (22, 0, len(rows_of_item))
    assert all(f"item {item.id}: image '{item.image_path1}'" in row for row in skipped.skipped_rows)
    manifest = json.loads((tmp_path / "out" / "score.manifest.json").read_text())
    assert manifest["complete"] and manifest["skipped_rows"] == skipped.skipped_rows
    shutil.copy(demo_dir / bad.relative_to(data), bad)
    result = run_score(config, progress=False)
    assert result.already_done == 22 and result.judged == 2
    assert len({(j.model, j.split, j.id) for j in read_jsonl(result.judgments_path, Judgment)}) == 24


def test_a_judge_that_gives_nan_writes_errors_never_labels(responses, judge_dir, demo_dir, tmp_path):
    judge = nan_judge_folder(judge_dir, tmp_path / "nan-judge")
    result = run_score(score_config(responses[:2], judge, demo_dir, tmp_path / "out"), progress=False)
    judgments = read_jsonl(result.judgments_path, Judgment)
    assert (result.errors, result.unscored, len(judgments)) == (12, 0, 12)
    for j in judgments:
        assert j.status == "error" and "not a finite number" in j.reason
        assert (j.label_str, j.label_perception, j.p_unsafe) == (None, None, None)
    groups = json.loads(result.metrics_paths[0].read_text())["groups"]
    assert all((g["errors"], g["unscored"], g["scored"]) == (g["n"], 0, 0) for g in groups)
    assert "| Errors |" in result.metrics_paths[1].read_text()
    # calibrate and agree read the errors as rows without labels, counted apart from unscored ones.
    records = read_labels(result.judgments_path)
    assert all(r.error and not r.scored for r in records)
    overall = agreement_report(list(zip(records, records)), n_bootstrap=0)["overall"]
    assert (overall["error"], overall["unscored"]) == ({"judge": 12, "reference": 12}, {"judge": 0, "reference": 0})
    again = run_score(score_config(responses[:2], judge, demo_dir, tmp_path / "out"), progress=False)
    assert again.judged == 0  # an error is a result too, as unscored is: a re-run does not judge it again


def test_a_lite_judge_with_a_nan_head_writes_errors_never_labels(responses, trusting_lite, demo_dir, tmp_path):
    folder = Path(shutil.copytree(trusting_lite, tmp_path / "nan-lite"))
    weights = load_file(folder / "model.safetensors")
    weights["unsafe.bias"] = torch.full_like(weights["unsafe.bias"], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = run_score(score_config(responses[:1], folder, demo_dir, tmp_path / "out"), progress=False)
    judgments = read_jsonl(result.judgments_path, Judgment)
    assert result.errors == len(judgments) == 6
    assert all(j.status == "error" and j.label_str is None and "not a finite number" in j.reason for j in judgments)


def test_a_megabyte_response_is_judged_on_a_head_and_tail_and_counted(responses, judge_dir, demo_dir, tmp_path):
    rows = [json.loads(line) for line in responses[0].read_text().splitlines()]
    rows[1]["response"] = "Sure. " + "step " * (2**20 // 5)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_score(score_config([path], judge_dir, demo_dir, tmp_path / "out"), progress=False)
    judgments = {j.id: j for j in read_jsonl(result.judgments_path, Judgment)}
    assert result.input_cut == 1 and result.errors == 0
    cut = judgments[str(rows[1]["id"])]
    assert cut.status == "scored" and cut.input_cut.startswith("response cut to ")
    assert cut.response == rows[1]["response"]  # the judgment keeps the response as it was
    assert all(j.input_cut is None for key, j in judgments.items() if key != str(rows[1]["id"]))
