"""OpenAI chat messages in, checked: the guard's one gate for what clients send.

Every image is checked here (base64, really an image, byte and pixel limits, image count, files only under the
allowed roots) before anything is judged or forwarded, in an order that bounds memory: first every image's header
(no pixel decoded), the request's pixels in all (`limits.max_decoded_pixels_per_request`, HTTP 413) and, in the
server, the pixels all requests are decoding or holding at once (`PixelBudget`, HTTP 429); only then are images
decoded, through core/images.py, straight to about the size the judge reads (`Judge.image_pixels`). A judge that
reads no pixels (the lite judge) gets none: its images are checked by their headers and hashed, never decoded.

The result holds the messages twice: in misguard's internal format for the judge (PIL images) and in OpenAI
format for the upstream, with file images turned into base64 data URLs (the upstream cannot see the guard's
files), and the text the rails judge (`conversation`, `question`). The guard never fetches a URL.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from misguard.core.errors import MisguardError
from misguard.core.images import ImageError, ImageHeader, ImageLimits, open_image, read_header
from misguard.engines.messages import Message
from misguard.guard.policy import Limits
from misguard.judges.protocol import DEFAULT_IMAGE_PIXELS


class InputError(MisguardError):
    """A request the guard refuses before judging it: an OpenAI-style 4xx error. `param` names the field
    (e.g. "messages.0.content.1.image_url.url"), `code` is a short machine-readable reason."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request",
                 status_code: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status_code = status_code


@dataclass(frozen=True)
class ImageInfo:
    """What the audit log keeps of an image: never its pixels. width and height are the header's (the image as
    sent, not as decoded for the judge)."""

    sha256: str
    bytes: int
    width: int
    height: int
    format: str

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, "width": self.width, "height": self.height,
                "format": self.format}


@dataclass
class ChatInput:
    """A checked conversation."""

    messages: list[Message]
    """Internal format, for the judge: images as RGB PIL images, decoded to about the judge's size; without
    decoding (a judge that reads no pixels) image parts are left out."""
    forward_messages: list[dict[str, Any]]
    """OpenAI format for the upstream: as sent, except file images replaced by base64 data URLs."""
    images: list[Any] = field(default_factory=list)
    """Every image in the conversation, in order (RGB PIL images); empty when images are not decoded."""
    image_info: list[ImageInfo] = field(default_factory=list)
    """Every image's hash and header, decoded or not."""
    question: str = ""
    """The text of the last user turn: the question the output rail judges the response to, and the audit log's."""
    conversation: str = ""
    """What the input rail judges: every user turn and every assistant turn the client sent, oldest first (as
    "User: ..." / "Assistant: ..." paragraphs; a lone user turn is its text alone), so a harmful first turn
    followed by "continue" is judged whole. System, developer and tool turns are not in it."""
    decoded_pixels: int = 0
    """Pixels of the decoded images kept (what the request holds of the in-flight budget until its reply)."""


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
ROLES = ("system", "developer", "user", "assistant", "tool")
_JUDGED_ROLES = {"user": "User", "assistant": "Assistant"}


class PixelBudget:
    """The pixels all requests in flight are decoding or holding, against `limit`
    (limits.max_decoded_pixels_in_flight). Each request is a `holder` (its request id): `reserve` charges its
    images' header pixels before they decode (False, nothing charged, when that would cross the limit), `keep`
    lowers the charge to the decoded pixels it keeps, `release` frees it all at the reply. Thread-safe: requests
    are read on worker threads."""

    retry_after_s = 1
    """What a 429 tells the client to wait: decoding takes a fraction of a second; judging, seconds."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"a pixel budget needs a positive limit, got {limit}")
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Pixels charged to all holders now."""
        with self._lock:
            return sum(self._held.values())

    def reserve(self, holder: str, pixels: int) -> bool:
        """Charge `holder` `pixels` (in place of what it held); False, and nothing changes, when the total would
        cross the limit."""
        with self._lock:
            others = sum(self._held.values()) - self._held.get(holder, 0)
            if others + pixels > self.limit:
                return False
            self._held[holder] = pixels
            return True

    def keep(self, holder: str, pixels: int) -> None:
        """Lower `holder`'s charge to `pixels` (never raises it)."""
        with self._lock:
            if holder in self._held:
                self._held[holder] = min(self._held[holder], pixels)

    def release(self, holder: str) -> None:
        """Free everything `holder` holds (nothing when it holds nothing)."""
        with self._lock:
            self._held.pop(holder, None)


@dataclass
class _Image:
    """An image part between its header check and its decoding."""

    data: bytes
    header: ImageHeader
    at: str
    part: dict[str, Any]
    """Its part in the internal messages, whose "image" is filled in once decoded."""


