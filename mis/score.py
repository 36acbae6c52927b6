"""`misguard score`: judge target responses with a local judge and compute the MIS metrics.

Stage files in OUT: `judgments.jsonl` (one line per (target model, split, item), appended and fsynced a chunk
at a time as the judge finishes them, so a crash loses at most a chunk and an error such as a bad image nothing
finished; a re-run judges only what is missing), a `score.manifest.json`, and `metrics.json` / `metrics.md`
computed from the judgments file.
`score_reference_labels` reads the seed's GPT-4o output (gpt_eval.py files, no ids) into the same judgments
format, so reference and local metrics come from one code path.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from misguard.engines.base import EngineOptions, runs
from misguard.core.errors import DataError, MisguardError
from misguard.core.io import (
    append_as_they_come,
    find_split_file,
    load_split,
    read_jsonl,
    read_jsonl_numbered,
    write_jsonl_atomic,
    write_text_atomic,
)
from misguard.core.records import SPLITS, Item, Judgment, Response, Verdict

JUDGMENTS_FILE = "judgments.jsonl"
log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """One `misguard score` run. Each field is one CLI option."""

    responses: list[Path]
    """Responses files (JSON Lines, as `misguard infer` writes), one or more target models."""
    judge: Path
    """Judge folder (model + judge.json), or a plain instruct VLM folder for zero-shot JSON judging."""
    data: Path
    """The MIS test directory the responses were made on."""
    out: Path
    engine: str = "transformers"
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    served_model: str | None = None
    """With --engine openai: the judge's model name on the server."""
    calibration: Path | None = None
    """A calibration file from `misguard calibrate`; default: the one in the judge's judge.json, if any."""
    skip_bad: bool = False
    n_bootstrap: int = 1000
    lite_judge: Path | None = None
    """A lite judge folder to put in front of `judge`: it decides the responses it is confident about, the
    (VLM) judge the rest (guard/judge/cascade.py)."""
    cascade_band: str = "0.1,0.9"
    """LOW,HIGH on the lite judge's calibrated p_unsafe: what it decides alone."""


@dataclass
class ScoreResult:
    judgments_path: Path
    metrics_paths: tuple[Path, Path]
    total: int
    already_done: int
    judged: int
    unscored: int
    seconds: float
    cascade: dict | None = None
    """With a lite judge in front: decided_by_lite, escalated, share_escalated, seconds per stage (this run)."""


class ItemIndex:
    """Every item of an MIS directory, findable by its content (image paths + question): how responses and
    id-less reference verdicts are matched back to their item and split."""

    def __init__(self, data: Path, *, skip_bad: bool = False):
        self.root: dict[str, Path] = {}
        self.by_content: dict[tuple[str, str, str], tuple[str, Item]] = {}
        for split in SPLITS:
            try:
                find_split_file(data, split)
            except DataError:
                continue  # a directory may hold only some splits
            loaded = load_split(data, split, skip_bad=skip_bad)
            self.root[split] = loaded.root
            for item in loaded.items:
                self.by_content[(item.image_path1, item.image_path2, item.question)] = (split, item)
        if not self.root:
            raise DataError("no MIS split file found (mis_easy.json, mis_hard.json, mis_real.json)", path=data)

    def find(self, image_path1: str, image_path2: str, question: str) -> tuple[str, Item] | None:
        return self.by_content.get((image_path1, image_path2, question))

    def images(self, split: str, item: Item) -> tuple[Path, Path]:
        return self.root[split] / item.image_path1, self.root[split] / item.image_path2


def _cases(config: ScoreConfig, index: ItemIndex):
    """Every response of every file as a judge Case, responses to one item side by side. Raises DataError
    (file, line, field) for a response that matches no MIS item or is given twice."""
    from misguard.judges import Case

    cases = []
    seen: dict[tuple[str, str, str], str] = {}
    for path in config.responses:
        for line, response in read_jsonl_numbered(path, Response, skip_bad=config.skip_bad):
            found = index.find(response.image_path1, response.image_path2, response.question)
            if found is None or found[1].id != response.id:
                error = DataError(f"no item with id {response.id}, this question and these image paths in "
                                  f"{config.data}", path=path, line=line, field="id")
                if not config.skip_bad:
                    raise error
                log.warning("skipping bad line: %s", error)
                continue
            split, item = found
            key = (response.model, split, response.id)
            if key in seen:
                raise DataError(f"model {response.model!r}, {split} item {response.id} is also at {seen[key]}",
                                path=path, line=line, field="id")
            seen[key] = f"{path}:{line}"
            cases.append(Case(response=response, images=index.images(split, item), split=split))
    # Responses to the same item side by side: they share the judge prompt's image + question prefix.
    cases.sort(key=lambda c: (c.split, _id_order(c.response.id), c.response.model))
    return cases


