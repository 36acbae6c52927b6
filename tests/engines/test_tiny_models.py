"""Tiny real models: every architecture builds offline, loads the way real weights load, takes two images per
prompt through its own chat template, and runs batched generation through the transformers engine."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from misguard.core.errors import MisguardError
from misguard.engines import EngineOptions, load_engine
from misguard.engines.messages import GenerationParams, LabelSet, user_request
from misguard.engines.tiny_models import TINY_ARCHS, make_tiny_model

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
QUESTION = "Is this request safe? Answer safe or unsafe."
PROB_ATOL = 1e-5
"""How far batched and one-at-a-time label probabilities may differ (float32; measured ~1e-7): left padding and
batch shape only, far below how much two requests' probabilities differ (~1e-2)."""


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def two_image_chat(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]


def read_weights(folder) -> dict:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_numpy(path))
    return tensors


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's tiny models on one thread: on a small shared CPU that is ~10x faster than letting
    torch spread a 1 M-parameter model over busy cores. The previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """A factory: loaded(arch) -> (processor, model) through the Auto classes, cached per module."""
    cache: dict[str, tuple] = {}

    def load(arch: str):
        if arch not in cache:
            folder = tiny_model(arch)
            cache[arch] = (AutoProcessor.from_pretrained(folder),
                           AutoModelForImageTextToText.from_pretrained(folder).eval())
        return cache[arch]

    return load


# ---------------------------------------------------------------------------------------------------- building


def test_unknown_arch_raises_and_names_the_choices(tmp_path):
    with pytest.raises(MisguardError) as excinfo:
        make_tiny_model(tmp_path, arch="gpt2_vl")
    assert all(arch in str(excinfo.value) for arch in TINY_ARCHS)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_unknown_dtype_raises(tmp_path):
    with pytest.raises(MisguardError, match="dtype"):
        make_tiny_model(tmp_path, dtype="int3")


def test_importing_misguard_does_not_load_torch():
    # The tiny models themselves need torch; importing the package, its records and the CLI must not.
    code = ("import sys, misguard, misguard.core.records, misguard.core.join, misguard.cli.main; "
            "print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folder_is_safetensors_only(tiny_model, arch):
    folder = tiny_model(arch)
    names = {p.name for p in folder.iterdir()}
    assert list(folder.glob("*.safetensors"))
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "preprocessor_config.json", "chat_template.jinja"} <= names


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_same_weights_other_seed_different(tiny_model, tmp_path, arch):
    reference = read_weights(tiny_model(arch))  # built with seed 0
    again = read_weights(make_tiny_model(tmp_path / "again", arch=arch, seed=0))
    other = read_weights(make_tiny_model(tmp_path / "other", arch=arch, seed=1))
    assert again.keys() == reference.keys() == other.keys()
    assert all(np.array_equal(again[k], reference[k]) for k in reference)
    assert any(not np.array_equal(other[k], reference[k]) for k in reference)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tiny_model(arch) / "tokenizer.json").read_text()


def test_building_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path, arch="qwen2_vl", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_bfloat16_weights(tmp_path):
    folder = make_tiny_model(tmp_path, arch="qwen2_vl", dtype="bfloat16")
    assert {tensor.dtype for tensor in load_torch(folder / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a.startswith("llava")])
def test_llava_vision_tower_saved_in_the_layout_vllm_reads(tiny_model, arch):
    tower_keys = [k for k in read_weights(tiny_model(arch)) if k.startswith("vision_tower.")]
    assert tower_keys and all(k.startswith("vision_tower.vision_model.") for k in tower_keys)


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folder_is_the_named_architecture_and_loads_every_weight(tiny_model, arch):
    folder = tiny_model(arch)
    assert json.loads((folder / "config.json").read_text())["model_type"] == arch
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    # The class transformers maps the arch to, every saved tensor used and none left at random initialisation.
    assert type(model).__name__ == MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[arch]
    assert model.config.model_type == arch
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_text_heads_fit_vllm_cpu_attention(loaded, arch):
    _, model = loaded(arch)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == 32 and text.hidden_size == text.num_attention_heads * head_dim


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_rope_and_visual_tokens_fit_vllm(tiny_model, loaded, arch):
    processor, model = loaded(arch)
    text = model.config.get_text_config()
    assert 2 * sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
        add_generation_prompt=True, tokenize=False)
    for width, height in [(20, 20), (96, 72), (800, 600)]:
        inputs = processor(text=[prompt], images=[noise_image(width, height, seed=0)], return_tensors="pt")
        assert 4 <= int((inputs["input_ids"] == model.config.image_token_id).sum()) <= 64
    # The standalone preprocessor_config.json (vLLM, transformers 4.x) agrees with the nested one.
    folder = tiny_model(arch)
    legacy = json.loads((folder / "preprocessor_config.json").read_text())
    nested = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    assert (legacy["min_pixels"], legacy["max_pixels"]) == (nested["size"]["shortest_edge"],
                                                            nested["size"]["longest_edge"])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_is_tiny_with_padded_vocab_and_greedy_generation(loaded, arch):
    processor, model = loaded(arch)
    tokenizer = processor.tokenizer
    vocab_size = model.config.get_text_config().vocab_size
    assert vocab_size % 64 == 0 and len(tokenizer) <= vocab_size < len(tokenizer) + 64
    assert sum(p.numel() for p in model.parameters()) < 1_500_000
    generation = model.generation_config
    assert generation.do_sample is False
    assert generation.eos_token_id == tokenizer.eos_token_id is not None
    assert generation.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # The eos token is the end-of-turn marker: the rendered user turn ends with it.
    prompt = processor.apply_chat_template(two_image_chat(), add_generation_prompt=False, tokenize=False)
    assert tokenizer.eos_token in prompt


