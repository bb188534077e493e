"""
What the Anthropic credential gateway adds (issue 22): the time to the first
event of a streamed answer through the gateway against the same request to
the upstream directly, and the throughput of a large streamed answer both
ways.

A real twistd capsule and engine: one session of a profile that names the
anthropic credential (the session image is enough: nothing runs in it); its
placeholder is read from its environment; the upstream is the fake Messages
API (tests/support/fake_anthropic.py) on loopback.  The client runs on the
host and speaks to the door on the sessions' network's gateway address, as a
session does (without the container's network in the way, which is the
same with or without the gateway).  Requests alternate, gateway then direct,
each on a kept-alive connection of its own kind, so that a change in the
machine's load hits both alike.  Prints what it measured, then one JSON
line.  Runnable alone:

    .venv/bin/python bench/gateway.py --requests 200
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docker  # noqa: E402

from tests.support.fake_anthropic import FakeAnthropic  # noqa: E402
from tests.support.httpclient import request  # noqa: E402
from tests.support.live import CapsuleServer, free_port, remove_instance_containers  # noqa: E402

KEY = "sk-ant-bench-not-a-real-key"
MIB = 1024 * 1024


def percentile(values, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


class Client:
    """
    Streamed requests on one kept-alive connection to C{host:port}, with
    C{prefix} before C{/v1/messages}.
    """

    def __init__(self, host: str, port: int, prefix: str, token: str | None) -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=60)
        self.prefix = prefix
        self.headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
        if token is not None:
            self.headers["authorization"] = f"Bearer {token}"
        else:
            self.headers["x-api-key"] = KEY

    def first_event(self) -> tuple[float, int]:
        """
        Seconds from sending a streamed request to its first event, and the
        bytes of the whole answer (read to its end).
        """
        body = json.dumps({"model": "m", "max_tokens": 16, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]})
        start = time.perf_counter()
        self.connection.request("POST", self.prefix + "/v1/messages", body, self.headers)
        response = self.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
        seen = b""
        while b"\n\n" not in seen:
            piece = response.read1(65536)
            if not piece:
                raise RuntimeError("the answer ended before its first event")
            seen += piece
        first = time.perf_counter() - start
        total = len(seen)
        while True:
            piece = response.read1(1024 * 1024)
            if not piece:
                break
            total += len(piece)
        return first, total

    def close(self) -> None:
        self.connection.close()


def gateway_ip(network: str = "capsule") -> str:
    return docker.from_env().networks.get(network).attrs["IPAM"]["Config"][0]["Gateway"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--stream-mib", type=int, default=64,
                        help="MiB of the large streamed answer (throughput)")
    parser.add_argument("--stream-runs", type=int, default=3)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="capsule-bench-gateway-"))
    profiles = work / "profiles.toml"
    profiles.write_text('[profiles.brokered]\ncredentials = ["anthropic"]\n')
    small = FakeAnthropic(text="Hello from the bench.", key=KEY).start()
    large = FakeAnthropic(text="Large.", key=KEY, filler=args.stream_mib * MIB).start()
    door_port = free_port()
    servers = []
    try:
        results = {}
        for label, fake in (("small", small), ("large", large)):
            server = CapsuleServer(
                work, "--pool-size", "0", "--door-port", str(door_port),
                "--anthropic-upstream", fake.url, "--profiles", str(profiles),
                "--state-dir", str(work / "state"), "--grace", "600",
                image=args.image, env={"ANTHROPIC_API_KEY": KEY}).start()
            servers.append(server)
            status, _, body = request(server.url + "/api/sessions", "POST",
                                      {"content-type": "application/json"},
                                      json.dumps({"profile": "brokered"}).encode(), timeout=120)
            assert status == 201, body
            session_id = json.loads(body)["id"]
            status, _, body = request(
                server.url + f"/api/sessions/{session_id}/exec", "POST",
                {"content-type": "application/json"},
                json.dumps({"argv": ["printenv", "ANTHROPIC_AUTH_TOKEN"]}).encode(),
                timeout=60)
            token = json.loads(body)["stdout"].strip()
            assert token.startswith("capsule-"), body
            host = gateway_ip()
            fake_port = int(fake.url.rsplit(":", 1)[1])
            through = Client(host, door_port, "/anthropic", token)
            direct = Client("127.0.0.1", fake_port, "", None)
            if label == "small":
                for client in (through, direct):  # warm up the connections
                    client.first_event()
                gateway_times, direct_times = [], []
                for _ in range(args.requests):
                    gateway_times.append(through.first_event()[0])
                    direct_times.append(direct.first_event()[0])
                results["first_event_ms"] = {
                    "requests": args.requests,
                    "gateway_p50": percentile(gateway_times, 50) * 1000,
                    "gateway_p99": percentile(gateway_times, 99) * 1000,
                    "direct_p50": percentile(direct_times, 50) * 1000,
                    "direct_p99": percentile(direct_times, 99) * 1000,
                }
                figures = results["first_event_ms"]
                figures["added_p50"] = figures["gateway_p50"] - figures["direct_p50"]
                figures["added_p99"] = figures["gateway_p99"] - figures["direct_p99"]
                print(f"first event of a streamed answer over {args.requests} requests:"
                      f" through the gateway p50 {figures['gateway_p50']:.2f} ms,"
                      f" p99 {figures['gateway_p99']:.2f} ms; the fake alone p50"
                      f" {figures['direct_p50']:.2f} ms, p99 {figures['direct_p99']:.2f} ms;"
                      f" added p50 {figures['added_p50']:.2f} ms (target <= 2 ms),"
                      f" p99 {figures['added_p99']:.2f} ms", flush=True)
            else:
                rates = {"gateway": [], "direct": []}
                for _ in range(args.stream_runs):
                    for name, client in (("gateway", through), ("direct", direct)):
                        start = time.perf_counter()
                        _, size = client.first_event()
                        rates[name].append(size / MIB / (time.perf_counter() - start))
                gateway_rate = statistics.median(rates["gateway"])
                direct_rate = statistics.median(rates["direct"])
                results["stream_mib_per_s"] = {
                    "mib": args.stream_mib, "runs": args.stream_runs,
                    "gateway": gateway_rate, "direct": direct_rate,
                    "ratio": gateway_rate / direct_rate}
                print(f"a streamed answer of {args.stream_mib} MiB (median of"
                      f" {args.stream_runs}): through the gateway {gateway_rate:.0f} MiB/s,"
                      f" the fake alone {direct_rate:.0f} MiB/s"
                      f" ({100 * gateway_rate / direct_rate:.0f} %)", flush=True)
            through.close()
            direct.close()
            server.stop()
        print(json.dumps({"gateway": results}))
    finally:
        for server in servers:
            try:
                server.stop()
            finally:
                remove_instance_containers(server.instance)
        small.stop()
        large.stop()


if __name__ == "__main__":
    main()
