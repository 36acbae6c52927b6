"""The VLM judge: a judge folder run on an engine (transformers, vLLM, or an OpenAI-compatible server).

In "codes" mode every case is one forward pass: the six answer codes' probabilities give p_unsafe and the
perception level as marginals of one joint distribution (judges/templates.py); a request case (the guard's input
rail) reads the request template's two codes. In "json" mode (a plain instruct VLM, zero-shot) the model writes
GPT-4o's JSON verdict, read by a strict parser; what it cannot read is unscored.

A case never reaches the engine longer than the model's context: its question and response are cut to a head and
a tail that fit beside the rubric, the images and the answer (`fit_to_context`), and the assessment says so
(`input_cut`). A case whose image the engine could not use is status "error", naming the image (`bad_image`).
"""
from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoProcessor, AutoTokenizer

from misguard.calibration import Calibration
from misguard.calibration.trust import vlm_signals
from misguard.core.errors import MisguardError
from misguard.core.images import ImageError, read_header
from misguard.core.progress import Progress
from misguard.engines import Engine, EngineOptions, load_engine
from misguard.engines.base import check_model_folder
from misguard.engines.families import processor_pixels
from misguard.engines.messages import Generation, GenerationParams, ImageFileError, LabelProbs, Request, image_key
from misguard.judges.parse import parse_json_safety, parse_json_verdict
from misguard.judges.protocol import DEFAULT_IMAGE_PIXELS, DEFAULT_TEXT_TOKENS, Assessment, Case, assessments
from misguard.judges.spec import FolderJudge, JudgeSpec, write_spec
from misguard.judges.templates import (
    CODES,
    DEFAULT_CODES_TEMPLATE,
    REQUEST_CODES,
    code_marginals,
    get_template,
    request_template_for,
)
from misguard.judges.text_budget import CUT_MARK, cut_text, token_count

JSON_VERDICT_TOKENS = 48
"""A JSON verdict is about 25 tokens; more means the model is not following the format."""
NO_LABEL_TOKENS = "the engine did not return the label tokens' probabilities"
log = logging.getLogger("misguard.judges")

ANSWER_TOKENS = JSON_VERDICT_TOKENS
"""Room kept in the context for the judge's answer (one code, or a JSON verdict)."""
TEMPLATE_SLACK_TOKENS = 64
"""Counted on top of the rubric's tokens: the chat template's own (role markers, the generation prompt) and the
few a cut text can gain when it is tokenized again inside the prompt."""
BOUND_CHARS_PER_TOKEN = 0.25
"""Without a fast tokenizer a text's tokens are bounded, not estimated: no tokenizer makes more tokens than UTF-8
bytes, at most 4 a character (the context must never overflow)."""
PIXELS_PER_TOKEN = 14 * 14
"""No VLM here gives an image more than one token per 14 x 14 pixels it keeps: the bound used where the
processor cannot count an image's tokens."""
MIN_TEXT_TOKENS = 32
"""Fewer tokens than this left for the question and response: the case is not judged (status error)."""


