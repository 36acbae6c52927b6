"""core.splits and core.jsonl: loading the published split files (with precise errors) and the JSON Lines every
stage reads and writes."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from misguard.core.errors import DataError
from misguard.core.images import ImageLimits
from misguard.core.jsonl import (
    GPT_EVAL_FIELDS,
    append_as_they_come,
    append_jsonl,
    iter_jsonl_lenient,
    read_jsonl,
    read_responses,
    read_responses_lenient,
    read_verdicts,
    write_jsonl_atomic,
    write_verdicts,
)
from misguard.core.records import SPLITS, Item, Response, Verdict
from misguard.core.rows import BadRows
from misguard.core.splits import find_split_file, load_split

N_ITEMS = 12  # the demo_dir fixture's items per split


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture
def mis_copy(demo_dir, tmp_path) -> Path:
    """A private, writable copy of the demo directory (the session fixture itself stays untouched)."""
    return Path(shutil.copytree(demo_dir, tmp_path / "mis"))


def raw_items(mis_dir: Path, split: str = "easy") -> list[dict]:
    return json.loads((mis_dir / f"mis_{split}.json").read_text(encoding="utf-8"))


def write_array(path: Path, elements: list) -> list[int]:
    """Write a pretty JSON array the way the published files look; return each element's 1-based start line."""
    text, starts = "[\n", []
    for index, element in enumerate(elements):
        starts.append(text.count("\n") + 1)
        text += json.dumps(element, indent=4) + (",\n" if index < len(elements) - 1 else "\n")
    path.write_text(text + "]\n", encoding="utf-8")
    return starts


def write_lines(path: Path, elements: list) -> list[int]:
    """Write JSON Lines (one element per line); return each element's line."""
    path.write_text("".join(json.dumps(e) + "\n" for e in elements), encoding="utf-8")
    return list(range(1, len(elements) + 1))


def to_jsonl_layout(mis_dir: Path) -> Path:
    """Turn the JSON arrays of an MIS directory into mis_<split>.jsonl files (images stay)."""
    for split in SPLITS:
        write_lines(mis_dir / f"mis_{split}.jsonl", raw_items(mis_dir, split))
        (mis_dir / f"mis_{split}.json").unlink()
    return mis_dir


def assert_located(error: DataError, path: Path, line: int | None, field: str | None) -> None:
    assert error.path == str(path)
    assert error.line == line
    assert error.field == field
    message = str(error)
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message
    if field is not None:
        assert f"'{field}'" in message


def make_response(item: Item, model: str = "tiny-vlm", text: str = "I can't help with that.") -> Response:
    return Response(**item.model_dump(), response=text, model=model)


def make_verdict(response: Response, safety: str = "Safe", level: int = 2) -> Verdict:
    return Verdict(label_perception=f"Perception Level{level}", label_str=safety, category=response.category,
                   question=response.question, response=response.response, image_path1=response.image_path1,
                   image_path2=response.image_path2)


# ------------------------------------------------------------------------------------------------ layouts

def test_load_good_directory(demo_dir):
    for split in SPLITS:
        data = load_split(demo_dir, split)
        assert data.split == split
        assert len(data.items) == N_ITEMS
        assert data.skipped == []
        assert data.root == demo_dir.absolute()
        assert len({item.id for item in data.items}) == N_ITEMS
        for item in data.items:
            first, second = data.image_paths(item)
            assert first.is_absolute() and first.is_file()
            assert second.is_absolute() and second.is_file()


def test_mis_test_parent_and_jsonl_give_identical_items(demo_dir, tmp_path):
    nested = tmp_path / "nested"
    shutil.copytree(demo_dir, nested / "mis_test")
    jsonl = to_jsonl_layout(Path(shutil.copytree(demo_dir, tmp_path / "jsonl")))
    for split in SPLITS:
        reference = load_split(demo_dir, split)
        from_parent = load_split(nested, split)
        from_jsonl = load_split(jsonl, split)
        assert from_parent.items == reference.items
        assert from_jsonl.items == reference.items
        assert from_parent.root == (nested / "mis_test").absolute()
        assert find_split_file(jsonl, split).suffix == ".jsonl"
        assert all(p.is_file() for item in from_parent.items for p in from_parent.image_paths(item))


