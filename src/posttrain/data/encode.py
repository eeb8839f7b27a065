"""Tokenisation with loss masks: canonical examples -> {"input_ids", "labels"} features.

Conversations are masked with the tokenizer's own chat template (any template, no `{% generation %}`
tags needed): the template is rendered incrementally to find which characters of the final text belong
to assistant turns, and the full text is tokenized once with offsets to map those characters to tokens.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from jinja2 import TemplateError

from posttrain.data.examples import Conversation, Labeled, Text
from posttrain.errors import ConfigError, DataError

IGNORE = -100  # label of tokens that are not trained (the value torch's cross_entropy ignores)
STAGES = ("pt", "sft", "classify")
Span = tuple[int, int]  # [start, end) character offsets in the rendered text


class SkippableError(DataError):
    """A per-example problem that `skip_invalid` may skip; `kind` is the reason it is counted under."""

    def __init__(self, message: str, location: str | None, field: str | None, kind: str):
        super().__init__(message, location, field)
        self.kind = kind


# --------------------------------------------------------------------------- chat templates

def check_chat_template(tokenizer) -> None:
    """Fail early and clearly: without a template there is no way to render or mask a conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set `chat_template:` in the config (inline Jinja "
                        "or a path to a .jinja file) or use a model that has one")


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **extra)


def _try_render(tokenizer, messages, tools, generation_prompt) -> str | None:
    """Some templates cannot render a partial chat (e.g. one that starts with an assistant turn)."""
    try:
        return _render(tokenizer, messages, tools, generation_prompt)
    except Exception:  # noqa: BLE001 - any template failure just means "use the fallback"
        return None


SENTINEL = "\x00posttrain-assistant-content\x00"


def _locate(tokenizer, conv: Conversation, i: int, full: str) -> Span | None:
    """Fallback for templates without the prefix property (e.g. ones that drop the reasoning of earlier
    turns): render the whole chat with message i's content replaced by a sentinel; the text around the
    sentinel must match the real rendering, and what lies between is the content as the template wrote it."""
    messages = [*conv.messages[:i], {**conv.messages[i], "content": SENTINEL}, *conv.messages[i + 1:]]
    marked = _try_render(tokenizer, messages, conv.tools, False)
    if marked is None or marked.count(SENTINEL) != 1:
        return None
    before, after = marked.split(SENTINEL)
    start, end = len(before), len(full) - len(after)
    if start > end or not (full.startswith(before) and full.endswith(after)):
        return None
    # Extend over the end-of-turn marker: what follows the content when this turn is rendered last.
    last = _try_render(tokenizer, messages[: i + 1], conv.tools, False)
    marker = last.split(SENTINEL)[-1].rstrip() if last and last.count(SENTINEL) == 1 else ""
    if marker and full.startswith(marker, end):
        end += len(marker)
    return start, end


def assistant_spans(tokenizer, conv: Conversation) -> tuple[str, list[Span]]:
    """Render `conv` and return (text, character spans of every assistant turn incl. its end marker)."""
    check_chat_template(tokenizer)
    messages, tools = conv.messages, conv.tools
    try:
        full = _render(tokenizer, messages, tools, generation_prompt=False)
    except TemplateError as exc:  # e.g. raise_exception('System role not supported')
        raise SkippableError(f"the chat template cannot render this conversation: {exc}", conv.source,
                             "messages", "chat template error") from None
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = _try_render(tokenizer, messages[:i], tools, True) if i else ""
        upto = _try_render(tokenizer, messages[: i + 1], tools, False)
        if prefix is not None and upto is not None and upto.startswith(prefix) and full.startswith(upto):
            span = (len(prefix), len(upto.rstrip()))  # not the whitespace between turns
        else:
            span = _locate(tokenizer, conv, i, full)
        if span is None or span[1] <= span[0]:
            raise DataError(f"could not find assistant message {i} in the text rendered by the chat template",
                            conv.source, "messages")
        spans.append(span)
    return full, spans


