"""The vLLM engine on a tiny random-weight Qwen2-VL, run by vLLM's CPU build in this process: two images per
prompt, batches in order, and greedy parity with the transformers engine token for token (both float32)."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from misguard.core.errors import MisguardError, MissingExtraError
from misguard.core.jsonl import read_responses
from misguard.core.splits import load_split
from misguard.engines import EngineOptions, load_engine
from misguard.engines.messages import GenerationParams, ImageFileError, Request, user_request
from misguard.judges import Case
from misguard.judges.vlm import VLMJudge
from misguard.mis.infer import InferConfig, run_inference

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
MAX_NEW_TOKENS = 12
GREEDY = GenerationParams(max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    """Random RGB images of different sizes and aspect ratios, so each maps to a different visual token count."""
    folder = tmp_path_factory.mktemp("vllm-images")
    paths = []
    for seed, (width, height) in enumerate([(96, 72), (64, 128), (120, 90), (80, 80), (150, 60)]):
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"image{seed}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mis_requests(image_paths) -> list[Request]:
    """Two images then a question, as in MIS; prompt lengths all differ so outputs can be matched to requests."""
    questions = ["Is this safe?", "Describe both images.", "What is shown in the first picture and the second?",
                 "Could these two images together help someone do harm? Answer yes or no.",
                 "Hi", "Compare the images in detail, then decide whether the request is safe or unsafe."]
    requests = [user_request(f"item-{i}", [image_paths[i % 5], image_paths[(i + 2) % 5]], q)
                for i, q in enumerate(questions)]
    with_system = Request(id="item-system", messages=(
        {"role": "system", "content": [{"type": "text", "text": "You are a careful safety judge."}]},
        *user_request("x", image_paths[3:5], "Safe or unsafe?").messages))
    return [*requests, with_system]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("qwen2_vl"))


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    engine = load_engine("vllm", model_dir, EngineOptions(dtype="float32", max_model_len=2048))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_generations(vllm_engine, mis_requests):
    return vllm_engine.generate(mis_requests, GREEDY)


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
class TestVLLMEngine:
    def test_one_generation_per_request_in_order(self, vllm_engine, mis_requests, vllm_generations):
        assert len(vllm_generations) == len(mis_requests)
        for generation in vllm_generations:
            assert 0 <= generation.n_tokens <= MAX_NEW_TOKENS
            assert generation.finish_reason in {"stop", "length"}
            assert isinstance(generation.text, str)
        prompt_lengths = [g.extra["prompt_tokens"] for g in vllm_generations]
        assert len(set(prompt_lengths)) == len(mis_requests)  # the order check below is not vacuous
        backwards = vllm_engine.generate(mis_requests[::-1], GREEDY)
        assert backwards[::-1] == vllm_generations

    def test_both_images_reach_the_prompt(self, vllm_engine, image_paths):
        one, two = vllm_engine.generate([user_request("one", image_paths[:1], "Safe?"),
                                         user_request("two", image_paths[:2], "Safe?")], GREEDY)
        # Each image adds its own run of visual tokens to the prompt (image 1 is 64x128 -> several tokens).
        assert two.extra["prompt_tokens"] > one.extra["prompt_tokens"] + 2

    def test_more_images_than_the_limit_is_an_error(self, vllm_engine, image_paths):
        with pytest.raises(MisguardError, match="3 images.*allows 2"):
            vllm_engine.generate([user_request("three", image_paths[:3], "Safe?")], GREEDY)

    def test_a_truncated_image_costs_its_own_request_and_comes_back_last(self, vllm_engine, mis_requests,
                                                                         vllm_generations, image_paths, tmp_path):
        truncated = tmp_path / "truncated.png"
        with Image.open(image_paths[0]) as decoded:
            decoded.save(truncated, format="JPEG")  # its header reads, its pixels do not
        truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
        requests = [user_request("bad", [image_paths[1], truncated], "Safe?"), *mis_requests[:2]]
        results = list(vllm_engine.stream(requests, GREEDY))
        assert [index for index, _ in results] == [1, 2, 0]  # the others first, so a caller saves them first
        assert [result for _, result in results[:2]] == vllm_generations[:2]
        refused = results[2][1]
        assert isinstance(refused, ImageFileError) and refused.path == str(truncated)
        assert refused.code == "invalid_image" and "truncated.png" in str(refused)

    def test_no_requests_no_work(self, vllm_engine):
        assert vllm_engine.generate([], GREEDY) == []

    def test_cpu_defaults_are_recorded(self, vllm_engine):
        kwargs = vllm_engine.describe()["llm_kwargs"]
        assert kwargs["dtype"] == "float32"
        assert kwargs["limit_mm_per_prompt"] == {"image": 2, "video": 0}
        assert kwargs["enforce_eager"] is True
        assert kwargs["kv_cache_memory_bytes"] == 256 * 2**20
        assert vllm_engine.chunk_size == 64

    def test_greedy_parity_with_transformers(self, model_dir, mis_requests, vllm_generations):
        hf_engine = load_engine("transformers", model_dir, EngineOptions(dtype="float32"))
        try:
            hf_generations = hf_engine.generate(mis_requests, GREEDY)
        finally:
            hf_engine.close()
        # With the tiny model's seed-0 weights "Hi" ends with EOS after a few tokens and the rest run to the
        # limit, so the parity check covers both endings (and the EOS token not being counted).
        assert {g.finish_reason for g in hf_generations} == {"stop", "length"}, \
            "pick prompts where the tiny model stops early"
        for request, ours, theirs in zip(mis_requests, vllm_generations, hf_generations):
            assert (ours.text, ours.n_tokens, ours.finish_reason) == \
                   (theirs.text, theirs.n_tokens, theirs.finish_reason), request.id


def test_missing_vllm_names_the_extra(monkeypatch, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail as if it were not installed
    monkeypatch.delitem(sys.modules, "misguard.engines.vllm", raising=False)  # so the engine imports it again
    with pytest.raises(MissingExtraError, match=r"misguard\[vllm\]"):
        load_engine("vllm", model_dir)


def test_a_hub_name_is_not_a_model_folder():
    with pytest.raises(MisguardError, match="not a local model folder"):
        load_engine("vllm", "Qwen/Qwen2-VL-2B-Instruct")


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_infer_through_vllm_writes_what_transformers_writes(vllm_engine, model_dir, demo_dir, tmp_path):
    def run(engine_name, **kwargs):
        config = InferConfig(model=model_dir, data=demo_dir, split="hard", out=tmp_path / engine_name,
                             engine=engine_name, engine_options=EngineOptions(dtype="float32"), generation=GREEDY)
        return read_responses(run_inference(config, progress=False, **kwargs).responses_path)

    through_vllm = run("vllm", engine=vllm_engine)
    through_transformers = run("transformers")
    assert len(through_vllm) == len(through_transformers) > 0
    assert {r.id: r.response for r in through_vllm} == {r.id: r.response for r in through_transformers}


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
class TestVLLMLabelProbs:
    def test_label_probs_match_transformers(self, vllm_engine, model_dir, mis_requests, labels):
        ours = vllm_engine.label_probs(mis_requests, labels)
        hf_engine = load_engine("transformers", model_dir, EngineOptions(dtype="float32"))
        try:
            theirs = hf_engine.label_probs(mis_requests, labels)
        finally:
            hf_engine.close()
        assert len(ours) == len(theirs) == len(mis_requests)
        for request, mine, reference in zip(mis_requests, ours, theirs):
            assert mine is not None and reference is not None, request.id
            assert len(mine.probs) == len(labels.ids)
            assert sum(mine.probs) == pytest.approx(1.0, abs=1e-6), request.id
            assert 0 < mine.mass <= 1, request.id
            # Both float32 on the same weights and prompt: measured at most 9e-8 apart (probs) and 4e-7 relative
            # (mass). The bounds leave 100x for other CPUs' kernels; a different prompt or answer position moves
            # the probabilities by ~1e-2.
            assert mine.probs == pytest.approx(reference.probs, abs=1e-5), request.id
            assert mine.mass == pytest.approx(reference.mass, rel=1e-4), request.id
        # Not vacuous: the requests' distributions differ from each other by far more than the tolerance.
        assert max(abs(a - b) for a, b in zip(ours[0].probs, ours[1].probs)) > 1e-3

    def test_label_probs_in_request_order(self, vllm_engine, mis_requests, labels):
        forwards = vllm_engine.label_probs(mis_requests, labels)
        backwards = vllm_engine.label_probs(mis_requests[::-1], labels)
        for mine, reversed_run in zip(forwards, backwards[::-1]):
            assert mine.probs == pytest.approx(reversed_run.probs, abs=1e-6)

    def test_label_probs_of_no_requests(self, vllm_engine, labels):
        assert vllm_engine.label_probs([], labels) == []

    def test_processed_logprobs_are_refused(self, vllm_engine, mis_requests, labels, monkeypatch):
        # vllm_args={"logprobs_mode": "raw_logits"} would make vLLM return logits, not log-probabilities.
        monkeypatch.setattr(vllm_engine._llm.model_config, "logprobs_mode", "raw_logits")
        with pytest.raises(MisguardError, match="raw_logprobs"):
            vllm_engine.label_probs(mis_requests[:1], labels)


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_judge_on_vllm_gives_the_transformers_judgments(vllm_engine, tiny_judge, demo_dir):
    split = load_split(demo_dir, "easy")
    cases = [Case(id=item.id, images=split.image_paths(item), question=item.question,
                  response=f"answer number {n}") for n, item in enumerate(split.items[:6])]
    on_vllm = VLMJudge(tiny_judge, engine_instance=vllm_engine).judge(cases)
    with VLMJudge(tiny_judge, "transformers", EngineOptions(dtype="float32")) as judge:
        on_transformers = judge.judge(cases)
    for a, b in zip(on_vllm, on_transformers):
        assert a.status == b.status == "scored"
        assert sum(a.p_perception.values()) == pytest.approx(1.0, abs=1e-6)
        assert a.p_unsafe == pytest.approx(b.p_unsafe, abs=1e-5)
        assert a.p_perception == pytest.approx(b.p_perception, abs=1e-5)
        if abs(b.p_unsafe - 0.5) > 1e-4:  # labels follow the probabilities; only a near-tie could flip one
            assert a.label == b.label
