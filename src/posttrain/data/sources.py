"""Where data comes from: files, directories, the hub, and LLaMA-Factory dataset_info.json names.

Our own readers (stdlib json/csv, pyarrow for parquet) are used for files so that every
error can name the exact line; `datasets` is only imported for saved datasets and the hub.
A row's location is "path:LINE" (1-based) for jsonl, csv and txt, and "path:row N"
(0-based) for json, parquet, saved datasets and hub datasets.
"""
from __future__ import annotations

import csv
import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import DataSource
from ..errors import DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")
TEXT_SPLITS = ("auto", "paragraph", "line", "file")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Row:
    """One record and its location ("path:LINE" or "path:row N") for error messages."""

    data: dict
    location: str
    images: list | None = None  # image parts met while parsing, as (reference, field); None: images not allowed


def read_rows(path: str, *, text_split: str = "auto", errors: list | None = None,
              notes: list | None = None) -> list[Row]:
    """Read a file, a directory (saved dataset or folder of files) or a hub dataset into rows.

    A malformed line raises its DataError, or, when `errors` is a list, is appended to it and
    skipped (this is how `skip_invalid` also covers lines that are not valid JSON). `notes` (a list)
    receives what the data report should say about how a file was read.
    """
    path = str(path)
    local = Path(path)
    notes = [] if notes is None else notes
    if local.is_dir():
        return _read_dir(local, text_split, errors, notes)
    if local.is_file():
        return _read_file(local, text_split, errors, notes)
    if _HUB_NAME.match(path) and local.suffix.lower() not in SUFFIXES:
        return _read_hub(path)
    raise DataError("file not found", location=path)


def _read_file(path: Path, text_split: str, errors: list | None, notes: list) -> list[Row]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path, path.read_text(encoding="utf-8-sig"), errors)
        if suffix == ".json":
            return _read_json(path, errors)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",", errors)
        if suffix == ".txt":
            return _read_txt(path, text_split, notes)
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 text ({exc.reason} at byte {exc.start})", location=str(path)) from None
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"unsupported file type '{suffix or path.name}' (supported: {', '.join(SUFFIXES)}, "
                    "a directory saved with datasets.save_to_disk, or a hub dataset name)", location=str(path))


def _fail(message: str, location: str, errors: list | None) -> None:
    """Raise, or record and carry on when the caller collects errors."""
    error = DataError(message, location=location)
    if errors is None:
        raise error
    errors.append(error)


def _read_jsonl(path: Path, text: str, errors: list | None) -> list[Row]:
    rows = []
    # split at "\n" only: str.splitlines() would also cut at U+2028 etc., which JSON strings may hold
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(f"not valid JSON ({exc.msg})", location, errors)
            continue
        if not isinstance(record, dict):
            _fail(f"expected a JSON object, got {type(record).__name__}", location, errors)
            continue
        rows.append(Row(record, location))
    return rows


def _read_json(path: Path, errors: list | None) -> list[Row]:
    """A list of objects, or an object holding exactly one such list ({"data": [...]})."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json name, as `datasets` accepts
            return _read_jsonl(path, text, errors)
        location = f"{path}:{exc.lineno}"
        raise DataError(f"not valid JSON ({exc.msg}, column {exc.colno})", location=location) from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError("expected a list of objects (or an object with exactly one list in it); "
                            f"found an object with keys {sorted(data)}", location=str(path))
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"expected a list of objects, got {type(data).__name__}", location=str(path))
    rows = []
    for index, record in enumerate(data):
        if isinstance(record, dict):
            rows.append(Row(record, f"{path}:row {index}"))
        else:
            _fail(f"expected a JSON object, got {type(record).__name__}", f"{path}:row {index}", errors)
    return rows


def _read_csv(path: Path, delimiter: str, errors: list | None) -> list[Row]:
    """Header row first; a record's location is the physical line where it starts."""
    rows: list[Row] = []
    header: list[str] | None = None
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        last_line = 0
        try:
            for record in reader:
                start, last_line = last_line + 1, reader.line_num
                if not record:  # blank line
                    continue
                if header is None:
                    header = record
                elif len(record) != len(header):
                    _fail(f"has {len(record)} fields, the header has {len(header)}", f"{path}:{start}", errors)
                else:
                    rows.append(Row(dict(zip(header, record)), f"{path}:{start}"))
        except csv.Error as exc:
            raise DataError(f"not valid CSV ({exc})", location=f"{path}:{reader.line_num}") from None
    return rows


