"""The HTTP routes: OpenAI's /v1 API plus the tokenizer routes lm-evaluation-harness and vLLM clients probe.

Every handler validates the request completely before queueing it (see protocol.py for the bodies), so a bad
request is a 400 (404 for an unknown model) in OpenAI's error shape, and only the batcher touches the model.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, SamplingParams
from ..errors import ConfigError
from . import responses as r
from .batcher import Batcher, Job
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("posttrain")


class Server:
    """What the routes need: the engine (shared with the batcher), the served names and the limits."""

    rag = None  # `serve --rag`: a rag.prompt.Augmenter, messages -> (messages with context, citations)

    def __init__(self, engine: Engine, base_name: str, adapters: dict[str, str], api_key: str | None = None,
                 batch_window_s: float = 0.01, max_batch_wait_s: float = 0.05):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.base_name = base_name
        self.adapters = adapters  # served name -> adapter directory
        self.api_key = api_key
        config = getattr(engine.model, "get_base_model", lambda: engine.model)().config
        self.context_length = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                               or 2048)
        self.vocab_size = config.vocab_size
        self.batcher = Batcher(engine, base_name, list(adapters), window_s=batch_window_s,
                               max_wait_s=max_batch_wait_s)

    # ------------------------------------------------------------------ checks shared by the routes

    def check_model(self, name: str) -> None:
        if name != self.base_name and name not in self.adapters:
            raise r.APIError(404, f"The model `{name}` does not exist. Served: {self.names()}", param="model",
                             code="model_not_found")

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def budget(self, prompts: list[list[int]], max_tokens: int | None) -> int:
        """The completion token budget; the prompt plus it must fit the context."""
        for prompt in prompts:
            if any(not 0 <= token < self.vocab_size for token in prompt):
                raise r.APIError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt")
        longest = max(len(p) for p in prompts)
        tokens = max_tokens if max_tokens is not None else self.context_length - longest
        if longest + max(tokens, 1) > self.context_length:
            raise r.APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, "
                             f"you requested {longest + tokens} tokens ({longest} in the prompt, {tokens} for the "
                             "completion). Please reduce the prompt or the completion length.",
                             param="max_tokens" if max_tokens else "messages", code="context_length_exceeded")
        return tokens

    def params(self, body, max_new_tokens: int, top_logprobs: int = 0) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=max(body.top_k, 0), stop=list(body.stop or []), seed=body.seed,
                                  top_logprobs=top_logprobs)
        except ConfigError as exc:
            raise r.APIError(400, str(exc)) from None

    def chat_prompt(self, messages: list[dict], tools) -> list[int]:
        try:
            return self.engine.chat_prompt(messages, tools=tools)
        except ConfigError as exc:
            raise r.APIError(400, str(exc), param="messages") from None


def parse(model, raw: bytes):
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        if first.get("type") == "json_invalid":
            raise r.APIError(400, f"the body is not valid JSON: {first.get('msg')}") from None
        message = "; ".join(f"{'.'.join(map(str, e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in exc.errors())
        raise r.APIError(400, message, param=where or None) from None


async def wait_done(job: Job, request: Request):
    """The job's final event; cancels the job when the client goes away meanwhile."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if done:
                event = getter.result()
                if event[0] == "done":
                    return event[1], event[2]
                if event[0] == "error":
                    raise event[1]
                getter = asyncio.ensure_future(job.events.get())
            elif await request.is_disconnected():
                job.cancelled.set()
                raise asyncio.CancelledError
    finally:
        getter.cancel()


def worker_error(exc: Exception) -> r.APIError:
    if isinstance(exc, ConfigError):
        return r.APIError(400, str(exc))
    log.exception("generation failed", exc_info=exc)
    return r.APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="internal_error")


# ---------------------------------------------------------------------- chat completions

