"""Progress bars as a user sees them on stderr: they move as a forward batch finishes inside a chunk (results are
still saved a chunk at a time), a resumed run's bar starts at what is done, and --quiet leaves no bar at all, not
even transformers' own. tqdm draws every update when TQDM_MININTERVAL=0 and TQDM_MINITERS=1 (tqdm reads its
defaults from TQDM_* variables), so the bar's positions are read back from stderr."""
from __future__ import annotations

import json
import re

import pytest

from misguard.engines.hf import AUTO_BATCH_SIZE, WINDOW_BATCHES
from misguard.judges.lite.judge import WINDOWS_PER_PASS
from misguard.judges.protocol import DEFAULT_CHUNK
from misguard.mis.demo_data import make_demo_data
from tests.cli.test_cli import misguard

EVERY_UPDATE = {"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
CPU_BATCH = AUTO_BATCH_SIZE["cpu"]
ANY_BAR = re.compile(r"\d+/\d+ \[|\d+%\|")
"""What every tqdm bar draws: 'n/total [elapsed<left, rate]' and 'p%|'."""


def bar_positions(stderr: str, desc: str) -> list[tuple[int, int]]:
    """(n, total) of each drawing of the bar named `desc`, in order."""
    pattern = re.compile(rf"^{re.escape(desc)}:.*?(\d+)/(\d+) \[")
    return [(int(m[1]), int(m[2])) for line in re.split(r"[\r\n]", stderr) if (m := pattern.match(line))]


def steps_of(positions: list[tuple[int, int]]) -> list[int]:
    """How far the bar moved at each drawing that moved it."""
    return [b - a for (a, _), (b, _) in zip(positions, positions[1:]) if b != a]


@pytest.fixture(scope="module")
def many_items(tmp_path_factory):
    """An MIS-shaped directory with 120 items a split: more than one transformers chunk on the CPU (64)."""
    return make_demo_data(tmp_path_factory.mktemp("mis-120"), n_items=120, seed=0)


def test_infer_bar_moves_per_batch_within_a_chunk_and_a_resumed_run_starts_where_it_was(tiny_model, many_items,
                                                                                        tmp_path):
    common = ["infer", "--model", str(tiny_model("qwen2_vl")), "--data", str(many_items), "--split", "easy",
              "--out", str(tmp_path / "out"), "--model-name", "target", "--max-new-tokens", "2", "--dtype", "float32"]
    first = misguard(*common, "--limit", "40", "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    result = misguard(*common, env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "80 new responses (40 already there" in result.stdout
    positions = bar_positions(result.stderr, "target easy")
    assert positions[0] == (40, 120) and positions[-1] == (120, 120), positions
    steps = steps_of(positions)
    # One step per forward batch, never a whole chunk (CPU_BATCH * WINDOW_BATCHES = 64) at once.
    assert steps and max(steps) <= CPU_BATCH < CPU_BATCH * WINDOW_BATCHES, steps
    assert sum(steps) == 80


def test_score_rows_bar_moves_per_forward_pass_of_the_lite_judge(trusting_lite, tmp_path):
    rows = tmp_path / "rows.jsonl"
    n_rows = DEFAULT_CHUNK + 44  # more than the lite judge's chunk of 256
    rows.write_text("".join(json.dumps({"id": str(i), "question": f"How do I use item {i}?",
                                        "response": "I can't help with that. " * (1 + i % 4)}) + "\n"
                            for i in range(n_rows)))
    result = misguard("score", "--rows", str(rows), "--judge", str(trusting_lite), "--out", str(tmp_path / "out"),
                      env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr[-3000:]
    positions = bar_positions(result.stderr, "score")
    assert positions[0] == (0, n_rows) and positions[-1] == (n_rows, n_rows), positions
    steps = steps_of(positions)
    # A step per forward pass (at most WINDOWS_PER_PASS windows, an item's windows in one pass): inside the
    # first chunk the bar is drawn at many places, not only when the chunk's judgments are saved.
    assert max(steps) <= WINDOWS_PER_PASS and sum(steps) == n_rows, steps
    assert len({n for n, _ in positions if 0 < n < DEFAULT_CHUNK}) >= DEFAULT_CHUNK // WINDOWS_PER_PASS - 1


SURE_UNSAFE = "Sure, here is how to do it step by step: first mix the powders."
"""The session's lite judge is sure this is Unsafe (p_unsafe > 0.9): it decides it alone."""
UNSURE = "Sure, step by step."
"""The session's lite judge is unsure of this one (0.1 < p_unsafe < 0.9): it goes to the VLM judge."""


def responses_file(data, path, n: int):
    """`n` responses to the first items of the easy split, as `misguard infer` writes them: every other one for the
    lite judge to decide, the others for the VLM judge."""
    items = json.loads((data / "mis_easy.json").read_text())[:n]
    path.write_text("".join(json.dumps({**item, "response": (SURE_UNSAFE, UNSURE)[i % 2], "model": "m"}) + "\n"
                            for i, item in enumerate(items)))
    return path


def test_cascade_bar_counts_each_judgment_once_and_moves_within_the_chunk(tiny_judge, trusting_lite, many_items,
                                                                         tmp_path):
    responses = responses_file(many_items, tmp_path / "m.jsonl", 40)
    result = misguard("score", str(responses), "--judge", str(tiny_judge), "--lite-judge", str(trusting_lite),
                      "--data", str(many_items), "--out", str(tmp_path / "out"), "--dtype", "float32",
                      "--bootstrap", "0", env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr[-3000:]
    positions = bar_positions(result.stderr, "score")
    assert positions[0] == (0, 40) and positions[-1] == (40, 40), positions
    assert all(n <= 40 for n, _ in positions)  # no case counted twice (the lite judge's and the VLM judge's)
    stages = re.search(r"(\d+) decided by the lite judge .*?(\d+) escalated", result.stdout)
    decided, escalated = int(stages[1]), int(stages[2])
    assert decided > 0 and escalated > 0, result.stdout  # both stages had work
    steps = steps_of(positions)
    # The 40 fit one chunk: the lite judge's decisions move the bar at once, the escalated cases batch by batch.
    assert steps[0] == decided and max(steps[1:]) <= CPU_BATCH and sum(steps) == 40, steps


def test_quiet_leaves_stderr_free_of_every_progress_bar(tiny_model, tiny_judge, trusting_lite, many_items, tmp_path):
    infer = misguard("infer", "--model", str(tiny_model("qwen2_vl")), "--data", str(many_items), "--split", "easy",
                     "--out", str(tmp_path / "runs"), "--model-name", "target", "--limit", "4", "--max-new-tokens", "2",
                     "--dtype", "float32", "--quiet")
    assert infer.returncode == 0, infer.stderr[-3000:]
    responses = tmp_path / "runs" / "easy" / "target.jsonl"
    score = misguard("score", str(responses), "--judge", str(tiny_judge), "--lite-judge", str(trusting_lite),
                     "--data", str(many_items), "--out", str(tmp_path / "scores"), "--dtype", "float32",
                     "--bootstrap", "0", "--quiet")
    assert score.returncode == 0, score.stderr[-3000:]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": str(i), "question": f"Question {i}?", "response": answer,
                                        "label": label, "group": str(i // 2)}) + "\n"
                            for i, (answer, label) in enumerate([("I can't help with that.", "Safe"),
                                                                 ("Sure: first mix the powders.", "Unsafe")] * 24)))
    train = misguard("train", "--kind", "lite", "--data", str(rows), "--label-field", "label", "--group-field",
                     "group", "--image-description-field", "none", "--out", str(tmp_path / "lite"), "--epochs", "1",
                     "--quiet")
    assert train.returncode == 0, train.stderr[-3000:]
    for command in (infer, score, train):
        assert not ANY_BAR.search(command.stderr), command.stderr[-3000:]
        assert "Loading weights" not in command.stderr  # transformers' own bar, as it loads a model
