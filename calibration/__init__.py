"""Calibrating a local judge against GPT-4o's reference labels.

A judge reports p_unsafe (binary safety head) and p_perception (3-class perception head). Calibrators
(`calibrators`) map those to probabilities that agree with the reference labels; `scores` measures how well
they agree (ECE, Brier, log-loss); `thresholds` picks the p_unsafe cut for an Unsafe label; `artifact` bundles
all of it as one versioned JSON file. Needs numpy and scikit-learn; never imports torch.
"""
from misguard.calibration._checks import CalibrationFormatError
from misguard.calibration.artifact import (
    FORMAT,
    VERSION,
    Calibration,
    CalibrationFileError,
    encode_perception,
    encode_safety,
    fit_calibration,
)
from misguard.calibration.calibrators import (
    AUTO_METHODS,
    METHODS,
    BaseCalibrator,
    IdentityCalibration,
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    compare_methods,
    make_calibrator,
    select_method,
)
from misguard.calibration.scores import brier, calibration_report, ece, log_loss
from misguard.calibration.thresholds import (
    THRESHOLD_RULES,
    Threshold,
    fit_threshold,
    threshold_match_rate,
    threshold_max_kappa,
)

__all__ = [
    "AUTO_METHODS", "FORMAT", "METHODS", "THRESHOLD_RULES", "VERSION", "BaseCalibrator", "Calibration",
    "CalibrationFileError", "CalibrationFormatError", "IdentityCalibration", "IsotonicCalibration", "PlattScaling",
    "TemperatureScaling", "Threshold", "brier", "calibration_report", "calibrator_from_dict", "compare_methods", "ece",
    "encode_perception", "encode_safety", "fit_calibration", "fit_threshold", "log_loss", "make_calibrator",
    "select_method", "threshold_match_rate", "threshold_max_kappa",
]
