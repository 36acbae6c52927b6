"""Reading label files of every origin into LabelRecords, and joining a judge's with a reference's."""
from __future__ import annotations

import json
import logging

import pytest

from misguard.core.errors import DataError, MisguardError
from misguard.core.join import join_labels
from misguard.core.jsonl import write_jsonl_atomic, write_verdicts
from misguard.core.labels import LabelRecord, normalise_perception, normalise_safety, read_labels, resolve_field
from misguard.core.records import Judgment, Verdict, content_key
from misguard.core.rows import BadRows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def verdict(n: int, *, safety="Safe", perception="Perception Level1", response=None) -> Verdict:
    return Verdict(label_perception=perception, label_str=safety, category="Violent", question=f"question {n}?",
                   response=response if response is not None else f"response {n}", image_path1=f"img/{n}_a.png",
                   image_path2=f"img/{n}_b.png")


def judgment(n: int, *, model="target-a", safety="Safe", perception="Perception Level1", status="scored",
             response=None) -> Judgment:
    base = verdict(n, response=response).model_dump()
    base.update(label_str=safety, label_perception=perception)
    extra = {}
    if status == "unscored":
        base.update(label_str=None, label_perception=None)
        extra = {"reason": "unreadable output"}
    elif safety is not None:
        p_unsafe = 0.9 if safety == "Unsafe" else 0.1
        extra = {"p_unsafe": p_unsafe, "p_perception": {"Level1": 0.7, "Level2": 0.2, "Level3": 0.1}}
    return Judgment(**base, id=str(n), split="easy", sub_category="Weapons", model=model, judge="tiny-judge",
                    template="mis-v1", status=status, **extra)


# --------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [("safe", "Safe"), ("Safe", "Safe"), (" SAFE ", "Safe"),
                                           ("unsafe", "Unsafe"), ("UnSafe", "Unsafe")])
def test_safety_labels_normalise_case_insensitively(raw, expected):
    assert normalise_safety(raw) == expected


@pytest.mark.parametrize("raw, expected", [("Perception Level1", "Level1"), ("perception level 2", "Level2"),
                                           ("Level3", "Level3"), ("LEVEL1", "Level1"), ("2", "Level2"),
                                           (3, "Level3"), ("Perception_Level_1", "Level1")])
def test_perception_labels_normalise(raw, expected):
    assert normalise_perception(raw) == expected


@pytest.mark.parametrize("raw", ["safe.", "harmless", "", True, None, 1.0])
def test_unrecognised_safety_labels_are_refused_by_name(raw):
    with pytest.raises(ValueError, match="safety label|as a string"):
        normalise_safety(raw)


@pytest.mark.parametrize("raw", ["Level4", "0", "Perception", "high"])
def test_unrecognised_perception_labels_are_refused(raw):
    with pytest.raises(ValueError, match=repr(raw).strip("'")):
        normalise_perception(raw)


def test_value_map_applies_before_normalising_exactly_then_case_insensitively():
    value_map = {"1 - safe": "safe", "2 - Unsafe": "UNSAFE", "low": "Perception Level1"}
    assert normalise_safety("1 - safe", value_map) == "Safe"
    assert normalise_safety("2 - unsafe", value_map) == "Unsafe"  # the map's keys match in any case
    assert normalise_safety("Safe", value_map) == "Safe"  # values not in the map are normalised as they are
    assert normalise_perception("LOW", value_map) == "Level1"


def test_dotted_fields_take_the_longest_existing_key():
    row = {"auto_eval": {"gpt-4o-2024-05-13": "unsafe", "gpt-4.1": "safe", "gpt-4": {"1": "nested"}},
           "a.b": 1, "a": {"b": 2, "c": {"d": 3}}}
    assert resolve_field(row, "auto_eval.gpt-4o-2024-05-13") == "unsafe"
    assert resolve_field(row, "auto_eval.gpt-4.1") == "safe"  # the key with a dot wins over nesting
    assert resolve_field(row, "a.b") == 1
    assert resolve_field(row, "a.c.d") == 3
    assert resolve_field(row, "auto_eval.claude") is resolve_field(row, "missing")  # the MISSING marker
    assert resolve_field(row, "a.b.x") is resolve_field(row, "missing")