def test_json_file_holding_json_lines_is_read_as_lines(mis_copy):
    elements = raw_items(mis_copy)
    write_lines(mis_copy / "mis_easy.json", elements)
    assert [item.id for item in load_split(mis_copy, "easy").items] == [str(e["id"]) for e in elements]


def test_unknown_split_lists_the_splits(demo_dir):
    with pytest.raises(DataError) as caught:
        load_split(demo_dir, "medium")
    for split in SPLITS:
        assert split in str(caught.value)


def test_missing_split_file_names_every_path_looked_at(tmp_path):
    with pytest.raises(DataError) as caught:
        find_split_file(tmp_path, "hard")
    message = str(caught.value)
    for name in ("mis_hard.json", "mis_hard.jsonl", str(tmp_path / "mis_test" / "mis_hard.json")):
        assert name in message


def test_missing_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "nowhere", "easy")


# ------------------------------------------------------------------------------------------------ bad items

BAD_INDEX = 4  # the element corrupted in each case (0-based); never the first, so line numbers matter


def _drop_question(elements, mis_dir):
    del elements[BAD_INDEX]["question"]
    return "question"


def _blank_category(elements, mis_dir):
    elements[BAD_INDEX]["category"] = "   "
    return "category"


def _blank_id(elements, mis_dir):
    elements[BAD_INDEX]["id"] = ""
    return "id"


def _question_wrong_type(elements, mis_dir):
    elements[BAD_INDEX]["question"] = 17
    return "question"


def _sub_category_null(elements, mis_dir):
    elements[BAD_INDEX]["sub_category"] = None
    return "sub_category"


def _missing_image(elements, mis_dir):
    (mis_dir / elements[BAD_INDEX]["image_path2"]).unlink()
    return "image_path2"


def _garbage_image(elements, mis_dir):
    (mis_dir / elements[BAD_INDEX]["image_path1"]).write_bytes(b"this is not a PNG at all" * 10)
    return "image_path1"


def _not_an_image_header(elements, mis_dir):
    # A PNG cut inside its header: not even its size reads.
    image = mis_dir / elements[BAD_INDEX]["image_path2"]
    image.write_bytes(image.read_bytes()[:20])
    return "image_path2"


def _image_bomb(elements, mis_dir):
    # 17 KB on disk, 12000 x 12000 pixels in its header: over the default pixel limit, refused before decoding.
    Image.new("1", (12000, 12000)).save(mis_dir / elements[BAD_INDEX]["image_path1"])
    return "image_path1"


def _symlink_outside(elements, mis_dir):
    # Inside the directory by name, outside it by the link's target.
    image = mis_dir / elements[BAD_INDEX]["image_path2"]
    shutil.copy(image, mis_dir.parent / "outside.png")
    image.unlink()
    image.symlink_to(mis_dir.parent / "outside.png")
    return "image_path2"


def _escaping_path(elements, mis_dir):
    # The target exists, so only the escape itself can be the reason for the error.
    shutil.copy(mis_dir / elements[0]["image_path1"], mis_dir.parent / "outside.png")
    elements[BAD_INDEX]["image_path1"] = "../outside.png"
    return "image_path1"


def _absolute_path(elements, mis_dir):
    elements[BAD_INDEX]["image_path2"] = str((mis_dir / elements[0]["image_path2"]).absolute())
    return "image_path2"


def _not_an_object(elements, mis_dir):
    elements[BAD_INDEX] = ["id", 5]
    return None


BAD_ITEM_CASES = [_drop_question, _blank_category, _blank_id, _question_wrong_type, _sub_category_null,
                  _missing_image, _garbage_image, _not_an_image_header, _image_bomb, _escaping_path,
                  _absolute_path, _symlink_outside, _not_an_object]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
