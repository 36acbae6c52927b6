"""The target-inference loop: run a VLM over an MIS split and write its responses, resumably.

Output: ``OUT/<split>/<model-name>.jsonl`` (the responses format the seed's gpt_eval.py reads) and a manifest
``<model-name>.manifest.json`` beside it. With ``shard=(i, n)`` the split's items ``i, i+n, i+2n, ...`` go to
``<model-name>.shard-<i>-of-<n>.jsonl``; `merge_shards` joins them and moves them into ``OUT/<split>/shards/``.
Results are appended and fsynced after every batch, so a crash loses at most the batch in flight; a re-run reads
what is there and does only the rest.

Images are read within the engine options' byte and pixel limits. An item whose image cannot be used is a bad row:
found by the split check (a missing file, an unreadable header, over a limit; with `check_images`, a file that does
not decode) or when the engine decodes it (a truncated file); either way it stops the run naming the item's id,
line and field, after every response already made is saved, or with `skip_bad` it is left out and reported.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from misguard.core.errors import DataError, MisguardError
from misguard.core.interrupts import saving
from misguard.core.jsonl import append_as_they_come, read_responses_lenient, write_jsonl_atomic
from misguard.core.locking import exclusive_output
from misguard.core.manifests import InferManifest, read_manifest
from misguard.core.progress import progress_bar
from misguard.core.records import Item, Response, id_order
from misguard.core.rows import BadRows
from misguard.core.settings import check_number
from misguard.core.splits import SplitData, load_split
from misguard.engines import Engine, EngineOptions, check_engine, load_engine
from misguard.engines.messages import Generation, GenerationParams, ImageFileError, user_request

log = logging.getLogger("misguard")


@dataclass
class InferConfig:
    """One `misguard infer` run. Each field is one CLI option."""

    model: str
    """Local model folder (transformers, vllm) or served model name (openai)."""
    data: Path
    """MIS test directory (with mis_easy.json etc., or a mis_test/ parent)."""
    split: str
    out: Path
    """Output directory; responses go to OUT/<split>/<model-name>.jsonl."""
    engine: str = "transformers"
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    generation: GenerationParams = field(default_factory=GenerationParams)
    model_name: str | None = None
    """Name written in each response's `model` field and the file name; default: the model folder's name."""
    limit: int | None = None
    """Only the first N items of the split (before sharding)."""
    shard: tuple[int, int] | None = None
    """(i, n): this process runs items i, i+n, ... (0 <= i < n)."""
    skip_bad: bool = False
    """Log and count bad items instead of stopping at the first one."""
    check_images: bool = False
    """Decode every image of the split before the run, so an image that does not decode is found up front (the
    split check otherwise reads only the images' headers; the run finds the rest when it decodes them)."""

    def __post_init__(self):
        check_number("InferConfig.limit", self.limit, at_least=1)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name


@dataclass
class InferResult:
    responses_path: Path
    manifest_path: Path
    total: int
    """Items this run is responsible for (after limit and shard)."""
    already_done: int
    generated: int
    skipped_items: int
    seconds: float


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N. Raises MisguardError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MisguardError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if not 0 <= i < n:
        raise MisguardError(f"--shard {text}: need 0 <= I < N")
    return i, n


def output_paths(config: InferConfig) -> tuple[Path, Path]:
    """(responses path, manifest path) for a run."""
    folder = Path(config.out) / config.split
    stem = config.name
    if config.shard:
        stem += f".shard-{config.shard[0]}-of-{config.shard[1]}"
        if not (folder / f"{stem}.jsonl").exists() and (folder / SHARDS_FOLDER / f"{stem}.jsonl").exists():
            folder = folder / SHARDS_FOLDER  # merged already (merge_shards moved it): it resumes there, as done
    return folder / f"{stem}.jsonl", folder / f"{stem}.manifest.json"


def select_items(items: list[Item], limit: int | None, shard: tuple[int, int] | None) -> list[Item]:
    """The items one run is responsible for: the first `limit`, then every n-th from i."""
    chosen = items[:limit] if limit is not None else items
    if shard:
        i, n = shard
        chosen = chosen[i::n]
    return chosen


def _run_settings(config: InferConfig) -> dict:
    # What must match for a resumed run to continue the same file rather than mix two kinds of output.
    return {"model": config.model, "model_name": config.name, "engine": config.engine, "split": config.split,
            "generation": asdict(config.generation), "shard": list(config.shard) if config.shard else None}


def run_inference(config: InferConfig, *, progress: bool = True, engine: Engine | None = None) -> InferResult:
    """Run (or resume) inference; returns where the responses went and what was done. `engine`, if given, is
    used instead of loading config.model (and is left open, for the caller to reuse). The split and the model
    (engine.check_engine) are checked before anything is written; then the responses file's one-writer lock
    (core.locking) is held to the end. Raises DataError for bad input (unless skip_bad), MisguardError for a model
    that cannot be loaded, when another run is writing the same file, or when the file holds responses made with
    other settings."""
    started = time.time()
    bad = BadRows(skip=config.skip_bad)
    split = load_split(config.data, config.split, bad=bad, limits=config.engine_options.image_limits(),
                       decode_images=config.check_images)
    items = select_items(split.items, config.limit, config.shard)
    if engine is None:  # a wrong --model fails here, leaving no file a corrected run would trip over
        check_engine(config.engine, config.model, config.engine_options)
    responses_path, manifest_path = output_paths(config)
    with exclusive_output(responses_path, folder=False), saving(lambda: _responses_saved(responses_path, items)):
        return _infer(config, split, items, bad, responses_path, manifest_path, progress, engine, started)


def _responses_saved(responses_path: Path, items: list[Item]) -> str:
    """What an interrupted run leaves: how many of its items have a response in the file."""
    ids = {item.id for item in items}
    saved = {r.id for r in read_responses_lenient(responses_path)} & ids if responses_path.exists() else set()
    return f"{len(saved)} of {len(items)} responses saved in {responses_path}"


def _infer(config: InferConfig, split: SplitData, items: list[Item], bad: BadRows, responses_path: Path,
           manifest_path: Path, progress: bool, engine: Engine | None, started: float) -> InferResult:
    """run_inference once its inputs are checked and its output locked."""
    settings = _run_settings(config)
    # A torn last line (kill -9 mid-write) is not counted as done; append_jsonl mends it before appending.
    done = {r.id for r in read_responses_lenient(responses_path)} if responses_path.exists() else set()
    if manifest_path.exists() and read_manifest(manifest_path, InferManifest).settings != settings:
        if done:
            raise MisguardError(
                f"{responses_path} was started with other settings ({manifest_path}); use another --out or "
                "--model-name, or delete both files to start over")
        # A run that saved no response (a wrong --model, stopped before its first batch) has nothing to mix with.
        log.info("%s: replacing the manifest of a run with other settings that saved no response", manifest_path)
    # --limit may grow between runs; ids outside this split (or shard) mean the file belongs to another run.
    unknown = done - {item.id for item in select_items(split.items, None, config.shard)}
    if unknown:
        raise MisguardError(f"{responses_path} has responses for ids not in this run: {sorted(unknown)[:5]}")
    todo = [item for item in items if item.id not in done]
    already_done = len(items) - len(todo)

    manifest = InferManifest(settings=settings, data=str(Path(config.data).resolve()), items=len(items),
                             skipped_rows=bad.report())
    manifest.save(manifest_path)

    generated = 0
    if todo:
        owned = engine is None
        if engine is None:
            engine = load_engine(config.engine, config.model, config.engine_options)
        manifest.engine = engine.describe()
        manifest.save(manifest_path)
        requests = [user_request(item.id, split.image_paths(item), item.question) for item in todo]
        bar = progress_bar(len(items), already_done, desc=f"{config.name} {config.split}", unit="item",
                           enabled=progress)
        try:
            # Saved a chunk at a time; the bar moves as the engine finishes each batch or request of a chunk.
            results = engine.stream(requests, config.generation, progress=bar.update)
            responses = _responses(results, todo, split, bad, config.name)
            generated = append_as_they_come(responses_path, responses, engine.chunk_size)
        except ImageFileError as error:  # an engine that stops at a bad image rather than handing it back
            raise _located(error, todo, split) from None
        finally:
            bar.close()
            if owned:
                engine.close()

    # Batches finish out of order and a resumed run appends after the first; the finished file is in the split's
    # order with its id type, so it diffs line by line against an MIS-script run.
    _write_in_split_order(responses_path, split.items)
    manifest.skipped_rows = bad.report()
    manifest.finished().save(manifest_path)
    return InferResult(responses_path, manifest_path, total=len(items), already_done=already_done,
                       generated=generated, skipped_items=len(bad.skipped), seconds=time.time() - started)


def _write_in_split_order(path: Path, items: list[Item]) -> None:
    """Rewrite a responses file atomically in the order of `items`, each id with its item's type (an older file
    may hold "3" for the split's 3); a file already so is left alone. Raises DataError for a bad line."""
    if not path.exists():
        return
    responses = read_responses_lenient(path)
    position = {item.id: n for n, item in enumerate(items)}
    item_ids = {item.id: item.id for item in items}  # the item's id: the split's type (an IntegerId or a str)
    ordered = [r.model_copy(update={"id": item_ids.get(r.id, r.id)})
               for r in sorted(responses, key=lambda response: position.get(response.id, len(items)))]
    if [(type(r.id), r.id) for r in ordered] != [(type(r.id), r.id) for r in responses]:
        write_jsonl_atomic(path, ordered)


def _responses(results: Iterator[tuple[int, Generation | ImageFileError]], todo: list[Item], split: SplitData,
               bad: BadRows, model: str) -> Iterator[Response]:
    """The engine's generations as responses to their items; an item whose image the engine could not use goes to
    `bad` (which raises without skipping: the responses before it are saved all the same)."""
    for index, result in results:
        if isinstance(result, ImageFileError):
            bad.reject(split.image_error(todo[index], result.path, result.reason))
            continue
        yield Response(**todo[index].model_dump(), response=result.text, model=model)


def _located(error: ImageFileError, todo: list[Item], split: SplitData) -> DataError:
    """The item's bad-row error for an image error raised by the engine (the first item to do with that image)."""
    for item in todo:
        if error.path in map(str, split.image_paths(item)):
            return split.image_error(item, error.path, error.reason)
    return error


def merge_shards(out: Path, split: str, model_name: str) -> Path:
    """Join `<model_name>.shard-*-of-N.jsonl` under OUT/<split>/ into `<model_name>.jsonl`, in item order, then
    move the shards and their manifests into OUT/<split>/shards/: a tool that reads every file of the split's
    folder (the MIS GPT-4o scorer globs it) sees each response once. A re-run reads the shards from there (or
    from either place, after a merge cut short), and `infer --shard` finds a merged shard there, done.
    Returns the merged path. Raises MisguardError if shards are missing, unfinished, or overlap (nothing is moved
    then)."""
    folder = Path(out) / split
    merged_folder = folder / SHARDS_FOLDER
    pattern = f"{model_name}.shard-*-of-*.jsonl"
    shards = sorted([*folder.glob(pattern), *merged_folder.glob(pattern)])
    if not shards:
        raise MisguardError(f"no shard files {pattern} in {folder} or {merged_folder}")
    counts = {p.name.rsplit("-of-", 1)[1].removesuffix(".jsonl") for p in shards}
    if len(counts) != 1:
        raise MisguardError(f"shards of different counts in {folder}: {sorted(p.name for p in shards)}")
    n = int(counts.pop())
    expected = [_shard_file(folder, f"{model_name}.shard-{i}-of-{n}.jsonl") for i in range(n)]
    missing = [p.name for p in expected if not p.exists()]
    if missing:
        raise MisguardError(f"missing shards in {folder}: {', '.join(missing)}")
    merged: dict[str, Response] = {}
    expected_total = 0
    for path in expected:
        manifest_path = _shard_manifest(path)
        manifest = read_manifest(manifest_path, InferManifest) if manifest_path.exists() else None
        if manifest is None or not manifest.complete:
            raise MisguardError(f"{path} is not finished (re-run its `misguard infer --shard` to complete it)")
        expected_total += manifest.items
        for response in read_responses_lenient(path):
            if response.id in merged:
                raise MisguardError(f"id {response.id} appears in more than one shard ({path})")
            merged[response.id] = response
    if len(merged) != expected_total:
        raise MisguardError(f"shards hold {len(merged)} responses, manifests promise {expected_total}")
    target = folder / f"{model_name}.jsonl"
    write_jsonl_atomic(target, sorted(merged.values(), key=_split_order(manifest.data, split)))
    # Only after the merged file is safely written: a crash before here leaves every shard where it was.
    merged_folder.mkdir(exist_ok=True)
    for path in expected:
        for file in (path, _shard_manifest(path)):
            if file.parent == folder and file.exists():
                os.replace(file, merged_folder / file.name)
    return target


SHARDS_FOLDER = "shards"
"""Where `merge_shards` moves the shards it has merged, under OUT/<split>/."""


def _shard_file(folder: Path, name: str) -> Path:
    """A shard's file: in the split's folder, or in its shards/ folder once merged (or missing from both)."""
    return folder / name if (folder / name).exists() else folder / SHARDS_FOLDER / name


def _split_order(data: str, split: str):
    """A sort key putting responses in the split's order (the shards' data folder, as their manifest names it);
    the ids' own order (numbers by value) when that folder can no longer be read."""
    try:
        position = {item.id: n for n, item in enumerate(load_split(data, split).items)}
    except (MisguardError, OSError) as exc:
        log.warning("merge: %s not readable (%s); responses ordered by id", data, exc)
        return lambda response: (0, id_order(response.id))
    return lambda response: (position.get(response.id, len(position)), id_order(response.id))


def _shard_manifest(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json")
