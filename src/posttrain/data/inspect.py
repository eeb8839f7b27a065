"""`posttrain data inspect`: what a data file looks like to posttrain, before a training run.

Reads the file through the data layer that training uses, collecting every problem instead of stopping at the
first: format, stage, row counts, problems with file:line locations, labels, token lengths (with --model) and one
example as the model sees it. Rankings (the input of `posttrain data pairs`) show the pairs they expand to.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from jinja2 import TemplateError

from ..config import DataSource
from ..errors import ConfigError, DataError
from . import preference
from .encode import IGNORE, EncodeStats, SkippableError, render_chat, encode_all, render_turns
from .examples import Conversation, Feedback, Labeled, Preference, Ranking
from .formats import skip_reason, check_kind, detect_format, to_example
from .pairs import response_text, encode_feedbacks, encode_preferences
from .sources import read_dataset_info, read_rows, resolve_source

# as in posttrain.stages.STAGES; "rankings" is no training stage but the input of `posttrain data pairs`
KINDS = {"pt": "text", "sft": "conversation", "classify": "labeled", "rm": "preference", "dpo": "preference",
         "kto": "feedback", "rankings": "ranking"}
STAGE_OF_FORMAT = {"text": "pt", "classification": "classify", "feedback": "kto", "ranking": "rankings",
                   **dict.fromkeys(preference.KIND_FORMATS["preference"], "dpo")}  # every other (chat) format: sft
GUESSED = {"dpo": " (guessed from the format: rm or dpo; --stage to choose)",
           "rankings": " (no stage trains on rankings: `posttrain data pairs` expands them into pairs for rm and dpo)"}
PAIRED = ("rm", "dpo", "kto", "rankings")  # prompt and responses encoded apart (data/pairs.py)
SHOW_PROBLEMS = 5
UNLIMITED = 10 ** 9  # encode without truncation to see the real lengths; --max-length is applied after
TEMPLATE_HINT = ("pass --chat-template (inline Jinja or a path to a .jinja file) here, and set `chat_template:` "
                 "in the training config")


@dataclass
class Findings:
    """Every problem (with its reason) and warning met while inspecting, reported at the end."""

    problems: list = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    warnings: list = field(default_factory=list)

    def add(self, error: Exception, example=None) -> None:
        if isinstance(error, TemplateError):  # a template may refuse a chat (raise_exception)
            error = DataError(f"the chat template failed: {error}", location=example.source, field="messages")
        self.problems.append(error)
        self.reasons[error.kind if isinstance(error, SkippableError) else skip_reason(error)] += 1

    def report(self) -> list[str]:
        """Problems by reason and the first few in file order, then the warnings."""
        lines = []
        if self.problems:
            lines.append(f"problems ({sum(self.reasons.values())}) by reason:")
            lines += [f"  {n} x {reason}" for reason, n in self.reasons.most_common()]
            lines.append("first problems:")
            lines += [f"  {error}" for error in sorted(self.problems, key=_line_key)[:SHOW_PROBLEMS]]
            lines.append("  (training stops at the first problem; data.skip_invalid=true skips and counts them)")
        if self.warnings:
            lines += ["warnings:"] + [f"  - {w}" for w in self.warnings]
        return lines


def _line_key(error: DataError) -> int:
    """Problems in file order: the line/row number at the end of their location."""
    match = re.search(r"(\d+)$", error.location or "")
    return int(match.group(1)) if match else 0


def _spread(values: list[int]) -> str:
    values = sorted(values)
    at = [values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] for q in (0.5, 0.95)]
    return f"min {values[0]} / mean {sum(values) / len(values):.1f} / p50 {at[0]} / p95 {at[1]} / max {values[-1]}"


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def _row_kind(data: dict) -> str | None:
    """The preference-family kind one row's (canonical) keys suggest, or None for the other formats."""
    if {"chosen", "rejected"} <= set(data) or {"chosen_messages", "rejected_messages"} <= set(data):
        return "preference"
    if "responses" in data:
        return "ranking"
    labels = [data[key] for key in ("label", "kto_tag") if data.get(key) is not None]
    booleans = all(isinstance(v, bool) or str(v).strip().lower() in ("true", "false") for v in labels)
    answers = data.keys() & {"messages", "conversations", "prompt", "completion", "instruction"}
    return "feedback" if labels and booleans and answers else None


def _sniff_kind(rows: list, columns: dict | None) -> str | None:
    """The kind most of the first rows suggest, so that detect_format reads them for the right stage."""
    renames = {column: canonical for canonical, column in (columns or {}).items()}
    kinds = Counter(_row_kind({renames.get(k, k): v for k, v in row.data.items()}) for row in rows[:20])
    return kinds.most_common(1)[0][0]


