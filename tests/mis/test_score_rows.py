"""`misguard score --rows`: a judge on plain (question, response[, label]) rows, e.g. the shared safety sets."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from misguard.calibration.agreement import SAFETY_LABELS, head_agreement
from misguard.cli.main import app
from misguard.core.jsonl import read_jsonl
from misguard.core.records import RowJudgment
from tests.conftest import LITE_KINDS, LITE_QUESTIONS, SHARED_DATA


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def rows_file(path, n: int = 12, *, label: bool = True, prefix: str = "r"):
    rows = []
    for i in range(n):
        text, unsafe, _ = LITE_KINDS[i % len(LITE_KINDS)]
        row = {"id": f"{prefix}{i}", "prompt": {"text": LITE_QUESTIONS[i % len(LITE_QUESTIONS)]},
               "answer": f"{text} ({i})"}
        if label:
            row["verdict"] = "unsafe" if (unsafe if i % 5 else 1 - unsafe) else "SAFE"  # every fifth label flipped
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FIELDS = ("--question-field", "prompt.text", "--response-field", "answer")


def test_rows_are_judged_with_trust_and_figures_match_the_judgments(trusting_lite, tmp_path):
    a = rows_file(tmp_path / "a.jsonl")
    b = rows_file(tmp_path / "b.jsonl", 8, prefix="b")
    result = invoke("score", a, b, "--rows", "--judge", trusting_lite, "--label-field", "verdict", *FIELDS,
                    "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    judgments = list(read_jsonl(tmp_path / "out" / "judgments.jsonl", RowJudgment))
    assert sorted(j.key for j in judgments) == sorted([("a", f"r{i}") for i in range(12)]
                                                      + [("b", f"b{i}") for i in range(8)])
    assert all(j.status == "scored" and 0 < j.trust <= 1 and j.judge == "tiny-lite" for j in judgments)
    assert {j.reference for j in judgments} == {"Safe", "Unsafe"}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["sources"]
    assert set(metrics) == {"a", "b", "all"} and metrics["all"]["rows"] == 20
    for name in ("a", "all"):
        chosen = [j for j in judgments if name == "all" or j.source == name]
        expected = head_agreement([j.reference for j in chosen], [j.label_str for j in chosen], SAFETY_LABELS,
                                  positive="Unsafe")
        assert metrics[name]["agreement"]["all"]["kappa"] == pytest.approx(expected["kappa"])
        assert metrics[name]["unsafe_rate"] == pytest.approx(sum(j.label_str == "Unsafe" for j in chosen)
                                                             / len(chosen))
    assert "| a | 12 | 0 | 0 |" in (tmp_path / "out" / "metrics.md").read_text()

    # Resumes: nothing new, then only the row whose judgment was lost.
    assert "0 new judgments (20 already there)" in invoke(
        "score", a, b, "--rows", "--judge", trusting_lite, "--label-field", "verdict", *FIELDS,
        "--out", tmp_path / "out", "--quiet").output
    lines = (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()
    (tmp_path / "out" / "judgments.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert "1 new judgments (19 already there)" in invoke(
        "score", a, b, "--rows", "--judge", trusting_lite, "--label-field", "verdict", *FIELDS,
        "--out", tmp_path / "out", "--quiet").output


def test_flagged_rows_are_counted_apart_with_a_warning(distrustful_lite, tmp_path):
    a = rows_file(tmp_path / "a.jsonl", label=False)
    result = CliRunner().invoke(app, ["score", str(a), "--rows", "--judge", str(distrustful_lite), *FIELDS,
                                      "--out", str(tmp_path / "out"), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    judgments = list(read_jsonl(tmp_path / "out" / "judgments.jsonl", RowJudgment))
    assert {j.status for j in judgments} == {"out_of_domain"} and all(j.label_str for j in judgments)
    figures = json.loads((tmp_path / "out" / "metrics.json").read_text())["sources"]["all"]
    assert (figures["out_of_domain"], figures["scored"], figures["unscored"]) == (12, 0, 0)
    assert "agreement" not in figures  # no labels read
    assert "out of the judge's domain" in result.output and "warning" in result.output


def test_a_bad_row_is_one_line_naming_file_line_and_field(trusting_lite, tmp_path):
    a = rows_file(tmp_path / "a.jsonl")
    lines = a.read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "verdict": "maybe"})
    a.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "misguard.cli.main", "score", str(a), "--rows", "--judge",
                             str(trusting_lite), "--label-field", "verdict", *FIELDS, "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(err) == 1, result.stderr
    assert "a.jsonl:4" in err[0] and "verdict" in err[0]
    assert not (tmp_path / "out" / "judgments.jsonl").exists()


def test_rows_options_are_refused_where_they_mean_nothing(trusting_lite, demo_dir, tmp_path):
    a = rows_file(tmp_path / "a.jsonl")
    with pytest.raises(Exception, match="--rows judges plain rows"):
        invoke("score", a, "--rows", "--judge", trusting_lite, "--data", demo_dir, "--out", tmp_path / "o")
    with pytest.raises(Exception, match="--label-field: only with --rows"):
        invoke("score", a, "--judge", trusting_lite, "--data", demo_dir, "--label-field", "x", "--out", tmp_path / "o")
    with pytest.raises(Exception, match="also at"):
        invoke("score", a, rows_file(tmp_path / "again.jsonl"), "--rows", "--source", "same", "--judge",
               trusting_lite, *FIELDS, "--out", tmp_path / "o")


@pytest.mark.skipif(not (SHARED_DATA / "text_safety" / "xstest_v2.jsonl").exists(),
                    reason="needs ../shared/data/text_safety (the shared real data)")
def test_a_shared_file_as_it_is(trusting_lite, tmp_path):
    rows = (SHARED_DATA / "text_safety" / "xstest_v2.jsonl").read_text().splitlines()[:10]
    path = tmp_path / "xstest.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = invoke("score", path, "--rows", "--judge", trusting_lite, "--label-field", "label_str",
                    "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    judgments = list(read_jsonl(tmp_path / "out" / "judgments.jsonl", RowJudgment))
    assert len(judgments) == 10 and all(j.reference in ("Safe", "Unsafe") and j.trust is not None for j in judgments)
