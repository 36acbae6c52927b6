"""The guard's policy file: defaults, a full YAML round trip, errors located by file, line and field, and
relative paths resolved against the policy file's folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from misguard.core.errors import DataError
from misguard.guard.policy import DEFAULT_REFUSAL, Policy, load_policy

FULL = {
    "input_rail": {"enabled": False, "threshold": 0.25, "calibration": "/abs/input-calibration.json"},
    "output_rail": {"enabled": True, "threshold": 0.75, "calibration": None},
    "on_block": {"action": "error", "refusal_text": "No.", "error_status": 451, "error_message": "Blocked."},
    "on_failure": "open",
    "on_out_of_domain": "allow",
    "timeouts": {"judge_s": 2.5, "upstream_s": 60.0},
    "batching": {"max_batch_size": 4, "max_wait_ms": 0.0},
    "limits": {"max_images": 2, "max_image_bytes": 1000, "max_image_pixels": 640 * 480, "max_request_bytes": 5000,
               "allowed_image_roots": ["/abs/images"], "max_json_depth": 12, "max_messages": 8,
               "max_decoded_pixels_per_request": 640 * 480 * 2, "max_decoded_pixels_in_flight": 640 * 480 * 8,
               "max_text_tokens": 512},
    "audit": {"path": "/abs/audit.jsonl", "redact_text": False, "max_bytes": 4096, "backups": 2},
    "server": {"limit_concurrency": 32, "timeout_keep_alive_s": 2.0, "body_read_timeout_s": 3.0,
               "header_read_timeout_s": 4.0},
}


def write(folder: Path, text: str, name: str = "policy.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_defaults_are_both_rails_on_fail_closed_refusal():
    for policy in (Policy(), load_policy(None)):
        assert policy.input_rail.enabled and policy.output_rail.enabled
        assert policy.input_rail.threshold is None and policy.output_rail.threshold is None
        assert policy.input_rail.calibration is None and policy.output_rail.calibration is None
        assert policy.on_failure == "closed"
        assert policy.on_block.action == "refusal" and policy.on_block.refusal_text == DEFAULT_REFUSAL
        assert policy.limits.allowed_image_roots == [] and policy.audit.path is None
        assert policy.audit.redact_text, "the audit log keeps no prompt or answer text unless told to"
        assert policy.audit.max_bytes is not None and policy.audit.backups >= 1
        assert policy.server.limit_concurrency and policy.server.body_read_timeout_s


def test_empty_file_is_the_default_policy(tmp_path):
    assert load_policy(write(tmp_path, "")) == Policy()
    assert load_policy(write(tmp_path, "# only a comment\n")) == Policy()


def test_full_yaml_round_trip(tmp_path):
    policy = load_policy(write(tmp_path, yaml.safe_dump(FULL)))
    assert policy.model_dump(mode="json") == FULL
    again = load_policy(write(tmp_path, yaml.safe_dump(policy.model_dump(mode="json")), "again.yaml"))
    assert again == policy


@pytest.mark.parametrize("text, line, field", [
    ("on_failure: closed\ninput_rail:\n  enabled: true\n  treshold: 0.3\n", 4, "input_rail.treshold"),
    ("input_rail:\n  enabled: true\n\n# a comment\nmystery_section:\n  a: 1\n", 5, "mystery_section"),
    ("limits:\n  max_images: 2\n  max_image_bytes: lots\n", 3, "limits.max_image_bytes"),
    ("audit:\n  redact_text: true\ninput_rail:\n  enabled: [1, 2]\n", 4, "input_rail.enabled"),
    ("timeouts:\n  judge_s: 1\nbatching:\n  max_wait_ms: 1\n  max_batch_size: 0\n", 5, "batching.max_batch_size"),
    ("limits:\n  allowed_image_roots:\n    - images\n    - {not: a path}\n", 4, "limits.allowed_image_roots.1"),
    ("on_block:\n  action: refusal\non_failure: sometimes\n", 3, "on_failure"),
    ("on_failure: closed\non_out_of_domain: ignore\n", 2, "on_out_of_domain"),
    ("output_rail:\n  threshold: 0.5\n  enabled:\n    - yes\n", 3, "output_rail.enabled"),  # a block value
])
def test_bad_field_names_file_line_and_field(tmp_path, text, line, field):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as caught:
        load_policy(path)
    error = caught.value
    assert (error.path, error.line, error.field) == (str(path), line, field)
    assert str(error).startswith(f"{path}:{line}: field '{field}': ")


@pytest.mark.parametrize("rail", ["input_rail", "output_rail"])
def test_out_of_range_threshold_is_rejected(tmp_path, rail):
    path = write(tmp_path, f"{rail}:\n  enabled: true\n  threshold: 1.5\n")
    with pytest.raises(DataError, match="less than or equal to 1") as caught:
        load_policy(path)
    assert (caught.value.line, caught.value.field) == (3, f"{rail}.threshold")
    assert load_policy(write(tmp_path, f"{rail}:\n  threshold: 1.0\n")).model_dump()[rail]["threshold"] == 1.0


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "input_rail:\n  enabled: true\n  threshold: [0.5\noutput_rail:\n  enabled: true\n")
    with pytest.raises(DataError, match="not valid YAML") as caught:
        load_policy(path)
    assert caught.value.path == str(path) and caught.value.line is not None and caught.value.line >= 3
    assert str(caught.value).startswith(f"{path}:{caught.value.line}: ")


@pytest.mark.parametrize("text", ["- input_rail\n- output_rail\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(DataError, match="YAML mapping") as caught:
        load_policy(write(tmp_path, text))
    assert caught.value.line == 1


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read the policy file") as caught:
        load_policy(tmp_path / "nope.yaml")
    assert caught.value.path == str(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_policy_folder(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    path = write(folder, "input_rail:\n  calibration: cal/input.json\noutput_rail:\n  calibration: output.json\n"
                         "limits:\n  allowed_image_roots: [images, ../shared, /srv/abs]\n"
                         "audit:\n  path: logs/audit.jsonl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the policy's folder: relative means relative to the file, not the cwd
    policy = load_policy(Path("..") / "conf" / "policy.yaml")
    base = folder.resolve()
    assert policy.input_rail.calibration == base / "cal" / "input.json"
    assert policy.output_rail.calibration == base / "output.json"
    assert policy.limits.allowed_image_roots == [base / "images", base / ".." / "shared", Path("/srv/abs")]
    assert policy.audit.path == base / "logs" / "audit.jsonl"
    assert load_policy(path) == policy


def test_absolute_paths_are_kept(tmp_path):
    policy = load_policy(write(tmp_path, yaml.safe_dump(FULL)))
    assert policy.input_rail.calibration == Path("/abs/input-calibration.json")
    assert policy.limits.allowed_image_roots == [Path("/abs/images")]
    assert policy.audit.path == Path("/abs/audit.jsonl")


def test_readme_policy_example_is_a_valid_policy(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("A policy (every field optional", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    policy = load_policy(write(tmp_path, example))
    assert policy.limits.allowed_image_roots == [Path("/data/shared-images")]
    assert policy.audit.path == tmp_path / "audit.jsonl"
    assert policy.model_dump(exclude={"limits", "audit", "on_block"}) == Policy().model_dump(
        exclude={"limits", "audit", "on_block"}), "the README shows the defaults"


@pytest.mark.parametrize("text, line, field", [
    ("on_failure: closed\ninput_rail:\n  enabled: true\non_failure: open\n", 4, "on_failure"),
    ("input_rail:\n  threshold: 0.9\n  enabled: true\n  threshold: 0.1\n", 4, "input_rail.threshold"),
    ("limits:\n  max_images: 1\naudit:\n  path: a.jsonl\nlimits:\n  max_images: 9\n", 5, "limits"),
])
def test_a_key_given_twice_names_file_line_and_key(tmp_path, text, line, field):
    """PyYAML keeps the last of two equal keys silently: a policy saying `closed`, then `open`, would fail open."""
    path = write(tmp_path, text)
    with pytest.raises(DataError, match="given twice") as caught:
        load_policy(path)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), line, field)


def test_a_merge_key_may_be_overridden(tmp_path):
    text = "input_rail: &rail {enabled: true, threshold: 0.2}\noutput_rail:\n  <<: *rail\n  threshold: 0.7\n"
    policy = load_policy(write(tmp_path, text))
    assert policy.output_rail.threshold == 0.7 and policy.output_rail.enabled


@pytest.mark.parametrize("roots, index", [("[/]", 0), ("[/srv/images, //]", 1), ("[../../../../../../../..]", 0)])
def test_the_filesystem_root_is_no_allowed_image_root(tmp_path, roots, index):
    path = write(tmp_path, f"on_failure: closed\nlimits:\n  allowed_image_roots: {roots}\n")
    with pytest.raises(DataError, match="filesystem's root") as caught:
        load_policy(path)
    assert (caught.value.path, caught.value.line) == (str(path), 3)
    assert caught.value.field == f"limits.allowed_image_roots.{index}"


@pytest.mark.parametrize("text, field", [
    ("audit:\n  backups: 0\n", "audit.backups"),
    ("audit:\n  max_bytes: 0\n", "audit.max_bytes"),
    ("server:\n  limit_concurrency: 0\n", "server.limit_concurrency"),
    ("server:\n  body_read_timeout_s: 0\n", "server.body_read_timeout_s"),
    ("limits:\n  max_json_depth: 1\n", "limits.max_json_depth"),
    ("limits:\n  max_messages: 0\n", "limits.max_messages"),
])
def test_limits_out_of_range_name_their_field(tmp_path, text, field):
    with pytest.raises(DataError, match="greater than") as caught:
        load_policy(write(tmp_path, text))
    assert (caught.value.line, caught.value.field) == (2, field)