def _info_kind(info: dict | None, name: str) -> str:
    """The kind a dataset_info entry declares (ranking: true, a kto_tag column) when --stage is not given."""
    entry = (info or {}).get(name)
    entry = entry if isinstance(entry, dict) else {}
    if entry.get("ranking"):
        return "preference"
    return "feedback" if "kto_tag" in (entry.get("columns") or {}) else "conversation"


def _read_examples(file: str, stage: str | None, dataset_info: str | None,
                   found: Findings) -> tuple[list[str], str, list]:
    """Read and normalise the file as training would, collecting every problem instead of stopping at the
    first; returns the report's opening lines (file, format, stage, rows), the stage and the examples."""
    info = read_dataset_info(dataset_info) if dataset_info else None
    plan = resolve_source(DataSource(path=str(file)), info, dataset_info,
                          KINDS[stage] if stage else _info_kind(info, str(file)))
    notes: list[str] = []
    rows = read_rows(plan.path, errors=found.problems, notes=notes)
    unreadable = len(found.problems)  # lines that are not even a record (bad JSON, wrong CSV field count)
    found.reasons.update(skip_reason(error) for error in found.problems)
    out = [f"file: {plan.path}" + (f" (dataset '{file}' in {dataset_info})" if plan.path != str(file) else "")]
    out += [f"read: {note}" for note in notes]
    fmt = plan.format
    if fmt == "auto" and rows:
        kind = KINDS[stage] if stage else _sniff_kind(rows, plan.columns)
        fmt = detect_format(rows, plan.path, kind=kind, columns=plan.columns)
        out.append(f"format: {fmt} (detected from the columns)")
    else:
        out.append(f"format: {fmt if fmt != 'auto' else 'unknown (no rows)'}")
    guessed, stage = stage is None, stage or STAGE_OF_FORMAT.get(fmt, "sft")
    if not (guessed and fmt == "auto"):
        out.append(f"stage: {stage}" + (GUESSED.get(stage, " (guessed from the format; --stage to choose)")
                                        if guessed else ""))
    examples, dropped = [], Counter()
    if rows:
        check_kind(fmt, KINDS[stage], plan.path)
        for row in rows:
            try:
                examples.append(to_example(row, fmt, kind=KINDS[stage], columns=plan.columns, tags=plan.tags))
            except preference.IdenticalPair as pair:  # valid, left out on purpose (as LoadReport.dropped)
                dropped[pair.reason] += 1
            except DataError as error:
                found.add(error)
    read = len(rows) + unreadable
    out.append(f"rows: {read} read, {len(examples)} usable, {read - len(examples) - sum(dropped.values())} invalid"
               + "".join(f", {n} skipped ({reason}; training skips them too)" for reason, n in dropped.items()))
    return out, stage, examples


def _label_report(examples: list, stage: str, found: Findings) -> list[str]:
    """Classes (classify) or desirable/undesirable completions (kto)."""
    counts = Counter(e.label if stage == "classify" else ("undesirable", "desirable")[e.desirable] for e in examples)
    if len(counts) < 2:
        found.warnings.append(f"classify needs at least 2 labels, found {sorted(counts)}" if stage == "classify"
                              else f"only {next(iter(counts))} completions: kto learns from both kinds")
    return [f"labels ({len(counts)}):"] + [f"  {label}: {n} ({100 * n / len(examples):.1f}%)"
                                           for label, n in counts.most_common()]


def _ranking_report(rankings: list, found: Findings) -> tuple[list[str], list[Preference]]:
    """Rankings and the pairs `posttrain data pairs` expands them to (ties and identical pairs skipped)."""
    sizes = [len(r.responses) for r in rankings]
    pairs = [pair for r in rankings for pair in preference.expand_ranking(r)]
    usable = [pair for pair in pairs if pair.chosen != pair.rejected]
    skipped = f"{sum(preference._ties(r) for r in rankings)} tied pairs skipped"
    if len(pairs) > len(usable):
        skipped += f", {len(pairs) - len(usable)} identical pairs skipped"
    if not usable:
        found.warnings.append("the rankings expand to no pairs: every response is tied or identical")
    return [f"rankings: {len(rankings)}; responses per ranking: min {min(sizes)} / "
            f"mean {sum(sizes) / len(sizes):.1f} / max {max(sizes)}",
            f"  `posttrain data pairs` expands them to {len(usable)} pairs ({skipped})"], usable


def _responses(example) -> list[tuple[str, list]]:
    """(name, messages) of each response of a Preference, Feedback or Ranking."""
    if isinstance(example, Preference):
        return [("chosen", example.chosen), ("rejected", example.rejected)]
    if isinstance(example, Feedback):
        return [(f"completion ({'desirable' if example.desirable else 'undesirable'})", example.completion)]
    return [(f"response {i} (rank {rank})", r) for i, (r, rank) in enumerate(zip(example.responses, example.ranks))]


