"""The HTTP routes: OpenAI's /v1 API, the tokenizer routes lm-evaluation-harness and vLLM clients probe, /health
and /metrics (Prometheus text).

Every handler validates the request completely before queueing it (see protocol.py for the bodies), so a bad
request is a 400 (404 for an unknown model, 413 for a body over --max-request-bytes) in OpenAI's error shape,
and only the batcher touches the model. Tokenizing and chat templating run in worker threads, off the event
loop, so a large prompt cannot stall other clients' streams. With --api-key every route but /health and
/metrics needs it, the tokenizer routes included.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, SamplingParams
from ..errors import ConfigError
from . import responses as r
from .batcher import Batcher, Job
from .images import request_images
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .tools import parse_tool_calls

MAX_REQUEST_BYTES = 4 * 1024 * 1024

log = logging.getLogger("posttrain")


class Server:
    """What the routes need: the engine (shared with the batcher), the served names and the limits."""

    rag = None  # `serve --rag`: a rag.prompt.Augmenter, messages -> (messages with context, citations)

    def __init__(self, engine: Engine, base_name: str, adapters: dict[str, str], api_key: str | None = None,
                 max_rows: int = 64, max_request_bytes: int = MAX_REQUEST_BYTES, cors: list[str] | None = None,
                 allow_remote_images: bool = False):
        self.engine = engine
        self.allow_remote_images = allow_remote_images
        self.max_request_bytes = max_request_bytes
        self.cors = cors or []
        self.tokenizer = engine.tokenizer
        self.base_name = base_name
        self.adapters = adapters  # served name -> adapter directory
        self.api_key = api_key
        config = getattr(engine.model, "get_base_model", lambda: engine.model)().config.get_text_config()  # (a VLM's)
        self.context_length = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                               or 2048)
        self.vocab_size = config.vocab_size
        self.batcher = Batcher(engine, base_name, list(adapters), max_rows=max_rows)

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
        bias = body.bias
        if any(not 0 <= token < self.vocab_size for token in bias):
            raise r.APIError(400, f"logit_bias: token ids must be in [0, {self.vocab_size})", param="logit_bias")
        if body.min_tokens > max_new_tokens:
            raise r.APIError(400, f"min_tokens ({body.min_tokens}) exceeds the token budget ({max_new_tokens})",
                             param="min_tokens")
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=max(body.top_k, 0), stop=list(body.stop or []), seed=body.seed,
                                  top_logprobs=top_logprobs, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, logit_bias=bias,
                                  min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
        except ConfigError as exc:
            raise r.APIError(400, str(exc)) from None

    async def images(self, messages: list) -> list[str]:
        """The image parts of a request's messages as data URLs (serve/images.py), in order."""
        urls = [url for index, message in enumerate(messages) for url in message.image_urls(index)]
        if urls and self.engine.vision is None:
            raise r.APIError(400, f"{urls[0][1]}: this model reads no images (it is not a vision-language model "
                                  "with an image processor)", param=urls[0][1], code="images_not_supported")
        return await asyncio.to_thread(request_images, urls, self.allow_remote_images, self.max_request_bytes) \
            if urls else []

    async def chat_prompt(self, messages: list[dict], tools,
                          images: list[str] | None = None) -> tuple[list[int], object]:
        """(token ids, the images' Pictures or None)."""
        try:
            if images:
                return await asyncio.to_thread(self.engine.image_prompt, messages, images, tools)
            return await asyncio.to_thread(self.engine.chat_prompt, messages, tools), None
        except ConfigError as exc:
            raise r.APIError(400, str(exc), param="messages") from None

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return (await asyncio.to_thread(self.tokenizer, text, add_special_tokens=add_special_tokens))["input_ids"]


