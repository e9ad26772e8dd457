"""The ZeroMQ server: one ROUTER socket in front of one LLMEngine, in one process.

While requests are in flight the loop polls the socket without blocking between engine
steps; when idle it blocks on the socket (and on a wake-up pipe that signals write to).
Every request ends with exactly one `final` or `error` reply (docs/protocol.md).

Disconnects: ROUTER_NOTIFY is a draft API that the released libzmq builds leave out, so
the server watches its socket monitor instead. A message tells which connection (file
descriptor) it came from; a DISCONNECTED event for that descriptor aborts its client's
requests (see _drain_socket for why a reused descriptor is never mistaken). A client that
sends and closes at once can be gone before its first message is read: its descriptor's
last event is then DISCONNECTED, with no ACCEPTED since, and the message is dropped.
"""
from __future__ import annotations

import logging
import signal
import socket as pysocket
import threading
import time
from dataclasses import dataclass

import jinja2
import zmq
from zmq.utils.monitor import recv_monitor_message

from pagedkv.runtime.engine.llm_engine import LLMEngine, RequestTooLong
from pagedkv.runtime.engine.outputs import RequestOutput
from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.engine.structured import GrammarError
from pagedkv.runtime.serving.protocol import (
    ABORTED, BAD_REQUEST, CHARS_PER_TOKEN, INTERNAL, OVERLOADED, TOO_LONG, Message, ProtocolError, decode_message,
    encode, error_reply, final_reply
)
from pagedkv.runtime.serving import tool_calls
from pagedkv.runtime.serving.security import check_bind, secure_server
from pagedkv.runtime.serving.streaming import RequestStream

log = logging.getLogger("pagedkv.server")
MAX_MESSAGES_PER_ITERATION = 256  # a flood of messages cannot starve the engine


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    max_queued: int = 1024          # waiting requests beyond this are refused as overloaded
    max_message_mib: float = 16.0   # ZMQ_MAXMSGSIZE: larger messages drop their connection
    curve_keys: str | None = None   # key directory: only clients listed in DIR/authorized
    insecure: bool = False          # allow a non-loopback bind without CURVE


@dataclass
class InFlight:
    envelope: list[bytes]  # routing frames of the client
    client_id: str | int
    stream: RequestStream | None  # None: no token replies, only the final one


