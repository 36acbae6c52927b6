"""The guard's policy: what each rail checks, what a block looks like, and what happens when the judge fails.

A policy is a YAML file (`misguard serve --policy policy.yaml`); every field has a default, so an empty file or
none at all is the default policy: both rails on, fail closed, a refusal completion for blocked requests. A
field that is misspelt or has the wrong type is an error naming the file, line and field, never ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from misguard.core.errors import DataError

DEFAULT_REFUSAL = ("I can't help with that. This request was stopped by a safety check because, together with "
                   "its images, it may lead to harm.")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RailPolicy(_Section):
    enabled: bool = True
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    """Block when the calibrated p_unsafe >= threshold. None: the judge's own threshold (from its calibration or
    judge.json) on the output rail, 0.5 on the input rail."""
    calibration: Path | None = None
    """A calibration file (`misguard calibrate`) whose safety calibrator maps this rail's raw p_unsafe. None: the
    judge's calibration on the output rail (it was fitted on MIS responses), raw p_unsafe on the input rail."""


class BlockPolicy(_Section):
    action: Literal["refusal", "error"] = "refusal"
    """refusal: a normal completion with `refusal_text` and finish_reason "content_filter"; error: an
    OpenAI-style error with `error_status`."""
    refusal_text: str = DEFAULT_REFUSAL
    error_status: int = Field(400, ge=400, le=499)
    error_message: str = "The request was blocked by a safety check."


class Timeouts(_Section):
    judge_s: float = Field(30.0, gt=0)
    """Longest wait for one rail's verdict, queueing in the micro-batcher included."""
    upstream_s: float = Field(300.0, gt=0)
    """Longest wait for the upstream's whole answer (streamed answers included)."""


class Batching(_Section):
    max_batch_size: int = Field(16, ge=1)
    """Most rail checks judged in one engine call."""
    max_wait_ms: float = Field(5.0, ge=0)
    """Longest the first check of a batch waits for others to join it."""


class Limits(_Section):
    max_images: int = Field(4, ge=0)
    """Most images in one request (all messages together)."""
    max_image_bytes: int = Field(10 * 2**20, ge=1)
    """Largest encoded image (after base64 decoding, or the file's size)."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest width x height; checked from the image header, before the image is decoded."""
    max_request_bytes: int = Field(64 * 2**20, ge=1)
    """Largest request body."""
    allowed_image_roots: list[Path] = Field(default_factory=list)
    """Folders whose files a request may name as images (file:// URLs or absolute paths). Empty: none."""


class Audit(_Section):
    path: Path | None = None
    """JSON Lines audit log, one record per request; None: no log."""
    redact_text: bool = False
    """Write the SHA-256 and length of questions and responses instead of their text."""


class Policy(_Section):
    """Everything the guard decides by. Defaults: both rails on, fail closed, refusal completions."""

    input_rail: RailPolicy = Field(default_factory=RailPolicy)
    output_rail: RailPolicy = Field(default_factory=RailPolicy)
    on_block: BlockPolicy = Field(default_factory=BlockPolicy)
    on_failure: Literal["closed", "open"] = "closed"
    """closed: a judge error or timeout is an error for the client (HTTP 503). open: the request passes, and the
    pass is logged, counted (misguard_fail_open_total) and marked in the response."""
    on_out_of_domain: Literal["escalate", "block", "allow"] | None = None
    """What a verdict the judge flags out of domain (its trust under the judge's threshold) leads to: escalate
    (to the VLM judge behind a lite judge; where there is none, block), block (reason out_of_domain), or allow
    (the verdict decides as usual). Always counted (misguard_out_of_domain_total) and marked. None: escalate when
    a VLM judge is configured behind a lite judge, else block."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    batching: Batching = Field(default_factory=Batching)
    limits: Limits = Field(default_factory=Limits)
    audit: Audit = Field(default_factory=Audit)


def load_policy(path: str | Path | None) -> Policy:
    """The policy in a YAML file (None: the default policy); relative paths in it are resolved against the
    file's folder. Raises DataError naming the file, line and field for a file that is not valid YAML or a
    field that is unknown or invalid."""
    if path is None:
        return Policy()
    import yaml  # the `guard` extra: only a policy file needs it (the default Policy and the Guard API do not)

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read the policy file ({exc.strerror})", path=path) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path=path,
                        line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataError("a policy is a YAML mapping of sections (input_rail, output_rail, ...)", path=path, line=1)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(x) for x in error["loc"]]
        raise DataError(error["msg"], path=path, line=_line_of(root, loc), field=".".join(loc)) from None
    base = path.resolve().parent
    for rail in (policy.input_rail, policy.output_rail):
        if rail.calibration is not None and not rail.calibration.is_absolute():
            rail.calibration = base / rail.calibration
    policy.limits.allowed_image_roots = [root if root.is_absolute() else base / root
                                         for root in policy.limits.allowed_image_roots]
    if policy.audit.path is not None and not policy.audit.path.is_absolute():
        policy.audit.path = base / policy.audit.path
    return policy


def _line_of(node, loc: list[str]) -> int | None:
    """The 1-based line of the field at `loc`: its key's line in a mapping (a block value starts on the next
    line), its item's line in a sequence, or the line of its deepest existing parent."""
    import yaml  # the `guard` extra, as in load_policy

    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, value) for k, value in node.value if k.value == key), None)
            if pair is None:
                return line
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            return line
    return line
