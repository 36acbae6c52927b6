"""`agree` says what matched and why the rest did not; `calibrate --method auto` never keeps a calibration that is
worse than the judge's own probabilities on held-out rows (issue 17, items 15-16), at the command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from misguard.core.jsonl import write_jsonl_atomic
from tests.cli.test_hardening import misguard, one_error_line


def label_row(model: str, item: int, safety: str = "Safe") -> dict:
    return {"id": str(item), "model": model, "split": "easy", "label_str": safety,
            "label_perception": "Perception Level1"}


@pytest.fixture()
def partial_reference(tmp_path) -> dict[str, Path]:
    """Judgments of items 1-10 by models a and b; a reference that labels items 1-6 for model a only, and three
    rows with no judgment: items 11 and 12 (judged by nobody) and item 1 for model c (judged for a and b)."""
    judgments = [label_row(model, item) for model in ("a", "b") for item in range(1, 11)]
    reference = [label_row("a", item) for item in range(1, 7)]
    reference += [label_row("a", 11), label_row("a", 12), label_row("c", 1)]
    paths = {"judgments": tmp_path / "judgments.jsonl", "reference": tmp_path / "reference.jsonl"}
    write_jsonl_atomic(paths["judgments"], judgments)
    write_jsonl_atomic(paths["reference"], reference)
    return paths


def test_agree_prints_and_writes_matched_and_unmatched_rows_by_reason(partial_reference, tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "agreement"
    code, stdout, err = misguard(capsys, monkeypatch, "agree", partial_reference["judgments"], "--reference",
                                 partial_reference["reference"], "--out", out, "--max-unmatched", 0.5,
                                 "--bootstrap", 0, "--no-plots")
    assert code == 0, err
    join = json.loads((out / "agreement.json").read_text())["judge_vs_reference"]["join"]
    # Judge side: 20 rows, 6 matched; items 7-10 (both models) are not in the reference, b's 1-6 are a's only.
    assert {key: join["judge"][key] for key in ("rows", "matched", "unmatched")} == {
        "rows": 20, "matched": 6, "unmatched": 14}
    assert join["judge"]["by_reason"] == {"unknown_item": 8, "other_models_only": 6, "other_response": 0}
    assert join["judge"]["other_models"] == ["a", "c"]  # item 1 is labelled for c too
    # Reference side: 11 and 12 were judged for no model, item 1 of model c only for a and b.
    assert {key: join["reference"][key] for key in ("rows", "matched", "unmatched")} == {
        "rows": 9, "matched": 6, "unmatched": 3}
    assert join["reference"]["by_reason"] == {"unknown_item": 2, "other_models_only": 1, "other_response": 0}
    assert len(join["judge"]["examples"]["unknown_item"]) == 3  # a few examples, not every row
    assert all("judgments.jsonl:" in example for example in join["judge"]["examples"]["unknown_item"])
    assert "model 'c'" in join["reference"]["examples"]["other_models_only"][0]

    expected = ["judge rows: 20, matched 6, unmatched 14:",
                "8 with an id the reference has no row for, e.g.",
                "6 with an id the reference has for other models only (a, c), e.g.",
                "reference rows: 9, matched 6, unmatched 3:",
                "2 with an id the judge has no row for, e.g.",
                "1 with an id the judge has for other models only (a, b), e.g."]
    markdown = (out / "agreement.md").read_text()
    for text in expected:
        assert text in stdout, (text, stdout)
        assert text in markdown, (text, markdown)
    assert "6 pairs; safety" in stdout


def test_agree_takes_judgments_beyond_the_reference_but_not_labels_without_a_judgment(partial_reference, tmp_path,
                                                                                      capsys, monkeypatch):
    reference = tmp_path / "matched-reference.jsonl"
    write_jsonl_atomic(reference, [label_row("a", item) for item in range(1, 7)])
    # A reference for one target model and a sample of the items: 70% of the judgments have no label, as
    # expected, and the report says why.
    code, stdout, err = misguard(capsys, monkeypatch, "agree", partial_reference["judgments"], "--reference",
                                 reference, "--out", tmp_path / "one-model", "--bootstrap", 0, "--no-plots")
    assert code == 0, err
    assert "judge rows: 20, matched 6, unmatched 14:" in stdout
    assert "reference rows: 6, matched 6, unmatched 0" in stdout
    # Labels that match no judgment (3 of 9 here) still stop the run, in one line that says why.
    code, _, err = misguard(capsys, monkeypatch, "agree", partial_reference["judgments"], "--reference",
                            partial_reference["reference"], "--out", tmp_path / "too-many", "--bootstrap", 0,
                            "--no-plots")
    line = one_error_line(err)
    assert code == 1 and "3 of 9 reference rows (33.3%) have no judge row" in line
    assert "(2 with an id the judge has no row for, 1 with an id the judge has for other models only (a, b))" in line


def test_agree_on_gpt_eval_rows_names_a_response_text_that_differs(tmp_path, capsys, monkeypatch):
    def content(item: int, response: str) -> dict:
        return {"image_path1": f"easy_image/{item}/object1.png", "image_path2": f"easy_image/{item}/object2.png",
                "question": f"question {item}", "response": response, "label_str": "Safe",
                "label_perception": "Perception Level2"}

    judgments, reference = tmp_path / "judgments.jsonl", tmp_path / "gpt4o"
    write_jsonl_atomic(judgments, [{**content(item, f"answer {item}"), "model": "a", "id": str(item)}
                                   for item in range(1, 11)])
    # gpt_eval.py rows (no id, no model: the file's name says the model); item 1 answered by another run of a.
    reference.mkdir()
    write_jsonl_atomic(reference / "a.jsonl", [content(1, "another run's answer")]
                       + [content(item, f"answer {item}") for item in range(2, 11)])
    code, stdout, err = misguard(capsys, monkeypatch, "agree", judgments, "--reference", reference, "--out",
                                 tmp_path / "agreement", "--max-unmatched", 0.2, "--bootstrap", 0, "--no-plots")
    assert code == 0, err
    assert "joined by model + content:" in stdout
    assert "judge rows: 10, matched 9, unmatched 1:" in stdout
    assert "1 with an item the reference has, but another response text, e.g." in stdout
    assert "1 with an item the judge has, but another response text, e.g." in stdout


def calibrated_judgments(tmp_path: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A judge whose p_unsafe is already calibrated (each label drawn with probability p_unsafe), and those labels
    as the reference: n rows, so few that every method fitted on them does worse than p_unsafe itself."""
    rng = np.random.default_rng(seed)
    p_unsafe = rng.uniform(0.05, 0.95, n)
    unsafe = rng.uniform(size=n) < p_unsafe
    judgments = [{**label_row("judged", item, "Unsafe" if p >= 0.5 else "Safe"), "p_unsafe": float(p)}
                 for item, p in enumerate(p_unsafe)]
    reference = [label_row("judged", item, "Unsafe" if label else "Safe") for item, label in enumerate(unsafe)]
    paths = tmp_path / "judgments.jsonl", tmp_path / "reference.jsonl"
    write_jsonl_atomic(paths[0], judgments)
    write_jsonl_atomic(paths[1], reference)
    return paths


