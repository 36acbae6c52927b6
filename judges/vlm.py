"""The VLM judge: a judge folder run on an engine (transformers, vLLM, or an OpenAI-compatible server).

In "codes" mode every case is one forward pass: the six answer codes' probabilities give p_unsafe and the
perception level as marginals of one joint distribution (judges/templates.py); a request case (the guard's input
rail) reads the request template's two codes. In "json" mode (a plain instruct VLM, zero-shot) the model writes
GPT-4o's JSON verdict, read by a strict parser; what it cannot read is unscored.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from misguard.calibration import Calibration
from misguard.calibration.trust import vlm_signals
from misguard.core.errors import MisguardError
from misguard.engines import Engine, EngineOptions, load_engine
from misguard.engines.base import check_model_folder
from misguard.engines.messages import Generation, GenerationParams, LabelProbs, Request
from misguard.judges.parse import parse_json_safety, parse_json_verdict
from misguard.judges.protocol import Assessment, Case, assessments
from misguard.judges.spec import FolderJudge, JudgeSpec, write_spec
from misguard.judges.templates import (
    CODES,
    DEFAULT_CODES_TEMPLATE,
    REQUEST_CODES,
    code_marginals,
    get_template,
    request_template_for,
)

JSON_VERDICT_TOKENS = 48
"""A JSON verdict is about 25 tokens; more means the model is not following the format."""
NO_LABEL_TOKENS = "the engine did not return the label tokens' probabilities"


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

    def requests(self, cases: Sequence[Case]) -> list[Request]:
        """The engine requests for `cases`: the judge's template for responses, the request template for
        requests."""
        return [self.request_prompt.request(c.id, c.images, c.question) if c.is_request
                else self.prompt.request(c.id, c.images, c.question, c.response) for c in cases]

    def judge_stream(self, cases: Sequence[Case]) -> Iterator[tuple[int, Assessment]]:
        """(index into `cases`, Assessment) in the order the engine finishes them."""
        requests = self.requests(cases)
        if self.labels is not None:
            for index, probs in self.engine.label_stream(requests, self.labels):
                yield index, self._from_probs(cases[index], probs)
            return
        for index, generation in self.engine.stream(requests, GenerationParams(max_new_tokens=JSON_VERDICT_TOKENS)):
            yield index, self._from_text(cases[index], generation)

    def _from_probs(self, case: Case, probs: LabelProbs | None) -> Assessment:
        if probs is None:
            return Assessment.unscored(self.id, self.template, NO_LABEL_TOKENS)
        if case.is_request:
            # The request template answers with the first two codes; their share of the two is P(harmful). A
            # judge's calibration is fitted on responses, so it does not apply here (the guard's policy may name
            # one for the input rail).
            safe, unsafe = (probs.probs[self.labels.texts.index(code)] for code in REQUEST_CODES)
            if not safe + unsafe > 0:
                return Assessment.unscored(self.id, self.request_prompt.id,
                                           "the judge gave the request codes no probability")
            assessment = assessments(self.id, self.request_prompt.id, [unsafe / (safe + unsafe)], None,
                                     calibration=None, calibration_id=None, threshold=self.unsafe_threshold)[0]
            return replace(assessment, label_mass=probs.mass)
        p_unsafe, levels = code_marginals(probs.probs)
        assessment = assessments(self.id, self.template, [p_unsafe], np.array([list(levels.values())]),
                                 calibration=self.calibration, calibration_id=self.calibration_id,
                                 threshold=self.unsafe_threshold)[0]
        return self._with_trust(replace(assessment, label_mass=probs.mass))

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
