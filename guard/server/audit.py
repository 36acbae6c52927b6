"""The audit log: one typed `AuditRecord` a line for each request the guard answered (allowed, blocked or failed).

Images are kept only as SHA-256, size, width, height and format (never pixels); with `redact_text` (the default)
questions and answers only as {"sha256", "chars"}. Each line is strict JSON (no NaN or Infinity), written and
flushed whole, so a crash loses no earlier record. A new log file is readable by its owner only (0600). The log
rotates by size as logging's RotatingFileHandler does (audit.jsonl -> audit.jsonl.1 -> .2 ...), between records,
never inside one. `read_audit_log` reads a log back, validated, naming file, line and field of a bad record.
"""
from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from misguard.core.jsonl import read_jsonl

AUDIT_VERSION = 1
log = logging.getLogger("misguard.serve")


class AuditRecord(BaseModel):
    """One request the guard answered, filled in as it goes through the rails."""

    # NaN and Infinity are not JSON: were one to reach a record, it is written as null, never as a bare NaN that
    # strict JSON readers (jq, most log shippers) reject.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

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


class _AuditFile(logging.handlers.RotatingFileHandler):
    """logging's size-based rotation, for the audit log: files are created owner-only, a record larger than
    the limit gets a file of its own (an empty file is never rotated out), and a write that fails raises
    instead of printing to stderr (a request whose record cannot be written is not silently unaudited)."""

    def _open(self):
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(descriptor, "a", encoding=self.encoding, errors=self.errors)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        return super().shouldRollover(record) and self.stream.tell() > 0

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called inside emit's `except`: re-raises what failed


class AuditLog:
    """Appends AuditRecords to a JSON Lines file (created with its folder, mode 0600). `max_bytes` rotates it
    (None: never) keeping `backups` old files. `path` None: records are dropped."""

    def __init__(self, path: str | Path | None, *, redact_text: bool = True, max_bytes: int | None = None,
                 backups: int = 5):
        self.path = Path(path) if path is not None else None
        self.redact_text = redact_text
        self._file: _AuditFile | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("the audit log %s can be read by other users (mode %o); it holds what clients sent",
                            self.path, stat.S_IMODE(self.path.stat().st_mode))
            self._file = _AuditFile(self.path, maxBytes=max_bytes or 0, backupCount=backups, encoding="utf-8")
            self._file.setFormatter(logging.Formatter("%(message)s"))

    def text(self, value: str | None) -> Any:
        """`value` as the log keeps it: as is, or its SHA-256 and length when text is redacted."""
        if value is None or not self.redact_text:
            return value
        return {"sha256": hashlib.sha256(value.encode()).hexdigest(), "chars": len(value)}

    def write(self, record: AuditRecord) -> None:
        if self._file is None:
            return
        # One write call per line (the handler writes message and newline together, then flushes): appends from
        # one process never interleave within a line, and rotation happens only between lines.
        self._file.handle(logging.makeLogRecord({"msg": record.model_dump_json(), "args": None}))

    def close(self) -> None:
        if self._file is not None:
            if self._file.stream is not None:
                self._file.flush()
                os.fsync(self._file.stream.fileno())
            self._file.close()
            self._file = None


def read_audit_log(path: str | Path) -> list[AuditRecord]:
    """Every record of an audit log, in order. Raises DataError naming the file, line and field of a bad one."""
    return read_jsonl(path, AuditRecord)
