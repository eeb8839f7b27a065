"""Tokenisation with loss masks: canonical examples -> {"input_ids", "labels"} features.

Conversations are masked with the tokenizer's own chat template (any template, no `{% generation %}`
tags needed): the template is rendered incrementally to find which characters of the final text belong
to assistant turns, and the full text is tokenized once with offsets to map those characters to tokens.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from posttrain.data.examples import Conversation, Labeled, Text
from posttrain.data.vision import IMAGE_SLOT, Pictures, content_parts
from posttrain.errors import ConfigError, DataError

log = logging.getLogger("posttrain")

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


@dataclass(frozen=True)
class TemplateFacts:
    """What a chat template expects and does, probed once per template (see `template_facts`)."""

    call_content: str | None  # the content of an assistant turn that has tool calls and no text: None or ""
    string_arguments: bool  # tool-call arguments as a JSON string (DeepSeek-V3) instead of an object
    stops: tuple[str, ...]  # end-of-turn markers: where generation stops, so where a trained turn ends
    string_content: bool = True  # renders a string content (some VLM templates read only a list of parts)


_FACTS: dict[tuple, TemplateFacts] = {}
_PROBE_CALL = "posttrain_probe_tool"


def _call_style(tokenizer) -> tuple[str | None, bool]:
    """How to hand the template a tool-call turn without text. OpenAI's form (content None, arguments an
    object) first; DeepSeek-V3 writes tool calls only for content None and joins the arguments as a string;
    some templates fail on None (Qwen3's first template) or write it out as "None" (Llama-3's `| trim`). The
    first form that renders the call is taken, else the first that renders at all (the calls are then
    reported as left out)."""
    def render(content, as_string: bool) -> str | None:
        call = {"type": "function", "function": {"name": _PROBE_CALL,
                                                 "arguments": '{"x": 1}' if as_string else {"x": 1}}}
        try:
            return _apply(tokenizer, [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": content, "tool_calls": [call]}], None, False)
        except Exception:  # noqa: BLE001 - a form this template cannot take
            return None

    styles = [(None, False), ("", False), (None, True), ("", True)]
    texts = {style: render(*style) for style in styles}
    usable = [style for style in styles if texts[style] is not None and not (  # None written out as text
        style[0] is None and texts[style].count("None") > (texts["", style[1]] or "").count("None"))]
    with_call = [style for style in usable if _PROBE_CALL in texts[style]]
    return (with_call or usable or [("", False)])[0]


def template_facts(tokenizer) -> TemplateFacts:
    from ..modeling import end_of_turn_token_ids  # the tokens generation stops at, shared with the engine

    key = (str(tokenizer.chat_template), tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__)
    if key not in _FACTS:
        stops = tuple(dict.fromkeys(tokenizer.decode([i]) for i in end_of_turn_token_ids(tokenizer)))
        _FACTS[key] = TemplateFacts(*_call_style(tokenizer), tuple(s for s in stops if s.strip()),
                                    _renders_strings(tokenizer))
    return _FACTS[key]


def _renders_strings(tokenizer) -> bool:
    """Whether the template writes a message whose content is a string; LLaVA's and SmolVLM's templates iterate
    over content parts and would silently drop a string (then every content is handed over as text parts)."""
    try:
        text = _apply(tokenizer, [{"role": "user", "content": "posttrain-user"},
                                  {"role": "assistant", "content": "posttrain-answer"}], None, False)
    except Exception:  # noqa: BLE001 - a template that fails here fails later with its own message
        return True
    return "posttrain-user" in text and "posttrain-answer" in text


def _for_template(messages: list[dict], facts: TemplateFacts) -> list[dict]:
    """Tool-call turns in the form the template expects (see _call_style); a content with image slots (or any
    string content, for templates that read only parts) as content parts, images where their slots are (see
    data/vision.py); other messages unchanged."""
    out = []
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            message = {**message, "content": message.get("content") or facts.call_content}
            if facts.string_arguments:
                message["tool_calls"] = [_string_arguments(call) for call in message["tool_calls"]]
        content = message.get("content")
        if isinstance(content, str) and (IMAGE_SLOT in content or not facts.string_content):
            message = {**message, "content": content_parts(content)}
        out.append(message)
    return out


def _string_arguments(call: dict) -> dict:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    function = {**function, "arguments": arguments}
    return {**call, "function": function} if "function" in call else function


def _apply(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    """`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)`, except that a content None
    reaches the template as None: transformers drops None-valued keys first, and DeepSeek-V3's template
    writes tool calls only when the content is None."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools or None, documents=None,
                                        chat_template=tokenizer.get_chat_template(None, tools or None),
                                        add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map)
    return rendered[0]


