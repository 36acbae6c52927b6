"""core/images.py: every limit is checked before the work it protects, and decoding stops at the target size."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from misguard.core.images import ImageError, ImageLimits, open_image, read_header


def encoded(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("P", "PNG"), ("L", "PNG"), ("RGB", "PNG"), ("RGB", "JPEG"),
                                      ("RGBA", "WEBP")])
def test_decodes_to_at_most_the_target_as_rgb_and_keeps_the_header(mode, fmt):
    data = encoded(mode, (1600, 1200), fmt)
    image, header = open_image(data, ImageLimits(target_pixels=200 * 150))
    assert (header.width, header.height) == (1600, 1200)
    assert image.mode == "RGB"
    # Never below the target (the judge's processor sets the final size), and under 4x it.
    assert 200 * 150 <= image.width * image.height < 4 * 200 * 150
    assert abs(image.width / image.height - 4 / 3) < 0.05


def test_without_a_target_the_image_is_full_size():
    image, _ = open_image(encoded("RGB", (321, 123)))
    assert image.size == (321, 123)


def test_a_1_bit_bomb_is_reduced_without_ever_being_rgb_at_full_size():
    # ~2 KB on the wire; 16 MB at a byte a pixel, 48 MB as full-size RGB. Pillow's pixel buffers are outside
    # tracemalloc's reach, so the high-water RSS of a fresh process (Linux) is what is measured.
    script = textwrap.dedent("""
        import io
        from PIL import Image
        def high_water_mb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's across exec)
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) // 1024
        from misguard.core.images import ImageLimits, open_image
        buffer = io.BytesIO(); Image.new("1", (4000, 4000)).save(buffer, format="PNG"); data = buffer.getvalue()
        before = high_water_mb()
        image, _ = open_image(data, ImageLimits(target_pixels=1000 * 1000))
        print(image.size[0], image.size[1], high_water_mb() - before)
    """)
    width, height, grown_mb = map(int, subprocess.run([sys.executable, "-c", script], check=True,
                                                      capture_output=True, text=True).stdout.split())
    assert (width, height) == (1000, 1000)
    assert grown_mb < 40, f"decoding grew the process by {grown_mb} MB: the image went through full-size RGB"


def test_limits_are_checked_before_decoding():
    data = encoded("1", (4000, 4000))
    with pytest.raises(ImageError, match="16000000 pixels, over the limit") as error:
        open_image(data, ImageLimits(max_pixels=4000 * 3999))
    assert error.value.code == "image_too_large"
    with pytest.raises(ImageError, match="bytes, over the limit") as error:
        read_header(data, ImageLimits(max_bytes=len(data) - 1))
    assert error.value.code == "image_too_large"
    assert read_header(data) .pixels == 16_000_000


def test_a_header_past_pillows_own_bomb_limit_is_an_image_error():
    data = encoded("1", (20000, 10000))  # 200 M pixels: Pillow itself refuses to open it
    for read in (read_header, open_image):
        with pytest.raises(ImageError, match="too large") as error:
            read(data, ImageLimits(max_pixels=10**9))
        assert error.value.code == "image_too_large"


def test_truncated_missing_and_non_images_are_image_errors(tmp_path):
    jpeg = encoded("RGB", (640, 480), "JPEG")
    with pytest.raises(ImageError, match="truncated") as error:
        open_image(jpeg[: len(jpeg) // 2])
    assert error.value.code == "invalid_image"
    with pytest.raises(ImageError, match="not a format Pillow reads"):
        open_image(b"plain text, not an image")
    with pytest.raises(ImageError) as error:
        open_image(tmp_path / "missing.png")
    assert error.value.code == "image_not_found"
    with pytest.raises(ImageError, match="not a regular file"):
        open_image(tmp_path)


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ValueError, match="target_pixels"):
        ImageLimits(target_pixels=-1)