def _fast_encode(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("loss masking needs a fast tokenizer (one with a tokenizer.json)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template puts BOS itself
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _overlaps(offset: Span, spans: list[Span]) -> bool:
    start, end = offset
    return any(start < s_end and end > s_start for s_start, s_end in spans)


# --------------------------------------------------------------------------- encoders

def encode_conversation(tokenizer, conv: Conversation, max_length: int, train_on_prompt: bool = False) -> dict:
    """Returns {"input_ids", "labels" (-100 where not trained), "truncated"}; assistant turns are trained."""
    text, spans = assistant_spans(tokenizer, conv)
    input_ids, offsets = _fast_encode(tokenizer, text)
    trained = [train_on_prompt or _overlaps(o, spans) for o in offsets]
    if not any(trained):
        raise SkippableError("the conversation has no assistant message to train on", conv.source, "messages",
                             "no assistant message")
    truncated = len(input_ids) > max_length
    if truncated and not any(trained[:max_length]):
        prompt = trained.index(True)
        raise SkippableError(f"prompt is longer than max_length ({prompt} tokens > {max_length})", conv.source,
                             "messages", "prompt longer than max_length")
    input_ids, trained = input_ids[:max_length], trained[:max_length]
    labels = [t if keep else IGNORE for t, keep in zip(input_ids, trained)]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def encode_text(tokenizer, text: Text, max_length: int) -> list[dict]:
    """Raw text (with the tokenizer's own BOS, if any) + EOS, cut into chunks of max_length: nothing is lost."""
    if not text.text.strip():
        raise SkippableError("the text is empty", text.source, "text", "empty text")
    ids = list(tokenizer(text.text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return [{"input_ids": chunk, "labels": list(chunk), "truncated": False}
            for chunk in (ids[i:i + max_length] for i in range(0, len(ids), max_length))]


def encode_labeled(tokenizer, example: Labeled, label2id: dict[str, int], max_length: int) -> dict:
    """{"input_ids", "label", "truncated"}; the text keeps its first max_length tokens."""
    if example.label not in label2id:
        known = ", ".join(map(str, label2id))
        raise SkippableError(f"unknown label '{example.label}' (the label set is: {known})", example.source,
                             "label", "unknown label")
    ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
    return {"input_ids": ids[:max_length], "label": label2id[example.label], "truncated": len(ids) > max_length}


# --------------------------------------------------------------------------- whole datasets

@dataclass
class EncodeStats:
    """What encoding did to a dataset, reported to the user before training starts."""

    examples: int = 0  # examples encoded (a pt text split into chunks counts once)
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    lengths: list[int] = field(default_factory=list)  # tokens per produced feature
    trained_tokens: int = 0

    def attempt(self, encode, skip_invalid: bool):
        """encode(), or None with the reason counted when it raises a SkippableError and skip_invalid is set."""
        try:
            return encode()
        except SkippableError as err:
            if not skip_invalid:
                raise
            self.skipped[err.kind] += 1
            return None

    def summary(self) -> str:
        parts = [f"{self.examples} examples -> {len(self.lengths)} sequences"]
        if self.lengths:
            mean = sum(self.lengths) / len(self.lengths)
            parts.append(f"length mean {mean:.0f} / max {max(self.lengths)}")
        parts.append(f"{self.trained_tokens} trained tokens")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
            parts.append(f"{sum(self.skipped.values())} skipped ({reasons})")
        return ", ".join(parts)


_EXPECTED = {"pt": Text, "sft": Conversation, "classify": Labeled}


def _encode_one(example, tokenizer, stage, max_length, train_on_prompt, label2id) -> list[dict]:
    expected = _EXPECTED[stage]
    if not isinstance(example, expected):
        raise DataError(f"stage '{stage}' needs {expected.__name__} examples, got {type(example).__name__}",
                        getattr(example, "source", None))
    if stage == "pt":
        return encode_text(tokenizer, example, max_length)
    if stage == "sft":
        return [encode_conversation(tokenizer, example, max_length, train_on_prompt)]
    return [encode_labeled(tokenizer, example, label2id, max_length)]


def _trained(feature: dict) -> int:
    if "label" in feature:
        return 1
    return sum(label != IGNORE for label in feature["labels"][1:])  # the first token is never predicted


def encode_all(examples: Iterable, tokenizer, stage: str, *, max_length: int, train_on_prompt: bool = False,
               label2id: dict | None = None, skip_invalid: bool = False) -> tuple[list[dict], EncodeStats]:
    """Encode a dataset for `stage` ("pt", "sft", "classify"). Per-example problems raise a DataError naming
    the example's source, or with skip_invalid are skipped and counted by reason in the stats."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")
    examples = list(examples)
    if stage == "sft":
        check_chat_template(tokenizer)  # a config problem, never skipped row by row
    if stage == "classify" and label2id is None:
        label2id = {label: i for i, label in enumerate(sorted({e.label for e in examples}))}
    features: list[dict] = []
    stats = EncodeStats()
    for example in examples:
        encoded = stats.attempt(lambda: _encode_one(example, tokenizer, stage, max_length, train_on_prompt,
                                                    label2id), skip_invalid)
        if encoded is None:
            continue
        stats.examples += 1
        stats.truncated += any(f["truncated"] for f in encoded)
        for feature in encoded:
            stats.lengths.append(len(feature["input_ids"]))
            stats.trained_tokens += _trained(feature)
        features.extend(encoded)
    return features, stats
