"""`misguard score`: judge target responses with a local judge and compute the MIS metrics.

Stage files in OUT: `judgments.jsonl` (one line per (target model, split, item), appended and fsynced a chunk
at a time as the judge finishes them, so a crash loses at most a chunk and an error such as a bad image nothing
finished; a re-run judges only what is missing), a `score.manifest.json`, and `metrics.json` / `metrics.md`
computed from the judgments file.
A response whose item's image cannot be used (over the engine options' limits, missing, not decodable) is a bad
row: it stops the run naming the responses file's line, the image's field and the item, after every judgment
already made is saved, or with `skip_bad` it is left out and reported (and tried again by the next run). A
judgment the judge failed on (a probability that is not a finite number) is written with status "error" and its
reason, never a label; like an unscored one, it is a result: a re-run does not judge it again.
`score_reference_labels` reads the seed's GPT-4o output (gpt_eval.py files, no ids) into the same judgments
format, so reference and local metrics come from one code path.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from misguard.calibration import Calibration
from misguard.core.errors import DataError, MisguardError
from misguard.core.interrupts import saving
from misguard.core.join import ItemIndex, ItemResponse, item_responses, resolve_items
from misguard.core.jsonl import append_as_they_come, read_jsonl, write_jsonl_atomic
from misguard.core.labels import LabelRecord, label_files, read_labels
from misguard.core.manifests import ScoreManifest
from misguard.core.metrics import compute_metrics, write_metrics
from misguard.core.progress import progress_bar
from misguard.core.records import Judgment, id_order
from misguard.core.rows import BadRows, first_of_each
from misguard.core.settings import check_number
from misguard.core.splits import item_image_error
from misguard.engines import check_engine
from misguard.engines.base import EngineOptions
from misguard.engines.messages import ImageFileError
from misguard.judges import Assessment, Case, Judge, load_judge, read_judge_spec
from misguard.judges.cascade import CascadeBand, CascadeJudge
from misguard.judges.spec import calibration_id, spec_calibration

JUDGMENTS_FILE = "judgments.jsonl"
MANIFEST_FILE = "score.manifest.json"
log = logging.getLogger("misguard")


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
    (VLM) judge the rest (judges/cascade.py)."""
    cascade_band: str = "0.1,0.9"
    """LOW,HIGH on the lite judge's calibrated p_unsafe: what it decides alone."""
    check_images: bool = False
    """Decode every image of the MIS directory before judging (see InferConfig.check_images)."""
    unscored_as_hr: bool = False
    """Count unscored judgments as HR, as the MIS scorer counts an unreadable verdict (default: left out)."""
    model_names: list[str] | None = None
    """The target model of responses files without `model` (the MIS scripts' files): one for all, or one per file
    in order; default: each file name's stem (core.join.item_responses)."""

    def __post_init__(self):
        check_number("ScoreConfig.n_bootstrap", self.n_bootstrap, at_least=0)  # before any judging, not after


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
    skipped_rows: list[str] = field(default_factory=list)
    out_of_domain: int = 0
    """Judgments the judge flagged as outside its domain (status out_of_domain): labelled, counted apart."""
    errors: int = 0
    """Judgments the judge failed on (status error): no label, counted apart."""
    input_cut: int = 0
    """Judgments whose question or response the judge cut to fit its context (`input_cut`)."""

    @property
    def warnings(self) -> list[str]:
        """What the user should hear about the run: more than OUT_OF_DOMAIN_WARN of it flagged out of domain."""
        if self.total and self.out_of_domain / self.total > OUT_OF_DOMAIN_WARN:
            return [f"{self.out_of_domain} of {self.total} judgments ({self.out_of_domain / self.total:.0%}) are "
                    f"out of the judge's domain (status out_of_domain): the judge was not trained on data like "
                    f"these, so its verdicts on them are not to be trusted; have them judged by a VLM judge "
                    f"(--lite-judge in front of one) or by people, or train the judge on similar labelled data"]
        return []


