"""The audit log: one typed `AuditRecord` a line for each request the guard answered (allowed, blocked or failed).

Images are kept only as SHA-256, size, width, height and format (never pixels); with `redact_text` questions and
answers only as {"sha256", "chars"}. Each line is written and flushed whole, so a crash loses no earlier record;
`read_audit_log` reads a log back, validated, naming file, line and field of a bad record.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from misguard.core.jsonl import read_jsonl

AUDIT_VERSION = 1


class AuditRecord(BaseModel):
    """One request the guard answered, filled in as it goes through the rails."""

    model_config = ConfigDict(extra="forbid")

    audit_version: int = AUDIT_VERSION
    request_id: str
    time: str
    """When it arrived: UTC, ISO 8601 to the millisecond."""
    judge: str
    decision: Literal["allow", "block", "error"] | None = None
    """None until the request is decided; a request that ends without a decision is written as "error"."""
    blocked_by: Literal["input", "output"] | None = None
    fail_open: bool = False
    """True when a judge failure let the request through (on_failure: open)."""
    status_code: int | None = None
    error: str | None = None
    invalid: bool = False
    """The request itself was malformed (a 4xx before any rail ran)."""
    stream: bool | None = None
    model: str | None = None
    """The model the client asked for."""
    upstream_model: str | None = None
    question: str | dict[str, Any] | None = None
    response: str | dict[str, Any] | None = None
    images: list[dict[str, Any]] = Field(default_factory=list)
    rails: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Each rail's verdict (decision, status, score, threshold, reason, score_raw, fail_open, latency_ms, ...)."""
    latency_ms: dict[str, float | None] = Field(default_factory=dict)
    """input_rail, upstream, output_rail, total."""


class AuditLog:
    """Appends AuditRecords to a JSON Lines file (created with its folder). `path` None: records are dropped."""

    def __init__(self, path: str | Path | None, *, redact_text: bool = False):
        self.path = Path(path) if path is not None else None
        self.redact_text = redact_text
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def text(self, value: str | None) -> Any:
        """`value` as the log keeps it: as is, or its SHA-256 and length when text is redacted."""
        if value is None or not self.redact_text:
            return value
        return {"sha256": hashlib.sha256(value.encode()).hexdigest(), "chars": len(value)}

    def write(self, record: AuditRecord) -> None:
        if self._file is None:
            return
        # One write call per line: appends from one process never interleave within a line.
        self._file.write(record.model_dump_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def read_audit_log(path: str | Path) -> list[AuditRecord]:
    """Every record of an audit log, in order. Raises DataError naming the file, line and field of a bad one."""
    return read_jsonl(path, AuditRecord)