def parse_chat_messages(messages: Any, limits: Limits, *, param: str = "messages",
                        image_pixels: int | None = DEFAULT_IMAGE_PIXELS, budget: PixelBudget | None = None,
                        holder: str = "") -> ChatInput:
    """Check OpenAI chat `messages` (or misguard's internal format: {"type": "image", "image": PATH_OR_PIL})
    and return them as a ChatInput. `image_pixels`: the most pixels of an image the judge reads
    (Judge.image_pixels); None decodes no image. `budget`: the server's in-flight pixel budget, charged to
    `holder` (the caller releases it at the reply; a refused request holds nothing). Raises InputError naming the
    field for anything malformed or over a limit: HTTP 400; 413 for a request's images over
    limits.max_decoded_pixels_per_request; 429 when `budget` cannot take them now."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of chat messages", param=param)
    internal: list[Message] = []
    forward: list[dict[str, Any]] = []
    pending: list[_Image] = []
    turns: list[tuple[str, str]] = []
    question = ""
    request_pixels = 0
    for m, message in enumerate(messages):
        where = f"{param}.{m}"
        if not isinstance(message, dict):
            raise InputError("a message must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        content = message.get("content")
        if content is None and role in ("assistant", "tool"):
            content = ""
        parts_in = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts_in, list):
            raise InputError("content must be a string or a list of content parts", param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        forward_parts: list[Any] = []
        for p, part in enumerate(parts_in):
            at = f"{where}.content.{p}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError("a text part needs a string 'text'", param=f"{at}.text")
                parts.append({"type": "text", "text": part["text"]})
                forward_parts.append(part)
            elif kind in ("image_url", "image"):
                if len(pending) >= limits.max_images:
                    raise InputError(f"too many images: at most {limits.max_images} per request",
                                     param=at, code="too_many_images")
                data, field_at, url = _image_bytes(part, limits, at)
                header = _header(data, limits, field_at)
                request_pixels += header.pixels
                if request_pixels > limits.max_decoded_pixels_per_request:
                    raise InputError(f"the request's images are {request_pixels} pixels up to this one, over the "
                                     f"limit of {limits.max_decoded_pixels_per_request} per request",
                                     param=field_at, code="image_too_large", status_code=413)
                slot = {"type": "image", "image": None}
                pending.append(_Image(data, header, field_at, slot))
                parts.append(slot)
                url = url or _data_url(data, header)
                # image_url may be the legacy bare string form; forwarded in the object form either way.
                sent = part.get("image_url") if isinstance(part.get("image_url"), dict) else {}
                forward_parts.append({**part, "image_url": {**sent, "url": url}}
                                     if kind == "image_url" else {"type": "image_url", "image_url": {"url": url}})
            else:
                raise InputError(f"unsupported content part type {kind!r} (expected 'text' or 'image_url')",
                                 param=f"{at}.type")
        internal.append({"role": "system" if role == "developer" else role, "content": parts})
        forward.append({**message, "content": content if isinstance(content, str) else forward_parts})
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        if role == "user":
            question = text
        if role in _JUDGED_ROLES and text.strip():
            turns.append((role, text))
    if not any(m["role"] == "user" for m in internal):
        raise InputError("the conversation has no user message", param=param)
    images, kept = _decoded(pending, limits, image_pixels, budget, holder, request_pixels, param)
    if image_pixels is None:
        for message in internal:
            message["content"] = [p for p in message["content"] if p["type"] != "image"]
    infos = [ImageInfo(hashlib.sha256(i.data).hexdigest(), len(i.data), i.header.width, i.header.height,
                       i.header.format) for i in pending]
    return ChatInput(messages=internal, forward_messages=forward, images=images, image_info=infos,
                     question=question, conversation=_conversation_text(turns), decoded_pixels=kept)


def _conversation_text(turns: list[tuple[str, str]]) -> str:
    """The judged turns as one text: a lone user turn as it is (what a single-turn request always was), else each
    turn as a "User: " / "Assistant: " paragraph, oldest first."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{_JUDGED_ROLES[role]}: {text}" for role, text in turns)


