"""Clients of the pagedkv server: `Client` (blocking) and `AsyncClient` (asyncio, many
concurrent requests over one socket). Both speak docs/protocol.md over a DEALER socket.

    with Client("tcp://127.0.0.1:5555") as c:
        print(c.generate("The capital of France is", max_tokens=8)["outputs"][0]["text"])
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, AsyncIterator, Iterator

import msgpack
import zmq
import zmq.asyncio
import zmq.utils.monitor

from pagedkv.runtime.serving.security import secure_client

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class ServerError(Exception):
    """An `error` reply: `code` is one of bad_request, too_long, overloaded, aborted, internal."""

    def __init__(self, code: str, message: str, request_id: Any = None, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id, self.param = code, message, request_id, param


def generate_message(request_id: str, prompt: str | None, prompt_ids: list[int] | None,
                     messages: list[dict] | None, stream: bool, params: dict, clamp_max_tokens: bool = True,
                     chat: dict | None = None) -> dict:
    """`chat` (with messages): tools, add_generation_prompt, continue_final_message."""
    sources = {"prompt": prompt, "prompt_ids": prompt_ids, "messages": messages}
    given = {k: v for k, v in sources.items() if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of prompt, prompt_ids and messages")
    message = {"type": "generate", "id": request_id, **given, "params": params, "stream": stream}
    if chat:
        message["chat"] = chat
    if not clamp_max_tokens:
        message["clamp_max_tokens"] = False
    return message


def _unpack(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def _done(reply: dict) -> bool:
    """True for the last reply of a request; raises ServerError for an error reply."""
    if reply.get("type") == "error":
        raise ServerError(reply.get("code", "internal"), reply.get("message", ""), reply.get("id"), reply.get("param"))
    return reply.get("type") == "final"


class NoServer(ConnectionError):
    """No server completed the ZeroMQ handshake at the address in time."""


class _Base:
    def __init__(self, context: zmq.Context, address: str, timeout: float, curve_keys: str | None,
                 client_name: str, connect_timeout: float | None = None, heartbeat_s: float | None = None) -> None:
        self.address, self.timeout = address, timeout
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if heartbeat_s:  # ZeroMQ's own pings, answered by the server's I/O thread even mid-step
            self.socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
            self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 4000))
            self.socket.setsockopt(zmq.HEARTBEAT_TTL, int(heartbeat_s * 4000))
        if curve_keys:
            secure_client(self.socket, curve_keys, client_name)
        monitor = None
        if connect_timeout is not None:
            monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        self.socket.connect(address)
        if monitor is not None:
            try:
                self._await_handshake(monitor, connect_timeout)
            except NoServer:
                self.socket.close()
                raise
            finally:
                monitor.close()
        self._ids = (f"{os.getpid():x}-{i}" for i in itertools.count())

    def _await_handshake(self, monitor: zmq.Socket, timeout: float) -> None:
        """A server's I/O thread completes the handshake even while its engine is busy, so a
        short wait tells "nobody there" from "slow to answer"."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and monitor.poll(max(int(left * 1000), 1)):
            event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.socket.disable_monitor()
                return
            if event & _HANDSHAKE_FAILED:
                raise NoServer(f"the server at {self.address} refused the connection's handshake "
                               "(CurveZMQ keys that do not match, or none where the server wants them)")
        raise NoServer(f"no server answers at {self.address} (waited {timeout:g} s)")

    def new_id(self) -> str:
        return next(self._ids)