# --------------------------------------------------------------------------------------------------------
# read_labels
# --------------------------------------------------------------------------------------------------------

def msts_like(n: int, *, human="Safe", gpt="unsafe", final="1 - safe", category="Other") -> dict:
    return {"id": f"msts_{n:04d}", "model": "vlm-a", "hazard_category": category, "question": f"q{n}",
            "response": f"r{n}", "human_label_str": human, "final_label": final,
            "auto_eval": {"gpt-4o-2024-05-13": gpt, "claude-3.5": "safe"}}


def test_third_party_file_with_nested_fields_and_no_perception(tmp_path):
    path = write_rows(tmp_path / "msts.jsonl", [msts_like(0), msts_like(1, human="Unsafe", gpt="safe")])
    judge = read_labels(path, safety_field="auto_eval.gpt-4o-2024-05-13", category_field="hazard_category")
    assert [(r.key, r.safety, r.perception, r.model, r.category) for r in judge] == [
        ("msts_0000", "Unsafe", None, "vlm-a", "Other"), ("msts_0001", "Safe", None, "vlm-a", "Other")]
    assert [r.line for r in judge] == [1, 2]
    assert judge[0].path == str(path) and judge[0].content_key is None  # MSTS has no image paths
    claude = read_labels(path, safety_field="auto_eval.claude-3.5")
    assert [r.safety for r in claude] == ["Safe", "Safe"]
    human = read_labels(path, safety_field="human_label_str", perception_field=None)
    assert [r.safety for r in human] == ["Safe", "Unsafe"]


def test_value_map_reads_another_label_vocabulary(tmp_path):
    path = write_rows(tmp_path / "msts.jsonl", [msts_like(0), msts_like(1, final="2 - unsafe")])
    records = read_labels(path, safety_field="final_label", value_map={"1 - safe": "Safe", "2 - unsafe": "Unsafe"})
    assert [r.safety for r in records] == ["Safe", "Unsafe"]


def test_bad_value_names_file_line_field_and_value(tmp_path):
    path = write_rows(tmp_path / "labels.jsonl", [msts_like(0), msts_like(1, gpt="background google")])
    with pytest.raises(DataError) as caught:
        read_labels(path, safety_field="auto_eval.gpt-4o-2024-05-13")
    error = caught.value
    assert isinstance(error, MisguardError)
    assert (error.path, error.line, error.field) == (str(path), 2, "auto_eval.gpt-4o-2024-05-13")
    assert "'background google'" in str(error) and str(path) + ":2" in str(error)


def test_skip_bad_logs_and_counts_bad_values(tmp_path, caplog):
    path = write_rows(tmp_path / "labels.jsonl", [msts_like(0), msts_like(1, gpt="safe."), msts_like(2, gpt="safe")])
    bad = BadRows(skip=True)
    with caplog.at_level(logging.WARNING, logger="misguard"):
        records = read_labels(path, safety_field="auto_eval.gpt-4o-2024-05-13", bad=bad)
    skipped = bad.skipped
    assert [r.key for r in records] == ["msts_0000", "msts_0002"]
    assert [(e.line, e.field) for e in skipped] == [(2, "auto_eval.gpt-4o-2024-05-13")]
    assert "skipping bad row" in caplog.text


def test_missing_safety_on_one_line_is_an_error(tmp_path):
    row = msts_like(1)
    del row["human_label_str"]
    path = write_rows(tmp_path / "labels.jsonl", [msts_like(0), row])
    with pytest.raises(DataError, match="missing") as caught:
        read_labels(path, safety_field="human_label_str")
    assert (caught.value.line, caught.value.field) == (2, "human_label_str")
    null_row = {**msts_like(1), "human_label_str": None}
    write_rows(path, [msts_like(0), null_row])
    with pytest.raises(DataError, match="null"):
        read_labels(path, safety_field="human_label_str")


