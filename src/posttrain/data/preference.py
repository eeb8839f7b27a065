"""Preference rows normalised into Preference, Feedback (KTO) and Ranking examples; rankings expanded to pairs.

Formats (formats.py detects them and calls `to_example`):
  preference           prompt/chosen/rejected (strings or messages; optional system, margin), or only
                       chosen/rejected as full conversations: the prompt is then their common message prefix
                       (LLaMA-Factory v1 names them chosen_messages/rejected_messages)
  preference_alpaca    LLaMA-Factory ranking data, alpaca style: instruction/input + chosen/rejected strings
  preference_sharegpt  LLaMA-Factory ranking data, sharegpt style: conversations + chosen/rejected messages
  feedback             messages (ending with the completion) or prompt/completion, plus a boolean label
                       (or LLaMA-Factory's kto_tag)
  ranking              prompt + responses (best first) + optional ranks (lower is better, equal = tie)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ..errors import DataError
from .chats import (ALPACA_JOIN, SHAREGPT_TAGS, MESSAGE_ROLES, RowFields, sharegpt_roles, parse_turn, parse_turns, type_name,
                    with_system)
from .examples import Feedback, Message, Preference, Ranking
from .sources import Row

log = logging.getLogger("posttrain")

KIND_FORMATS = {"preference": ("preference", "preference_alpaca", "preference_sharegpt"),
                "feedback": ("feedback",), "ranking": ("ranking",)}
FORMATS = tuple(fmt for formats in KIND_FORMATS.values() for fmt in formats)
NEEDS = {"preference": "stages rm and dpo need preference pairs (prompt/chosen/rejected, or chosen/rejected "
                       "conversations)",
         "feedback": "stage kto needs labelled completions (messages or prompt/completion, plus a boolean label)",
         "ranking": "rankings need a prompt and a list of responses (best first), optionally ranks"}
IDENTICAL = "chosen equals rejected"


class IdenticalPair(DataError):
    """A pair that teaches nothing (chosen == rejected): always skipped with a warning and counted."""


def guess(keys: set, kind: str) -> str | None:
    """The format one row's keys suggest for a preference-family `kind`, or None."""
    if kind == "preference" and keys & {"chosen", "rejected", "chosen_messages", "rejected_messages"}:
        if "conversations" in keys:
            return "preference_sharegpt"
        return "preference_alpaca" if "instruction" in keys else "preference"
    if kind == "feedback" and keys & {"messages", "conversations", "completion", "instruction", "label", "kto_tag"}:
        return "feedback"
    if kind == "ranking" and keys & {"responses", "ranks"}:
        return "ranking"
    return None


def to_example(row: Row, fmt: str, columns: dict | None, tags: dict | None, system: str | None):
    """Normalise one row of a preference-family format (see the module docstring)."""
    if fmt == "ranking":
        example = _ranking(RowFields(row, fmt, columns), system)
    elif fmt == "feedback":
        example = _feedback(row, columns, tags, system)
    else:
        example = _preference(row, fmt, columns, tags, system)
        if example.chosen == example.rejected:
            raise IdenticalPair(IDENTICAL, location=row.location, field=RowFields(row, fmt, columns).name("chosen"))
    example.source = row.location
    return example


# ---------------------------------------------------------------- prompts and responses

def prompt_value(f: RowFields, key: str, system: str | None) -> list[Message]:
    """A prompt string (one user message) or message list, with the row's system prompt; it must not end
    with an assistant turn, since what the model answers is the response."""
    value, name = f.require(key), f.name(key)
    if isinstance(value, list):
        messages = parse_turns(f, key, "role", "content", MESSAGE_ROLES)
    elif isinstance(value, str) and value.strip():
        messages = [{"role": "user", "content": value}]
    else:
        raise f.error("is empty" if isinstance(value, str) else
                      f"must be a string or a list of messages, got {type_name(value)}", name)
    messages = with_system(messages, f.string("system", required=False) or system)
    if not messages or messages[-1]["role"] in ("assistant", "system"):
        raise f.error("the prompt must end with a user (or tool) message", name)
    return messages


def _response_value(f: RowFields, value, where: str, role_key="role", content_key="content",
                    roles=MESSAGE_ROLES) -> list[Message]:
    """A response: a string (one assistant message), one message object, or a list of messages."""
    if value is None:
        raise f.error("required field is missing", where)
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        messages = [parse_turn(f, value, where, role_key, content_key, roles)]
    elif isinstance(value, list):
        messages = [parse_turn(f, m, f"{where}[{i}]", role_key, content_key, roles) for i, m in enumerate(value)]
    else:
        raise f.error(f"must be a string, a message or a list of messages, got {type_name(value)}", where)
    return _check_response(f, messages, where)