def _normalised(example) -> list[str]:
    """One example as plain lines (no tokenizer)."""
    def said(messages, indent="  "):
        return [f"{indent}{m['role']}: {m.get('content', '')}"
                + (f" [tool_calls: {m['tool_calls']}]" if m.get("tool_calls") else "") for m in messages]
    if isinstance(example, (Preference, Feedback, Ranking)):
        parts = [("prompt", example.prompt)] + _responses(example)
        return [line for name, messages in parts for line in [f"  {name}:"] + said(messages, "    ")]
    if isinstance(example, Conversation):
        tools = [f"  tools: {[t.get('function', t).get('name') for t in example.tools]}"] if example.tools else []
        return tools + said(example.messages)
    if isinstance(example, Labeled):
        return [f"  label: {example.label}", f"  text: {_short(example.text)}"]
    return [f"  {line}" for line in _short(example.text).split("\n")]


def _encoded(examples: list, encode, found: Findings) -> list[tuple]:
    """(example, features) for every example that encodes untruncated; the others become problems (one
    example at a time, so that every problem keeps its location)."""
    done = []
    for example in examples:
        try:
            done.append((example, encode([example])[0]))
        except (DataError, TemplateError) as error:
            found.add(error, example)
    return done


def _length_head(encoded: int, total: int) -> list[str]:
    if not encoded:
        return ["tokens: no example could be encoded"]
    return [f"encoding: {total - encoded} of {total} examples failed (see problems)"] if encoded < total else []


def _truncation_warning(truncated: int, encoded: int, max_length: int, found: Findings) -> None:
    if truncated:
        found.warnings.append(f"{truncated} of {encoded} examples are longer than max_length {max_length} "
                              "and will be truncated (raise --max-length / data.max_length?)")


