"""The audit log: one JSON line per request the guard answered (allowed, blocked or failed).

Fields: request_id, time (UTC, ISO 8601), decision ("allow" | "block" | "error"), blocked_by, fail_open,
status_code, error, stream, upstream_model, judge, rails (each rail's verdict: decision, status, score,
threshold, score_raw, latency_ms, calibration), latency_ms (input_rail, upstream, output_rail, total),
images (sha256, bytes, width, height, format: never pixels), question and response (their text, or with
`redact_text` {"sha256", "chars"}). Each line is written and flushed whole, so a crash loses no earlier record.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends records to a JSON Lines file (created with its folder). `path` None: records are dropped."""

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

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        # One write call per line: appends from one process never interleave within a line.
        self._file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