OUT_OF_DOMAIN_WARN = 0.10
"""The share of a run flagged out of domain above which score warns."""


def judgment_key(j: Judgment) -> tuple[str, str, str]:
    """(model, split, id): one judgment per target model and item."""
    return (j.model, j.split, j.id)


def judgment_of(response: ItemResponse, assessment: Assessment) -> Judgment:
    """The judgments.jsonl record of a judge's assessment of one response: the gpt_eval.py fields, the item's id,
    split and sub-category, and the assessment (raw probabilities kept only beside a calibration)."""
    r, a = response.response, assessment
    calibrated = a.calibration is not None
    return Judgment(
        label_perception=f"Perception {a.perception}" if a.perception else None, label_str=a.label,
        category=r.category, question=r.question, response=r.response, image_path1=r.image_path1,
        image_path2=r.image_path2, id=r.id, split=response.split, sub_category=r.sub_category, model=r.model,
        p_unsafe=a.p_unsafe, p_perception=a.p_perception, judge=a.judge, template=a.template, status=a.status,
        reason=a.reason, calibration=a.calibration, p_unsafe_raw=a.p_unsafe_raw if calibrated else None,
        p_perception_raw=a.p_perception_raw if calibrated else None, trust=a.trust,
        label_mass=a.label_mass, input_cut=a.input_cut)


def case_of(response: ItemResponse) -> Case:
    """What the judge reads of one response: its item's two images, the question and the response."""
    r = response.response
    return Case(id=f"{response.split}/{r.model}/{r.id}", images=response.images, question=r.question,
                response=r.response)


def run_score(config: ScoreConfig, *, progress: bool = True, judge: Judge | None = None) -> ScoreResult:
    """Judge every response not yet in OUT/judgments.jsonl, then write the metrics (see `_run_score`); Ctrl-C
    leaves a note of the judgments saved (core.interrupts)."""
    with saving(lambda: _judgments_saved(Path(config.out) / JUDGMENTS_FILE)):
        return _run_score(config, progress=progress, judge=judge)


def _judgments_saved(path: Path) -> str:
    """What an interrupted run leaves: the judgments in its file (a re-run judges only the rest)."""
    saved = len(read_jsonl(path, Judgment, allow_torn_tail=True)) if path.exists() else 0
    return f"{saved} judgments saved in {path}"