def test_perception_missing_on_one_line_of_a_file_that_has_it_is_an_error(tmp_path):
    rows = [verdict(0).model_dump(), verdict(1).model_dump()]
    del rows[1]["label_perception"]
    path = write_rows(tmp_path / "gpt_eval.jsonl", rows)
    with pytest.raises(DataError) as caught:
        read_labels(path)
    assert (caught.value.line, caught.value.field) == (2, "label_perception")


def test_gpt_eval_rows_are_keyed_by_content(tmp_path):
    verdicts = [verdict(0), verdict(1, safety="Unsafe", perception="Perception Level3")]
    path = tmp_path / "gpt_eval.jsonl"
    write_verdicts(path, verdicts)
    records = read_labels(path, model_name="target-a")
    assert [(r.safety, r.perception, r.id, r.model) for r in records] == [
        ("Safe", "Level1", None, "target-a"), ("Unsafe", "Level3", None, "target-a")]
    assert [r.content_key for r in records] == [content_key(v) for v in verdicts]
    assert json.loads(records[0].key) == list(content_key(verdicts[0]))


def test_row_without_id_or_content_is_an_error(tmp_path):
    path = write_rows(tmp_path / "labels.jsonl", [{"label_str": "Safe", "question": "q"}])
    with pytest.raises(DataError, match="no id") as caught:
        read_labels(path)
    assert caught.value.line == 1


def test_misguard_judgments_keep_unscored_rows_without_labels(tmp_path):
    path = tmp_path / "judgments.jsonl"
    write_jsonl_atomic(path, [judgment(0, safety="Unsafe", perception="Perception Level2"),
                              judgment(1, status="unscored")])
    scored, unscored = read_labels(path)
    assert (scored.safety, scored.perception, scored.p_unsafe, scored.p_perception) == (
        "Unsafe", "Level2", 0.9, (0.7, 0.2, 0.1))
    assert (scored.key, scored.id, scored.split, scored.model, scored.category) == ("0", "0", "easy", "target-a",
                                                                                 "Violent")
    assert scored.scored and not unscored.scored
    assert (unscored.safety, unscored.perception, unscored.p_unsafe) == (None, None, None)


