"""Files -> documents -> chunks.

Readers: .txt and .md (UTF-8), .jsonl (one document per row: `text`, optional `id` and `title`), .html (parsed
with BeautifulSoup; headings become Markdown headings, block elements paragraphs) and .pdf (text extracted with
pypdf, page by page). A file that cannot be read (binary, not UTF-8, a broken PDF) raises `Unreadable` with the
reason; the indexer names it and counts it as skipped.

Chunking is structure-aware: a chunk never crosses a Markdown heading (its `heading` is the path of headings
above it, "Menu > Desserts", or "page 3" in a PDF) and never splits a paragraph that fits the budget. Whole
paragraphs under one heading are packed together up to `chunk_tokens` tokens; a paragraph longer than that is cut
into windows of `chunk_tokens` tokens that overlap by `overlap` tokens (widened to whole words where a
window edge falls inside one). Tokens are the embedder tokenizer's when
the index has an embedder (so a chunk fits its context), else words and punctuation marks. A chunk is an exact
span of its document's text: `text == document.text[start:end]`.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Callable

SUFFIXES = (".txt", ".md", ".markdown", ".jsonl", ".html", ".htm", ".pdf")
WORD = re.compile(r"\w+|[^\w\s]")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
Spans = Callable[[str], list[tuple[int, int]]]  # text -> (start, end) of each token


class Unreadable(Exception):
    """The file cannot be indexed; the message says why."""


@dataclass
class Document:
    source: str            # the file path, or "path#id" for a jsonl row
    text: str
    title: str = ""        # jsonl `title` or HTML <title>: the top of every chunk's heading path
    markdown: bool = False  # parse `#` headings
    pages: list[int] = field(default_factory=list)  # PDF: offset where each page starts


@dataclass
class Chunk:
    source: str
    text: str
    heading: str
    start: int
    end: int

    @property
    def indexed_text(self) -> str:
        """What BM25 and the embedder see: the heading path, then the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD.finditer(text)]


# ---------------------------------------------------------------- readers

def _utf8(data: bytes) -> str:
    if b"\x00" in data[:65536]:
        raise Unreadable("binary file (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_jsonl(path: str, data: bytes, problems: list[str]) -> list[Document]:
    """One document per row; a bad row is appended to `problems` ("path:LINE: why") and skipped."""
    documents = []
    for number, line in enumerate(_utf8(data).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: field 'text' is missing or not a non-empty string")
            continue
        key = row.get("id", number)
        title = row.get("title") if isinstance(row.get("title"), str) else ""
        documents.append(Document(f"{path}#{key}", text, title=title, markdown=True))
    return documents


BLOCKS = ("p", "div", "li", "tr", "td", "th", "pre", "blockquote", "section", "article", "ul", "ol", "table",
          "dt", "dd", "br", "hr", "main", "header", "footer", "figcaption")
BREAK = "\ue000"  # a private-use character (not whitespace): marks block boundaries while whitespace collapses


def read_html(path: str, data: bytes) -> list[Document]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for tag in soup.find_all(re.compile(r"^h[1-6]$")):
        tag.insert_before(f"{BREAK}{'#' * int(tag.name[1])} ")
        tag.insert_after(BREAK)
    for tag in soup.find_all(BLOCKS):
        tag.insert_before(BREAK)
        tag.insert_after(BREAK)
    text = re.sub(r"\s+", " ", soup.get_text())
    paragraphs = [p.strip() for p in text.split(BREAK)]
    return [Document(path, "\n\n".join(p for p in paragraphs if p), title=title, markdown=True)]


def read_pdf(path: str, data: bytes) -> list[Document]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        pages = [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages]
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise Unreadable(f"not a readable PDF ({exc})") from None
    text, starts = "", []
    for page in pages:
        text += "\n\n" if text else ""
        starts.append(len(text))
        text += page.strip()
    return [Document(path, text, pages=starts)]


def read_file(path: str, data: bytes, problems: list[str]) -> list[Document]:
    """The documents in one file (its bytes already read, so the hash and the text agree)."""
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if suffix not in SUFFIXES:
        raise Unreadable(f"unsupported file type {suffix or '(none)'} (supported: {', '.join(SUFFIXES)})")
    if suffix == ".jsonl":
        return read_jsonl(path, data, problems)
    if suffix in (".html", ".htm"):
        _utf8(data)  # a binary file named .html is unreadable, not an empty page
        return read_html(path, data)
    if suffix == ".pdf":
        return read_pdf(path, data)
    return [Document(path, _utf8(data), markdown=suffix != ".txt")]


# ---------------------------------------------------------------- chunking

def paragraphs(doc: Document) -> list[tuple[str, int, int]]:
    """(heading path, start, end) of each paragraph: text between blank lines, or a heading line."""
    result, path = [], []  # path: [(level, title)]
    offset, start = 0, None
    pages = doc.pages

    def heading_at(position: int) -> str:
        parts = [doc.title] if doc.title else []
        if pages:
            page = sum(1 for p in pages if p <= position)
            parts.append(f"page {page}")
        parts += [title for _, title in path]
        return " > ".join(parts)

    def close(end: int) -> None:
        nonlocal start
        if start is not None:
            text = doc.text[start:end]
            trimmed = end - (len(text) - len(text.rstrip()))
            if trimmed > start:
                result.append((heading_at(start), start, trimmed))
        start = None

    for line in doc.text.splitlines(keepends=True):
        stripped = line.strip()
        match = HEADING.match(stripped) if doc.markdown else None
        if match:
            close(offset)
            level = len(match.group(1))
            path = [h for h in path if h[0] < level] + [(level, match.group(2))]
        elif not stripped:
            close(offset)
        elif start is None:
            start = offset + len(line) - len(line.lstrip())
        offset += len(line)
    close(offset)
    return result


def _whole_words(text: str, start: int, end: int, lower: int, upper: int) -> tuple[int, int]:
    """Widen a window whose edge falls inside a word (a subword token) to the word's edges."""
    while start > lower and not text[start - 1].isspace():
        start -= 1
    while end < upper and not text[end].isspace():
        end += 1
    return start, end


def chunk_document(doc: Document, chunk_tokens: int = 256, overlap: int = 32,
                   spans: Spans = word_spans) -> list[Chunk]:
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise ValueError("chunk_tokens must be >= 1 and 0 <= overlap < chunk_tokens")
    pieces: list[tuple[str, int, int, int]] = []  # heading, start, end, tokens
    for heading, start, end in paragraphs(doc):
        tokens = spans(doc.text[start:end])
        if len(tokens) <= chunk_tokens:
            pieces.append((heading, start, end, len(tokens)))
            continue
        stride = chunk_tokens - overlap
        for first in range(0, len(tokens) - overlap, stride):
            window = tokens[first:first + chunk_tokens]
            pieces.append((heading, *_whole_words(doc.text, start + window[0][0], start + window[-1][1], start, end),
                           len(window)))
    chunks: list[Chunk] = []
    group: list[tuple[str, int, int, int]] = []

    def emit() -> None:
        if group:
            start, end = group[0][1], group[-1][2]
            chunks.append(Chunk(doc.source, doc.text[start:end], group[0][0], start, end))
            group.clear()

    for piece in pieces:
        windowed = group and piece[1] < group[-1][2]  # overlapping windows of one paragraph stay apart
        if group and (piece[0] != group[0][0] or windowed or sum(p[3] for p in group) + piece[3] > chunk_tokens):
            emit()
        group.append(piece)
    emit()
    return chunks
