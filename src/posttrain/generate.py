"""`posttrain generate`: K samples per prompt, written as rankings rows for a ranker or a human to order.

Input rows (jsonl, json, csv, parquet, ...) hold a `prompt` (a string, or a message list ending with a user
turn) or `messages` (the same list under that name), with an optional `system`; other columns are kept.
Each output line is `{"prompt": <as given>, "responses": [K texts], ...other columns, "finish_reasons": [...],
"logprobs": [summed log-prob of each response]}`, which `posttrain data pairs` reads once the responses are
ordered best to worst. The file is written to a temporary name and renamed when complete.

With a vision-language model a prompt may hold images as training rows do (`<image>` placeholders with an `images`
or `image` column, paths relative to the prompts file, or image_url content parts); a text-only model refuses them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .data.chats import RowFields
from .data.examples import Conversation, Message
from .data.formats import attach_images, check_text_only
from .data.preference import prompt_value
from .data.sources import Row, read_rows
from .engine import Engine, SamplingParams
from .errors import ConfigError, DataError

OUR_FIELDS = ("prompt", "responses", "finish_reasons", "logprobs")


def read_prompts(path: str) -> list[tuple[Row, list[Message]]]:
    """Each row with its prompt as messages; a bad row is a DataError naming its file:line and field."""
    return [(row, messages) for row, messages, _ in read_image_prompts(path, images=False)]


def read_image_prompts(path: str, images: bool) -> list[tuple[Row, list[Message], list[str]]]:
    """With `images` (a vision-language model) each prompt's images too, read as training rows' are (image columns
    and parts, paths relative to the file), image places as data/vision.IMAGE_SLOT in the messages."""
    rows = read_rows(path)
    if not rows:
        raise DataError("no prompts in this file", location=str(path))
    prompts = []
    for row in rows:
        key = "prompt" if "prompt" in row.data or "messages" not in row.data else "messages"
        if not images:
            check_text_only(row, "ranking", None)  # images in a prompt row would be dropped: refuse them
            prompts.append((row, prompt_value(RowFields(row, "ranking", None), key, None), []))
            continue
        parsed = Row(row.data, row.location, images=[])  # image parts are collected while parsing
        example = Conversation(prompt_value(RowFields(parsed, "ranking", None), key, None), source=row.location)
        attach_images(example, parsed, "ranking", None, [Path(path).parent])
        prompts.append((row, example.messages, example.images))
    return prompts


def prompt_token_ids(engine: Engine, messages: list[Message]) -> list[int]:
    """The chat template when the tokenizer has one; else a lone user string as plain text."""
    if getattr(engine.tokenizer, "chat_template", None) or len(messages) != 1:
        return engine.chat_prompt(messages)
    return engine.tokenizer(messages[0]["content"])["input_ids"]


def encode_prompts(engine: Engine, prompts: list[tuple[Row, list[Message], list[str]]]) -> tuple[list, list]:
    """Each prompt's token ids and its Pictures (None without images), from read_image_prompts' rows."""
    token_prompts, pictures = [], []
    for row, messages, images in prompts:
        if images:
            try:
                ids, picture = engine.image_prompt(messages, images)
            except ConfigError as exc:  # an unreadable image, a template that drops images
                raise DataError(str(exc), row.location, "images") from None
        else:
            ids, picture = prompt_token_ids(engine, messages), None
        token_prompts.append(ids)
        pictures.append(picture)
    return token_prompts, pictures


def output_row(row: Row, completions) -> dict:
    prompt_key = "prompt" if "prompt" in row.data or "messages" not in row.data else "messages"
    extra = {k: v for k, v in row.data.items() if k != prompt_key and k not in OUR_FIELDS}
    return {"prompt": row.data[prompt_key], "responses": [c.text for c in completions], **extra,
            "finish_reasons": [c.finish_reason for c in completions],
            "logprobs": [sum(c.logprobs) for c in completions]}


def generate_file(model: str, prompts_path: str, out: str, params: SamplingParams, *, adapter: str | None = None,
                  batch_size: int = 8, chat_template: str | None = None, device: str | None = None,
                  dtype: str | None = None) -> dict:
    """Sample params.n responses per prompt; `batch_size` prompts (x n rows) are decoded together, on `device` in
    `dtype` (None / "auto": a GPU in bf16 when there is one, else the CPU in fp32)."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    from .data.vision import load_vision

    prompts = read_image_prompts(prompts_path, images=load_vision(model) is not None)
    engine = Engine.load(model, adapter, dtype=dtype, chat_template=chat_template, device=device)
    token_prompts, pictures = encode_prompts(engine, prompts)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    counts = {"prompts": len(prompts), "responses": 0, "length": 0}
    # continuous batching: at most batch_size prompts (x n rows) decode at once, a finished row's place goes to
    # the next waiting one; each response has its own random stream (seed, response index), so --batch-size
    # changes the speed, not the samples
    completions = engine.generate(token_prompts, params, max_rows=batch_size * params.n, images=pictures)
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            for index, (row, _, _) in enumerate(prompts):
                mine = completions[index * params.n:(index + 1) * params.n]
                handle.write(json.dumps(output_row(row, mine), ensure_ascii=False) + "\n")
                counts["responses"] += len(mine)
                counts["length"] += sum(c.finish_reason == "length" for c in mine)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return counts
