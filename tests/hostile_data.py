"""Copies of the demo MIS data with a bad file planted, for the tests of how each stage and engine copes."""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from misguard.core.records import Item
from misguard.core.splits import load_split
from misguard.engines.messages import image_area


def hostile_copy(demo_dir: Path, tmp_path: Path) -> tuple[Path, Item, int]:
    """A copy of the demo data whose easy item with the largest images (so the transformers engine, which sorts a
    window by size, runs its batch last) has a truncated JPEG as its first image: its header reads, its pixels do
    not. Returns (data, that item, its line in mis_easy.json)."""
    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    split = load_split(data, "easy")
    item = max(split.items, key=lambda i: sum(image_area(p) for p in split.image_paths(i)))
    image = split.image_paths(item)[0]
    with Image.open(image) as decoded:
        decoded.convert("RGB").save(image, format="JPEG")  # named .png; Pillow goes by the bytes
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return data, item, split.lines[item.id]