async def read_body(server: Server, request: Request) -> bytes:
    """The request body, refused with a 413 as soon as it exceeds --max-request-bytes (declared or not)."""
    limit = server.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise r.APIError(413, f"the request body ({declared} bytes) exceeds the server's limit of {limit} bytes "
                              "(--max-request-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise r.APIError(413, f"the request body exceeds the server's limit of {limit} bytes "
                                  "(--max-request-bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


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
    body = parse(ChatRequest, await read_body(server, request))
    server.check_model(body.model)
    messages, citations = [m.for_template() for m in body.messages], None
    if server.rag is not None and body.rag:
        messages, citations = await retrieve(server, messages)
    cited = {"citations": citations} if citations is not None else {}
    prompt, pictures = await server.chat_prompt(messages, body.tools, await server.images(body.messages))
    top = (body.top_logprobs or 0) if body.logprobs else 0
    if body.stream and body.logprobs:
        raise r.APIError(400, "logprobs are not available when streaming; ask without stream", param="logprobs")
    params = server.params(body, server.budget([prompt], body.token_budget), top)
    # with tools a streamed answer is sent whole at the end: its tool calls are known only then
    tools = bool(body.tools) and body.tool_choice != "none"
    job = server.batcher.submit(Job(body.model, [prompt] * body.n, params, stream=body.stream and not tools,
                                    prompt_tokens=len(prompt), images=pictures))
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
    choices = [{"index": i, **message(c, tools), "logprobs": r.chat_logprobs(server.tokenizer, c) if body.logprobs
                else None} for i, c in enumerate(completions)]
    return r.envelope(id, "chat.completion", body.model, choices, usage=r.usage(len(prompt), completions), **cited)


def message(completion, tools: bool) -> dict:
    """The choice's message and finish_reason; with tools, tool calls in the text become `tool_calls`."""
    content, calls = parse_tool_calls(completion.text) if tools else (completion.text, [])
    if not calls:
        return {"message": {"role": "assistant", "content": completion.text}, "finish_reason": completion.finish_reason}
    return {"message": {"role": "assistant", "content": content, "tool_calls": calls}, "finish_reason": "tool_calls"}


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
        tools = bool(body.tools) and body.tool_choice != "none"
        async for kind, payload in events(job):
            if kind == "delta":
                yield chunk([delta(payload[0], {"content": payload[1]})])
            else:
                completions = payload
                for index, completion in enumerate(completions):  # citations go on the final chunk
                    final = index == len(completions) - 1 and not body.include_usage
                    finish = completion.finish_reason
                    if tools:  # sent whole: content, then the tool calls
                        answer = message(completion, True)
                        calls = answer["message"].get("tool_calls")
                        content = {"content": answer["message"]["content"]} if answer["message"]["content"] else {}
                        if calls:
                            content["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
                        if content:
                            yield chunk([delta(index, content)])
                        finish = answer["finish_reason"]
                    yield chunk([delta(index, {}, finish)], **(cited if final else {}))
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
    body = parse(CompletionRequest, await read_body(server, request))
    server.check_model(body.model)
    tokenizer = server.tokenizer
    prompts = [await server.tokenize(p) if isinstance(p, str) else p for p in body.prompts]
    if any(len(p) == 0 for p in prompts):
        raise r.APIError(400, "a prompt encodes to no tokens", param="prompt")
    if body.stream and body.logprobs is not None:
        raise r.APIError(400, "logprobs are not available when streaming; ask without stream", param="logprobs")
    params = server.params(body, server.budget(prompts, body.max_tokens or 16), body.logprobs or 0)
    expanded = [p for p in prompts for _ in range(body.n)]  # choice index = prompt index * n + j
    echo_scores = body.logprobs if body.echo and body.logprobs is not None else None
    prompt_tokens = sum(len(p) for p in prompts)
    job = server.batcher.submit(Job(body.model, expanded, params, stream=body.stream, prompt_logprobs=echo_scores,
                                    prompt_tokens=prompt_tokens))
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts]
    id = r.new_id("cmpl")
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
    if server.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors, allow_methods=["*"], allow_headers=["*"])

    def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not hmac.compare_digest(token.encode(), server.api_key.encode()):
            raise r.APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    tokenizer_routes = APIRouter(dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models():
        base = {"object": "model", "created": 0, "owned_by": "posttrain", "max_model_len": server.context_length}
        data = [{**base, "id": server.base_name, "root": server.base_name, "parent": None}]
        data += [{**base, "id": name, "root": path, "parent": server.base_name}
                 for name, path in server.adapters.items()]
        return {"object": "list", "data": data}

    @v1.post("/chat/completions", openapi_extra=request_body(ChatRequest))
    async def chat(request: Request):
        return with_sse_errors(await chat_completions(server, request))

    @v1.post("/completions", openapi_extra=request_body(CompletionRequest))
    async def complete(request: Request):
        return with_sse_errors(await completions(server, request))

    @tokenizer_routes.get("/tokenizer_info")
    async def tokenizer_info():
        tokenizer = server.tokenizer
        info = {"tokenizer_class": type(tokenizer).__name__, "model_max_length": server.context_length,
                "vocab_size": server.vocab_size, "chat_template": getattr(tokenizer, "chat_template", None)}
        for name in ("eos", "bos", "pad", "unk"):
            info[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
            info[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
        return info

    @tokenizer_routes.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(request: Request):
        body = parse(TokenizeRequest, await read_body(server, request))
        if body.model is not None:
            server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise r.APIError(400, "give either `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            tokens, _ = await server.chat_prompt([m.for_template() for m in body.messages], None,
                                                 await server.images(body.messages))
        else:
            tokens = await server.tokenize(body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": server.context_length, "tokens": tokens}

    @tokenizer_routes.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(request: Request):
        body = parse(DetokenizeRequest, await read_body(server, request))
        if body.model is not None:
            server.check_model(body.model)
        if any(not 0 <= t < server.vocab_size for t in body.tokens):
            raise r.APIError(400, f"token ids must be in [0, {server.vocab_size})", param="tokens")
        return {"prompt": await asyncio.to_thread(server.tokenizer.decode, body.tokens)}

    app.include_router(v1)
    app.include_router(tokenizer_routes)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.batcher.stats}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(prometheus(server.batcher.stats), media_type="text/plain; version=0.0.4")

    install_error_handlers(app)
    install_openapi_bodies(app)
    return app


def request_body(model) -> dict:
    """What /openapi.json says a route takes: the pydantic model's schema (the route parses the body itself, to
    answer bad bodies in OpenAI's error shape)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install_openapi_bodies(app: FastAPI) -> None:
    """Add the request models (and the models they use) to the schema's components."""
    default = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = default()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


METRICS = (  # stats key, metric name, type, help
    ("requests", "posttrain_requests_total", "counter", "Generation requests admitted."),
    ("failed", "posttrain_requests_failed_total", "counter", "Generation requests that failed."),
    ("cancelled", "posttrain_requests_cancelled_total", "counter", "Requests whose client went away."),
    ("prompt_tokens", "posttrain_prompt_tokens_total", "counter", "Prompt tokens of admitted requests."),
    ("completion_tokens", "posttrain_generation_tokens_total", "counter", "Tokens generated."),
    ("steps", "posttrain_decode_steps_total", "counter", "Decoding steps of the running batch."),
    ("running_rows", "posttrain_running_rows", "gauge", "Sequences decoding now (the batch size)."),
    ("waiting_rows", "posttrain_waiting_rows", "gauge", "Sequences queued for a place in the batch."),
    ("largest_batch", "posttrain_largest_batch_rows", "gauge", "The largest batch decoded so far."),
)


def prometheus(stats: dict) -> str:
    lines = []
    for key, name, kind, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {stats.get(key, 0)}"]
    return "\n".join(lines) + "\n"


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
