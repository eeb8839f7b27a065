"""Conversation rows (alpaca, sharegpt, messages, prompt_completion) normalised into Conversations.

`RowFields` is a row seen through the user's column renames; every problem is a DataError naming the row's
location and the offending field as the file spells it. formats.py picks the format and calls these.
"""
from __future__ import annotations

import json

from ..errors import DataError
from .examples import Conversation, Message
from .sources import Row
from .vision import IMAGE_PARTS, IMAGE_PLACEHOLDER, raw_reference

# LLaMA-Factory's canonical column names -> ours, per format
_ALIASES = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
            "sharegpt": {"messages": "conversations"}, "text": {"prompt": "text"},
            "classification": {"prompt": "text"},
            "preference": {"chosen_messages": "chosen", "rejected_messages": "rejected"}}  # LLaMA-Factory v1
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                  "function": "tool"}  # OpenAI's older name for a tool result
ALPACA_JOIN = "\n"  # instruction + input, joined as LLaMA-Factory does ("instruction\ninput")
MEDIA_PARTS = ("image", "video", "audio", "input_image", "input_audio")  # image_url, video_url, input_audio, ...
IMAGES_NEED = ("images are read only by a vision-language model (one with an image processor) in sft, dpo, generate, "
               "eval and serve")


def media_refusal(what: str) -> str:
    """Why a media part or column cannot be used here: images without a vision-language model (or in a stage
    that does not read them), and videos or audio anywhere."""
    if "image" in what:
        return (f"{what}: {IMAGES_NEED}; a text-only model would train its <image> placeholders as plain text. "
                "Remove it or the row (data.skip_invalid: true skips such rows, counted)")
    return f"{what}: videos and audio are not supported (images are, with a vision-language model)"


class RowFields:
    """A row seen through the user's column renames; errors name the file's own column."""

    def __init__(self, row: Row, fmt: str, columns: dict | None):
        aliases = _ALIASES.get(fmt, {})
        self.names = {aliases.get(key, key): value for key, value in (columns or {}).items()}
        for file_name, canonical in aliases.items():  # LLaMA-Factory's column names work without a mapping
            if canonical not in self.names and canonical not in row.data and file_name in row.data:
                self.names[canonical] = file_name
        self.row = row

    def name(self, key: str) -> str:
        return self.names.get(key, key)

    def get(self, key: str):
        return self.row.data.get(self.name(key))

    def error(self, message: str, field: str) -> DataError:
        return DataError(message, location=self.row.location, field=field)

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            state = "is null" if self.name(key) in self.row.data else "is missing"
            raise self.error(f"required field {state}", self.name(key))
        return value

    def string(self, key: str, required: bool = True) -> str | None:
        value = self.require(key) if required else self.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(f"must be a string, got {type_name(value)}", self.name(key))
        return value


