"""The target-inference loop on a tiny real model: output format, resume after SIGKILL, shards, settings."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from misguard.core.errors import DataError, MisguardError
from misguard.core.records import Item
from misguard.core.splits import load_split
from misguard.engines.base import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.mis.infer import InferConfig, merge_shards, output_paths, parse_shard, run_inference
from tests.hostile_data import hostile_copy

ITEM_FIELDS = set(Item.model_fields)
N_DEMO = 12  # the demo_dir fixture's items per split


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config_for(model: Path, data: Path, out: Path, **kwargs) -> InferConfig:
    return InferConfig(model=str(model), data=data, split="easy", out=out,
                       engine_options=EngineOptions(dtype="float32", batch_size=4),
                       generation=GenerationParams(max_new_tokens=6), **kwargs)


def test_writes_one_response_per_item_with_item_fields(tiny_model, demo_dir, tmp_path):
    result = run_inference(config_for(tiny_model("qwen2_vl"), demo_dir, tmp_path), progress=False)
    assert result.responses_path == tmp_path / "easy" / f"{tiny_model('qwen2_vl').name}.jsonl"
    rows = lines_of(result.responses_path)
    items = load_split(demo_dir, "easy").items
    # In the split's order, each id with the split file's type (the demo's ids are integers).
    assert [r["id"] for r in rows] == [i.model_dump()["id"] for i in items] and isinstance(rows[0]["id"], int)
    by_id = {i.id: i for i in items}
    for row in rows:
        assert set(row) == ITEM_FIELDS | {"response", "model"}
        assert row["model"] == Path(tiny_model("qwen2_vl")).name
        assert {k: row[k] for k in ITEM_FIELDS} == by_id[str(row["id"])].model_dump()
        assert isinstance(row["response"], str)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["complete"] and manifest["items"] == len(items)
    assert manifest["settings"]["generation"]["max_new_tokens"] == 6
    assert result.generated == len(items) and result.already_done == 0


def test_rerun_does_only_missing_items(tiny_model, demo_dir, tmp_path):
    model = tiny_model("qwen2_vl")
    first = run_inference(config_for(model, demo_dir, tmp_path, limit=5), progress=False)
    assert first.generated == 5
    second = run_inference(config_for(model, demo_dir, tmp_path), progress=False)
    assert (second.already_done, second.generated) == (5, second.total - 5)
    rows = lines_of(second.responses_path)
    assert len(rows) == len({r["id"] for r in rows}) == second.total
    third = run_inference(config_for(model, demo_dir, tmp_path), progress=False)
    assert third.generated == 0 and len(lines_of(third.responses_path)) == second.total


def test_other_settings_on_the_same_output_are_refused(tiny_model, demo_dir, tmp_path):
    model = tiny_model("qwen2_vl")
    run_inference(config_for(model, demo_dir, tmp_path, limit=2), progress=False)
    changed = config_for(model, demo_dir, tmp_path, limit=2)
    changed.generation = GenerationParams(max_new_tokens=7)
    with pytest.raises(MisguardError, match="other settings"):
        run_inference(changed, progress=False)


def test_shards_cover_the_split_once_and_merge(tiny_model, demo_dir, tmp_path):
    model = tiny_model("qwen2_vl")
    run_inference(config_for(model, demo_dir, tmp_path, shard=(0, 3)), progress=False)
    with pytest.raises(MisguardError, match="missing shards"):
        merge_shards(tmp_path, "easy", Path(model).name)
    for i in (1, 2):
        run_inference(config_for(model, demo_dir, tmp_path, shard=(i, 3)), progress=False)
    merged = merge_shards(tmp_path, "easy", Path(model).name)
    rows = lines_of(merged)
    items = load_split(demo_dir, "easy").items
    assert [str(r["id"]) for r in rows] == sorted((i.id for i in items), key=int)
    whole = run_inference(config_for(model, demo_dir, tmp_path / "whole"), progress=False)
    assert {r["id"]: r for r in rows} == {r["id"]: r for r in lines_of(whole.responses_path)}


def test_merged_shards_of_a_split_with_string_ids_are_in_the_splits_order(tiny_model, demo_dir, tmp_path):
    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    rows = json.loads((data / "mis_easy.json").read_text())
    for n, row in enumerate(rows):  # names whose alphabetical order is not the split's
        row["id"] = f"case-{(7 * n) % len(rows)}"
    (data / "mis_easy.json").write_text(json.dumps(rows))
    model = tiny_model("qwen2_vl")
    for i in (0, 1):
        run_inference(config_for(model, data, tmp_path / "out", shard=(i, 2)), progress=False)
    merged = lines_of(merge_shards(tmp_path / "out", "easy", Path(model).name))
    assert [r["id"] for r in merged] == [row["id"] for row in rows] != sorted(row["id"] for row in rows)


@pytest.mark.parametrize("text", ["3", "3/3", "-1/2", "a/b"])
def test_bad_shard_spec(text):
    with pytest.raises(MisguardError):
        parse_shard(text)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_every_item_exactly_once(tiny_model, demo_dir, tmp_path):
    model = tiny_model("qwen2_vl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "misguard.cli.main", "infer", "--model", str(model), "--data", str(demo_dir),
           "--split", "easy", "--out", str(out), "--batch-size", "1", "--max-new-tokens", "150", "--quiet",
           "--dtype", "float32"]
    responses = out / "easy" / f"{model.name}.jsonl"
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if responses.exists() and len(responses.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(lines_of(responses))
    total = len(load_split(demo_dir, "easy").items)
    assert 0 < done_before < total
    # What kill -9 during a write can leave: half a JSON line at the end.
    with open(responses, "a") as fh:
        fh.write('{"id": "half-written", "question": "unfinis')
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2])
    ids = [r["id"] for r in lines_of(responses)]
    assert len(ids) == len(set(ids)) == total


# ------------------------------------------------------------------------------------------------ hostile images

def test_a_truncated_image_stops_the_run_at_its_item_with_every_other_response_saved(tiny_model, demo_dir,
                                                                                     tmp_path):
    data, item, line = hostile_copy(demo_dir, tmp_path)
    config = config_for(tiny_model("qwen2_vl"), data, tmp_path / "out")
    for _ in range(2):  # a re-run stops at the same item, with nothing lost and nothing doubled
        with pytest.raises(DataError) as caught:
            run_inference(config, progress=False)
        error = caught.value
        assert (error.path, error.line, error.field) == (str(data / "mis_easy.json"), line, "image_path1")
        assert f"item {item.id}:" in str(error) and "not a readable image" in str(error)
        ids = [r["id"] for r in lines_of(output_paths(config)[0])]
        # Its batch ran last; the good items in it were saved before the run stopped.
        assert sorted(map(str, ids)) == sorted(i.id for i in load_split(data, "easy").items if i.id != item.id)


def test_with_skip_bad_an_undecodable_image_is_a_skipped_item_and_the_run_goes_on(tiny_model, demo_dir, tmp_path):
    data, item, line = hostile_copy(demo_dir, tmp_path)
    config = config_for(tiny_model("qwen2_vl"), data, tmp_path / "out", skip_bad=True)
    result = run_inference(config, progress=False)
    assert (result.generated, result.skipped_items) == (N_DEMO - 1, 1)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["complete"] and len(manifest["skipped_rows"]) == 1
    assert manifest["skipped_rows"][0].startswith(
        f"{data / 'mis_easy.json'}:{line}: field 'image_path1': item {item.id}: image '{item.image_path1}': not a "
        "readable image")
    again = run_inference(config, progress=False)  # only the bad item is left, and it is skipped again
    assert (again.already_done, again.generated, again.skipped_items) == (N_DEMO - 1, 0, 1)
    shutil.copy(demo_dir / item.image_path1, data / item.image_path1)  # mended: the next run does it
    mended = run_inference(config, progress=False)
    assert (mended.generated, mended.skipped_items) == (1, 0)
    ids = [r["id"] for r in lines_of(result.responses_path)]
    assert len(ids) == len(set(ids)) == N_DEMO


def test_an_image_over_the_pixel_limit_is_refused_at_its_item_before_the_model_loads(tiny_model, demo_dir,
                                                                                     tmp_path):
    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    split = load_split(data, "easy")
    item = split.items[3]
    # 17 KB on disk, 144 megapixels once decoded (the 12000 x 12000 PNG).
    Image.new("1", (12000, 12000)).save(split.image_paths(item)[1])
    config = config_for(Path("no-such-model"), data, tmp_path / "out")
    with pytest.raises(DataError, match="over the limit") as caught:
        run_inference(config, progress=False)  # refused by its header: no model is loaded, no pixel decoded
    assert (caught.value.line, caught.value.field) == (split.lines[item.id], "image_path2")
    assert f"item {item.id}:" in str(caught.value)
    skipping = config_for(tiny_model("qwen2_vl"), data, tmp_path / "out", skip_bad=True, limit=5)
    result = run_inference(skipping, progress=False)
    assert (result.generated, result.skipped_items) == (5, 1)  # --limit counts the items left
    assert item.id not in {str(r["id"]) for r in lines_of(result.responses_path)}
    small = config_for(Path("no-such-model"), data, tmp_path / "other")
    small.engine_options = EngineOptions(dtype="float32", batch_size=4, max_image_pixels=100)
    with pytest.raises(DataError, match="over the limit of 100"):
        run_inference(small, progress=False)  # --max-image-pixels is the split check's limit too
