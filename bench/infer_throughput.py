"""Batched `misguard infer` vs the seed's loop (one prompt per `generate` call), same engine, model and items.

CPU (tiny model):   python bench/infer_throughput.py --size tiny --items 48 --max-new-tokens 32
GPU (H100):         python bench/infer_throughput.py --size 7b --items 200 --max-new-tokens 256
Full-size shapes are random-init (no weights can be downloaded): only speed is meaningful. Items are MIS-sized:
two images of about 448 px and a question of MIS length. Prints one JSON line with items/s and the ratio.
"""
from __future__ import annotations

import argparse
import json
import json as _json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, Qwen2VLForConditionalGeneration

from misguard.core.splits import load_split
from misguard.engines import EngineOptions, load_engine
from misguard.engines.messages import GenerationParams, user_request
from misguard.engines.tiny_models import make_tiny_model
from misguard.mis.demo_data import make_demo_data
from misguard.mis.infer import InferConfig, run_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2-VL text/vision shapes of the published 2B and 7B checkpoints (config.json values).
FULL_SIZE = {
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}
VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")


def build_model(size: str, folder: Path) -> Path:
    """A tiny Qwen2-VL folder; for 2b/7b its config is swapped for full-size shapes with random weights (the
    tiny tokenizer and processor stay: speed depends on shapes and token counts, not on the vocabulary)."""
    make_tiny_model(folder, arch="qwen2_vl", seed=0)
    if size == "tiny":
        return folder

    config = AutoConfig.from_pretrained(folder)
    text = config.text_config
    for key, value in FULL_SIZE[size].items():
        setattr(text, key, value)
    config.vocab_size = text.vocab_size  # the real LM head: a real share of the per-token compute
    text.layer_types = ["full_attention"] * text.num_hidden_layers  # sized for the tiny model's 2 layers
    text.max_window_layers = text.num_hidden_layers
    head_dim = text.hidden_size // text.num_attention_heads
    text.rope_parameters["mrope_section"] = [16, 24, 24] if head_dim == 128 else [head_dim // 8, 3 * head_dim // 16,
                                                                                  3 * head_dim // 16]
    for key, value in VISION.items():
        setattr(config.vision_config, key, value)
    config.vision_config.hidden_size = text.hidden_size
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    # Let MIS-sized images through whole: up to 324 visual tokens per image (see mis_sized_images).
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.exists():
            cfg = _json.loads(path.read_text())
            target = cfg.get("image_processor", cfg)
            target["min_pixels"], target["max_pixels"] = 56 * 56, 28 * 28 * 324
            target["size"] = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 324}
            path.write_text(_json.dumps(cfg, indent=2))
    return folder


def mis_sized_images(data: Path, side: int = 504) -> None:
    """Resize every image to side x side px: 504 px -> 18 x 18 merged patches = 324 visual tokens per image,
    the size of an MIS image in Qwen2-VL."""
    for path in data.rglob("*.png"):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((side, side))
        resized.save(path)


def bench_data(folder: Path, n_items: int, size: str) -> Path:
    """Generated MIS-shaped data for a benchmark: for full-size shapes every image is resized to MIS size."""
    data = make_demo_data(folder, n_items=n_items, seed=0)
    if size != "tiny":
        mis_sized_images(data)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "2b", "7b"], default="tiny")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None, help="misguard's batch size (default: automatic)")
    ap.add_argument("--seed-items", type=int, default=None, help="items for the slow seed loop (default: all)")
    args = ap.parse_args()



    work = Path(tempfile.mkdtemp(prefix="misguard-bench-"))
    data = bench_data(work / "data", args.items, args.size)
    model = build_model(args.size, work / "model")
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    config = InferConfig(model=str(model), data=data, split="easy", out=work / "out",
                         engine_options=EngineOptions(batch_size=args.batch_size), generation=params)

    engine = load_engine("transformers", str(model), config.engine_options)
    # Warm-up (kernels, allocator) outside the timings, for both.
    split = load_split(data, "easy")
    warm = [user_request(i.id, split.image_paths(i), i.question) for i in split.items[:2]]
    engine.generate(warm, GenerationParams(max_new_tokens=4))

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    result = run_inference(config, progress=False, engine=engine)
    sync()
    batched_s = time.perf_counter() - t
    batched_rate = result.generated / batched_s
    batch_size = engine.batch_size

    # The seed's loop: one prompt per generate call, on the same engine and model.
    n_seed = args.seed_items or args.items
    requests = [user_request(i.id, split.image_paths(i), i.question) for i in split.items[:n_seed]]
    engine.batch_size = 1
    sync()
    t = time.perf_counter()
    for request in requests:
        engine.generate([request], params)
    sync()
    seed_s = time.perf_counter() - t
    seed_rate = n_seed / seed_s

    print(json.dumps({
        "bench": "infer_throughput", "size": args.size, "items": args.items, "seed_items": n_seed,
        "max_new_tokens": args.max_new_tokens, "batch_size": batch_size,
        "batched_items_per_s": round(batched_rate, 3), "seed_loop_items_per_s": round(seed_rate, 3),
        "ratio": round(batched_rate / seed_rate, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