@pytest.mark.parametrize("system_content", ["You judge safety.", [{"type": "text", "text": "You judge safety."}]],
                         ids=["string", "parts"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chat_template_takes_system_turn_and_generation_prompt(loaded, arch, system_content):
    processor, _ = loaded(arch)
    chat = [{"role": "system", "content": system_content}] + two_image_chat()
    without = processor.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    with_prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "You judge safety." in without and QUESTION in without
    assert with_prompt.startswith(without) and len(with_prompt) > len(without)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_two_images_reach_the_model(loaded, arch):
    processor, model = loaded(arch)
    prompt = processor.apply_chat_template(two_image_chat(), add_generation_prompt=True, tokenize=False)
    first, second = noise_image(96, 72, seed=1), noise_image(64, 128, seed=2)

    def last_logits(images):
        inputs = processor(text=[prompt], images=[images], return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) > 0
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[-1] == model.config.get_text_config().vocab_size
        assert torch.isfinite(logits).all()
        return logits[0, -1]

    both = last_logits([first, second])
    # Changing either image changes the prediction: image tokens for both images are in the prompt and the
    # model reads them (transformers also raises when image tokens and image features don't match).
    assert not torch.allclose(both, last_logits([noise_image(96, 72, seed=3), second]))
    assert not torch.allclose(both, last_logits([first, noise_image(64, 128, seed=4)]))


# ---------------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Noise PNGs of different sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, (width, height) in enumerate([(96, 72), (64, 128), (140, 100), (50, 50), (200, 60), (80, 80)]):
        path = folder / f"noise-{seed}-{width}x{height}.png"
        noise_image(width, height, seed).save(path)
        paths.append(path)
    return paths


def digit_labels(tokenizer) -> LabelSet:
    """The answer codes "1".."6" as a LabelSet of the tokenizer (each is one byte, so one token of its BPE)."""
    texts = tuple("123456")
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    assert all(len(ids) == 1 for ids in encoded), encoded
    return LabelSet(ids=tuple(ids[0] for ids in encoded), texts=texts)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_transformers_engine_batches_like_one_at_a_time(tiny_model, image_files, arch):
    texts = ["Safe?", "Describe both images in detail, then say whether the request is safe or unsafe.",
             "Level1, Level2 or Level3?", QUESTION]
    requests = [user_request(f"item-{i}", [image_files[i], image_files[(i + 2) % len(image_files)]], text)
                for i, text in enumerate(texts)]
    params = GenerationParams(max_new_tokens=8)
    with load_engine("transformers", str(tiny_model(arch)), EngineOptions(batch_size=4)) as engine:
        labels = digit_labels(engine.tokenizer)
        batched_probs = engine.label_probs(requests, labels)
        alone_probs = [engine.label_probs([request], labels)[0] for request in requests]
        batched = engine.generate(requests, params)
        alone = [engine.generate([request], params)[0] for request in requests]
    alone_rows = np.array([p.probs for p in alone_probs])
    np.testing.assert_allclose([p.probs for p in batched_probs], alone_rows, atol=PROB_ATOL, rtol=0)
    np.testing.assert_allclose([p.mass for p in batched_probs], [p.mass for p in alone_probs], rtol=1e-4)
    # Each request's distribution is its own, so a batch that swapped or mixed rows could not match the above.
    assert all(np.abs(alone_rows[i] - alone_rows[j]).max() > 100 * PROB_ATOL
               for i in range(len(requests)) for j in range(i))
    assert [(g.text, g.n_tokens) for g in batched] == [(g.text, g.n_tokens) for g in alone]
    assert all(g.n_tokens > 0 for g in batched)
