#!/usr/bin/env python3
"""
The engine's part of a fork: how long copying a session's file system
takes (L{capsule.engine.snapshots}), next to the floors.

    .venv/bin/python bench/keep_engine.py [--mb 1024] [--image capsule-runtime:latest]

For N MiB of fresh files in /workspace, it measures:

  - C{layer}: a container whose /workspace is in its writable layer:
    C{snapshot_container} (a C{docker commit}, not paused), then a container
    made from the snapshot and started;
  - C{volume}: a --read-only-root container, whose /workspace is an
    anonymous volume: C{snapshot_container} (the commit of an empty layer,
    and the volume copied by a throwaway container running C{cp -a}), then
    a container made from the snapshot, mounting the copies, and started;

and, for each layout, C{fork_container} of the same source: C{host} (the
copy on the host: C{cp -a} of the overlay upper directory and of the
volume, the source paused meanwhile; what a fork takes where capsule runs
as root beside a local overlay2 engine) and C{by_snapshot} (its fallback:
a snapshot as above, a container from it, the image's tag removed), each
from the call to a running fork.

The floor is the machine's own copy of the same files (C{cp -a} on the
file system that holds /var/lib/docker), measured apart: see
docs/keeping.md.

Every container, image and volume it makes carries the label
C{io.capsule.instance=bench-keep-<random>} and is removed at the end.
L{measure} gives the figures to bench/keep.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from capsule.core.spec import ContainerSpec  # noqa: E402
from capsule.engine.docker import DockerAPI  # noqa: E402

FILL = ('cd /workspace && i=0; while [ "$i" -lt "$0" ]; do'
        ' head -c 1048576 /dev/urandom > "f$i"; i=$((i + 1)); done')


async def measure(reactor, megabytes: int = 1024, image: str = "capsule-runtime:latest",
                  layouts: tuple[str, ...] = ("layer", "volume")) -> dict:
    """
    Fire with the figures, in seconds, of one run (see the module's text).
    """
    instance = f"bench-keep-{uuid.uuid4().hex[:8]}"
    labels = {"io.capsule.managed": "true", "io.capsule.instance": instance}
    spec = ContainerSpec(image=image, network="none", memory="1g", labels=labels)
    api = DockerAPI(reactor, threads=4, timeout=600)
    api.start()
    figures: dict = {"megabytes": megabytes}
    try:
        for layout, made in (("layer", spec), ("volume", replace(spec, read_only_root=True))):
            if layout not in layouts:
                continue
            source = await api.create_session_container(str(uuid.uuid4()), made)
            filled = await api.run_command(source, ["sh", "-c", FILL, str(megabytes)],
                                           "developer", "/", {}, timeout=600)
            assert filled.exit_code == 0, filled.stderr
            await _sync(reactor)
            started = time.monotonic()
            snapshot = await api.snapshot_container(
                source, "capsule-snapshot", f"{instance}-{layout}",
                {**labels, "io.capsule.snapshot": layout})
            copied = time.monotonic()
            fork = await api.create_session_container(str(uuid.uuid4()), replace(
                made, image=snapshot.image,
                volumes=tuple((name, mount) for mount, name in snapshot.volumes.items())))
            figures[layout] = {"snapshot": round(copied - started, 2),
                               "fork": round(time.monotonic() - started, 2)}
            first = await api.read_file(fork, "/workspace/f0", 16)
            assert first is not None and len(first) == 16
            await api.remove_container(fork)
            for way, fast in (("by_snapshot", False), ("host", True)):
                await _sync(reactor)
                started = time.monotonic()
                fork = await api.fork_container(source, str(uuid.uuid4()), made, fast=fast)
                figures[layout][f"fork_{way}"] = round(time.monotonic() - started, 2)
                first = await api.read_file(fork, f"/workspace/f{megabytes - 1}", 16)
                assert first is not None and len(first) == 16
                await api.remove_container(fork)
    finally:
        await defer.maybeDeferred(_cleanup, reactor, instance)
        api.stop()
    return figures


def _cleanup(reactor, instance):
    from twisted.internet.threads import deferToThread

    def _thd():
        client = docker.APIClient(version="auto")
        wanted = {"label": [f"io.capsule.instance={instance}"]}
        for c in client.containers(all=True, filters=wanted):
            client.remove_container(c["Id"], force=True, v=True)
        for image in client.images(filters=wanted):
            tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
            for tag in tags or [image["Id"]]:
                client.remove_image(tag, force=True)
        for volume in client.volumes(filters=wanted).get("Volumes") or []:
            client.remove_volume(volume["Name"], force=True)
    return deferToThread(_thd)


def _sync(reactor):
    from twisted.internet.utils import getProcessOutput
    return getProcessOutput("/bin/sync", (), reactor=reactor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--log", action="store_true", help="capsule's log lines to stderr")
    parser.add_argument("--only", choices=("layer", "volume"), help="one layout only")
    args = parser.parse_args()

    if args.log:
        from twisted.logger import globalLogBeginner, textFileLogObserver
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    def run(reactor):
        d = defer.ensureDeferred(measure(reactor, args.mb, args.image,
                                        (args.only,) if args.only else ("layer", "volume")))
        d.addCallback(lambda figures: print(json.dumps(figures, indent=2)))
        return d
    task.react(run)


if __name__ == "__main__":
    main()