class VLMJudge(FolderJudge):
    """A judge folder run on an engine. `served_model` names the model on an OpenAI-compatible server when the
    engine is "openai" (the folder still supplies judge.json); `engine_instance` shares an engine already loaded
    (not closed by the judge). `calibration` replaces the one in judge.json. Raises DataError for a bad
    judge.json and MisguardError for a folder or model that cannot be loaded."""

    reads_requests = True
    has_perception = True

    def __init__(self, folder: str | Path, engine: str = "transformers", options: EngineOptions | None = None, *,
                 served_model: str | None = None, engine_instance: Engine | None = None,
                 calibration: Calibration | None = None):
        super().__init__(folder, calibration=calibration)
        self.prompt = get_template(self.spec.template)
        self.request_prompt = request_template_for(self.prompt.mode)
        self.engine = engine_instance or load_engine(engine, served_model or str(self.folder), options)
        self._owns_engine = engine_instance is None
        self.labels = self.spec.label_set() if self.prompt.mode == "codes" else None

    @property
    def chunk_size(self) -> int:
        return self.engine.label_chunk_size if self.labels is not None else self.engine.chunk_size

    @functools.cached_property
    def image_pixels(self) -> int:
        """The most pixels of one image the model's processor uses (preprocessor_config.json in the folder, which
        every engine reads), or DEFAULT_IMAGE_PIXELS where it does not say."""
        return processor_pixels(_read_json(self.folder / "preprocessor_config.json")) or DEFAULT_IMAGE_PIXELS

    @functools.cached_property
    def text_tokens(self) -> int:
        """Half the model's context (config.json's max_position_embeddings, or the tokenizer's model_max_length
        where smaller): the other half is left to the rubric, the images (a megapixel is about 1,300 tokens in
        Qwen2-VL) and the answer. DEFAULT_TEXT_TOKENS where the folder does not say."""
        context = model_context(_read_json(self.folder / "config.json"),
                                getattr(self.tokenizer, "model_max_length", None))
        return context // 2 if context else DEFAULT_TEXT_TOKENS

    @functools.cached_property
    def tokenizer(self) -> Any | None:
        """The folder's tokenizer, loaded on first use; None for a folder without one (a judge.json beside a model
        served elsewhere)."""
        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError) as exc:
            log.warning("%s: no tokenizer in the judge folder (%s); text budgets are counted in characters",
                        self.folder, exc)
            return None

    @functools.cached_property
    def context_tokens(self) -> int | None:
        """The model's context in tokens (model_context of the folder's config.json and tokenizer, capped by the
        engine's max_model_len where one is set); None where nothing says."""
        known = [n for n in (model_context(_read_json(self.folder / "config.json"),
                                           getattr(self.tokenizer, "model_max_length", None)),
                             self.engine.options.max_model_len) if n]
        return min(known) if known else None

    @functools.cached_property
    def processor(self) -> Any | None:
        """The folder's processor, which counts an image's tokens from its size; loaded the first time a case is
        long enough to need it; None for a folder without one."""
        try:
            return AutoProcessor.from_pretrained(self.folder)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s: no processor in the judge folder (%s); image tokens are bounded from the image size",
                        self.folder, exc)
            return None

    def requests(self, cases: Sequence[Case]) -> list[Request]:
        """The engine requests for `cases`: the judge's template for responses, the request template for
        requests."""
        return [self.request_prompt.request(c.id, c.images, c.question) if c.is_request
                else self.prompt.request(c.id, c.images, c.question, c.response) for c in cases]

    def judge_stream(self, cases: Sequence[Case], progress: Progress | None = None,
                     ) -> Iterator[tuple[int, Assessment]]:
        """(index into `cases`, Assessment) in the order the engine finishes them, `progress` told of the cases as
        the engine finishes them. Each case is first fitted to the model's context (`fit_to_context`); one that
        cannot fit, or whose image the engine cannot use, is status "error"."""
        sizes: dict[Any, tuple[int, int] | None] = {}
        fitted = [self.fit_to_context(case, sizes) for case in cases]
        runnable = [index for index, fit in enumerate(fitted) if fit.error is None]
        if progress is not None and len(runnable) < len(cases):
            progress(len(cases) - len(runnable))
        for index, fit in enumerate(fitted):
            if fit.error is not None:
                yield index, Assessment(judge=self.id, template=self._template_of(cases[index]), status="error",
                                        reason=fit.error)
        requests = self.requests([fitted[i].case for i in runnable])
        results = (self.engine.label_stream(requests, self.labels, progress=progress) if self.labels is not None
                   else self.engine.stream(requests, GenerationParams(max_new_tokens=JSON_VERDICT_TOKENS),
                                           progress=progress))
        for index, result in results:
            case_index = runnable[index]
            yield case_index, replace(self._assessment(cases[case_index], result), input_cut=fitted[case_index].cut)

    def fit_to_context(self, case: Case, sizes: dict[Any, tuple[int, int] | None] | None = None) -> Fitted:
        """`case` with its question and response cut to a head and a tail (CUT_MARK between) where they do not
        fit the model's context beside the rubric, the images (counted by the processor, or bounded) and the
        answer; the response keeps at least half the room a question would take from it (judges/text_budget.py
        `cut_text`: a megabyte is never tokenized whole). `sizes` caches image sizes. Returns
        the case as it is when it fits, or when the context is unknown; with `error` when even the texts' minimum
        does not fit."""
        context = self.context_tokens
        if context is None:
            return Fitted(case)
        names, texts = (("message",), (case.question,)) if case.is_request else (
            ("question", "response"), (case.question, case.response))
        room = context - ANSWER_TOKENS - TEMPLATE_SLACK_TOKENS - self._rubric_tokens[case.is_request]
        bound = math.ceil(self.image_pixels / PIXELS_PER_TOKEN)
        # A text has no more tokens than UTF-8 bytes (+1 where a tokenizer marks its start): most cases stop here.
        if sum(len(text.encode("utf-8")) + 1 for text in texts) + bound * len(case.images) <= room:
            return Fitted(case)
        sizes = {} if sizes is None else sizes
        budget = room - sum(self._image_tokens(image, sizes) for image in case.images)
        if budget < MIN_TEXT_TOKENS:
            return Fitted(case, error=f"the rubric and the images alone take {context - budget} tokens of the "
                                      f"judge's context of {context}")
        # Counted within the budget (a text over it counts as the budget: the shares come out the same), then cut
        # to each text's share, room kept for the cut marks.
        counted = [cut_text(text, budget, self.tokenizer, chars_per_token=BOUND_CHARS_PER_TOKEN) for text in texts]
        keeps = _shares([c.tokens for c in counted], budget)
        mark = token_count(self.tokenizer, CUT_MARK, chars_per_token=BOUND_CHARS_PER_TOKEN)
        cut_texts, cuts = [], []
        for name, text, whole, keep in zip(names, texts, counted, keeps):
            if not whole.cut and whole.tokens <= keep:
                cut_texts.append(text)
                continue
            kept = cut_text(text, max(1, keep - mark), self.tokenizer, what=name,
                            chars_per_token=BOUND_CHARS_PER_TOKEN)
            cut_texts.append(kept.text)
            cuts.append(kept.note)
        if not cuts:
            return Fitted(case)
        how = "; ".join(cuts)
        log.warning("%s: %s, to fit the judge's context of %d tokens", case.id, how, context)
        if case.is_request:
            return Fitted(replace(case, question=cut_texts[0]), cut=how)
        return Fitted(replace(case, question=cut_texts[0], response=cut_texts[1]), cut=how)

    @functools.cached_property
    def _rubric_tokens(self) -> dict[bool, int]:
        """Tokens of each template's own text (everything but the question, the response and the images), by
        whether it is the request template."""
        counts = {}
        for request in (False, True):
            prompt = self.request_prompt.request("", (), "") if request else self.prompt.request("", (), "", "")
            text = "".join(part["text"] for part in prompt.messages[0]["content"] if part["type"] == "text")
            counts[request] = token_count(self.tokenizer, text, chars_per_token=BOUND_CHARS_PER_TOKEN)
        return counts

    def _image_tokens(self, image: Any, sizes: dict[Any, tuple[int, int] | None]) -> int:
        """An image's tokens: the processor's count for its size where it counts, else the PIXELS_PER_TOKEN bound
        on what the processor keeps; 0 for an image whose header does not read (the engine reports it)."""
        key = image_key(image)
        if key not in sizes:
            try:
                sizes[key] = (image.height, image.width) if hasattr(image, "size") else _size(read_header(image))
            except ImageError:
                sizes[key] = None
        size = sizes[key]
        if size is None:
            return 0
        counted = getattr(self.processor, "_get_num_multimodal_tokens", None)  # vLLM counts with it too
        if counted is not None:
            try:
                return int(counted(image_sizes=[list(size)]).num_image_tokens[0])
            except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                pass  # a processor that counts other kinds of input only
        return math.ceil(min(size[0] * size[1], self.image_pixels) / PIXELS_PER_TOKEN)

    def _template_of(self, case: Case) -> str:
        return self.request_prompt.id if case.is_request else self.template

    def _assessment(self, case: Case, result: LabelProbs | Generation | ImageFileError | None) -> Assessment:
        if isinstance(result, ImageFileError):
            return Assessment(judge=self.id, template=self._template_of(case), status="error", reason=result.reason,
                              bad_image=str(result.path))
        if self.labels is not None:
            return self._from_probs(case, result)
        return self._from_text(case, result)

    def _from_probs(self, case: Case, probs: LabelProbs | None) -> Assessment:
        if probs is None:
            return Assessment.unscored(self.id, self.template, NO_LABEL_TOKENS)
        if case.is_request:
            # The request template answers with the first two codes; their share of the two is P(harmful). A
            # judge's calibration is fitted on responses, so it does not apply here (the guard's policy may name
            # one for the input rail).
            safe, unsafe = (probs.probs[self.labels.texts.index(code)] for code in REQUEST_CODES)
            if safe + unsafe == 0:
                return Assessment.unscored(self.id, self.request_prompt.id,
                                           "the judge gave the request codes no probability")
            # A NaN share stays NaN, so that assessments() makes it the judge's error.
            share = unsafe / (safe + unsafe) if math.isfinite(safe + unsafe) else math.nan
            assessment = assessments(self.id, self.request_prompt.id, [share], None,
                                     calibration=None, calibration_id=None, threshold=self.unsafe_threshold)[0]
            return replace(assessment, label_mass=probs.mass if math.isfinite(probs.mass) else None)
        p_unsafe, levels = code_marginals(probs.probs)
        assessment = assessments(self.id, self.template, [p_unsafe], np.array([list(levels.values())]),
                                 calibration=self.calibration, calibration_id=self.calibration_id,
                                 threshold=self.unsafe_threshold)[0]
        return self._with_trust(replace(assessment, label_mass=probs.mass if math.isfinite(probs.mass) else None))

    def _with_trust(self, assessment: Assessment) -> Assessment:
        """With a trust score in the calibration (`misguard calibrate` fits one): the verdict's trust, and status
        out_of_domain under its threshold."""
        trust = self.calibration.trust if self.calibration is not None else None
        if trust is None or not assessment.scored:
            return assessment
        perception = [list(assessment.p_perception.values())] if "perception_entropy" in trust.signals else None
        score = float(trust.score(vlm_signals([assessment.p_unsafe], self.unsafe_threshold, [assessment.label_mass],
                                              perception))[0])
        return assessment.with_trust(score, bool(trust.flagged(score)), trust.threshold,
                                     unlike="the responses the judge was calibrated on")

    def _from_text(self, case: Case, generation: Generation) -> Assessment:
        text = generation.text
        template = self.request_prompt.id if case.is_request else self.template
        parsed = parse_json_safety(text) if case.is_request else parse_json_verdict(text)
        if isinstance(parsed, str):
            return Assessment.unscored(self.id, template, f"unreadable verdict ({parsed}): {text[:200]!r}")
        if case.is_request:
            return Assessment(judge=self.id, template=template, status="scored", label=parsed[0])
        perception, safety = parsed
        return Assessment(judge=self.id, template=template, status="scored", label=safety,
                          perception=perception.removeprefix("Perception "))

    def describe(self) -> dict[str, Any]:
        return {"judge": self.spec.model_dump(), "engine": self.engine.describe(), "calibration": self.calibration_id,
                "unsafe_threshold": self.unsafe_threshold}

    def close(self) -> None:
        if self._owns_engine:
            self.engine.close()


