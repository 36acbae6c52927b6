"""Building the guard service from the command line's arguments."""
from __future__ import annotations

from pathlib import Path

from misguard.calibration import Calibration
from misguard.core.errors import MisguardError
from misguard.engines.base import EngineOptions
from misguard.guard.policy import load_policy
from misguard.guard.rails import Guard
from misguard.guard.server.service import GuardService
from misguard.judges.cascade import CascadeBand


def build_service(judge: Path, upstream: str, *, policy_path: Path | None = None,
                  calibration_path: Path | None = None, audit_log: Path | None = None,
                  engine: str = "transformers", options: EngineOptions | None = None,
                  served_model: str | None = None, upstream_api_key: str | None = None,
                  lite_judge: Path | None = None, cascade_band: str = "0.1,0.9") -> GuardService:
    """A GuardService: the policy read (and the audit path overridden), the judge loaded on its engine with
    micro-batches of the policy's size, and `lite_judge` (a lite judge folder) in front of its output rail.
    Raises DataError for a bad policy or calibration file and MisguardError for a judge that cannot be loaded
    or an upstream URL that is not http(s)."""
    if not upstream.startswith(("http://", "https://")):
        raise MisguardError(f"--upstream must be an http(s) URL ending in /v1, got {upstream!r}")
    policy = load_policy(policy_path)
    if audit_log is not None:
        policy.audit.path = audit_log
    options = options or EngineOptions()
    if options.batch_size is None:
        options.batch_size = policy.batching.max_batch_size
    calibration = None
    if calibration_path is not None:
        calibration = Calibration.load(calibration_path)
    guard = Guard(judge, policy, engine=engine, options=options, served_model=served_model, calibration=calibration,
                  lite_judge=lite_judge, cascade_band=CascadeBand.parse(cascade_band))
    return GuardService(guard, upstream, upstream_api_key=upstream_api_key)
