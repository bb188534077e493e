"""
Kept sessions (issue 24, docs/keeping.md) through a real capsule: for a
shell session and for one with 1 GB in /workspace (``--mb``), the time to
put it away (``POST /api/sessions/{id}/put-away``: its screen saved, its
container stopped, answered once kept), the time from asking to resume it
(a WebSocket with ``resume=1``) to a command's answer in its new shell, the
time to fork it (``POST /api/sessions/{id}/fork``: the answer comes once the
fork's shell runs), and the disk a kept session uses over its image (its
writable layer, as the engine says, and its volumes); next to a cold
start's time (a new session's WebSocket to a command's answer, no warm
pool). Medians of ``--repeats`` runs, alternating, so that the machine's
load hits all alike. Targets: resume within 2x a cold start; a fork of 1 GB
under 5 s. Prints a table, then one JSON line. Runnable alone:

    .venv/bin/python bench/keep.py [--quick] [--mb 1024] [--read-only-root]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clients import BlockingTerminal  # noqa: E402
from tests.support.httpclient import request  # noqa: E402
from tests.support.live import (CapsuleServer, docker_client,  # noqa: E402
                                remove_instance_containers, remove_instance_images,
                                remove_instance_volumes)

MIB = 1024 * 1024


def api(base: str, path: str, body=None, method="POST"):
    status, _, data = request(base + path, method, {"Content-Type": "application/json"},
                              json.dumps(body).encode() if body is not None else None,
                              timeout=600)
    return status, json.loads(data) if data else None


def answered(terminal: BlockingTerminal, timeout: float = 120) -> None:
    """
    Type a command at once and wait for its answer: the shell runs.
    """
    terminal.run("echo up-$((40+2))", "up-42", timeout=timeout)


def cold_start(server) -> tuple[float, str, BlockingTerminal]:
    start = time.perf_counter()
    terminal = BlockingTerminal(server.ws_url, binary=True)
    session_id = terminal.start(100, 30, timeout=120)
    answered(terminal)
    return time.perf_counter() - start, session_id, terminal


def fill(terminal: BlockingTerminal, megabytes: int) -> None:
    if megabytes:
        terminal.run(f"head -c {megabytes}M /dev/urandom > /workspace/big; sync;"
                     " echo filled-$((1+1))", "filled-2", timeout=600)


def put_away(server, session_id: str) -> float:
    start = time.perf_counter()
    status, body = api(server.url, f"/api/sessions/{session_id}/put-away")
    assert status == 200, (status, body)
    return time.perf_counter() - start


def resume(server, session_id: str) -> tuple[float, BlockingTerminal]:
    start = time.perf_counter()
    terminal = BlockingTerminal(server.ws_url, f"{session_id}&resume=1", binary=True)
    terminal.next("connected", timeout=120)
    terminal.send({"type": "resize", "cols": 100, "rows": 30})
    answered(terminal)
    return time.perf_counter() - start, terminal


def fork(server, session_id: str) -> tuple[float, str]:
    start = time.perf_counter()
    status, body = api(server.url, f"/api/sessions/{session_id}/fork")
    assert status == 201, (status, body)
    return time.perf_counter() - start, body["id"]


def kept_disk(instance: str, session_id: str) -> tuple[int, int]:
    """
    The bytes of a kept session's writable layer, and of its volumes (not
    the user's agent volume), as the engine says.
    """
    api_client = docker_client().api
    [container] = api_client.containers(all=True, size=True, filters={"label": [
        f"io.capsule.instance={instance}", f"io.capsule.session={session_id}"]})
    names = {m.get("Name") for m in api_client.inspect_container(container["Id"])["Mounts"]
             if m.get("Type") == "volume"}
    volumes = 0
    if names:
        df = api_client.df()
        volumes = sum((v.get("UsageData") or {}).get("Size", 0) for v in df.get("Volumes") or []
                      if v["Name"] in names and (v.get("Labels") or {}).get(
                          "io.capsule.volume") != "agent")
    return container.get("SizeRw") or 0, volumes


def delete(server, session_id: str) -> None:
    api(server.url, f"/api/sessions/{session_id}", method="DELETE")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--mb", type=int, default=1024,
                        help="MiB written in /workspace of the large session")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run, 256 MiB")
    parser.add_argument("--read-only-root", action="store_true",
                        help="/workspace on a volume (copied by a fork) instead of the layer")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.mb = 1, min(args.mb, 256)
    work = Path(tempfile.mkdtemp(prefix="bench-keep-"))
    extra = ["--read-only-root"] if args.read_only_root else []
    server = CapsuleServer(work, "--pool-size", "0", "--grace", "600", "--retention", "1d",
                           "--session-rate", "1000/1", "--max-sessions-per-client", "64",
                           "--memory-budget", "off",
                           "--max-kept-bytes-per-user", "100g", "--state-dir",
                           str(work / "state"), *extra, image=args.image,
                           tuning={"cleanup-interval": 1})
    server.start()
    figures = {"cold": [], **{f"{what}_{kind}": [] for what in ("away", "resume", "fork")
                              for kind in ("shell", "large")}}
    disk = {}
    try:
        for _ in range(args.repeats):
            for kind, megabytes in (("shell", 0), ("large", args.mb)):
                seconds, session_id, terminal = cold_start(server)
                figures["cold"].append(seconds)
                fill(terminal, megabytes)
                terminal.close()
                seconds, fork_id = fork(server, session_id)
                figures[f"fork_{kind}"].append(seconds)
                delete(server, fork_id)
                figures[f"away_{kind}"].append(put_away(server, session_id))
                disk[kind] = kept_disk(server.instance, session_id)
                seconds, terminal = resume(server, session_id)
                figures[f"resume_{kind}"].append(seconds)
                terminal.close()
                delete(server, session_id)
    finally:
        server.stop()
        remove_instance_containers(server.instance)
        remove_instance_images(server.instance)
        remove_instance_volumes(server.instance)
    result = {name: round(median(values), 3) for name, values in figures.items()}
    cold = result["cold"]
    rows = [("cold start (WebSocket to a command's answer)", f"{cold:.2f} s", "")]
    for kind, label in (("shell", "shell session"), ("large", f"{args.mb} MiB in /workspace")):
        layer, volumes = disk[kind]
        rows += [
            (f"put away, {label} (stop -> kept)", f"{result[f'away_{kind}']:.2f} s", ""),
            (f"resume to a command's answer, {label}", f"{result[f'resume_{kind}']:.2f} s",
             f"{result[f'resume_{kind}'] / cold:.2f}x cold (target 2x)"),
            (f"fork, {label}", f"{result[f'fork_{kind}']:.2f} s",
             "target 5 s" if kind == "large" else ""),
            (f"disk of a kept {label} over its image", f"{(layer + volumes) / MIB:.1f} MiB",
             f"layer {layer / MIB:.1f} MiB, volumes {volumes / MIB:.1f} MiB"),
        ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    result["disk"] = {kind: {"layer": layer, "volumes": volumes}
                      for kind, (layer, volumes) in disk.items()}
    result.update(mb=args.mb, repeats=args.repeats, read_only_root=args.read_only_root)
    print(json.dumps({"keep": result}))


if __name__ == "__main__":
    main()
