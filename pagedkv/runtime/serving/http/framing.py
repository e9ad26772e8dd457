"""uvicorn's HTTP/1.1 protocol (h11), answering requests it cannot parse in OpenAI's error shape.

uvicorn answers a request whose framing is broken (`Content-Length: twelve`, two lengths, no
request line) with a plain-text 400 before any application code runs; clients of an OpenAI API
expect `{"error": {...}}` for every error. The gateway always runs on this protocol, whichever
HTTP parsers are installed, so that the answer does not depend on them.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagedkv.runtime.serving.http.errors import bad_request

MESSAGE = "the request is not valid HTTP/1.1 (its request line, headers or body framing cannot be parsed)"


class JsonErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(bad_request(MESSAGE).body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response had begun already: all that is left is to close the connection
        self.transport.close()
