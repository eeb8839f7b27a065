"""Row formats (alpaca, sharegpt, messages, ...) normalised into the canonical examples: format detection,
the per-row entry point `to_example` and loading. The conversation formats themselves are in chats.py.

Every problem with a row is a DataError naming the row's location and the offending field
(as the file spells it, after any `columns` renames), so a user can fix the data directly.
Column and role names follow LLaMA-Factory's `dataset_info.json` conventions (see sources.py).
"""
from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataSource
from ..errors import DataError
from . import preference
from . import vision
from .chats import (RowFields, alpaca_conversation, media_refusal, messages_conversation,
                    prompt_completion_conversation, sharegpt_conversation, type_name)
from .examples import Example, Labeled, Preference, Text
from .vision import raw_reference
from .sources import Plan, Row, read_dataset_info, read_rows, resolve_source

log = logging.getLogger("posttrain")

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "classification") + preference.FORMATS
KIND_FORMATS = {"text": ("text",), "conversation": ("alpaca", "sharegpt", "messages", "prompt_completion"),
                "labeled": ("classification",), **preference.KIND_FORMATS}
_NEEDS = {"text": "stage pt needs raw text (a 'text' column)",
          "conversation": "stage sft needs conversations (alpaca, sharegpt, messages or prompt_completion)",
          "labeled": "stage classify needs 'text' and 'label' columns", **preference.NEEDS}


# ---------------------------------------------------------------- text and labels (conversations: chats.py)

def _text(f: RowFields) -> str:
    text = f.string("text")
    if not text.strip():
        raise f.error("is empty", f.name("text"))
    return text


def _label(f: RowFields) -> str:
    label, name = f.require("label"), f.name("label")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise f.error(f"must be a string or an integer, got {type_name(label)}", name)
    if not str(label).strip():
        raise f.error("is empty", name)
    return str(label).strip()


def check_kind(fmt: str, kind: str, location: str) -> None:
    """A format the stage cannot train on is a source-level error, never a skippable row."""
    if kind not in KIND_FORMATS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KIND_FORMATS)}")
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", location=location)
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(f"{_NEEDS[kind]}, but this is {fmt} data", location=location)


MEDIA_COLUMNS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal columns
IMAGE_KINDS = ("conversation", "preference")  # the example kinds that carry images (sft, dpo)


def _media_column(f: RowFields, key: str) -> tuple[object, str]:
    """(value, field name) of a media column; for images also the seeds' single `image` column."""
    value, name = f.get(key), f.name(key)
    if key == "images" and value is None and "images" not in f.names and "image" in f.row.data:
        value, name = f.row.data["image"], "image"
    return value, name


def check_text_only(row: Row, fmt: str, columns: dict | None) -> None:
    """Where images cannot be used (a text-only model, a stage that does not read them), a row with images,
    videos or audios (LLaMA-Factory's mllm columns, also under another name through a dataset_info column
    mapping, or a single `image`) stops here, rather than train its <image> placeholders as plain text. Image
    content parts are refused while parsing (chats.media_refusal)."""
    f = RowFields(row, fmt, columns)
    for key in MEDIA_COLUMNS:
        value, name = _media_column(f, key)
        if value:  # null or an empty list: a text-only row
            count = len(value) if isinstance(value, list) else 1
            raise f.error(media_refusal(f"{count} {key[:-1] if count == 1 else key}"), name)


def attach_images(example: Example, row: Row, fmt: str, columns: dict | None, dirs: list[Path]) -> Example:
    """Give an example read with images allowed its images: the `images` (or `image`) column, or the image parts
    met while parsing (row.images), each resolved against `dirs` and checked to exist; every `<image>` placeholder
    becomes an image slot. The placeholders must match the images one to one."""
    f = RowFields(row, fmt, columns)
    for key in ("videos", "audios"):
        value, name = _media_column(f, key)
        if value:
            raise f.error(media_refusal(key), name)
    value, name = _media_column(f, "images")
    column = value if isinstance(value, list) else [] if value in (None, "") else [value]
    if column and row.images:
        raise f.error("images come both from this column and from image parts in the messages; use one of them",
                      name)
    entries = [(item, f"{name}[{i}]" if isinstance(value, list) else name) for i, item in enumerate(column)]
    entries += row.images or []
    refs = []
    for item, where in entries:
        ref = raw_reference(item)
        if ref is None:
            raise f.error(f"an image must be a file path, a data URL or {{'bytes': ...}}, got {type_name(item)}",
                          where)
        try:
            refs.append(vision.resolve(ref, dirs))
        except ValueError as exc:
            error = f.error(str(exc), where)
            error.kind = str(exc).split(" (")[0].split(":")[0]  # counted without the file name (skip_reason)
            raise error from None
    if isinstance(example, Preference):
        if vision.place_images([example.chosen, example.rejected], 0)[1]:
            raise f.error("an <image> placeholder in chosen or rejected: images belong to the prompt", name)
        lists = [example.prompt]
    else:
        lists = [example.messages]
    placed, found = vision.place_images(lists, len(refs))
    if found != len(refs):
        plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
        raise f.error(f"{plural(len(refs), 'image')} but {plural(found, '<image> placeholder')} in the messages: "
                      "each image needs one <image> where it belongs", entries[0][1] if entries else name)
    if isinstance(example, Preference):
        example.prompt = placed[0]
    else:
        example.messages = placed[0]
    example.images = refs
    return example


