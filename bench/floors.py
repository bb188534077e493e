"""
The physical floor: what Docker and Twisted do with no capsule in between,
on containers made exactly as capsule makes its own (image, limits, user,
Docker's init), each labelled with the run (C{io.capsule.bench.run}) so that
the bench removes them whatever happens.

 - create+start+exec: a new container until its shell answers (a cold
   session's floor);
 - plain exec: a shell in a running container until it answers (a warm
   session's floor);
 - the raw exec stream: throughput and echo through capsule's own
   exec-start upgrade, read by the reactor (L{clients.RawExecTerm});
 - N create+start+exec at once, on a thread pool of capsule's size.
"""

from __future__ import annotations

import math
import time
import uuid

import docker
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.threadpool import ThreadPool

from capsule.engine.docker import docker_host_endpoint
from tests.support.live import remove_container

from clients import ENVIRONMENT, USER, WORKDIR, LeanExecTerm, RawExecTerm
from measures import END_MARK, READY_INPUT, READY_MARK, ms, ready, say, summary

# What a session container gets: capsule's defaults, passed to capsule
# explicitly and used as they are for the floor containers.
MEMORY, CPUS, PIDS = "4g", 2.0, 256
HOSTNAME = "capsule"
LABEL_BENCH = "io.capsule.bench"
LABEL_BENCH_RUN = "io.capsule.bench.run"
# Threads for the concurrent floor's Docker calls: as many as capsule's default.
THREADS = 16


class Floor:
    def __init__(self, host: str, image: str, run_id: str) -> None:
        self.host = host
        self.image = image
        self.run_id = run_id
        self.api = docker.APIClient(base_url=host, version="auto", timeout=60,
                                    max_pool_size=THREADS + 4)
        self._endpoint = None

    @property
    def endpoint(self):
        if self._endpoint is None:
            self._endpoint = docker_host_endpoint(reactor, self.host)
        return self._endpoint

    # -- containers --

    def _thd_make_container(self) -> str:
        api = self.api
        host_config = api.create_host_config(mem_limit=MEMORY, memswap_limit=MEMORY,
                                             nano_cpus=int(CPUS * 1e9), pids_limit=PIDS,
                                             init=True)
        container = api.create_container(
            self.image, command=["sleep", "infinity"], name=f"bench-floor-{uuid.uuid4()}",
            hostname=HOSTNAME, user=USER, working_dir=WORKDIR, environment=dict(ENVIRONMENT),
            labels={LABEL_BENCH: "1", LABEL_BENCH_RUN: self.run_id},
            host_config=host_config, detach=True)
        api.start(container["Id"])
        return container["Id"]

    def _thd_remove(self, container_id: str) -> None:
        remove_container(self.api, container_id)

    def _thd_leftovers(self) -> list[dict]:
        return self.api.containers(all=True, filters={"label": f"{LABEL_BENCH_RUN}={self.run_id}"})

    async def make_container(self) -> str:
        return await deferToThread(self._thd_make_container)

    async def remove(self, container_id: str) -> None:
        await deferToThread(self._thd_remove, container_id)

    # -- terminals --

    async def open(self, container_id: str, pool=None) -> RawExecTerm:
        return await RawExecTerm.open(self.api, self.endpoint, container_id, pool=pool)

    def lean(self, container_id: str) -> LeanExecTerm:
        """
        In a thread: a shell in the container on a blocking socket.
        """
        return LeanExecTerm(self.host, self.api, container_id)

    # -- the measurements --

    async def create_start_exec(self) -> float:
        """
        Milliseconds from nothing to a new container's shell answering.
        """
        t0 = time.perf_counter()
        container_id = await self.make_container()
        try:
            term = await self.open(container_id)
            since = term.out.total
            term.send_input(READY_INPUT)
            await term.out.wait_for(READY_MARK, 60, since)
            elapsed = ms(time.perf_counter() - t0)
            await term.exit()
        finally:
            await self.remove(container_id)
        return elapsed

    async def plain_exec(self, container_id: str) -> float:
        """
        Milliseconds until a new shell in a running container answers.
        """
        t0 = time.perf_counter()
        term = await self.open(container_id)
        since = term.out.total
        term.send_input(READY_INPUT)
        await term.out.wait_for(READY_MARK, 30, since)
        elapsed = ms(time.perf_counter() - t0)
        await term.exit()
        return elapsed

    async def generator(self, container_id: str, n: int) -> float:
        """
        MB/s of C{head -c n /dev/zero | base64} to /dev/null in the
        container: that generating the output is not the bottleneck.
        """
        term = await self.open(container_id)
        try:
            await ready(term)
            since = term.out.total
            t0 = time.perf_counter()
            term.send_input(f"head -c {n} /dev/zero | base64 >/dev/null;"
                            " echo T$((1+1))END\r".encode())
            await term.out.wait_for(END_MARK, 120, since)
            elapsed = time.perf_counter() - t0
        finally:
            await term.exit()
        produced = math.ceil(n / 57) * 77  # base64's 76-column lines
        return produced / elapsed / 1e6

    async def concurrent(self, n: int) -> dict:
        """
        N containers created, started and exec'd at once through docker-py
        on a pool of capsule's size: what N visitors arriving together
        cannot beat (all cold: no pool).  The result says which failed.
        """
        pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="bench-floor")
        pool.start()
        ids: list[str] = []
        terms: list[RawExecTerm] = []

        async def one():
            t0 = time.perf_counter()
            container_id = await deferToThreadPool(reactor, pool, self._thd_make_container)
            ids.append(container_id)
            term = await self.open(container_id, pool=pool)
            terms.append(term)
            since = term.out.total
            term.send_input(READY_INPUT)
            await term.out.wait_for(READY_MARK, 180, since)
            return ms(time.perf_counter() - t0)

        try:
            t0 = time.perf_counter()
            outcomes = await defer.DeferredList([defer.ensureDeferred(one()) for _ in range(n)],
                                                consumeErrors=True)
            all_usable = time.perf_counter() - t0
            times = [value for ok, value in outcomes if ok]
            failed = [value.getErrorMessage() for ok, value in outcomes if not ok]
            say(f"floor: {len(times)}/{n} containers usable after {all_usable:.2f} s")
        finally:
            await defer.DeferredList([defer.ensureDeferred(t.exit()) for t in terms],
                                     consumeErrors=True)
            await defer.DeferredList([deferToThreadPool(reactor, pool, self._thd_remove, c)
                                      for c in ids], consumeErrors=True)
            pool.stop()
        return {"n": n, "ok": len(times), "all_usable_s": all_usable,
                "times": summary(times) if times else None, "failed": failed}