class Client(_Base):
    """connect_timeout: seconds to wait for a server's handshake before anything is sent
    (NoServer if none comes); None sends at once, and a missing server shows as a timeout."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 120.0, curve_keys: str | None = None,
                 client_name: str = "client", connect_timeout: float | None = None) -> None:
        super().__init__(zmq.Context.instance(), address, timeout, curve_keys, client_name, connect_timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close()

    def send(self, message: dict) -> None:
        self.socket.send(msgpack.packb(message, use_bin_type=True))

    def replies(self, request_id: Any, timeout: float | None = None) -> Iterator[dict]:
        """The replies to one request, up to its final one; TimeoutError when the server is silent."""
        timeout = self.timeout if timeout is None else timeout
        while True:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.socket.poll(max(int(left * 1000), 1)):
                    raise TimeoutError(f"no reply from {self.address} within {timeout:g} s")
                reply = _unpack(self.socket.recv())
                if reply.get("id") == request_id:
                    break  # replies to other (earlier, abandoned) requests are dropped
            if _done(reply):
                yield reply
                return
            yield reply

    def generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
                 messages: list[dict] | None = None, timeout: float | None = None, **params) -> dict:
        """The `final` reply: {"outputs": [{"index", "token_ids", "text", "finish_reason", ...}], ...}."""
        request_id = self.new_id()
        self.send(generate_message(request_id, prompt, prompt_ids, messages, False, params))
        return self._last(request_id, timeout)

    def stream(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
               messages: list[dict] | None = None, timeout: float | None = None, **params) -> Iterator[dict]:
        """Yields `token` replies (new token ids and text per output) and last the `final` one.
        Leaving the loop early aborts the request."""
        request_id = self.new_id()
        self.send(generate_message(request_id, prompt, prompt_ids, messages, True, params))
        finished = False
        try:
            for reply in self.replies(request_id, timeout):
                finished = reply["type"] == "final"
                yield reply
        except ServerError:
            finished = True
            raise
        finally:
            if not finished and not self.socket.closed:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.send({"type": "abort", "id": request_id})

    def stats(self, timeout: float | None = None) -> dict:
        return self._call("stats", timeout)["stats"]

    def health(self, timeout: float | None = None) -> dict:
        return self._call("health", timeout)["health"]

    def kv_state(self, timeout: float | None = None) -> dict:
        """A snapshot of the engine's KV blocks per tier, for a KV events subscriber."""
        return self._call("kv_state", timeout)["kv_state"]

    def _call(self, kind: str, timeout: float | None) -> dict:
        request_id = self.new_id()
        self.send({"type": kind, "id": request_id})
        return self._last(request_id, timeout)

    def _last(self, request_id: str, timeout: float | None) -> dict:
        for reply in self.replies(request_id, timeout):
            if reply["type"] == "final":
                return reply
        raise RuntimeError("the reply stream ended without a final message")


