"""
The stand-in Kubernetes API server (L{tests.support.kube_standin}) as a
process of its own, so that a server in another process (C{twistd capsule
--engine kubernetes}, a benchmark, C{kubectl}) can use it:

    python -m tests.support.kube_standin_main --port 0 --kubeconfig-out FILE

It listens on C{--interface} (loopback by default) and C{--port} (0: a free
one), writes a kubeconfig that points at it (one cluster, one user without
credentials, one context, current, whose namespace is C{--namespace}),
prints its URL as its first line on stdout, and runs until SIGTERM or
SIGINT; then it removes every container and volume its pods had, and exits
0.  Pods join the Docker network C{--network} (C{none} by default: pods have
no address, as the tests' in-process stand-in; a network the host reaches,
such as C{bridge}, gives them a C{podIP}).

What it reproduces and what not is the stand-in's own docstring.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import docker
import docker.errors
import yaml

from tests.support.kube_standin import KubeStandin

CONTEXT = "kube-standin"


def kubeconfig(url: str, namespace: str) -> dict:
    """
    A kubeconfig (C{kind: Config}) for the stand-in at C{url}: no
    credentials (the stand-in allows every request), C{namespace} as the
    context's default.
    """
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": url}}],
        "users": [{"name": CONTEXT, "user": {}}],
        "contexts": [{"name": CONTEXT, "context": {
            "cluster": CONTEXT, "user": CONTEXT, "namespace": namespace}}],
        "current-context": CONTEXT,
    }


def write_kubeconfig(path: Path, url: str, namespace: str) -> None:
    """
    Write L{kubeconfig} to C{path} (mode 0600, as kubectl writes one),
    through a temporary file renamed into place: a reader never sees half.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(kubeconfig(url, namespace), f, default_flow_style=False)
    os.replace(temporary, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.kube_standin_main",
        description="Run the tests' stand-in Kubernetes API server (pods as containers on the"
                    " local Docker engine) until SIGTERM or SIGINT.")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port to listen on (0: a free one) [default: %(default)s]")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="address to listen on [default: %(default)s]")
    parser.add_argument("--kubeconfig-out", type=Path, required=True, metavar="FILE",
                        help="where to write a kubeconfig that points at it")
    parser.add_argument("--namespace", default="default",
                        help="the kubeconfig context's namespace [default: %(default)s]")
    parser.add_argument("--network", default="none",
                        help="the Docker network pods join (none: no pod address)"
                             " [default: %(default)s]")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, not {args.port}")
    directory = args.kubeconfig_out.parent
    if not directory.is_dir():
        parser.error(f"--kubeconfig-out: no directory {str(directory)!r}")
    if args.kubeconfig_out.is_dir():
        parser.error(f"--kubeconfig-out: {str(args.kubeconfig_out)!r} is a directory")
    if not args.namespace:
        parser.error("--namespace must not be empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        client = docker.APIClient(version="auto", timeout=60)
        if args.network != "none":
            client.inspect_network(args.network)
    except docker.errors.NotFound:
        print(f"kube_standin: no Docker network {args.network!r}", file=sys.stderr)
        return 2
    except docker.errors.DockerException as e:
        print(f"kube_standin: no Docker engine answers: {e}", file=sys.stderr)
        return 2

    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    standin = KubeStandin(reactor, client, network=args.network)
    try:
        port = reactor.listenTCP(args.port, standin.site, interface=args.interface)
    except CannotListenError as e:
        print(f"kube_standin: cannot listen: {e}", file=sys.stderr)
        return 2
    standin.start()
    address = port.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    url = f"http://{host}:{address.port}"
    write_kubeconfig(args.kubeconfig_out, url, args.namespace)

    async def stop():
        await port.stopListening()
        await standin.stop()

    from twisted.internet.defer import Deferred

    # reactor.run() stops on SIGTERM and SIGINT; this runs before it ends.
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: Deferred.fromCoroutine(stop()))
    print(url, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
