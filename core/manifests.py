"""Run manifests: what a stage ran, beside what it wrote, for the record and for resume.

Each is a typed record with a version; reading one validates it, and a bad file gets one line naming the file
and the field. Written atomically, once when a run starts (complete: false) and again when it ends.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Self

from misguard.core.jsonl import read_json_record, write_text_atomic
from misguard.core.version import __version__

MANIFEST_VERSION = 2
"""2: typed manifests with a stage (misguard 0.1 wrote version 1, untyped)."""
ManifestT = TypeVar("ManifestT", bound="RunManifest")


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunManifest(BaseModel):
    """What every stage's manifest holds."""

    model_config = ConfigDict(extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    stage: str
    misguard_version: str = __version__
    started_at: str = Field(default_factory=utc_now)
    finished_at: str | None = None
    complete: bool = False
    """False until the run has written everything it was asked for."""
    data: str
    """The MIS directory the run read (absolute)."""
    engine: dict[str, Any] | None = None
    """What ran the model (its `describe()`), once one was loaded."""
    skipped_rows: list[str] = Field(default_factory=list)
    """Bad input rows left out with --skip-bad, one line each: file:line: field: why."""

    def finished(self) -> Self:
        """This manifest marked complete, now."""
        return self.model_copy(update={"complete": True, "finished_at": utc_now()})

    def save(self, path: str | Path) -> None:
        """Write the manifest as JSON, atomically."""
        write_text_atomic(path, self.model_dump_json(indent=2) + "\n")


class InferManifest(RunManifest):
    """`misguard infer`'s manifest, beside OUT/<split>/<model-name>.jsonl."""

    stage: Literal["infer"] = "infer"
    settings: dict[str, Any]
    """What must match for a re-run to continue the same file: model, model_name, engine, split, generation,
    shard."""
    items: int
    """Items this run is responsible for (after --limit and --shard)."""


class ScoreManifest(RunManifest):
    """`misguard score`'s manifest, OUT/score.manifest.json."""

    stage: Literal["score"] = "score"
    judge_folder: str
    judge: dict[str, Any]
    """The judge's judge.json."""
    calibration: str | None
    """The id of the calibration applied, or None."""
    calibration_file: str | None = None
    responses: list[str]
    cases: int
    """Responses to judge in this run's files."""
    cascade: dict[str, Any] | None = None
    """With a lite judge in front: its folder, the band and this run's figures (decided, escalated, seconds)."""


def read_manifest(path: str | Path, kind: type[ManifestT]) -> ManifestT:
    """The manifest at `path` as `kind`. Raises DataError naming the file (and the field) when it cannot be read,
    was written by another misguard version, or is malformed (delete it and its results to start over)."""
    return read_json_record(path, kind, version_field="manifest_version", supported=MANIFEST_VERSION, older=False)
