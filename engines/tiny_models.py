"""Tiny random-weight VLMs of real transformers architectures, built offline in seconds.

Tests (and anyone without real weights) use these folders instead of mocks. Each one is a genuine
`save_pretrained` checkpoint of a real architecture: safetensors weights, a byte-level BPE tokenizer of the
family's tokenizer class with the family's special tokens, its image (and video) processor, its processor and
a chat template in the family's own format. So loading, chat templates, batching and logits go through the code
real weights take: `AutoProcessor.from_pretrained(dir)`, `AutoModelForImageTextToText.from_pretrained(dir)`,
and vLLM.

Every model has under 1 M parameters: a 2-layer text model (hidden 128, 4 query heads of 32, 2 KV heads; 32 is
the smallest head size vLLM's CPU attention takes) behind a 2-layer, 64-wide vision tower that sees 56-112 px
tiles, giving 4-80 visual tokens per image. Weights are random, so generated text is noise; the models exist
to exercise the machinery, deterministically by seed.

Every family on the wish list builds with transformers 5.19 offline. Left out on purpose: the original
InternVL format (`InternVLChatModel`), which exists only as remote code (`trust_remote_code`) and cannot be
built from transformers alone; `internvl` here is the transformers-native format.
"""
from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from misguard.core.errors import MisguardError

# ---------------------------------------------------------------------------------------------------------------
# Sizes shared by every family

TEXT_SIZES: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 32: the smallest head size vLLM's CPU attention supports
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
VISION_SIZES: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
}
PATCH = 14
BPE_VOCAB_SIZE = 1000
"""Tokens the shared BPE learns (256 byte symbols + merges); each family's special tokens follow them."""
VOCAB_MULTIPLE = 64
"""The embedding matrix is padded to a multiple of this, as real checkpoints pad theirs."""
DTYPES = ("float32", "bfloat16", "float16")

# Qwen2-VL's pixel bounds: one visual token is a 2x2 merge of 14-px patches, so 4..64 tokens per image.
QWEN_MIN_PIXELS = (2 * PATCH) ** 2 * 4
QWEN_MAX_PIXELS = (2 * PATCH) ** 2 * 64

# ---------------------------------------------------------------------------------------------------------------
# Chat templates: each family's real format. All take string content or a list of image/text parts, several
# images in one user turn, a system turn, and add_generation_prompt.

