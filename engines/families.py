"""Per-family adapters: the small differences between VLM families, kept out of the engines' loops.

Every family here uses its processor's own chat template (transformers-native formats), so the adapter's job
is the message shape and processor arguments: which part types the template understands and how images are
grouped per prompt. A family with a quirk gets an entry in FAMILIES; everything else uses the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from misguard.core.errors import DataError
from misguard.engines.messages import Message, content_parts, load_image


@dataclass(frozen=True)
class Family:
    """How one model family takes a multi-image chat."""

    name: str
    system_role: bool = True
    """False for templates that reject a system turn: it is prepended to the first user text instead."""

    def hf_conversation(self, messages: Sequence[Message], load: Callable[[Any], Any] = load_image,
                        ) -> tuple[list[dict[str, Any]], list[Any]]:
        """The messages in Hugging Face chat format (image parts become {"type": "image"} placeholders) and the
        RGB images in order, each opened with `load`. Raises DataError for an unreadable image or an unknown
        part type."""
        conversation: list[dict[str, Any]] = []
        images: list[Any] = []
        pending_system = ""
        for message in messages:
            role = message["role"]
            parts: list[dict[str, Any]] = []
            for part in content_parts(message):
                if part["type"] == "image":
                    images.append(load(part["image"]))
                    parts.append({"type": "image"})
                elif part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise DataError(f"unknown message part type {part['type']!r} (expected 'image' or 'text')")
            if role == "system" and not self.system_role:
                pending_system += "".join(p["text"] for p in parts if p["type"] == "text") + "\n\n"
                continue
            if pending_system and role == "user":
                parts = _prepend_text(parts, pending_system)
                pending_system = ""
            conversation.append({"role": role, "content": parts})
        return conversation, images


def _prepend_text(parts: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    for i, part in enumerate(parts):
        if part["type"] == "text":
            return parts[:i] + [{"type": "text", "text": text + part["text"]}] + parts[i + 1:]
    return parts + [{"type": "text", "text": text.rstrip()}]


DEFAULT = Family("default")
FAMILIES: dict[str, Family] = {
    # model_type (config.json) -> adapter. Entries only where a family differs from DEFAULT.
    "qwen2_vl": Family("qwen2_vl"),
    "qwen2_5_vl": Family("qwen2_5_vl"),
    "idefics3": Family("idefics3", system_role=True),
    "llava": Family("llava"),
    "llava_onevision": Family("llava_onevision"),
    "internvl": Family("internvl"),
}


def family_for(model_type: str) -> Family:
    """The adapter for a config's model_type; the default one for families with no known quirk."""
    return FAMILIES.get(model_type, DEFAULT)


def processor_pixels(config: dict[str, Any]) -> int | None:
    """The most pixels of one image an image processor (its preprocessor_config.json) passes to the model, or None
    when it says none by area: Qwen2-VL's `max_pixels` (transformers 5 spells it size["longest_edge"], an area);
    a tiling processor's largest grid (LLaVA-OneVision's image_grid_pinpoints) or its tiles (InternVL's
    max_patches of size); a longest edge (Idefics3), squared. Decoding an image to no less than this many pixels
    (core.images) leaves what the processor makes of it unchanged, up to resampling."""
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    kind = str(config.get("image_processor_type", ""))

    def area(box: Any) -> int | None:
        if isinstance(box, dict) and isinstance(box.get("height"), int) and isinstance(box.get("width"), int):
            return box["height"] * box["width"]
        return None

    if isinstance(config.get("max_pixels"), int):
        return config["max_pixels"]
    if "Qwen2VL" in kind and isinstance(size.get("longest_edge"), int):
        return size["longest_edge"]
    pinpoints = config.get("image_grid_pinpoints")
    if isinstance(pinpoints, list) and pinpoints and all(isinstance(p, list) and len(p) == 2 for p in pinpoints):
        return max(int(h) * int(w) for h, w in pinpoints)
    if config.get("crop_to_patches") and isinstance(config.get("max_patches"), int) and area(size):
        return (config["max_patches"] + 1) * area(size)  # the tiles and a thumbnail
    if isinstance(size.get("longest_edge"), int):
        return size["longest_edge"] ** 2
    # A crop (CLIP) or a fixed or shortest-edge size (SigLIP) is set by edge lengths, not area: reducing an image
    # of an unusual aspect ratio by area would leave its short side under what the processor keeps.
    return None