def _run_score(config: ScoreConfig, *, progress: bool = True, judge: Judge | None = None) -> ScoreResult:
    """Judge every response not yet in OUT/judgments.jsonl, then write the metrics. `judge`, if given, is used
    instead of loading config.judge (and is left open). Raises DataError for responses that match no MIS item (or
    bad rows, without skip_bad), MisguardError when OUT holds judgments from another judge, template or
    calibration, or the judge cannot give the perception level MIS metrics need; all of these, and a judge folder
    whose model cannot be loaded (engines.check_engine), before anything is written."""
    started = time.time()
    out = Path(config.out)
    judgments_path = out / JUDGMENTS_FILE
    bad = BadRows(skip=config.skip_bad)

    spec, calibration, calibration_file_id, run_ids, band = _judges(config, judge)
    index = ItemIndex(config.data, bad=bad, limits=config.engine_options.image_limits(),
                      decode_images=config.check_images)
    in_file_order = item_responses(config.responses, index, model_names=config.model_names, bad=bad)
    # Responses to the same item side by side: they share the judge prompt's image + question prefix.
    responses = sorted(in_file_order, key=lambda r: (r.split, id_order(r.response.id), r.response.model))
    if judge is None and spec.kind != "lite":
        check_engine(config.engine, str(config.judge), config.engine_options)

    out.mkdir(parents=True, exist_ok=True)
    existing = read_jsonl(judgments_path, Judgment, allow_torn_tail=True) if judgments_path.exists() else []
    others = {(j.judge, j.template, j.calibration) for j in existing} - run_ids
    if others:
        raise MisguardError(f"{judgments_path} holds judgments by another judge, template or calibration "
                            f"{sorted(others, key=str)}; use another --out")
    done = {judgment_key(j) for j in existing}
    todo = [r for r in responses if r.key not in done]
    manifest = ScoreManifest(judge_folder=str(config.judge), judge=spec.model_dump(), calibration=calibration_file_id,
                             calibration_file=str(config.calibration) if config.calibration else None,
                             responses=[str(p) for p in config.responses], data=str(Path(config.data).resolve()),
                             cases=len(responses), skipped_rows=bad.report())
    manifest_path = out / MANIFEST_FILE
    manifest.save(manifest_path)

    judged = 0
    cascade = None
    if todo:
        owned = judge is None
        if judge is None:
            judge = load_judge(config.judge, config.engine, config.engine_options, served_model=config.served_model,
                               calibration=calibration)
        try:
            manifest.engine = judge.describe().get("engine")
            if band is not None:
                judge = cascade = CascadeJudge(load_judge(config.lite_judge), judge, band, needs_perception=True)
                manifest.cascade = {"lite_judge": str(config.lite_judge), "band": [band.low, band.high]}
            if not judge.has_perception:
                raise MisguardError(f"{config.lite_judge or config.judge}: this judge was trained without "
                                    "perception labels; MIS scoring needs its perception level")
            bar = progress_bar(len(responses), len(responses) - len(todo), desc="score", unit="judgment",
                               enabled=progress)
            try:
                # Saved a chunk at a time; the bar moves as the judge finishes each batch of a chunk.
                assessed = judge.judge_stream([case_of(r) for r in todo], progress=bar.update)
                judgments = _judgments(assessed, todo, index, bad)
                judged = append_as_they_come(judgments_path, judgments, judge.chunk_size)
            except ImageFileError as error:  # an engine that stops at a bad image rather than handing it back
                raise _located(error, todo, index) from None
            finally:
                bar.close()
        finally:
            if owned:
                judge.close()

    judgments = _write_in_responses_order(judgments_path, in_file_order)
    metrics_paths, counts = _write_metrics(judgments, {r.key for r in responses}, out, config.n_bootstrap,
                                           config.unscored_as_hr)
    if cascade is not None:
        manifest.cascade["this_run"] = cascade.stats.to_dict()
    manifest.skipped_rows = bad.report()
    manifest.finished().save(manifest_path)
    return ScoreResult(judgments_path, metrics_paths, total=len(responses), already_done=len(responses) - len(todo),
                       judged=judged, unscored=counts["unscored"], out_of_domain=counts["out_of_domain"],
                       errors=counts["error"], input_cut=counts["input_cut"], seconds=time.time() - started,
                       cascade=cascade.stats.to_dict() if cascade is not None else None, skipped_rows=bad.report())


def check_judges(config: ScoreConfig) -> None:
    """Raise what `run_score` would refuse in its --judge, --lite-judge, --calibration or --cascade-band, reading
    only the judge folders' judge.json and the calibration file (no model, no responses): a caller can check them
    before it writes anything (the CLI, before it locks OUT)."""
    _judges(config, None)


def _judges(config: ScoreConfig, judge: Judge | None):
    """(the judge's spec, its calibration (None with `judge` given), that calibration's id, the (judge, template,
    calibration) ids that may write into OUT, the cascade band or None), from the judge.json files before any model
    is loaded. Raises DataError for a bad judge.json or calibration, MisguardError for a folder that is not a
    judge (or a model), a --lite-judge that is not a lite judge, or a bad band."""
    spec = read_judge_spec(config.judge)
    calibration = None
    if judge is not None:
        run_ids = {(judge.id, judge.template, judge.calibration_id)}
        calibration_file_id = judge.calibration_id
    else:
        calibration = Calibration.load(config.calibration) if config.calibration is not None else \
            spec_calibration(spec, config.judge)
        calibration_file_id = calibration_id(calibration)
        run_ids = {(spec.id, spec.template, calibration_file_id)}
    band = None
    if config.lite_judge is not None:
        band = CascadeBand.parse(config.cascade_band)  # a bad band fails before any work
        lite_spec = read_judge_spec(config.lite_judge)
        if lite_spec.kind != "lite":
            raise MisguardError(f"{config.lite_judge}: --lite-judge needs a lite judge folder (judge.json kind "
                                f"'lite'), not {lite_spec.kind!r}")
        run_ids.add((lite_spec.id, lite_spec.template,
                     calibration_id(spec_calibration(lite_spec, config.lite_judge))))
    return spec, calibration, calibration_file_id, run_ids, band


