"""One internal multimodal message format, converted by each engine at its own edge.

A message is ``{"role": "system" | "user" | "assistant", "content": [part, ...]}`` and a part is
``{"type": "image", "image": PATH_OR_PIL_IMAGE}`` or ``{"type": "text", "text": STR}``, in the order the model
should see them (the OpenAI / VLMEvalKit shape, with images as local paths instead of URLs).

Image files are opened through core.images only, within an `ImageLimits` (bytes, header pixels, and the size the
engine's processor will use). A file that cannot be used raises `ImageFileError`; an engine that runs a batch hands
it back in place of that request's result, so one bad image costs its own request, not the batch.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from PIL import Image

from misguard.core.errors import DataError
from misguard.core.images import ImageError, ImageLimits, open_image, read_header
from misguard.core.settings import check_settings, setting

Message = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One conversation to run: a stable id (the MIS item id in `infer`) and its messages."""

    id: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings shared by every engine. Greedy by default, as the seed evaluates."""

    max_new_tokens: int = setting(1024, at_least=1, help="Most tokens generated per response.")
    temperature: float = setting(0.0, at_least=0.0, help="Sampling temperature; 0 = greedy.")
    top_p: float = setting(1.0, above=0.0, at_most=1.0,
                           help="Nucleus sampling: the smallest set of tokens with this much probability.")
    seed: int = setting(0, at_least=0, help="Seed of the sampling.")

    def __post_init__(self):
        check_settings(self)  # the library refuses what the command line refuses


@dataclass(frozen=True)
class Generation:
    """What an engine returns for one request: the text, and what it knows about how it ended."""

    text: str
    n_tokens: int | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelSet:
    """A closed set of answer tokens to score: their ids in the model's tokenizer and their text (HTTP servers
    that are not vLLM name tokens by text only)."""

    ids: tuple[int, ...]
    texts: tuple[str, ...]

    def __post_init__(self):
        if len(self.ids) != len(self.texts) or len(set(self.ids)) != len(self.ids) or not self.ids:
            raise ValueError(f"label tokens must be distinct and non-empty: ids {self.ids}, texts {self.texts}")


@dataclass(frozen=True)
class LabelProbs:
    """A model's next-token distribution at the start of its answer, over a closed set of label tokens."""

    probs: tuple[float, ...]
    """One probability per requested token id, in the order asked, renormalized to sum to 1."""
    mass: float
    """The labels' total probability before renormalizing: near 1 when the model follows the answer format,
    small when it wanted to say something else (a diagnostic, and a signal for calibration)."""


def label_probs_from_logprobs(logprobs: Sequence[float]) -> LabelProbs:
    """LabelProbs from the full-vocabulary log-probabilities of the label tokens (a numerically stable
    renormalization)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return LabelProbs(probs=tuple(w / total for w in weights), mass=math.exp(top) * total)


def user_request(request_id: str, images: Sequence[str | Path], text: str) -> Request:
    """A one-turn request: the images first, then the text (the MIS prompt shape)."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": str(p)} for p in images]
    parts.append({"type": "text", "text": text})
    return Request(id=request_id, messages=({"role": "user", "content": parts},))


def content_parts(message: Message) -> list[dict[str, Any]]:
    """A message's parts as a list; a plain string content counts as one text part."""
    content = message["content"]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def images_of(messages: Sequence[Message]) -> list[Any]:
    """Every image part's value (path or PIL image), in order of appearance."""
    return [p["image"] for m in messages for p in content_parts(m) if p["type"] == "image"]


class ImageFileError(DataError):
    """An image part's file that cannot be used: missing, over a limit, or not decodable (truncated, not an image).
    `path` is the image file, `reason` why, `code` core.images.ImageError's ("image_not_found", "image_too_large",
    "invalid_image")."""

    def __init__(self, message: str, *, path: str | Path, code: str = "invalid_image"):
        super().__init__(message, path=path)
        self.code = code


def load_image(image: Any, limits: ImageLimits | None = None):
    """An image part's value as an RGB PIL image: a PIL image as it is, a file decoded by core.images.open_image
    within `limits` (default: core.images' byte and pixel limits, full size). Raises ImageFileError naming the
    file when it is missing, over a limit or cannot be decoded."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    try:
        return open_image(Path(image), limits)[0]
    except ImageError as error:
        raise ImageFileError(error.message, path=image, code=error.code) from None


def image_area(image: Any, limits: ImageLimits | None = None) -> int:
    """An image part's width x height in pixels, read from the file's header without decoding the pixels.
    Raises ImageFileError for a file that is missing, not an image, or over a limit."""
    if isinstance(image, Image.Image):
        return image.width * image.height
    try:
        return read_header(Path(image), limits).pixels
    except ImageError as error:
        raise ImageFileError(error.message, path=image, code=error.code) from None


def image_key(image: Any) -> Any:
    """What makes two image parts the same image: the path for a path, the object itself for a loaded image."""
    return str(image) if isinstance(image, (str, Path)) else id(image)


def images_key(messages: Sequence[Message]) -> tuple:
    """What makes two requests' images the same: their image parts' keys, in order."""
    return tuple(image_key(im) for im in images_of(messages))


def once_per_image(convert: Callable[[Any], T]) -> Callable[[Any], T]:
    """`convert` (an image part's value -> what an engine sends) that does each image once: the same path or image
    object again returns the first result, or raises the first ImageFileError again without trying the file a
    second time (a judge's K responses to one item share their two images)."""
    done: dict[Any, T | ImageFileError] = {}

    def converted(image: Any) -> T:
        key = image_key(image)
        if key not in done:
            try:
                done[key] = convert(image)
            except ImageFileError as error:
                done[key] = error
        result = done[key]
        if isinstance(result, ImageFileError):
            raise result
        return result

    return converted


def image_loader(limits: ImageLimits | None = None) -> Callable[[Any], Any]:
    """load_image within `limits`, once per image (`once_per_image`)."""
    return once_per_image(lambda image: load_image(image, limits))


def image_data_url(image: Any, limits: ImageLimits | None = None) -> str:
    """A base64 data URL for an image part: PNG for a PIL image; for a path, the file's own bytes once they decode
    within `limits`, as the server will decode them (its size and header are checked before it is read; it is
    decoded at the smallest scale its format allows, as only whether it decodes matters here). Raises
    ImageFileError for a file that is missing, over a limit, or not a readable image (also truncated)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    else:
        path = Path(image)
        image_area(path, limits)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageFileError(f"cannot read the image file ({exc.strerror})", path=path) from None
        try:
            open_image(data, replace(limits or ImageLimits(), target_pixels=1))
        except ImageError as error:
            raise ImageFileError(error.message, path=path, code=error.code) from None
        fmt = (Image.registered_extensions().get(path.suffix.lower()) or "PNG").lower()
        mime = f"image/{'jpeg' if fmt == 'jpeg' else fmt}"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
