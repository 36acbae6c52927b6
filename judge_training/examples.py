"""Training examples: one target response with GPT-4o's verdict on it, in the judge's own answer format."""
from __future__ import annotations

from dataclasses import dataclass

from misguard.judges.templates import ANSWER_CODE


@dataclass(frozen=True)
class TrainingExample:
    """One (two images, question, response) with its reference verdict and the answer the judge must give."""

    item_key: str
    """The MIS item ("<split>/<id>"): every response to one item lands on the same side of a split."""
    split: str
    id: str
    model: str
    """The target model that wrote the response."""
    category: str
    sub_category: str
    images: tuple[str, str]
    """Absolute paths of the item's two images."""
    question: str
    response: str
    label_str: str
    """"Safe" or "Unsafe"."""
    label_perception: str
    """"Perception Level1" .. "Perception Level3"."""

    @property
    def answer(self) -> str:
        """The judge's answer code for this verdict (the single token `score` reads)."""
        return ANSWER_CODE[(self.label_perception.removeprefix("Perception "), self.label_str)]


@dataclass(frozen=True)
class TextExample:
    """One labelled (question, response) for the lite judge, from any source: MIS responses with GPT-4o's
    verdicts, or generic JSONL (`read_text_examples`)."""

    id: str
    source: str
    """Where the row comes from (a file's `source` field or its name): figures are reported per source, and
    sources are weighted against each other in training."""
    group: str
    """Rows of one group (an MIS item, a question, an MSTS case) always land on the same side of a split."""
    question: str
    response: str
    unsafe: int | None
    """1 for Unsafe, 0 for Safe; None for a row read without a label (judged, never trained on)."""
    perception: str | None = None
    """"Level1".."Level3", or None where the source has no perception label."""
    image_description: str | None = None
    """Text about the images where the source has one (the lite judge reads it, never the pixels)."""
    where: str = ""
    """file:line, for messages."""

    @property
    def label_str(self) -> str | None:
        return None if self.unsafe is None else "Unsafe" if self.unsafe else "Safe"

    @classmethod
    def from_mis(cls, example: TrainingExample, source: str = "mis") -> TextExample:
        """An MIS training example (response + GPT-4o's verdict) as a text example, grouped by its item."""
        return cls(id=f"{example.item_key}/{example.model}", source=source, group=example.item_key,
                   question=example.question, response=example.response, unsafe=int(example.label_str == "Unsafe"),
                   perception=example.label_perception.removeprefix("Perception "))
