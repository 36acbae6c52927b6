"""Properties of the JSON Lines readers (core/jsonl.py): whatever a file holds, reading it gives records or one
DataError naming the file and the line, never another exception; and valid records come back as written."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from misguard.core.errors import DataError
from misguard.core.jsonl import (
    JsonObject,
    read_json_record,
    read_jsonl,
    read_responses,
    read_responses_lenient,
    read_verdicts,
    write_jsonl_atomic,
)
from misguard.core.manifests import InferManifest
from misguard.core.records import Judgment, Response, RowJudgment, Verdict
from misguard.core.rows import BadRows

PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

READERS = {
    "responses": read_responses,
    "responses, resuming": read_responses_lenient,
    "verdicts": read_verdicts,
    "judgments, torn tail allowed": lambda path: read_jsonl(path, Judgment, allow_torn_tail=True),
    "plain objects": lambda path: read_jsonl(path, JsonObject),
    "row judgments, skipping bad rows": lambda path: read_jsonl(path, RowJudgment, bad=BadRows(skip=True)),
}

text = st.text(max_size=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)
# Objects that look like records (the fields a reader looks for, with any values), so lines reach validation.
FIELDS = ["id", "question", "category", "sub_category", "image_path1", "image_path2", "response", "model",
          "label_str", "label_perception", "split", "judge", "template", "p_unsafe", "status", "source"]
record_like = st.dictionaries(st.sampled_from(FIELDS), json_values | text, max_size=len(FIELDS))
line = st.one_of(record_like.map(json.dumps), json_values.map(json.dumps), text,
                 st.sampled_from(["[" * 5000, '{"id": ' + "9" * 5000 + "}", "{", "NaN", '"\\ud800"', "\ufeff{}"]))
file_text = st.lists(line, max_size=6).map("\n".join) | st.binary(max_size=200).map(
    lambda data: data.decode("utf-8", errors="surrogateescape"))


def read_back(data: bytes, reader) -> None:
    """Read `data` as a file with `reader`; asserts that it returns records or raises a located DataError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_bytes(data)
        try:
            records = reader(path)
        except DataError as error:
            assert error.path == str(path) and error.line is not None, error
        else:
            assert isinstance(records, list)


@pytest.mark.parametrize("name", READERS)
@PROPERTY
@given(data=st.binary(max_size=300))
def test_any_bytes_give_records_or_a_dataerror_with_file_and_line(name, data):
    read_back(data, READERS[name])


@pytest.mark.parametrize("name", READERS)
@PROPERTY
@given(content=file_text)
def test_any_lines_give_records_or_a_dataerror_with_file_and_line(name, content):
    read_back(content.encode("utf-8", errors="surrogateescape"), READERS[name])


@pytest.mark.parametrize("content", ["[" * 100_000, '{"id": ' + "1" * 5000 + "}"])
def test_json_python_cannot_hold_is_a_dataerror(tmp_path, content):
    # Valid JSON syntax that json.loads still refuses: nesting past the recursion limit, an over-long integer.
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"id": 1}}\n{content}\n')
    with pytest.raises(DataError, match="rows.jsonl:2: invalid JSON") as caught:
        read_jsonl(path, JsonObject)
    assert caught.value.line == 2
    path.write_text(content)
    with pytest.raises(DataError, match="rows.jsonl: not valid JSON"):
        read_json_record(path, InferManifest, version_field="version", supported=1)


nonblank = st.text(min_size=1, max_size=20).filter(str.strip)
responses = st.builds(Response, id=st.integers(min_value=0).map(str) | nonblank, question=nonblank, category=nonblank,
                      sub_category=text, image_path1=nonblank, image_path2=nonblank, response=text, model=nonblank)
probability = st.floats(min_value=0.0, max_value=1.0)
judgments = st.builds(
    Judgment, label_perception=st.sampled_from(["Perception Level1", "Perception Level2", "Perception Level3", None]),
    label_str=st.sampled_from(["Safe", "Unsafe", None]), category=text, question=text, response=text,
    image_path1=text, image_path2=text, id=nonblank, split=st.sampled_from(["easy", "hard", "real"]),
    sub_category=text, model=nonblank, p_unsafe=probability | st.none(),
    p_perception=st.dictionaries(st.sampled_from(["Level1", "Level2", "Level3"]), probability) | st.none(),
    judge=text, template=text, status=st.sampled_from(["scored", "unscored", "out_of_domain"]),
    reason=text | st.none(), trust=probability | st.none())


@PROPERTY
@given(records=st.lists(responses, max_size=5, unique_by=lambda r: (r.model, r.id)))
def test_responses_round_trip(records):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "responses.jsonl"
        write_jsonl_atomic(path, records)
        assert read_responses(path) == records


@PROPERTY
@given(records=st.lists(judgments, max_size=5))
def test_judgments_round_trip(records):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "judgments.jsonl"
        write_jsonl_atomic(path, records)
        assert read_jsonl(path, Judgment) == records


@PROPERTY
@given(records=st.lists(responses.map(lambda r: Verdict(**r.model_dump(), label_str="Safe",
                                                        label_perception="Perception Level2")), max_size=5))
def test_verdicts_round_trip(records):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "verdicts.jsonl"
        write_jsonl_atomic(path, records)
        assert read_verdicts(path) == records
