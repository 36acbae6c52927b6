"""OpenAI chat messages in, checked: the guard's one gate for what clients send.

Every image is decoded and checked here (base64, really an image, byte and pixel limits, image count, files only
under the allowed roots) before anything is judged or forwarded. The result holds the messages twice: in
misguard's internal format for the judge (PIL images) and in OpenAI format for the upstream, with file images
turned into base64 data URLs (the upstream cannot see the guard's files). The guard never fetches a URL.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from misguard.core.errors import MisguardError
from misguard.engines.messages import Message
from misguard.guard.policy import Limits


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
    """What the audit log keeps of an image: never its pixels."""

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
    """Internal format (images as RGB PIL images), for the judge."""
    forward_messages: list[dict[str, Any]]
    """OpenAI format for the upstream: as sent, except file images replaced by base64 data URLs."""
    images: list[Any] = field(default_factory=list)
    """Every image in the conversation, in order (RGB PIL images)."""
    image_info: list[ImageInfo] = field(default_factory=list)
    question: str = ""
    """The text of the last user turn: what the rails judge as the question."""


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat_messages(messages: Any, limits: Limits, *, param: str = "messages") -> ChatInput:
    """Check OpenAI chat `messages` (or misguard's internal format: {"type": "image", "image": PATH_OR_PIL})
    and return them as a ChatInput. Raises InputError naming the field for anything malformed or over a limit."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of chat messages", param=param)
    internal: list[Message] = []
    forward: list[dict[str, Any]] = []
    images: list[Any] = []
    infos: list[ImageInfo] = []
    question = ""
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
                if len(images) >= limits.max_images:
                    raise InputError(f"too many images: at most {limits.max_images} per request",
                                     param=at, code="too_many_images")
                image, info, url = _read_image_part(part, limits, at)
                images.append(image)
                infos.append(info)
                parts.append({"type": "image", "image": image})
                # image_url may be the legacy bare string form; forwarded in the object form either way.
                sent = part.get("image_url") if isinstance(part.get("image_url"), dict) else {}
                forward_parts.append({**part, "image_url": {**sent, "url": url}}
                                     if kind == "image_url" else {"type": "image_url", "image_url": {"url": url}})
            else:
                raise InputError(f"unsupported content part type {kind!r} (expected 'text' or 'image_url')",
                                 param=f"{at}.type")
        internal.append({"role": "system" if role == "developer" else role, "content": parts})
        forward.append({**message, "content": content if isinstance(content, str) else forward_parts})
        if role == "user":
            question = "\n".join(p["text"] for p in parts if p["type"] == "text")
    if not any(m["role"] == "user" for m in internal):
        raise InputError("the conversation has no user message", param=param)
    return ChatInput(messages=internal, forward_messages=forward, images=images, image_info=infos,
                     question=question)


def _read_image_part(part: dict[str, Any], limits: Limits, at: str) -> tuple[Any, ImageInfo, str]:
    """(RGB PIL image, its ImageInfo, the data URL to forward) for one image part."""
    if part["type"] == "image":
        value = part.get("image")
        if hasattr(value, "save"):  # already a PIL image (library callers)
            return _from_pil(value, limits, f"{at}.image")
        if not isinstance(value, (str, Path)):
            raise InputError("an image part needs 'image': a file path or a PIL image", param=f"{at}.image")
        data = _read_file(str(value), limits, f"{at}.image")
        return _decode(data, limits, f"{at}.image")
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
        image, info, _ = _decode(data, limits, at, data_url=False)
        return image, info, url  # forwarded as sent: no second base64 encoding
    scheme = urlparse(url).scheme
    if scheme in ("http", "https", "ftp"):
        raise InputError("the guard never fetches images from the network: send them as base64 data URLs",
                         param=at, code="remote_image")
    if scheme == "file":
        path = unquote(urlparse(url).path)
    elif scheme == "" or url.startswith("/"):
        path = url
    else:
        raise InputError(f"unsupported image URL scheme {scheme!r}: use a base64 data URL or an allowed file",
                         param=at, code="invalid_image")
    return _decode(_read_file(path, limits, at), limits, at)


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


def _decode(data: bytes, limits: Limits, at: str, *, data_url: bool = True) -> tuple[Any, ImageInfo, str]:
    """(RGB image, its ImageInfo, its base64 data URL, or "" when not asked for). Raises InputError."""
    if len(data) > limits.max_image_bytes:
        raise InputError(f"image is larger than {limits.max_image_bytes} bytes", param=at, code="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height, fmt = probe.width, probe.height, probe.format or "?"
            # The header's size, before any pixel is decoded: a decompression bomb stops here.
            if width * height > limits.max_image_pixels:
                raise InputError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{limits.max_image_pixels}", param=at, code="image_too_large")
            probe.load()
            image = probe.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own header check: over twice its MAX_IMAGE_PIXELS
        raise InputError(f"image is too large to decode: {exc}", param=at, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError("the data is not a readable image", param=at, code="invalid_image") from None
    info = ImageInfo(hashlib.sha256(data).hexdigest(), len(data), width, height, fmt)
    if not data_url:
        return image, info, ""
    mime = _MIME.get(fmt, "application/octet-stream")
    return image, info, f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _from_pil(image: Any, limits: Limits, at: str) -> tuple[Any, ImageInfo, str]:
    if image.width * image.height > limits.max_image_pixels:
        raise InputError(f"image is {image.width}x{image.height} pixels, over the limit of "
                         f"{limits.max_image_pixels}", param=at, code="image_too_large")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return _decode(buffer.getvalue(), limits, at)