class Server:
    def __init__(self, engine: LLMEngine, config: ServerConfig) -> None:
        check_bind(config.bind, config.curve_keys, config.insecure)
        if config.max_queued < 1 or config.max_message_mib <= 0:
            raise ValueError("max_queued must be >= 1 and max_message_mib > 0")
        self.engine, self.config = engine, config
        self._wake_read, self._wake_write = pysocket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.auth = secure_server(self.context, self.socket, config.curve_keys) if config.curve_keys else None
        self.socket.setsockopt(zmq.MAXMSGSIZE, int(config.max_message_mib * 2**20))
        self.socket.setsockopt(zmq.SNDHWM, 0)  # replies are bounded by the requests; never drop one
        monitor_address = f"inproc://pagedkv-monitor-{id(self):x}"
        self.socket.monitor(monitor_address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.monitor = self.context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)  # keep every event: a lost ACCEPTED would look like a gone client
        self.monitor.connect(monitor_address)
        self.socket.setsockopt(zmq.LINGER, 2000)
        try:
            self.socket.bind(config.bind)
        except zmq.ZMQError as e:
            self.close()
            raise ValueError(f"cannot bind {config.bind}: {e}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Characters per prompt allowed before tokenizing: generous for any tokenizer.
        self.max_prompt_chars = CHARS_PER_TOKEN * engine.model_config.max_position_embeddings
        self.in_flight: dict[str, InFlight] = {}            # engine request id -> its client
        self.by_client: dict[tuple[bytes, str | int], str] = {}
        self.connection_of: dict[bytes, int] = {}              # client identity -> its socket fd
        self.closed_fds: set[int] = set()  # descriptors whose last event was DISCONNECTED
        self.next_id = 0
        self.stopping = False
        self.started = time.monotonic()
        self.counters = {"messages": 0, "errors": 0, "handle_seconds": 0.0, "step_seconds": 0.0, "steps": 0}

    # -- the loop -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self._install_signal_handlers()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        log.info("serving %s on %s", self.engine.model_source, self.endpoint)
        try:
            while not self.stopping:
                events = dict(poller.poll(0 if self.engine.has_unfinished() else None))
                if self._wake_read in events:
                    self._drain_wakeups()
                if self.monitor in events:
                    self._drain_monitor()
                if self.socket in events and not self.stopping:
                    self._drain_socket()
                    if self.engine.kv_events is not None:
                        self.engine.kv_events.publish()  # what aborts and disconnects freed
                if self.engine.has_unfinished() and not self.stopping:
                    self._step()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Asks the loop to finish (safe from a signal handler or another thread)."""
        self.stopping = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass  # the pipe is full: the loop is waking anyway

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda number, frame: self.stop())

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _drain_socket(self) -> None:
        for _ in range(MAX_MESSAGES_PER_ITERATION):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            started = time.perf_counter()
            envelope = [frames[0].bytes]
            if envelope[0] not in self.connection_of:
                # A new client. Descriptors are reused at once, so first take in the monitor's
                # events: a previous owner's DISCONNECTED was sent before its descriptor was
                # closed, so it is already there and cannot later be taken for this client's.
                # This connection's ACCEPTED came before its first message, so a descriptor
                # still marked closed means that this client has gone already.
                self._drain_monitor()
                fd = frames[-1].get(zmq.SRCFD)
                if fd in self.closed_fds:
                    self.counters["messages"] += 1
                    log.info("a client closed its connection before its request was read; dropping it")
                    continue
                self.connection_of[envelope[0]] = fd
            if len(frames) != 2:  # a DEALER's message arrives as [identity, payload]
                self.counters["messages"] += 1
                self._error(envelope, None, BAD_REQUEST, f"a message must be a single frame (docs/protocol.md); "
                            f"this one has {len(frames) - 1}")
            else:
                self._handle(envelope, frames[-1].bytes)
            self.counters["handle_seconds"] += time.perf_counter() - started

    def _drain_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.closed_fds.discard(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.closed_fds.add(fd)
                for identity in [i for i, c in self.connection_of.items() if c == fd]:
                    del self.connection_of[identity]
                    self._disconnected(identity)

    # -- requests -------------------------------------------------------------------------------
    def _handle(self, envelope: list[bytes], payload: bytes) -> None:
        self.counters["messages"] += 1
        msg: Message | None = None
        try:
            msg = decode_message(payload, self.max_prompt_chars)
            if msg.type != "abort" and (envelope[0], msg.id) in self.by_client:
                # Ids are unique among a connection's messages in flight, whatever their type.
                raise ProtocolError(BAD_REQUEST, f"request id {quote(msg.id)} is already in flight on this "
                                    "connection", msg.id)
            if msg.type == "generate":
                self._generate(envelope, msg)
            elif msg.type == "tokenize":
                self._send(envelope, {"type": "final", "id": msg.id, "tokenize": self._tokenize(msg)})
            elif msg.type == "detokenize":
                self._send(envelope, {"type": "final", "id": msg.id, "detokenize": self._detokenize(msg)})
            elif msg.type == "abort":
                self._abort(envelope, msg.id)
            elif msg.type == "kv_state":
                if self.engine.kv_events is None:
                    raise ProtocolError(BAD_REQUEST, "this engine publishes no KV events (--kv-events-endpoint)",
                                        msg.id)
                self._send(envelope, {"type": "final", "id": msg.id, "kv_state": self.engine.kv_events.state()})
            elif msg.type == "stats":
                self._send(envelope, {"type": "final", "id": msg.id, "stats": self.stats()})
            else:
                health = self.health()
                if msg.requests is not None:  # which of these are in flight on this connection
                    health["requests"] = [i for i in msg.requests if (envelope[0], i) in self.by_client]
                self._send(envelope, {"type": "final", "id": msg.id, "health": health})
        except ProtocolError as e:
            self._error(envelope, e.request_id, e.code, e.message, e.param)
        except Exception as e:  # a bug must not take the server down
            log.exception("internal error while handling a message")
            self._error(envelope, msg.id if msg else None, INTERNAL,
                        f"internal error: {type(e).__name__}: {quote(str(e))}")

    def _generate(self, envelope: list[bytes], msg: Message) -> None:
        key = (envelope[0], msg.id)
        if len(self.engine.scheduler.waiting) >= self.config.max_queued:
            raise ProtocolError(OVERLOADED, f"{self.config.max_queued} requests are already waiting; "
                                "retry later", msg.id)
        ids = self._prompt_ids(msg)
        if not msg.clamp_max_tokens:
            self._check_max_tokens(len(ids), msg)
        request_id = str(self.next_id)
        self.next_id += 1
        try:
            self.engine.add_request(request_id, ids, msg.params, stream=msg.stream)
        except RequestTooLong as e:
            raise ProtocolError(TOO_LONG, str(e), msg.id)
        except GrammarError as e:
            raise ProtocolError(BAD_REQUEST, str(e), msg.id, param="structured_outputs")
        except ValueError as e:
            raise ProtocolError(BAD_REQUEST, str(e), msg.id)
        asks = msg.params.logprobs is not None or msg.params.prompt_logprobs is not None
        token_text = self._token_text if asks else None
        stream = RequestStream(self.engine.stopping.decode, msg.params.stop, token_text) if msg.stream else None
        self.in_flight[request_id] = InFlight(envelope, msg.id, stream)
        self.by_client[key] = request_id

    def _check_max_tokens(self, prompt_len: int, msg: Message) -> None:
        """As OpenAI's API (and vLLM's server): max_tokens must fit in the context the prompt leaves.
        A prompt that fills the context is the engine's to refuse (too_long)."""
        context, wanted = self.engine.model_config.max_position_embeddings, msg.params.max_tokens
        if prompt_len < context and prompt_len + wanted > context:
            raise ProtocolError(BAD_REQUEST, f"max_tokens is too large: {wanted}. This model's context is {context} "
                                f"tokens and the prompt has {prompt_len} ({wanted} > {context} - {prompt_len})",
                                msg.id, param="max_tokens")

    def _prompt_ids(self, msg: Message) -> list[int]:
        if msg.prompt_ids is not None:
            return msg.prompt_ids
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ProtocolError(BAD_REQUEST, "this model has no tokenizer: send 'prompt_ids'", msg.id)
        if msg.prompt is not None:
            return tokenizer.encode(msg.prompt, add_special_tokens=msg.add_special_tokens)
        chat = msg.chat
        cont = chat.get("continue_final_message", False)
        extra = {"tools": chat["tools"]} if chat.get("tools") else {}
        try:
            text = tokenizer.apply_chat_template(msg.messages, chat.get("add_generation_prompt", not cont),
                                                 continue_final_message=cont, **extra)
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            raise ProtocolError(BAD_REQUEST, f"the chat template cannot render these messages: {quote(str(e))}",
                                msg.id)
        return tokenizer.encode(text, add_special_tokens=msg.type == "tokenize" and msg.add_special_tokens)

    def _tokenize(self, msg: Message) -> dict:
        ids = self._prompt_ids(msg)
        return {"tokens": ids, "token_strs": [self._token_piece(t) for t in ids]}

    def _token_piece(self, token_id: int) -> str:
        piece = self.engine.tokenizer.id_to_piece(token_id)
        return piece if piece is not None else ""

    def _detokenize(self, msg: Message) -> dict:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ProtocolError(BAD_REQUEST, "this model has no tokenizer", msg.id)
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in msg.tokens if not 0 <= t < vocab]
        if bad:
            raise ProtocolError(BAD_REQUEST, f"token ids must be in [0, {vocab}); got {bad[:5]}", msg.id)
        return {"prompt": tokenizer.decode(msg.tokens)}

    def _abort(self, envelope: list[bytes], client_id: str | int) -> None:
        request_id = self.by_client.get((envelope[0], client_id))
        if request_id is None:
            log.info("abort of %r: no such request in flight (it may have just finished)", client_id)
            return
        self._finish_with_error(request_id, ABORTED, "aborted by the client")

    def _disconnected(self, identity: bytes) -> None:
        gone = [rid for (peer, _), rid in self.by_client.items() if peer == identity]
        if gone:
            log.info("a client disconnected; aborting its %d request(s)", len(gone))
        for request_id in gone:
            self._finish_with_error(request_id, ABORTED, "the client disconnected", reply=False)

    def _finish_with_error(self, request_id: str, code: str, message: str, reply: bool = True) -> None:
        self.engine.abort(request_id)  # frees its blocks now
        request = self._forget(request_id)
        if reply:
            self._error(request.envelope, request.client_id, code, message)

    def _forget(self, request_id: str) -> InFlight:
        request = self.in_flight.pop(request_id)
        del self.by_client[(request.envelope[0], request.client_id)]
        return request

    # -- engine steps and replies ---------------------------------------------------------------
    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("the engine step failed (%s: %s); aborting the %d request(s) in flight, serving on",
                          type(e).__name__, quote(str(e)), len(self.in_flight))
            for request_id in list(self.in_flight):
                self._finish_with_error(request_id, INTERNAL, f"internal error in the engine step: "
                                        f"{type(e).__name__}: {quote(str(e))}")
            return
        self.counters["step_seconds"] += time.perf_counter() - started
        self.counters["steps"] += 1
        started = time.perf_counter()
        for output in outputs:
            if output.request_id in self.in_flight:
                self._reply(output)
        self.counters["handle_seconds"] += time.perf_counter() - started

    def _reply(self, output: RequestOutput) -> None:
        request = self.in_flight[output.request_id]
        deltas = request.stream.deltas(output) if request.stream else None
        if deltas:
            self._send(request.envelope, {"type": "token", "id": request.client_id, "outputs": deltas,
                                          **request.stream.prompt_fields(output)})
        if not output.finished:
            return
        self._forget(output.request_id)
        if output.error:
            self._error(request.envelope, request.client_id, output.error_code or INTERNAL, output.error)
        else:
            self._send(request.envelope, final_reply(request.client_id, output, self._token_text))

    def _token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (for logprobs)."""
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""

    def _send(self, envelope: list[bytes], reply: dict) -> None:
        try:
            self.socket.send_multipart([*envelope, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a client that stopped reading loses its replies, nobody else
            log.warning("could not send a reply to a client: %s", e)

    def _error(self, envelope: list[bytes], client_id, code: str, message: str, param: str | None = None) -> None:
        self.counters["errors"] += 1
        reply = error_reply(client_id, code, message, param)
        log.warning("request %s: %s: %s", quote(client_id), code, reply["message"])
        self._send(envelope, reply)

    # -- information and shutdown ---------------------------------------------------------------
    def stats(self) -> dict:
        c = self.counters
        return {**self.engine.stats(), "server": {
            "in_flight": len(self.in_flight), "max_queued": self.config.max_queued,
            "messages": c["messages"], "errors": c["errors"], "steps": c["steps"],
            "handle_ms_per_message": 1000 * c["handle_seconds"] / max(c["messages"], 1),
            "step_ms": 1000 * c["step_seconds"] / max(c["steps"], 1),
            "uptime_s": time.monotonic() - self.started}}

    def health(self) -> dict:
        return {"status": "stopping" if self.stopping else "ok", "model": self.engine.model_source,
                "max_model_len": self.engine.model_config.max_position_embeddings,
                "sampling_defaults": self.engine.sampling_defaults,
                "tool_parser": tool_calls.detect(self.engine.tokenizer.chat_template if self.engine.tokenizer
                                                 else None),
                "in_flight": len(self.in_flight), "uptime_s": time.monotonic() - self.started,
                **({"kv_events": self.engine.kv_events.describe()} if self.engine.kv_events is not None else {})}

    def _shutdown(self) -> None:
        log.info("shutting down: aborting %d request(s) in flight", len(self.in_flight))
        if self.engine.profile.enabled:
            log.info("where the steps' time went:\n%s", self.engine.profile.report())
        for request_id in list(self.in_flight):
            self._finish_with_error(request_id, ABORTED, "the server is shutting down")
        self.close()

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()  # lingers up to 2 s so that the last replies go out
        if self.auth is not None:
            self.auth.stop()
        self.context.term()
        self._wake_read.close()
        self._wake_write.close()
