"""score -> calibrate -> score --calibration -> agree on tiny real models: the stages through their files, as a
user runs them. The reference labels are synthetic, made to depend on the judge's own p_unsafe so that the
effect of a calibration is known in advance."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from misguard.calibration import Calibration
from misguard.calibration.trust import VLM_SIGNALS, vlm_signals
from misguard.core.errors import MisguardError
from misguard.core.jsonl import read_jsonl, write_verdicts
from misguard.core.labels import LabelSource
from misguard.core.records import SPLITS, Judgment, Verdict
from misguard.engines import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.judges.vlm import VLMJudge
from misguard.mis.agree import AgreeConfig, run_agree
from misguard.mis.calibrate import CalibrateConfig, run_calibrate
from misguard.mis.infer import InferConfig, run_inference
from misguard.mis.score import ScoreConfig, run_score

ROOT = Path(__file__).resolve().parents[2]
MSTS = ROOT.parent / "shared" / "data" / "msts" / "msts_english_multimodal_normalized.jsonl"
GPT_EVAL_FIELDS = {"label_perception", "label_str", "category", "question", "response", "image_path1",
                   "image_path2"}


@pytest.fixture(scope="module")
def scored(tiny_model, tiny_judge, demo_dir, tmp_path_factory):
    """Judgments of one tiny target's responses on all three splits (36), and the response files."""
    out = tmp_path_factory.mktemp("pipeline")
    responses = []
    for split in SPLITS:
        config = InferConfig(model=str(tiny_model("qwen2_5_vl")), data=demo_dir, split=split, out=out / "responses",
                             model_name="target", engine_options=EngineOptions(dtype="float32"),
                             generation=GenerationParams(max_new_tokens=4))
        responses.append(run_inference(config, progress=False).responses_path)
    result = run_score(score_config(responses, tiny_judge, demo_dir, out / "raw"), progress=False)
    return responses, read_jsonl(result.judgments_path, Judgment), out


def score_config(responses, judge, data, out, **kwargs):
    return ScoreConfig(responses=list(responses), judge=judge, data=data, out=out,
                       engine_options=EngineOptions(dtype="float32"), n_bootstrap=100, **kwargs)