class AsyncClient(_Base):
    """One socket, any number of concurrent requests: a reader task routes replies by id."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 120.0, curve_keys: str | None = None,
                 client_name: str = "client", heartbeat_s: float | None = None) -> None:
        super().__init__(zmq.asyncio.Context.instance(), address, timeout, curve_keys, client_name,
                         heartbeat_s=heartbeat_s)
        self._queues: dict[Any, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.socket.close()

    def fail_all(self, code: str, message: str) -> int:
        """Ends every request in flight on this client with an `error` reply of our own (a
        router that took its engine out of service); returns how many."""
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait({"type": "error", "id": request_id, "code": code, "message": message})
        return len(self._queues)

    async def _read(self) -> None:
        while True:
            reply = _unpack(await self.socket.recv())
            queue = self._queues.get(reply.get("id"))
            if queue is not None:
                queue.put_nowait(reply)

    async def replies(self, message: dict, timeout: float | None = None, probe: bool = False) -> AsyncIterator[dict]:
        """Sends a request and yields its replies up to the final one. TimeoutError when none
        comes within `timeout` seconds; with `probe`, only when the server does not say, when
        asked after that long, that it still holds the request (see _next_held)."""
        if message["id"] in self._queues:  # its replies could not be told apart (docs/protocol.md)
            raise ValueError(f"request id {message['id']!r} is already in flight on this client")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[message["id"]] = queue
        finished = False
        try:
            await self.socket.send(msgpack.packb(message, use_bin_type=True))
            wait = self.timeout if timeout is None else timeout
            while not finished:
                reply = await (self._next_held(queue, wait, message["id"]) if probe else self._next(queue, wait))
                finished = reply.get("type") in ("final", "error")
                _done(reply)  # raises ServerError for an error reply
                yield reply
        finally:
            del self._queues[message["id"]]
            if not finished and message["type"] == "generate":
                await self.abort(message["id"])

    async def _next(self, queue: asyncio.Queue, timeout: float | None) -> dict:
        """The next reply, within `timeout` seconds. Not asyncio.wait_for: before Python 3.12 it
        swallows a cancellation that comes as the awaited reply arrives (CPython gh-86296), and
        a stream whose consumer was cancelled (its HTTP client gone) would run on unaborted."""
        getter = asyncio.ensure_future(queue.get())
        try:
            done, _ = await asyncio.wait({getter}, timeout=timeout)
        finally:
            getter.cancel()  # a no-op once it is done
        if not done:
            raise TimeoutError(f"no reply from {self.address} in time")
        return getter.result()

    async def _next_held(self, queue: asyncio.Queue, timeout: float, request_id: Any) -> dict:
        """The next reply of a request that may take long (queued behind others, or generating
        many tokens without streaming them). Silence for `timeout` seconds alone says nothing:
        the server is then asked (`health` with `requests`) whether it still holds the request,
        and has `timeout` seconds to answer. TimeoutError when it does not answer, or no longer
        holds the request (it restarted, say): no reply will come."""
        while True:
            try:
                return await self._next(queue, timeout)
            except TimeoutError:
                pass
            try:
                held = (await self._call("health", timeout, requests=[request_id])).get("requests", [])
                why = None
            except TimeoutError:
                why = f"the engine at {self.address} did not answer for {2 * timeout:g} s"
            except ServerError as e:  # a server that cannot be asked
                why = (f"no reply from {self.address} within {timeout:g} s, and it cannot say whether it "
                       f"still holds the request ({e.message})")
            if not queue.empty():  # the reply came before the answer (one socket keeps their order)
                return queue.get_nowait()
            if why is not None:
                raise TimeoutError(why)
            if request_id not in held:
                raise TimeoutError(f"the engine at {self.address} no longer holds the request (it may have "
                                   "restarted); no reply will come")

    async def generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
                       messages: list[dict] | None = None, timeout: float | None = None,
                       request_id: str | None = None, **params) -> dict:
        message = generate_message(request_id or self.new_id(), prompt, prompt_ids, messages, False, params)
        async for reply in self.replies(message, timeout):
            if reply["type"] == "final":
                return reply
        raise RuntimeError("the reply stream ended without a final message")

    async def stream(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
                     messages: list[dict] | None = None, timeout: float | None = None,
                     request_id: str | None = None, **params) -> AsyncIterator[dict]:
        message = generate_message(request_id or self.new_id(), prompt, prompt_ids, messages, True, params)
        async for reply in self.replies(message, timeout):
            yield reply

    async def abort(self, request_id: str) -> None:
        await self.socket.send(msgpack.packb({"type": "abort", "id": request_id}, use_bin_type=True))

    async def stats(self, timeout: float | None = None) -> dict:
        return await self._call("stats", timeout)

    async def health(self, timeout: float | None = None) -> dict:
        return await self._call("health", timeout)

    async def kv_state(self, timeout: float | None = None) -> dict:
        return await self._call("kv_state", timeout)

    async def tokenize(self, timeout: float | None = None, **fields) -> dict:
        """fields: prompt, or messages (with chat); add_special_tokens (docs/protocol.md)."""
        return await self._call("tokenize", timeout, **fields)

    async def detokenize(self, tokens: list[int], timeout: float | None = None) -> dict:
        return await self._call("detokenize", timeout, tokens=tokens)

    async def _call(self, kind: str, timeout: float | None, **fields) -> dict:
        async for reply in self.replies({"type": kind, "id": self.new_id(), **fields}, timeout):
            if reply["type"] == "final":
                return reply[kind]
        raise RuntimeError("the reply stream ended without a final message")
