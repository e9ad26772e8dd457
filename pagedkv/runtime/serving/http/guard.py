"""What stands between the network and the gateway: the bind rule, the API key, the content type
and size of bodies, and noticing a client that went away."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
from typing import Any, Awaitable, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.serving.http.errors import ApiError, bad_request

T = TypeVar("T")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_http_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Loopback, or an API key, or the user's explicit --insecure."""
    if not (is_loopback(host) or api_key or insecure):
        raise ValueError(f"binding the HTTP API to {host} exposes it beyond this machine: give --api-key KEY "
                         "(clients send 'Authorization: Bearer KEY') or --insecure")


KEYED_PATHS = ("/tokenize", "/detokenize")  # vLLM's, outside /v1, and work for the engine all the same


class ApiKeyMiddleware:
    """OpenAI's (and vLLM's) scheme: `Authorization: Bearer KEY` on every /v1 path. /health and
    /metrics stay open, as in vLLM, for probes and scrapers."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] in KEYED_PATHS):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_json_content_type(request: Request) -> None:
    """Bodies must say they are JSON, as vLLM requires. A POST whose type a plain HTML form can
    send (text/plain, form encodings) needs no CORS preflight, so any web page a user opens could
    otherwise start generations on a loopback server that has no API key."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        given = quote(content_type, 100) if content_type else "none"
        raise ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                       f"(got {given})", code="unsupported_media_type")


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body: 415 unless it says it is JSON, 413 past `limit` bytes (before reading it, when
    it says its size)."""
    check_json_content_type(request)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the request body is larger than this server takes ({limit} bytes)",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than this server takes ({limit} bytes)",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Disconnected from None
    try:
        # UTF-8, as JSON between systems must be (json.loads would also take UTF-16 and UTF-32,
        # and the bytes of lone surrogates, which it decodes with "surrogatepass").
        text = b"".join(chunks).decode("utf-8-sig")
        body = json.loads(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError among them
        raise bad_request("the request body is not valid JSON in UTF-8") from None
    except RecursionError:  # nesting beyond Python's recursion limit
        raise bad_request("the request body nests too deeply") from None
    check_unicode(body, text)
    return body


# A lone surrogate reaches a string that json.loads decoded from UTF-8 text only through a
# \uD800-\uDFFF escape. Pairs (an emoji written as two escapes) match too, and are fine: this
# only decides whether to look closer.
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def check_unicode(body: Any, text: str) -> None:
    """Strings with lone surrogates are valid JSON ("\\ud800") but no Unicode text: they cannot be
    encoded, sent to the engine or tokenized. Refused wherever they are, ignored fields included,
    naming the top-level field; the search runs at C speed, and only when the bytes hint at one."""
    if not _MAYBE_SURROGATE.search(text) or _encodable(body):
        return
    fields = body.items() if isinstance(body, dict) else [(None, body)]
    field = next((key for key, value in fields if not _encodable(value)), None)
    where = f"'{field}'" if field is not None else "a field name" if isinstance(body, dict) else "the body"
    raise bad_request(f"{where} is not valid Unicode text: it holds a lone surrogate (a code point from "
                      "U+D800 to U+DFFF outside a pair)", field if field and len(field) <= 64 else None)


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False
    except RecursionError:  # nested nearly as deep as json.loads goes
        raise bad_request("the request body nests too deeply") from None


class Disconnected(Exception):
    """The HTTP client went away before its answer was ready."""


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Runs `work`; if the client disconnects first, cancels it (its engine requests are aborted
    as the cancellation unwinds them) and raises Disconnected."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watch.cancel()
    if task.cancelled():
        raise Disconnected
    return task.result()
