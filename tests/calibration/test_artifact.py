"""The calibration file: fitting both heads, apply, save -> load with identical predictions, and precise errors
for bad, unknown or newer files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from misguard.calibration import (
    FORMAT,
    VERSION,
    Calibration,
    CalibrationFileError,
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    Threshold,
    encode_perception,
    encode_safety,
    fit_calibration,
    log_loss,
    make_calibrator,
)
from misguard.core.errors import DataError
from tests.calibration.synthetic import power_distorted, tempered_multiclass

SAFETY = ("Safe", "Unsafe")
LEVELS = ("Perception Level1", "Perception Level2", "Perception Level3")


def reference_data(n: int = 1500, seed: int = 0):
    """Judge probabilities for both heads and string reference labels; every fifth reference is binary-only."""
    p_unsafe, safety = power_distorted(n, seed)
    p_perception, levels = tempered_multiclass(n, seed + 100, temperature=2.5)
    safety_labels = [SAFETY[label] for label in safety]
    perception_labels = [None if row % 5 == 0 else LEVELS[level] for row, level in enumerate(levels)]
    return p_unsafe, safety_labels, p_perception, perception_labels


@pytest.fixture(scope="module")
def fitted() -> Calibration:
    p_unsafe, safety, p_perception, perception = reference_data()
    return fit_calibration(p_unsafe, safety, p_perception, perception, fitted_on={"judge": "tiny-judge"})


def test_fit_calibration_fits_both_heads_and_reports_before_and_after(fitted):
    assert fitted.safety.head_ == "binary" and fitted.perception.head_ == "multiclass"
    assert fitted.fitted_on == {"n_safety": 1500, "n_perception": 1200, "judge": "tiny-judge"}
    for head in ("safety", "perception"):
        report = fitted.report[head]
        assert report["method"] in report["cv_log_loss"]
        assert report["after"]["log_loss"] < report["before"]["log_loss"]
        assert report["after"]["ece_uniform"] < report["before"]["ece_uniform"]
    assert "platt" not in fitted.report["perception"]["cv_log_loss"]
    assert fitted.report["threshold"] == fitted.threshold.to_dict()
    assert fitted.threshold.rule == "max_kappa"


def test_calibration_lowers_log_loss_on_held_out_data(fitted):
    p_unsafe, safety, p_perception, perception = reference_data(seed=1)
    calibrated_unsafe, calibrated_perception = fitted.apply(p_unsafe, p_perception)
    safety_labels = encode_safety(safety)
    assert log_loss(calibrated_unsafe, safety_labels) < log_loss(p_unsafe, safety_labels)
    levels = encode_perception(perception, allow_missing=True)
    labelled = levels >= 0
    assert log_loss(calibrated_perception[labelled], levels[labelled]) < log_loss(p_perception[labelled],
                                                                                  levels[labelled])


def test_save_load_gives_identical_predictions(fitted, tmp_path):
    path = tmp_path / "calibration.json"
    fitted.save(path)
    assert [item.name for item in tmp_path.iterdir()] == ["calibration.json"]  # no temporary file left behind
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == (FORMAT, VERSION) == ("misguard-calibration", 2)
    loaded = Calibration.load(path)
    p_unsafe, _, p_perception, _ = reference_data(seed=2)
    p_unsafe = np.concatenate([p_unsafe, [0.0, 1.0]])
    p_perception = np.vstack([p_perception, np.eye(3)[:2]])
    for expected, actual in zip(fitted.apply(p_unsafe, p_perception), loaded.apply(p_unsafe, p_perception)):
        np.testing.assert_array_equal(actual, expected)
    assert loaded.threshold == fitted.threshold
    assert loaded.fitted_on == fitted.fitted_on and loaded.report == fitted.report
    loaded.save(path)
    assert json.loads(path.read_text()) == data


@pytest.mark.parametrize("method", ["none", "temperature", "platt", "isotonic"])
def test_every_safety_method_survives_save_and_load(method, tmp_path):
    p_unsafe, safety, _, _ = reference_data(n=400)
    calibration = fit_calibration(p_unsafe, safety, method=method, threshold_rule="match_rate")
    assert calibration.perception is None and calibration.safety.method == method
    calibration.save(tmp_path / "c.json")
    loaded = Calibration.load(tmp_path / "c.json")
    probe = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_array_equal(loaded.apply(probe)[0], calibration.apply(probe)[0])
    assert loaded.threshold == calibration.threshold and loaded.threshold.rule == "match_rate"


def test_apply_without_a_perception_calibrator_passes_perception_through():
    p_unsafe, safety = power_distorted(200, seed=3)
    calibration = Calibration(safety=TemperatureScaling().fit(p_unsafe, safety))
    p_perception = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    calibrated_unsafe, perception = calibration.apply([0.1, 0.9], p_perception)
    np.testing.assert_array_equal(perception, p_perception)
    assert calibrated_unsafe.shape == (2,)
    assert calibration.apply([0.1, 0.9])[1] is None
    assert calibration.threshold == Threshold(0.5, "fixed")


def test_apply_refuses_bad_arrays(fitted):
    with pytest.raises(ValueError, match=r"p_perception has 2 rows but p_unsafe has 3"):
        fitted.apply([0.1, 0.2, 0.3], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"p_unsafe must be a 1-D array of P\(Unsafe\), got shape \(2, 2\)"):
        fitted.apply(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"p_perception must be a 2-D array .* shape \(3,\)"):
        fitted.apply([0.1, 0.2, 0.3], [0.1, 0.2, 0.7])
    with pytest.raises(ValueError, match=r"p_unsafe contains NaN"):
        fitted.apply([0.1, np.nan])
    with pytest.raises(ValueError, match=r"fitted on 3-class scores \[n, 3\] but got scores of shape \(1, 2\)"):
        fitted.apply([0.1], [[0.4, 0.6]])


def test_calibration_refuses_calibrators_of_the_wrong_head():
    p_perception, levels = tempered_multiclass(100, seed=4, temperature=1.0)
    perception = IsotonicCalibration().fit(p_perception, levels)
    with pytest.raises(ValueError, match="safety calibrator must be fitted on the binary head"):
        Calibration(safety=perception)
    p_unsafe, safety = power_distorted(100, seed=4)
    binary = PlattScaling().fit(p_unsafe, safety)
    with pytest.raises(ValueError, match="perception calibrator must be fitted on the multiclass"):
        Calibration(safety=binary, perception=binary)
    with pytest.raises(ValueError, match="not fitted yet"):
        Calibration(safety=make_calibrator("platt"))


def _edit(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    if value is KeyError:
        del data[last]
    else:
        data[last] = value


@pytest.mark.parametrize("dotted,value,field,reason", [
    ("format", "something-else", "format", "not a misguard calibration file"),
    ("version", 3, "version", "version 3 was written by a newer misguard; this one reads version 2"),
    ("version", 0, "version", "unknown version 0"),
    ("version", "1", "version", "expected an integer"),
    ("safety", KeyError, "safety", "missing"),
    ("safety.method", "beta", "safety.method", "unknown calibration method 'beta'"),
    ("safety.params.eps", -1, "safety.params.eps", "must be > 0.0"),
    ("perception.head", "binary", "perception.n_classes", "the binary head has 2 classes, got 3"),
    ("perception", "<a binary calibrator>", "perception.head", "the perception calibrator must be 'multiclass'"),
    ("perception.state.maps", [], "perception.state.maps", "list of 3 map"),
    ("threshold.rule", "youden", "threshold.rule", "unknown rule 'youden'"),
    ("threshold.value", None, "threshold.value", "finite number"),
    ("threshold.value", 2.0, "threshold.value", r"must be in \[0, 1\]"),
    ("threshold.value", -0.5, "threshold.value", r"must be in \[0, 1\]"),
    ("report", [], "report", "expected an object"),
    ("trust", {"signals": ["margin"], "reference": [[0.2], [0.1]], "threshold": 0.1, "flag_share": 0.05},
     "trust.reference", "sorted along each column"),
    ("trust", {"signals": ["margin"], "reference": [[0.1]], "flag_share": 0.05}, "trust.threshold", "missing"),
    ("extra", 1, "extra", "unknown field"),
])
def test_load_names_the_file_and_the_field_of_a_bad_file(tmp_path, dotted, value, field, reason):
    safety = TemperatureScaling().fit(*power_distorted(100, seed=5))
    perception = IsotonicCalibration().fit(*tempered_multiclass(100, seed=5, temperature=1.0))
    data = json.loads(json.dumps(Calibration(safety, perception, Threshold(0.4, "max_kappa")).to_dict()))
    if value == "<a binary calibrator>":
        value = safety.to_dict()
    Calibration.from_dict(data)  # the unedited file is valid
    _edit(data, dotted, value)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=reason) as caught:
        Calibration.load(path)
    error = caught.value
    assert isinstance(error, CalibrationFileError) and isinstance(error, DataError)
    assert error.path == str(path) and error.field == field
    assert str(error).startswith(f"{path}: field '{field}': ")


def test_load_of_invalid_json_or_a_missing_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text('{"format": "misguard-calibration",\n "version": }')
    with pytest.raises(CalibrationFileError, match=r"calibration.json:2: not valid JSON"):
        Calibration.load(path)
    with pytest.raises(CalibrationFileError, match=r"missing.json: cannot read calibration file"):
        Calibration.load(tmp_path / "missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(CalibrationFileError, match=r"field '<root>': expected a JSON object"):
        Calibration.load(path)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"version": ' + "1" * 5000 + "}"])
def test_load_of_json_python_cannot_hold_names_the_file(tmp_path, text):
    # Valid JSON syntax that json.loads still refuses (nesting past the recursion limit, an over-long integer).
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(CalibrationFileError, match=r"calibration.json: not valid JSON"):
        Calibration.load(path)


def test_encode_labels():
    np.testing.assert_array_equal(encode_safety(["Safe", "Unsafe", "Unsafe"]), [0, 1, 1])
    np.testing.assert_array_equal(encode_perception(["Level1", "Perception Level3", None], allow_missing=True),
                                  [0, 2, -1])
    with pytest.raises(ValueError, match=r"safety label at row 1 is 'unsafe'; expected one of: Safe, Unsafe"):
        encode_safety(["Safe", "unsafe"])
    with pytest.raises(ValueError, match=r"perception label at row 0 is None.*allow_missing=True"):
        encode_perception([None])
    with pytest.raises(ValueError, match=r"perception label at row 0 is 'Level4'"):
        encode_perception(["Level4"], allow_missing=True)


def test_fit_calibration_without_perception_labels_skips_the_perception_head():
    p_unsafe, safety, p_perception, _ = reference_data(n=300)
    calibration = fit_calibration(p_unsafe, safety, p_perception, [None] * 300, method="temperature")
    assert calibration.perception is None and "perception" not in calibration.report
    assert calibration.fitted_on["n_perception"] == 0


def test_fit_calibration_bad_input():
    p_unsafe, safety, p_perception, perception = reference_data(n=300)
    with pytest.raises(ValueError, match=r"y_safety has 299 labels but the scores have 300 rows"):
        fit_calibration(p_unsafe, safety[:-1])
    with pytest.raises(ValueError, match=r"y_perception has shape \(299,\) but p_perception has 300 rows"):
        fit_calibration(p_unsafe, safety, p_perception, perception[:-1])
    with pytest.raises(ValueError, match=r"unknown threshold rule 'youden'"):
        fit_calibration(p_unsafe, safety, threshold_rule="youden")
    with pytest.raises(ValueError, match=r"unknown calibration method 'beta'"):
        fit_calibration(p_unsafe, safety, method="beta")


def test_importing_calibration_never_imports_torch():
    code = "import sys, misguard.calibration; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=root, env=env, timeout=60).returncode == 0


def test_cross_validated_report_is_held_out_and_still_better_than_before():
    p_unsafe, y = power_distorted(2000, seed=3)
    report = fit_calibration(p_unsafe, y, method="isotonic").report["safety"]
    held_out, in_sample = report["after_cross_validated"], report["after"]
    assert held_out["n"] == in_sample["n"] == 2000
    assert held_out["log_loss"] < report["before"]["log_loss"]  # calibration helps on unseen rows too
    assert held_out["log_loss"] > in_sample["log_loss"]  # ... and isotonic flatters itself in sample
    rare = fit_calibration(p_unsafe[:40], np.r_[np.ones(3), np.zeros(37)].astype(int), method="temperature")
    assert rare.report["safety"]["after_cross_validated"] is None  # 3 Unsafe labels cannot fill 5 folds