def _token_report(examples: list, tokenizer, stage: str, max_length: int, found: Findings) -> list[str]:
    """pt/sft/classify: length statistics at --max-length, computed from untruncated encodings."""
    label2id = {label: i for i, label in enumerate(sorted({e.label for e in examples}))} if stage == "classify" \
        else None
    left_out = EncodeStats()  # what the chat template leaves out of assistant turns, over all examples

    def encode(batch):
        features, stats = encode_all(batch, tokenizer, stage, max_length=UNLIMITED, label2id=label2id, warn=False)
        left_out.left_out.update(stats.left_out)
        return features, stats

    done = _encoded(examples, encode, found)
    found.warnings += left_out.warnings()
    lengths = [len(features[0]["input_ids"]) for _, features in done]
    if not lengths:
        return _length_head(0, len(examples))
    truncated = sum(n > max_length for n in lengths) if stage != "pt" else 0
    lines = _length_head(len(lengths), len(examples)) + [f"tokens per example: {_spread(lengths)}"]
    if stage == "pt":
        chunks = sum(-(-n // max_length) for n in lengths)  # the first token of every chunk is not predicted
        lines.append(f"  at max_length {max_length}: {len(lengths)} texts -> {chunks} sequences "
                     f"(longer texts are split, nothing is lost); {sum(lengths) - chunks} trained tokens")
    else:
        lines.append(f"  truncated at max_length {max_length}: {truncated} of {len(lengths)}")
    if stage == "sft":
        kept = [sum(label != IGNORE for label in features[0]["labels"][1:max_length]) for _, features in done]
        lines.append(f"  trained tokens at max_length {max_length}: {sum(kept)} "
                     f"({sum(kept) / len(kept):.1f} per example)")
        if kept.count(0):
            lines.append(f"  prompt longer than max_length: {kept.count(0)} (nothing left to train on; "
                         "training fails on them unless data.skip_invalid=true skips them)")
            found.warnings.append(f"{kept.count(0)} examples have a prompt longer than max_length {max_length}")
    _truncation_warning(truncated, len(lengths), max_length, found)
    return lines


def _pair_token_report(examples: list, tokenizer, max_length: int, found: Findings) -> list[str]:
    """rm/dpo/kto: prompt and response lengths, untruncated, and what pairs.py's truncation rule would cut at
    --max-length (the prompt keeps its last max_length // 2 tokens, each response its first tokens)."""
    encode_some = encode_feedbacks if isinstance(examples[0], Feedback) else encode_preferences
    left_out = EncodeStats()  # what the chat template leaves out of the responses, over all examples

    def encode(batch):
        features, stats = encode_some(batch, tokenizer, max_length=UNLIMITED, warn=False)
        left_out.left_out.update(stats.left_out)
        return features

    done = _encoded(examples, encode, found)
    found.warnings += left_out.warnings()
    names = ["prompt"] + [name.split()[0] for name, _ in _responses(examples[0])]
    lengths = [[len(feature[f"{name}_ids"]) for name in names] for _, feature in done]
    if not lengths:
        return _length_head(0, len(examples))
    keep, long = max_length // 2, [(p, rs) for p, *rs in lengths if p + max(rs) > max_length]
    cut_responses = sum(n > max_length - min(p, keep) for p, rs in long for n in rs)
    lines = _length_head(len(lengths), len(examples))
    lines += [f"tokens ({name}): {_spread(values)}" for name, values in zip(names, zip(*lengths))]
    lines.append(f"  truncated at max_length {max_length}: {len(long)} of {len(lengths)} (the prompt keeps its "
                 f"last {keep} tokens: {sum(p > keep for p, _ in long)} prompts cut; responses keep their first "
                 f"tokens: {cut_responses} responses cut)")
    _truncation_warning(len(long), len(lengths), max_length, found)
    return lines


def _marked(text: str, spans: list[tuple[int, int]]) -> str:
    """The rendered text with trained spans in [[ ]] (or green on a terminal)."""
    start_mark, end_mark = ("\x1b[32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
    out, at = [], 0
    for start, end in sorted(spans):
        out += [text[at:start], start_mark, text[start:end], end_mark]
        at = end
    return "".join(out + [text[at:]])


def _rendered(example, tokenizer) -> list[str]:
    head = f"example ({example.source}) rendered with the chat template; trained text in " \
           + ("green:" if sys.stdout.isatty() else "[[ ]]:")
    if isinstance(example, (Preference, Feedback)):  # the prompt once, then each response as trained after it
        prompt = render_chat(tokenizer, example.prompt, None, generation_prompt=True)
        lines = [head, "prompt:", _short(prompt, 4000)]
        for name, response in _responses(example):
            text = response_text(tokenizer, example.prompt, prompt, response, example.source)
            lines += [f"{name}:", _short(_marked(text, [(0, len(text))]), 4000)]
        return lines
    if isinstance(example, Conversation):
        text, turns = render_turns(tokenizer, example)
        return [head, _short(_marked(text, [turn.span for turn in turns if turn.trained]), 4000)]
    text = tokenizer.decode(tokenizer(example.text, add_special_tokens=True)["input_ids"])
    label = f", label {example.label}:" if isinstance(example, Labeled) else " (all trained):"
    return [f"example ({example.source}) as the tokenizer reads it{label}", _short(text)]


def _example_report(examples: list, stage: str, model: str | None, max_length: int, chat_template: str | None,
                    found: Findings) -> list[str]:
    """Token lengths and the first example rendered for the model (with a model), else normalised."""
    if not model:
        if chat_template:
            found.warnings.append("--chat-template is only used together with --model")
        return [f"example ({examples[0].source}, normalised):"] + _normalised(examples[0])
    from ..modeling import load_tokenizer

    tokenizer = load_tokenizer(model, chat_template)
    if stage not in ("pt", "classify") and not getattr(tokenizer, "chat_template", None):
        found.warnings.append(f"the tokenizer of {model} has no chat template: {TEMPLATE_HINT}")
        return (["tokens: not computed (no chat template)", "example (normalised, no chat template to render it):"]
                + _normalised(examples[0]))
    if stage in PAIRED:
        lines = _pair_token_report(examples, tokenizer, max_length, found)
    else:
        lines = _token_report(examples, tokenizer, stage, max_length, found)
    try:
        return lines + _rendered(examples[0], tokenizer)
    except (DataError, TemplateError) as error:
        return lines + [f"example ({examples[0].source}, normalised; rendering failed: {error}):"] \
            + _normalised(examples[0])


def inspect_data(file: str, *, model: str | None = None, stage: str | None = None, max_length: int = 1024,
                 dataset_info: str | None = None, chat_template: str | None = None) -> str:
    """The report `posttrain data inspect` prints for one data file (or dataset_info entry)."""
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {max_length}")
    found = Findings()
    out, stage, examples = _read_examples(file, stage, dataset_info, found)
    if not examples:
        found.warnings.append("no usable examples: training on this file would fail")
    elif stage in ("classify", "kto"):
        out += _label_report(examples, stage, found)
    elif stage == "rankings":
        lines, pairs = _ranking_report(examples, found)
        out += lines
        examples = pairs if model else examples  # tokens and rendering: the pairs training would see
    if examples:
        out += _example_report(examples, stage, model, max_length, chat_template, found)
    return "\n".join(out + found.report())
