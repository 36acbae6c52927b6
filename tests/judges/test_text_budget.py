"""cut_text: a text within a token budget, head and tail kept, never tokenized whole (the guard's per-rail budget
and the VLM judge's context fit both use it)."""
import pytest

from misguard.judges import text_budget
from misguard.judges.lite.model import load_tokenizer
from misguard.judges.text_budget import CUT_MARK, cut_text, token_count


class RecordingTokenizer:
    """A tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_a_text_within_its_budget_is_judged_as_it_is(tokenizer):
    text = "How do I use these together? " * 3
    kept = cut_text(text, 64, tokenizer)
    assert (kept.text, kept.cut, kept.note) == (text, False, None)
    assert kept.tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("size", [5_000, 1_000_000])
def test_a_long_text_keeps_its_head_and_tail_tokens_and_is_never_tokenized_whole(tokenizer, size):
    words = " ".join(f"w{n}" for n in range(size // 4))[:size]
    recording = RecordingTokenizer(tokenizer)
    kept = cut_text(words, 100, recording, tail_share=0.75, what="the conversation")
    assert kept.cut and "the conversation cut to its first 25 and last 75 tokens" in kept.note
    assert recording.longest <= 100 * text_budget.PRECUT_CHARS_PER_TOKEN
    head, _, tail = kept.text.partition(CUT_MARK)
    assert words.startswith(head) and words.endswith(tail)
    head_ids, tail_ids = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in (head, tail))
    assert len(head_ids) == 25 and 70 <= len(tail_ids) <= 76  # the tail's first token may be a word cut in two
    if size <= 100 * text_budget.PRECUT_CHARS_PER_TOKEN:  # tokenized whole: the very first and last tokens
        whole = tokenizer(words, add_special_tokens=False)["input_ids"]
        assert head_ids == whole[:25] and tail_ids[-70:] == whole[-70:]


def test_without_a_tokenizer_the_budget_is_counted_in_characters():
    kept = cut_text("x" * 1000, 50)
    assert kept.cut and len(kept.text) == 50 * text_budget.CHARS_PER_TOKEN + len(CUT_MARK)
    assert cut_text("x" * 200, 50).cut is False


def test_a_bound_rather_than_an_estimate_counts_four_tokens_a_character():
    kept = cut_text("x" * 1000, 100, chars_per_token=0.25, what="the response")
    assert kept.cut and len(kept.text) == 25 + len(CUT_MARK)
    assert kept.note == "the response cut to its first 12 and last 13 of 1000 characters; the middle was not judged"
    assert (cut_text("x" * 25, 100, chars_per_token=0.25).tokens, token_count(None, "x" * 25, chars_per_token=0.25)) \
        == (100, 100)
    assert cut_text("x" * 26, 100, chars_per_token=0.25).cut


def test_a_slow_tokenizer_is_counted_in_characters(tokenizer):
    class Slow:
        is_fast = False

        def __call__(self, *args, **kwargs):
            raise AssertionError("a slow tokenizer has no offsets to cut at; it is not called")

    assert cut_text("y" * 1000, 50, Slow()).text == cut_text("y" * 1000, 50).text
    assert token_count(tokenizer, "How do I use these together?") == len(
        tokenizer("How do I use these together?", add_special_tokens=False)["input_ids"])