async def chat_completions(server: Server, request: Request):
    body = parse(ChatRequest, await request.body())
    server.check_model(body.model)
    messages, citations = [m.for_template() for m in body.messages], None
    if server.rag is not None and body.rag:
        messages, citations = await retrieve(server, messages)
    cited = {"citations": citations} if citations is not None else {}
    prompt = server.chat_prompt(messages, body.tools)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    if body.stream and body.logprobs:
        raise r.APIError(400, "logprobs are not available when streaming; ask without stream", param="logprobs")
    params = server.params(body, server.budget([prompt], body.token_budget), top)
    job = server.batcher.submit(Job(body.model, [prompt] * body.n, params, stream=body.stream))
    id = r.new_id("chatcmpl")
    if body.stream:
        return StreamingResponse(chat_stream(server, job, id, body, len(prompt), cited),
                                 media_type="text/event-stream")
    try:
        completions, _ = await wait_done(job, request)
    except asyncio.CancelledError:
        return JSONResponse(r.error_body("client disconnected"), status_code=499)
    except Exception as exc:  # noqa: BLE001
        raise worker_error(exc) from None
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": r.chat_logprobs(server.tokenizer, c) if body.logprobs else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
    return r.envelope(id, "chat.completion", body.model, choices, usage=r.usage(len(prompt), completions), **cited)


async def retrieve(server: Server, messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """The RAG hook: retrieval runs off the event loop; a failing index is a 503 naming it."""
    from ..errors import PosttrainError

    try:
        return await asyncio.to_thread(server.rag, messages)
    except PosttrainError as exc:
        raise r.APIError(503, f"retrieval failed: {exc}", type="internal_error") from None


async def chat_stream(server: Server, job: Job, id: str, body: ChatRequest, prompt_tokens: int, cited: dict):
    def chunk(choices, **extra):
        return r.sse(r.envelope(id, "chat.completion.chunk", body.model, choices, **extra,
                                **({"usage": None} if body.include_usage and "usage" not in extra else {})))

    def delta(index, content, finish_reason=None):
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}

    try:
        for index in range(body.n):
            yield chunk([delta(index, {"role": "assistant", "content": ""})])
        async for kind, payload in events(job):
            if kind == "delta":
                yield chunk([delta(payload[0], {"content": payload[1]})])
            else:
                completions = payload
                for index, completion in enumerate(completions):  # citations go on the final chunk
                    final = index == len(completions) - 1 and not body.include_usage
                    yield chunk([delta(index, {}, completion.finish_reason)], **(cited if final else {}))
                if body.include_usage:
                    yield chunk([], usage=r.usage(prompt_tokens, completions), **cited)
        yield r.sse("[DONE]")
    finally:
        job.cancelled.set()  # a no-op once answered; stops the rows when the client went away


async def events(job: Job):
    """("delta", (choice, text)) items, then one ("done", completions); a worker error becomes an SSE error."""
    while True:
        event = await job.events.get()
        if event[0] == "delta":
            yield "delta", (event[1], event[2])
        elif event[0] == "done":
            yield "done", event[1]
            return
        else:
            raise StreamError(worker_error(event[1]))


class StreamError(Exception):
    def __init__(self, error: r.APIError):
        self.error = error


# ---------------------------------------------------------------------- completions

