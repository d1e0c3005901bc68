"""``sinklora serve``: an OpenAI-compatible HTTP API (Starlette on uvicorn) and a chat page, on loopback.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream`` true: server-sent
``chat.completion.chunk`` / ``text_completion`` events ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, and the page (``GET /``, static files of this package). Requests are stateless, as
OpenAI's: the client sends the whole conversation; each request gets its own KV cache under the policy
it names (``cache``, ``budget``, ``sink_tokens``, ``heavy_ratio``, ``positions``; default: the
server's). One worker runs requests one after another (:mod:`sinklora.serve.scheduler`); a full waiting
line answers 429, a disconnect cancels the request wherever it is, prefill included.

How a request flows: body (size-limited JSON) -> pydantic schema -> :meth:`Service.prepare` in a
thread (chat template, context check, the request's cache) -> ``Scheduler.submit`` -> the worker runs
a :class:`~sinklora.serve.engine.Generation` and posts its pieces -> the route streams or collects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sinklora.serve.engine import (
    Generation,
    Sampling,
    chat_prompt_ids,
    context_length,
    resolve_budget,
)
from sinklora.serve.scheduler import Job, QueueFull, Scheduler
from sinklora.serve.schemas import (
    CACHE_FIELDS,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    GenerationRequest,
    ModelCard,
    ModelList,
    Usage,
)
from sinklora.serve.security import ApiKeyGuard, HostOriginGuard, error_response
from sinklora.settings import CacheOptions, ServerOptions, SessionOptions

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
BODY_TIMEOUT_S = 30.0  # a client has this long to send its request body


@dataclass
class Work:
    """A prepared request: what the worker runs."""

    prompt_ids: list[int]
    sampling: Sampling
    cache: Any  # a fresh PolicyCache, this request's own
    stream: bool
    include_usage: bool


class Service:
    """What the routes share: the model and tokenizer, the server's defaults, the scheduler."""

    def __init__(self, model: Any, tokenizer: Any, opts: SessionOptions, server: ServerOptions, model_id: str):
        self.model, self.tokenizer, self.opts, self.server, self.model_id = model, tokenizer, opts, server, model_id
        self.context_len = context_length(model)
        self.cache_defaults = CacheOptions(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(CacheOptions)})
        self.scheduler = Scheduler(self._run, server.max_queue)
        self.created = int(time.time())

    # ---- in a thread of the pool: everything a request needs before it waits for the model -------------

    def prepare(self, req: GenerationRequest) -> Work:
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            if self.opts.system_prompt and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": self.opts.system_prompt})
            ids, what = chat_prompt_ids(self.tokenizer, messages), "messages"
            max_tokens, max_param = req.max_completion_tokens or req.max_tokens, (
                "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        else:
            ids, what = [int(i) for i in self.tokenizer(req.prompt)["input_ids"]], "prompt"
            max_tokens, max_param = req.max_tokens, "max_tokens"
        if not ids:
            raise APIError(400, f"{what}: the prompt has no tokens", param=what)
        room = self.context_len - len(ids)
        if max_tokens is None:
            max_tokens = min(self.opts.max_new_tokens, max(room, 1))
        if len(ids) + max_tokens > self.context_len:
            fix = f"lower {max_param} to at most {room}, or shorten the {what}" if room > 0 else f"shorten the {what}"
            raise APIError(400, f"{what} of {len(ids)} tokens + {max_param}={max_tokens} = {len(ids) + max_tokens} "
                                f"tokens, more than the model's context of {self.context_len} tokens: {fix}",
                           param=what if room < 1 else max_param, code="context_length_exceeded")
        temperature = self.opts.temperature if req.temperature is None else req.temperature
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature,
                            top_p=self.opts.top_p if req.top_p is None else req.top_p, seed=req.seed,
                            stop=tuple(req.stop or ()))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Work(ids, sampling, self.make_cache(req, len(ids)), req.stream, include_usage)

    def make_cache(self, req: GenerationRequest, prompt_len: int) -> Any:
        """The request's own cache. A request that names ``cache`` starts from the defaults of the cache
        fields, not the server's (``cache=full`` must not inherit the server's budget)."""
        given = req.cache_settings()
        if "budget" in given and given["budget"] is not None:
            given["budget"] = str(given["budget"])
        options = dataclasses.replace(CacheOptions() if "cache" in given else self.cache_defaults, **given)
        errors = options.validate()
        try:
            if not errors:
                return resolve_budget(options, prompt_len).make(self.model)
        except ValueError as e:
            errors = [str(e)]
        param = next((f for f in CACHE_FIELDS if f in given), "cache")
        raise APIError(400, "; ".join(errors), param=param, code="invalid_cache")

    # ---- in the worker thread --------------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        work: Work = job.payload
        gen = Generation(self.model, self.tokenizer, work.prompt_ids, work.cache, work.sampling,
                         prefill_chunk=self.opts.prefill_chunk, should_stop=job.should_stop)
        job.progress = lambda: {"prompt_tokens": len(work.prompt_ids), "cached_tokens": gen.cached,
                                "completion_tokens": len(gen.token_ids)}
        for piece in gen:
            job.post("piece", piece)
        job.finish_reason = gen.finish_reason
        job.post("done", gen)
        stats = gen.stats()
        logger.info("%d prompt + %d new tokens in %.2f s (%s, %s cache kept %s of %s tokens)", stats["prompt_tokens"],
                    stats["completion_tokens"], gen.seconds, job.reason or gen.finish_reason,
                    stats["cache"].get("policy"), stats["cache"].get("kept_tokens"), stats["cache"].get("seen_tokens"))

    # ---- on the event loop -----------------------------------------------------------------------------

    def submit(self, work: Work) -> Job:
        job = Job(work, asyncio.get_running_loop(), self.server.request_timeout)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, **self.scheduler.stats()}


