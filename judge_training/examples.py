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