def item_chunks(cases: list, size: int):
    """`cases` (responses to one item side by side) in chunks of about `size`, never splitting an item's
    responses: a judge that shares their prompt prefix sees them together."""
    return runs(cases, size, key=lambda c: (c.split, c.response.id))


def _judgments(judge, cases: list) -> Iterator:
    """The judge's Judgments of `cases` as it finishes them: a VLM judge's engine takes them all at once (its
    own windows keep batches full and the device busy); other judges take them an item chunk at a time."""
    from misguard.judges import Judge

    if isinstance(judge, Judge):
        return (judgment for _, judgment in judge.judge_stream(cases))
    return (judgment for chunk in item_chunks(cases, judge.chunk_size) for judgment in judge.judge(chunk))


def _id_order(item_id: str):
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


def judgment_key(j: Judgment | Response, split: str | None = None) -> tuple[str, str, str]:
    return (j.model, split if split is not None else j.split, j.id)


def run_score(config: ScoreConfig, *, progress: bool = True, judge=None) -> ScoreResult:
    """Judge every response not yet in OUT/judgments.jsonl, then write the metrics. `judge`, if given, is used
    instead of loading config.judge. Raises DataError for responses that match no MIS item, MisguardError when
    OUT holds judgments from another judge or template."""
    from misguard.judges import load_judge, read_judge_spec
    from misguard.judges.judge import calibration_id, spec_calibration
    from misguard.core.version import __version__

    started = time.time()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    judgments_path = out / JUDGMENTS_FILE
    spec = judge.spec if judge is not None else read_judge_spec(config.judge)
    if judge is not None:
        calibration = judge.calibration
    elif config.calibration is not None:
        from misguard.calibration import Calibration

        calibration = Calibration.load(config.calibration)
    else:
        calibration = spec_calibration(spec, Path(config.judge))
    run_id = (spec.id, spec.template, calibration_id(calibration))
    run_ids = {run_id}
    band = None
    if config.lite_judge is not None:
        from misguard.judges.cascade import CascadeBand

        band = CascadeBand.parse(config.cascade_band)  # a bad band fails before any work
        lite_spec = read_judge_spec(config.lite_judge)
        if lite_spec.kind != "lite":
            raise MisguardError(f"{config.lite_judge}: --lite-judge needs a lite judge folder (judge.json kind "
                                f"'lite'), not {lite_spec.kind!r}")
        run_ids.add((lite_spec.id, lite_spec.template,
                     calibration_id(spec_calibration(lite_spec, Path(config.lite_judge)))))
    index = ItemIndex(config.data, skip_bad=config.skip_bad)
    cases = _cases(config, index)

    existing = read_jsonl(judgments_path, Judgment, allow_torn_tail=True) if judgments_path.exists() else []
    others = {(j.judge, j.template, j.calibration) for j in existing} - run_ids
    if others:
        raise MisguardError(f"{judgments_path} holds judgments by another judge, template or calibration "
                            f"{sorted(others, key=str)}; use another --out")
    done = {judgment_key(j) for j in existing}
    todo = [c for c in cases if judgment_key(c.response, c.split) not in done]
    manifest_path = out / "score.manifest.json"
    manifest = {"misguard_version": __version__, "judge_folder": str(config.judge), "judge": spec.model_dump(),
                "calibration": run_id[2], "calibration_file": str(config.calibration) if config.calibration else None,
                "responses": [str(p) for p in config.responses], "data": str(Path(config.data).resolve()),
                "cases": len(cases), "complete": False}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))

    judged = 0
    cascade = None
    if todo:
        owned = judge is None
        if judge is None:
            judge = load_judge(config.judge, config.engine, config.engine_options,
                               served_model=config.served_model, calibration=calibration)
        manifest["engine"] = judge.engine.describe()
        if band is not None:
            from misguard.judges.cascade import CascadeJudge

            judge = cascade = CascadeJudge(load_judge(config.lite_judge), judge, band)
            manifest["cascade"] = {"lite_judge": str(config.lite_judge), "band": [band.low, band.high]}
        from tqdm import tqdm

        bar = tqdm(total=len(cases), initial=len(cases) - len(todo), unit="judgment", desc="score",
                   disable=not progress, dynamic_ncols=True)
        try:
            judged = append_as_they_come(judgments_path, _judgments(judge, todo), judge.chunk_size, bar.update)
        finally:
            bar.close()
            if owned:
                judge.close()

    metrics_paths, unscored = _write_metrics(judgments_path, {judgment_key(c.response, c.split) for c in cases},
                                             out, config.n_bootstrap)
    manifest.update(complete=True, finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if cascade is not None:
        manifest["cascade"]["this_run"] = cascade.stats.to_dict()
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
    return ScoreResult(judgments_path, metrics_paths, total=len(cases), already_done=len(cases) - len(todo),
                       judged=judged, unscored=unscored, seconds=time.time() - started,
                       cascade=cascade.stats.to_dict() if cascade is not None else None)


def _write_metrics(judgments_path: Path, keys: set | None, out: Path, n_bootstrap: int):
    from misguard.core.metrics import compute_metrics, write_metrics

    judgments = read_jsonl(judgments_path, Judgment)
    if keys is not None:  # only this run's responses, if the folder also holds judgments of other files
        judgments = [j for j in judgments if judgment_key(j) in keys]
    report = compute_metrics(judgments, n_bootstrap=n_bootstrap)
    return write_metrics(report, out), sum(j.status == "unscored" for j in judgments)


def reference_judgments(verdict_files: Iterable[Path], data: Path, *, model_names: list[str] | None = None,
                        skip_bad: bool = False) -> list[Judgment]:
    """The seed's GPT-4o verdicts (gpt_eval.py output) as Judgments, matched back to their MIS items by
    (image_path1, image_path2, question). Each file is one target model, named by `model_names` or the file's
    stem. Raises DataError for a verdict that matches no item."""
    index = ItemIndex(data, skip_bad=skip_bad)
    files = list(verdict_files)
    if model_names is not None and len(model_names) != len(files):
        raise MisguardError(f"{len(model_names)} model names for {len(files)} label files")
    judgments = []
    for n, path in enumerate(files):
        model = model_names[n] if model_names else Path(path).stem
        seen: set[tuple[str, str]] = set()
        for line, verdict in read_jsonl_numbered(path, Verdict, skip_bad=skip_bad):
            found = index.find(verdict.image_path1, verdict.image_path2, verdict.question)
            if found is None:
                error = DataError(f"no item in {data} has this question and these image paths "
                                  f"({verdict.image_path1}, {verdict.image_path2})", path=path, line=line,
                                  field="question")
                if not skip_bad:
                    raise error
                log.warning("skipping bad line: %s", error)
                continue
            split, item = found
            if (split, item.id) in seen:
                raise DataError(f"a second verdict for {split} item {item.id}", path=path, line=line,
                                field="question")
            seen.add((split, item.id))
            judgments.append(Judgment(
                label_perception=verdict.label_perception, label_str=verdict.label_str, category=item.category,
                question=verdict.question, response=verdict.response, image_path1=verdict.image_path1,
                image_path2=verdict.image_path2, id=item.id, split=split, sub_category=item.sub_category,
                model=model, judge=f"reference:{Path(path).name}", template=""))
    return judgments


def score_reference_labels(verdict_files: list[Path], data: Path, out: Path, *,
                           model_names: list[str] | None = None, skip_bad: bool = False,
                           n_bootstrap: int = 1000) -> ScoreResult:
    """`misguard score --from-labels`: GPT-4o's verdicts to judgments.jsonl + metrics, like a local judge's."""
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judgments = reference_judgments(verdict_files, data, model_names=model_names, skip_bad=skip_bad)
    path = out / JUDGMENTS_FILE
    write_jsonl_atomic(path, judgments)
    metrics_paths, unscored = _write_metrics(path, None, out, n_bootstrap)
    return ScoreResult(path, metrics_paths, total=len(judgments), already_done=0, judged=len(judgments),
                       unscored=unscored, seconds=time.time() - started)