def type_name(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            str: "a string"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- messages, tool calls, tools

def parse_turns(f: RowFields, key: str, role_key: str, content_key: str, roles: dict) -> list[Message]:
    turns, name = f.require(key), f.name(key)
    if not isinstance(turns, list):
        raise f.error(f"must be a list of messages, got {type_name(turns)}", name)
    return [parse_turn(f, turn, f"{name}[{i}]", role_key, content_key, roles) for i, turn in enumerate(turns)]


def parse_turn(f: RowFields, turn, where: str, role_key: str, content_key: str, roles: dict) -> Message:
    """One message; a turn in the other common style ("role"/"content" or "from"/"value") is accepted."""
    if not isinstance(turn, dict):
        raise f.error(f"must be a message object, got {type_name(turn)}", where)
    if role_key not in turn and "role" in turn:
        role_key, content_key, roles = "role", "content", MESSAGE_ROLES
    elif role_key not in turn and "from" in turn:
        role_key, content_key, roles = "from", "value", sharegpt_roles(SHAREGPT_TAGS)
    tag = turn.get(role_key)
    if tag is None:
        raise f.error("required field is missing", f"{where}.{role_key}")
    role = roles.get(tag) if isinstance(tag, str) else None
    if role is None:
        raise f.error(f"unknown role {tag!r} (allowed: {', '.join(roles)})", f"{where}.{role_key}")
    raw, calls = turn.get(content_key), turn.get("tool_calls")
    _loss_weight(f, turn, "assistant" if role == "function_call" else role, where)
    if role == "function_call":  # sharegpt: the content is the call itself, as JSON
        calls = _function_call(f, raw, f"{where}.{content_key}")
        return {"role": "assistant", "content": "", "tool_calls": calls}
    message: Message = {"role": role}
    text, part_calls = ("", []) if raw is None and calls else _content(f, raw, f"{where}.{content_key}", role)
    if calls and role != "assistant":
        raise f.error(f"only assistant messages may carry tool calls, not {role}", f"{where}.tool_calls")
    calls = (_tool_calls(f, calls, f"{where}.tool_calls") if calls else []) + part_calls
    if calls:
        message["tool_calls"] = calls
    message["content"] = text
    for extra in ("name", "tool_call_id"):
        if isinstance(turn.get(extra), str):
            message[extra] = turn[extra]
    return message


def _loss_weight(f: RowFields, turn: dict, role: str, where: str) -> None:
    """LLaMA-Factory v1's per-message loss_weight: read when it is what we do anyway (1 for assistant turns,
    0 for the others); any other value is an error rather than silently ignored."""
    if "loss_weight" not in turn:
        return
    expected = 1.0 if role == "assistant" else 0.0
    if turn["loss_weight"] != expected or isinstance(turn["loss_weight"], bool):
        raise f.error(f"only the default loss weights are supported (1 on assistant turns, 0 on the others), "
                      f"got {turn['loss_weight']!r} on a {role} turn", f"{where}.loss_weight")


def sharegpt_roles(tags: dict) -> dict:
    return {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
            tags["function_tag"]: "function_call", tags["system_tag"]: "system"}


def _content(f: RowFields, raw, where: str, role: str) -> tuple[str, list[dict]]:
    """(text, tool calls) of a content value: a string, or a list of parts. Parts: text as OpenAI writes it
    ({"type": "text", "text": ...}) or LLaMA-Factory v1 ({"type": "text", "value": ...}), and v1's assistant
    "reasoning" (written as a leading <think> block, as reasoning models' templates read it) and "tool_call"
    (a JSON call) parts."""
    if isinstance(raw, str):
        return raw, []
    if raw is None:
        raise f.error("required field is missing", where)
    if not isinstance(raw, list):
        raise f.error(f"must be a string or a list of text parts, got {type_name(raw)}", where)
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(raw):
        at = f"{where}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise f.error(f"must be a string or a content part object, got {type_name(part)}", at)
        kind = part.get("type", "text")
        if kind in IMAGE_PARTS and f.row.images is not None:  # images allowed: a placeholder where it stands
            f.row.images.append((raw_reference(part), at))
            texts.append(IMAGE_PLACEHOLDER)
            continue
        if isinstance(kind, str) and kind.startswith(MEDIA_PARTS):
            raise f.error(media_refusal(f"{kind!r} part"), at)
        if kind not in ("text", "reasoning", "tool_call"):
            raise f.error(f"unsupported content part type {kind!r} (text, reasoning and tool_call parts are read)",
                          at)
        value = part.get("text", part.get("value"))
        if not isinstance(value, str):
            raise f.error(f"a {kind} part needs its text under 'text' or 'value' (its keys: {', '.join(part)})", at)
        if kind != "text" and role != "assistant":
            raise f.error(f"only assistant messages may carry {kind} parts, not {role}", at)
        if kind == "text":
            texts.append(value)
        elif kind == "reasoning":
            reasoning.append(value)
        else:
            calls += _function_call(f, value, at)
    text = "".join(texts)
    return (f"<think>\n{''.join(reasoning)}\n</think>\n\n{text}" if reasoning else text), calls


def _function_call(f: RowFields, raw, where: str) -> list[dict]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise f.error(f"function call is not valid JSON ({exc.msg})", where) from None
    return _tool_calls(f, raw, where)


def _tool_calls(f: RowFields, calls, where: str) -> list[dict]:
    """OpenAI tool calls, or bare {"name", "arguments"} objects, as [{"type": "function", "function": ...}]."""
    result = []
    for i, call in enumerate(calls if isinstance(calls, list) else [calls]):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            at = f"{where}[{i}]" if isinstance(calls, list) else where
            raise f.error("a tool call needs a 'name' (and 'arguments')", at)
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):  # OpenAI sends a JSON string; chat templates expect an object
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        result.append(entry)
    return result


