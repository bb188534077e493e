"""
Thousands of random and malformed frames at a live server: no unhandled
error, no crash, and a well-behaved session beside them keeps working.
"""

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

MAX_MESSAGE = 16 * 1024

# The fuzzer keeps its connection across examples instead of in a with block.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["resize", "input", "terminal_input", "ping", "ack", "exit",
                              "", "RESIZE", "connected"])},
    optional={"cols": values | st.integers(-5, 1200), "rows": values | st.integers(-5, 1200),
              "data": values | st.text(max_size=64), "offset": values},
)
frames = st.one_of(
    messages.map(lambda m: ("text", json.dumps(m))),
    st.text(max_size=200).map(lambda t: ("text", t)),
    st.binary(max_size=300).map(lambda b: ("binary", b)),
    st.just(("text", '{"type": "ping"}')),
    st.integers(1, 200).map(lambda n: ("text", "[" * n * 50)),
    st.integers(1, 1000).map(lambda n: ("text", json.dumps(
        {"type": "resize", "cols": n, "rows": n}))),
    st.just(("text", "x" * (MAX_MESSAGE + 10))),  # oversize: close 1009
)


class Fuzzer:
    def __init__(self, url):
        self.url = url
        self.ws = None
        self.closes = []
        self.sent = 0

    def send(self, kind, payload):
        for _ in range(2):
            if self.ws is None:
                protocols = ["capsule.binary.v1"] if len(self.closes) % 2 else None
                self.ws = connect(self.url, subprotocols=protocols, max_size=None,
                                  open_timeout=10, close_timeout=2)
            try:
                self.ws.send(payload if kind == "text" else bytes(payload))
                self.sent += 1
                return
            except ConnectionClosed as e:
                self.closes.append(e.rcvd.code if e.rcvd else None)
                self.ws = None

    def drain(self):
        while self.ws is not None:
            try:
                self.ws.recv(timeout=0)
            except TimeoutError:
                return
            except ConnectionClosed as e:
                self.closes.append(e.rcvd.code if e.rcvd else None)
                self.ws = None


class Bystander(threading.Thread):
    """
    A well-behaved session that runs a command every 0.2 s throughout.
    """

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.rounds = 0
        self.failures = []

    def run(self):
        import base64
        with connect(self.url, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
            while not self.stop.is_set():
                marker = f"ok{self.rounds}"
                ws.send(json.dumps({"type": "input", "data": f"echo {marker}$((1+1))\r"}))
                out, deadline = b"", time.monotonic() + 15
                while (marker + "2").encode() not in out:
                    if time.monotonic() > deadline:
                        self.failures.append(f"round {self.rounds}: no echo in 15 s")
                        return
                    message = json.loads(ws.recv(timeout=15))
                    if message["type"] == "output":
                        out += base64.b64decode(message["data"])
                    elif message["type"] in ("error", "exit"):
                        self.failures.append(f"round {self.rounds}: {message}")
                        return
                self.rounds += 1
                time.sleep(0.2)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from .harness import CapsuleServer, remove_instance_containers
    server = CapsuleServer(tmp_path_factory.mktemp("fuzz"), "--max-message-size",
                           str(MAX_MESSAGE), "--pool-size", "1", "--grace", "5",
                           "--cleanup-interval", "0.5")
    server.start()
    bystander = Bystander(server.ws_url)
    bystander.start()
    fuzzer = Fuzzer(server.ws_url)
    try:
        yield server, fuzzer, bystander
    finally:
        bystander.stop.set()
        bystander.join(20)
        server.stop()
        remove_instance_containers(server.instance)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=5, max_size=40))
def test_random_frames(fuzz_server, batch):
    server, fuzzer, bystander = fuzz_server
    for kind, payload in batch:
        fuzzer.send(kind, payload)
    fuzzer.drain()
    assert server.process.poll() is None, "capsule died"
    assert bystander.failures == []


def test_after_fuzzing_nothing_went_wrong(fuzz_server):
    server, fuzzer, bystander = fuzz_server
    # Runs after test_random_frames (file order).
    time.sleep(1)
    assert bystander.is_alive() and bystander.failures == []
    assert fuzzer.sent > 1000, fuzzer.sent
    assert bystander.rounds > 0
    print(f"fuzz: {fuzzer.sent} frames, {len(fuzzer.closes)} closes by the server,"
          f" {bystander.rounds} bystander rounds")
    assert server.unhandled_errors() == []
    assert server.process.poll() is None
    assert 1009 in fuzzer.closes or fuzzer.closes == []
