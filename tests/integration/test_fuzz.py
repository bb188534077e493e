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

from .harness import BlockingTerminal, CapsuleServer, remove_instance_containers, wait_for

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
    """
    Sends frames on one connection at a time (the JSON and the binary
    protocol in turn), and opens a new one when capsule closed the last.
    Every close is recorded with its cause as the client saw it: C{"exit"}
    (an C{exit} message came first), C{"oversize"} (the last frame sent was
    larger than the limit), or C{None}.
    """

    def __init__(self, url):
        self.url = url
        self.ws = None
        self.closes = []
        self.sent = 0
        self.oversize = 0
        self._exited = self._oversize = False

    def _connect(self):
        protocols = ["capsule.binary.v1"] if len(self.closes) % 2 else None
        self.ws = connect(self.url, subprotocols=protocols, max_size=None,
                          open_timeout=10, close_timeout=2)
        self._exited = self._oversize = False

    def _closed(self, e):
        cause = "exit" if self._exited else "oversize" if self._oversize else None
        self.closes.append((e.rcvd.code if e.rcvd else None, cause))
        self.ws = None

    def _read(self, timeout):
        message = self.ws.recv(timeout=timeout)
        if isinstance(message, str) and json.loads(message).get("type") == "exit":
            self._exited = True

    def send(self, kind, payload):
        if self.ws is None:
            self._connect()
        try:
            self.ws.send(payload if kind == "text" else bytes(payload))
        except ConnectionClosed as e:  # closed for an earlier frame or message
            self._closed(e)
            self._connect()
            self.ws.send(payload if kind == "text" else bytes(payload))
        self.sent += 1
        self._oversize = len(payload) > MAX_MESSAGE
        if self._oversize:
            # capsule closes at once: wait for it.
            self.oversize += 1
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline:
                    self._read(timeout=max(0.01, deadline - time.monotonic()))
            except ConnectionClosed as e:
                self._closed(e)
                return
            except TimeoutError:
                pass
            raise AssertionError("capsule did not close the connection within 10 s of an"
                                 " oversize message")

    def drain(self):
        while self.ws is not None:
            try:
                self._read(timeout=0)
            except TimeoutError:
                return
            except ConnectionClosed as e:
                self._closed(e)


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
        try:
            terminal = BlockingTerminal(self.url, timeout=15)
            terminal.start()
            while not self.stop.is_set():
                marker = f"ok{self.rounds}"
                terminal.run(f"echo {marker}$((1+1))", f"{marker}2", timeout=15)
                self.rounds += 1
                self.stop.wait(0.2)
            terminal.close()
        except Exception as e:
            self.failures.append(f"round {self.rounds}: {e!r}")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = CapsuleServer(tmp_path_factory.mktemp("fuzz"), "--pool-size", "1", "--grace", "5",
                           tuning={"max-message-size": MAX_MESSAGE, "cleanup-interval": 0.5,
                                   # Thousands of connections, most closed by a bad frame:
                                   # each would otherwise make a container at its upgrade
                                   # (tests/integration/test_pool.py covers that path).
                                   "start-at-first-frame": True})
    server.start()
    bystander = Bystander(server.ws_url)
    bystander.start()
    fuzzer = Fuzzer(server.ws_url)
    try:
        yield server, fuzzer, bystander
    finally:
        bystander.stop.set()
        bystander.join(20)
        try:
            server.stop()
        finally:
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
    # Runs after test_random_frames (file order).  The bystander still works:
    rounds = bystander.rounds
    wait_for(lambda: bystander.rounds >= rounds + 2 or bystander.failures, 30,
             "the bystander to run two more commands")
    assert bystander.is_alive() and bystander.failures == []
    # And an oversize message still closes its connection with 1009.
    fuzzer.drain()
    fuzzer.send("text", "x" * (MAX_MESSAGE + 1))
    assert fuzzer.closes[-1] == (1009, "oversize")
    print(f"fuzz: {fuzzer.sent} frames ({fuzzer.oversize} oversize), {len(fuzzer.closes)}"
          f" closes by the server, {bystander.rounds} bystander rounds")
    assert fuzzer.sent > 1000, fuzzer.sent
    # capsule closed connections only for oversize messages (1009) and after
    # a shell exited (1000, the input fuzzed may well have been an exit).
    assert [close for close in fuzzer.closes
            if close not in ((1009, "oversize"), (1000, "exit"))] == []
    assert server.unhandled_errors() == []
    assert server.process.poll() is None