async def completions(server: Server, request: Request):
    body = parse(CompletionRequest, await request.body())
    server.check_model(body.model)
    tokenizer = server.tokenizer
    prompts = [tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in body.prompts]
    if any(len(p) == 0 for p in prompts):
        raise r.APIError(400, "a prompt encodes to no tokens", param="prompt")
    if body.stream and body.logprobs is not None:
        raise r.APIError(400, "logprobs are not available when streaming; ask without stream", param="logprobs")
    params = server.params(body, server.budget(prompts, body.max_tokens or 16), body.logprobs or 0)
    expanded = [p for p in prompts for _ in range(body.n)]  # choice index = prompt index * n + j
    echo_scores = body.logprobs if body.echo and body.logprobs is not None else None
    job = server.batcher.submit(Job(body.model, expanded, params, stream=body.stream, prompt_logprobs=echo_scores))
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts]
    id = r.new_id("cmpl")
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        return StreamingResponse(completion_stream(job, id, body, texts, prompt_tokens),
                                 media_type="text/event-stream")
    try:
        results, scores = await wait_done(job, request)
    except asyncio.CancelledError:
        return JSONResponse(r.error_body("client disconnected"), status_code=499)
    except Exception as exc:  # noqa: BLE001
        raise worker_error(exc) from None
    choices = []
    for index, completion in enumerate(results):
        prompt_text = texts[index // body.n]
        logprobs = None
        if body.logprobs is not None:
            logprobs = r.legacy_logprobs(tokenizer, completion, scores[index] if scores else None, len(prompt_text))
        choices.append({"index": index, "text": (prompt_text if body.echo else "") + completion.text,
                        "logprobs": logprobs, "finish_reason": completion.finish_reason})
    return r.envelope(id, "text_completion", body.model, choices, usage=r.usage(prompt_tokens, results))


async def completion_stream(job: Job, id: str, body: CompletionRequest, texts: list[str], prompt_tokens: int):
    def chunk(index, text, finish_reason=None):
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return r.sse(r.envelope(id, "text_completion", body.model, [choice],
                                **({"usage": None} if body.include_usage else {})))

    try:
        if body.echo:
            for index in range(len(job.prompts)):
                yield chunk(index, texts[index // body.n])
        async for kind, payload in events(job):
            if kind == "delta":
                yield chunk(*payload)
            else:
                for index, completion in enumerate(payload):
                    yield chunk(index, "", completion.finish_reason)
                if body.include_usage:
                    yield r.sse(r.envelope(id, "text_completion", body.model, [],
                                           usage=r.usage(prompt_tokens, payload)))
        yield r.sse("[DONE]")
    finally:
        job.cancelled.set()


def sse_errors(stream):
    """A failure after the response started cannot change the status: it is sent as an SSE error event."""
    async def guarded():
        try:
            async for line in stream:
                yield line
        except StreamError as exc:
            yield r.sse(exc.error.body())
            yield r.sse("[DONE]")
    return guarded()


# ---------------------------------------------------------------------- the app

def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.stop()

    app = FastAPI(title="posttrain", lifespan=lifespan)

    def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
            raise r.APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models():
        base = {"object": "model", "created": 0, "owned_by": "posttrain", "max_model_len": server.context_length}
        data = [{**base, "id": server.base_name, "root": server.base_name, "parent": None}]
        data += [{**base, "id": name, "root": path, "parent": server.base_name}
                 for name, path in server.adapters.items()]
        return {"object": "list", "data": data}

    @v1.post("/chat/completions")
    async def chat(request: Request):
        return with_sse_errors(await chat_completions(server, request))

    @v1.post("/completions")
    async def complete(request: Request):
        return with_sse_errors(await completions(server, request))

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.batcher.stats}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tokenizer = server.tokenizer
        info = {"tokenizer_class": type(tokenizer).__name__, "model_max_length": server.context_length,
                "vocab_size": server.vocab_size, "chat_template": getattr(tokenizer, "chat_template", None)}
        for name in ("eos", "bos", "pad", "unk"):
            info[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
            info[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
        return info

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse(TokenizeRequest, await request.body())
        if body.model is not None:
            server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise r.APIError(400, "give either `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            tokens = server.chat_prompt([m.for_template() for m in body.messages], None)
        else:
            tokens = server.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(tokens), "max_model_len": server.context_length, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse(DetokenizeRequest, await request.body())
        if body.model is not None:
            server.check_model(body.model)
        if any(not 0 <= t < server.vocab_size for t in body.tokens):
            raise r.APIError(400, f"token ids must be in [0, {server.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    install_error_handlers(app)
    return app


def with_sse_errors(response):
    if isinstance(response, StreamingResponse):
        response.body_iterator = sse_errors(response.body_iterator)
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(r.APIError)
    async def api_error(request, exc: r.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(r.error_body(str(exc.errors()[:3])), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(r.error_body(str(exc.detail), code=exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # uvicorn logs the traceback
        return JSONResponse(r.error_body(f"internal error: {type(exc).__name__}", "internal_error"),
                            status_code=500)
