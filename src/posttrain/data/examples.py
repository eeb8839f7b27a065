"""Canonical examples: every input format is normalised into one of these.

`source` is where the row came from, as "path:line" (jsonl, csv, txt) or "path:row N"
(json, parquet, saved datasets), so that later stages can still point at the row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A message is a plain dict {"role": "system"|"user"|"assistant"|"tool", "content": str},
# optionally with "tool_calls" (list) or "name" (str) as in OpenAI's format.
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


@dataclass
class Labeled:
    """A text with a class label (classification)."""

    text: str
    label: str
    source: str = ""


@dataclass
class Preference:
    """A prompt with a preferred and a dispreferred answer (later stages)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str = ""


@dataclass
class Prompt:
    """A prompt for online RL; `columns` are passed on to reward functions (later stages)."""

    messages: list[Message]
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""


Example = Text | Conversation | Labeled | Preference | Prompt