def to_example(row: Row, fmt: str, *, kind: str, columns: dict | None = None, tags: dict | None = None,
               system: str | None = None, images: bool = False, media_dirs: list[Path] | None = None) -> Example:
    """Normalise one row; `system` is a default system prompt for rows that bring none. With `images` (a
    vision-language model, kinds conversation and preference) the row's images are read, their relative paths
    looked up in `media_dirs`; without, a row with images is refused (check_text_only)."""
    check_kind(fmt, kind, row.location)
    if images and kind not in IMAGE_KINDS:
        raise ValueError(f"images are read for {', '.join(IMAGE_KINDS)} examples, not {kind}")
    if images:
        row = Row(row.data, row.location, images=[])
    else:
        check_text_only(row, fmt, columns)
    example = _normalise(row, fmt, kind, columns, tags, system)
    if images:
        attach_images(example, row, fmt, columns, list(media_dirs or []))
    return example


def _normalise(row: Row, fmt: str, kind: str, columns: dict | None, tags: dict | None, system: str | None) -> Example:
    if fmt in preference.FORMATS:  # Preference, Feedback, Ranking (IdenticalPair for chosen == rejected)
        return preference.to_example(row, fmt, columns, tags, system)
    f = RowFields(row, fmt, columns)
    if fmt == "text":
        example = Text(_text(f))
    elif fmt == "classification":
        example = Labeled(_text(f), _label(f))
    elif fmt == "alpaca":
        example = alpaca_conversation(f, system)
    elif fmt == "sharegpt":
        example = sharegpt_conversation(f, tags, system)
    elif fmt == "messages":
        example = messages_conversation(f, system)
    else:
        example = prompt_completion_conversation(f, system)
    example.source = row.location
    return example


def _guess(keys: set, kind: str | None) -> str | None:
    """The format one row's keys suggest, or None."""
    if kind in preference.KIND_FORMATS:
        return preference.guess(keys, kind)
    if {"chosen", "rejected"} <= keys or {"chosen_messages", "rejected_messages"} <= keys:
        return "preference"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys or {"prompt", "response"} <= keys:  # a missing output is then a row error
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:  # a text,label file is classification data only where labels are wanted
        return "classification" if "label" in keys and kind in (None, "labeled") else "text"
    return None


def detect_format(rows: list[Row], path: str, *, kind: str | None = None, columns: dict | None = None) -> str:
    """The format most of the first rows suggest by their columns (after `columns` renames)."""
    renames = {column: canonical for canonical, column in (columns or {}).items()}
    keys = (set(row.data) | {renames[key] for key in row.data if key in renames} for row in rows[:20])
    guesses = Counter(guess for guess in (_guess(k, kind) for k in keys) if guess)
    fmt = guesses.most_common(1)[0][0] if guesses else None  # a tie goes to the earlier row's format
    if fmt == "preference" and kind not in preference.KIND_FORMATS:
        raise DataError("preference data (chosen/rejected) is for stages rm and dpo, not this stage", location=path)
    if fmt is None and kind in preference.KIND_FORMATS:
        seen = sorted(set().union(*(row.data for row in rows[:20])))
        raise DataError(f"{preference.NEEDS[kind]}; the columns are {seen}", location=path)
    if fmt is None:
        seen = sorted(set().union(*(row.data for row in rows[:20])))
        raise DataError(f"cannot tell the data format from the columns {seen}; known formats: "
                        "alpaca (instruction, output), sharegpt (conversations), messages (messages), "
                        "prompt_completion (prompt, completion), text (text), classification (text, label). "
                        "Set `format` and/or `columns` for this source", location=path)
    return fmt


