"""
A fake of Anthropic's Messages API on loopback, for the credential
gateway's tests and bench: C{POST /v1/messages}, answered as JSON or, with
C{"stream": true}, as server-sent events (message_start,
content_block_start, content_block_delta..., content_block_stop,
message_delta, message_stop) with usage; C{GET /v1/models}.

It records what it saw of each request (method, path, headers, body), can
be told to pause between events (so a test sees pieces arrive one by one),
and answers with the text it is given.  It runs on a thread of its own
(the standard library's threading HTTP server), so that the reactor of the
test or of capsule is not the one answering.

    with FakeAnthropic(text="hi there", pause=0.2) as fake:
        fake.url            # http://127.0.0.1:PORT
        fake.requests[-1].headers["x-api-key"]
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "claude-fake-1"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode("utf-8")


def stream_events(text: str, input_tokens: int, output_tokens: int, pieces: int):
    """
    The events of one streamed answer of C{text}, in C{pieces} deltas.
    """
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": MODEL,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": input_tokens, "output_tokens": 1}}
    yield sse("message_start", {"type": "message_start", "message": message})
    yield sse("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
    size = max(1, -(-len(text) // max(1, pieces)))
    for start in range(0, len(text), size):
        yield sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text[start:start + size]}})
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield sse("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": output_tokens}})
    yield sse("message_stop", {"type": "message_stop"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Each event goes as it is written (no Nagle wait for the last one's
    # acknowledgement), as a real API's server sends them.
    disable_nagle_algorithm = True
    server: "_Server"

    def log_message(self, format, *args):
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_fake")
        self.end_headers()
        self.wfile.write(data)

    def _read(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _record(self, body: bytes) -> None:
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(Seen(self.command, self.path,
                                      {k.lower(): v for k, v in self.headers.items()}, body))

    def do_GET(self):
        self._record(b"")
        if self.path.startswith("/v1/models"):
            self._answer(200, {"data": [{"type": "model", "id": MODEL,
                                         "display_name": "Fake"}], "has_more": False})
        else:
            self._answer(404, {"type": "error", "error": {"type": "not_found_error",
                                                          "message": "no such path"}})

    def do_POST(self):
        body = self._read()
        self._record(body)
        fake = self.server.fake
        if not self.path.split("?")[0].startswith("/v1/messages"):
            self._answer(404, {"type": "error", "error": {"type": "not_found_error",
                                                          "message": "no such path"}})
            return
        if fake.key is not None and self.headers.get("x-api-key") != fake.key:
            self._answer(401, {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "invalid x-api-key"}})
            return
        try:
            asked = json.loads(body or b"{}")
        except ValueError:
            asked = {}
        if self.path.split("?")[0] == "/v1/messages/count_tokens":
            self._answer(200, {"input_tokens": fake.input_tokens})
            return
        if isinstance(asked, dict) and asked.get("stream"):
            self._stream(fake)
            return
        self._answer(200, {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": MODEL,
            "content": [{"type": "text", "text": fake.text}], "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": fake.input_tokens, "output_tokens": fake.output_tokens}})

    def _stream(self, fake) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for number, event in enumerate(stream_events(fake.text, fake.input_tokens,
                                                     fake.output_tokens, fake.pieces)):
            if number == 1 and fake.gate is not None:
                # The first event is out: the rest waits for the test.
                fake.gate.wait(60)
            if number and fake.pause:
                time.sleep(fake.pause)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        if fake.filler:
            # A large answer, for throughput: events nobody reads for usage.
            chunk = sse("ping", {"type": "ping", "pad": "x" * 16000})
            sent = 0
            while sent < fake.filler:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: "FakeAnthropic"


class FakeAnthropic:
    """
    The fake API, listening on 127.0.0.1 (a port of its own) while in its
    C{with} block (or between L{start} and L{stop}).

    @param key: the key it wants in C{x-api-key} (C{None}: any).
    @param pause: seconds between two events of a stream.
    @param pieces: deltas the text is sent in.
    @param filler: bytes of ping events after the message (throughput).
    @ivar gate: a C{threading.Event} (or C{None}): a stream sends its first
        event, then waits for it to be set before the others.
    """

    def __init__(self, text: str = "Hello from the fake API.", key: str | None = None,
                 pause: float = 0.0, pieces: int = 4, input_tokens: int = 12,
                 output_tokens: int = 7, filler: int = 0, host: str = "127.0.0.1") -> None:
        self.text, self.key, self.pause, self.pieces = text, key, pause, pieces
        self.input_tokens, self.output_tokens, self.filler = input_tokens, output_tokens, filler
        self.requests: list[Seen] = []
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()
        self._host = host
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeAnthropic":
        self._server = _Server((self._host, 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeAnthropic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import sys
    fake = FakeAnthropic(pause=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0).start()
    print(fake.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()
