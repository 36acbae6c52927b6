"""Typed records at every boundary: an MIS item, a target model's response, a reference (GPT-4o) verdict.

Files on disk are JSON Lines of these records (see core.jsonl). Field names follow the published MIS data and
the seed's gpt_eval.py, so files written here are read by the seed's scripts and the other way round.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

SPLITS: tuple[str, ...] = ("easy", "hard", "real")
CATEGORIES: tuple[str, ...] = ("Illegal Activity", "Violent", "Hate", "Self-Harm", "Privacy", "Erotic")
PERCEPTION_LABELS: tuple[str, ...] = ("Perception Level1", "Perception Level2", "Perception Level3")
SAFETY_LABELS: tuple[str, ...] = ("Safe", "Unsafe")
Status = Literal["scored", "unscored", "error", "out_of_domain"]
"""A judgment's status: scored; unscored (the judge's output could not be read); error (the judge failed, e.g. a
probability that is not a finite number); out_of_domain (labelled, but the judge does not trust its verdict)."""
UNJUDGED: tuple[str, ...] = ("unscored", "error")
"""The statuses without a label: counted apart, never in a rate."""


class IntegerId(str):
    """An id its source file wrote as a JSON integer (the published MIS files do, and a split file without ids gets
    its rows' positions). It is a str, so ids compare, hash and sort as strings everywhere (an item's 3 matches a
    response's "3"), and it is written back as an integer (`id_value`), so misguard's files keep the source's type."""

    __slots__ = ()


def source_id(value: Any) -> str:
    """An id as read from a file: an IntegerId for a JSON integer, the string itself for a non-blank string.
    Raises ValueError for anything else (a boolean, a number that is not an integer, null, a blank string)."""
    if isinstance(value, IntegerId):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a string or an integer")
    if isinstance(value, int):
        return IntegerId(value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def id_value(item_id: str) -> int | str:
    """How an id is written to JSON: an integer for an IntegerId (the source wrote one), else the string."""
    return int(item_id) if isinstance(item_id, IntegerId) else str(item_id)


def _validate_id(value: Any, handler: ValidatorFunctionWrapHandler) -> str:
    # pydantic's str validation would turn an IntegerId into a plain str and lose the source's type.
    return source_id(value)


ItemId = Annotated[str, WrapValidator(_validate_id), PlainSerializer(id_value, return_type=int | str)]
"""An MIS item's id in a record: read with `source_id`, written with `id_value`."""


class Item(BaseModel):
    """One MIS test item: a question about two images. Image paths are relative to the MIS directory. `id` keeps the
    source's type (see IntegerId); a split file without ids gives each row its 0-based position (core.splits)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: ItemId
    question: str
    category: str
    sub_category: str
    image_path1: str
    image_path2: str

    @field_validator("question", "category", "image_path1", "image_path2")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class Response(Item):
    """A target model's answer to an item: every item field plus `response` and `model` (one JSON line). The MIS
    inference scripts write no `model` (and no `id` when the split has none): see core.join.item_responses."""

    response: str
    model: str


class Verdict(BaseModel):
    """A reference verdict as the seed's gpt_eval.py writes it. It has no `id`: join by content (`key`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    label_perception: Literal["Perception Level1", "Perception Level2", "Perception Level3"]
    label_str: Literal["Safe", "Unsafe"]
    category: str
    question: str
    response: str
    image_path1: str
    image_path2: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The join key shared with responses: (image_path1, image_path2, question, response)."""
        return content_key(self)


def id_order(item_id: str) -> tuple[int, int, str]:
    """A sort key that puts published MIS ids (integers stored as strings) in numeric order, others after them."""
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


def content_key(record: Item | Verdict) -> tuple[str, str, str, str]:
    """(image_path1, image_path2, question, response) — how id-less verdict files are matched back."""
    return (record.image_path1, record.image_path2, record.question, getattr(record, "response", ""))


PERCEPTION_LEVELS: tuple[str, ...] = ("Level1", "Level2", "Level3")


class Judgment(BaseModel):
    """A judge's verdict on one response: the gpt_eval.py fields (so the seed's tools read it) plus the item's
    id, split and sub-category, the target model, the judge's probabilities and where they came from.

    An unscored judgment (the judge's output could not be read) has status "unscored", no labels and no
    probabilities, and a `reason`; an errored one (the judge failed: a probability that is not a finite number)
    has status "error", likewise. Both are counted apart and reported, never given a default label.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    label_perception: Literal["Perception Level1", "Perception Level2", "Perception Level3"] | None
    label_str: Literal["Safe", "Unsafe"] | None
    category: str
    question: str
    response: str
    image_path1: str
    image_path2: str
    id: ItemId
    split: str
    sub_category: str
    model: str
    p_unsafe: float | None = None
    p_perception: dict[str, float] | None = None
    """{"Level1": p, "Level2": p, "Level3": p}, summing to 1."""
    judge: str
    """Which judge produced it: a judge folder's id, or "reference:<file>" for labels read from gpt_eval.py."""
    template: str
    """The judge prompt template id ("" for reference labels)."""
    status: Status = "scored"
    """out_of_domain: labelled, but the judge's trust in the verdict is under its threshold (see `trust`)."""
    reason: str | None = None
    """Why a judgment is unscored, an error or out of domain."""
    input_cut: str | None = None
    """How the judge shortened its input to fit its context, e.g. "response cut to 3,900 of 250,000 tokens (head
    and tail kept)"; None when it read the whole input."""
    calibration: str | None = None
    """The calibration applied to p_unsafe / p_perception (its id, "sha256:..."), or None for raw probabilities."""
    p_unsafe_raw: float | None = None
    """With a calibration: the judge's own p_unsafe before it (what `misguard calibrate` fits on)."""
    p_perception_raw: dict[str, float] | None = None
    trust: float | None = None
    """The judge's trust in the verdict, in [0, 1], where the judge measures it."""
    label_mass: float | None = None
    """A VLM judge's answer codes' share of the next-token distribution (what `misguard calibrate` fits the
    VLM judge's trust score on, beside the probabilities)."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return content_key(self)


class RowJudgment(BaseModel):
    """A judge's verdict on one plain (question, response) row, as `misguard score --rows` writes it: any
    labelled or unlabelled safety set, not MIS items. `reference` is the row's own label where the run read one
    (`--label-field`); status and trust as in Judgment."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    source: str
    question: str
    response: str
    image_description: str | None = None
    reference: Literal["Safe", "Unsafe"] | None = None
    label_str: Literal["Safe", "Unsafe"] | None
    p_unsafe: float | None = None
    p_unsafe_raw: float | None = None
    judge: str
    template: str
    status: Status = "scored"
    reason: str | None = None
    calibration: str | None = None
    trust: float | None = None
    input_cut: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.id)
