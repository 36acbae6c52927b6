"""Judge training on the tiny Qwen2-VL: the training format is the scoring format, a learnable task is learned,
LoRA touches only the adapter, the merged folder is the adapter's judge, and an interrupted run resumes."""
from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from misguard.calibration.agreement import SAFETY_LABELS, head_agreement
from misguard.core.errors import MisguardError
from misguard.core.splits import load_split
from misguard.engines import EngineOptions, load_engine
from misguard.engines.families import family_for
from misguard.engines.hf import TransformersEngine, processor_inputs
from misguard.judge_training.examples import TrainingExample
from misguard.judge_training.vlm import (
    ADAPTER,
    CHECKPOINTS,
    AnswerCodeCollator,
    TrainConfig,
    default_lora_target,
    load_for_training,
    selection_score,
    train_judge,
)
from misguard.judges import Case, read_judge_spec
from misguard.judges.spec import CARD_FILE, read_judge_card
from misguard.judges.templates import get_template
from misguard.judges.vlm import VLMJudge, code_token_ids

# A task the response text decides: a refusal is Safe, Level1 with one closing sentence and Level2 with the
# other; anything else is Unsafe at Level1. The images and questions vary but carry no signal.
REFUSALS = ("I cannot help with that request.", "Sorry, I cannot help with this.", "No, I cannot help you do that.")
LEVEL1_TAIL, LEVEL2_TAIL = " It is dangerous.", " Please stay safe."
COMPLIANCE = ("Sure, here is how to do it step by step.", "First mix the two things, then heat them.",
              "Take the bag and go to the store.")


def make_examples(demo_dir: Path, split: str, items: slice, seed: int) -> list[TrainingExample]:
    """Three responses per item (from three target models), labelled by the rule above."""
    rng = random.Random(f"{split}:{seed}")
    data = load_split(demo_dir, split)
    examples = []
    for item in data.items[items]:
        for model in ("m0", "m1", "m2"):
            kind = rng.choice(("level1", "level2", "comply"))
            if kind == "comply":
                response, safety, level = rng.choice(COMPLIANCE), "Unsafe", "Level1"
            else:
                response = rng.choice(REFUSALS) + (LEVEL1_TAIL if kind == "level1" else LEVEL2_TAIL)
                safety, level = "Safe", ("Level1" if kind == "level1" else "Level2")
            examples.append(TrainingExample(
                item_key=f"{split}/{item.id}", split=split, id=item.id, model=model, category=item.category,
                sub_category=item.sub_category, images=tuple(str(p) for p in data.image_paths(item)),
                question=item.question, response=response, label_str=safety, label_perception=f"Perception {level}"))
    return examples


def as_cases(examples: list[TrainingExample]) -> list[Case]:
    return [Case(id=f"{e.item_key}/{e.model}", images=(Path(e.images[0]), Path(e.images[1])), question=e.question,
                 response=e.response) for e in examples]


def safety_kappa(judge_folder: Path, examples: list[TrainingExample]) -> float | None:
    with VLMJudge(judge_folder) as judge:
        assessments = judge.judge(as_cases(examples))
    assert all(a.status != "unscored" for a in assessments)
    return head_agreement([e.label_str for e in examples], [a.label for a in assessments], SAFETY_LABELS)["kappa"]


class Recorder:
    """A TrainerCallback that snapshots the model's base and LoRA weights and counts this run's steps."""

    def __new__(cls):
        class _Recorder(TrainerCallback):
            def __init__(self):
                self.start_step = None
                self.steps = 0
                self.before: dict = {}
                self.after: dict = {}

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.start_step = state.global_step
                self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_step_end(self, args, state, control, **kwargs):
                self.steps += 1

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

        return _Recorder()


@pytest.fixture(scope="module")
def data(demo_dir):
    train = make_examples(demo_dir, "easy", slice(0, 12), 0) + make_examples(demo_dir, "hard", slice(0, 8), 0)
    return {"train": train, "val": make_examples(demo_dir, "real", slice(0, 6), 0),
            "held_out": make_examples(demo_dir, "real", slice(6, 12), 1)}


@pytest.fixture(scope="module")
def full_run(tiny_model, data, tmp_path_factory):
    """Full fine-tuning of the tiny model on the learnable task (its random LM head is too small for LoRA on
    the language model alone to move the answer logits far in a few steps). The loss sits at the label prior
    for 2-3 epochs, then drops: validation kappa reaches 1.0 by epoch 3-4 over seeds 0-2."""
    config = TrainConfig(base=tiny_model("qwen2_vl"), out=tmp_path_factory.mktemp("full") / "judge", lora=False,
                         epochs=6, lr=3e-3, batch_size=4, judge_id="tiny-trained")
    return train_judge(config, data["train"], data["val"], data_hashes={"responses": "sha256:abc"}, progress=False)


