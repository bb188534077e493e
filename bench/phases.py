"""
The bench's phases: each capsule figure measured in turn with its floor, so
that a change in the machine's load hits both alike.  Each phase puts its
figures into C{results} under the keys the report reads.
"""

from __future__ import annotations

import statistics
import time

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread

from tests.support.live import LABEL_SESSION, CapsuleServer, poll, sleep

import browser
from clients import lean_session, open_session
from floors import Floor
from measures import (
    KEY_GAP,
    BenchError,
    keystrokes,
    lean_keystrokes,
    ms,
    ready,
    say,
    summary,
    throughput,
)

# Seconds of calm before each connect measurement.
QUIET = 0.2


# -- the capsule being measured --


async def settle(server: CapsuleServer, timeout: float = 90) -> None:
    """
    Wait until no session is live, no container is being removed, and the
    warm pool is full.
    """
    await poll(lambda: deferToThread(server.settled), timeout,
               f"capsule ({server.label}) to settle")


def rss_mb(server: CapsuleServer) -> float:
    return server.rss_kib() / 1024


async def health(server: CapsuleServer) -> tuple[int, dict]:
    return await deferToThread(server.health)


class Phases:
    """
    @param p: the run's sizes (sessions, keystrokes, throughput_bytes,
        repeats, concurrent, flood_seconds).
    """

    def __init__(self, p: dict, floor: Floor, results: dict) -> None:
        self.p = p
        self.floor = floor
        self.results = results

    # -- connect -> usable shell --

    async def connect_cold(self, server: CapsuleServer) -> None:
        floor, capsule = [], []
        for i in range(self.p["sessions"]):
            await self.quiet(server)
            floor.append(await self.floor.create_start_exec())
            await self.quiet(server)
            capsule.append(await self.capsule_connect(server))
            say(f"cold #{i + 1}: capsule {capsule[-1]:.0f} ms, floor create+start+exec"
                f" {floor[-1]:.0f} ms")
        await settle(server)
        self.results["floor_cold"] = summary(floor)
        self.results["cold"] = summary(capsule)

    async def connect_warm(self, server: CapsuleServer, container_id: str) -> None:
        floor, capsule = [], []
        for i in range(self.p["sessions"]):
            await self.quiet(server)
            floor.append(await self.floor.plain_exec(container_id))
            # The pool is full again (and no removal is under way): each
            # session measures a warm start.
            await self.quiet(server)
            capsule.append(await self.capsule_connect(server))
            say(f"warm #{i + 1}: capsule {capsule[-1]:.0f} ms, floor plain exec"
                f" {floor[-1]:.0f} ms")
        await settle(server)
        self.results["floor_exec"] = summary(floor)
        self.results["warm"] = summary(capsule)

    async def quiet(self, server: CapsuleServer) -> None:
        """
        Before each measurement: capsule has finished removing containers
        and refilling its pool, then a moment of calm.
        """
        await settle(server)
        await sleep(QUIET)

    async def capsule_connect(self, server: CapsuleServer) -> float:
        term, elapsed = await open_session(server.ws_url, binary=True)
        await term.exit()
        return elapsed

    # -- keystroke echo --

    async def echo(self, server: CapsuleServer, container_id: str) -> None:
        """
        The lean clients first (the table's figures), then the Twisted ones
        (the notes'), each floor just before its capsule figures.
        """
        count = self.p["keystrokes"]

        async def lean(key: str, label: str, make_term) -> None:
            times = await deferToThread(lean_keystrokes, make_term, count)
            self.results[key] = result = summary(times)
            say(f"{label} echo, lean client: p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f}"
                f" ms, max {result['max']:.2f} ms over {result['n']} keystrokes"
                f" {KEY_GAP * 1000:g} ms apart")

        await lean("floor_echo", "floor (raw exec)", lambda: self.floor.lean(container_id))
        for binary in (True, False):
            name = "binary" if binary else "json"
            await settle(server)
            await lean(f"echo_{name}", f"capsule ({name})",
                       lambda: lean_session(server.ws_url, binary))

        term = await self.floor.open(container_id)
        try:
            await ready(term)
            self.results["floor_echo_twisted"] = await keystrokes(term, "floor (raw exec)", count)
            self.results["floor_echo_b2b"] = await keystrokes(
                term, "floor (raw exec), back to back", 100, gap=0)
        finally:
            await term.exit()
        for binary in (True, False):
            name = "binary" if binary else "json"
            await settle(server)
            term, _ = await open_session(server.ws_url, binary)
            try:
                await ready(term)
                self.results[f"echo_{name}_twisted"] = await keystrokes(
                    term, f"capsule ({name})", count)
                if binary:
                    self.results["echo_b2b"] = await keystrokes(
                        term, f"capsule ({name}), back to back", 100, gap=0)
            finally:
                await term.exit()

    async def echo_refill(self, server: CapsuleServer) -> None:
        """
        Keystroke echo at a quiet capsule, then while other sessions keep
        taking from the warm pool, so that it refills all the while: one
        session opened and left at a time, then until the pool is full
        again, until the typing ends.
        """
        count = self.p["keystrokes"]

        def typing():
            return deferToThread(lean_keystrokes, lambda: lean_session(server.ws_url, True),
                                 count)

        await settle(server)
        quiet = summary(await typing())
        say(f"echo at a quiet capsule: p50 {quiet['p50']:.2f} ms, p99 {quiet['p99']:.2f} ms")
        await settle(server)
        typed = typing()
        takes, below = 0, 0.0
        while not typed.called:
            term, _ = await open_session(server.ws_url, binary=True)
            takes += 1
            await term.exit()
            t0 = time.perf_counter()
            while not typed.called:
                _, body = await health(server)
                pool = body.get("pool", {})
                if pool.get("ready") == pool.get("size"):
                    break
                await sleep(0.05)
            below += time.perf_counter() - t0
        busy = summary(await typed)
        self.results["echo_quiet"] = quiet
        self.results["echo_refill"] = {**busy, "takes": takes, "below_s": below}
        say(f"echo while the pool refilled ({takes} sessions taken, the pool below full for"
            f" {below:.1f} s): p50 {busy['p50']:.2f} ms, p99 {busy['p99']:.2f} ms,"
            f" max {busy['max']:.2f} ms")

    # -- the page in Chromium --

    async def page_visits(self, server: CapsuleServer, key: str) -> None:
        visits = await deferToThread(browser.run_visits, server.url + "/",
                                     self.p["browser_rounds"],
                                     lambda: browser.wait_settled(server),
                                     trace_dir=str(server.log_path.parent))
        traced = visits.pop("traced", None)
        self.results[key] = {kind: browser.digest(marks) for kind, marks in visits.items()}
        if traced:
            self.results[key]["traced"] = traced

    # -- throughput --

    async def generator(self, container_id: str) -> None:
        self.results["generator"] = mbps = await self.floor.generator(
            container_id, self.p["throughput_bytes"])
        say(f"generator alone (to /dev/null in the container): {mbps:.0f} MB/s")

    async def throughput_rounds(self, server: CapsuleServer, container_id: str,
                                relay: CapsuleServer | None = None) -> None:
        """
        Rounds of floor, binary, JSON (and binary through C{relay}, a
        capsule whose keepers are reached through relay execs) in turn: the
        PTY's rate wanders by tens of percent from one run to the next on a
        busy machine, so the median of several interleaved runs is what is
        compared.
        """
        n = self.p["throughput_bytes"]
        runs: dict[str, list] = {}

        def keep(key, result):
            runs.setdefault(key, []).append(result)

        for i in range(self.p["repeats"]):
            term = await self.floor.open(container_id)
            try:
                await ready(term)
                keep("floor_throughput", await throughput(term, "floor (raw exec stream)", n))
            finally:
                await term.exit(timeout=60)
            rounds = [("binary", server, True), ("json", server, False)]
            if relay is not None:
                rounds.append(("relay", relay, True))
            for name, capsule, binary in rounds:
                await settle(capsule)
                term, _ = await open_session(capsule.ws_url, binary)
                try:
                    await ready(term)
                    keep(f"throughput_{name}",
                         await throughput(term, f"capsule ({name})", n, capsule.pid))
                finally:
                    await term.exit(timeout=60)
        for key, results in runs.items():
            ordered = sorted(results, key=lambda result: result["mbps"])
            self.results[key] = {
                **ordered[(len(ordered) - 1) // 2],  # the median run (the lower one if even)
                "median": statistics.median(result["mbps"] for result in results),
                "best": ordered[-1]["mbps"],
                "all": [result["mbps"] for result in results],
            }

    # -- many at once --

    async def floor_concurrent(self, server: CapsuleServer) -> None:
        await self.quiet(server)
        result = await self.floor.concurrent(self.p["concurrent"])
        failed = result.pop("failed")
        self.results["floor_concurrent"] = result
        if failed:
            raise BenchError(f"{len(failed)} floor container(s) failed: {failed[0]}")

    async def capsule_concurrent(self, server: CapsuleServer) -> None:
        n = self.p["concurrent"]
        await settle(server)
        await sleep(1)
        before = rss_mb(server)
        peak = [before]
        sampler = task.LoopingCall(lambda: peak.append(rss_mb(server)))
        sampler.start(0.2)
        terms = []
        try:
            t0 = time.perf_counter()
            outcomes = await defer.DeferredList(
                [defer.ensureDeferred(open_session(server.ws_url, True, timeout=180))
                 for _ in range(n)], consumeErrors=True)
            all_usable = time.perf_counter() - t0
            times = []
            failed = []
            for ok, value in outcomes:
                if ok:
                    terms.append(value[0])
                    times.append(value[1])
                else:
                    failed.append(value.getErrorMessage())
            await sleep(0.5)
            during = rss_mb(server)
            _, body = await health(server)
            say(f"{len(terms)}/{n} sessions usable after {all_usable:.2f} s;"
                f" capsule RSS {before:.1f} -> {during:.1f} MB, /health sessions"
                f" {body.get('sessions')}")
            if failed:
                say(f"{len(failed)} session(s) failed, first: {failed[0]}")
        finally:
            exits = await defer.DeferredList(
                [defer.ensureDeferred(t.exit(timeout=60)) for t in terms], consumeErrors=True)
            sampler.stop()
        exit_failures = [f.getErrorMessage() for ok, f in exits if not ok]
        await settle(server, timeout=180)
        await sleep(2)
        after = rss_mb(server)
        self.results["concurrent"] = {
            "n": n, "ok": len(terms), "failed": failed, "exit_failures": exit_failures,
            "all_usable_s": all_usable, "times": summary(times) if times else None,
            "before": before, "during": during, "after": after, "peak": max(peak),
            "per_session": (during - before) / max(1, len(terms)),
        }
        say(f"capsule RSS after all {n} exited and were removed: {after:.1f} MB"
            f" (peak {max(peak):.1f} MB)")
        if failed or exit_failures:
            raise BenchError(f"{len(failed)} session(s) did not start, {len(exit_failures)}"
                             f" did not exit cleanly: {(failed + exit_failures)[0]}")

    # -- input flooding a shell that does not read it --

    async def input_flood(self, server: CapsuleServer) -> None:
        """
        Binary frames of 256 KiB, as fast as the socket takes them, to a
        shell that does not read its input: capsule's RSS must stay flat
        (the client's socket is not read while the shell's input is full).
        """
        seconds = min(self.p["flood_seconds"], 6.0)
        await settle(server)
        term, _ = await open_session(server.ws_url, True)
        await ready(term)
        term.send_input(b"stty -icanon -echo; sleep 600\r")
        await sleep(0.5)
        idle = max([rss_mb(server) for _ in range(3)])
        samples = []
        sampler = task.LoopingCall(lambda: samples.append(rss_mb(server)))
        sampler.start(0.2)
        frame = b"x" * (256 * 1024)
        sent = 0
        try:
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end and not term.is_closed:
                # What the socket does not take waits in this client's memory.
                for _ in range(4):
                    term.send_input(frame)
                    sent += len(frame)
                await sleep(0.02)
        finally:
            sampler.stop()
        peak = max(samples) if samples else idle
        closed = term.close_code
        term.drop()
        await settle(server)
        await sleep(1)
        after = rss_mb(server)
        self.results["input_flood"] = {
            "seconds": seconds, "idle": idle, "peak": peak, "delta": peak - idle,
            "after": after, "offered_mb": sent / 1e6, "closed": closed}
        say(f"input flood: RSS idle {idle:.1f} MB, peak {peak:.1f} MB (+{peak - idle:.1f}),"
            f" after {after:.1f} MB; the client queued {sent / 1e6:.0f} MB in {seconds:g} s"
            f"{'' if closed is None else f'; closed {closed}'}")

    # -- a flood to a slow reader --

    async def flood(self, server: CapsuleServer, binary: bool) -> None:
        name = "binary" if binary else "json"
        seconds = self.p["flood_seconds"]
        await settle(server)
        term, _ = await open_session(server.ws_url, binary, auto_ack=False)
        term.ack()
        session_id = term.session_id
        await ready(term)
        term.ack()
        idle_samples = []
        for _ in range(5):
            idle_samples.append(rss_mb(server))
            await sleep(0.2)
        idle = max(idle_samples)
        samples = []
        sampler = task.LoopingCall(lambda: samples.append(rss_mb(server)))
        sampler.start(0.2)
        try:
            term.send_input(b"yes $(printf 'x%.0s' {1..100})\r")
            received0 = term.out.total
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end and not term.is_closed:
                # Mostly not reading the socket at all; now and then a sip,
                # and an ack of what was read.
                term.transport.pauseProducing()
                await sleep(0.95)
                term.transport.resumeProducing()
                await sleep(0.05)
                if binary:
                    term.ack()
        finally:
            sampler.stop()
        if term.is_closed:
            raise BenchError(f"capsule closed the slow client's connection ({term.close_code})")
        got = term.out.total - received0
        peak = max(samples) if samples else idle
        server.new_log()
        # The client leaves without a word, with unread data in the pipe.
        term.transport.pauseProducing()
        t_drop = time.perf_counter()
        term.drop()
        needle = f"client left session {session_id[:8]}"
        seen = []

        def logged():
            seen.append(server.new_log())
            return needle in "".join(seen[-2:])

        await poll(logged, 30, "capsule to log that the client left", interval=0.005)
        t_left = time.perf_counter() - t_drop

        def gone():
            return not self.floor.api.containers(
                all=True, filters={"label": f"{LABEL_SESSION}={session_id}"})

        await poll(lambda: deferToThread(gone), 60,
                   "the flood session's container to be removed", interval=0.05)
        t_gone = time.perf_counter() - t_drop
        await settle(server)
        await sleep(1)
        after = rss_mb(server)
        self.results[f"flood_{name}"] = {
            "seconds": seconds, "idle": idle, "peak": peak, "delta": peak - idle,
            "after": after, "client_mb": got / 1e6, "left_s": t_left, "gone_s": t_gone,
            "grace": 1.0,
        }
        say(f"flood ({name}): RSS idle {idle:.1f} MB, peak {peak:.1f} MB (+{peak - idle:.1f}),"
            f" after {after:.1f} MB; the client read {got / 1e6:.1f} MB in {seconds:g} s;"
            f" left logged after {ms(t_left):.0f} ms; container gone after {t_gone:.2f} s")

