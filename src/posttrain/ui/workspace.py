"""The UI's working directory: every path a user types is confined to it, and what the UI writes there is written
whole (rows appended through a temporary file and a rename, under a lock, so two labellers or a crash never leave
a half line).

Paths are given relative to the workdir (`data/sft.jsonl`); an absolute path is accepted only when it lies inside
it. `..` that leaves it, a symlink that points out of it, and anything else outside are refused in one line.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError

STATE = ".posttrain-ui"  # the UI's own files: job records and logs, configs it wrote
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SKIPPED_DIRS = {STATE, "checkpoints", "plots", "adapter", "tensorboard", "__pycache__", ".git", ".venv"}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(f"--workdir {root}: not a directory")
        self.state = self.root / STATE
        self.state.mkdir(exist_ok=True)

    # ------------------------------------------------------------ paths
    def path(self, value: str | Path | None, what: str = "path", exists: bool = False) -> Path:
        """`value` (relative to the workdir, or absolute inside it) as an absolute path inside the workdir."""
        text = str(value or "").strip()
        if not text:
            raise ConfigError(f"{what}: give a path inside the workdir {self.root}")
        if "\x00" in text:
            raise ConfigError(f"{what}: not a valid path")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ConfigError(f"{what} {text!r} is outside the workdir {self.root}: only files inside it can be used")
        if resolved == self.state or self.state in resolved.parents:
            raise ConfigError(f"{what} {text!r} is inside the UI's own folder {STATE}/")
        if exists and not resolved.exists():
            raise ConfigError(f"{what} {text!r}: not found in the workdir {self.root}")
        return resolved

    def optional(self, value: str | Path | None, what: str, exists: bool = True) -> Path | None:
        return self.path(value, what, exists) if str(value or "").strip() else None

    def rel(self, path: str | Path) -> str:
        """How the UI shows a path: relative to the workdir."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    # ------------------------------------------------------------ what is there
    def walk(self, max_depth: int = 6):
        """Every file and directory under the workdir (not the UI's own folder, checkpoints or hidden ones)."""
        def visit(directory: Path, depth: int):
            try:
                entries = sorted(directory.iterdir())
            except OSError:
                return
            for entry in entries:
                if entry.name.startswith(".") or entry.name in SKIPPED_DIRS:
                    continue
                yield entry
                if entry.is_dir() and not entry.is_symlink() and depth < max_depth:
                    yield from visit(entry, depth + 1)
        yield from visit(self.root, 1)

    def models(self) -> list[str]:
        """Directories that hold a model (config.json) or a LoRA adapter (adapter_config.json)."""
        return [self.rel(p) for p in self.walk() if p.is_dir() and ((p / "config.json").is_file()
                                                                    or (p / "adapter_config.json").is_file())]

    def adapters(self) -> list[str]:
        return [self.rel(p) for p in self.walk() if p.is_dir() and (p / "adapter_config.json").is_file()]

    def data_files(self) -> list[str]:
        return [self.rel(p) for p in self.walk() if p.is_file() and p.suffix in DATA_SUFFIXES
                and p.name not in ("config.json", "summary.json", "lineage.json", "tokenizer.json",
                                   "tokenizer_config.json", "generation_config.json", "adapter_config.json")
                and p.name != "metrics.jsonl" and not p.name.endswith(".log.jsonl")]

    def files(self, suffixes: tuple[str, ...]) -> list[str]:
        return [self.rel(p) for p in self.walk() if p.is_file() and p.name.endswith(suffixes)]

    def recipes(self) -> list[str]:
        """YAML files with a `steps:` list (recipes for `posttrain run`)."""
        found = []
        for p in self.walk():
            if p.is_file() and p.suffix in (".yaml", ".yml"):
                try:
                    if "\nsteps:" in "\n" + p.read_text(errors="replace")[:200_000]:
                        found.append(self.rel(p))
                except OSError:
                    continue
        return found


# ---------------------------------------------------------------- writing rows

@contextmanager
def file_lock(path: Path):
    """One writer at a time for `path`: a thread lock within this process and an flock on a hidden lock file
    beside it (other processes; the file itself is replaced by rename, so it cannot carry the lock)."""
    key = str(path)
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def append_rows(path: Path, rows: list[dict]) -> int:
    """Append JSON lines to `path` atomically: the old content plus the new rows go to a temporary file that
    replaces `path`, so a reader (or a crash) sees either the old file or the new one. Returns the row count."""
    with file_lock(path):
        old = path.read_bytes() if path.is_file() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        new = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(old + new)
        os.replace(partial, path)
        return (old + new).count(b"\n")


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of a file the UI wrote ([] when it does not exist yet)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{number}: not a JSON line") from None
    return rows


def write_text(path: Path, text: str) -> Path:
    """A whole file through a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def path_dropdown(choices: list[str], label: str, **kwargs):
    """A dropdown of workdir paths (typing one that is not listed is allowed) that starts with nothing chosen.
    Gradio's Dropdown selects its first choice when given no value: an adapter, RAG index or eval file would be
    used without the person choosing it, and a run shown as chosen would never show its details (picking the shown
    value again is no change, so its .change never fires)."""
    import gradio as gr

    return gr.Dropdown(choices, value=None, allow_custom_value=True, label=label, **kwargs)