@pytest.fixture(scope="module")
def lora_runs(tiny_model, data, tmp_path_factory):
    """A LoRA run stopped after epoch 1, then resumed to epoch 2 with the same settings."""
    out = tmp_path_factory.mktemp("lora") / "judge"
    train, val = data["train"][:16], data["val"][:8]
    settings = dict(base=tiny_model("qwen2_vl"), out=out, lr=5e-3, batch_size=8, lora_dropout=0.0,
                    gradient_checkpointing=True)
    first, second = Recorder(), Recorder()
    run1 = train_judge(TrainConfig(**settings, epochs=1), train, val, progress=False, callbacks=[first])
    run2 = train_judge(TrainConfig(**settings, epochs=2), train, val, progress=False, callbacks=[second])
    return {"out": out, "run1": run1, "run2": run2, "first": first, "second": second, "val": val}


def test_collator_builds_the_prompt_score_reads(tiny_model, data):
    engine = TransformersEngine(str(tiny_model("qwen2_vl")))
    template = get_template("mis-judge-codes-v1")
    examples = data["train"][:3]
    code_ids = code_token_ids(engine.tokenizer)
    collator = AnswerCodeCollator(engine.processor, family_for("qwen2_vl"), template.id, code_ids)
    batch = collator(examples)
    requests = [template.request("r", e.images, e.question, e.response) for e in examples]
    expected = processor_inputs(engine.processor, engine.prepare_all(requests))
    for key, tensor in expected.items():
        assert torch.equal(batch[key], tensor), key
    assert batch["answer_ids"].tolist() == [code_ids[e.answer] for e in examples]
    # Left padding: every row ends with the generation prompt, so the answer code is the next token.
    suffix = engine.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert (batch["input_ids"][:, -len(suffix):] == torch.tensor(suffix)).all()
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_training_learns_a_response_rule(full_run, tiny_judge, data):
    before = safety_kappa(tiny_judge, data["held_out"])
    assert before is None or before < 0.3
    assert safety_kappa(full_run.out, data["held_out"]) >= 0.9
    assert full_run.validation["safety"]["kappa"] >= 0.9
    assert [h["epoch"] for h in full_run.history] == [1, 2, 3, 4, 5, 6]
    assert full_run.history[-1]["loss"] < full_run.history[0]["loss"]
    best = max(full_run.history, key=lambda h: h["selection_score"])
    assert full_run.best_epoch == best["epoch"] and full_run.adapter is None


def test_output_folder_is_a_judge(full_run, data):
    spec = read_judge_spec(full_run.out)
    assert spec.id == "tiny-trained" and spec.template == "mis-judge-codes-v1" and spec.base_model
    assert (full_run.out / "model.safetensors").exists() and (full_run.out / "preprocessor_config.json").exists()
    with VLMJudge(full_run.out) as judge:
        assessments = judge.judge(as_cases(data["held_out"][:4]))
    assert [a.judge for a in assessments] == ["tiny-trained"] * 4
    assert all(0.0 <= a.p_unsafe <= 1.0 and abs(sum(a.p_perception.values()) - 1) < 1e-6 for a in assessments)
    assert read_judge_card(full_run.out).kind == "vlm"
    card = json.loads((full_run.out / CARD_FILE).read_text())
    assert card["base_model"] == spec.base_model and card["template"] == "mis-judge-codes-v1"
    assert card["label_counts"]["train"]["safety"] == {
        s: sum(e.label_str == s for e in data["train"]) for s in ("Safe", "Unsafe")}
    assert card["split_sizes"] == {"train": {"examples": 60, "items": 20, "target_models": 3},
                                   "val": {"examples": 18, "items": 6, "target_models": 3}}
    assert len(card["validation"]["per_epoch"]) == 6 and card["validation"]["best_epoch"] == full_run.best_epoch
    assert card["validation"]["best"]["safety"]["kappa"] >= 0.9
    assert card["data_hashes"] == {"responses": "sha256:abc"} and card["misguard_version"]
    assert card["training"]["lora"] is False and card["training"]["learning_rate"] == 3e-3


def test_lora_changes_the_adapter_and_not_the_base(lora_runs):
    first = lora_runs["first"]
    lora = [n for n in first.before if "lora_" in n]
    assert lora and all(n.startswith("base_model.model.model.language_model.") for n in lora)
    assert any(not first.before[n].equal(first.after[n]) for n in lora if "lora_B" in n)
    base = [n for n in first.before if "lora_" not in n]
    assert len(base) > 50 and all(first.before[n].equal(first.after[n]) for n in base)


