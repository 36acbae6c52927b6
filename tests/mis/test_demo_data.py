"""mis.demo_data: a synthetic MIS-shaped directory that is deterministic and loads like the real benchmark."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from misguard.core.errors import MisguardError
from misguard.core.records import CATEGORIES, SPLITS
from misguard.core.splits import load_split
from misguard.mis.demo_data import OBJECT_NAMES, SHAPES, SUB_CATEGORIES, make_demo_data

N_ITEMS = 12  # the demo_dir fixture's items per split


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def split_rows(folder: Path, split: str) -> list[dict]:
    return json.loads((folder / f"mis_{split}.json").read_text(encoding="utf-8"))


def test_published_layout_and_readme(demo_dir):
    for split in SPLITS:
        rows = split_rows(demo_dir, split)
        assert isinstance(rows, list) and len(rows) == N_ITEMS
        for row in rows:
            assert list(row) == ["id", "question", "category", "sub_category", "image_path1", "image_path2"]
            assert row["image_path1"] == f"{split}_image/{row['id']}/object1.png"
            assert row["image_path2"] == f"{split}_image/{row['id']}/object2.png"
    readme = (demo_dir / "README.txt").read_text(encoding="utf-8")
    assert "SYNTHETIC" in readme and "misguard" in readme
    assert not list(demo_dir.rglob("*.tmp"))  # no temp files left from the atomic writes


def test_every_item_loads_through_load_split(demo_dir):
    for split in SPLITS:
        data = load_split(demo_dir, split, check_images=True)
        assert len(data.items) == N_ITEMS and data.skipped == []


def test_categories_and_sub_categories(demo_dir):
    assert tuple(SUB_CATEGORIES) == CATEGORIES
    assert all(2 <= len(subs) <= 3 for subs in SUB_CATEGORIES.values())
    seen = set()
    for split in SPLITS:
        items = load_split(demo_dir, split).items
        seen |= {item.category for item in items}
        for item in items:
            assert item.sub_category in SUB_CATEGORIES[item.category]
    assert seen == set(CATEGORIES)


def test_questions_are_marked_synthetic_and_refer_to_both_images(demo_dir):
    for split in SPLITS:
        for item in load_split(demo_dir, split).items:
            assert item.question.startswith("[synthetic]")
            assert "the object in the first image" in item.question
            assert "the object in the second image" in item.question


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo_dir, tmp_path):
    again = all_files(make_demo_data(tmp_path / "again", n_items=N_ITEMS, seed=0))
    assert again == all_files(demo_dir)

    other = all_files(make_demo_data(tmp_path / "other", n_items=N_ITEMS, seed=1))
    assert other.keys() == again.keys()  # same layout ...
    differing = [name for name in again if again[name] != other[name]]
    assert any(name.endswith(".json") for name in differing)  # ... different content
    assert sum(name.endswith(".png") for name in differing) > len(again) // 2


def _probe(image: Image.Image, box: tuple[int, int, int, int], u: float, v: float) -> tuple[int, int, int]:
    """The pixel at (u, v) in the shape's own coordinates: (0, 0) is the centre, +-1 the box's edges."""
    x0, y0, x1, y1 = box
    cx, cy, radius = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    return image.getpixel((round(cx + u * radius), round(cy + v * radius)))


# Points that tell the shapes apart (1 = inside the shape): a square box corner, 45 degrees near the rim, the
# bottom-left, the middle left, and halfway out at 45 degrees.
PROBES = [(-0.9, -0.9), (-0.672, -0.672), (-0.8, 0.9), (-0.8, 0.0), (-0.55, -0.55)]
SIGNATURES = {
    "square": (1, 1, 1, 1, 1),
    "circle": (0, 1, 0, 1, 1),
    "triangle": (0, 0, 1, 0, 0),
    "diamond": (0, 0, 0, 1, 0),
    "hexagon": (0, 0, 0, 1, 1),
}


def test_images_show_the_declared_shape_and_object(demo_dir):
    assert set(SIGNATURES) == set(SHAPES)
    shapes_seen, sizes_seen = set(), set()
    for split in SPLITS:
        data = load_split(demo_dir, split)
        for item in data.items:
            for path in data.image_paths(item):
                with Image.open(path) as image:
                    image.load()
                    assert image.mode == "RGB"
                    assert 224 <= image.width <= 448 and 224 <= image.height <= 448
                    shape = image.text["misguard:shape"]
                    assert image.text["misguard:object"] in OBJECT_NAMES
                    box = tuple(int(v) for v in image.text["misguard:shape_box"].split(","))
                    background = image.getpixel((1, 1))
                    fill = _probe(image, box, 0.0, 0.0)
                    assert fill != background
                    signature = tuple(int(_probe(image, box, u, v) == fill) for u, v in PROBES)
                    outside = [_probe(image, box, u, v) for (u, v), inside in zip(PROBES, signature) if not inside]
                    assert signature == SIGNATURES[shape], (path, shape)
                    assert all(pixel == background for pixel in outside), path
                    shapes_seen.add(shape)
                    sizes_seen.add(image.size)
    assert len(shapes_seen) >= 4
    assert len(sizes_seen) > 10


def test_the_two_images_of_an_item_show_different_objects(demo_dir):
    data = load_split(demo_dir, "hard")
    for item in data.items:
        objects = []
        for path in data.image_paths(item):
            with Image.open(path) as image:
                objects.append(image.text["misguard:object"])
        assert objects[0] != objects[1]


def test_rerun_into_the_same_folder_overwrites_and_n_items_is_checked(tmp_path):
    make_demo_data(tmp_path, n_items=3, seed=5)
    first = all_files(tmp_path)
    make_demo_data(tmp_path, n_items=3, seed=5)
    assert all_files(tmp_path) == first
    assert len(load_split(tmp_path, "real").items) == 3
    with pytest.raises(MisguardError):
        make_demo_data(tmp_path / "empty", n_items=0)


def test_max_side_bounds_the_images_and_the_default_is_unchanged(tmp_path, demo_dir):
    small = make_demo_data(tmp_path / "small", n_items=3, seed=0, max_side=112)
    sizes = [Image.open(p).size for p in sorted(small.rglob("*.png"))]
    assert len(sizes) == 3 * 2 * len(SPLITS) and all(56 <= side <= 112 for size in sizes for side in size)
    assert split_rows(small, "easy") == split_rows(demo_dir, "easy")[:3]  # same items, smaller pictures
    default = [Image.open(p).size for p in sorted(demo_dir.rglob("*.png"))]
    assert all(224 <= side <= 448 for size in default for side in size)
    with pytest.raises(MisguardError, match="max_side"):
        make_demo_data(tmp_path / "tiny", n_items=1, max_side=10)
