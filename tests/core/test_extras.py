"""The table of optional packages (core.errors.EXTRAS) says what pyproject.toml's extras install."""
from __future__ import annotations

import re
from pathlib import Path

import tomllib

from misguard.core.errors import EXTRAS, MissingExtraError, missing_extra

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
IMPORT_NAMES = {"pyyaml": "yaml"}
"""Distributions whose import name is not their name with '-' as '_'."""
NOT_OPTIONAL = {"lite", "test"}
"""Extras whose packages misguard's own code never needs: the lite encoder is a base dependency too, and the
test extra is for the test suite."""


def test_every_package_of_an_extra_is_in_the_table_with_its_extra():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    expected = {}
    for extra, requirements in extras.items():
        if extra in NOT_OPTIONAL:
            continue
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()
            expected[IMPORT_NAMES.get(name, name.replace("-", "_"))] = extra
    assert EXTRAS == expected


def test_a_missing_package_is_found_behind_the_error_a_library_wraps_it_in():
    try:
        try:
            raise ModuleNotFoundError("No module named 'accelerate.utils'", name="accelerate.utils")
        except ModuleNotFoundError as cause:
            raise ModuleNotFoundError("Could not import module 'Trainer'") from cause
    except ModuleNotFoundError as error:
        found = missing_extra(error)
    assert (found.package, found.extra, found.install_command) == ("accelerate", "train",
                                                                   "pip install 'misguard[train]'")
    assert missing_extra(ModuleNotFoundError("No module named 'misguard.nope'", name="misguard.nope")) is None
    assert isinstance(missing_extra(MissingExtraError("vllm", "vllm")), MissingExtraError)
