"""`posttrain data inspect`: what a data file looks like to posttrain, before a training run.

Reads the file through the same data layer as training (resolve_source -> read_rows -> detect_format
-> to_example -> encode_all), but collects every problem instead of stopping at the first, and reports
the format, the stage it suits, row counts, problems with their file:line locations, the label
distribution, token lengths (with --model) and one example as the model will see it.
"""
from __future__ import annotations

import re
import sys
from collections import Counter

from jinja2 import TemplateError

from ..config import DataSource
from ..errors import DataError
from .encode import IGNORE, SkippableError, assistant_spans, encode_all
from .examples import Conversation, Labeled
from .formats import _reason, check_kind, detect_format, to_example
from .sources import read_dataset_info, read_rows, resolve_source

KINDS = {"pt": "text", "sft": "conversation", "classify": "labeled"}  # as in posttrain.stages.STAGES
STAGE_OF_FORMAT = {"text": "pt", "classification": "classify"}  # every other (chat) format: sft
SHOW_PROBLEMS = 5
UNLIMITED = 10 ** 9  # encode without truncation to see the real lengths; --max-length is applied after
TEMPLATE_HINT = ("pass --chat-template (inline Jinja or a path to a .jinja file) here, and set `chat_template:` "
                 "in the training config")


def _line_key(error: DataError) -> int:
    """Problems in file order: the line/row number at the end of their location."""
    match = re.search(r"(\d+)$", error.location or "")
    return int(match.group(1)) if match else 0


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def _normalised(example) -> list[str]:
    """One example as plain lines (no tokenizer)."""
    if isinstance(example, Conversation):
        lines = [f"  {m['role']}: {m.get('content', '')}" + (f" [tool_calls: {m['tool_calls']}]"
                                                            if m.get("tool_calls") else "")
                 for m in example.messages]
        if example.tools:
            lines.insert(0, f"  tools: {[t.get('function', t).get('name') for t in example.tools]}")
        return lines
    if isinstance(example, Labeled):
        return [f"  label: {example.label}", f"  text: {_short(example.text)}"]
    return [f"  {line}" for line in _short(example.text).split("\n")]


