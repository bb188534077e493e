"""
Memory pressure: sessions that really hold memory, opened until admission
refuses, against a capsule with its default options (but the per-client
and rate limits, since the bench is one client, and a long grace, since its
sessions have no client):

    .venv/bin/python bench/pressure.py [--real-gib 4] [--each-mib 300]

It reads the host's available memory (MemAvailable) and starts capsule
with C{--memory-reserve} at that less C{--real-gib}: admission must refuse
after about that much real use, never near the host's total.  Then, one at
a time, it opens a session through the API (C{POST /api/sessions}) and
starts in it, through the exec API, a process that fills C{--each-mib} MiB
(perl's C{x=}: every page written), waits until the container's cgroup
holds it, and for capsule's next reading of the host (C{host-memory-interval},
5 s) before the next.  Once capsule refuses (C{server_full}), it checks that
capsule answers C{/health}, that dockerd answers, that every session
still answers an exec (C{echo}) with its memory filler still running, and
that the kernel killed nothing (the C{oom_kill} count of /proc/vmstat, and
no container OOMKilled).  It prints the figures and a JSON line, then stops
capsule and removes every container of its instance, however it ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The tests' helpers (tests/support) are the bench's clients too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.httpclient import request
from tests.support.live import CapsuleServer, docker_client, session_container, wait_for

MIB = 1024 ** 2
GIB = 1024 ** 3
# Capsule's reading of the host (the tuning knob host-memory-interval).
INTERVAL = 5.0


def meminfo() -> dict[str, int]:
    """
    /proc/meminfo, in bytes.
    """
    found = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            found[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return found


def oom_kills() -> int | None:
    """
    The processes the kernel killed for want of memory since it started
    (None: this kernel does not count them).
    """
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return None


def cgroup_use(container_id: str) -> int | None:
    """
    What a container holds (its cgroup's memory use), on cgroup v1 or v2.
    """
    for path in (f"/sys/fs/cgroup/memory/docker/{container_id}/memory.usage_in_bytes",
                 f"/sys/fs/cgroup/docker/{container_id}/memory.current",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.current"):
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def api(server, method: str, path: str, body: dict | None = None, timeout: float = 120):
    status, _, data = request(server.url + path, method, {"Content-Type": "application/json"},
                              json.dumps(body or {}).encode(), timeout=timeout)
    return status, json.loads(data or b"{}")


def exec_in(server, session_id: str, script: str, timeout: float = 60) -> dict:
    status, answer = api(server, "POST", f"/api/sessions/{session_id}/exec",
                         {"argv": ["sh", "-c", script], "timeout": timeout})
    if status != 200:
        raise RuntimeError(f"exec in {session_id[:8]}: {status} {answer}")
    return answer


def pressure(image: str, real_gib: float, each_mib: int, most: int) -> dict:
    start_info = meminfo()
    available0 = start_info["MemAvailable"]
    reserve = available0 - int(real_gib * GIB)
    if reserve < GIB:
        raise SystemExit(f"this host has {available0 // MIB} MiB available: too little to hold"
                         f" {real_gib:g} GiB more and keep 1 GiB")
    workdir = Path(tempfile.mkdtemp(prefix="capsule-pressure-"))
    server = CapsuleServer(workdir, "--grace", "3600", "--max-sessions-per-client", "1000",
                           "--session-rate", "1000/1", "--memory-reserve", str(reserve),
                           image=image, instance=f"pressure-{uuid.uuid4().hex[:8]}")
    engine = docker_client().api
    kills_before = oom_kills()
    result = {"bench": "pressure", "each_mib": each_mib,
              "host_total_mib": start_info["MemTotal"] // MIB,
              "available_at_start_mib": available0 // MIB, "reserve_mib": reserve // MIB}
    sessions: list[tuple[str, str]] = []
    try:
        server.start()
        wait_for(lambda: "memory budget:" in server.log(), 60,
                 "capsule to read the engine host's memory")
        started = time.monotonic()
        refusal = None
        uses = []
        while len(sessions) < most:
            status, answer = api(server, "POST", "/api/sessions")
            if status != 201:
                refusal = {"status": status, **answer}
                break
            session_id = answer["id"]
            container_id = session_container(session_id, engine)
            sessions.append((session_id, container_id))
            exec_in(server, session_id,
                    f"nohup perl -e '$x = \"a\"; $x x= {each_mib} * 1024 * 1024;"
                    f" sleep 36000' >/dev/null 2>&1 & echo $! > /tmp/filler.pid")
            use = wait_for(lambda: (cgroup_use(container_id) or 0) >= each_mib * MIB * 0.95
                           and cgroup_use(container_id), 60,
                           f"session {len(sessions)} to fill {each_mib} MiB")
            uses.append(use)
            # capsule's next reading of the host sees it.
            time.sleep(INTERVAL + 1)
            print(f"session {len(sessions)}: its container holds {use // MIB} MiB;"
                  f" the host has {meminfo()['MemAvailable'] // MIB} MiB available",
                  file=sys.stderr)
        refused_at = meminfo()["MemAvailable"]
        seconds = time.monotonic() - started
        # Everything still works: capsule, dockerd, every session.
        health_status, health = server.health()
        engine_ok = bool(engine.version().get("Version"))
        echoes, fillers, echo_ms = 0, 0, []
        for n, (session_id, _) in enumerate(sessions):
            t0 = time.monotonic()
            answer = exec_in(server, session_id,
                             f"echo alive-{n}; kill -0 $(cat /tmp/filler.pid) && echo filling")
            echo_ms.append((time.monotonic() - t0) * 1000)
            echoes += f"alive-{n}" in answer["stdout"]
            fillers += "filling" in answer["stdout"]
        oom_killed = sum(bool(engine.inspect_container(c)["State"].get("OOMKilled"))
                         for _, c in sessions)
        kills_after = oom_kills()
        echo_ms.sort()
        result.update({
            "sessions_admitted": len(sessions),
            "refusal": refusal,
            "real_use_mib": sum(uses) // MIB,
            "per_session_mib": round(sum(uses) / max(1, len(uses)) / MIB),
            "available_at_refusal_mib": refused_at // MIB,
            "seconds": round(seconds, 1),
            "capsule_health": health_status, "capsule_status": health.get("status"),
            "capsule_rss_mib": round(server.rss_kib() / 1024),
            "dockerd_answers": engine_ok,
            "sessions_answering": echoes, "fillers_alive": fillers,
            "exec_echo_ms_median": round(echo_ms[len(echo_ms) // 2]) if echo_ms else None,
            "containers_oom_killed": oom_killed,
            "kernel_oom_kills": None if kills_before is None or kills_after is None
            else kills_after - kills_before,
        })
        return result
    finally:
        server.finish(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--real-gib", type=float, default=4.0,
                        help="real use after which admission must refuse (default 4)")
    parser.add_argument("--each-mib", type=int, default=300,
                        help="memory each session fills (default 300)")
    parser.add_argument("--most", type=int, default=60,
                        help="sessions opened at most, refused or not (default 60)")
    args = parser.parse_args()
    r = pressure(args.image, args.real_gib, args.each_mib, args.most)
    refusal = r["refusal"] or {}
    print(f"Memory pressure: the host had {r['available_at_start_mib']} MiB available of"
          f" {r['host_total_mib']}; --memory-reserve {r['reserve_mib']} MiB.")
    print(f"- admitted {r['sessions_admitted']} sessions holding {r['per_session_mib']} MiB"
          f" each ({r['real_use_mib']} MiB in all) in {r['seconds']} s; then refused:"
          f" {refusal.get('status')} {refusal.get('code')}: {refusal.get('error')}")
    print(f"- at the refusal the host had {r['available_at_refusal_mib']} MiB available")
    print(f"- capsule: /health {r['capsule_health']} ({r['capsule_status']}), RSS"
          f" {r['capsule_rss_mib']} MiB; dockerd answers: {r['dockerd_answers']}")
    print(f"- sessions answering an exec: {r['sessions_answering']}/{r['sessions_admitted']}"
          f" (median {r['exec_echo_ms_median']} ms), their fillers alive:"
          f" {r['fillers_alive']}/{r['sessions_admitted']}")
    print(f"- killed by the kernel: {r['kernel_oom_kills']} process(es) (oom_kill of"
          f" /proc/vmstat), {r['containers_oom_killed']} container(s) OOMKilled")
    print(json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    main()
