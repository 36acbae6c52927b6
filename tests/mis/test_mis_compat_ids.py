"""misguard as a drop-in for the MIS scripts (issue 17, items 1-3): split files without ids, response files without
`model` (or `id`) as the MIS inference scripts write them, and output files in the split's order with its id type."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from misguard.core.records import Item
from misguard.core.splits import load_split
from misguard.engines import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.mis.demo_data import synthetic_verdicts
from misguard.mis.infer import InferConfig, run_inference

ROOT = Path(__file__).resolve().parents[2]


def misguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "misguard.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_ids(demo_dir: Path, tmp_path: Path) -> Path:
    """A copy of the demo data whose split files have no `id`, as the MIS dataset card lists the fields."""
    data = Path(shutil.copytree(demo_dir, tmp_path / "mis"))
    for split_file in data.glob("mis_*.json"):
        rows = json.loads(split_file.read_text())
        split_file.write_text(json.dumps([{k: v for k, v in row.items() if k != "id"} for row in rows], indent=2))
    return data


def mis_script_responses(data: Path, path: Path, rows: list[int]) -> Path:
    """Responses as the MIS inference scripts write them: the split file's row as it is plus `response`, no
    `model` (and here no `id`), one JSON line each, for the easy split's rows at `rows`, in that order."""
    items = json.loads((data / "mis_easy.json").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**items[n], "response": f"answer {n}"}) + "\n" for n in rows))
    return path


def test_a_split_without_ids_gets_its_rows_positions_as_integer_ids(demo_dir, tmp_path):
    data = without_ids(demo_dir, tmp_path)
    split = load_split(data, "easy")
    assert [item.model_dump()["id"] for item in split.items] == list(range(len(split.items)))
    again = load_split(data, "easy")
    assert [item.id for item in again.items] == [item.id for item in split.items]  # stable
    jsonl = data / "mis_easy.jsonl"
    (data / "mis_easy.json").rename(jsonl)
    rows = json.loads((demo_dir / "mis_easy.json").read_text())
    jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n\n" for r in rows))
    assert [item.model_dump()["id"] for item in load_split(data, "easy").items] == list(range(len(rows)))


def test_ids_keep_the_type_the_source_used():
    fields = {"question": "q", "category": "Hate", "sub_category": "s", "image_path1": "a", "image_path2": "b"}
    as_int, as_str = Item(id=7, **fields), Item(id="7", **fields)
    assert as_int.id == as_str.id == "7" and hash(as_int.id) == hash("7")  # keyed and compared as strings
    assert json.loads(as_int.model_dump_json())["id"] == 7 and json.loads(as_str.model_dump_json())["id"] == "7"
    assert Item(**as_int.model_dump()).model_dump()["id"] == 7  # a record built from another keeps the type


def test_infer_on_a_split_without_ids_writes_their_positions_as_integers(tiny_model, demo_dir, tmp_path):
    data = without_ids(demo_dir, tmp_path)
    model = tiny_model("qwen2_vl")
    result = misguard("infer", "--model", str(model), "--data", str(data), "--split", "easy", "--out",
                      str(tmp_path / "out"), "--limit", "4", "--max-new-tokens", "2", "--dtype", "float32", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = lines_of(tmp_path / "out" / "easy" / f"{model.name}.jsonl")
    assert [row["id"] for row in rows] == [0, 1, 2, 3]


def test_a_resumed_run_ends_in_split_order_with_the_splits_id_type(tiny_model, demo_dir, tmp_path):
    config = InferConfig(model=str(tiny_model("qwen2_vl")), data=demo_dir, split="easy", out=tmp_path, limit=5,
                         engine_options=EngineOptions(dtype="float32", batch_size=4),
                         generation=GenerationParams(max_new_tokens=2))
    path = run_inference(config, progress=False).responses_path
    # What batches finishing out of order leave behind, written by a misguard that wrote ids as strings.
    rows = lines_of(path)[::-1]
    path.write_text("".join(json.dumps({**row, "id": str(row["id"])}) + "\n" for row in rows))
    config.limit = None
    run_inference(config, progress=False)
    split_ids = [item.model_dump()["id"] for item in load_split(demo_dir, "easy").items]
    finished = lines_of(path)
    assert [row["id"] for row in finished] == split_ids and all(isinstance(i, int) for i in split_ids)
    assert {row["id"]: row["response"] for row in finished[:5]} == {int(r["id"]): r["response"] for r in rows}


def test_score_reads_mis_script_responses_named_by_file_or_model_name(tiny_judge, demo_dir, tmp_path):
    data = without_ids(demo_dir, tmp_path)
    order = [5, 2, 9, 0]  # not the split's order: the judgments follow the responses file's
    responses = mis_script_responses(data, tmp_path / "responses" / "qwen2_vl_7b.jsonl", order)
    common = ["--judge", str(tiny_judge), "--data", str(data), "--dtype", "float32", "--bootstrap", "0", "--quiet"]
    result = misguard("score", str(responses), "--out", str(tmp_path / "scores"), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    judgments = lines_of(tmp_path / "scores" / "judgments.jsonl")
    assert [(j["model"], j["id"]) for j in judgments] == [("qwen2_vl_7b", n) for n in order]

    result = misguard("score", str(responses), "--model-name", "Qwen2-VL-7B-Instruct", "--out",
                      str(tmp_path / "named"), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {j["model"] for j in lines_of(tmp_path / "named" / "judgments.jsonl")} == {"Qwen2-VL-7B-Instruct"}


def test_train_reads_mis_script_responses_named_by_file_or_model_name(tiny_model, demo_dir, tmp_path):
    # Verdicts made on misguard's own run, for target model "target"; the MIS script's file holds the same rows.
    ours = run_inference(InferConfig(model=str(tiny_model("qwen2_vl")), data=demo_dir, split="easy", limit=4,
                                     out=tmp_path / "runs", model_name="target",
                                     engine_options=EngineOptions(dtype="float32"),
                                     generation=GenerationParams(max_new_tokens=2)), progress=False).responses_path
    verdicts = synthetic_verdicts(ours, tmp_path / "gpt4o" / "target.jsonl")
    theirs = tmp_path / "mis-script" / "qwen2_vl_7b.jsonl"
    theirs.parent.mkdir()
    theirs.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "model"}) + "\n"
                              for row in lines_of(ours)))
    args = ["train", "--base", str(tiny_model("qwen2_vl")), "--responses", str(theirs), "--labels", str(verdicts),
            "--data", str(demo_dir), "--full", "--epochs", "1", "--val-frac", "0.25", "--quiet"]
    # Named by the file: "qwen2_vl_7b", which is not the verdicts' model: refused, naming both, before training.
    result = misguard(*args, "--out", str(tmp_path / "judge-by-file"))
    assert result.returncode == 1 and "responses are by ['qwen2_vl_7b']" in result.stderr, result.stderr[-3000:]
    result = misguard(*args, "--model-name", "target", "--out", str(tmp_path / "judge"))
    assert result.returncode == 0, result.stderr[-3000:]
    held_out = lines_of(tmp_path / "judge" / "validation_reference.jsonl")
    assert held_out and {r["model"] for r in held_out} == {"target"} and all(isinstance(r["id"], int) for r in held_out)