@dataclass(frozen=True)
class Fitted:
    """A case as the judge will read it: cut to fit its context (`cut` says how; None: as it came), or not to be
    judged (`error` says why)."""

    case: Case
    cut: str | None = None
    error: str | None = None


def _shares(counts: list[int], budget: int) -> list[int]:
    """How many tokens each text keeps of `budget`: all of them when they fit; else the question (the first of
    two) keeps what the response leaves, but never more than half, and the response the rest."""
    if sum(counts) <= budget:
        return counts
    if len(counts) == 1:
        return [budget]
    question, response = counts
    kept = min(question, max(budget // 2, budget - response))
    return [kept, budget - kept]


def _size(header) -> tuple[int, int]:
    return header.height, header.width


def model_context(config: dict[str, Any], tokenizer_max: int | None = None) -> int | None:
    """The model's context in tokens from its config.json (max_position_embeddings, at the top or in text_config),
    capped by the tokenizer's model_max_length where that is a real number (not transformers' 1e30 for "none")."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found = [value for value in (config.get("max_position_embeddings"), text_config.get("max_position_embeddings"),
                                 tokenizer_max) if isinstance(value, int) and 0 < value < 10**8]
    return min(found) if found else None


def _read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON config, or {} where it is missing or unreadable (the defaults then apply)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def make_judge_folder(folder: str | Path, *, judge_id: str | None = None, template: str = DEFAULT_CODES_TEMPLATE,
                      base_model: str | None = None) -> JudgeSpec:
    """Make a model folder a judge folder: write judge.json with the template and, for codes templates, the label
    token ids read from the folder's own tokenizer. Returns the spec. Raises MisguardError when the folder is not
    a model folder, the template is unknown, or an answer code is not one distinct token in its tokenizer."""
    folder = check_model_folder(str(folder))
    prompt = get_template(template)  # an unknown template id fails before anything is written
    spec = JudgeSpec(id=judge_id or folder.name, template=template, base_model=base_model)
    if prompt.mode == "codes":
        spec.label_tokens = code_token_ids(AutoTokenizer.from_pretrained(folder))
    write_spec(folder, spec)
    return spec


def code_token_ids(tokenizer) -> dict[str, int]:
    """Each answer code's token id. Raises MisguardError when a code is not one distinct token."""
    ids = {}
    for code in CODES:
        encoded = tokenizer.encode(code, add_special_tokens=False)
        if len(encoded) != 1:
            raise MisguardError(f"answer code {code!r} is {len(encoded)} tokens in this tokenizer, not one")
        ids[code] = encoded[0]
    if len(set(ids.values())) != len(ids):
        raise MisguardError(f"answer codes share token ids in this tokenizer: {ids}")
    return ids