def _write_in_responses_order(path: Path, responses: Sequence[ItemResponse]) -> list[Judgment]:
    """Rewrite the judgments file atomically with this run's judgments in the responses files' order (as the
    GPT-4o scorer writes its verdicts), after any judgments of other files, which keep theirs; a file already so
    is left alone. Judgments come back in the judge's batch order, and a resumed run appends after the first.
    Returns the file's judgments, in their new order (what the metrics are computed from)."""
    judgments = read_jsonl(path, Judgment)
    position = {response.key: n for n, response in enumerate(responses)}
    ordered = sorted(judgments, key=lambda j: position.get(judgment_key(j), -1))  # stable: others first, as they were
    if [judgment_key(j) for j in ordered] != [judgment_key(j) for j in judgments]:
        write_jsonl_atomic(path, ordered)
    return ordered


def _judgments(assessed: Iterable[tuple[int, Assessment]], todo: list[ItemResponse], index: ItemIndex,
               bad: BadRows) -> Iterable[Judgment]:
    """The judge's assessments as judgments of their responses; a response whose image the engine could not use
    goes to `bad` (which raises without skipping: the judgments before it are saved all the same)."""
    for i, assessment in assessed:
        if assessment.bad_image is not None:
            bad.reject(_image_error(todo[i], assessment.bad_image, assessment.reason or "cannot be used", index))
            continue
        yield judgment_of(todo[i], assessment)


def _image_error(response: ItemResponse, image: str, reason: str, index: ItemIndex) -> DataError:
    """The bad-row error of a response whose item's image could not be used: its responses file and line."""
    return item_image_error(response.item, image, reason, index.root[response.split], path=response.path,
                            line=response.line)


def _located(error: ImageFileError, todo: list[ItemResponse], index: ItemIndex) -> DataError:
    """The bad-row error for an image error raised by the engine (the first response to judge with that image)."""
    for response in todo:
        if error.path in map(str, response.images):
            return _image_error(response, error.path, error.reason, index)
    return error


def _write_metrics(judgments: list[Judgment], keys: set | None, out: Path, n_bootstrap: int,
                   unscored_as_hr: bool = False):
    if keys is not None:  # only this run's responses, if the folder also holds judgments of other files
        judgments = [j for j in judgments if judgment_key(j) in keys]
    report = compute_metrics(judgments, n_bootstrap=n_bootstrap, unscored_as_hr=unscored_as_hr)
    counts = {status: sum(j.status == status for j in judgments) for status in ("unscored", "error", "out_of_domain")}
    counts["input_cut"] = sum(j.input_cut is not None for j in judgments)
    return write_metrics(report, out), counts