def render_chat(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    """The chat as the tokenizer's template writes it, tool-call turns in the form the template expects."""
    check_chat_template(tokenizer)
    return _apply(tokenizer, _for_template(messages, template_facts(tokenizer)), tools, generation_prompt)


def _try_render(tokenizer, messages, tools, generation_prompt) -> str | None:
    """Some templates cannot render a partial chat (e.g. one that starts with an assistant turn)."""
    try:
        return render_chat(tokenizer, messages, tools, generation_prompt)
    except Exception:  # noqa: BLE001 - any template failure just means "use the fallback"
        return None


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """A turn's text up to and with its first end-of-turn marker (generation stops there: whatever a template
    writes after it, such as a header it always appends, is never generated), else without trailing space."""
    ends = [text.find(stop) + len(stop) for stop in stops if stop in text]
    return text[:min(ends)] if ends else text.rstrip()


# --------------------------------------------------------------------------- finding assistant turns

def _squash(text: str) -> str:
    return " ".join(text.split())


def _parts(message: dict) -> tuple[str, str, list[str]]:
    """(reasoning, answer, tool names) of an assistant message, whitespace squashed. The reasoning is the
    message's `reasoning_content` or a <think>...</think> block at the start of its content (as Qwen3 reads it)."""
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    reasoning, answer = message.get("reasoning_content") or "", content
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        reasoning = reasoning or content.split("</think>")[0].split("<think>")[-1]
    names = [call.get("function", call).get("name") for call in message.get("tool_calls") or []]
    return _squash(reasoning), _squash(answer), [name for name in names if isinstance(name, str) and name]


def missing_parts(message: dict, final: str, kept: str) -> tuple[str, ...]:
    """The parts of `message` missing from `kept` (its text in the whole chat); `final` is its text as the
    final turn, which tells reasoning dropped from earlier turns from reasoning that is never rendered."""
    reasoning, answer, names = _parts(message)
    final, kept = _squash(final), _squash(kept)
    missing = []
    if reasoning and reasoning not in kept:
        missing.append("reasoning" if reasoning in final else "reasoning even as the final turn")
    if answer and answer not in kept:
        missing.append("content")
    if any(name not in kept for name in names):
        missing.append("tool calls")
    return tuple(missing)


@dataclass
class Turn:
    """Assistant message `index` in the rendered chat: its character `span` (content and end-of-turn marker),
    the parts of the message the template left out of it, and `alone`: (the chat rendered up to this turn as
    the final one, the turn's span in it), for data.keep_reasoning."""

    index: int
    span: Span
    left_out: tuple[str, ...] = ()
    alone: tuple[str, Span] | None = None
    trained: bool = True  # False when nothing of the message is in the text (content and tool calls left out)


SENTINEL = "\x00posttrain-assistant-content\x00"


def _alone(tokenizer, conv: Conversation, i: int, stops) -> tuple[str, str, str] | None:
    """(the chat before message i with the generation prompt, the chat up to message i, message i's text as
    the final turn: what the model generates after that prompt, up to and with the end-of-turn marker)."""
    prefix = _try_render(tokenizer, conv.messages[:i], conv.tools, True) if i else ""
    upto = _try_render(tokenizer, conv.messages[: i + 1], conv.tools, False)
    if prefix is None or upto is None or not upto.startswith(prefix):
        return None
    return prefix, upto, _cut(upto[len(prefix):], stops)


def _locate(tokenizer, conv: Conversation, i: int, full: str, stops) -> Span | None:
    """Fallback for templates that render the chat before turn i differently once more follows (e.g. a system
    prompt moved to the last user turn): render the whole chat with message i's content replaced by a
    sentinel; the text around the sentinel must match the real rendering, and what lies between is the
    content as the template wrote it, followed by the end-of-turn marker."""
    messages = [*conv.messages[:i], {**conv.messages[i], "content": SENTINEL}, *conv.messages[i + 1:]]
    marked = _try_render(tokenizer, messages, conv.tools, False)
    if marked is None or marked.count(SENTINEL) != 1:
        return None
    before, after = marked.split(SENTINEL)
    start, end = len(before), len(full) - len(after)
    if start > end or not (full.startswith(before) and full.endswith(after)):
        return None
    last = _try_render(tokenizer, messages[: i + 1], conv.tools, False)
    marker = _cut(last.split(SENTINEL)[-1], stops) if last and last.count(SENTINEL) == 1 else ""
    if marker and full.startswith(marker, end):
        end += len(marker)
    return start, end


def _find_turn(tokenizer, conv: Conversation, i: int, full: str, stops) -> Turn | None:
    """Message i's place in `full`: after the chat before it (with the generation prompt), its text as the
    final turn, or the end of that text when the template leaves out the beginning of earlier turns (Qwen3
    writes a <think> block only in turns after the last user message); else the sentinel fallback."""
    message, alone = conv.messages[i], _alone(tokenizer, conv, i, stops)
    if alone is not None and full.startswith(alone[0]):
        prefix, upto, text = alone
        start, rendered = len(prefix), set(missing_parts(message, text, text))
        for k in range(len(text)):  # k = 0: the whole text; k > 0: the template left out its first k characters
            if not full.startswith(text[k:], start):
                continue
            missing = missing_parts(message, text, text[k:])
            # only a beginning without the message's content or calls (reasoning, an empty <think>) may be missing
            if not {"content", "tool calls"} & set(missing) - rendered:
                return Turn(i, (start, start + len(text) - k), missing, (upto, (start, start + len(text))))
    span = _locate(tokenizer, conv, i, full, stops)
    if span is None or span[1] <= span[0]:
        return None
    final = alone[2] if alone else full[span[0]:span[1]]
    return Turn(i, span, missing_parts(message, final, full[span[0]:span[1]]),
                (alone[1], (len(alone[0]), len(alone[0]) + len(alone[2]))) if alone else None)


def render_turns(tokenizer, conv: Conversation) -> tuple[str, list[Turn]]:
    """Render `conv` with the tokenizer's template and find every assistant turn in the text. A chat the
    template refuses, or a turn that cannot be found, is a SkippableError naming the row."""
    check_chat_template(tokenizer)
    try:
        full = render_chat(tokenizer, conv.messages, conv.tools, generation_prompt=False)
    except Exception as exc:  # noqa: BLE001 - raise_exception('...'), or a type error inside the template
        raise SkippableError(f"the chat template cannot render this conversation: {exc}", conv.source,
                             "messages", "chat template error") from None
    stops = template_facts(tokenizer).stops
    turns = []
    for i, message in enumerate(conv.messages):
        if message.get("role") != "assistant":
            continue
        turn = _find_turn(tokenizer, conv, i, full, stops)
        if turn is None:
            raise SkippableError(f"could not find assistant message {i} in the text rendered by the chat template",
                                 conv.source, "messages", "assistant turn not found in the rendered chat")
        _, answer, names = _parts(message)
        present = {"content"} if answer else set()
        present |= {"tool calls"} if names else set()
        turn.trained = not (present and present <= set(turn.left_out))
        turns.append(turn)
    return full, turns


def assistant_spans(tokenizer, conv: Conversation) -> tuple[str, list[Span]]:
    """Render `conv` and return (text, character spans of every assistant turn incl. its end marker)."""
    full, turns = render_turns(tokenizer, conv)
    return full, [turn.span for turn in turns]


def _fast_encode(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("loss masking needs a fast tokenizer (one with a tokenizer.json)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template puts BOS itself
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _overlaps(offset: Span, spans: list[Span]) -> bool:
    start, end = offset
    return any(start < s_end and end > s_start for s_start, s_end in spans)


# --------------------------------------------------------------------------- encoders

def encode_conversation(tokenizer, conv: Conversation, max_length: int, train_on_prompt: bool = False,
                        keep_reasoning: bool = False, counts: Counter | None = None, vision=None) -> list[dict]:
    """[{"input_ids", "labels" (-100 where not trained), "truncated"}]: the whole chat with its assistant turns
    trained. With keep_reasoning, each turn whose reasoning the template drops from the whole chat is instead
    trained in a sequence of its own: the chat rendered up to that turn as the final one, only that turn trained
    (train_on_prompt applies to the whole chat). `counts` (if given) receives, per turn, the parts the template
    left out ("tool calls", "content", "reasoning", ...) and under "apart" the turns trained on their own.
    With `vision` (data/vision.py) a chat's images become image tokens and the feature's "images"."""
    if conv.images and vision is None:
        raise DataError("this example has images, which need a vision-language model", conv.source, "images")
    text, turns = render_turns(tokenizer, conv)
    apart = [turn for turn in turns if keep_reasoning and "reasoning" in turn.left_out and turn.alone]
    sequences = [(turn.alone[0], [turn.alone[1]], False) for turn in apart]
    sequences.append((text, [turn.span for turn in turns if turn.trained and turn not in apart], train_on_prompt))
    features = [feature for n, (rendered, spans, every) in enumerate(sequences)
                if (feature := _masked(tokenizer, conv, rendered, spans, every, max_length, vision,
                                       whole=n == len(sequences) - 1))]
    if not features:
        raise SkippableError("the conversation has no assistant message to train on", conv.source, "messages",
                             "no assistant message")
    if counts is not None:
        counts["apart"] += len(apart)
        for turn in turns:
            counts.update(part for part in turn.left_out if not (turn in apart and part == "reasoning"))
    return features


def _masked(tokenizer, conv: Conversation, text: str, spans: list[Span], every: bool, max_length: int, vision=None,
            whole: bool = True) -> dict | None:
    """One feature from a rendered text and its trained character spans; None when nothing is trained. `whole`:
    the text is the whole chat, so it must hold every image of the conversation."""
    input_ids, offsets = _fast_encode(tokenizer, text)
    trained = [every or _overlaps(o, spans) for o in offsets]
    if not any(trained):
        return None
    pictures = None
    if conv.images:
        input_ids, trained, pictures = expand_images(vision, input_ids, trained, conv.images, conv.source, whole)
    truncated = len(input_ids) > max_length
    if truncated and pictures and vision.image_token_id in input_ids[max_length:]:
        raise SkippableError(f"the image tokens do not fit in max_length ({len(input_ids)} tokens > {max_length})",
                             conv.source, "images", "images beyond max_length")
    if truncated and not any(trained[:max_length]):
        prompt = trained.index(True)
        raise SkippableError(f"prompt is longer than max_length ({prompt} tokens > {max_length})", conv.source,
                             "messages", "prompt longer than max_length")
    input_ids, trained = input_ids[:max_length], trained[:max_length]
    labels = [t if keep else IGNORE for t, keep in zip(input_ids, trained)]
    feature = {"input_ids": input_ids, "labels": labels, "truncated": truncated}
    if pictures:
        feature["images"] = pictures
    return feature


def expand_images(vision, input_ids: list[int], trained: list[bool], images: list[str], source, whole: bool = True):
    """(ids, trained flags, Pictures) with each image token repeated for its image (vision.Vision.expand); a text
    that should hold every image but does not (the template left some out), or an unreadable image, is a
    SkippableError naming the row."""
    try:
        input_ids, trained, used = vision.expand(input_ids, trained, images)
    except ValueError as exc:
        kind = "unreadable image" if str(exc).startswith("unreadable image") else "image tokens do not match"
        raise SkippableError(str(exc), source, "images", kind) from None
    if whole and used != len(images):
        raise SkippableError(f"the chat template wrote {used} image tokens for {len(images)} images", source,
                             "images", "image tokens do not match")
    return input_ids, trained, Pictures(tuple(images[:used]), vision) if used else None


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
    left_out: Counter = field(default_factory=Counter)  # part of assistant turns the template left out -> turns
    apart: int = 0  # turns trained in a sequence of their own to keep their reasoning (keep_reasoning)

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
        if self.apart:
            their = "its" if self.apart == 1 else "their"
            parts.append(f"{parse_turns(self.apart)} trained in {their} own sequence to keep {their} reasoning")
        return ", ".join(parts + [f"warning: {line}" for line in self.warnings()])

    def warnings(self) -> list[str]:
        """What the chat template left out of trained assistant turns, with counts."""
        return [LEFT_OUT[part].format(turns=parse_turns(n)) for part, n in self.left_out.most_common()]


LEFT_OUT = {
    "tool calls": "the chat template leaves out the tool calls of {turns}: they are not trained (use a template "
                  "that renders tool calls: `chat_template:`)",
    "content": "the chat template leaves out the content of {turns}: it is not trained",
    "reasoning": "the chat template drops the reasoning of {turns} from the whole chat (it writes a <think> "
                 "block only in a final turn): not trained; data.keep_reasoning: true trains each such turn in "
                 "a sequence of its own",
    "reasoning even as the final turn": "the chat template never renders the reasoning of {turns} (not even "
                                        "as the final turn): it is not trained",
}


def parse_turns(n: int) -> str:
    return f"{n} assistant turn" + ("" if n == 1 else "s")


_EXPECTED = {"pt": Text, "sft": Conversation, "classify": Labeled}


def _encode_one(example, tokenizer, stage, max_length, train_on_prompt, label2id, keep_reasoning,
                counts, vision=None) -> list[dict]:
    expected = _EXPECTED[stage]
    if not isinstance(example, expected):
        raise DataError(f"stage '{stage}' needs {expected.__name__} examples, got {type(example).__name__}",
                        getattr(example, "source", None))
    if stage == "pt":
        return encode_text(tokenizer, example, max_length)
    if stage == "sft":
        return encode_conversation(tokenizer, example, max_length, train_on_prompt, keep_reasoning, counts, vision)
    return [encode_labeled(tokenizer, example, label2id, max_length)]


def _trained(feature: dict) -> int:
    if "label" in feature:
        return 1
    return sum(label != IGNORE for label in feature["labels"][1:])  # the first token is never predicted


def encode_all(examples: Iterable, tokenizer, stage: str, *, max_length: int, train_on_prompt: bool = False,
               label2id: dict | None = None, skip_invalid: bool = False, keep_reasoning: bool = False,
               warn: bool = True, vision=None) -> tuple[list[dict], EncodeStats]:
    """Encode a dataset for `stage` ("pt", "sft", "classify"). Per-example problems raise a DataError naming
    the example's source, or with skip_invalid are skipped and counted by reason in the stats. What the chat
    template leaves out of assistant turns is counted in the stats and, with `warn`, logged once per kind.
    `vision` (data/vision.Vision, for a vision-language model) turns conversations' images into image tokens."""
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
        counts = Counter()
        encoded = stats.attempt(lambda: _encode_one(example, tokenizer, stage, max_length, train_on_prompt,
                                                    label2id, keep_reasoning, counts, vision), skip_invalid)
        if encoded is None:
            continue
        stats.apart += counts.pop("apart", 0)
        stats.left_out.update(counts)
        stats.examples += 1
        stats.truncated += any(f["truncated"] for f in encoded)
        for feature in encoded:
            stats.lengths.append(len(feature["input_ids"]))
            stats.trained_tokens += _trained(feature)
        features.extend(encoded)
    for line in stats.warnings() if warn else []:
        log.warning(line)
    return features, stats
