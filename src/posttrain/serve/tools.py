"""Tool calls read back from generated text into OpenAI's `tool_calls`, for the formats of the templates we support.

* Hermes / Qwen (Qwen2.5, Qwen3, and any ChatML template that writes tool calls this way):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, whitespace around the JSON free.
* DeepSeek-V3: `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` then the arguments as a ```json fenced block, then
  `<｜tool▁call▁end｜>`, all inside `<｜tool▁calls▁begin｜>` ... `<｜tool▁calls▁end｜>`.

A block whose JSON does not parse, or has no name, is left in the content (never a half call). The content is the
text with the calls (and DeepSeek's outer markers) removed, stripped; None when nothing else is left.
"""
from __future__ import annotations

import json
import re
import uuid

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
DEEPSEEK = re.compile(r"<｜tool▁call▁begin｜>(?:function)?<｜tool▁sep｜>([^\n]+)\n```(?:json)?\s*(.*?)\s*```\s*"
                      r"<｜tool▁call▁end｜>", re.DOTALL)
DEEPSEEK_OUTER = re.compile(r"<｜tool▁calls▁(?:begin|end)｜>")


def _call(name, arguments) -> dict | None:
    if not isinstance(name, str) or not name:
        return None
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _hermes(match: re.Match) -> dict | None:
    try:
        body = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    return _call(body.get("name"), body.get("arguments", body.get("parameters")))


def _deepseek(match: re.Match) -> dict | None:
    try:
        arguments = json.loads(match.group(2))
    except json.JSONDecodeError:
        return None
    return _call(match.group(1).strip(), arguments)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated assistant message."""
    calls, spans = [], []
    for pattern, read in ((HERMES, _hermes), (DEEPSEEK, _deepseek)):
        for match in pattern.finditer(text):
            call = read(match)
            if call is not None:
                calls.append((match.start(), call))
                spans.append(match.span())
    if not calls:
        return text, []
    content = DEEPSEEK_OUTER.sub("", "".join(text[start:end] for start, end in _gaps(spans, len(text)))).strip()
    return content or None, [call for _, call in sorted(calls, key=lambda item: item[0])]


def _gaps(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    gaps, position = [], 0
    for start, end in sorted(spans):
        gaps.append((position, start))
        position = end
    gaps.append((position, length))
    return gaps