def _check_response(f: RowFields, messages: list[Message], where: str) -> list[Message]:
    """Assistant turns (tool results may sit between them), starting and ending with the assistant."""
    if not messages or messages[0]["role"] != "assistant" or messages[-1]["role"] != "assistant" \
            or any(m["role"] not in ("assistant", "tool") for m in messages):
        roles = [m["role"] for m in messages]
        raise f.error(f"the response must be assistant turns, got roles {roles}", where)
    return messages


def _margin(f: RowFields) -> float | None:
    value, name = f.get("margin"), f.name("margin")
    if value is None or value == "":
        return None
    try:
        margin = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        margin = math.nan
    if not math.isfinite(margin):
        raise f.error(f"must be a finite number, got {value!r}", name)
    return margin


# ---------------------------------------------------------------- the formats

def _preference(row: Row, fmt: str, columns: dict | None, tags: dict | None, system: str | None) -> Preference:
    if fmt == "preference_sharegpt":
        f = RowFields(row, "sharegpt", columns)
        tags = {**SHAREGPT_TAGS, **(tags or {})}
        style = (tags["role_tag"], tags["content_tag"], sharegpt_roles(tags))
        prompt = with_system(parse_turns(f, "conversations", *style), f.string("system", required=False) or system)
        if not prompt or prompt[-1]["role"] == "assistant":
            raise f.error("the conversation must end with the user turn that chosen/rejected answer",
                          f.name("conversations"))
        chosen, rejected = (_response_value(f, f.get(k), f.name(k), *style) for k in ("chosen", "rejected"))
    elif fmt == "preference_alpaca":
        f = RowFields(row, "alpaca", columns)
        query = ALPACA_JOIN.join(p for p in (f.string("instruction"), f.string("input", required=False)) if p)
        if not query.strip():
            raise f.error("is empty", f.name("instruction"))
        prompt = with_system([{"role": "user", "content": query}], f.string("system", required=False) or system)
        chosen, rejected = (_response_value(f, f.get(k), f.name(k)) for k in ("chosen", "rejected"))
    else:
        f = RowFields(row, fmt, columns)
        if f.get("prompt") is None and isinstance(f.get("chosen"), list):
            prompt, chosen, rejected = _implicit(f, system)
        else:
            prompt = prompt_value(f, "prompt", system)
            chosen, rejected = (_response_value(f, f.get(k), f.name(k)) for k in ("chosen", "rejected"))
    return Preference(prompt, chosen, rejected, margin=_margin(f))


def _implicit(f: RowFields, system: str | None) -> tuple[list[Message], list[Message], list[Message]]:
    """chosen/rejected as whole conversations: the prompt is their longest common message prefix, cut back
    to its last non-assistant message so that each response is the assistant turn(s) after it."""
    chosen, rejected = (with_system(parse_turns(f, k, "role", "content", MESSAGE_ROLES), system)
                        for k in ("chosen", "rejected"))
    if chosen == rejected:
        return chosen, [], []  # reported as an identical pair by the caller
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    while common and chosen[common - 1]["role"] == "assistant":
        common -= 1
    if common == 0:
        raise f.error("chosen and rejected share no prompt (no common leading messages)", f.name("chosen"))
    responses = [_check_response(f, side[common:], f.name(k)) for side, k in ((chosen, "chosen"),
                                                                             (rejected, "rejected"))]
    return chosen[:common], responses[0], responses[1]


def _label(f: RowFields) -> bool:
    key = "label" if f.get("label") is not None or f.get("kto_tag") is None else "kto_tag"
    value, name = f.require(key), f.name(key)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise f.error(f"must be a boolean (true or false), got {value!r}", name)
    return value


