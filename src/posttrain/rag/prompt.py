"""How retrieved chunks reach the model: one template, used alike by serve, chat, eval and the SFT data step.

The user's last message is the query. Its content is replaced by the template with two fields filled in:
`{context}`, the chunks numbered [1]..[k], each as "[n] source (heading)" followed by its text, and
`{question}`, the message itself. Earlier turns and the system prompt are left alone. A template of your own
(`--rag-template FILE`, or the text itself) must contain both fields. With no chunks found the message is
left unchanged and the answer carries an empty `citations` list.
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..errors import ConfigError

DEFAULT_TEMPLATE = ("Answer the question from the sources below and cite them by number, like [1]. If the sources "
                    "do not contain the answer, say so.\n\n{context}\n\nQuestion: {question}")
NO_ANSWER = "The sources do not contain the answer."


def load_template(value: str | None) -> str:
    if value is None:
        return DEFAULT_TEMPLATE
    if "{question}" not in value and Path(value).is_file():
        value = Path(value).read_text(encoding="utf-8")
    missing = [f for f in ("{context}", "{question}") if f not in value]
    if missing:
        raise ConfigError(f"RAG template: {' and '.join(missing)} missing (a template is a file or text holding "
                          "both {context} and {question})")
    try:
        value.format(context="", question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"RAG template: only {{context}} and {{question}} may appear in braces ({exc!r}); "
                          "write literal braces as {{ and }}") from None
    return value


def format_context(hits) -> str:
    """Chunks as numbered sources; `hits` are retrieve.Hit objects or citation dicts."""
    parts = []
    for n, hit in enumerate(hits, 1):
        get = hit.get if isinstance(hit, dict) else lambda key, h=hit: getattr(h, key)
        heading = f" ({get('heading')})" if get("heading") else ""
        parts.append(f"[{n}] {get('source')}{heading}\n{get('text')}")
    return "\n\n".join(parts)


def render(template: str, question: str, hits) -> str:
    return template.format(context=format_context(hits), question=question)


def last_user_index(messages: list[dict]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)


class Augmenter:
    """messages -> (messages with the context in the last user turn, citations). Thread-safe (one at a time)."""

    def __init__(self, retriever, k: int = 5, mode: str | None = None, template: str | None = None):
        if k < 1:
            raise ConfigError("--rag-k must be at least 1")
        self.retriever, self.k, self.mode = retriever, k, mode
        self.template = load_template(template)
        self.lock = threading.Lock()
        retriever.search("check", 1, mode)  # a mode the index cannot serve fails here, not on the first request

    def __call__(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        index = last_user_index(messages)
        question = messages[index].get("content") if index is not None else None
        if not isinstance(question, str) or not question.strip():
            return messages, []
        with self.lock:
            hits = self.retriever.search(question, self.k, self.mode)
        if not hits:
            return messages, []
        augmented = [dict(m) for m in messages]
        augmented[index]["content"] = render(self.template, question, hits)
        return augmented, [h.citation() for h in hits]


def load_augmenter(index: str, k: int = 5, mode: str | None = None, template: str | None = None) -> Augmenter:
    """The Augmenter `serve --rag` and `chat --rag` use: the index's own embedder, one line when it is empty."""
    import logging

    from .retrieve import Retriever

    retriever = Retriever(index)
    if retriever.is_empty():
        logging.getLogger("posttrain").warning("the index %s is empty: answers will carry no citations", index)
    return Augmenter(retriever, k, mode, template)


def format_citations(citations: list[dict]) -> str:
    """The sources line `chat --rag` prints under an answer."""
    if not citations:
        return "(no citations: nothing in the index matched)"
    return "sources: " + "; ".join(f"[{n}] {c['source']}" + (f" ({c['heading']})" if c.get("heading") else "")
                                   for n, c in enumerate(citations, 1))