async def read_body(request: Request, schema: type[BaseModel], max_bytes: int) -> Any:
    """The JSON body validated by ``schema``: 415 unless JSON, 413 past ``max_bytes``, 400 naming the field."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"Content-Type {content_type or 'missing'!r}: send the body as application/json")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:  # h11 refuses non-numeric lengths
        raise APIError(413, f"request body of {int(length)} bytes is larger than max_body_bytes={max_bytes}",
                       code="request_too_large")
    body = bytearray()
    try:
        with anyio.fail_after(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise APIError(413, f"request body is larger than max_body_bytes={max_bytes}",
                                   code="request_too_large")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:
        problems = [(".".join(str(p) for p in err["loc"]), err["msg"]) for err in e.errors()]
        message = "; ".join(f"{loc}: {msg}" if loc else f"the body is not a valid JSON object: {msg}"
                            for loc, msg in problems)
        raise APIError(400, message, param=problems[0][0] or None) from None


async def watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client goes away (its body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel("disconnected")


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _failure(job: Job, kind: str, value: Any) -> APIError | None:
    """The error to report for an event, if it is one."""
    if kind == "timeout" or job.reason == "timeout":
        return APIError(504, f"the request took longer than request_timeout={job.deadline - job.submitted:g} s",
                        code="timeout")
    if kind == "error":
        return APIError(500, f"generation failed: {value}", code="generation_failed")
    if job.reason == "shutdown":
        return APIError(503, "the server is shutting down", code="shutdown")
    return None


class Reply:
    """The shapes of one route's answers: chat (``chat.completion``) or completions (``text_completion``)."""

    def __init__(self, service: Service, chat: bool):
        self.service, self.chat = service, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.service.model_id}

    def chunk(self, text: str | None, first: bool, finish: str | None = None, extra: dict | None = None) -> BaseModel:
        if self.chat:
            delta = Delta(role="assistant" if first else None, content=text)
            return ChatCompletionChunk(**self._head(), choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                                       sinklora=extra)
        return Completion(**self._head(), choices=[CompletionChoice(text=text or "", finish_reason=finish)],
                          sinklora=extra)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        cls = ChatCompletionChunk if self.chat else Completion
        return cls(**self._head(), choices=[], usage=usage)

    def whole(self, text: str, finish: str | None, usage: Usage, extra: dict) -> BaseModel:
        if self.chat:
            return ChatCompletion(**self._head(), choices=[ChatChoice(message=AssistantMessage(content=text),
                                                                      finish_reason=finish)], usage=usage, sinklora=extra)
        return Completion(**self._head(), choices=[CompletionChoice(text=text, finish_reason=finish)], usage=usage,
                          sinklora=extra)


