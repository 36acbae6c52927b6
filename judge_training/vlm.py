"""Fine-tuning a judge: LoRA (or full) training of an open VLM to give GPT-4o's verdict as one answer-code token.

The training format is exactly what `misguard score` reads. The prompt is the judge template's request for
(images, question, response), turned into text by the family adapter and the processor's chat template with the
generation prompt, as TransformersEngine does; the target is the answer code ("1".."6") as the next token.
The loss is the cross-entropy of that one token, read from the logits at the last prompt position (left padding
puts it at index -1 of every row), the same position `label_probs` reads at scoring time.

`train_judge` runs transformers' Trainer with a checkpoint per epoch in out/checkpoints (a re-run resumes from
the last one), evaluates safety / perception agreement on the validation examples after each epoch, keeps the
best epoch, and writes out/ as a judge folder: the merged model, the base's processor and tokenizer files,
judge.json, judge_card.json, and (LoRA) the adapter in out/adapter.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINING_ARGS_NAME, _is_peft_model

from misguard.calibration.agreement import SAFETY_LABELS, head_agreement
from misguard.core.errors import MisguardError
from misguard.core.locking import FOLDER_LOCK
from misguard.core.manifests import utc_now
from misguard.core.records import PERCEPTION_LEVELS
from misguard.core.settings import check_settings, setting
from misguard.core.version import __version__
from misguard.engines import EngineOptions
from misguard.engines.base import check_model_folder
from misguard.engines.families import Family, family_for
from misguard.engines.hf import (
    answer_logits,
    load_processor_and_model,
    processor_inputs,
    render_prompt,
    resolve_device_dtype,
)
from misguard.engines.messages import LabelProbs, label_probs_from_logprobs
from misguard.judge_training.checkpoints import checkpoint_loading, resume_point
from misguard.judge_training.data import label_counts, split_sizes
from misguard.judge_training.examples import TrainingExample
from misguard.judges.spec import CARD_FILE, JUDGE_FILE, JudgeCard
from misguard.judges.templates import CODES, code_marginals, get_template
from misguard.judges.vlm import code_token_ids, make_judge_folder

log = logging.getLogger("misguard")

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The language model's attention and MLP projections: the default LoRA targets (Qwen2, Llama, InternLM2-hf...)."""
SELECTION_METRIC = "selection_score"
"""The validation figure the best epoch is chosen by (see selection_score): safety kappa, or safety accuracy
where kappa is undefined (both sides give one and the same label throughout: perfect agreement on a one-class
validation set), ties broken by the lower validation loss."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".safetensors.index.json", ".bin.index.json")
NOT_COPIED = {"config.json", "generation_config.json", "README.md", JUDGE_FILE, CARD_FILE, FOLDER_LOCK}
"""Files of the base folder that the judge folder does not take over (the merged model writes its own; the base's
lock file, where a command wrote it, belongs to the base)."""


@dataclass
class TrainConfig:
    """Settings of one `misguard train` run (`--kind vlm`). Each field is one CLI option."""

    base: Path = setting(help="vlm: the base VLM folder (save_pretrained) to fine-tune into a judge (required).")
    out: Path = setting(help="The judge folder to write.")
    template: str = setting("mis-judge-codes-v1", help="vlm: the judge prompt template (a codes template: the "
                                                       "answer is one code token).")
    lora: bool = setting(True, flag="--lora/--full", help="vlm: a LoRA adapter (merged into the saved model), or "
                                                          "full fine-tuning of the language model.")
    lora_r: int = setting(16, at_least=1, help="vlm: LoRA rank.")
    lora_alpha: int = setting(32, at_least=1, help="vlm: LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = setting(0.05, at_least=0.0, below=1.0, help="vlm: dropout on the LoRA branch's input.")
    lora_target: str | None = setting(
        None, help="vlm: modules to adapt, a regular expression over full module names (peft's target_modules); "
                   "default: the language model's attention and MLP projections (and the vision tower's linear "
                   "layers with --train-vision).")
    train_vision: bool = setting(False, help="vlm: also train the vision tower and its projector (frozen by "
                                             "default).")
    epochs: int = setting(3, at_least=1, help="Passes over the training examples; with resume, a larger value "
                                              "continues a finished run.")
    lr: float | None = setting(None, above=0.0, below=1.0, help="Peak learning rate, decayed linearly to 0; default: "
                                                                "2e-4 with LoRA, 1e-5 for full fine-tuning.")
    batch_size: int = setting(8, at_least=1, help="Examples per device per step.")
    grad_accum: int = setting(1, at_least=1, help="vlm: steps whose gradients are summed before each optimizer "
                                                  "update.")
    seed: int = setting(0, at_least=0, help="Seed of the initialisation, the data order and dropout.")
    dtype: str = setting("auto", help="vlm: weights dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32 "
                                      "or bfloat16.")
    gradient_checkpointing: bool | None = setting(
        None, help="vlm: recompute activations in the backward pass to save memory; default: on with a GPU.")
    judge_id: str | None = setting(None, help="The judge's id in judge.json and in every judgment it makes; "
                                              "default: the out folder's name.")
    resume: bool = setting(True, help="Continue from the last checkpoint in OUT/checkpoints when there is one "
                                      "(same settings and data); --no-resume starts over.")

    def __post_init__(self):
        check_settings(self)  # the library refuses what the command line refuses

    def learning_rate(self) -> float:
        """The learning rate this run uses."""
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.lora else 1e-5

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-ready values (paths as strings)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: str(value) if isinstance(value, Path) else value for name, value in values.items()}


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote and how well its best epoch agrees with the validation labels."""

    out: Path
    """The judge folder (loadable by transformers, vLLM and `misguard.judges.load_judge`)."""
    adapter: Path | None
    """The LoRA adapter folder (peft), or None after full fine-tuning."""
    judge_spec: Path
    """out/judge.json."""
    judge_card: Path
    """out/judge_card.json."""
    best_epoch: int | None
    """The epoch whose weights were saved; None without validation examples (the last epoch is saved)."""
    validation: dict[str, Any] | None
    """The best epoch's validation figures (see `history`), or None without validation examples."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per epoch: {epoch, global_step, loss, safety {kappa, accuracy, n}, perception {...}, code_accuracy}."""
    global_step: int = 0
    resumed_from: str | None = None
    """The checkpoint this run continued from, or None for a fresh run."""
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# The training format


