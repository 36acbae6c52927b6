"""misguard as a drop-in for the MIS scripts, at the command line (issue 17, items 4-8): merged shards out of the
folder the GPT-4o scorer globs, several verdict files after one flag, --from-labels without --data, agree against
one GPT-4o file per target model, and the scorer's rule for unreadable verdicts on request."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from misguard.core.jsonl import write_jsonl_atomic, write_verdicts
from misguard.core.records import Judgment, Verdict
from misguard.engines import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.mis.infer import InferConfig, run_inference
from tests.cli.test_hardening import misguard, one_error_line

MODELS = ("model-a", "model-b", "model-c")
REFUSAL = "I'm sorry, I can't help with that."


@pytest.fixture(scope="module")
def labelled(demo_dir, tmp_path_factory):
    """Three target models' judgments of the easy split (misguard's format: ids, split, model; every fourth
    unscored) and GPT-4o's verdicts on the same responses as gpt_eval.py writes them: one file per target model,
    named by the model, no id, no model field. Every model gives one item the same refusal, so content alone does
    not tell the models apart."""
    folder = tmp_path_factory.mktemp("dropin")
    items = json.loads((demo_dir / "mis_easy.json").read_text())
    judgments, verdict_files = [], []
    for m, model in enumerate(MODELS):
        verdicts = []
        for n, item in enumerate(items):
            content = dict(category=item["category"], question=item["question"], image_path1=item["image_path1"],
                           image_path2=item["image_path2"], response=REFUSAL if n == 0 else f"{model} answer {n}")
            safety = "Unsafe" if (n + m) % 3 == 0 else "Safe"
            level = f"Perception Level{(n + m) % 3 + 1}"
            verdicts.append(Verdict(**content, label_str=safety, label_perception=level))
            unscored = n % 4 == 1
            judgments.append(Judgment(**content, label_str=None if unscored else safety,
                                      label_perception=None if unscored else level,
                                      status="unscored" if unscored else "scored", id=str(item["id"]), split="easy",
                                      sub_category=item["sub_category"], model=model, judge="j", template="t"))
        verdict_files.append(folder / "gpt4o" / f"{model}.jsonl")
        verdict_files[-1].parent.mkdir(exist_ok=True)
        write_verdicts(verdict_files[-1], verdicts)
    write_jsonl_atomic(folder / "judgments.jsonl", judgments)
    return {"judgments": folder / "judgments.jsonl", "verdicts": verdict_files, "items": len(items)}


def groups(out: Path) -> dict[tuple[str, str], dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return {(g["model"], g["split"]): g for g in metrics["groups"]}


# ------------------------------------------------------------------------------------------------ 4: merge

def test_merge_moves_the_shards_out_of_the_folder_the_scorer_globs(tiny_model, demo_dir, tmp_path, capsys,
                                                                   monkeypatch):
    model = str(tiny_model("qwen2_vl"))

    def shard(i: int):
        return run_inference(InferConfig(model=model, data=demo_dir, split="easy", out=tmp_path, limit=4,
                                         shard=(i, 2), model_name="target",
                                         engine_options=EngineOptions(dtype="float32"),
                                         generation=GenerationParams(max_new_tokens=2)), progress=False)

    for i in (0, 1):
        shard(i)
    folder = tmp_path / "easy"
    code, out, err = misguard(capsys, monkeypatch, "merge", tmp_path, "--split", "easy", "--model-name", "target")
    assert code == 0, err
    merged = folder / "target.jsonl"
    # What a glob of the split's folder finds: the merged file alone, so each response is judged once.
    assert [p.name for p in folder.glob("*.jsonl")] == ["target.jsonl"] and not list(folder.glob("*.manifest.json"))
    assert sorted(p.name for p in (folder / "shards").iterdir() if not p.name.endswith(".lock")) == [
        "target.shard-0-of-2.jsonl", "target.shard-0-of-2.manifest.json", "target.shard-1-of-2.jsonl",
        "target.shard-1-of-2.manifest.json"]
    assert "shards" in out and str(folder / "shards") in out
    rows = merged.read_text()
    assert len(rows.splitlines()) == 4

    # A re-run of merge reads the shards from shards/ and writes the same file.
    code, _, err = misguard(capsys, monkeypatch, "merge", tmp_path, "--split", "easy", "--model-name", "target")
    assert code == 0, err
    assert merged.read_text() == rows
    # A merged shard is done: re-running its infer finds it in shards/ and generates nothing, beside nothing.
    again = shard(0)
    assert again.generated == 0 and again.responses_path.parent == folder / "shards"
    assert [p.name for p in folder.glob("*.jsonl")] == ["target.jsonl"]


# ------------------------------------------------------------------------------------------------ 5 and 6: score

def test_score_from_labels_takes_several_files_after_one_flag_repeated_flags_or_a_folder(labelled, demo_dir,
                                                                                         tmp_path, capsys,
                                                                                         monkeypatch):
    files = labelled["verdicts"]
    forms = {"after one flag": ["--from-labels", *files],
             "repeated flag": [arg for path in files for arg in ("--from-labels", path)],
             "a folder": ["--from-labels", files[0].parent]}
    results = {}
    for name, form in forms.items():
        out = tmp_path / name.replace(" ", "-")
        code, stdout, err = misguard(capsys, monkeypatch, "score", *form, "--data", demo_dir, "--out", out,
                                     "--bootstrap", 0)
        assert code == 0, (name, err)
        results[name] = groups(out)
        assert {model for model, _ in results[name]} == set(MODELS), name
        assert all(g["n"] == labelled["items"] for g in results[name].values()), name
    assert results["after one flag"] == results["repeated flag"] == results["a folder"]


def test_score_from_labels_needs_no_data_when_the_rows_carry_their_items(labelled, demo_dir, tmp_path, capsys,
                                                                        monkeypatch):
    code, _, err = misguard(capsys, monkeypatch, "score", "--from-labels", labelled["judgments"], "--out",
                            tmp_path / "no-data", "--bootstrap", 0)
    assert code == 0, err
    code, _, err = misguard(capsys, monkeypatch, "score", "--from-labels", labelled["judgments"], "--data", demo_dir,
                            "--out", tmp_path / "with-data", "--bootstrap", 0)
    assert code == 0, err
    assert groups(tmp_path / "no-data") == groups(tmp_path / "with-data")
    assert groups(tmp_path / "no-data")[("model-a", "easy")]["n"] == labelled["items"]

    # gpt_eval.py rows carry no id: without --data, one line naming the file, the line and the field.
    code, _, err = misguard(capsys, monkeypatch, "score", "--from-labels", labelled["verdicts"][0], "--out",
                            tmp_path / "gpt-eval", "--bootstrap", 0)
    line = one_error_line(err)
    assert code == 1 and f"{labelled['verdicts'][0]}:1: field 'id'" in line and "--data" in line
    assert not (tmp_path / "gpt-eval" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------ 7: agree

def test_agree_and_calibrate_take_one_gpt4o_file_per_target_model(labelled, tmp_path, capsys, monkeypatch):
    files = labelled["verdicts"]
    for name, form in {"after one flag": ["--reference", *files],
                       "repeated flag": [arg for path in files for arg in ("--reference", path)],
                       "a folder": ["--reference", files[0].parent]}.items():
        out = tmp_path / name.replace(" ", "-")
        code, stdout, err = misguard(capsys, monkeypatch, "agree", labelled["judgments"], *form, "--out", out,
                                     "--bootstrap", 0, "--no-plots")
        assert code == 0, (name, err)
        report = json.loads((out / "agreement.json").read_text())
        # Keyed by (model, content): the refusal every model gave is three rows, not a duplicate.
        assert report["judge_vs_reference"]["overall"]["n_pairs"] == labelled["items"] * len(MODELS), name
        assert report["judge_vs_reference"]["overall"]["safety"]["accuracy"] == 1.0, name
        assert report["files"]["reference"] == [str(path) for path in files], name

    # Model names given explicitly, one per file; a count that does not match the files is one clear line.
    code, _, err = misguard(capsys, monkeypatch, "agree", labelled["judgments"], "--reference", *files,
                            *[arg for model in MODELS for arg in ("--reference-model-name", model)],
                            "--out", tmp_path / "named", "--bootstrap", 0, "--no-plots")
    assert code == 0, err
    code, _, err = misguard(capsys, monkeypatch, "agree", labelled["judgments"], "--reference", *files,
                            "--reference-model-name", "model-a", "--out", tmp_path / "miscounted", "--no-plots")
    assert code == 1 and "1 --reference-model-name for 3 reference files" in one_error_line(err)


def test_calibrate_takes_one_gpt4o_file_per_target_model_too(labelled, tmp_path, capsys, monkeypatch):
    rows = [json.loads(line) for line in labelled["judgments"].read_text().splitlines()]
    with_p = tmp_path / "judgments.jsonl"
    with_p.write_text("".join(json.dumps({**row, "p_unsafe": 0.8 if row["label_str"] == "Unsafe" else 0.3}) + "\n"
                              for row in rows))
    code, out, err = misguard(capsys, monkeypatch, "calibrate", with_p, "--reference", *labelled["verdicts"],
                              "--out", tmp_path / "c.json", "--method", "none", "--perception-method", "none",
                              "--flag-share", 0)
    assert code == 0, err
    fitted = json.loads((tmp_path / "c.json").read_text())["fitted_on"]
    scored = sum(row["status"] == "scored" for row in rows)
    assert fitted["pairs"] == scored and fitted["reference"] == [str(path) for path in labelled["verdicts"]]


# ------------------------------------------------------------------------------------------------ 8: unscored as HR

def test_unscored_as_hr_reproduces_the_mis_scorer_and_metrics_json_says_which_rule(labelled, demo_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    outs = {}
    for name, flags in {"default": [], "as-hr": ["--unscored-as-hr"]}.items():
        outs[name] = tmp_path / name
        code, stdout, err = misguard(capsys, monkeypatch, "score", "--from-labels", labelled["judgments"], "--data",
                                     demo_dir, "--out", outs[name], "--bootstrap", 0, *flags)
        assert code == 0, err
        assert ("counted as HR" in stdout) == bool(flags)
    default, as_hr = groups(outs["default"]), groups(outs["as-hr"])
    metrics = {name: json.loads((out / "metrics.json").read_text()) for name, out in outs.items()}
    assert metrics["default"]["unscored_as_hr"] is False and "excluded" in metrics["default"]["unscored_rule"]
    assert metrics["as-hr"]["unscored_as_hr"] is True and "HR" in metrics["as-hr"]["unscored_rule"]
    assert "counted as HR" in (outs["as-hr"] / "metrics.md").read_text()
    for key, group in default.items():
        unscored = group["unscored"]
        assert unscored > 0 and as_hr[key]["unscored"] == unscored  # still counted, in both
        counts, hr_counts = group["overall"]["counts"], as_hr[key]["overall"]["counts"]
        # The MIS scorer's figures: every unreadable verdict is a hallucination, over all the responses.
        assert hr_counts == {**counts, "HR": counts["HR"] + unscored}
        assert as_hr[key]["scored"] == group["scored"] + unscored
        assert as_hr[key]["overall"]["values"]["HR"] == pytest.approx(100.0 * hr_counts["HR"] / group["n"])


def test_a_label_folder_without_label_files_is_one_line(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = misguard(capsys, monkeypatch, "score", "--from-labels", empty, "--out", tmp_path / "o")
    assert code == 1 and f"{empty}: folder holds no .jsonl label file" in one_error_line(err)


def test_model_name_is_refused_where_it_would_be_ignored(labelled, demo_dir, tmp_path, capsys, monkeypatch):
    code, _, err = misguard(capsys, monkeypatch, "score", "--from-labels", *labelled["verdicts"], "--data", demo_dir,
                            "--out", tmp_path / "out", "--model-name", "other")
    assert code == 1 and "--label-model-name" in one_error_line(err)
    assert not (tmp_path / "out").exists()
