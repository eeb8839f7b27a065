"""Where chunks live: one small interface (`Store`) and its default, one SQLite file.

The SQLite store keeps chunks with their source, heading and character offsets in a plain table, their words in
an FTS5 table (BM25 ranking over
Porter-stemmed words: "cost" finds "costs") and their vectors in a sqlite-vec `vec0` table (cosine distance, exact search), all
in one file in WAL mode. Python's own sqlite3 module often cannot load extensions, so the file is opened with
sqlean-py (a SQLite build that can) and sqlite-vec's extension comes from its PyPI wheel.

Consistency: an index run writes in one transaction (`write`), and a query reads in one read transaction
(`snapshot`): in WAL mode a reader sees the index as it was before the run or after it, never a mix, and is
never blocked by the writer. A second writer waits up to `busy_timeout` seconds, then gets a one-line error.

Another database (e.g. Postgres with pgvector, for many writers or indexes that outgrow one machine) would
implement the same methods.
"""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import DataError
from .chunk import Chunk

FORMAT = "posttrain-rag/1"
BUSY_TIMEOUT_S = 3.0

SCHEMA = """
create table if not exists meta(key text primary key, value text not null);
create table if not exists files(path text primary key, hash text not null, chunks integer not null);
create table if not exists chunks(id integer primary key, file text not null, source text not null,
                                  heading text not null, text text not null, start_char integer not null,
                                  end_char integer not null);
create index if not exists chunks_by_file on chunks(file);
create virtual table if not exists fts using fts5(heading, text, content='', contentless_delete=1,
                                                  tokenize='porter unicode61 remove_diacritics 2');
"""


class Store:
    """The interface retrieval and indexing use. Scores: higher is better."""

    def meta(self) -> dict: ...
    def set_meta(self, **items) -> None: ...
    def files(self) -> dict[str, str]: ...  # indexed file -> content hash
    def add_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray | None) -> None: ...
    def remove_file(self, path: str) -> None: ...
    def clear(self) -> None: ...
    def count(self) -> int: ...
    def bm25(self, query: str, k: int) -> list[tuple[int, float]]: ...
    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]: ...
    def chunks(self, ids: list[int]) -> dict[int, dict]: ...
    def write(self): ...     # context manager: one atomic write transaction
    def snapshot(self): ...  # context manager: reads inside see one consistent state
    def close(self) -> None: ...


def fts_query(text: str) -> str:
    """The words of a question as an FTS5 query: any of them ("a" OR "b"), ranked by BM25."""
    import re

    words = dict.fromkeys(w.lower() for w in re.findall(r"\w+", text))
    return " OR ".join(f'"{w}"' for w in words)


