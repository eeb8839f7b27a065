"""Response bodies in OpenAI's shapes: choices, usage, both log-prob formats, SSE lines, errors.

Log-prob conventions: every sampled token is listed, a final stop token included (lm-evaluation-harness drops
the last entry of an echoed prompt as "the generated token"). Generated tokens are scored under the sampling
distribution (logits / temperature; temperature 0 counts as 1), echoed prompt tokens at temperature 1.
"""
from __future__ import annotations

import json
import time
import uuid

from ..engine import Completion, PromptLogprobs

LOWEST_LOGPROB = -9999.0  # JSON has no -inf


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(id: str, object: str, model: str, choices: list, **extra) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": choices, **extra}


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _lp(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)


def chat_logprobs(tokenizer, completion: Completion) -> dict:
    """`choices[i].logprobs` of a chat completion: content = one entry per token with its top alternatives."""
    strings = token_strings(tokenizer, completion.token_ids)
    top_ids = sorted({i for top in completion.top_logprobs for i, _ in top})
    top_strings = dict(zip(top_ids, token_strings(tokenizer, top_ids)))

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for index, (text, logprob) in enumerate(zip(strings, completion.logprobs)):
        top = completion.top_logprobs[index] if index < len(completion.top_logprobs) else []
        content.append({**entry(text, logprob), "top_logprobs": [entry(top_strings[i], v) for i, v in top]})
    return {"content": content, "refusal": None}


def legacy_logprobs(tokenizer, completion: Completion, prompt: PromptLogprobs | None, prompt_chars: int) -> dict:
    """`choices[i].logprobs` of a (legacy) completion: parallel lists tokens / token_logprobs / top_logprobs /
    text_offset, the echoed prompt's tokens first when `prompt` is given (its first token has no log-prob).
    Each top_logprobs dict holds the k most likely tokens and the token itself."""
    ids, logprobs, tops = [], [], []
    if prompt is not None:
        ids += prompt.token_ids
        logprobs += prompt.logprobs
        tops += prompt.top
    ids += completion.token_ids
    logprobs += completion.logprobs
    tops += completion.top_logprobs or [[] for _ in completion.token_ids]
    strings = token_strings(tokenizer, ids)
    top_ids = sorted({i for top in tops if top for i, _ in top})
    top_strings = dict(zip(top_ids, token_strings(tokenizer, top_ids)))
    top_dicts = []
    for text, logprob, top in zip(strings, logprobs, tops):
        if logprob is None:
            top_dicts.append(None)
            continue
        alternatives = {top_strings[i]: _lp(v) for i, v in (top or [])}
        alternatives.setdefault(text, _lp(logprob))
        top_dicts.append(alternatives)
    # offsets into the choice's text: the echoed prompt starts at 0, a completion after the prompt's text
    offset = 0 if prompt is not None else prompt_chars
    offsets = []
    for text in strings:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": strings, "token_logprobs": [None if v is None else _lp(v) for v in logprobs],
            "top_logprobs": top_dicts, "text_offset": offsets}
