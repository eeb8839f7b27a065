"""Images in conversations: where a row's pictures come from, and how a vision-language model's processor turns
them into tokens and pixels.

In a canonical example an image is a slot in a message's text (IMAGE_SLOT, where the row put its `<image>`
placeholder or its image part) plus the example's `images` list, in the same order. Encoding renders the chat with
the model's own template (each slot becomes an image content part, which the template writes as its image marker,
e.g. `<|vision_start|><|image_pad|><|vision_end|>`), tokenizes the text once, and repeats each image token as many
times as the processor gives that image (Qwen2-VL: one per 2x2 merged patches; LLaVA: one per patch). Features
carry the image references (`Pictures`), not pixels: the pixels are made when a batch is collated, so a large
image set is never held in memory as tensors.

Only the processor's image part is loaded (its image processor, tokenizer and facts): Qwen2-VL's full processor
also needs a video processor, which needs torchvision, and nothing here uses video.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's and LLaVA's mark of an image's place in a row's text
IMAGE_SLOT = "\x00image\x00"  # an image's place in a canonical message's text (never in real text)
IMAGE_PARTS = ("image_url", "image", "input_image")  # OpenAI, Hugging Face and LLaMA-Factory v1 part types
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.I)
_REMOTE = re.compile(r"^(https?|ftp)://", re.I)


# ---------------------------------------------------------------- references (paths, data URLs)

def is_data_url(ref: str) -> bool:
    return bool(_DATA_URL.match(ref))


def is_remote(ref: str) -> bool:
    return bool(_REMOTE.match(ref))


def raw_reference(value) -> str | None:
    """The reference in a column value or content part: a string, or {"url"}, {"path"}, {"bytes"} (a Hugging Face
    Image feature: its bytes become a data URL); None when there is none."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
            return "data:image/unknown;base64," + base64.b64encode(value["bytes"]).decode()
        for key in ("url", "path", "image_url", "image", "value"):
            if value.get(key) is not None:
                return raw_reference(value[key])
    return None


def resolve(ref: str, dirs: list[Path]) -> str:
    """An absolute path or a data URL; a relative path is looked up in `dirs` (the data file's directory, then the
    dataset_info directory). A ValueError says what is wrong (the caller names the row and field)."""
    if is_data_url(ref):
        return ref
    if is_remote(ref):
        raise ValueError(f"remote image (data must name local files or data URLs: nothing is downloaded while "
                         f"training; download it first): {ref[:80]}")
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in dirs] or [path]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    where = " or ".join(str(c) for c in candidates)
    raise ValueError(f"image file not found: {ref} (looked for {where})")


def open_image(ref: str):
    """The image as RGB, fully decoded (so a truncated or corrupt file fails here, not in the middle of training).
    Raises ValueError saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        if is_data_url(ref):
            source = io.BytesIO(base64.b64decode(ref.split(",", 1)[1], validate=True))
        else:
            source = ref
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError, Image.DecompressionBombError) as exc:
        shown = ref[:40] + "..." if is_data_url(ref) else ref
        raise ValueError(f"unreadable image {shown} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") \
            from None


# ---------------------------------------------------------------- placeholders in messages

def place_images(message_lists: list[list[dict]], count: int) -> tuple[list[list[dict]], int]:
    """The messages with each `<image>` placeholder turned into IMAGE_SLOT, and how many there were."""
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for ms in message_lists for m in ms
                if isinstance(m.get("content"), str))
    if found != count:
        return message_lists, found
    placed = [[{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, IMAGE_SLOT)}
               if isinstance(m.get("content"), str) else m for m in ms] for ms in message_lists]
    return placed, found


def content_parts(text: str) -> list[dict]:
    """A message text as content parts: text parts and an image part at each slot (what VLM templates read)."""
    parts = []
    for i, piece in enumerate(text.split(IMAGE_SLOT)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_slots(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE_SLOT) for m in messages if isinstance(m.get("content"), str))


# ---------------------------------------------------------------- the processor's image side

@dataclass(frozen=True)
class Pictures:
    """A feature's images (references in token order) and the Vision that makes their pixels."""

    refs: tuple[str, ...]
    vision: "Vision"

    def __len__(self) -> int:
        return len(self.refs)