def _outcome(job: Job, gen: Generation) -> tuple[Usage, dict[str, Any]]:
    usage = Usage(prompt_tokens=len(gen.prompt_ids), completion_tokens=len(gen.token_ids),
                  total_tokens=len(gen.prompt_ids) + len(gen.token_ids))
    queue_s = (job.started or job.submitted) - job.submitted
    return usage, {**gen.stats(), "queue_s": round(queue_s, 4)}


async def _stream(reply: Reply, job: Job, work: Work, watcher: asyncio.Task) -> AsyncIterator[str]:
    first, ended = True, False
    try:
        while not ended:
            kind, value = await job.next_event()
            error = _failure(job, kind, value)
            if error is not None:
                yield _sse(error.body())
                break
            if kind == "piece":
                yield _sse(reply.chunk(value, first))
                first = False
            elif kind == "done":
                usage, extra = _outcome(job, value)
                yield _sse(reply.chunk(None if reply.chat else "", first, value.finish_reason, extra))
                if work.include_usage:
                    yield _sse(reply.usage_chunk(usage))
            ended = kind == "end"
        yield "data: [DONE]\n\n"
    finally:
        if not ended:  # the client left (or the loop is stopping): stop the work
            job.cancel("disconnected")
        watcher.cancel()


async def _generate(request: Request, service: Service, schema: type[GenerationRequest]) -> Response:
    req = await read_body(request, schema, service.server.max_body_bytes)
    work = await run_in_threadpool(service.prepare, req)
    job = service.submit(work)
    watcher = asyncio.ensure_future(watch_disconnect(request, job))
    reply = Reply(service, chat=schema is ChatCompletionRequest)
    if work.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(reply, job, work, watcher), media_type="text/event-stream", headers=headers)
    pieces, gen = [], None
    try:
        while True:
            kind, value = await job.next_event()
            error = _failure(job, kind, value)
            if error is not None:
                raise error
            if kind == "end":
                break
            if kind == "piece":
                pieces.append(value)
            elif kind == "done":
                gen = value
    finally:
        watcher.cancel()
    if gen is None or job.reason == "disconnected":  # nobody to answer
        return Response(status_code=499)
    usage, extra = _outcome(job, gen)
    return JSONResponse(reply.whole("".join(pieces), gen.finish_reason, usage, extra).model_dump())


def make_app(service: Service) -> Starlette:
    """The ASGI app: the routes behind the Host/Origin guard, CORS for allowed origins, the API key."""
    server = service.server

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, service, ChatCompletionRequest)

    async def completions(request: Request) -> Response:
        return await _generate(request, service, CompletionRequest)

    async def models(request: Request) -> Response:
        card = ModelCard(id=service.model_id, created=service.created, context_length=service.context_len,
                         sinklora={"cache": dataclasses.asdict(service.cache_defaults),
                                   "max_new_tokens": service.opts.max_new_tokens})
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(request: Request) -> Response:
        return JSONResponse(service.health())

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def on_crash(request: Request, exc: Exception) -> Response:
        logger.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.scheduler.close)

    middleware = [Middleware(HostOriginGuard, bound_host=server.host, allowed_hosts=server.allowed_hosts,
                             allowed_origins=server.allowed_origins)]
    if server.allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=server.allowed_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"]))
    if server.key():
        middleware.append(Middleware(ApiKeyGuard, api_key=server.key()))
    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/", page, methods=["GET"]),
              Mount("/static", StaticFiles(directory=STATIC))]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv4 or IPv6), made before the model loads so a bad address or a
    port in use fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ValueError(f"host={host!r} port={port}: cannot listen there ({e}); give a local address such as "
                         "127.0.0.1 or ::1, and a free port (0 picks one)") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def uvicorn_server(app: Starlette, max_requests: int = 0) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", proxy_headers=False, server_header=False,
                            limit_max_requests=max_requests or None, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` on ``host:port`` in a background thread (tests, notebooks); yields its URL, stops on exit."""
    sock = bind(host, port)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise RuntimeError("the server did not start within 30 s")
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
