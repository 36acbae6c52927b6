"""mis.demo.demo_band: the cascade band the demo chooses leaves about the asked share to the VLM judge."""
from __future__ import annotations

import random

import pytest

from misguard.core.records import Judgment
from misguard.judges.cascade import CascadeBand
from misguard.judges.protocol import Assessment
from misguard.mis.demo import demo_band


def judgment(n: int, p_unsafe: float, level1: float, status: str = "scored") -> Judgment:
    rest = (1 - level1) / 2
    return Judgment(label_perception=None, label_str=None, category="Hate", question="q", response="r",
                    image_path1="a.png", image_path2="b.png", id=str(n), split="easy", sub_category="s", model="m",
                    p_unsafe=p_unsafe, p_perception={"Level1": level1, "Level2": rest, "Level3": rest},
                    judge="lite", template="", status=status)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_the_chosen_band_escalates_about_the_share(share):
    rng = random.Random(0)
    rows = [judgment(n, rng.random(), rng.uniform(0.5, 1.0)) for n in range(200)]
    band = CascadeBand.parse(demo_band(rows, escalate=share))
    assert band.low == pytest.approx(1 - band.high)
    escalated = sum(not band.confident(Assessment(judge="lite", template="", status="scored", p_unsafe=row.p_unsafe,
                                                  p_perception=row.p_perception),
                                       needs_perception=True) for row in rows)
    assert abs(escalated / len(rows) - share) <= 0.02


def test_rows_that_are_not_scored_do_not_move_the_band():
    rows = [judgment(n, 0.99, 0.99) for n in range(10)] + [judgment(10, 0.5, 0.4, status="out_of_domain")]
    assert demo_band(rows, escalate=0.25) == demo_band(rows[:10], escalate=0.25)
