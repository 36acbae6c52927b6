"""per_file: an option given once for every file, or once per file in order."""
import pytest

from misguard.core.errors import MisguardError
from misguard.core.join import item_responses
from misguard.core.settings import per_file


def test_an_option_is_given_once_for_all_once_per_file_or_not_at_all():
    assert per_file(None, 3, "--x") == [None, None, None]
    assert per_file(["a"], 3, "--x") == ["a", "a", "a"]
    assert per_file(["a", "b", "c"], 3, "--x") == ["a", "b", "c"]
    with pytest.raises(MisguardError, match="--x is given 2 times for 3 responses files"):
        per_file(["a", "b"], 3, "--x", "responses files")


def test_model_names_for_responses_files_are_counted_before_any_file_is_read(tmp_path):
    with pytest.raises(MisguardError, match="--model-name is given 2 times for 3 responses files"):
        item_responses([tmp_path / f"{n}.jsonl" for n in range(3)], index=None, model_names=["a", "b"])