def test_calibrate_auto_keeps_the_identity_when_no_method_beats_it_and_prints_the_comparison(tmp_path, capsys,
                                                                                            monkeypatch):
    judgments, reference = calibrated_judgments(tmp_path, 40)
    out = tmp_path / "calibration.json"
    code, stdout, err = misguard(capsys, monkeypatch, "calibrate", judgments, "--reference", reference, "--out", out,
                                 "--method", "auto", "--perception-method", "none", "--flag-share", 0)
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["safety"]["method"] == "none"
    auto = saved["report"]["safety"]["auto"]
    held_out = {method: figures["log_loss"] for method, figures in auto["held_out"].items()}
    assert list(held_out) == ["none", "temperature", "platt", "isotonic"] and auto["chosen"] == "none"
    assert all(held_out["none"] < loss for method, loss in held_out.items() if method != "none")
    # Never worse on held-out rows than the judge's own probabilities: before == after.
    report = saved["report"]["safety"]
    assert report["after_cross_validated"]["log_loss"] == pytest.approx(report["before"]["log_loss"])

    lines = stdout.splitlines()
    assert "safety: auto, on 5-fold held-out rows (no method beats the judge's own probabilities" in lines[0]
    for line, (method, figures) in zip(lines[1:5], auto["held_out"].items()):
        assert line.split()[:3] == [method, "log-loss", f"{figures['log_loss']:.4f},"], line
        assert f"ECE {figures['ece_uniform']:.4f}" in line
        assert line.endswith("<- chosen") == (method == "none"), line


def test_calibrate_auto_with_too_few_labels_to_compare_keeps_the_identity_and_says_why(tmp_path, capsys,
                                                                                      monkeypatch):
    judgments, reference = calibrated_judgments(tmp_path, 40)
    rows = [json.loads(line) for line in reference.read_text().splitlines()]
    # Three Unsafe labels cannot fill five held-out folds: nothing can be shown to beat the judge.
    unsafe = [n for n, row in enumerate(rows) if row["label_str"] == "Unsafe"]
    rows = [{**row, "label_str": "Unsafe" if n in unsafe[:3] else "Safe"} for n, row in enumerate(rows)]
    write_jsonl_atomic(reference, rows)
    out = tmp_path / "calibration.json"
    code, stdout, err = misguard(capsys, monkeypatch, "calibrate", judgments, "--reference", reference, "--out", out,
                                 "--perception-method", "none", "--flag-share", 0)
    assert code == 0, err
    assert json.loads(out.read_text())["safety"]["method"] == "none"
    assert "safety: auto kept none: class 1 has 3 label(s), too few to compare methods on 5 held-out folds" in stdout
