"""The guard's policy: what each rail checks, what a block looks like, and what happens when the judge fails.

A policy is a YAML file (`misguard serve --policy policy.yaml`); every field has a default, so an empty file or
none at all is the default policy: both rails on, fail closed, a refusal completion for blocked requests. A
field that is misspelt or has the wrong type is an error naming the file, line and field, never ignored.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from misguard.core.errors import DataError
from misguard.core.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

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
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    """Largest encoded image (after base64 decoding, or the file's size)."""
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    """Largest width x height; checked from the image header, before the image is decoded."""
    max_decoded_pixels_per_request: int = Field(2 * 4096 * 4096, ge=1)
    """Most pixels of all of a request's images together (their headers' width x height, checked before any is
    decoded); more: HTTP 413 naming the image that crossed it. The default takes two photos at max_image_pixels
    (an MIS item's two images), not four: decoding a pixel costs 1-4 bytes before the image is reduced."""
    max_decoded_pixels_in_flight: int = Field(8 * 4096 * 4096, ge=1)
    """Most pixels decoding or decoded at once, all requests together: a request's header pixels while its images
    decode, then what it keeps of them (decoded no larger than the judge reads) until its reply, when they are
    released. A request that would cross it: HTTP 429 with Retry-After, at once (nothing decoded). The default,
    about 134 M pixels, is four requests at max_decoded_pixels_per_request decoding together (some 0.5 GB at
    worst); requests that keep a few megapixels each pass by the hundred. A judge that reads no pixels (the lite
    judge) decodes nothing and holds none of it. At least max_decoded_pixels_per_request."""
    max_text_tokens: int | None = Field(None, ge=16)
    """Most tokens of text each rail judges, in the judge's own tokens (characters / 4 for a judge without a
    tokenizer): the input rail's conversation, the output rail's question and response. A longer text is not
    refused: the rail judges its head and its tail (the input rail gives 3/4 of the budget to the newest turns,
    the rest to the conversation's opening; the output rail gives the question up to a quarter, the response its
    head and tail halves), its middle is left out, and the verdict's reason says the text was cut. A 1 MB text
    is cut by characters first, never tokenized whole. None: the judge's own (Judge.text_tokens: half a VLM's
    context, what the lite judge's windows read)."""
    max_request_bytes: int = Field(64 * 2**20, ge=1)
    """Largest request body."""
    max_json_depth: int = Field(64, ge=2)
    """Deepest nesting of arrays and objects in a request body (a chat request needs about 6); deeper: HTTP 400."""
    max_messages: int = Field(256, ge=1)
    """Most chat messages in one request; more: HTTP 400 naming `messages`."""
    allowed_image_roots: list[Path] = Field(default_factory=list)
    """Folders whose files a request may name as images (file:// URLs or absolute paths). Empty: none."""

    @model_validator(mode="after")
    def _in_flight_holds_a_request(self):
        if self.max_decoded_pixels_in_flight < self.max_decoded_pixels_per_request:
            raise ValueError(f"max_decoded_pixels_in_flight ({self.max_decoded_pixels_in_flight}) must be at least "
                             f"max_decoded_pixels_per_request ({self.max_decoded_pixels_per_request}): a request "
                             "at the per-request limit could never be admitted")
        return self


class Audit(_Section):
    path: Path | None = None
    """JSON Lines audit log, one record per request; None: no log. A new log file is created readable by its
    owner only (mode 0600)."""
    redact_text: bool = True
    """Write the SHA-256 and length of questions and responses instead of their text (false: the text itself,
    blocked answers included)."""
    max_bytes: int | None = Field(100 * 2**20, ge=1)
    """Size at which the log rotates, as logging's RotatingFileHandler does: audit.jsonl becomes audit.jsonl.1,
    .1 becomes .2, and so on; a record is never split across two files. None: never rotate (for an outside
    logrotate)."""
    backups: int = Field(5, ge=1)
    """Rotated files kept (audit.jsonl.1 ... audit.jsonl.N); the oldest is deleted."""


class Server(_Section):
    """The HTTP server's own limits (uvicorn), against clients that hold connections open."""

    limit_concurrency: int = Field(256, ge=1)
    """Most open connections (and requests in flight) at once; a request beyond it gets HTTP 503 at once."""
    timeout_keep_alive_s: float = Field(5.0, gt=0)
    """How long an idle keep-alive connection is kept open between requests."""
    body_read_timeout_s: float = Field(10.0, gt=0)
    """Longest a request's body may take to arrive, once its headers have: then HTTP 408 and the connection is
    closed (a client trickling its body in, slowloris, holds a connection no longer)."""
    header_read_timeout_s: float = Field(10.0, gt=0)
    """Longest a request's headers may take to arrive, counted from the connection's opening (its first request)
    or from the end of the previous response (keep-alive): then the connection is closed, after HTTP 408 if part
    of a request had arrived (a client trickling its headers in, slowloris, holds a connection no longer)."""


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
    server: Server = Field(default_factory=Server)


def load_policy(path: str | Path | None) -> Policy:
    """The policy in a YAML file (None: the default policy); relative paths in it are resolved against the
    file's folder. Raises DataError naming the file, line and field for a file that is not valid YAML, a key
    given twice in one mapping, a field that is unknown or invalid, or an allowed image root that is the
    filesystem's root."""
    if path is None:
        return Policy()
    import yaml  # the `guard` extra: only a policy file needs it (the default Policy and the Guard API do not)

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read the policy file ({exc.strerror})", path=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"the policy file is not UTF-8 text (byte {exc.start})", path=path) from None
    loader = None
    try:
        loader = _unique_key_loader()(text)  # the reader refuses characters YAML does not allow, here already
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except _DuplicateKey as exc:
        raise DataError(f"key {exc.key!r} is given twice in one mapping (first on line {exc.first_line}); "
                        "YAML would silently keep the last", path=path, line=exc.line,
                        field=".".join(_path_to(root, exc.node) or [str(exc.key)])) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path=path,
                        line=mark.line + 1 if mark else None) from None
    except RecursionError:  # an alias that contains itself, or nesting deeper than Python's stack
        raise DataError("the policy nests too deeply (or an alias contains itself)", path=path) from None
    finally:
        if loader is not None:
            loader.dispose()
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
    policy.limits.allowed_image_roots = [folder if folder.is_absolute() else base / folder
                                         for folder in policy.limits.allowed_image_roots]
    for i, image_root in enumerate(policy.limits.allowed_image_roots):
        resolved = image_root.resolve()
        if resolved == Path(resolved.anchor):
            loc = ["limits", "allowed_image_roots", str(i)]
            raise DataError(f"{image_root} is the filesystem's root: it would let a request read any file the guard "
                            "can; name the folders that hold images", path=path, line=_line_of(root, loc),
                            field=".".join(loc))
    if policy.audit.path is not None and not policy.audit.path.is_absolute():
        policy.audit.path = base / policy.audit.path
    return policy