class SQLiteStore(Store):
    def __init__(self, path: str | Path, create: bool = False, busy_timeout: float = BUSY_TIMEOUT_S):
        import sqlean
        import sqlite_vec

        self.path = str(path)
        self.errors = (sqlean.DatabaseError,)
        self.lock = threading.RLock()
        if not create and not Path(path).is_file():
            raise DataError(f"no index at {path} (build one with `posttrain rag index PATH... --out {path}`)")
        with self._errors():
            self.db = sqlean.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
            self.db.enable_load_extension(True)
            sqlite_vec.load(self.db)
            self.db.enable_load_extension(False)
            tables = {r[0] for r in self.db.execute("select name from sqlite_master where type = 'table'")}
            if create and not tables:
                self.db.execute("pragma journal_mode = wal")
                self.db.executescript(SCHEMA)
                self.db.execute("insert into meta values ('format', ?)", (json.dumps(FORMAT),))
            elif "meta" not in tables or self.meta().get("format") != FORMAT:
                raise DataError(f"{path}: not a posttrain index (no '{FORMAT}' marker)")
            self.db.execute("pragma synchronous = normal")

    @contextmanager
    def _errors(self):
        """SQLite's errors as one line naming the index."""
        try:
            yield
        except self.errors as exc:
            message = str(exc)
            if "locked" in message or "busy" in message:
                raise DataError(f"{self.path}: the index is locked by another writer (is a `posttrain rag index` "
                                "running on it?); try again when it has finished") from None
            if "not a database" in message or "malformed" in message or "corrupt" in message:
                raise DataError(f"{self.path}: the index file is corrupt or not an index ({message}); rebuild it "
                                "with `posttrain rag index ... --rebuild`") from None
            raise DataError(f"{self.path}: database error: {message}") from None

    def _run(self, sql: str, args=()) -> list:
        with self.lock, self._errors():
            return self.db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ transactions

    @contextmanager
    def write(self):
        with self.lock:
            with self._errors():
                self.db.execute("begin immediate")
            try:
                yield self
            except BaseException:
                self.db.execute("rollback")
                raise
            with self._errors():
                self.db.execute("commit")

    @contextmanager
    def snapshot(self):
        with self.lock:
            with self._errors():
                self.db.execute("begin")
            try:
                yield self
            finally:
                self.db.execute("commit")

    # ------------------------------------------------------------ metadata and files

    def meta(self) -> dict:
        return {key: json.loads(value) for key, value in self._run("select key, value from meta")}

    def set_meta(self, **items) -> None:
        for key, value in items.items():
            self._run("insert or replace into meta values (?, ?)", (key, json.dumps(value)))

    def files(self) -> dict[str, str]:
        return dict(self._run("select path, hash from files"))

    def count(self) -> int:
        return self._run("select count(*) from chunks")[0][0]

    def _has_vectors(self) -> bool:
        return bool(self._run("select 1 from sqlite_master where name = 'vectors'"))

    def add_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray | None) -> None:
        with self.lock, self._errors():
            if vectors is not None and not self._has_vectors():
                self.db.execute(f"create virtual table vectors using vec0(embedding float[{vectors.shape[1]}] "
                                "distance_metric=cosine)")
            for i, chunk in enumerate(chunks):
                cursor = self.db.execute(
                    "insert into chunks(file, source, heading, text, start_char, end_char) values (?, ?, ?, ?, ?, ?)",
                    (path, chunk.source, chunk.heading, chunk.text, chunk.start, chunk.end))
                self.db.execute("insert into fts(rowid, heading, text) values (?, ?, ?)",
                                (cursor.lastrowid, chunk.heading, chunk.text))
                if vectors is not None:
                    self.db.execute("insert into vectors(rowid, embedding) values (?, ?)",
                                    (cursor.lastrowid, np.ascontiguousarray(vectors[i], dtype=np.float32).tobytes()))
            self.db.execute("insert or replace into files values (?, ?, ?)", (path, digest, len(chunks)))

    def remove_file(self, path: str) -> None:
        with self.lock, self._errors():
            ids = "select id from chunks where file = ?"
            self.db.execute(f"delete from fts where rowid in ({ids})", (path,))
            if self._has_vectors():
                self.db.execute(f"delete from vectors where rowid in ({ids})", (path,))
            self.db.execute("delete from chunks where file = ?", (path,))
            self.db.execute("delete from files where path = ?", (path,))

    def clear(self) -> None:
        with self.lock, self._errors():
            self.db.execute("delete from fts")
            self.db.execute("drop table if exists vectors")
            self.db.execute("delete from chunks")
            self.db.execute("delete from files")

    # ------------------------------------------------------------ search

    def bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        match = fts_query(query)
        if not match:
            return []
        # FTS5's bm25() is lower-is-better; its negation is the usual BM25 score
        return [(i, -s) for i, s in self._run("select rowid, bm25(fts) from fts where fts match ? "
                                              "order by bm25(fts) limit ?", (match, k))]

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self._has_vectors():
            return []
        rows = self._run("select rowid, distance from vectors where embedding match ? and k = ?",
                         (np.ascontiguousarray(vector, dtype=np.float32).tobytes(), k))
        return [(i, 1.0 - d) for i, d in rows]  # cosine similarity

    def chunks(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._run(f"select id, source, heading, text, start_char, end_char from chunks where id in ({marks})",
                         list(ids))
        return {r[0]: {"id": r[0], "source": r[1], "heading": r[2], "text": r[3], "start": r[4], "end": r[5]}
                for r in rows}

    def all_chunk_ids(self) -> list[int]:
        return [r[0] for r in self._run("select id from chunks order by id")]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def open_store(path: str | Path, create: bool = False) -> Store:
    """The store behind an index path (the only kind today: a SQLite file)."""
    return SQLiteStore(path, create=create)