QWEN2_VL_TEMPLATE = (  # Qwen2-VL's and Qwen2.5-VL's template, verbatim
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IDEFICS3_TEMPLATE = (  # Idefics3-8B-Llama3's "User:<image>text<end_of_utterance>\nAssistant:"
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

LLAVA_ONEVISION_TEMPLATE = (  # llava-onevision-qwen2: a turn's images, then its videos, then its text
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAVA_INTERLEAVE_TEMPLATE = (  # llava-interleave-qwen: one "<image>\n" per image, then the text
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

INTERNVL_TEMPLATE = (  # InternVL3-hf: one <IMG_CONTEXT> per image, expanded by the processor to <img>...</img>
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------------------
# Token schemes


@dataclass(frozen=True)
class _TokenScheme:
    """A family's tokenizer surface: its special tokens (ids right after the BPE vocabulary, in this order, as
    real checkpoints place them), which of them ends a turn, pads and begins a text, and its chat template."""

    special_tokens: tuple[str, ...]
    end_of_turn: str
    pad: str
    chat_template: str
    bos: str | None = None
    tokenizer_class: str = "Qwen2Tokenizer"
    """The transformers class real checkpoints of the family name in tokenizer_config.json."""
    named_tokens: dict[str, str] = field(default_factory=dict)
    """Model-specific token attributes the processor reads off the tokenizer (InternVL's
    `context_image_token`, LLaVA's `image_token`), saved in tokenizer_config.json as real checkpoints do."""


QWEN2_CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

QWEN2_VL_TOKENS = _TokenScheme(
    special_tokens=QWEN2_CHAT_TOKENS + (
        "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
        "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    ),
    end_of_turn="<|im_end|>",
    pad="<|endoftext|>",
    chat_template=QWEN2_VL_TEMPLATE,
)
IDEFICS3_TOKENS = _TokenScheme(
    special_tokens=(
        "<|begin_of_text|>", "<|end_of_text|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
        "<global-img>", *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    ),
    end_of_turn="<end_of_utterance>",
    pad="<|end_of_text|>",
    bos="<|begin_of_text|>",
    chat_template=IDEFICS3_TEMPLATE,
    tokenizer_class="PreTrainedTokenizerFast",  # Idefics3 ships Llama 3's generic fast tokenizer
)
LLAVA_ONEVISION_TOKENS = _TokenScheme(
    special_tokens=QWEN2_CHAT_TOKENS + ("<image>", "<video>"),
    end_of_turn="<|im_end|>",
    pad="<|endoftext|>",
    chat_template=LLAVA_ONEVISION_TEMPLATE,
    named_tokens={"image_token": "<image>", "video_token": "<video>"},
)
INTERNVL_TOKENS = _TokenScheme(
    special_tokens=QWEN2_CHAT_TOKENS + ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    end_of_turn="<|im_end|>",
    pad="<|endoftext|>",
    chat_template=INTERNVL_TEMPLATE,
    named_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
)
LLAVA_TOKENS = _TokenScheme(
    special_tokens=QWEN2_CHAT_TOKENS + ("<image>",),
    end_of_turn="<|im_end|>",
    pad="<|endoftext|>",
    chat_template=LLAVA_INTERLEAVE_TEMPLATE,
    named_tokens={"image_token": "<image>"},
)

# ---------------------------------------------------------------------------------------------------------------
# The shared BPE

PRETOKENIZE_REGEX = (  # Qwen2's pre-tokenizer regex, as in transformers' Qwen2Tokenizer
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
CORPUS_MODULES = (  # standard-library modules whose docstrings are the English part of the training text
    "argparse", "base64", "bisect", "calendar", "codecs", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "enum", "fractions", "functools", "getopt", "gettext", "glob", "heapq", "inspect",
    "ipaddress", "operator", "optparse", "pprint", "random", "shlex", "shutil", "statistics", "string",
    "tempfile", "textwrap", "threading", "typing", "uuid", "warnings",
)
LABEL_WORDS = (  # words a judge reads and writes, frequent enough to become whole tokens
    "safe", "unsafe", "Safe", "Unsafe", "SAFE", "UNSAFE", "Level1", "Level2", "Level3", "Level", "level",
    "label", "score", "reason", "yes", "no", "Yes", "No", "harmful", "benign", "image", "picture", "images",
    "user", "assistant", "system", "response", "request", "You are a helpful assistant.",
)

JSON_PUNCTUATION = ('{"', '": "', '", "', '"}', '": ', ", ", "{", "}", "[", "]", ":", '"', "\n")


def _corpus() -> list[str]:
    """The tokenizer's training text, the same on every call: stdlib docstrings, judge-shaped JSON lines and
    label words from a fixed-seed generator, and JSON punctuation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for name in CORPUS_MODULES:
        try:
            tree = ast.parse((stdlib / f"{name}.py").read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue  # another Python may lack a module; the corpus still depends on nothing but this Python
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    rng = random.Random(0)
    for _ in range(2000):
        label, level = rng.choice(LABEL_WORDS), rng.choice(("Level1", "Level2", "Level3"))
        texts.append(f'{{"label": "{label}", "level": "{level}", "reason": "{rng.choice(LABEL_WORDS)}"}}')
        texts.append(" ".join(rng.choice(LABEL_WORDS) for _ in range(12)))
    texts.append("".join(JSON_PUNCTUATION) * 50)
    return texts


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """The shared byte-level BPE without special tokens, as tokenizer.json text. Trained once per process
    (about a second) on local text; the cache holds a string, so every caller builds its own Tokenizer."""
    tokenizer = Tokenizer(models.BPE())  # pure byte-level: every string encodes, no unknown token
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer.to_str()


def _build_tokenizer(scheme: _TokenScheme) -> PreTrainedTokenizerBase:
    """Returns a fast tokenizer of the family's class: the shared BPE plus the scheme's special tokens (ids
    right after the BPE vocabulary, in the scheme's order), its eos/pad/bos, and its chat template."""
    backend = Tokenizer.from_str(_trained_bpe())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in scheme.special_tokens])
    named = {*scheme.named_tokens.values(), scheme.end_of_turn, scheme.pad, scheme.bos}
    tokenizer_class = getattr(transformers, scheme.tokenizer_class)
    return tokenizer_class(
        tokenizer_object=backend,
        bos_token=scheme.bos,
        eos_token=scheme.end_of_turn,
        pad_token=scheme.pad,
        unk_token=None,
        extra_special_tokens=[t for t in scheme.special_tokens if t not in named],
        chat_template=scheme.chat_template,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        **scheme.named_tokens,
    )


# ---------------------------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class _Vocab:
    """What a family's config needs from its tokenizer."""

    size: int
    """Embedding rows: the tokenizer's length padded to a multiple of VOCAB_MULTIPLE."""
    ids: dict[str, int]
    """Every special token's id."""
    scheme: _TokenScheme

    def text_config(self, model_type: str, **overrides: Any) -> dict[str, Any]:
        """Returns the tiny text model's config as a dict, with this vocabulary's size and special ids."""
        scheme = self.scheme
        return {
            "model_type": model_type, "vocab_size": self.size, **TEXT_SIZES,
            "eos_token_id": self.ids[scheme.end_of_turn], "pad_token_id": self.ids[scheme.pad],
            "bos_token_id": self.ids[scheme.bos] if scheme.bos else None,
            **overrides,
        }


@dataclass(frozen=True)
class _Built:
    """A family's unsaved parts: the model's config and class, its processor, and what saving must add."""

    config: PretrainedConfig
    model_class: type[PreTrainedModel]
    processor: ProcessorMixin
    legacy_image_settings: dict[str, Any] = field(default_factory=dict)
    """Extra keys for the standalone preprocessor_config.json, in the names older readers use."""
    nest_vision_tower: bool = False
    """Save the vision tower's weights under `vision_tower.vision_model.` (see _nest_vision_tower_keys)."""


def _qwen_vl(vocab: _Vocab, tokenizer: PreTrainedTokenizerBase, *, qwen2_5: bool) -> _Built:
    """Returns Qwen2-VL's (or, with `qwen2_5`, Qwen2.5-VL's) parts. Both load in vLLM: text head_dim 32,
    M-RoPE sections summing to head_dim/2, and a vision merger that projects into the text width."""
    text = vocab.text_config(
        "qwen2_5_vl_text" if qwen2_5 else "qwen2_vl_text",
        # M-RoPE spreads head_dim/2 = 16 rotary frequencies over (time, height, width).
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0},
        use_sliding_window=False, max_window_layers=TEXT_SIZES["num_hidden_layers"],
    )
    vision: dict[str, Any] = {"depth": 2, "num_heads": 2, "in_channels": 3, "patch_size": PATCH,
                              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if qwen2_5:
        # Qwen2.5-VL names the tower's width hidden_size and the merger's output width out_hidden_size.
        vision.update(hidden_size=64, intermediate_size=128, hidden_act="silu",
                      out_hidden_size=TEXT_SIZES["hidden_size"], window_size=112, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        config_class, model_class, processor_class = (
            transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor)
    else:
        # Qwen2-VL names the tower's width embed_dim and the merger's output width hidden_size.
        vision.update(embed_dim=64, mlp_ratio=2, hidden_act="quick_gelu", hidden_size=TEXT_SIZES["hidden_size"])
        config_class, model_class, processor_class = (
            transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor)
    ids = vocab.ids
    config = config_class(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    pixels = {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": QWEN_MAX_PIXELS}
    patching = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": 2}
    processor = processor_class(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels, **patching),
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels, **patching),
        tokenizer=tokenizer, chat_template=vocab.scheme.chat_template,
    )
    # transformers 5 saves the bounds as size={shortest_edge, longest_edge}; real Qwen2-VL checkpoints (read by
    # transformers 4.x and older vLLM) also spell them min_pixels/max_pixels.
    return _Built(config, model_class, processor, legacy_image_settings=pixels)


def _idefics3(vocab: _Vocab, tokenizer: PreTrainedTokenizerBase) -> _Built:
    """Returns Idefics3's parts: a Llama text model, image splitting into <row_i_col_j> tiles plus a
    <global-img> view, each tile framed by <fake_token_around_image>."""
    tile, scale_factor = 112, 2
    config = transformers.Idefics3Config(
        text_config=vocab.text_config("llama"),
        vision_config={**VISION_SIZES, "image_size": tile, "patch_size": PATCH},
        scale_factor=scale_factor, image_token_id=vocab.ids["<image>"], pad_token_id=vocab.ids[vocab.scheme.pad],
        tie_word_embeddings=False,
    )
    # A tile gives (112/14)^2 / 2^2 = 16 tokens; images are scaled to 224 px and split into at most 2x2
    # tiles plus the global view, so 16..80 tokens per image.
    processor = transformers.Idefics3Processor(
        image_processor=transformers.Idefics3ImageProcessor(
            size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True),
        tokenizer=tokenizer, image_seq_len=(tile // PATCH) ** 2 // scale_factor**2,
        chat_template=vocab.scheme.chat_template,
    )
    return _Built(config, transformers.Idefics3ForConditionalGeneration, processor)


def _siglip_vision(image_size: int) -> dict[str, Any]:
    """Returns a tiny SigLIP vision config (no pooling head: LLaVA models read the patch features)."""
    return {"model_type": "siglip_vision_model", **VISION_SIZES, "image_size": image_size, "patch_size": PATCH,
            "vision_use_head": False}


def _llava_onevision(vocab: _Vocab, tokenizer: PreTrainedTokenizerBase) -> _Built:
    """Returns LLaVA-OneVision's parts: SigLIP + Qwen2, anyres tiling for a lone image and one base view
    (16 tokens + a newline token) per image in multi-image prompts."""
    tile = 56  # one SigLIP view: (56/14)^2 = 16 tokens
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=_siglip_vision(tile), text_config=vocab.text_config("qwen2"),
        image_token_index=vocab.ids["<image>"], video_token_index=vocab.ids["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )
    size = {"height": tile, "width": tile}
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer, num_image_tokens=(tile // PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=vocab.scheme.chat_template,
    )
    return _Built(config, transformers.LlavaOnevisionForConditionalGeneration, processor, nest_vision_tower=True)


def _internvl(vocab: _Vocab, tokenizer: PreTrainedTokenizerBase) -> _Built:
    """Returns transformers-native InternVL's parts (InternVLForConditionalGeneration): InternViT + Qwen2,
    images cut into tiles plus a thumbnail, <img><IMG_CONTEXT>...</img> per image."""
    tile, downsample_ratio = 56, 0.5
    # Pixel shuffle keeps (56/14)^2 * 0.5^2 = 4 tokens per tile; up to 4 tiles plus a thumbnail, so 4..20
    # tokens per image.
    image_seq_length = int((tile // PATCH) ** 2 * downsample_ratio**2)
    config = transformers.InternVLConfig(
        vision_config={**VISION_SIZES, "image_size": tile, "patch_size": PATCH},
        text_config=vocab.text_config("qwen2"), image_token_id=vocab.ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length, downsample_ratio=downsample_ratio, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    size = {"height": tile, "width": tile}
    processor = transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1,
                                                           max_patches=4),
        video_processor=transformers.InternVLVideoProcessor(size=size),
        tokenizer=tokenizer, image_seq_length=image_seq_length, chat_template=vocab.scheme.chat_template,
    )
    return _Built(config, transformers.InternVLForConditionalGeneration, processor)


def _llava(vocab: _Vocab, tokenizer: PreTrainedTokenizerBase) -> _Built:
    """Returns LLaVA's parts in LLaVA-interleave's shape (llava-interleave-qwen): SigLIP + Qwen2, one 56-px
    view (16 tokens) per image, any number of images per turn."""
    image_size = 56
    config = transformers.LlavaConfig(
        vision_config=_siglip_vision(image_size), text_config=vocab.text_config("qwen2"),
        image_token_id=vocab.ids["<image>"], vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_seq_length=(image_size // PATCH) ** 2, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    processor = transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="full",
        num_additional_image_tokens=0, image_token="<image>", chat_template=vocab.scheme.chat_template,
    )
    return _Built(config, transformers.LlavaForConditionalGeneration, processor, nest_vision_tower=True)


@dataclass(frozen=True)
class _Recipe:
    """How to build one architecture: its token scheme, and a function from vocabulary and tokenizer to parts."""

    scheme: _TokenScheme
    build: Callable[[_Vocab, Any], _Built]


_RECIPES: dict[str, _Recipe] = {
    "qwen2_vl": _Recipe(QWEN2_VL_TOKENS, functools.partial(_qwen_vl, qwen2_5=False)),
    "qwen2_5_vl": _Recipe(QWEN2_VL_TOKENS, functools.partial(_qwen_vl, qwen2_5=True)),
    "idefics3": _Recipe(IDEFICS3_TOKENS, _idefics3),
    "llava_onevision": _Recipe(LLAVA_ONEVISION_TOKENS, _llava_onevision),
    "internvl": _Recipe(INTERNVL_TOKENS, _internvl),
    "llava": _Recipe(LLAVA_TOKENS, _llava),
}
TINY_ARCHS: tuple[str, ...] = tuple(_RECIPES)
"""The architectures make_tiny_model builds, in priority order (each name is the config's model_type)."""

# ---------------------------------------------------------------------------------------------------------------
# Building and saving


def make_tiny_model(out_dir: str | Path, arch: str = "qwen2_vl", *, seed: int = 0,
                    dtype: str = "float32") -> Path:
    """Build a random-weight model of the real architecture `arch` (one of TINY_ARCHS) with its tokenizer,
    image processor, processor and chat template, and save it into `out_dir` (created if needed) with
    save_pretrained, weights as safetensors. Offline and a few seconds on a CPU; the same `seed` gives the same
    weights, and the caller's torch RNG state is left as it was.

    Returns `out_dir` as a Path. Raises MisguardError for an unknown `arch` (the message lists TINY_ARCHS) or
    a `dtype` not in DTYPES.
    """
    if arch not in _RECIPES:
        raise MisguardError(f"unknown tiny model architecture '{arch}'; choose one of: {', '.join(TINY_ARCHS)}")
    if dtype not in DTYPES:
        raise MisguardError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")

    recipe = _RECIPES[arch]
    tokenizer = _build_tokenizer(recipe.scheme)
    specials = list(recipe.scheme.special_tokens)
    vocab = _Vocab(size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
                   ids=dict(zip(specials, tokenizer.convert_tokens_to_ids(specials))), scheme=recipe.scheme)
    built = recipe.build(vocab, tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = built.model_class(built.config)
    model = model.to(getattr(torch, dtype)).eval()
    _set_generation_defaults(model, vocab)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if built.nest_vision_tower:
        _nest_vision_tower_keys(out / "model.safetensors")
    _save_processor(built.processor, out, built.legacy_image_settings)
    return out


def _set_generation_defaults(model: PreTrainedModel, vocab: _Vocab) -> None:
    """Make the model's generation_config greedy, stopping at the family's end-of-turn token and padding with
    its pad token; the model config and its text config carry the same ids."""
    scheme, ids = vocab.scheme, vocab.ids
    for config in (model.config, model.config.get_text_config()):
        config.eos_token_id = ids[scheme.end_of_turn]
        config.pad_token_id = ids[scheme.pad]
    generation = model.generation_config
    generation.do_sample = False
    generation.temperature = generation.top_p = generation.top_k = None
    generation.eos_token_id = ids[scheme.end_of_turn]
    generation.pad_token_id = ids[scheme.pad]
    generation.bos_token_id = ids[scheme.bos] if scheme.bos else None


def _save_processor(processor: ProcessorMixin, out: Path, legacy_image_settings: dict[str, Any]) -> None:
    """Save the processor the transformers 5 way (tokenizer files, chat_template.jinja, and the image and video
    processors nested in processor_config.json), then the standalone files vLLM and transformers 4.x read:
    preprocessor_config.json (plus `processor_class` and `legacy_image_settings`) and, for families with a
    video processor, video_preprocessor_config.json."""
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None:
        video_processor.save_pretrained(out)
    legacy = out / "preprocessor_config.json"
    settings = json.loads(legacy.read_text(encoding="utf-8"))
    settings.update(legacy_image_settings, processor_class=type(processor).__name__)
    legacy.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _nest_vision_tower_keys(weights: Path) -> None:
    """Rewrite the safetensors file `weights` with every `vision_tower.X` key renamed to
    `vision_tower.vision_model.X`.

    transformers 5.19 saves a LLaVA-style SigLIP/CLIP tower without the `vision_model.` level that published
    llava-hf checkpoints have, and vLLM 0.32's LLaVA and LLaVA-OneVision loaders only know that layout ("There is
    no module or parameter named 'vision_tower.embeddings'"). transformers loads both layouts to the same
    weights, so the published one serves both.
    """
    old, new = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (new + key[len(old):] if key.startswith(old) and not key.startswith(new) else key): tensor
        for key, tensor in load_file(weights).items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})
