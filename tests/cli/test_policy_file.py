"""The policy file `misguard serve --policy` reads (guard/policy.py load_policy), as a property: whatever YAML text
it holds, loading gives a Policy or a DataError naming the file, never another exception (which `serve` would
print as a traceback)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from misguard.core.errors import DataError
from misguard.guard.policy import Policy, load_policy

yaml = pytest.importorskip("yaml")

PROPERTY = settings(max_examples=80, deadline=None, database=None)

SECTIONS = {
    "input_rail": ["enabled", "threshold", "calibration"], "output_rail": ["enabled", "threshold", "calibration"],
    "on_block": ["action", "refusal_text", "error_status", "error_message"],
    "timeouts": ["judge_s", "upstream_s"], "batching": ["max_batch_size", "max_wait_ms"],
    "limits": ["max_images", "max_image_bytes", "max_image_pixels", "max_decoded_pixels_per_request",
               "max_decoded_pixels_in_flight", "max_text_tokens", "max_request_bytes", "max_json_depth",
               "max_messages", "allowed_image_roots"],
    "audit": ["path", "redact_text", "max_bytes", "backups"],
    "server": ["limit_concurrency", "timeout_keep_alive_s", "body_read_timeout_s"],
}
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10)
           | st.sampled_from(["/", ".", "~", "refusal", "error", "closed", "open", "escalate", "block"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)
section = st.sampled_from(sorted(SECTIONS)).flatmap(lambda name: st.tuples(st.just(name), st.dictionaries(
    st.sampled_from(SECTIONS[name]) | st.text(max_size=6), values, max_size=4)))
# Policies shaped like the real thing, with any values, so that documents reach validation.
policies = st.dictionaries(st.sampled_from(sorted(SECTIONS)) | st.sampled_from(["on_failure", "on_out_of_domain"])
                           | st.text(max_size=6), values, max_size=4) | st.lists(section, max_size=4).map(dict)
# YAML that safe_dump never writes: tags, anchors and aliases, merge keys, duplicate keys, odd scalars.
FRAGMENTS = ["!!python/object/apply:os.system ['true']", "a: &x [*x]", "<<: {on_failure: open}", "- [[[[[",
             "limits: {max_images: .nan}", "timeouts: {judge_s: .inf}", "on_failure: open\non_failure: closed",
             "input_rail: !!binary aGVsbG8=", "limits:\n  allowed_image_roots: [/]", "\t", "? [a, b]\n: c",
             "%YAML 1.1\n---\n", "--- a\n--- b", "x: !!timestamp 2001-12-14", "*undefined", "'unterminated",
             "limits: {max_images: 0x7fffffffffffffffffff}", "audit: {path: \"\\0\"}"]
documents = st.one_of(policies.map(lambda data: yaml.safe_dump(data, allow_unicode=True)), st.text(max_size=80),
                      st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=20), max_size=4).map("\n".join))
files = documents.map(lambda text: text.encode("utf-8", errors="surrogateescape")) | st.binary(max_size=80)


# The examples are defects this property found in load_policy, each a traceback before it was fixed: a character
# YAML does not allow (yaml.ReaderError), a file that is not UTF-8 (UnicodeDecodeError), and a key given twice
# beside a self-referencing alias (RecursionError while the duplicate's field path was looked up).
@PROPERTY
@example(data=b"limits:\n  max_images: 2\x1f\n")
@example(data=b"\xff\xfe on_failure: open\n")
@example(data=b"a: &x [*x]\na: 1\n")
@given(data=files)
def test_any_policy_file_gives_a_policy_or_a_dataerror_naming_the_file(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        path.write_bytes(data)
        try:
            policy = load_policy(path)
        except DataError as error:
            assert error.path == str(path), error
        else:
            assert isinstance(policy, Policy)