def reference_judgments(verdict_files: Iterable[Path], data: Path | None, *,
                        model_names: Sequence[str] | None = None, bad: BadRows | None = None) -> list[Judgment]:
    """The seed's GPT-4o verdicts (gpt_eval.py output) as Judgments, matched back to their MIS items (core.join).
    A folder stands for the .jsonl files in it. Each file is one target model, named by `model_names`, or by the
    file's stem where its rows name none. Without `data`, the rows must carry their item's id, split, category and
    sub-category (a judgments.jsonl does; gpt_eval.py rows do not). An unscored (or errored) row is kept as an
    unscored (errored) judgment, without labels. Raises DataError for a verdict that matches no item, a row
    without `data` that lacks one of ITEM_FIELDS (file, line, field), or a second verdict on one item for one model
    (unless `bad` skips them), and MisguardError when the model names do not match the files one for one."""
    bad = bad if bad is not None else BadRows()
    files = label_files(verdict_files)
    if model_names is not None and len(model_names) != len(files):
        raise MisguardError(f"{len(model_names)} model names for {len(files)} label files")
    index = ItemIndex(data, bad=bad) if data is not None else None
    judgments = []
    for n, path in enumerate(files):
        records = read_labels(path, model_name=model_names[n] if model_names else None, bad=bad)
        # gpt_eval.py names a file by its target model; rows that name their own model (judgments) keep it.
        records = [r if r.model is not None else replace(r, model=path.stem) for r in records]
        records = resolve_items(records, index, bad=bad) if index is not None else _carrying_items(records, bad)
        kept = first_of_each(records, lambda r: (r.model, r.split, r.id), where=lambda r: (r.path, r.line),
                             describe=lambda r: r.describe(), bad=bad, field_name="question")
        for record in kept.values():
            judgments.append(Judgment(
                label_perception=f"Perception {record.perception}" if record.perception else None,
                label_str=record.safety, category=record.category, question=record.question,
                response=record.response, image_path1=record.image_path1, image_path2=record.image_path2,
                id=record.id, split=record.split, sub_category=record.sub_category, model=record.model,
                judge=f"reference:{path.name}", template="", status=_status(record),
                reason=None if record.scored else f"{_status(record)} in {path.name}"))
    return judgments


ITEM_FIELDS: tuple[str, ...] = ("id", "split", "category", "sub_category", "question", "response", "image_path1",
                                "image_path2")
"""What a label row must carry to be scored without --data: its item, and the gpt_eval.py content."""


def _carrying_items(records: list[LabelRecord], bad: BadRows) -> list[LabelRecord]:
    """The rows that carry every one of ITEM_FIELDS; each other row is a bad row naming the first field it lacks."""
    kept = []
    for record in records:
        missing = next((name for name in ITEM_FIELDS if getattr(record, name) is None), None)
        if missing is None:
            kept.append(record)
        else:
            bad.reject(DataError(f"missing; without --data each label row must carry {', '.join(ITEM_FIELDS)} "
                                 "(give --data, the MIS test directory, to find a row's item by its content)",
                                 path=record.path, line=record.line, field=missing))
    return kept


def _status(record: LabelRecord) -> str:
    """A label row's judgment status: an error or unscored row stays one, never a label."""
    return "error" if record.error else "scored" if record.scored else "unscored"


def score_reference_labels(verdict_files: list[Path], data: Path | None, out: Path, *,
                           model_names: list[str] | None = None, skip_bad: bool = False,
                           n_bootstrap: int = 1000, unscored_as_hr: bool = False) -> ScoreResult:
    """`misguard score --from-labels`: GPT-4o's verdicts to judgments.jsonl + metrics, like a local judge's (see
    `reference_judgments`; `data` may be None when the rows carry their items). With `unscored_as_hr`, unscored
    rows count as HR, as the MIS scorer counts them. Returns the ScoreResult; raises DataError as
    `reference_judgments` does, or when there is no verdict at all."""
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad = BadRows(skip=skip_bad)
    judgments = reference_judgments(verdict_files, data, model_names=model_names, bad=bad)
    if not judgments:
        raise DataError(f"no verdicts in {', '.join(map(str, verdict_files))}")
    path = out / JUDGMENTS_FILE
    write_jsonl_atomic(path, judgments)
    metrics_paths, counts = _write_metrics(judgments, None, out, n_bootstrap, unscored_as_hr)
    return ScoreResult(path, metrics_paths, total=len(judgments), already_done=0, judged=len(judgments),
                       unscored=counts["unscored"], errors=counts["error"], seconds=time.time() - started,
                       skipped_rows=bad.report())