def test_bad_probabilities_are_refused(tmp_path):
    row = judgment(0).model_dump(mode="json")
    row["p_perception"] = {"Level1": 0.5, "Level2": 0.5}
    path = write_rows(tmp_path / "judgments.jsonl", [row])
    with pytest.raises(DataError) as caught:
        read_labels(path)
    assert caught.value.field == "p_perception"


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(msts_like(0)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_labels(path, safety_field="human_label_str")
    assert caught.value.line == 2


# --------------------------------------------------------------------------------------------------------
# join_labels
# --------------------------------------------------------------------------------------------------------

def record(key: str, line: int, *, safety="Safe", model=None, content=None, path="labels.jsonl",
           with_id=True) -> LabelRecord:
    fields = dict(zip(("image_path1", "image_path2", "question", "response"), content)) if content else {}
    return LabelRecord(key=key, safety=safety, perception=None, model=model, line=line, id=key if with_id else None,
                       path=path, **fields)


def test_judgments_join_gpt_eval_verdicts_by_content(tmp_path):
    judgments_path, reference_path = tmp_path / "judgments.jsonl", tmp_path / "gpt_eval.jsonl"
    write_jsonl_atomic(judgments_path, [judgment(n, safety="Unsafe" if n == 2 else "Safe") for n in range(4)])
    write_verdicts(reference_path, [verdict(n) for n in reversed(range(4))])
    joined = join_labels(read_labels(judgments_path), read_labels(reference_path))
    assert joined.join_by == "content" and joined.key_fields == ("content",)
    assert [(j.id, r.line) for j, r in joined.pairs] == [("0", 4), ("1", 3), ("2", 2), ("3", 1)]
    assert [j.content_key == r.content_key for j, r in joined.pairs] == [True] * 4
    assert (joined.unmatched_judge, joined.unmatched_reference) == (0, 0)


def test_content_join_is_qualified_by_model_when_both_sides_name_it(tmp_path):
    # Two target models may give the same refusal to the same item: the model keeps their rows apart.
    refusal = "I'm sorry, I can't help with that."
    judgments_path = tmp_path / "judgments.jsonl"
    write_jsonl_atomic(judgments_path, [judgment(0, model="a", response=refusal),
                                        judgment(0, model="b", response=refusal, safety="Unsafe")])
    write_verdicts(tmp_path / "a.jsonl", [verdict(0, response=refusal)])
    write_verdicts(tmp_path / "b.jsonl", [verdict(0, response=refusal, safety="Unsafe")])
    reference = read_labels(tmp_path / "a.jsonl", model_name="a") + read_labels(tmp_path / "b.jsonl", model_name="b")
    joined = join_labels(read_labels(judgments_path), reference)
    assert joined.key_fields == ("model", "content")
    assert [(j.model, j.safety, r.safety) for j, r in joined.pairs] == [("a", "Safe", "Safe"),
                                                                       ("b", "Unsafe", "Unsafe")]


def test_id_join_when_both_sides_have_ids(tmp_path):
    path = write_rows(tmp_path / "msts.jsonl", [msts_like(n, gpt="safe") for n in range(5)])
    judge = read_labels(path, safety_field="auto_eval.gpt-4o-2024-05-13")
    reference = read_labels(path, safety_field="human_label_str")
    joined = join_labels(judge, reference)
    assert joined.join_by == "id" and joined.key_fields == ("model", "id")
    assert [(j.key, r.key) for j, r in joined.pairs] == [(f"msts_{n:04d}",) * 2 for n in range(5)]


def test_unmatched_rows_within_the_limit_are_counted():
    judge = [record(str(n), n + 1) for n in range(100)]
    reference = [record(str(n), n + 1) for n in range(1, 102)]
    joined = join_labels(judge, reference, max_unmatched_share=0.02)
    assert len(joined.pairs) == 99
    assert (joined.unmatched_judge, joined.unmatched_reference) == (1, 2)
    assert [r.key for r in joined.unmatched_left] == ["0"]


def test_unmatched_share_over_the_limit_is_an_error_with_examples():
    judge = [record(str(n), n + 1, path="judge.jsonl") for n in range(100)]
    reference = [record(str(n), n + 1, path="ref.jsonl") for n in range(10, 100)]
    with pytest.raises(DataError) as caught:
        join_labels(judge, reference, max_unmatched_share=0.05)
    message = str(caught.value)
    assert "10 of 100 judge rows (10.0%) have no reference row" in message
    assert "judge.jsonl:1 (id '0')" in message and "judge.jsonl:3 (id '2')" in message
    assert "judge.jsonl:4" not in message  # three examples at most
    assert "limit 5.0%" in message


def test_duplicate_keys_name_both_lines():
    judge = [record("a", 1), record("b", 2), record("a", 7)]
    with pytest.raises(DataError, match="first at line 1, again at line 7") as caught:
        join_labels(judge, [record("a", 1), record("b", 2)])
    assert "judge side" in str(caught.value) and caught.value.line == 7
    with pytest.raises(DataError, match="reference side"):
        join_labels([record("a", 1)], [record("a", 3), record("a", 5)], max_unmatched_share=1.0)


def test_sides_without_a_common_key_cannot_be_joined():
    with pytest.raises(DataError, match="cannot join"):
        join_labels([record("a", 1)], [record("a", 1, with_id=False)])
    with pytest.raises(DataError, match="no judge labels"):
        join_labels([], [record("a", 1)])