def _decoded(pending: list[_Image], limits: Limits, image_pixels: int | None, budget: PixelBudget | None,
             holder: str, request_pixels: int, param: str) -> tuple[list[Any], int]:
    """(the decoded images, their pixels), each decoded to between `image_pixels` and 4x that (core.images: the
    judge's processor makes the last resize) once `budget`
    took the request's header pixels; nothing decoded when `image_pixels` is None. Raises InputError (429 when the
    budget is full); a request refused here holds nothing of the budget."""
    if image_pixels is None or not pending:
        return [], 0
    if budget is not None and not budget.reserve(holder, request_pixels):
        raise InputError(f"the guard is busy decoding other requests' images ({budget.in_flight} pixels in flight); "
                         f"this request's {request_pixels} would cross limits.max_decoded_pixels_in_flight "
                         f"({budget.limit}): retry in a moment", param=param, code="images_in_flight",
                         status_code=429)
    target = ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                         target_pixels=image_pixels)
    images = []
    try:
        for image in pending:
            try:
                decoded, _ = open_image(image.data, target)
            except ImageError as exc:
                raise _input_error(exc, image.at) from None
            image.part["image"] = decoded
            images.append(decoded)
    except BaseException:
        if budget is not None:
            budget.release(holder)
        raise
    kept = sum(image.width * image.height for image in images)
    if budget is not None:
        budget.keep(holder, kept)
    return images, kept


def _image_bytes(part: dict[str, Any], limits: Limits, at: str) -> tuple[bytes, str, str | None]:
    """(the image's encoded bytes, the field they came from, the URL to forward as it was sent, or None to forward
    them as a new data URL) for one image part."""
    if part["type"] == "image":
        value = part.get("image")
        if hasattr(value, "save"):  # already a PIL image (library callers)
            return _pil_bytes(value, limits, f"{at}.image"), f"{at}.image", None
        if not isinstance(value, (str, Path)):
            raise InputError("an image part needs 'image': a file path or a PIL image", param=f"{at}.image")
        return _read_file(str(value), limits, f"{at}.image"), f"{at}.image", None
    at = f"{at}.image_url"
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise InputError("an image_url part needs image_url.url: a data URL or an allowed file", param=f"{at}.url")
    at = f"{at}.url"
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError("a data URL image must be base64: data:image/<type>;base64,<data>", param=at,
                             code="invalid_image")
        if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
            raise InputError(f"image is larger than {limits.max_image_bytes} bytes", param=at,
                             code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("the image's base64 data is invalid", param=at, code="invalid_image") from None
        return data, at, url  # forwarded as sent: no second base64 encoding
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise InputError("the guard never fetches images from the network: send them as base64 data URLs",
                         param=at, code="remote_image")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"a file URL on another host ({parsed.netloc!r}): the guard reads only its own files "
                             "(file:///path or file://localhost/path)", param=at, code="remote_image")
        path = unquote(parsed.path)
    elif parsed.scheme == "" or url.startswith("/"):
        path = url
    else:
        raise InputError(f"unsupported image URL scheme {parsed.scheme!r}: use a base64 data URL or an allowed "
                         "file", param=at, code="invalid_image")
    return _read_file(path, limits, at), at, None


def _read_file(path: str, limits: Limits, at: str) -> bytes:
    """The bytes of an image file under an allowed root. Symlinks are resolved before the check."""
    if not limits.allowed_image_roots:
        raise InputError("file images are not allowed by this guard's policy (limits.allowed_image_roots is "
                         "empty): send a base64 data URL", param=at, code="image_path_not_allowed")
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in limits.allowed_image_roots):
        raise InputError("the image file is outside the allowed image roots", param=at,
                         code="image_path_not_allowed")
    try:
        size = resolved.stat().st_size
        if size > limits.max_image_bytes:
            raise InputError(f"image is larger than {limits.max_image_bytes} bytes", param=at,
                             code="image_too_large")
        return resolved.read_bytes()
    except OSError:
        raise InputError("the image file cannot be read", param=at, code="invalid_image") from None


def _header(data: bytes, limits: Limits, at: str) -> ImageHeader:
    """The image's header (size and format), checked against the byte and pixel limits; nothing decoded."""
    try:
        return read_header(data, ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels))
    except ImageError as exc:
        raise _input_error(exc, at) from None


def _input_error(exc: ImageError, at: str) -> InputError:
    code = "image_too_large" if exc.code == "image_too_large" else "invalid_image"
    return InputError(exc.message, param=at, code=code)


def _data_url(data: bytes, header: ImageHeader) -> str:
    return f"data:{_MIME.get(header.format, 'application/octet-stream')};base64,{base64.b64encode(data).decode()}"


def _pil_bytes(image: Any, limits: Limits, at: str) -> bytes:
    """A caller's PIL image as PNG bytes (what is forwarded and hashed), after its pixel limit."""
    if image.width * image.height > limits.max_image_pixels:
        raise InputError(f"image is {image.width}x{image.height} pixels, over the limit of "
                         f"{limits.max_image_pixels}", param=at, code="image_too_large")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