def _feedback(row: Row, columns: dict | None, tags: dict | None, system: str | None) -> Feedback:
    """LLaMA-Factory's alpaca KTO rows (instruction/input/output + kto_tag), an explicit prompt/completion
    split, or a conversation whose turns after the last user message are the completion."""
    keys = set(row.data) | set(columns or {})
    if "instruction" in row.data or keys & {"query", "response"}:  # LLaMA-Factory's alpaca column names
        f = RowFields(row, "alpaca", columns)
        query = ALPACA_JOIN.join(p for p in (f.string("instruction"), f.string("input", required=False)) if p)
        prompt = with_system([{"role": "user", "content": query}], f.string("system", required=False) or system)
        return Feedback(prompt, _response_value(f, f.string("output"), f.name("output")), _label(f))
    if "prompt" in keys or "completion" in keys:
        f = RowFields(row, "feedback", columns)
        prompt = prompt_value(f, "prompt", system)
        return Feedback(prompt, _response_value(f, f.get("completion"), f.name("completion")), _label(f))
    if "conversations" in keys or (columns or {}).get("messages") == "conversations":
        f, key, tags = RowFields(row, "sharegpt", columns), "conversations", {**SHAREGPT_TAGS, **(tags or {})}
        style = (tags["role_tag"], tags["content_tag"], sharegpt_roles(tags))
    else:
        f, key, style = RowFields(row, "messages", columns), "messages", ("role", "content", MESSAGE_ROLES)
    messages = with_system(parse_turns(f, key, *style), f.string("system", required=False) or system)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise f.error("the conversation has no user message", f.name(key))
    completion = _check_response(f, messages[users[-1] + 1:], f.name(key))
    return Feedback(messages[:users[-1] + 1], completion, _label(f))


def _ranking(f: RowFields, system: str | None) -> Ranking:
    prompt = prompt_value(f, "prompt", system)
    values, name = f.require("responses"), f.name("responses")
    if not isinstance(values, list):
        raise f.error(f"must be a list of responses, got {type_name(values)}", name)
    if len(values) < 2:
        raise f.error(f"a ranking needs at least 2 responses, got {len(values)}", name)
    responses = [_response_value(f, value, f"{name}[{i}]") for i, value in enumerate(values)]
    ranks, ranks_name = f.get("ranks"), f.name("ranks")
    if ranks is None:
        ranks = list(range(len(responses)))
    elif not (isinstance(ranks, list) and len(ranks) == len(responses)
              and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
        raise f.error(f"must be a list of {len(responses)} integers (one per response)", ranks_name)
    return Ranking(prompt, responses, list(ranks))


# ---------------------------------------------------------------- rankings -> pairs

def expand_ranking(ranking: Ranking) -> list[Preference]:
    """All ordered pairs of responses with different ranks, better first: for each response in rank order,
    each worse one in rank order (B > A > C > D gives BA, BC, BD, AC, AD, CD). Ties give no pair."""
    order = sorted(range(len(ranking.responses)), key=lambda i: (ranking.ranks[i], i))
    return [Preference(ranking.prompt, ranking.responses[a], ranking.responses[b], source=ranking.source)
            for n, a in enumerate(order) for b in order[n + 1:] if ranking.ranks[b] > ranking.ranks[a]]


def _ties(ranking: Ranking) -> int:
    ranks = ranking.ranks
    return sum(ranks[i] == ranks[j] for i in range(len(ranks)) for j in range(i + 1, len(ranks)))


def write_pairs(rankings_path, out_path, *, dataset_info: str | None = None, skip_invalid: bool = False) -> dict:
    """Expand a rankings file (any source `load_examples` reads) into a JSONL of pairs in messages form
    ({"prompt", "chosen", "rejected"} as message lists, so system prompts survive). Returns the counts.
    A response that appears twice in one ranking (sampled twice) gives its pairs once: a pair repeated
    within a ranking is skipped and counted in `repeats_skipped`, so no answer weighs more for being
    sampled more often."""
    from .formats import load_examples  # formats imports this module

    rankings, _ = load_examples(str(rankings_path), kind="ranking", dataset_info=dataset_info,
                                skip_invalid=skip_invalid)
    counts = {"rankings": len(rankings), "pairs": 0, "ties_skipped": 0, "identical_skipped": 0,
              "repeats_skipped": 0}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for ranking in rankings:
            counts["ties_skipped"] += _ties(ranking)
            written: set[str] = set()
            for pair in expand_ranking(ranking):
                if pair.chosen == pair.rejected:
                    log.warning("%s: skipped a pair whose chosen equals rejected", ranking.source)
                    counts["identical_skipped"] += 1
                    continue
                key = json.dumps([pair.chosen, pair.rejected], sort_keys=True)
                if key in written:
                    counts["repeats_skipped"] += 1
                    continue
                written.add(key)
                row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["pairs"] += 1
    return counts


def pairs_command(file, out) -> str:
    """`posttrain data pairs RANKINGS --out PAIRS`: expand and return a printable summary."""
    counts = write_pairs(file, out)
    skipped = f"{counts['ties_skipped']} tied pairs skipped"
    if counts["identical_skipped"]:
        skipped += f", {counts['identical_skipped']} identical pairs skipped"
    if counts["repeats_skipped"]:
        skipped += f", {counts['repeats_skipped']} repeated pairs skipped"
    return f"{file}: {counts['rankings']} rankings -> {counts['pairs']} pairs ({skipped}) -> {out}"