class AnswerCodeCollator:
    """Turns TrainingExamples into a batch: the processor's tensors for the judge prompts, left-padded so every
    row's last position is its last prompt token, plus `answer_ids` (each example's answer-code token id)."""

    def __init__(self, processor, family: Family, template_id: str, code_ids: dict[str, int]):
        self.processor = processor
        self.family = family
        self.template = get_template(template_id)
        self.code_ids = code_ids
        getattr(processor, "tokenizer", processor).padding_side = "left"

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, Any]:
        prepared = [render_prompt(self.processor, self.family, self.template.request(
            f"{e.item_key}/{e.model}", e.images, e.question, e.response)) for e in examples]
        batch = dict(processor_inputs(self.processor, prepared))
        batch["answer_ids"] = torch.tensor([self.code_ids[e.answer] for e in examples], dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Model


def language_model_prefix(model) -> str:
    """The full module name of the model's language model (e.g. "model.language_model"). Raises MisguardError
    when the model does not expose one."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if module is decoder and name:
            return name
    raise MisguardError(f"cannot find the language model inside {type(model).__name__}; pass lora_target")


def default_lora_target(model, train_vision: bool = False) -> str | list[str]:
    """peft target_modules for the language model's attention and MLP projections: a regular expression over
    full module names; with `train_vision`, the explicit list of those names plus every linear layer outside the
    language model and the LM head (the vision tower and its projector). Raises MisguardError when nothing
    matches."""
    lm = language_model_prefix(model)
    pattern = rf"{re.escape(lm)}\..*\.({'|'.join(LM_PROJECTIONS)})"
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    lm_names = [name for name in linear if re.fullmatch(pattern, name)]
    if not lm_names:
        raise MisguardError(f"no {'/'.join(LM_PROJECTIONS)} layers under {lm}; pass lora_target")
    if not train_vision:
        return pattern
    head = model.get_output_embeddings()
    head_names = {name for name, module in model.named_modules() if module is head}
    return lm_names + [n for n in linear if not n.startswith(lm + ".") and n not in head_names]


def load_for_training(config: TrainConfig):
    """(model ready to train, processor, torch dtype) for `config.base`: LoRA-wrapped (peft) or, for full
    fine-tuning, with the vision tower and projector frozen unless `train_vision`. Raises MisguardError when the
    folder cannot be loaded or the dtype is unknown."""


    if config.dtype not in ("auto", "float32", "bfloat16"):
        raise MisguardError(f"unknown training dtype '{config.dtype}'; choose auto, float32 or bfloat16")
    _, dtype = resolve_device_dtype("auto", config.dtype)
    # Loaded on the CPU in the resolved dtype; the Trainer moves it to the GPU.
    options = EngineOptions(device="cpu", dtype=str(dtype).removeprefix("torch."))
    processor, model, _ = load_processor_and_model(str(config.base), options)
    model.config.use_cache = False
    if config.lora:
        from peft import LoraConfig, get_peft_model  # the `train` extra: only LoRA training needs it

        target = config.lora_target or default_lora_target(model, config.train_vision)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=target, bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise MisguardError(f"LoRA target {target!r}: {str(exc).splitlines()[0]}") from exc
    elif not config.train_vision:
        lm = language_model_prefix(model)
        head = {id(p) for p in model.get_output_embeddings().parameters()}
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(lm + ".") or id(param) in head
    if not any(p.requires_grad for p in model.parameters()):
        raise MisguardError("nothing to train: no parameter requires a gradient")
    return model, processor, dtype


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _verdicts(probs: Sequence[LabelProbs], threshold: float = 0.5) -> tuple[list[str], list[str]]:
    """(safety labels, perception levels) from the six codes' probabilities, as Judge reads them: Unsafe when
    the Unsafe codes' mass >= threshold; the perception level with the largest marginal."""
    safety, perception = [], []
    for row in probs:
        p_unsafe, levels = code_marginals(row.probs)
        safety.append("Unsafe" if p_unsafe >= threshold else "Safe")
        perception.append(max(levels, key=levels.__getitem__))
    return safety, perception


def validation_metrics(examples: Sequence[TrainingExample], probs: Sequence[LabelProbs],
                       losses: Sequence[float]) -> dict[str, Any]:
    """Flat validation figures (Trainer logs them with an "eval_" prefix): loss (mean answer-code cross-entropy),
    safety_kappa / safety_accuracy, perception_kappa / perception_accuracy (None where undefined),
    code_accuracy (the most likely code is the reference's) and SELECTION_METRIC. Raises ValueError for no
    examples."""
    if not examples:
        raise ValueError("no validation examples")

    safety, perception = _verdicts(probs)
    safety_agreement = head_agreement([e.label_str for e in examples], safety, SAFETY_LABELS, positive="Unsafe")
    perception_agreement = head_agreement([e.label_perception.removeprefix("Perception ") for e in examples],
                                          perception, PERCEPTION_LEVELS)
    codes = list(CODES)
    top_codes = [codes[max(range(len(codes)), key=row.probs.__getitem__)] for row in probs]
    kappa = safety_agreement["kappa"]
    loss = sum(losses) / len(losses)
    return {
        "loss": loss,
        "safety_kappa": kappa,
        "safety_accuracy": safety_agreement["accuracy"],
        "perception_kappa": perception_agreement["kappa"],
        "perception_accuracy": perception_agreement["accuracy"],
        "code_accuracy": sum(c == e.answer for c, e in zip(top_codes, examples)) / len(examples),
        SELECTION_METRIC: selection_score(kappa if kappa is not None else safety_agreement["accuracy"], loss),
    }


def selection_score(safety_kappa: float, loss: float) -> float:
    """The best-epoch criterion as one number: safety kappa to 3 decimals, ties broken by the lower validation
    loss (the added term lies in (0, 1e-4], below the kappa's last kept decimal)."""
    return round(safety_kappa, 3) + 1e-4 / (1.0 + loss)


@functools.lru_cache(maxsize=1)
def _judge_trainer_class():
    """transformers.Trainer with the answer-code loss and the agreement evaluation (built on first use, so this
    module imports without transformers)."""
    class JudgeTrainer(Trainer):
        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by grad_accum

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            answer_ids = inputs.pop("answer_ids")
            logits = answer_logits(model, inputs)
            loss = torch.nn.functional.cross_entropy(logits, answer_ids)
            return (loss, logits) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            if _is_peft_model(self.model):
                return super()._save(output_dir, state_dict)
            # transformers 5.19 writes a full checkpoint in the hub's key layout ("model.layers..." for Qwen2-VL)
            # but reads it back with a plain load_state_dict in the model's own layout: resume and the best-epoch
            # reload would silently load nothing. Checkpoints are only read back here, so keep the model's layout.
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        def _issue_warnings_after_load(self, load_result):
            # A checkpoint that does not fit the model is an error, not a warning: training would go on from
            # the wrong weights. Tied weights (one tensor under two names) are saved once.
            missing = set(load_result.missing_keys) - _tied_aliases(self.model)
            if missing or load_result.unexpected_keys:
                raise MisguardError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
                                    f"unexpected {sorted(load_result.unexpected_keys)[:5]}")

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            examples = list(eval_dataset if eval_dataset is not None else self.eval_dataset)
            code_ids = list(self.data_collator.code_ids.values())
            model, was_training = self.model, self.model.training
            model.eval()
            probs, losses = [], []
            start_time = time.time()
            with torch.no_grad():
                for start in range(0, len(examples), self.args.per_device_eval_batch_size):
                    batch = self._prepare_inputs(
                        self.data_collator(examples[start:start + self.args.per_device_eval_batch_size]))
                    answer_ids = batch.pop("answer_ids")
                    logprobs = torch.log_softmax(answer_logits(model, batch), dim=-1)
                    losses += (-logprobs.gather(1, answer_ids[:, None])[:, 0]).tolist()
                    probs += [label_probs_from_logprobs(row) for row in logprobs[:, code_ids].tolist()]
            model.train(was_training)
            metrics = {f"{metric_key_prefix}_{k}": v
                       for k, v in validation_metrics(examples, probs, losses).items()}
            metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start_time, 4)
            self.log(metrics)
            log.info("epoch %.0f validation: %s", self.state.epoch or 0,
                     ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in metrics.items()
                               if isinstance(v, float)))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return JudgeTrainer