def _tools(f: RowFields) -> list[dict] | None:
    """Tool definitions (a JSON string or a list), each as {"type": "function", "function": ...}."""
    raw, name = f.get("tools"), f.name("tools")
    if isinstance(raw, str):
        if not raw.strip():
            return None
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise f.error(f"not valid JSON ({exc.msg})", name) from None
    if not raw:
        return None
    tools = raw if isinstance(raw, list) else [raw]
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise f.error(f"must be a tool definition object, got {type_name(tool)}", f"{name}[{i}]")
    return [tool if "function" in tool else {"type": "function", "function": tool} for tool in tools]


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """A system prompt from a column (or the default) unless the conversation starts with one."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _check(f: RowFields, messages: list[Message], where: str) -> list[Message]:
    if not messages:
        raise f.error("the conversation is empty", where)
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is not None and first["role"] == "assistant":
        raise f.error("the first non-system message is from the assistant; it must follow a user message", where)
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise f.error("the conversation has no assistant turn with content", where)
    return messages


# ---------------------------------------------------------------- the formats

def alpaca_conversation(f: RowFields, system: str | None) -> Conversation:
    history, name = f.get("history") or [], f.name("history")
    if not isinstance(history, list):
        raise f.error(f"must be a list of [user, assistant] pairs, got {type_name(history)}", name)
    messages: list[Message] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise f.error("must be a [user, assistant] pair of strings", f"{name}[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, query = f.string("instruction"), f.string("input", required=False)
    prompt = ALPACA_JOIN.join(part for part in (instruction, query) if part)
    if not prompt.strip():
        raise f.error("is empty", f.name("instruction"))
    output = f.string("output")
    if not output.strip():
        raise f.error("is empty (no assistant answer)", f.name("output"))
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    messages = with_system(messages, f.string("system", required=False) or system)
    return Conversation(messages, tools=_tools(f))


def sharegpt_conversation(f: RowFields, tags: dict | None, system: str | None) -> Conversation:
    tags = {**SHAREGPT_TAGS, **(tags or {})}
    messages = parse_turns(f, "conversations", tags["role_tag"], tags["content_tag"], sharegpt_roles(tags))
    messages = with_system(messages, f.string("system", required=False) or system)
    return Conversation(_check(f, messages, f.name("conversations")), tools=_tools(f))


def messages_conversation(f: RowFields, system: str | None) -> Conversation:
    messages = with_system(parse_turns(f, "messages", "role", "content", MESSAGE_ROLES), system)
    return Conversation(_check(f, messages, f.name("messages")), tools=_tools(f))


def prompt_completion_conversation(f: RowFields, system: str | None) -> Conversation:
    parts = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = f.get(key)
        if isinstance(value, list):
            parts.append(parse_turns(f, key, "role", "content", MESSAGE_ROLES))
        elif not f.string(key).strip():
            raise f.error("is empty", f.name(key))
        else:
            parts.append([{"role": role, "content": value}])
    messages = with_system(parts[0] + parts[1], system)
    return Conversation(_check(f, messages, f.name("completion")), tools=_tools(f))
