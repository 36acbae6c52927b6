"""`misguard score --rows`: judge plain (question, response) rows — any safety set, labelled or not, such as
../shared/data's text_safety files or MSTS — instead of MIS responses.

There are no MIS items to join and no perception levels to count, so there are no MIS metrics: OUT/judgments.jsonl
(one RowJudgment per row, appended a chunk at a time; a re-run judges only what is missing, as `score` does) and
OUT/metrics.json / metrics.md per source and overall: rows, scored, unscored, judge errors, out of the judge's
domain, rows the judge cut to fit its context, the share
called Unsafe, and, where the run read the rows' own labels (`label_field`), agreement with them on every labelled
verdict, on the in-domain ones and on the flagged ones, and the share of wrong verdicts that were flagged.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from misguard.calibration import Calibration
from misguard.calibration.agreement import SAFETY_LABELS, head_agreement
from misguard.core.errors import MisguardError
from misguard.core.jsonl import append_as_they_come, read_jsonl, write_text_atomic
from misguard.core.manifests import ScoreManifest
from misguard.core.progress import progress_bar
from misguard.core.records import RowJudgment
from misguard.core.rows import BadRows
from misguard.core.settings import setting
from misguard.engines.base import EngineOptions
from misguard.judge_training.data import TextSource, read_text_examples
from misguard.judge_training.examples import TextExample
from misguard.judges import Assessment, Case, load_judge, read_judge_spec
from misguard.judges.spec import calibration_id, spec_calibration
from misguard.mis.score import JUDGMENTS_FILE, MANIFEST_FILE, ScoreResult

ALL = "all"


@dataclass
class RowsFields:
    """Where `score --rows` finds each value in a row: dotted field paths, the spelling `train --data` and `agree
    --judge-field` use. Each field is one CLI option."""

    label_field: str | None = setting(None, help="--rows: the rows' own Safe/Unsafe label, a dotted path (e.g. "
                                                 "label_str); agreement with it goes in metrics.json.")
    question_field: str = setting("question", help="--rows: the question's field.")
    response_field: str = setting("response", help="--rows: the response's field.")
    image_description_field: str = setting("image_description", help="--rows: a field with text about the "
                                                                      "images; 'none' for none.")
    id_field: str = setting("id", help="--rows: the row's id (default: FILE-STEM:LINE where a row has none).")
    source: str | None = setting(None, help="--rows: the source's name in figures (default: each row's source "
                                            "field, else the file name).")

    def text_source(self, path: Path) -> TextSource:
        return TextSource(path=path, label_field=self.label_field, question_field=self.question_field,
                          response_field=self.response_field,
                          image_description_field=None if self.image_description_field == "none"
                          else self.image_description_field, source=self.source, id_field=self.id_field)


def run_score_rows(files: Sequence[Path], judge_folder: Path, out: Path, fields: RowsFields | None = None, *,
                   engine: str = "transformers", engine_options: EngineOptions | None = None,
                   served_model: str | None = None, calibration_path: Path | None = None, skip_bad: bool = False,
                   progress: bool = True) -> ScoreResult:
    """Judge every row of `files` not yet in OUT/judgments.jsonl, then write the figures. Raises DataError for a
    bad row (file, line, field; without skip_bad), MisguardError for two rows with one (source, id) or when OUT
    holds judgments by another judge, template or calibration."""
    started = time.time()
    fields = fields or RowsFields()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judgments_path = out / JUDGMENTS_FILE
    bad = BadRows(skip=skip_bad)

    spec = read_judge_spec(judge_folder)
    calibration = Calibration.load(calibration_path) if calibration_path is not None else \
        spec_calibration(spec, judge_folder)
    run_id = (spec.id, spec.template, calibration_id(calibration))
    rows: dict[tuple[str, str], TextExample] = {}
    for path in files:
        for example in read_text_examples(fields.text_source(Path(path)), bad=bad):
            key = (example.source, example.id)
            if key in rows:
                raise MisguardError(f"{example.where}: source {example.source!r} id {example.id!r} also at "
                                    f"{rows[key].where}; give each file its own --source or ids")
            rows[key] = example

    existing = read_jsonl(judgments_path, RowJudgment, allow_torn_tail=True) if judgments_path.exists() else []
    others = {(j.judge, j.template, j.calibration) for j in existing} - {run_id}
    if others:
        raise MisguardError(f"{judgments_path} holds judgments by another judge, template or calibration "
                            f"{sorted(others, key=str)}; use another --out")
    done = {j.key for j in existing}
    todo = [e for key, e in rows.items() if key not in done]
    manifest = ScoreManifest(judge_folder=str(judge_folder), judge=spec.model_dump(),
                             calibration=run_id[2], calibration_file=str(calibration_path) if calibration_path
                             else None, responses=[str(p) for p in files], data="", cases=len(rows),
                             skipped_rows=bad.report())
    manifest_path = out / MANIFEST_FILE
    manifest.save(manifest_path)

    judged = 0
    if todo:
        with load_judge(judge_folder, engine, engine_options or EngineOptions(), served_model=served_model,
                        calibration=calibration) as judge:
            manifest.engine = judge.describe().get("engine")
            cases = [Case(id=f"{e.source}/{e.id}", images=(), question=e.question, response=e.response,
                          image_description=e.image_description) for e in todo]
            bar = progress_bar(len(rows), len(rows) - len(todo), desc="score", unit="judgment", enabled=progress)
            try:
                # Saved a chunk at a time; the bar moves as the judge finishes each batch of a chunk.
                assessed = judge.judge_stream(cases, progress=bar.update)
                judgments = (row_judgment(todo[i], a) for i, a in assessed)
                judged = append_as_they_come(judgments_path, judgments, judge.chunk_size)
            finally:
                bar.close()

    judgments = [j for j in read_jsonl(judgments_path, RowJudgment) if j.key in rows]
    report = rows_report(judgments)
    metrics_paths = write_rows_metrics(report, out)
    manifest.finished().save(manifest_path)
    overall = report[ALL]
    return ScoreResult(judgments_path, metrics_paths, total=len(rows), already_done=len(rows) - len(todo),
                       judged=judged, unscored=overall["unscored"], out_of_domain=overall["out_of_domain"],
                       errors=overall["errors"], input_cut=overall["input_cut"], seconds=time.time() - started,
                       skipped_rows=bad.report())


def row_judgment(example: TextExample, a: Assessment) -> RowJudgment:
    calibrated = a.calibration is not None
    return RowJudgment(id=example.id, source=example.source, question=example.question, response=example.response,
                       image_description=example.image_description, reference=example.label_str,
                       label_str=a.label, p_unsafe=a.p_unsafe, p_unsafe_raw=a.p_unsafe_raw if calibrated else None,
                       judge=a.judge, template=a.template, status=a.status, reason=a.reason,
                       calibration=a.calibration, trust=a.trust, input_cut=a.input_cut)


def rows_report(judgments: Sequence[RowJudgment]) -> dict[str, dict[str, Any]]:
    """{source, ..., "all": figures}: rows, scored, unscored, errors, out_of_domain, input_cut (rows the judge cut to
    fit its context), unsafe_rate (of the labelled verdicts,
    flagged ones included), and with reference labels: agreement on all labelled verdicts / in domain / flagged
    (n, accuracy, kappa, f1 with Unsafe positive) and the share of wrong verdicts that were flagged."""
    groups: dict[str, list[RowJudgment]] = {}
    for j in judgments:
        groups.setdefault(j.source, []).append(j)
    report = {name: _figures(groups[name]) for name in sorted(groups)}
    report[ALL] = _figures(list(judgments))
    return report


def _figures(judgments: Sequence[RowJudgment]) -> dict[str, Any]:
    labelled = [j for j in judgments if j.label_str is not None]
    figures: dict[str, Any] = {
        "rows": len(judgments), "scored": sum(j.status == "scored" for j in judgments),
        "unscored": sum(j.status == "unscored" for j in judgments),
        "errors": sum(j.status == "error" for j in judgments),
        "out_of_domain": sum(j.status == "out_of_domain" for j in judgments),
        "input_cut": sum(j.input_cut is not None for j in judgments),
        "unsafe_rate": sum(j.label_str == "Unsafe" for j in labelled) / len(labelled) if labelled else None}
    referenced = [j for j in labelled if j.reference is not None]
    if referenced:
        def agreement(chosen: list[RowJudgment]) -> dict[str, Any]:
            a = head_agreement([j.reference for j in chosen], [j.label_str for j in chosen], SAFETY_LABELS,
                               positive="Unsafe")
            return {"n": a["n"], "accuracy": a["accuracy"], "kappa": a["kappa"], "f1": a["f1"]}

        wrong = [j for j in referenced if j.label_str != j.reference]
        figures["agreement"] = {
            "all": agreement(referenced), "in_domain": agreement([j for j in referenced if j.status == "scored"]),
            "out_of_domain": agreement([j for j in referenced if j.status == "out_of_domain"]),
            "wrong": len(wrong),
            "wrong_flagged": sum(j.status == "out_of_domain" for j in wrong) / len(wrong) if wrong else None}
    return figures


def write_rows_metrics(report: dict[str, dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """OUT/metrics.json (the report) and OUT/metrics.md (one row per source), each atomically."""
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    write_text_atomic(json_path, json.dumps({"kind": "rows", "sources": report}, indent=2) + "\n")

    def number(value: float | None, percent: bool = False) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.1f}%" if percent else f"{value:.3f}"

    lines = ["# misguard score --rows", "",
             "Unsafe = share of the labelled verdicts called Unsafe (out-of-domain ones included). Agreement with "
             "the rows' own labels, Unsafe positive; in domain = verdicts the judge did not flag.", "",
             "| source | rows | unscored | errors | out of domain | Unsafe | kappa | accuracy | F1 | kappa in domain | "
             "wrong verdicts flagged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in report.items():
        a = f.get("agreement")
        cells = [name, str(f["rows"]), str(f["unscored"]), str(f["errors"]), str(f["out_of_domain"]),
                 number(f["unsafe_rate"], True)]
        cells += ([number(a["all"]["kappa"]), number(a["all"]["accuracy"]), number(a["all"]["f1"]),
                   number(a["in_domain"]["kappa"]), number(a["wrong_flagged"], True)] if a else ["–"] * 5)
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