# ---------------------------------------------------------------- loading

@dataclass
class LoadReport:
    """What was read from each source and, with skip_invalid, what was skipped and why."""

    sources: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)  # valid rows left out on purpose (chosen == rejected)
    notes: list[str] = field(default_factory=list)  # how files were read (e.g. a .txt split per line)

    def summary(self) -> str:
        lines = [f"{s['path']} ({s['format']}): {s['used']} examples from {s['rows']} rows"
                 for s in self.sources] + self.notes
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} invalid rows:")
            lines += [f"  {count} x {reason}" for reason, count in self.skipped.most_common()]
        lines += [f"skipped {count} pairs: {reason}" for reason, count in self.dropped.most_common()]
        return "\n".join(lines)


def skip_reason(error: DataError) -> str:
    """The count key: the reason and the field with list indices dropped, so like errors add up."""
    reason = getattr(error, "kind", None) or error.reason
    if not error.field:
        return reason
    field_name = re.sub(r"\[\d+\]", "[]", error.field)
    return f"field '{field_name}': {reason}"


def as_sources(sources) -> list[DataSource]:
    items = sources if isinstance(sources, (list, tuple)) else [sources]
    return [item if isinstance(item, DataSource) else
            DataSource.model_validate(item) if isinstance(item, dict) else DataSource(path=str(item))
            for item in items]


def _load_one(plan: Plan, kind: str, skip_invalid: bool, text_split: str, report: LoadReport, images: bool = False,
              info_dir: Path | None = None) -> list[Example]:
    errors: list[DataError] | None = [] if skip_invalid else None
    rows = read_rows(plan.path, text_split=text_split, errors=errors, notes=report.notes)
    report.skipped.update(skip_reason(error) for error in errors or [])
    fmt = plan.format
    if fmt == "auto" and rows:
        fmt = detect_format(rows, plan.path, kind=kind, columns=plan.columns)
    if fmt != "auto":
        check_kind(fmt, kind, plan.path)
    examples: list[Example] = []
    local = Path(plan.path)
    media_dirs = [d for d in (local if local.is_dir() else local.parent, info_dir) if d is not None and d.is_dir()]
    for row in rows:
        if plan.max_samples is not None and len(examples) >= plan.max_samples:
            break
        try:
            examples.append(to_example(row, fmt, kind=kind, columns=plan.columns, tags=plan.tags, images=images,
                                       media_dirs=media_dirs))
        except preference.IdenticalPair as pair:
            log.warning("%s (skipped)", pair)
            report.dropped[pair.reason] += 1
        except DataError as error:
            if not skip_invalid:
                raise
            report.skipped[skip_reason(error)] += 1
    report.sources.append({"path": plan.path, "format": fmt, "rows": len(rows) + len(errors or []),
                           "used": len(examples)})
    return examples


def load_examples(sources, *, kind: str, dataset_info: str | None = None, skip_invalid: bool = False,
                  text_split: str = "auto", max_samples: int | None = None,
                  images: bool = False) -> tuple[list[Example], LoadReport]:
    """Read and normalise one or several sources (concatenated in order) for a stage's `kind`. `images`: read the
    rows' images (for a vision-language model; see to_example), else refuse rows that have some."""
    if kind not in KIND_FORMATS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KIND_FORMATS)}")
    info = read_dataset_info(dataset_info) if dataset_info else None
    report, examples = LoadReport(), []
    specs = as_sources(sources)
    for source in specs:
        plan = resolve_source(source, info, dataset_info, kind)
        examples += _load_one(plan, kind, skip_invalid, text_split, report, images,
                              Path(dataset_info).parent if dataset_info else None)
    if max_samples is not None and len(examples) > max_samples:
        examples, budget = examples[:max_samples], max_samples
        for entry in report.sources:
            entry["used"] = min(entry["used"], budget)
            budget -= entry["used"]
    if not examples:
        detail = ""
        if report.skipped:
            detail = (f" ({sum(report.skipped.values())} invalid rows skipped; most often: "
                      f"{report.skipped.most_common(1)[0][0]})")
        raise DataError(f"no usable examples in {', '.join(s.path for s in specs)}{detail}")
    return examples, report


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` (at least one example); both parts keep the original order."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])