class _DuplicateKey(Exception):
    def __init__(self, key, node, first_line: int):
        super().__init__(key)
        self.key, self.node, self.first_line = key, node, first_line
        self.line = node.start_mark.line + 1


@functools.cache
def _unique_key_loader():
    """PyYAML's SafeLoader, except that a key given twice in one mapping raises _DuplicateKey (SafeLoader keeps
    the last one silently, so a policy could say `on_failure: closed` and, further down, `open`)."""
    import yaml  # the `guard` extra, as in load_policy

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *defaults` keys are meant to be overridden by the mapping's own
                    key = self.construct_object(key_node, deep=True)
                    try:
                        if key in first:
                            raise _DuplicateKey(key, key_node, first[key])
                    except TypeError:
                        continue  # an unhashable key: SafeLoader's own error names it below
                    first[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _path_to(root, target) -> list[str] | None:
    """The keys (and sequence indices) from `root` down to the key node `target`, or None when it is not there.
    Iterative, and each node visited once: an alias may make the node graph a cycle."""
    import yaml  # the `guard` extra, as in load_policy

    stack, seen = [(root, [])], set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key is target:
                    return [*path, str(key.value)]
                stack.append((value, [*path, str(key.value)]))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, [*path, str(i)]) for i, item in enumerate(node.value))
    return None


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
