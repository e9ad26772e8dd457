"""The gateway: an ASGI app (Starlette) speaking OpenAI's API in front of one engine, which it
reaches over ZeroMQ with one AsyncClient (docs/openai_api.md), or in front of several, each
request routed by its cached prefix and their load (router.py). The engine loop never sees
HTTP; several gateways may share one engine.

Each prompt of a request is one engine request. A streamed request answers with HTTP errors
until its engine requests have replied once (so that a bad parameter or an overloaded engine
gets its status), then with server-sent events. A client that disconnects has its engine
requests aborted, streamed or not.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pagedkv.runtime.serving.client import DEFAULT_ADDRESS, AsyncClient, ServerError, generate_message
from pagedkv.runtime.serving.http.errors import ApiError, engine_unavailable, from_engine
from pagedkv.runtime.serving.http.guard import (
    ApiKeyMiddleware, Disconnected, check_http_bind, read_json, until_disconnected
)
from pagedkv.runtime.serving.http.metrics import Metrics, RequestTimer
from pagedkv.runtime.serving.http.requests import Job, parse, parse_detokenize, parse_tokenize
from pagedkv.runtime.serving.http.responses import DONE, format_for, sse, usage
from pagedkv.runtime.serving.http.router import LOAD_SLACK

log = logging.getLogger("pagedkv.api")


@dataclass
class ApiConfig:
    address: str = DEFAULT_ADDRESS        # the engine's ZeroMQ socket
    addresses: list[str] | None = None    # several engines: routed by cached prefix and load (router.py)
    routing: str = "prefix"               # with several: "prefix" (cached prefix, load, session) or "round-robin"
    load_slack: int = LOAD_SLACK          # prefix routing: requests in flight beyond the least loaded engine's
    host: str = "127.0.0.1"
    port: int = 8000                      # 0: a free port
    api_key: str | None = None            # required as a Bearer token on /v1 when set
    insecure: bool = False                # allow a non-loopback host without an API key
    served_model_name: str | None = None  # default: the engine's model file or folder name
    max_body_bytes: int = 4 * 2**20
    engine_timeout: float = 120.0         # seconds to wait for each engine reply
    health_timeout: float = 5.0           # seconds for /health, /metrics and the model's name
    curve_keys: str | None = None
    client_name: str = "client"
    exit_with_parent: bool = False        # started by `pagedkv serve`: leave when it does


@dataclass
class ModelInfo:
    name: str
    root: str                      # the engine's model path
    max_model_len: int | None
    sampling_defaults: dict = field(default_factory=dict)  # what the model ships; unset request fields take them
    tool_parser: str | None = None  # the chat template's tool-call format (tool_calls.py)
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "pagedkv",
                "root": self.root, "max_model_len": self.max_model_len}


def model_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


class Gateway:
    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.client: AsyncClient | None = None
        self.router = None  # several engines: the Router
        self.model: ModelInfo | None = None  # learned from the engine's first health reply

    # -- the engine ---------------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        if c.addresses and len(c.addresses) > 1:
            from pagedkv.runtime.serving.http.router import Router

            self.router = Router(c.addresses, c.engine_timeout, c.curve_keys, c.client_name,
                                 load_slack=c.load_slack, prefix_aware=c.routing == "prefix")
            self.metrics.add_router(self.router)
            await self.router.start()
            return
        self.client = AsyncClient(c.addresses[0] if c.addresses else c.address, c.engine_timeout, c.curve_keys,
                                  c.client_name)

    async def stop(self) -> None:
        if self.router is not None:
            await self.router.stop()
        else:
            await self.client.close()

    async def engine_health(self) -> dict:
        if self.router is not None:
            if not any(e.healthy for e in self.router.engines):
                await self.router.wait_ready(self.config.health_timeout)
            if not any(e.healthy for e in self.router.engines) or self.router.health is None:
                raise engine_unavailable(f"none of the {len(self.router.engines)} engines is in service")
            return self.router.health
        try:
            health = await self.client.health(timeout=self.config.health_timeout)
        except TimeoutError:
            raise engine_unavailable(f"the engine at {self.config.address} did not answer within "
                                     f"{self.config.health_timeout:g} s") from None
        except ServerError as e:
            raise from_engine(e) from None
        if health.get("status") != "ok":
            raise engine_unavailable(f"the engine is {health.get('status')}")
        return health

    async def model_info(self) -> ModelInfo:
        if self.model is None:
            health = await self.engine_health()
            name = self.config.served_model_name or model_name(str(health.get("model")))
            self.model = ModelInfo(name, str(health.get("model")), health.get("max_model_len"),
                                   dict(health.get("sampling_defaults") or {}), health.get("tool_parser"))
        return self.model

    async def _replies(self, source: dict, job: Job, model: str) -> AsyncIterator[dict]:
        """One engine request's replies (token ones only when streamed), timed for the metrics."""
        client, engine = self.client, None
        if self.router is not None:
            try:
                engine, _ = await self.router.choose(source)
            except LookupError as e:
                raise engine_unavailable(str(e)) from None
            client = engine.client
            engine.in_flight += 1
        message = generate_message(client.new_id(), source.get("prompt"), source.get("prompt_ids"),
                                   source.get("messages"), job.stream, job.params, job.clamp_max_tokens,
                                   job.chat_options if "messages" in source else None)
        timer = RequestTimer(self.metrics, model)
        try:
            # The engine may work on a request for longer than --timeout: what ends the wait is an
            # engine that does not answer, or that no longer holds the request (AsyncClient).
            async with aclosing(client.replies(message, self.config.engine_timeout, probe=True)) as replies:
                async for reply in replies:
                    if reply["type"] == "final":
                        timer.final(reply)
                    elif any(o["token_ids"] for o in reply["outputs"]):
                        timer.token_reply()
                    yield reply
        except ServerError as e:
            error = from_engine(e)
            if error.param == "max_tokens":
                error.param = job.max_tokens_param
            elif error.param == "structured_outputs":
                error.param = job.structured_param
            raise error from None
        except TimeoutError as e:  # the request is aborted as the stream closes, in case the engine lives
            raise engine_unavailable(str(e)) from None
        finally:
            if engine is not None:
                engine.in_flight -= 1

    async def _open(self, job: Job, model: str) -> list[AsyncIterator[dict]]:
        """Sends every prompt's engine request and waits for each one's first reply, so that
        errors come before the response starts; returns the streams, first replies included."""
        streams = [self._replies(source, job, model) for source in job.sources]
        try:
            firsts = await _gather(*(anext(s) for s in streams))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        return [_chain(first, s) for first, s in zip(firsts, streams)]

    # -- endpoints ----------------------------------------------------------------------------------
    async def generate(self, request: Request, chat: bool) -> Response:
        try:
            body = await read_json(request, self.config.max_body_bytes)
        except Disconnected:  # an ordinary event, not an error of ours
            log.info("a client disconnected while sending its request (%s %s)", request.method, request.url.path)
            return Response(status_code=499)
        info = await self.model_info()
        job = parse(body, chat, info.max_model_len, info.sampling_defaults, info.tool_parser)
        self._check_model(job.model, info)
        fmt = format_for(job, info.name)
        if job.echo:
            fmt.echo = [await self._prompt_text(s) for s in job.sources]
        try:
            streams = await until_disconnected(request.receive, self._open(job, info.name))
            if job.stream:
                return EventStream(self._events(job, fmt, streams))
            finals = await until_disconnected(request.receive, _gather(*(_last(s) for s in streams)))
        except Disconnected:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(fmt.response(finals))

    @staticmethod
    def _check_model(model: str | None, info: ModelInfo) -> None:
        if model is not None and model not in (info.name, info.root):
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{info.name}`",
                           param="model", code="model_not_found")

    async def _engine_call(self, call) -> dict:
        try:
            return await call
        except ServerError as e:
            raise from_engine(e) from None
        except TimeoutError as e:
            raise engine_unavailable(str(e)) from None

    async def _prompt_text(self, source: dict) -> str:
        """echo: a prompt's text (a token prompt decoded by the engine)."""
        if "prompt" in source:
            return source["prompt"]
        reply = await self._engine_call(self.client.detokenize(source["prompt_ids"], self.config.engine_timeout))
        return reply["prompt"]

    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        info = await self.model_info()
        fields_ = parse_tokenize(body)
        self._check_model(body.get("model"), info)
        reply = await self._engine_call(self.client.tokenize(self.config.engine_timeout, **fields_))
        strs = reply["token_strs"] if body.get("return_token_strs") else None
        return JSONResponse({"count": len(reply["tokens"]), "max_model_len": info.max_model_len,
                             "tokens": reply["tokens"], "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        info = await self.model_info()
        tokens = parse_detokenize(body)
        self._check_model(body.get("model"), info)
        reply = await self._engine_call(self.client.detokenize(tokens, self.config.engine_timeout))
        return JSONResponse({"prompt": reply["prompt"]})

    async def _events(self, job: Job, fmt, streams: list[AsyncIterator[dict]]) -> AsyncIterator[str]:
        finals: list[dict | None] = [None] * len(streams)
        try:
            async with aclosing(_merge(streams)) as replies:
                async for p, reply in replies:
                    chunk = self._chunk(job, fmt, p * job.n, reply)
                    if reply["type"] == "final":
                        finals[p] = reply
                    if chunk:
                        yield chunk
            if job.include_usage:
                yield fmt.chunk([], usage(finals))
        except ApiError as e:  # the status line has gone out: the error travels as an event
            yield sse(e.body())
        yield DONE

    @staticmethod
    def _chunk(job: Job, fmt, base: int, reply: dict) -> str:
        """One engine reply as SSE chunks, one choice per chunk as OpenAI sends them."""
        fmt.take(base // job.n, reply)  # echo with logprobs: the prompt's come with the first reply
        if reply["type"] == "final":
            choices = [c for o in reply["outputs"] for c in fmt.finish(base + o["index"], o["finish_reason"], o)]
        else:
            choices = [c for o in reply["outputs"] if o["text"] or (job.logprobs and o["token_ids"])
                       for c in fmt.delta(base + o["index"], o)]
        return "".join(fmt.chunk([c]) for c in choices)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [(await self.model_info()).card()]})

    async def model_card(self, request: Request) -> Response:
        info = await self.model_info()
        if request.path_params["model"] not in (info.name, info.root):
            raise ApiError(404, f"the model `{request.path_params['model']}` does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(info.card())

    async def health(self, request: Request) -> Response:
        if self.router is not None:
            await self.engine_health()  # 503 when none is in service
            return JSONResponse({"status": "ok", "engines": self.router.describe()})
        return JSONResponse({"status": "ok", "engine": await self.engine_health()})

    async def scrape(self, request: Request) -> Response:
        if self.router is not None:  # per-engine figures: pagedkv:router_* (metrics.py)
            await self.metrics.scrape_engines(self.router, self.config.health_timeout)
            name = self.model.name if self.model else (self.config.served_model_name or "")
            return Response(self.metrics.render(name, None), media_type=CONTENT_TYPE_LATEST)
        try:
            stats = await self.client.stats(timeout=self.config.health_timeout)
        except (TimeoutError, ServerError):
            stats = None  # the gateway's own metrics still count
        name = self.model.name if self.model else (self.config.served_model_name or "")
        return Response(self.metrics.render(name, stats), media_type=CONTENT_TYPE_LATEST)


class EventStream:
    """A `text/event-stream` response that stops (and so aborts its engine requests) as soon as
    the client disconnects, not only when the next write fails."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async with aclosing(self.events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnected(receive, pump())
        except Disconnected:
            log.info("a client disconnected from its stream; its request was aborted")


async def _gather(*aws):
    """asyncio.gather that cancels the others when one fails (their engine requests are aborted)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _chain(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    async with aclosing(rest):
        yield first
        if first["type"] != "final":
            async for reply in rest:
                yield reply


async def _last(stream: AsyncIterator[dict]) -> dict:
    async with aclosing(stream):
        async for reply in stream:
            last = reply
    return last


async def _merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(prompt index, reply) from several streams as they come."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for reply in stream:
                yield 0, reply
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for reply in stream:
                queue.put_nowait((i, reply, None))
            queue.put_nowait((i, None, None))
        except Exception as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, reply, error = await queue.get()
            if error is not None:
                raise error
            if reply is None:
                open_streams -= 1
            else:
                yield i, reply
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the application ------------------------------------------------------------------------------
def build_app(config: ApiConfig) -> Starlette:
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.start()
        watcher = asyncio.ensure_future(_watch_parent()) if config.exit_with_parent else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await gateway.stop()

    async def completions(request: Request) -> Response:
        return await gateway.generate(request, chat=False)

    async def chat(request: Request) -> Response:
        return await gateway.generate(request, chat=True)

    routes = [Route("/v1/models", gateway.models), Route("/v1/models/{model:path}", gateway.model_card),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/tokenize", gateway.tokenize, methods=["POST"]),
              Route("/detokenize", gateway.detokenize, methods=["POST"]),
              Route("/health", gateway.health), Route("/metrics", gateway.scrape)]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.state.gateway = gateway
    return app


async def _api_error(request: Request, error: ApiError) -> Response:
    if error.status >= 500:
        log.warning("%s %s: %d %s", request.method, request.url.path, error.status, error.message)
    return JSONResponse(error.body(), error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return JSONResponse(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                 kind).body(), error.status_code)


async def _internal_error(request: Request, error: Exception) -> Response:
    log.exception("internal error in %s %s", request.method, request.url.path)
    return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}", "server_error",
                                 code="internal_error").body(), 500)


async def _watch_parent() -> None:
    """Started by `pagedkv serve`: when that process is gone (even killed), shut down too."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the serving process is gone; shutting down")
    os.kill(os.getpid(), signal.SIGTERM)


def run(config: ApiConfig, announce: Callable[[str], None] | None = None, log_level: str = "info") -> None:
    """Binds (so that port 0 picks a free port, and the address is known before serving), calls
    announce(base URL), then serves until SIGINT or SIGTERM."""
    import uvicorn

    check_http_bind(config.host, config.api_key, config.insecure)
    try:
        family, _, _, _, address = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening before the address is announced: a client that connects while the server
        # still starts waits in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as e:
        raise ValueError(f"cannot bind the HTTP API to {config.host}:{config.port}: {e}") from None
    host, port = sock.getsockname()[:2]
    if announce is not None:
        announce(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    from pagedkv.runtime.serving.http.framing import JsonErrorH11Protocol

    server = uvicorn.Server(uvicorn.Config(build_app(config), http=JsonErrorH11Protocol, log_level=log_level,
                                           access_log=False, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