@pytest.mark.parametrize("corrupt", BAD_ITEM_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_item_is_located_and_can_be_skipped(mis_copy, layout, corrupt):
    elements = raw_items(mis_copy)
    field = corrupt(elements, mis_copy)
    path = mis_copy / f"mis_easy.{layout}"
    if layout == "jsonl":
        (mis_copy / "mis_easy.json").unlink()
    starts = (write_array if layout == "json" else write_lines)(path, elements)

    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, path, starts[BAD_INDEX], field)

    data = load_split(mis_copy, "easy", bad=BadRows(skip=True))
    assert len(data.items) == N_ITEMS - 1
    assert len(data.skipped) == 1
    assert_located(data.skipped[0], path, starts[BAD_INDEX], field)
    good_ids = {str(e["id"]) for i, e in enumerate(elements) if i != BAD_INDEX}
    assert {item.id for item in data.items} == good_ids


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_duplicate_id_names_both_lines(mis_copy, layout):
    elements = raw_items(mis_copy)
    elements[7]["id"] = elements[2]["id"]
    path = mis_copy / f"mis_easy.{layout}"
    starts = (write_array if layout == "json" else write_lines)(path, elements)
    if layout == "jsonl":
        (mis_copy / "mis_easy.json").unlink()

    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, path, starts[7], "id")
    assert f"line {starts[2]}" in str(caught.value)

    data = load_split(mis_copy, "easy", bad=BadRows(skip=True))
    assert len(data.items) == N_ITEMS - 1 and len(data.skipped) == 1
    kept = [item for item in data.items if item.id == str(elements[2]["id"])]
    assert kept == [Item.model_validate(elements[2])]  # the first occurrence wins


def test_first_problem_in_file_order_is_raised(mis_copy):
    elements = raw_items(mis_copy)
    (mis_copy / elements[2]["image_path1"]).unlink()  # an image problem early in the file ...
    del elements[6]["category"]  # ... and a field problem later
    starts = write_array(mis_copy / "mis_easy.json", elements)
    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, mis_copy / "mis_easy.json", starts[2], "image_path1")
    data = load_split(mis_copy, "easy", bad=BadRows(skip=True))
    assert [(e.line, e.field) for e in data.skipped] == [(starts[2], "image_path1"), (starts[6], "category")]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_passes_the_header_check_and_is_found_by_decoding(mis_copy, fmt):
    elements = raw_items(mis_copy)
    relative = elements[BAD_INDEX]["image_path1"]
    with Image.open(mis_copy / relative) as image:
        image.convert("RGB").save(mis_copy / relative, format=fmt)  # the name says .png; the bytes decide
    truncate(mis_copy / relative)
    starts = write_array(mis_copy / "mis_easy.json", elements)

    split = load_split(mis_copy, "easy")  # its header reads: the cheap check lets it through
    assert len(split.items) == N_ITEMS
    item = next(i for i in split.items if i.id == str(elements[BAD_INDEX]["id"]))
    # ... and a run that fails to decode it reports it where the item is.
    error = split.image_error(item, split.image_paths(item)[0], "not a readable image (truncated)")
    assert_located(error, mis_copy / "mis_easy.json", starts[BAD_INDEX], "image_path1")
    assert f"item {item.id}" in str(error) and relative in str(error)

    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy", decode_images=True)
    assert_located(caught.value, mis_copy / "mis_easy.json", starts[BAD_INDEX], "image_path1")
    skipped = load_split(mis_copy, "easy", decode_images=True, bad=BadRows(skip=True))
    assert len(skipped.items) == N_ITEMS - 1 and skipped.skipped[0].line == starts[BAD_INDEX]


