"""Vision-language models (AutoModelForImageTextToText): which weights are the vision tower and which the projector,
freezing them (freeze.vision_tower, freeze.projector), keeping LoRA off the frozen parts, and the inputs of a
generation prefill whose prompts hold images (pixels and, for Qwen2-VL's family, 3-D rotary positions).

The data side (image references, placeholders, image tokens, pixels) is data/vision.py.
"""
from __future__ import annotations

import torch
from torch import nn

# module names that hold the vision encoder and the projector into the language model, across transformers' VLMs
# (Qwen2-VL / 2.5-VL / 3-VL: visual + visual.merger; LLaVA, Gemma-3, Mistral-3: vision_tower + multi_modal_projector;
# Idefics3 / SmolVLM: vision_model + connector)
TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "mm_projector", "connector", "deepstack_merger_list")


def part_of(name: str) -> str:
    """"projector", "vision_tower" or "language" for a parameter or module name."""
    pieces = name.split(".")
    if any(piece in PROJECTOR_NAMES for piece in pieces):
        return "projector"
    if any(piece in TOWER_NAMES for piece in pieces):
        return "vision_tower"
    return "language"


def is_vlm(model: nn.Module) -> bool:
    from .data.vision import is_vision_config

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return is_vision_config(getattr(base, "config", None))


def freeze_vision(model: nn.Module, vision_tower: bool, projector: bool) -> dict[str, int]:
    """Full and freeze fine-tuning: the vision tower's and the projector's weights trainable or not as asked.
    Returns the parameter count of each part, for the log."""
    sizes = {"vision_tower": 0, "projector": 0}
    for name, param in model.named_parameters():
        part = part_of(name)
        if part in sizes:
            param.requires_grad_(not (vision_tower if part == "vision_tower" else projector))
            sizes[part] += param.numel()
    return sizes


def lora_exclusions(model: nn.Module, vision_tower: bool, projector: bool) -> list[str]:
    """The linear modules LoRA must leave alone: those of the frozen parts (by default the vision tower and the
    projector, so LoRA adapts the language model only)."""
    frozen = {"vision_tower"} if vision_tower else set()
    frozen |= {"projector"} if projector else set()
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and part_of(name) in frozen]


# ---------------------------------------------------------------- generation

def prefill_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   images: list) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """For a prefill of left-padded prompts whose images are `images` (the rows' Pictures, None for rows without):
    (extra model inputs: pixels etc., the position_ids to pass, the 2-D positions whose last column + 1 is each
    row's next position). Qwen2-VL's family places image tokens on a 3-D grid of rotary positions that the model
    works out from the image grid; text after an image continues from the grid's largest position, which is where
    decoding continues too (a 2-D position t decodes at (t, t, t))."""
    from .data.vision import pixel_batch

    extra = {key: value.to(input_ids.device) for key, value in pixel_batch(images, input_ids).items()}
    if "mm_token_type_ids" not in extra:
        return extra, position_ids, position_ids
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rope_index = base.model.get_rope_index
    grid = extra.get("image_grid_thw")
    positions, _ = rope_index(input_ids, mm_token_type_ids=extra["mm_token_type_ids"], image_grid_thw=grid,
                              attention_mask=attention_mask)
    return extra, positions, positions.max(dim=0).values
