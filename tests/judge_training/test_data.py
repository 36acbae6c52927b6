"""Training data: responses joined with verdicts, split by item, counted, converted to a Dataset and back."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from misguard.core.errors import DataError, MisguardError
from misguard.core.jsonl import write_jsonl_atomic, write_verdicts
from misguard.core.records import CATEGORIES, PERCEPTION_LABELS, SPLITS, Judgment, Response, Verdict
from misguard.core.rows import BadRows
from misguard.core.splits import load_split
from misguard.judge_training.data import (
    COLUMNS,
    build_examples,
    data_hashes,
    examples_from_dataset,
    label_counts,
    split_by_item,
    to_dataset,
)
from misguard.judge_training.examples import TrainingExample
from misguard.mis.score import JUDGMENTS_FILE, score_reference_labels

MODELS = ("model-a", "model-b")


def demo_items(demo_dir: Path):
    return [(split, item) for split in SPLITS for item in load_split(demo_dir, split).items]


def label_of(model: str, split: str, item_id: str) -> tuple[str, str]:
    """A made-up verdict that differs between the two models on most items: (label_str, label_perception)."""
    n = SPLITS.index(split) * 100 + int(item_id) + (7 if model == "model-b" else 0)
    return ("Unsafe" if n % 2 else "Safe"), PERCEPTION_LABELS[n % 3]


def write_responses(path: Path, demo_dir: Path, models=MODELS) -> list[Response]:
    """Every model answers every item, word for word the same answer."""
    responses = [Response(**item.model_dump(), response=f"the same answer to {split} item {item.id}", model=model)
                 for split, item in demo_items(demo_dir) for model in models]
    write_jsonl_atomic(path, responses)
    return responses


def verdict(response: Response, split: str, **changes) -> Verdict:
    label_str, label_perception = label_of(response.model, split, response.id)
    fields = dict(label_perception=label_perception, label_str=label_str, category=response.category,
                  question=response.question, response=response.response, image_path1=response.image_path1,
                  image_path2=response.image_path2)
    return Verdict(**{**fields, **changes})


def split_of(response: Response) -> str:
    return response.image_path1.split("_image/")[0]


def write_verdict_files(folder: Path, responses: list[Response], names=None, drop=0) -> list[Path]:
    """One gpt_eval.py file per model (named `names[model]` or the model), leaving out the first `drop`."""
    paths = []
    for model in MODELS:
        rows = [verdict(r, split_of(r)) for r in responses if r.model == model][drop:]
        path = folder / f"{(names or {}).get(model, model)}.jsonl"
        write_verdicts(path, rows)
        paths.append(path)
    return paths


@pytest.fixture
def responses_file(demo_dir, tmp_path):
    path = tmp_path / "responses.jsonl"
    return path, write_responses(path, demo_dir)


# --------------------------------------------------------------------------------------------------------
# build_examples
# --------------------------------------------------------------------------------------------------------

def test_each_response_gets_its_own_models_verdict(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    built = build_examples([path], write_verdict_files(tmp_path, responses), demo_dir)

    assert len(built.examples) == built.responses == built.labels == len(responses) == 2 * 36
    assert built.responses_without_label == built.labels_without_response == built.unscored_labels == 0
    seen = set()
    for example in built.examples:
        assert (example.label_str, example.label_perception) == label_of(example.model, example.split, example.id)
        assert example.item_key == f"{example.split}/{example.id}"
        for image in example.images:
            assert Path(image).is_absolute() and Path(image).is_file()
        seen.add((example.model, example.item_key))
    assert len(seen) == len(responses)
    # The two models answered word for word the same, yet their labels differ: kept apart by model.
    by_model = {e.model: e for e in built.examples if e.item_key == "easy/1"}
    assert by_model["model-a"].response == by_model["model-b"].response
    assert by_model["model-a"].label_str != by_model["model-b"].label_str


def test_item_fields_come_from_the_mis_directory(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    items = {(split, item.id): item for split, item in demo_items(demo_dir)}
    for example in build_examples([path], write_verdict_files(tmp_path, responses), demo_dir).examples:
        item = items[(example.split, example.id)]
        assert (example.category, example.sub_category, example.question) == (
            item.category, item.sub_category, item.question)
        assert example.images == (str(demo_dir / item.image_path1), str(demo_dir / item.image_path2))


def test_label_model_names_name_the_verdict_files(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses, names={"model-a": "gpt4o_a", "model-b": "gpt4o_b"})
    built = build_examples([path], files, demo_dir, label_model_names=["model-a", "model-b"])
    assert len(built.examples) == len(responses)
    assert all((e.label_str, e.label_perception) == label_of(e.model, e.split, e.id) for e in built.examples)

    with pytest.raises(DataError, match=r"label files are for models \['gpt4o_a', 'gpt4o_b'\]"):
        build_examples([path], files, demo_dir)  # the stems name no model of the responses
    with pytest.raises(MisguardError, match="1 model names for 2 label files"):
        build_examples([path], files, demo_dir, label_model_names=["model-a"])


def test_responses_without_a_verdict_are_left_out_and_counted(demo_dir, tmp_path, responses_file, caplog):
    path, responses = responses_file
    built = build_examples([path], write_verdict_files(tmp_path, responses, drop=5), demo_dir)
    assert built.responses_without_label == 10
    assert len(built.examples) == len(responses) - 10
    assert built.labels_without_response == 0
    assert "10 of 72 response(s) have no label" in caplog.text


def test_verdicts_without_a_response_are_counted_up_to_two_percent(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses)
    # One response gone: its verdict, 1 of 72 (1.4%), matches nothing; tolerated and counted.
    write_jsonl_atomic(path, responses[1:])
    built = build_examples([path], files, demo_dir)
    assert built.labels_without_response == 1 and built.responses_without_label == 0
    assert len(built.examples) == len(responses) - 1
    # Two gone: 2 of 72 (2.8%) is over the limit.
    write_jsonl_atomic(path, responses[2:])
    with pytest.raises(DataError, match=r"2 of 72 label rows \(2.8%\) match no response"):
        build_examples([path], files, demo_dir)


def test_too_many_unmatched_verdicts_are_an_error_with_examples(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses)
    write_jsonl_atomic(path, [r for r in responses if r.model == "model-a"])
    # model-b's 36 verdicts now have no response: far over 2%.
    with pytest.raises(DataError) as caught:
        build_examples([path], files, demo_dir)
    message = str(caught.value)
    assert "36 of 72 label rows (50.0%) match no response" in message
    assert f"{files[1]}:1 (model 'model-b', split 'easy', id" in message
    assert "no response by this model to this item" in message
    assert "limit 2.0%" in message


def test_a_changed_response_text_is_unmatched_and_named(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    changed = [r.model_copy(update={"response": "rewritten"}) if r.model == "model-a" else r for r in responses]
    files = write_verdict_files(tmp_path, responses)
    write_jsonl_atomic(path, changed)
    with pytest.raises(DataError, match=r"the response differs from the one at .*responses.jsonl:1\)"):
        build_examples([path], files, demo_dir)


def test_verdicts_for_no_mis_item_count_as_unmatched(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses)
    stray = tmp_path / "stray" / "model-a.jsonl"
    write_verdicts(stray, [verdict(responses[0], "easy", question=f"not an MIS question {n}") for n in range(3)])
    with pytest.raises(DataError, match=r"3 of 75 label rows .*field 'question': no item in .* has this question"):
        build_examples([path], [*files, stray], demo_dir)
    built = build_examples([path], [*files, stray], demo_dir, max_unmatched_share=0.05)
    assert built.labels_without_response == 3 and len(built.examples) == len(responses)


def test_a_second_label_for_one_response_is_refused(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses)
    again = tmp_path / "again" / "model-a.jsonl"
    write_verdicts(again, [verdict(responses[0], "easy")])
    with pytest.raises(DataError, match=r"duplicate: a second row for .*model 'model-a', split 'easy', id '1' "
                                         r"\(first at .*:1, again"):
        build_examples([path], [*files, again], demo_dir)


def test_responses_to_unknown_items_are_refused_or_skipped(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses)
    stray = tmp_path / "stray.jsonl"
    write_jsonl_atomic(stray, [responses[0].model_copy(update={"id": "999"})])
    with pytest.raises(DataError, match=r"stray.jsonl:1: field 'id': no item with id 999"):
        build_examples([path, stray], files, demo_dir)
    assert len(build_examples([path, stray], files, demo_dir, bad=BadRows(skip=True)).examples) == len(responses)


def judgments_of(responses: list[Response], **fields) -> list[Judgment]:
    rows = []
    for r in responses:
        v = verdict(r, split_of(r))
        rows.append(Judgment(**v.model_dump(), id=r.id, split=split_of(r), sub_category=r.sub_category,
                             model=r.model, judge="tiny-judge", template="mis-judge-codes-v1", **fields))
    return rows


def test_judgments_files_are_labels_too(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    from_verdicts = build_examples([path], write_verdict_files(tmp_path, responses), demo_dir).examples

    judgments = tmp_path / "score" / "judgments.jsonl"
    rows = judgments_of(responses)
    unscored = Judgment(**{**rows[0].model_dump(), "label_str": None, "label_perception": None,
                           "status": "unscored", "reason": "no answer code"})
    write_jsonl_atomic(judgments, [unscored, *rows[1:]])
    built = build_examples([path], [judgments], demo_dir)
    assert built.unscored_labels == 1 and built.responses_without_label == 1 and built.labels == len(responses)
    assert built.examples == from_verdicts[1:]


def test_score_from_labels_output_reads_back_as_the_same_examples(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    files = write_verdict_files(tmp_path, responses)
    score_reference_labels(files, demo_dir, tmp_path / "ref", n_bootstrap=10)
    from_judgments = build_examples([path], [tmp_path / "ref" / JUDGMENTS_FILE], demo_dir).examples
    assert from_judgments == build_examples([path], files, demo_dir).examples


def test_a_judgments_file_named_for_another_model_is_refused(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    judgments = tmp_path / "judgments.jsonl"
    write_jsonl_atomic(judgments, judgments_of(responses))
    with pytest.raises(DataError, match=r"judgments.jsonl:2: field 'model': model 'model-b', but this file"):
        build_examples([path], [judgments], demo_dir, label_model_names=["model-a"])
    assert len(build_examples([path], [judgments], demo_dir, label_model_names=[None]).examples) == len(responses)


# --------------------------------------------------------------------------------------------------------
# split_by_item
# --------------------------------------------------------------------------------------------------------

def synthetic_examples(n_items: int = 120, seed: int = 1) -> list[TrainingExample]:
    """n_items items over the six categories (uneven), 1-3 responses each."""
    rng = random.Random(seed)
    examples = []
    for n in range(n_items):
        category = CATEGORIES[min(n % 9, 5)]  # Erotic gets 4 of every 9 items
        split = SPLITS[n % 3]
        for m in range(rng.randint(1, 3)):
            examples.append(TrainingExample(
                item_key=f"{split}/{n}", split=split, id=str(n), model=f"m{m}", category=category,
                sub_category="x", images=("/a.png", "/b.png"), question=f"q{n}", response=f"r{n}-{m}",
                label_str=rng.choice(["Safe", "Unsafe"]), label_perception=rng.choice(PERCEPTION_LABELS)))
    return examples


def items(examples) -> set[str]:
    return {e.item_key for e in examples}


@pytest.mark.parametrize("val_frac", [0.1, 0.2, 0.25])
def test_split_keeps_every_item_on_one_side(val_frac):
    examples = synthetic_examples()
    for seed in range(8):
        train, val = split_by_item(examples, val_frac, seed=seed)
        assert not items(train) & items(val)
        assert len(train) + len(val) == len(examples)
        assert len(items(val)) == round(val_frac * 120)
        assert {e.category for e in train} == set(CATEGORIES)


def test_split_is_stratified_by_category():
    examples = synthetic_examples()
    _, val = split_by_item(examples, 0.25, seed=3)
    per_category = {c: len({e.item_key for e in val if e.category == c}) for c in CATEGORIES}
    # 120 items: 13 or 14 in each of the first five categories, 53 Erotic; a quarter of each.
    assert per_category["Erotic"] in (13, 14)
    assert all(3 <= per_category[c] <= 4 for c in CATEGORIES[:5])


def test_split_is_deterministic_by_seed_and_ignores_input_order():
    examples = synthetic_examples()
    first = split_by_item(examples, 0.1, seed=5)
    assert split_by_item(examples, 0.1, seed=5) == first
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    assert items(split_by_item(shuffled, 0.1, seed=5)[1]) == items(first[1])
    assert len({frozenset(items(split_by_item(examples, 0.1, seed=s)[1])) for s in range(5)}) > 1


def test_split_of_the_demo_data(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    examples = build_examples([path], write_verdict_files(tmp_path, responses), demo_dir).examples
    train, val = split_by_item(examples, 0.1, seed=0)
    assert len(items(val)) == 4 and len(val) == 8  # 4 of 36 items, both models' responses to each
    assert not items(train) & items(val)
    assert {e.category for e in train} == set(CATEGORIES)


def test_val_frac_zero_puts_everything_in_train():
    examples = synthetic_examples(10)
    assert split_by_item(examples, 0.0) == (examples, [])


@pytest.mark.parametrize("val_frac", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_bad_val_frac_is_refused(val_frac):
    with pytest.raises(ValueError, match="val_frac must be a number from 0 to less than 1"):
        split_by_item(synthetic_examples(10), val_frac)


def test_too_few_items_for_a_validation_side_are_refused():
    with pytest.raises(MisguardError, match="val_frac 0.1 of 4 item.s. leaves no validation item"):
        split_by_item(synthetic_examples(4), 0.1)
    with pytest.raises(MisguardError, match="leaves no train item"):
        split_by_item(synthetic_examples(1), 0.9)
    with pytest.raises(MisguardError, match="of 0 item"):
        split_by_item([], 0.5)


def test_categories_with_one_item_each_still_split():
    examples = [e for e in synthetic_examples(6) if e.model == "m0"]  # one item per category
    train, val = split_by_item(examples, 0.2, seed=0)
    assert len(items(val)) == 1 and len(items(train)) == 5


# --------------------------------------------------------------------------------------------------------
# label_counts, datasets, hashes
# --------------------------------------------------------------------------------------------------------

def example(item: str, label_str: str, level: int, category: str = "Hate", model: str = "m") -> TrainingExample:
    split, item_id = item.split("/")
    return TrainingExample(item_key=item, split=split, id=item_id, model=model, category=category,
                           sub_category="Harassment", images=("/x/1.png", "/x/2.png"), question="q?",
                           response=f"r {model}", label_str=label_str, label_perception=f"Perception Level{level}")


def test_label_counts_by_hand():
    examples = [example("easy/1", "Safe", 1), example("easy/1", "Unsafe", 2, model="n"),
                example("hard/2", "Unsafe", 2, category="Violent"), example("real/3", "Safe", 3)]
    assert label_counts(examples) == {
        "items": 3, "responses": 4,
        "safety": {"Safe": 2, "Unsafe": 2},
        "perception": {"Level1": 1, "Level2": 2, "Level3": 1},
        "answer": {"1": 1, "2": 0, "3": 1, "4": 0, "5": 2, "6": 0},
        "categories": {"Violent": 1, "Hate": 3},
    }
    assert label_counts([])["answer"] == {code: 0 for code in "123456"}


def test_dataset_round_trip(demo_dir, tmp_path, responses_file):
    path, responses = responses_file
    examples = build_examples([path], write_verdict_files(tmp_path, responses), demo_dir).examples
    dataset = to_dataset(examples)
    assert dataset.column_names == list(COLUMNS) and len(dataset) == len(examples)
    row = dataset[0]
    assert row["image1"] == examples[0].images[0] and row["answer"] == examples[0].answer
    assert examples_from_dataset(dataset) == examples
    assert examples_from_dataset(to_dataset([])) == []


def test_a_dataset_with_missing_columns_or_a_wrong_answer_is_refused():
    dataset = to_dataset([example("easy/1", "Unsafe", 1)])
    with pytest.raises(ValueError, match="no column.s. answer"):
        examples_from_dataset(dataset.remove_columns("answer"))
    wrong = dataset.map(lambda row: {"answer": "1"})
    with pytest.raises(ValueError, match="row 0: answer '1' does not match Perception Level1 and Unsafe"):
        examples_from_dataset(wrong)


def test_data_hashes(tmp_path):
    a = tmp_path / "d" / "a.jsonl"
    a.parent.mkdir()
    a.write_text("one\n")
    hashes = data_hashes([a, a.parent])
    assert hashes[str(a)] == hashlib.sha256(b"one\n").hexdigest()
    before = hashes[str(a.parent)]
    (a.parent / "b.jsonl").write_text("two\n")
    assert data_hashes([a.parent])[str(a.parent)] != before
    with pytest.raises(DataError, match="file not found"):
        data_hashes([tmp_path / "missing.jsonl"])