def test_merged_folder_scores_like_base_plus_adapter(lora_runs, tiny_model):
    from peft import PeftModel  # the `train` extra


    out, val = lora_runs["out"], lora_runs["val"]
    spec = read_judge_spec(out)
    template = get_template(spec.template)
    requests = [template.request(str(i), e.images, e.question, e.response) for i, e in enumerate(val)]
    merged = TransformersEngine(str(out)).label_probs(requests, spec.label_set())
    engine = TransformersEngine(str(tiny_model("qwen2_vl")))
    base = engine.label_probs(requests, spec.label_set())
    engine.net = PeftModel.from_pretrained(engine.net, out / ADAPTER).eval()
    adapted = engine.label_probs(requests, spec.label_set())
    gap = max(abs(a - b) for m, p in zip(merged, adapted) for a, b in zip(m.probs, p.probs))
    moved = max(abs(a - b) for m, p in zip(merged, base) for a, b in zip(m.probs, p.probs))
    assert gap < 1e-5 and moved > 1e-3


def test_resume_continues_from_the_last_checkpoint(lora_runs):
    run1, run2, second = lora_runs["run1"], lora_runs["run2"], lora_runs["second"]
    steps_per_epoch = 2  # 16 examples, batch 8
    assert run1.global_step == steps_per_epoch and run1.resumed_from is None
    assert run2.resumed_from.endswith(f"checkpoint-{steps_per_epoch}")
    assert second.start_step == steps_per_epoch and second.steps == steps_per_epoch
    # The resumed run starts from epoch 1's adapter, not from a fresh initialisation.
    first = lora_runs["first"]
    assert all(second.before[n].equal(first.after[n]) for n in first.after if "lora_" in n)
    assert run2.global_step == 2 * steps_per_epoch
    assert [h["epoch"] for h in run2.history] == [1, 2]
    assert (lora_runs["out"] / CHECKPOINTS / f"checkpoint-{2 * steps_per_epoch}").is_dir()


def test_resume_refuses_checkpoints_from_other_settings(lora_runs, tiny_model, data):
    config = TrainConfig(base=tiny_model("qwen2_vl"), out=lora_runs["out"], lr=1e-3, epochs=3)
    with pytest.raises(MisguardError, match="other settings .*lr"):
        train_judge(config, data["train"][:16], lora_runs["val"], progress=False)


def test_without_validation_the_last_epoch_is_kept(tiny_model, data, tmp_path):
    config = TrainConfig(base=tiny_model("qwen2_vl"), out=tmp_path / "judge", epochs=1, batch_size=4)
    result = train_judge(config, data["train"][:4], [], progress=False)
    assert result.best_epoch is None and result.validation is None and result.history == []
    assert result.global_step == 1 and read_judge_spec(result.out).id == "judge"
    card = json.loads(result.judge_card.read_text())
    assert card["validation"]["best_epoch"] is None and card["split_sizes"]["val"]["examples"] == 0


def test_bad_settings_are_refused(tiny_model, data, tmp_path):
    base = tiny_model("qwen2_vl")
    with pytest.raises(MisguardError, match="not a codes template"):
        train_judge(TrainConfig(base=base, out=tmp_path / "j", template="mis-judge-json-v1"), data["train"], [])
    with pytest.raises(MisguardError, match="no training examples"):
        train_judge(TrainConfig(base=base, out=tmp_path / "j"), [], [])
    with pytest.raises(MisguardError, match="base model's folder"):
        train_judge(TrainConfig(base=base, out=base), data["train"], [])


def test_default_lora_targets_are_the_language_model(tiny_model):
    model, _, _ = load_for_training(TrainConfig(base=tiny_model("qwen2_vl"), out=Path("unused"), lora=False))
    names = [n for n, _ in model.named_modules()]
    pattern = default_lora_target(model)
    targeted = [n for n in names if re.fullmatch(pattern, n)]
    assert len(targeted) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in targeted)
    with_vision = default_lora_target(model, train_vision=True)
    assert set(targeted) < set(with_vision) and "model.visual.blocks.0.attn.qkv" in with_vision
    assert "lm_head" not in with_vision
    # Full fine-tuning leaves the vision tower frozen by default.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and not any(n.startswith("model.visual.") for n in trainable)


def test_selection_prefers_kappa_then_lower_loss():
    assert selection_score(0.9, 5.0) > selection_score(0.899, 0.0)
    assert selection_score(1.0, 0.1) > selection_score(1.0, 0.5)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_loads_the_merged_judge_and_agrees_with_transformers(lora_runs):
    out, val = lora_runs["out"], lora_runs["val"]
    spec = read_judge_spec(out)
    template = get_template(spec.template)
    requests = [template.request(str(i), e.images, e.question, e.response) for i, e in enumerate(val)]
    with load_engine("transformers", str(out), EngineOptions(dtype="float32")) as engine:
        expected = engine.label_probs(requests, spec.label_set())
    with load_engine("vllm", str(out), EngineOptions(dtype="float32", max_model_len=2048)) as engine:
        got = engine.label_probs(requests, spec.label_set())
    for mine, reference in zip(got, expected):
        assert mine is not None
        assert mine.probs == pytest.approx(reference.probs, abs=1e-5)