def _marked(text: str, spans: list[tuple[int, int]]) -> str:
    """The rendered text with trained spans in [[ ]] (or green on a terminal)."""
    start_mark, end_mark = ("\x1b[32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
    out, at = [], 0
    for start, end in sorted(spans):
        out += [text[at:start], start_mark, text[start:end], end_mark]
        at = end
    out.append(text[at:])
    return "".join(out)


def _token_report(examples: list, tokenizer, stage: str, max_length: int, problems: list, reasons: Counter,
                  warnings: list) -> list[str]:
    """Length statistics at --max-length, computed from untruncated encodings (one example at a time so
    that every problem keeps its location)."""
    label2id = ({label: i for i, label in enumerate(sorted({e.label for e in examples}))}
                if stage == "classify" else None)
    lengths, trained, truncated, too_long_prompt, chunks = [], 0, 0, 0, 0
    for example in examples:
        try:
            features, _ = encode_all([example], tokenizer, stage, max_length=UNLIMITED, label2id=label2id)
        except SkippableError as error:
            problems.append(error)
            reasons[error.kind] += 1
            continue
        except (DataError, TemplateError) as error:
            if isinstance(error, TemplateError):  # a template may refuse a chat (raise_exception)
                error = DataError(f"the chat template failed: {error}", location=example.source, field="messages")
            problems.append(error)
            reasons[_reason(error)] += 1
            continue
        n = len(features[0]["input_ids"])
        lengths.append(n)
        if stage == "pt":
            pieces = -(-n // max_length)
            chunks += pieces
            trained += n - pieces  # the first token of every chunk is not predicted
        elif stage == "classify":
            truncated += n > max_length
            trained += 1
        else:
            truncated += n > max_length
            kept = sum(label != IGNORE for label in features[0]["labels"][1:max_length])
            too_long_prompt += kept == 0
            trained += kept
    if not lengths:
        return ["tokens: no example could be encoded"]
    lengths.sort()
    failed = len(examples) - len(lengths)
    lines = [f"encoding: {failed} of {len(examples)} examples failed (see problems)"] if failed else []
    lines += [f"tokens per example: min {lengths[0]} / mean {sum(lengths) / len(lengths):.1f} / "
             f"p50 {_percentile(lengths, 0.5)} / p95 {_percentile(lengths, 0.95)} / max {lengths[-1]}"]
    if stage == "pt":
        lines.append(f"  at max_length {max_length}: {len(lengths)} texts -> {chunks} sequences "
                     f"(longer texts are split, nothing is lost); {trained} trained tokens")
    elif stage == "classify":
        lines.append(f"  truncated at max_length {max_length}: {truncated} of {len(lengths)}")
    else:
        lines.append(f"  truncated at max_length {max_length}: {truncated} of {len(lengths)}")
        lines.append(f"  trained tokens at max_length {max_length}: {trained} "
                     f"({trained / len(lengths):.1f} per example)")
        if too_long_prompt:
            lines.append(f"  prompt longer than max_length: {too_long_prompt} (nothing left to train on; "
                         "training fails on them unless data.skip_invalid=true skips them)")
            warnings.append(f"{too_long_prompt} examples have a prompt longer than max_length {max_length}")
    if truncated and stage != "pt":
        warnings.append(f"{truncated} of {len(lengths)} examples are longer than max_length {max_length} "
                        "and will be truncated (raise --max-length / data.max_length?)")
    return lines


def _rendered(example, tokenizer) -> list[str]:
    if isinstance(example, Conversation):
        text, spans = assistant_spans(tokenizer, example)
        mark = "green" if sys.stdout.isatty() else "[[ ]]"
        return [f"example ({example.source}) rendered with the chat template; trained text in {mark}:",
                _short(_marked(text, spans), 4000)]
    ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
    head = f"example ({example.source}) as the tokenizer reads it"
    if isinstance(example, Labeled):
        return [head + f", label {example.label}:", _short(tokenizer.decode(ids))]
    return [head + " (all trained):", _short(tokenizer.decode(ids))]


def _read_examples(file: str, stage: str | None, dataset_info: str | None, problems: list,
                   reasons: Counter) -> tuple[list[str], str, list]:
    """Read and normalise the file as training would, collecting every problem instead of stopping at the
    first; returns the report's opening lines (file, format, stage, rows), the stage and the examples."""
    info = read_dataset_info(dataset_info) if dataset_info else None
    plan = resolve_source(DataSource(path=str(file)), info, dataset_info, KINDS.get(stage, "conversation"))
    rows = read_rows(plan.path, errors=problems)
    unreadable = len(problems)  # lines that are not even a record (bad JSON, wrong CSV field count)
    reasons.update(_reason(error) for error in problems)
    out = [f"file: {plan.path}" + (f" (dataset '{file}' in {dataset_info})" if plan.path != str(file) else "")]
    fmt = plan.format
    if fmt == "auto" and rows:
        fmt = detect_format(rows, plan.path, kind=KINDS.get(stage), columns=plan.columns)
        out.append(f"format: {fmt} (detected from the columns)")
    else:
        out.append(f"format: {fmt if fmt != 'auto' else 'unknown (no rows)'}")
    guessed = stage is None
    stage = stage or STAGE_OF_FORMAT.get(fmt, "sft")
    if not (guessed and fmt == "auto"):
        out.append(f"stage: {stage}" + (" (guessed from the format; --stage to choose)" if guessed else ""))
    examples = []
    if rows:
        check_kind(fmt, KINDS[stage], plan.path)
        for row in rows:
            try:
                examples.append(to_example(row, fmt, kind=KINDS[stage], columns=plan.columns, tags=plan.tags))
            except DataError as error:
                problems.append(error)
                reasons[_reason(error)] += 1
    read = len(rows) + unreadable
    out.append(f"rows: {read} read, {len(examples)} usable, {read - len(examples)} invalid")
    return out, stage, examples


def _label_report(examples: list, warnings: list) -> list[str]:
    counts = Counter(e.label for e in examples)
    lines = [f"labels ({len(counts)}):"]
    lines += [f"  {label}: {n} ({100 * n / len(examples):.1f}%)" for label, n in counts.most_common()]
    if len(counts) < 2:
        warnings.append(f"classify needs at least 2 labels, found {sorted(counts)}")
    return lines


def _example_report(examples: list, stage: str, model: str | None, max_length: int, chat_template: str | None,
                    problems: list, reasons: Counter, warnings: list) -> list[str]:
    """Token lengths and the first example rendered for the model (with a model), else normalised."""
    if not model:
        if chat_template:
            warnings.append("--chat-template is only used together with --model")
        return [f"example ({examples[0].source}, normalised):"] + _normalised(examples[0])
    from ..modeling import load_tokenizer

    tokenizer = load_tokenizer(model, chat_template)
    if stage == "sft" and not getattr(tokenizer, "chat_template", None):
        warnings.append(f"the tokenizer of {model} has no chat template: {TEMPLATE_HINT}")
        return (["tokens: not computed (no chat template)", "example (normalised, no chat template to render it):"]
                + _normalised(examples[0]))
    lines = _token_report(examples, tokenizer, stage, max_length, problems, reasons, warnings)
    try:
        lines += _rendered(examples[0], tokenizer)
    except (DataError, TemplateError) as error:
        lines += [f"example ({examples[0].source}, normalised; rendering failed: {error}):"]
        lines += _normalised(examples[0])
    return lines


def _closing_report(problems: list, reasons: Counter, warnings: list) -> list[str]:
    """Problems by reason and the first few in file order, then the warnings."""
    lines = []
    if problems:
        lines.append(f"problems ({sum(reasons.values())}) by reason:")
        lines += [f"  {n} x {reason}" for reason, n in reasons.most_common()]
        lines.append("first problems:")
        lines += [f"  {error}" for error in sorted(problems, key=_line_key)[:SHOW_PROBLEMS]]
        lines.append("  (training stops at the first problem; data.skip_invalid=true skips and counts them)")
    if warnings:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in warnings]
    return lines


def inspect_data(file: str, *, model: str | None = None, stage: str | None = None, max_length: int = 1024,
                 dataset_info: str | None = None, chat_template: str | None = None) -> str:
    """The report `posttrain data inspect` prints for one data file (or dataset_info entry)."""
    problems: list[DataError] = []
    reasons: Counter = Counter()
    warnings: list[str] = []
    out, stage, examples = _read_examples(file, stage, dataset_info, problems, reasons)
    if not examples:
        warnings.append("no usable examples: training on this file would fail")
    elif stage == "classify":
        out += _label_report(examples, warnings)
    if examples:
        out += _example_report(examples, stage, model, max_length, chat_template, problems, reasons, warnings)
    return "\n".join(out + _closing_report(problems, reasons, warnings))
