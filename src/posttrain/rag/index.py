"""`posttrain rag index PATH... --out INDEX`: files -> chunks (-> vectors) -> the store, incrementally.

Each file is identified by its path as given (a folder is walked, hidden entries skipped) and its content hash.
A run re-chunks and re-embeds only new and changed files, removes the chunks of files that were indexed under
one of the given paths but are gone, and leaves the rest alone; changing the chunking settings re-chunks every
file. The whole run is one write transaction: queries running meanwhile see the index as it was before it.
An unreadable or binary file is named and skipped (an indexed file that became unreadable loses its chunks);
a bad jsonl row is named and skipped; the report counts both.

The index records its embedder's identity (path, fingerprint of config and weights, dimension, pooling):
re-running without `--embedder` reuses that embedder, and a different one is an error unless `--rebuild`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .chunk import Unreadable, chunk_document, read_file, word_spans
from .store import open_store

log = logging.getLogger("posttrain")
FLUSH_CHUNKS = 512  # chunks embedded and written together


@dataclass
class IndexReport:
    index: str
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    problems: list[str] = field(default_factory=list)  # bad rows: "path:LINE: why"
    chunks: int = 0  # in the index after the run
    new_chunks: int = 0
    embedder: str | None = None
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [f"indexed {self.index}: {len(self.added)} new, {len(self.changed)} changed, {len(self.removed)} "
                 f"removed, {self.unchanged} unchanged files; {self.new_chunks} chunks written, {self.chunks} in the "
                 f"index ({'bm25 + dense: ' + self.embedder if self.embedder else 'bm25 only'}; {self.seconds:.1f} s)"]
        for label, paths in (("new", self.added), ("changed", self.changed), ("removed", self.removed)):
            if paths:
                lines.append(f"  {label}: " + ", ".join(paths[:20]) + (f" and {len(paths) - 20} more"
                                                                       if len(paths) > 20 else ""))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        if self.problems:
            lines.append(f"skipped {len(self.problems)} bad row(s):")
            lines += [f"  {p}" for p in self.problems[:20]] + ([f"  ... and {len(self.problems) - 20} more"]
                                                                if len(self.problems) > 20 else [])
        if self.chunks == 0:
            lines.append("the index is empty: queries will find nothing")
        return lines


def walk(paths: list[str]) -> list[str]:
    """Every file under the given paths (as given, normalised), sorted; a missing path is an error."""
    files: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            files.append(os.path.normpath(given))
        elif path.is_dir():
            for root, dirs, names in os.walk(given):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.normpath(os.path.join(root, n)) for n in sorted(names) if not n.startswith(".")]
        else:
            raise DataError(f"{given}: no such file or directory")
    return list(dict.fromkeys(files))


def _under(file: str, roots: list[str]) -> bool:
    return any(file == root or file.startswith(root.rstrip(os.sep) + os.sep) or root == "." for root in roots)


def build_index(paths: list[str], out: str, *, embedder: str | None = None, chunk_tokens: int = 256,
                overlap: int = 32, rebuild: bool = False, batch_size: int = 32) -> IndexReport:
    if chunk_tokens < 8 or not 0 <= overlap < chunk_tokens:
        raise ConfigError("--chunk-tokens must be at least 8 and 0 <= --overlap < --chunk-tokens")
    started = time.time()
    files = walk(paths)
    if Path(out).resolve() in {Path(f).resolve() for f in files}:
        raise ConfigError(f"--out {out} is inside the indexed paths; put the index elsewhere")
    store = open_store(out, create=True)
    try:
        meta = store.meta()
        model = _embedder(meta, embedder, rebuild, out)
        identity = model.identity() if model else None
        settings = {"chunk_tokens": chunk_tokens, "overlap": overlap, "tokens": "embedder" if model else "words"}
        report = IndexReport(out, embedder=identity["path"] if identity else None)
        rechunk_all = rebuild or meta.get("chunking") not in (None, settings)
        if rechunk_all and not rebuild and meta.get("chunking"):
            log.info("chunking settings changed (%s -> %s): every file is re-chunked", meta["chunking"], settings)
        spans = model.token_spans if model else word_spans
        with store.write():
            if rebuild:
                store.clear()
            indexed = store.files()
            roots = [os.path.normpath(p) for p in paths]
            for gone in sorted(set(indexed) - set(files)):
                if _under(gone, roots):
                    store.remove_file(gone)
                    report.removed.append(gone)
            pending: list[tuple[str, str, list]] = []
            for path in files:
                try:
                    data = Path(path).read_bytes()
                except OSError as exc:
                    data, why = None, f"cannot read it ({exc.strerror or exc})"
                digest = hashlib.sha256(data).hexdigest() if data is not None else None
                if digest is not None and indexed.get(path) == digest and not rechunk_all:
                    report.unchanged += 1
                    continue
                chunks = None
                if data is not None:
                    try:
                        chunks = [c for doc in read_file(path, data, report.problems)
                                  for c in chunk_document(doc, chunk_tokens, overlap, spans)]
                    except Unreadable as exc:
                        why = str(exc)
                if chunks is None:
                    report.skipped.append((path, why))
                    if path in indexed:
                        store.remove_file(path)
                        report.removed.append(path)
                    continue
                if path in indexed:
                    store.remove_file(path)
                    report.changed.append(path)
                else:
                    report.added.append(path)
                pending.append((path, digest, chunks))
                if sum(len(c) for _, _, c in pending) >= FLUSH_CHUNKS:
                    report.new_chunks += _flush(store, pending, model)
            report.new_chunks += _flush(store, pending, model)
            store.set_meta(chunking=settings, embedder=identity)
        report.chunks = store.count()
    finally:
        store.close()
    report.seconds = time.time() - started
    return report


def _embedder(meta: dict, given: str | None, rebuild: bool, out: str):
    """The embedder for this run: the given one (which must match the index's unless rebuilding), else the
    one the index was built with, else none (BM25 only)."""
    recorded = meta.get("embedder")
    if given is None and (recorded is None or rebuild):
        return None  # BM25 only: torch is not even imported
    from .embed import Embedder, fingerprint

    if given is None:
        if not Path(recorded["path"]).is_dir() or fingerprint(recorded["path"]) != recorded["fingerprint"]:
            raise ConfigError(f"{out} was built with the embedder {recorded['path']}, which is gone or has changed; "
                              "pass --embedder DIR with --rebuild to re-embed everything")
        log.info("using the index's embedder %s", recorded["path"])
        return Embedder(recorded["path"])
    model = Embedder(given)
    has_chunks = bool(meta.get("chunking"))
    if not rebuild and has_chunks and (recorded or {}).get("fingerprint") != model.fingerprint:
        built = f"the embedder {recorded['path']}" if recorded else "no embedder (BM25 only)"
        raise ConfigError(f"{out} was built with {built}; embedding new files with {given} would mix two vector "
                          "spaces: add --rebuild to re-embed everything, or use another --out")
    return model


def _flush(store, pending: list, model) -> int:
    if not pending:
        return 0
    vectors = None
    if model is not None:
        vectors = model.encode([c.indexed_text for _, _, chunks in pending for c in chunks])
    written, offset = 0, 0
    for path, digest, chunks in pending:
        store.add_file(path, digest, chunks, vectors[offset:offset + len(chunks)] if vectors is not None else None)
        offset += len(chunks)
        written += len(chunks)
    pending.clear()
    return written