def _read_txt(path: Path, text_split: str, notes: list) -> list[Row]:
    """Documents at blank lines ("paragraph"), at every line ("line"), or the whole file ("file"); "auto": at
    blank lines, or at every line in a file of several lines with no blank line (one document per line, as
    LLaMA-Factory reads .txt), which is noted for the data report."""
    if text_split not in TEXT_SPLITS:
        raise DataError(f"unknown text_split '{text_split}' (choose from {', '.join(TEXT_SPLITS)})")
    text = path.read_text(encoding="utf-8-sig")
    if text_split == "auto":
        lines = text.strip().split("\n")
        text_split = "line" if len(lines) > 1 and all(line.strip() for line in lines) else "paragraph"
        if text_split == "line":
            notes.append(f"{path}: no blank lines, so one document per line (data.text_split: auto)")
    if text_split == "file":
        return [Row({"text": text.strip("\n")}, f"{path}:1")] if text.strip() else []
    rows: list[Row] = []
    block: list[str] = []
    start = 0
    for number, line in enumerate(text.split("\n") + [""], 1):
        if text_split == "line" and line.strip():
            rows.append(Row({"text": line.rstrip()}, f"{path}:{number}"))
        elif text_split == "paragraph" and line.strip():
            start = start or number
            block.append(line.rstrip())
        elif block:
            rows.append(Row({"text": "\n".join(block)}, f"{path}:{start}"))
            block, start = [], 0
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable parquet file ({exc})", location=str(path)) from None
    return [Row(record, f"{path}:row {index}") for index, record in enumerate(records)]


def _read_dir(path: Path, text_split: str, errors: list | None, notes: list) -> list[Row]:
    """A `save_to_disk` directory, or else a folder of data files read in name order."""
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _read_saved(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"directory holds neither a saved dataset nor data files ({', '.join(SUFFIXES)})",
                        location=str(path))
    return [row for file in files for row in _read_file(file, text_split, errors, notes)]


def _read_saved(path: Path) -> list[Row]:
    """A Dataset, or the "train" split (else the only split) of a DatasetDict."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"could not load the saved dataset ({exc})", location=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise DataError(f"the saved DatasetDict has no 'train' split and several others ({', '.join(splits)})",
                            location=str(path))
        loaded = loaded["train"] if "train" in loaded else loaded[splits[0]]
    return [Row(record, f"{path}:row {index}") for index, record in enumerate(loaded.to_list())]


def _read_hub(name: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline, unknown repo, gated, no train split ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"not found locally and could not be loaded from the hub: {detail}",
                        location=name) from None
    return [Row(record, f"{name}:row {index}") for index, record in enumerate(loaded.to_list())]


def _looks_like_file(path: str) -> bool:
    """True when `path` exists locally or names a data file by its extension."""
    return os.path.exists(path) or Path(path).suffix.lower() in SUFFIXES


def _looks_like_hub_name(path: str) -> bool:
    return bool(_HUB_NAME.match(path)) and not _looks_like_file(path)


# ---------------------------------------------------------------- LLaMA-Factory dataset_info.json

@dataclass
class Plan:
    """What to read for one source, once dataset_info names are resolved."""

    path: str
    format: str
    columns: dict | None
    tags: dict | None
    max_samples: int | None


def read_dataset_info(path: str) -> dict:
    if not Path(path).is_file():
        raise DataError("dataset_info file not found", location=path)
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", location=f"{path}:{exc.lineno}") from None
    if not isinstance(info, dict):
        raise DataError("expected an object of dataset entries", location=path)
    return info


def resolve_source(source: DataSource, info: dict | None, info_path: str | None, kind: str) -> Plan:
    """Map a dataset name from dataset_info.json to its file, format, columns and tags.

    Paths that are not names in it pass through; a name-like path that matches neither a file
    nor a hub id is a typo, reported with the closest known names first.
    """
    name = source.path
    if info is None or name not in info:
        if info is not None and not _looks_like_file(name) and not _looks_like_hub_name(name):
            close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.4)
            known = close + sorted(set(info) - set(close))
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"unknown dataset '{name}' in {info_path}{hint} (known: {', '.join(known[:30])})")
        return Plan(name, source.format, source.columns, None, source.max_samples)
    entry, where = info[name], f"{info_path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError("the entry must be an object", location=where)
    ranking = bool(entry.get("ranking"))
    if ranking and kind != "preference":
        raise DataError("is preference data (ranking: true), which is for stages rm and dpo, "
                        "not this stage", location=where)
    if entry.get("hf_hub_url"):
        path = entry["hf_hub_url"]
    elif entry.get("file_name"):
        path = str(Path(info_path).parent / entry["file_name"])
    else:
        raise DataError("needs 'file_name' or 'hf_hub_url' (ms_hub_url and script_url are not supported)",
                        location=where)
    formatting = entry.get("formatting", "alpaca")
    fmt = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "messages"}.get(formatting)
    if fmt is None:
        raise DataError(f"unknown formatting {formatting!r} (alpaca or sharegpt)", location=where)
    columns = {k: v for k, v in (entry.get("columns") or {}).items() if isinstance(v, str)}
    columns.update(source.columns or {})
    if ranking:  # LLaMA-Factory preference data: chosen/rejected after an alpaca prompt or a conversation
        fmt = "preference_alpaca" if fmt == "alpaca" else "preference_sharegpt"
    elif kind == "feedback":  # LLaMA-Factory KTO data: the same rows plus a kto_tag column
        fmt = "feedback"
    if kind == "text" and fmt == "alpaca":  # LLaMA-Factory pretraining data: the prompt column is the text
        fmt = "text" if "prompt" in columns else "auto"
    if source.format != "auto":
        fmt = source.format
    return Plan(path, fmt, columns or None, entry.get("tags"), source.max_samples)
