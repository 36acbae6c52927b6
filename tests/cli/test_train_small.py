"""`misguard train` on too little data for a validation split: one line that says what to change, exit code 1,
and nothing written (the corrected run then starts clean)."""
from __future__ import annotations

import json

import pytest

from misguard.mis.demo_data import synthetic_verdicts
from tests.cli.test_cli import misguard


@pytest.fixture
def three_items(demo_dir, tmp_path):
    items = json.loads((demo_dir / "mis_easy.json").read_text())[:3]
    responses = tmp_path / "responses" / "tiny.jsonl"
    responses.parent.mkdir()
    responses.write_text("".join(json.dumps({**item, "split": "easy", "response": "Sure.", "model": "tiny"}) + "\n"
                                 for item in items))
    return responses, synthetic_verdicts(responses, tmp_path / "labels" / "tiny.jsonl")


@pytest.mark.parametrize("kind", ["vlm", "lite"])
def test_too_few_items_for_validation_is_one_line(kind, three_items, demo_dir, tiny_model, tmp_path):
    responses, labels = three_items
    out = tmp_path / "judge"
    base = ["--base", str(tiny_model("qwen2_vl"))] if kind == "vlm" else []
    result = misguard("train", "--kind", kind, "--responses", str(responses), "--labels", str(labels),
                      "--data", str(demo_dir), "--out", str(out), "--epochs", "1", "--quiet", *base)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "leaves no validation item" in lines[0] and "--val-frac" in lines[0]
    assert not out.exists()