class Vision:
    """What a vision-language model's processor does with images: its image processor, the image token, how many
    tokens an image of a given size takes, and whether the model wants `mm_token_type_ids` (Qwen2-VL's family, to
    place its 3-D rotary positions)."""

    def __init__(self, source: str, image_processor, image_token_id: int, counter, token_types: bool):
        self.source, self.image_processor, self.image_token_id = source, image_processor, image_token_id
        self.counter, self.token_types = counter, token_types

    def tokens_for(self, image) -> int:
        return int(self.counter(image.height, image.width))

    def expand(self, ids: list[int], trained: list[bool], refs: list[str]) -> tuple[list[int], list[bool], int]:
        """Each image token repeated as many times as its image takes (never trained); returns the new ids and flags
        and how many images were used (the text may hold fewer image tokens than `refs`, e.g. a chat rendered up to
        an earlier turn). More image tokens than images is a ValueError."""
        at = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(at) > len(refs):
            raise ValueError(f"the chat template wrote {len(at)} image tokens for {len(refs)} images")
        counts = [self.tokens_for(open_image(ref)) for ref in refs[:len(at)]]
        out_ids, out_trained, start = [], [], 0
        for position, count in zip(at, counts):
            out_ids += ids[start:position] + [self.image_token_id] * count
            out_trained += trained[start:position] + [False] * count
            start = position + 1
        return out_ids + ids[start:], out_trained + trained[start:], len(at)

    def pixels(self, refs: list[str], input_ids) -> dict:
        """The model's image inputs for a batch whose image tokens belong, in row-major order, to `refs`."""
        out = self.image_processor(images=[open_image(ref) for ref in refs], return_tensors="pt")
        inputs = {key: value for key, value in out.items()}
        if self.token_types:
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        return inputs

    def save(self, out: Path) -> None:
        """The processor's own files next to a trained model, so that AutoProcessor loads the output."""
        for name in PROCESSOR_FILES:
            if (Path(self.source) / name).is_file():
                shutil.copyfile(Path(self.source) / name, Path(out) / name)


def pixel_batch(groups: list, input_ids) -> dict:
    """The image inputs of a batch from its rows' Pictures (None or empty for rows without images), in row order."""
    pictures = [group for group in groups if group]
    if not pictures:
        return {}
    return pictures[0].vision.pixels([ref for group in pictures for ref in group.refs], input_ids)


def own_positions(features: list[dict]) -> bool:
    """Whether these features' images need positions the model computes itself (Qwen2-VL's 3-D rotary positions):
    such a batch must not carry explicit position_ids (packing, shared prefixes)."""
    return any(f.get("images") and f["images"].vision.token_types for f in features)


def is_vision_config(config) -> bool:
    """A configuration of an image-text-to-text model (AutoModelForImageTextToText) with a vision tower."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "vision_config", None) is not None and \
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_vision(model: str, trust_remote_code: bool = False) -> Vision | None:
    """The image side of a model directory's processor; None for a text-only model."""
    from transformers import AutoConfig, AutoImageProcessor

    from ..hub import resolve_model_path

    source = resolve_model_path(model)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not is_vision_config(config):
        return None
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model} is a vision-language model ({config.model_type}) without a usable image "
                          f"processor ({str(exc).splitlines()[0]}): its processor files (processor_config.json or "
                          f"preprocessor_config.json) are needed") from None
    processor_class = _processor_class(source)
    processor = _full_processor(source, trust_remote_code)
    token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if token_id is None and processor is not None:
        token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        raise ConfigError(f"{model}: cannot tell the image token (no image_token_id in config.json)")
    return Vision(source, image_processor, int(token_id), _counter(model, processor, image_processor),
                  bool(getattr(processor_class, "return_mm_token_type_ids", False)))


def _processor_class(source: str):
    import transformers

    path = Path(source) / "processor_config.json"
    name = json.loads(path.read_text()).get("processor_class") if path.is_file() else None
    return getattr(transformers, name, None) if name else None


def _full_processor(source: str, trust_remote_code: bool):
    """AutoProcessor when it loads here; None when a part it needs is missing (Qwen2-VL's video processor without
    torchvision): the image side is then worked out from the image processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        return None


def _counter(model: str, processor, image_processor):
    """(height, width) -> image tokens: the processor's own count where it has one; else, for image processors
    that cut images into merged patches (Qwen2-VL's family), patches / merge_size^2."""
    if processor is not None and hasattr(processor, "_get_num_multimodal_tokens"):
        return lambda height, width: processor._get_num_multimodal_tokens(
            image_sizes=[(height, width)]).num_image_tokens[0]
    if hasattr(image_processor, "get_number_of_image_patches") and getattr(image_processor, "merge_size", None):
        merge = image_processor.merge_size
        return lambda height, width: image_processor.get_number_of_image_patches(height, width, {}) // merge ** 2
    raise ConfigError(f"{model}: cannot tell how many tokens an image takes with {type(image_processor).__name__} "
                      "(its processor does not load here)")
