"""Canonical examples: every input format is normalised into one of these.

`source` is where the row came from, as "path:line" (jsonl, csv, txt) or "path:row N"
(json, parquet, saved datasets), so that later stages can still point at the row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A message is a plain dict {"role": "system"|"user"|"assistant"|"tool", "content": str},
# optionally with "tool_calls" (list) or "name" (str) as in OpenAI's format. An image's place in the content is
# vision.IMAGE_SLOT; the example's `images` lists their references (absolute paths or data URLs) in text order.
Message = dict[str, Any]


@dataclass
class Text:
    """Raw text for continued pretraining."""

    text: str
    source: str = ""


@dataclass
class Conversation:
    """A chat: system/user/assistant/tool messages. Assistant turns are the trained spans."""

    messages: list[Message]
    tools: list[dict] | None = None
    source: str = ""
    images: list[str] = field(default_factory=list)


@dataclass
class Labeled:
    """A text with a class label (classification)."""

    text: str
    label: str
    source: str = ""


@dataclass
class Preference:
    """A prompt with a preferred and a dispreferred answer (stages rm, dpo).

    chosen/rejected are the assistant turn(s) that follow the prompt; `margin` is an optional per-pair
    target margin (e.g. a rating difference) used by the reward-model loss."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None
    source: str = ""
    images: list[str] = field(default_factory=list)  # the prompt's


@dataclass
class Ranking:
    """A prompt with K >= 2 responses; `ranks[i]` is response i's rank (lower is better, equal = tie).
    Expanded into Preference pairs by preference.expand_ranking."""

    prompt: list[Message]
    responses: list[list[Message]]
    ranks: list[int]
    source: str = ""


@dataclass
class Feedback:
    """An unpaired completion labelled desirable or not (stage kto)."""

    prompt: list[Message]
    completion: list[Message]
    desirable: bool
    source: str = ""


@dataclass
class Prompt:
    """A prompt for online RL; `columns` are passed on to reward functions (later stages)."""

    messages: list[Message]
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""


Example = Text | Conversation | Labeled | Preference | Ranking | Feedback | Prompt
