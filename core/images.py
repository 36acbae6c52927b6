"""Opening an image with bounded memory: the one place misguard turns image bytes or files into pixels.

The guard (data URLs, allowed files), `infer` and `score` (the data directory's files) all decode through
`open_image`. Its limits are checked in this order, each before the work it protects:
1. the encoded size (`max_bytes`), from the file's size or the bytes' length, before reading anything;
2. the header's width x height (`max_pixels`), before any pixel is decoded (a decompression bomb stops here);
3. decoding straight to about `target_pixels` where the format allows it (JPEG's DCT scaling via `Image.draft`),
   then `Image.reduce` by a whole factor in the image's own mode (a 1-bit PNG is reduced at 1 byte a pixel, not
   after it became 3), and only then conversion to RGB. The result is never smaller than the target (the
   consumer's own resize still sets the final size, so the model sees what it would without the cap) and less
   than 4x the target.
A file that is missing, truncated or not an image raises `ImageError` with a short `code` and a reason; callers
add where it came from (the request field, or the data file's line).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from misguard.core.errors import MisguardError

DEFAULT_MAX_IMAGE_BYTES = 10 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class ImageError(MisguardError):
    """An image that cannot be used. `code`: "image_too_large" (over a limit), "invalid_image" (not a readable
    image, truncated) or "image_not_found"."""

    def __init__(self, message: str, *, code: str = "invalid_image"):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before decoding: its size in pixels and its format."""

    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image. `target_pixels`: the most pixels the consumer will use (a judge's processor resizes
    larger images down anyway): a larger image is decoded to between that and 4x that; None decodes at full
    size."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    target_pixels: int | None = None

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "target_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")


def read_header(source: bytes | str | Path, limits: ImageLimits | None = None) -> ImageHeader:
    """The image's header (size and format) without decoding its pixels. Raises ImageError for a missing,
    oversized (bytes or header pixels) or unreadable image."""
    limits = limits or ImageLimits()
    with _opened(source, limits) as image:
        return _checked_header(image, limits)


def open_image(source: bytes | str | Path, limits: ImageLimits | None = None) -> tuple[Image.Image, ImageHeader]:
    """(the image as RGB, decoded to [target, 4 x target) pixels when it is larger than `limits.target_pixels`; its
    header as the file says it). Raises
    ImageError for a missing, oversized or unreadable (also truncated) image; nothing is decoded past a limit."""
    limits = limits or ImageLimits()
    try:
        with _opened(source, limits) as image:
            header = _checked_header(image, limits)
            target = limits.target_pixels
            if target is not None and header.pixels > target and image.format == "JPEG":
                scale = math.sqrt(target / header.pixels)
                # draft picks the smallest DCT scale (1/2, 1/4, 1/8) that is still at least this size.
                image.draft("RGB", (math.ceil(header.width * scale), math.ceil(header.height * scale)))
            image.load()
            if target is not None and image.width * image.height > target:
                # The largest whole factor that stays at or above the target: the consumer resizes the rest.
                image = _reduced(image, math.isqrt(image.width * image.height // target))
            return image.convert("RGB"), header
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check, where a format hides the size until load
        raise ImageError(f"image is too large to decode: {exc}", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"not a readable image ({_reason(exc)})") from None


def _reduced(image: Any, factor: int) -> Any:
    """`image` smaller by a whole `factor` on each side, in a mode as small as its own: 1-bit as 8-bit grey
    (Image.reduce does not take 1-bit), palette images by nearest neighbour (averaging palette indices is
    meaningless), the rest by Image.reduce's box average."""
    if factor <= 1:
        return image
    if image.mode == "1":
        image = image.convert("L")
    if image.mode == "P":
        size = (max(1, image.width // factor), max(1, image.height // factor))
        return image.resize(size, Image.Resampling.NEAREST)
    return image.reduce(factor)


def _opened(source: bytes | str | Path, limits: ImageLimits) -> Any:
    """Image.open (lazy: header only) on bytes or a file, after the byte limit; a PIL image is its own context
    manager, closed on exit. Raises ImageError for a missing, oversized or unreadable image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size, stream = len(source), io.BytesIO(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"image file not found: {path}", code="image_not_found") from None
        except OSError as exc:
            raise ImageError(f"cannot read the image file {path} ({exc.strerror})") from None
        if not path.is_file():
            raise ImageError(f"not a regular file: {path}")
        stream = path
    if size > limits.max_bytes:
        raise ImageError(f"image is {size} bytes, over the limit of {limits.max_bytes}", code="image_too_large")
    try:
        return Image.open(stream)
    except Image.DecompressionBombError as exc:  # Pillow's header check at over twice its MAX_IMAGE_PIXELS
        raise ImageError(f"image is too large to decode: {exc}", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"not a readable image ({_reason(exc)})") from None


def _checked_header(image: Any, limits: ImageLimits) -> ImageHeader:
    header = ImageHeader(image.width, image.height, image.format or "?")
    if header.pixels > limits.max_pixels:
        raise ImageError(f"image is {header.width}x{header.height} = {header.pixels} pixels, over the limit of "
                         f"{limits.max_pixels}", code="image_too_large")
    return header


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a format Pillow reads"
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