def test_the_pixel_and_byte_limits_are_the_callers(mis_copy):
    elements = raw_items(mis_copy)
    starts = write_array(mis_copy / "mis_easy.json", elements)
    sizes = []
    for element in elements:
        for field in ("image_path1", "image_path2"):
            with Image.open(mis_copy / element[field]) as image:
                sizes.append((image.width * image.height, field))
    limit = sorted(pixels for pixels, _ in sizes)[len(sizes) // 2]
    first = next(n for n, (pixels, _) in enumerate(sizes) if pixels > limit)
    with pytest.raises(DataError, match="pixels, over the limit") as caught:
        load_split(mis_copy, "easy", limits=ImageLimits(max_pixels=limit))
    assert_located(caught.value, mis_copy / "mis_easy.json", starts[first // 2], sizes[first][1])
    assert len(load_split(mis_copy, "easy", limits=ImageLimits(max_pixels=limit), bad=BadRows(skip=True)).items) == (
        N_ITEMS - len({n // 2 for n, (pixels, _) in enumerate(sizes) if pixels > limit}))
    with pytest.raises(DataError, match="bytes, over the limit"):
        load_split(mis_copy, "easy", limits=ImageLimits(max_bytes=100))


def test_check_images_false_skips_image_reads_but_not_path_checks(mis_copy):
    elements = raw_items(mis_copy)
    (mis_copy / elements[3]["image_path1"]).unlink()
    write_array(mis_copy / "mis_easy.json", elements)
    assert len(load_split(mis_copy, "easy", check_images=False).items) == N_ITEMS

    elements[3]["image_path1"] = "../../etc/passwd"
    write_array(mis_copy / "mis_easy.json", elements)
    with pytest.raises(DataError, match="image_path1"):
        load_split(mis_copy, "easy", check_images=False)


def test_array_element_starting_on_line_23_reports_line_23(mis_copy):
    elements = raw_items(mis_copy)
    del elements[2]["sub_category"]
    first_two = ",\n".join(json.dumps(e, indent=4) for e in elements[:2])  # lines 2-17
    text = "[\n" + first_two + ",\n" + "\n" * 5 + json.dumps(elements[2], indent=4) + "\n]\n"
    path = mis_copy / "mis_easy.json"
    path.write_text(text, encoding="utf-8")
    assert text.splitlines()[22].strip() == "{"  # the bad element really starts on line 23
    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, path, 23, "sub_category")


def test_array_elements_on_one_line_report_that_line(mis_copy):
    elements = raw_items(mis_copy)[:3]
    elements[2]["question"] = ""
    path = mis_copy / "mis_easy.json"
    path.write_text("\n\n" + json.dumps(elements) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, path, 3, "question")


def test_malformed_json_array_reports_the_broken_line_even_with_skip_bad(mis_copy):
    elements = raw_items(mis_copy)
    path = mis_copy / "mis_easy.json"
    starts = write_array(path, elements)
    lines = path.read_text(encoding="utf-8").split("\n")
    # Line starts[5] is '{', the next is the id, then the question: drop the comma that ends the question line.
    question_line = starts[5] + 2
    assert lines[question_line - 1].strip().startswith('"question"')
    lines[question_line - 1] = lines[question_line - 1].rstrip(",")
    path.write_text("\n".join(lines), encoding="utf-8")
    for skip_bad in (False, True):
        with pytest.raises(DataError) as caught:
            load_split(mis_copy, "easy", bad=BadRows(skip=skip_bad))
        # The decoder notices the missing comma where the next key begins.
        assert_located(caught.value, path, question_line + 1, None)
        assert "invalid JSON" in str(caught.value)


@pytest.mark.parametrize("text, line", [
    ("[\n  {}\n", 3),  # the array is never closed: reported at the end of the file
    ("[\n1,\n]\n", 3),  # trailing comma
    ('[\n{"id": 1} {"id": 2}]\n', 2),  # missing comma between elements
    ("[\n]\nextra\n", 3),  # data after the array
    ("[]\n", None),  # no items at all
    ("\n\n", None),
])
def test_broken_array_structure_raises_even_with_skip_bad(mis_copy, text, line):
    path = mis_copy / "mis_easy.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy", bad=BadRows(skip=True))
    assert_located(caught.value, path, line, None)


def test_malformed_jsonl_line_is_located_and_skippable(mis_copy):
    to_jsonl_layout(mis_copy)
    path = mis_copy / "mis_easy.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[5] = lines[5][: len(lines[5]) // 2]  # line 6 cut in half
    lines.insert(2, "")  # a blank line is ignored but still counts for line numbers: the bad one is now line 7
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, path, 7, None)
    data = load_split(mis_copy, "easy", bad=BadRows(skip=True))
    assert len(data.items) == N_ITEMS - 1 and [e.line for e in data.skipped] == [7]


def test_skipped_items_are_logged(mis_copy, caplog):
    elements = raw_items(mis_copy)
    del elements[1]["question"]
    write_array(mis_copy / "mis_easy.json", elements)
    with caplog.at_level(logging.WARNING, logger="misguard"):
        load_split(mis_copy, "easy", bad=BadRows(skip=True))
    assert any("question" in record.getMessage() for record in caplog.records)


def test_non_utf8_file_reports_the_line(mis_copy):
    path = mis_copy / "mis_easy.json"
    data = path.read_bytes().split(b"\n")
    index = next(i for i, line in enumerate(data) if i > 5 and b"synthetic" in line)
    data[index] = data[index].replace(b"synthetic", b"synth\xffetic")
    path.write_bytes(b"\n".join(data))
    with pytest.raises(DataError) as caught:
        load_split(mis_copy, "easy")
    assert_located(caught.value, path, index + 1, None)


# ------------------------------------------------------------------------------------------------ JSON Lines

@pytest.fixture
def responses(demo_dir) -> list[Response]:
    items = load_split(demo_dir, "easy").items
    return [make_response(item, model) for model in ("tiny-a", "tiny-b") for item in items[:5]]


def test_responses_round_trip_through_append_and_atomic_write(responses, tmp_path):
    appended = tmp_path / "runs" / "responses.jsonl"
    assert append_jsonl(appended, responses[:3]) == 3
    assert append_jsonl(appended, responses[3:]) == len(responses) - 3
    assert append_jsonl(appended, []) == 0
    assert read_responses(appended) == responses

    rewritten = tmp_path / "rewritten.jsonl"
    assert write_jsonl_atomic(rewritten, responses) == len(responses)
    assert read_responses(rewritten) == responses
    assert read_jsonl(rewritten, Response) == responses
    lines = rewritten.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(responses)
    assert {"response", "model", "id", "question", "category"} <= set(json.loads(lines[0]))


def test_each_record_is_one_line_whatever_its_text(responses, tmp_path):
    odd = responses[0].model_copy(update={"response": "line one\nline two\r\n\u2028 \u00e9 \u4e2d\u6587 \"quoted\""})
    path = tmp_path / "responses.jsonl"
    append_jsonl(path, [odd, responses[1]])
    assert path.read_bytes().count(b"\n") == 2
    assert read_responses(path) == [odd, responses[1]]


def test_duplicate_model_and_id_names_both_lines(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    append_jsonl(path, responses + [responses[1]])  # same (model, id) as line 2, at line 11
    with pytest.raises(DataError) as caught:
        read_responses(path)
    assert_located(caught.value, path, len(responses) + 1, "id")
    assert "line 2" in str(caught.value)
    assert read_responses(path, bad=BadRows(skip=True)) == responses
    # The same id for another model is not a duplicate.
    assert len({r.id for r in responses}) < len(responses)


def test_bad_response_lines_are_located(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = [r.model_dump(mode="json") for r in responses]
    del rows[3]["model"]
    rows[6]["response"] = None
    write_lines(path, rows)
    with pytest.raises(DataError) as caught:
        read_responses(path)
    assert_located(caught.value, path, 4, "model")
    bad = BadRows(skip=True)
    kept = read_jsonl(path, Response, bad=bad)
    skipped = bad.skipped
    assert len(kept) == len(responses) - 2
    assert [(e.line, e.field) for e in skipped] == [(4, "model"), (7, "response")]


def test_missing_jsonl_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as caught:
        read_responses(tmp_path / "absent.jsonl")
    assert_located(caught.value, tmp_path / "absent.jsonl", None, None)


def test_verdicts_round_trip_with_exactly_gpt_eval_fields(responses, tmp_path):
    verdicts = [make_verdict(r, "Unsafe" if i % 3 == 0 else "Safe", 1 + i % 3) for i, r in enumerate(responses)]
    path = tmp_path / "verdicts.jsonl"
    assert write_verdicts(path, verdicts) == len(verdicts)
    for line in path.read_text(encoding="utf-8").splitlines():
        assert list(json.loads(line)) == list(GPT_EVAL_FIELDS)
    assert "id" not in GPT_EVAL_FIELDS
    assert read_verdicts(path) == verdicts


def test_verdicts_with_extra_keys_are_read_and_bad_labels_located(responses, tmp_path):
    rows = [dict(make_verdict(r).model_dump(mode="json"), id=r.id, model=r.model) for r in responses[:3]]
    rows[1]["label_str"] = "unsafe"  # gpt_eval.py writes "Safe" / "Unsafe" exactly
    path = tmp_path / "verdicts.jsonl"
    write_lines(path, rows)
    with pytest.raises(DataError) as caught:
        read_verdicts(path)
    assert_located(caught.value, path, 2, "label_str")
    assert len(read_verdicts(path, bad=BadRows(skip=True))) == 2


def test_atomic_write_keeps_the_old_file_when_a_record_fails(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    write_jsonl_atomic(path, responses[:2])
    before = path.read_bytes()

    def records_then_failure():
        yield from responses
        raise RuntimeError("boom while producing records")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl_atomic(path, records_then_failure())
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [responses[0].model_dump(), {"not json": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind

    with pytest.raises(TypeError):
        write_jsonl_atomic(tmp_path / "new.jsonl", [{"x": object()}])
    assert not (tmp_path / "new.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_append_of_an_unserialisable_record_appends_nothing(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    append_jsonl(path, responses[:2])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        append_jsonl(path, [responses[2], {"bad": object()}])
    assert path.read_bytes() == before


def _torn(path: Path, responses: list[Response], keep: int) -> bytes:
    append_jsonl(path, responses[:keep])
    fragment = (json.dumps(responses[keep].model_dump(mode="json")))[:40].encode()
    with open(path, "ab") as handle:
        handle.write(fragment)  # what kill -9 in the middle of a write leaves
    return fragment


def test_torn_last_line_is_ignored_by_the_lenient_reader(responses, tmp_path, caplog):
    path = tmp_path / "responses.jsonl"
    _torn(path, responses, keep=4)
    with caplog.at_level(logging.WARNING, logger="misguard"):
        assert list(iter_jsonl_lenient(path, Response)) == responses[:4]
    assert any("torn" in record.getMessage() for record in caplog.records)
    assert read_responses(path, allow_torn_tail=True) == responses[:4]
    assert read_responses_lenient(path) == responses[:4]
    with pytest.raises(DataError) as caught:  # the strict reader does not hide it
        read_responses(path)
    assert_located(caught.value, path, 5, None)


def test_bad_middle_line_is_an_error_even_for_the_lenient_reader(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    append_jsonl(path, responses[:4])
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1][:30]
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(iter_jsonl_lenient(path, Response))
    assert_located(caught.value, path, 2, None)


def test_unterminated_but_complete_last_line_is_kept(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    append_jsonl(path, responses[:3])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert list(iter_jsonl_lenient(path, Response)) == responses[:3]
    append_jsonl(path, responses[3:5])  # gets its own line, not glued to the last one
    assert read_responses(path) == responses[:5]


def test_append_after_a_crash_drops_the_torn_line(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    _torn(path, responses, keep=4)
    append_jsonl(path, responses[4:])  # the resumed run redoes the item whose line was torn
    assert read_responses(path) == responses


def test_records_are_appended_as_they_come_every_n(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    appends = []
    assert append_as_they_come(path, iter(responses[:5]), 2, appends.append) == 5
    assert appends == [2, 2, 1]
    assert read_responses(path) == responses[:5]


def test_what_came_before_an_error_is_appended_before_it_goes_on(responses, tmp_path):
    path = tmp_path / "responses.jsonl"

    def failing():
        yield from responses[:3]
        raise DataError("a bad image", path=tmp_path / "object1.png")

    with pytest.raises(DataError, match="object1.png"):
        append_as_they_come(path, failing(), 10)
    assert read_responses(path) == responses[:3]


def test_lenient_responses_reader_still_rejects_duplicates(responses, tmp_path):
    path = tmp_path / "responses.jsonl"
    _torn(path, responses + [responses[0], responses[1]], keep=len(responses) + 1)
    with pytest.raises(DataError, match="duplicate"):
        read_responses_lenient(path)
