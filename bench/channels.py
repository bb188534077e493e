"""
Keeper channels (capsule.engine.channels) against a TCP connection to the
container's address: how fast bytes go through a session's keeper stream,
and what a bulk channel does to the terminal's echo.

In this process, as capsule does it (the engine and a session manager): a
session without a network (its channels over the relay exec) and one on
Docker's default bridge (TCP to its address, the path a preview of a
networked session takes).  In each, a perl server on port 7001 sends the
bytes a client asks for, and one on port 7000 echoes; the figures are
medians of C{--repeats} runs.  Then the terminal's echo (``echo`` typed,
its answer back) while a channel downloads at full speed, against a quiet
one.  Prints a small Markdown table on stderr and one JSON line on stdout.
Runnable alone:

    .venv/bin/python bench/channels.py --megabytes 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from capsule.core.spec import ContainerSpec  # noqa: E402
from capsule.engine.channels import KeeperChannelEndpoint  # noqa: E402
from capsule.engine.docker import DockerAPI  # noqa: E402
from capsule.sessions.manager import SessionManager  # noqa: E402
from capsule.sessions.session import SessionConfig  # noqa: E402
from tests.support.fakes import RecordingClient  # noqa: E402
from tests.support.live import docker_client, remove_instance_containers  # noqa: E402

MB = 1024 * 1024
SERVERS = (
    "perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"0.0.0.0:7001\","
    "Listen=>8,ReuseAddr=>1) or die; $b=\"z\" x 65536; while($c=$s->accept){ $w=<$c>;"
    " $n=0; while($n<$w){ $k=syswrite($c,$b,$w-$n<65536?$w-$n:65536); last if !defined $k;"
    " $n+=$k } close $c }' >/dev/null 2>&1 &"
    " perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"0.0.0.0:7000\","
    "Listen=>8,ReuseAddr=>1) or die; $SIG{CHLD}=\"IGNORE\"; while($c=$s->accept){"
    " if(!fork){ while(($n=sysread($c,$b,65536))){ $o=0; while($o<$n){"
    " $o+=syswrite($c,$b,$n-$o,$o) } } exit 0 } close $c }' >/dev/null 2>&1 &"
    " echo serv$((1+1))")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Download(Protocol):
    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"%d\n" % self.size)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.count >= self.size and not self.done.called:
            self.done.callback(time.monotonic())

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.errback(reason)


class Echo(Protocol):
    "Writes C{size} bytes (paced by the transport's producer calls) and counts the echo."

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = self.count = 0
        self.paused = False
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        block = b"e" * 65536
        while not self.paused and self.sent < self.size:
            self.transport.write(block[: self.size - self.sent])
            self.sent += min(len(block), self.size - self.sent)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.count >= self.size and not self.done.called:
            self.done.callback(time.monotonic())


async def timed(endpoint, protocol) -> float:
    start = time.monotonic()
    made = await endpoint.connect(Factory.forProtocol(lambda: protocol))
    end = await protocol.done
    made.transport.loseConnection()
    return protocol.size / MB / (end - start)


async def wait(reactor, check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


async def typed(reactor, manager, session, client, marker: str) -> float:
    since = len(client.output)
    start = time.monotonic()
    manager.write(session, f"echo {marker[:-1]}$((0+{marker[-1]}))\r".encode())
    await wait(reactor, lambda: marker.encode() in client.output[since:], 30, marker)
    return (time.monotonic() - start) * 1000


async def main(reactor, args) -> None:
    instance = f"bench-chan-{uuid.uuid4().hex[:8]}"
    api = DockerAPI(reactor, threads=4, export_threads=1, timeout=60)
    api.start()
    results: dict = {"megabytes": args.megabytes, "repeats": args.repeats}
    try:
        made = {}
        for network in ("none", "bridge"):
            spec = ContainerSpec(image=args.image, memory="512m", cpus=1, pids=128,
                                 network=network)
            manager = SessionManager(api, reactor, SessionConfig(
                spec=spec, instance=instance, grace=60))
            client = RecordingClient()
            session = manager.create(client, 120, 40)
            await wait(reactor, lambda: session.status() == "running"
                       and client.offset is not None, 60, "a session")
            since = len(client.output)
            manager.write(session, SERVERS.encode() + b"\r")
            await wait(reactor, lambda: b"serv2" in client.output[since:], 30, "the servers")
            await task.deferLater(reactor, 0.5, lambda: None)
            made[network] = (manager, session, client)
        none = made["none"][1]
        if none.shell.channels is None:
            raise RuntimeError(f"{args.image}'s keeper carries no channels")
        address = (await api.keeper_address(made["bridge"][1].container_id))[0]
        paths = {"channel": lambda port: KeeperChannelEndpoint(reactor, none, port, 30),
                 "tcp": lambda port: TCP4ClientEndpoint(reactor, address, port, 30)}
        size = args.megabytes * MB
        for name, endpoint in paths.items():
            down = [await timed(endpoint(7001), Download(size)) for _ in range(args.repeats)]
            echo = [await timed(endpoint(7000), Echo(size)) for _ in range(args.repeats)]
            results[f"{name}_download_mb_s"] = round(statistics.median(down), 1)
            results[f"{name}_echo_mb_s"] = round(statistics.median(echo), 1)
            say(f"{name}: download {down} MB/s, echo {echo} MB/s")
        manager, session, client = made["none"]
        quiet = [await typed(reactor, manager, session, client, f"q{i % 10}")
                 for i in range(args.keys)]
        bulk = Download(1 << 40)
        connected = await KeeperChannelEndpoint(reactor, none, 7001).connect(
            Factory.forProtocol(lambda: bulk))
        await wait(reactor, lambda: bulk.count > 4 * MB, 60, "the bulk channel")
        start_count, start = bulk.count, time.monotonic()
        busy = [await typed(reactor, manager, session, client, f"b{i % 10}")
                for i in range(args.keys)]
        rate = (bulk.count - start_count) / MB / (time.monotonic() - start)
        bulk.done.addErrback(lambda f: None)  # ended here, not by the container
        connected.transport.abortConnection()
        results.update(echo_quiet_ms=round(statistics.median(quiet), 2),
                       echo_during_bulk_ms=round(statistics.median(busy), 2),
                       bulk_during_echo_mb_s=round(rate, 1))
        say("| path | download MB/s | echo MB/s |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {results[f'{name}_download_mb_s']} |"
                        f" {results[f'{name}_echo_mb_s']} |" for name in paths)
            + f"\n\nterminal echo: quiet {results['echo_quiet_ms']} ms, during a bulk channel"
            f" {results['echo_during_bulk_ms']} ms (the channel meanwhile at"
            f" {results['bulk_during_echo_mb_s']} MB/s)")
        print(json.dumps(results), flush=True)
        for manager, session, _ in made.values():
            session.events.end(None, "the bench is over")
    finally:
        remove_instance_containers(instance)
        api.stop()


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keys", type=int, default=20, help="echoes timed, quiet and busy")
    return parser.parse_args(argv)


if __name__ == "__main__":
    docker_client()  # fails early without an engine
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parse())))