def _tied_aliases(model) -> set[str]:
    """State-dict names that repeat an earlier name's tensor (tied weights such as lm_head = embed_tokens)."""
    seen: set[int] = set()
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    return aliases


# ---------------------------------------------------------------------------------------------------------------
# The run


def train_judge(config: TrainConfig, train: list[TrainingExample], val: list[TrainingExample], *,
                data_hashes: dict[str, Any] | None = None, progress: bool = True,
                callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune `config.base` into a judge folder at `config.out` on `train`, choosing the best epoch on `val`.

    With `config.resume` and a checkpoint in out/checkpoints, training continues from the last one (which must
    come from the same settings and examples; only `epochs` may grow). `data_hashes` (e.g. the sha256 of the
    responses and verdicts files) go into judge_card.json as given. `callbacks` are transformers
    TrainerCallbacks added to the Trainer (hooks for tests and progress reporting).

    Returns a TrainResult. Raises MisguardError for an empty training set, a template that is not a codes
    template, a base or out folder that cannot be used, an answer code that is not one token of the base's
    tokenizer, or checkpoints that come from other settings or data.
    """
    started = time.time()
    base, out = Path(config.base).expanduser(), Path(config.out).expanduser()
    _check_run(config, base, out, train)
    set_seed(config.seed)  # before the model is built: the LoRA initialisation is random
    model, processor, dtype = load_for_training(config)
    code_ids = code_token_ids(getattr(processor, "tokenizer", processor))
    family = family_for(model.config.model_type)
    collator = AnswerCodeCollator(processor, family, config.template, code_ids)

    checkpoints = out / CHECKPOINTS
    resumed_from = resume_point(checkpoints, _fingerprint(config, train, val), resume=config.resume)
    on_gpu = torch.cuda.is_available()
    checkpointing = on_gpu if config.gradient_checkpointing is None else config.gradient_checkpointing
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate(),
        lr_scheduler_type="linear",
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        seed=config.seed,
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        eval_strategy="epoch" if val else "no",
        save_strategy="epoch",
        save_total_limit=2,  # the best and the last: a full fine-tuning checkpoint of a 7B model is ~90 GB
        load_best_model_at_end=bool(val),
        metric_for_best_model=SELECTION_METRIC if val else None,
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=10,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=not progress,
        dataloader_pin_memory=on_gpu,
    )
    trainer = _judge_trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=val or None,
                                     data_collator=collator, callbacks=list(callbacks))
    if not progress:
        trainer.remove_callback(PrinterCallback)
    with checkpoint_loading(checkpoints):
        trainer.train(resume_from_checkpoint=resumed_from)

    history = _history(trainer.state.log_history)
    best_epoch, best = _best(history, trainer.state)
    adapter = _export(trainer.model, config, base, out)

    spec = make_judge_folder(out, judge_id=config.judge_id, template=config.template, base_model=str(base))
    seconds = time.time() - started
    card = _judge_card(config, base, spec.id, train, val, history, best_epoch, best, data_hashes,
                       trainer.state.global_step, resumed_from, seconds, str(dtype).removeprefix("torch."),
                       "cuda" if on_gpu else "cpu")
    return TrainResult(out=out, adapter=adapter, judge_spec=out / "judge.json", judge_card=card.save(out),
                       best_epoch=best_epoch, validation=best, history=history,
                       global_step=trainer.state.global_step, resumed_from=resumed_from, seconds=seconds)


def _check_run(config: TrainConfig, base: Path, out: Path, train: Sequence[TrainingExample]) -> None:
    """Raise MisguardError for settings that cannot train."""
    check_model_folder(str(base))
    if get_template(config.template).mode != "codes":
        raise MisguardError(f"template '{config.template}' is not a codes template; a trained judge answers "
                            "with one code token")
    if not train:
        raise MisguardError("no training examples")
    if out.resolve() == base.resolve():
        raise MisguardError(f"{out}: the judge folder must not be the base model's folder")


def _fingerprint(config: TrainConfig, train: Sequence[TrainingExample], val: Sequence[TrainingExample]) -> dict:
    """What checkpoints depend on: the settings that shape the weights, and a hash of the examples."""
    free = ("epochs", "resume", "out", "judge_id", "gradient_checkpointing")
    settings = {k: v for k, v in config.settings().items() if k not in free}
    settings["base"] = str(Path(config.base).expanduser().resolve())
    digest = hashlib.sha256()
    for name, examples in (("train", train), ("val", val)):
        for e in examples:
            digest.update(json.dumps([name, e.item_key, e.model, e.answer, e.images, e.question, e.response],
                                     ensure_ascii=False).encode())
    return {"settings": settings, "examples_sha256": digest.hexdigest()}


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per evaluated epoch, from the Trainer's log (kept in checkpoints, so resumed runs have it all)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if f"eval_{SELECTION_METRIC}" not in entry:
            continue
        epoch = round(entry["epoch"])
        by_epoch[epoch] = {
            "epoch": epoch, "global_step": entry["step"], "loss": entry["eval_loss"],
            "safety": {"kappa": entry["eval_safety_kappa"], "accuracy": entry["eval_safety_accuracy"]},
            "perception": {"kappa": entry["eval_perception_kappa"], "accuracy": entry["eval_perception_accuracy"]},
            "code_accuracy": entry["eval_code_accuracy"], SELECTION_METRIC: entry[f"eval_{SELECTION_METRIC}"],
        }
    return [by_epoch[e] for e in sorted(by_epoch)]


def _best(history: list[dict[str, Any]], state) -> tuple[int | None, dict[str, Any] | None]:
    """(best epoch, its figures): the epoch of the checkpoint the Trainer loaded back at the end."""
    if not history or state.best_global_step is None:
        return None, None
    best = next((h for h in history if h["global_step"] == state.best_global_step), None)
    return (best["epoch"], best) if best else (None, None)


def _export(model, config: TrainConfig, base: Path, out: Path) -> Path | None:
    """Write the judge's model folder: out/adapter (LoRA), the merged model in out/ (safetensors), and the
    base's processor, tokenizer and chat template files unchanged. Returns the adapter folder or None."""
    adapter = None
    if config.lora:
        adapter = out / ADAPTER
        model.save_pretrained(adapter)
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out)
    for source in base.iterdir():
        # The base's own files, not a re-save: the judge tokenizes and templates exactly as its base did.
        if source.is_file() and source.name not in NOT_COPIED and not source.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(source, out / source.name)
    return adapter


def _judge_card(config: TrainConfig, base: Path, judge_id: str, train, val, history, best_epoch, best,
                data_hashes, global_step, resumed_from, seconds, dtype, device) -> JudgeCard:
    """judge_card.json: where the judge comes from and how well it agreed with the validation labels."""
    return JudgeCard(
        kind="vlm", judge_id=judge_id, base_model=str(base), template=config.template, misguard_version=__version__,
        created=utc_now(), split_sizes={"train": split_sizes(train), "val": split_sizes(val)},
        label_counts={"train": label_counts(train), "val": label_counts(val)},
        validation={"per_epoch": history, "best_epoch": best_epoch, "best": best, "selected_by": SELECTION_METRIC},
        training={**config.settings(), "learning_rate": config.learning_rate(), "dtype_used": dtype,
                  "device": device, "global_step": global_step, "resumed_from": resumed_from,
                  "seconds": round(seconds, 1)},
        data_hashes=dict(data_hashes or {}))


__all__ = ["AnswerCodeCollator", "TrainConfig", "TrainResult", "answer_logits", "default_lora_target",
           "language_model_prefix", "load_for_training", "render_prompt", "selection_score", "train_judge",
           "validation_metrics"]