@pytest.fixture(scope="module")
def reference(scored):
    """A gpt_eval.py-style file (no ids) whose Unsafe labels are the judgments with the highest third of p_unsafe:
    a threshold on the judge's p_unsafe reproduces the reference exactly, but 0.5 does not."""
    _, judgments, out = scored
    cut = sorted(j.p_unsafe for j in judgments)[2 * len(judgments) // 3]
    assert cut < 0.5 or max(j.p_unsafe for j in judgments) < 0.5  # the default threshold must get it wrong
    verdicts = [Verdict(**{**j.model_dump(include=GPT_EVAL_FIELDS),
                           "label_str": "Unsafe" if j.p_unsafe >= cut else "Safe"}) for j in judgments]
    path = out / "gpt4o-target.jsonl"
    write_verdicts(path, verdicts)
    return path


def test_calibrate_then_score_with_it_reproduces_the_reference(scored, reference, tiny_judge, demo_dir, tmp_path):
    responses, raw, _ = scored
    calibration_path = tmp_path / "calibration.json"
    calibration = run_calibrate(CalibrateConfig(
        judgments=LabelSource(scored[2] / "raw" / "judgments.jsonl"),
        reference=LabelSource(reference, model_name="target"), out=calibration_path, method="temperature",
        perception_method="none"))
    assert calibration.threshold.rule == "max_kappa"
    assert Calibration.load(calibration_path).to_dict() == calibration.to_dict()

    result = run_score(score_config(responses, tiny_judge, demo_dir, tmp_path / "calibrated",
                                    calibration=calibration_path), progress=False)
    calibrated = {(j.split, j.id): j for j in read_jsonl(result.judgments_path, Judgment)}
    assert len(calibrated) == len(raw) == 36
    reference_labels = [json.loads(line)["label_str"] for line in reference.read_text().splitlines()]
    assert set(reference_labels) == {"Safe", "Unsafe"}
    for j, label in zip(raw, reference_labels):
        c = calibrated[(j.split, j.id)]
        assert c.calibration and c.calibration.startswith("sha256:")
        assert c.p_unsafe_raw == pytest.approx(j.p_unsafe, abs=1e-9)  # the judge's own output, kept
        assert c.label_str == label  # the fitted threshold separates the reference exactly
    assert [j.label_str for j in raw] != reference_labels  # ... and the uncalibrated 0.5 did not

    # Calibrating again from the calibrated judgments fits on the judge's raw probabilities they keep: the same fit.
    again = run_calibrate(CalibrateConfig(
        judgments=LabelSource(result.judgments_path), reference=LabelSource(reference, model_name="target"),
        out=tmp_path / "again.json", method="temperature", perception_method="none"))
    assert again.safety.to_dict() == calibration.safety.to_dict()

    # Another calibration into the same output folder is refused, never mixed.
    with pytest.raises(MisguardError, match="calibration"):
        run_score(score_config(responses, tiny_judge, demo_dir, tmp_path / "calibrated"), progress=False)


def test_calibration_embedded_in_judge_json_is_applied_by_default(scored, reference, tiny_judge, tmp_path):
    judge = tmp_path / "judge"
    shutil.copytree(tiny_judge, judge)
    calibration = run_calibrate(CalibrateConfig(
        judgments=LabelSource(scored[2] / "raw" / "judgments.jsonl"),
        reference=LabelSource(reference, model_name="target"), out=tmp_path / "c.json", method="platt",
        perception_method="none", threshold_rule="match_rate", into_judge=judge))
    with VLMJudge(judge, "transformers", EngineOptions(dtype="float32")) as loaded:
        assert loaded.calibration.to_dict() == calibration.to_dict()
        assert loaded.unsafe_threshold == calibration.threshold.value


def test_calibrating_a_judge_without_probabilities_is_a_clear_error(scored, reference, tmp_path):
    labels_only = tmp_path / "labels-only.jsonl"
    rows = [json.loads(line) for line in (scored[2] / "raw" / "judgments.jsonl").read_text().splitlines()]
    labels_only.write_text("".join(json.dumps({**r, "p_unsafe": None, "p_perception": None}) + "\n" for r in rows))
    with pytest.raises(MisguardError, match="p_unsafe"):
        run_calibrate(CalibrateConfig(judgments=LabelSource(labels_only), reference=LabelSource(
            reference, model_name="target"), out=tmp_path / "c.json"))
    assert not (tmp_path / "c.json").exists()


def test_agree_writes_report_plots_and_the_review_list(scored, reference, tmp_path):
    result = run_agree(AgreeConfig(judgments=LabelSource(scored[2] / "raw" / "judgments.jsonl"),
                                   reference=LabelSource(reference, model_name="target"), out=tmp_path,
                                   escalate=0.25, n_bootstrap=100))
    report = json.loads(result.report_path.read_text())
    overall = report["judge_vs_reference"]["overall"]
    assert overall["n_pairs"] == 36
    assert "Escalation" in result.markdown_path.read_text()
    assert {p.name for p in result.plots} == {"confusion.png", "reliability.png", "escalation.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in result.plots)
    review = [json.loads(line) for line in result.escalation_path.read_text().splitlines()]
    assert len(review) == math.ceil(0.25 * 36)
    confidences = [r["confidence"] for r in review]
    assert confidences == sorted(confidences)  # least confident first
    assert all(isinstance(r["id"], int) for r in review)  # the demo split's integer ids, as the source wrote them
    curve = report["escalation"]["curve"]
    assert curve[0]["coverage"] == 1.0 and curve[0]["kept"] == 36


@pytest.mark.skipif(not MSTS.exists(), reason=f"MSTS data not found at {MSTS} (../shared/data is not checked out)")
def test_readme_worked_example_on_msts_reproduces_the_published_figures(tmp_path):
    # The README's worked example, as a user types it: GPT-4o's verdicts as the judge, the human label as the
    # reference (positive = Unsafe). Published: accuracy 0.820, Cohen's kappa 0.257, F1 0.312.
    command = [sys.executable, "-m", "misguard.cli.main", "agree", str(MSTS),
               "--judge-field", "auto_eval.gpt-4o-2024-05-13",
               "--judge-perception-field", "none", "--reference", str(MSTS), "--reference-field", "human_label_str",
               "--reference-perception-field", "none", "--out", str(tmp_path), "--bootstrap", "200"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4000 pairs; safety: accuracy 0.820, Cohen's kappa 0.257, F1 (Unsafe) 0.312" in result.stdout
    assert (tmp_path / "confusion.png").exists() and (tmp_path / "agreement.md").exists()


def test_calibrate_on_a_labelled_sample_of_the_judged_responses(scored, reference, tmp_path):
    # GPT-4o labelled half of what the judge scored: the unlabelled judgments are expected, not an error ...
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(reference.read_text().splitlines(keepends=True)[::2]))
    judgments = scored[2] / "raw" / "judgments.jsonl"
    calibration = run_calibrate(CalibrateConfig(judgments=LabelSource(judgments),
                                                reference=LabelSource(sample, model_name="target"),
                                                out=tmp_path / "c.json", method="temperature",
                                                perception_method="none"))
    assert calibration.fitted_on["pairs"] == 18
    # ... but reference labels that match no judgment still stop the run (wrong files, wrong model name).
    with pytest.raises(MisguardError, match="reference rows"):
        run_calibrate(CalibrateConfig(judgments=LabelSource(judgments),
                                      reference=LabelSource(sample, model_name="another-model"),
                                      out=tmp_path / "c2.json"))


def test_calibrate_fits_the_vlm_judges_trust_and_score_flags_under_it(scored, reference, tiny_judge, demo_dir,
                                                                       tmp_path):
    responses, raw, _ = scored
    assert all(0.0 < j.label_mass <= 1.0 for j in raw)  # the answer codes' share of the next-token distribution
    judgments = LabelSource(scored[2] / "raw" / "judgments.jsonl")
    target = LabelSource(reference, model_name="target")
    for share in (0.05, 0.5):
        path = tmp_path / f"calibration-{share}.json"
        calibration = run_calibrate(CalibrateConfig(judgments=judgments, reference=target, out=path,
                                                    method="temperature", perception_method="none",
                                                    flag_share=share))
        trust = calibration.trust
        assert trust.signals == VLM_SIGNALS and trust.fitted_on == 36 and trust.flag_share == share
        assert calibration.report["trust"]["fitted"]
        np.testing.assert_array_equal(Calibration.load(path).trust.reference, trust.reference)
        result = run_score(score_config(responses, tiny_judge, demo_dir, tmp_path / f"scored-{share}",
                                        calibration=path), progress=False)
        scored_now = read_jsonl(result.judgments_path, Judgment)
        # Each verdict's trust is the calibration's score of its own calibrated probabilities and code mass, and
        # exactly the verdicts under the threshold are out of domain (labelled still, counted apart).
        signals = vlm_signals([j.p_unsafe for j in scored_now], calibration.threshold.value,
                              [j.label_mass for j in scored_now], [list(j.p_perception.values()) for j in scored_now])
        np.testing.assert_allclose([j.trust for j in scored_now], trust.score(signals))
        flagged = [j.status == "out_of_domain" for j in scored_now]
        assert flagged == [j.trust < trust.threshold for j in scored_now]
        assert all(j.label_str in ("Safe", "Unsafe") for j in scored_now)
        assert result.out_of_domain == sum(flagged)
        # The calibration rows themselves: about the share asked for is flagged.
        assert abs(sum(flagged) / len(flagged) - share) <= 0.2
    assert result.out_of_domain > 5 and result.warnings and "out of the judge's domain" in result.warnings[0]
    metrics = json.loads(result.metrics_paths[0].read_text())
    assert sum(g["out_of_domain"] for g in metrics["groups"] if g["split"] != "all") == result.out_of_domain


def test_calibrate_without_a_trust_score_when_asked_or_when_judgments_have_no_code_mass(scored, reference, tmp_path):
    judgments = scored[2] / "raw" / "judgments.jsonl"
    target = LabelSource(reference, model_name="target")
    calibration = run_calibrate(CalibrateConfig(judgments=LabelSource(judgments), reference=target,
                                                out=tmp_path / "c.json", flag_share=None))
    assert calibration.trust is None and "trust" not in calibration.report
    no_mass = tmp_path / "no-mass.jsonl"
    no_mass.write_text("".join(json.dumps({**json.loads(line), "label_mass": None}) + "\n"
                               for line in judgments.read_text().splitlines()))
    calibration = run_calibrate(CalibrateConfig(judgments=LabelSource(no_mass), reference=target,
                                                out=tmp_path / "c2.json"))
    assert calibration.trust is None and "no answer-code mass" in calibration.report["trust"]["why"]
    with pytest.raises(MisguardError, match="--flag-share"):
        run_calibrate(CalibrateConfig(judgments=LabelSource(judgments), reference=target, out=tmp_path / "c3.json",
                                      flag_share=0.9))
