import os
import subprocess

import pytest

from capsule.engine.firewall import chain_names, find_tool, removal_commands

from tests.support.live import remove_instance_images

from .harness import (IMAGE, CapsuleServer, docker_client, remove_instance_containers,
                      remove_instance_volumes)


def _docker_ready() -> str | None:
    try:
        client = docker_client()
        client.ping()
    except Exception as e:
        return f"no Docker engine answers ({e})"
    try:
        client.images.get(IMAGE)
    except Exception:
        return f"the image {IMAGE} is missing (make image)"
    return None


def pytest_collection_modifyitems(config, items):
    problem = _docker_ready()
    if problem is None:
        return
    if os.environ.get("CAPSULE_REQUIRE_DOCKER"):
        raise pytest.UsageError(f"integration tests need Docker: {problem}")
    skip = pytest.mark.skip(reason=problem)
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def make_server(tmp_path):
    """
    Start capsule servers; stop them and remove every container of theirs
    afterwards, even when the test failed.
    """
    servers = []

    def make(*args, start=True, **kwargs):
        server = CapsuleServer(tmp_path, *args, **kwargs)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        try:
            server.stop()
        finally:
            remove_instance_containers(server.instance)
            remove_instance_volumes(server.instance)
            # Snapshots and forks' images (kept sessions), once no container uses them.
            remove_instance_images(server.instance)


@pytest.fixture
def server(make_server):
    return make_server("--grace", "30", tuning={"cleanup-interval": 0.5})


def _fenced_bridges() -> set[tuple[int, str]]:
    """
    The bridges capsule's firewall rules are on now, by address family
    (none where iptables cannot be read: not root, not installed).
    """
    found = set()
    for family, name in ((4, "iptables"), (6, "ip6tables")):
        tool = find_tool(name)
        if tool is None:
            continue
        done = subprocess.run([tool, "-w", "-S"], capture_output=True, text=True)
        if done.returncode != 0:
            continue
        prefix = f"-N {chain_names('')[1]}"
        found |= {(family, line[len(prefix):].strip()) for line in done.stdout.splitlines()
                  if line.startswith(prefix)}
    return found


@pytest.fixture(autouse=True)
def no_firewall_left_behind():
    """
    capsule leaves its firewall rules in place when it stops (recovered
    sessions stay fenced), and a capsule started as a user would (make run,
    an installed twistd) applies them for the shared session bridges with
    its own door port: a test takes away the rules its capsules left, so
    that the next test's sessions reach what that test serves them.
    """
    before = _fenced_bridges()
    yield
    for family, bridge in _fenced_bridges() - before:
        for command in removal_commands(bridge, family):
            subprocess.run(command, capture_output=True)


# -- the Kubernetes engine's tests: the stand-in API server ---------------------------


@pytest.fixture(scope="module")
def standin():
    """
    A stand-in Kubernetes API server (L{tests.support.kube_standin}) on
    127.0.0.1, its pods containers on the local engine; C{url} is where it
    answers.  Its containers are removed at the module's end.
    """
    from twisted.internet import reactor

    from tests.support.kube_standin import KubeStandin
    server = KubeStandin(reactor, docker_client().api)
    server.start()
    port = reactor.listenTCP(0, server.site, interface="127.0.0.1")
    server.url = f"http://127.0.0.1:{port.getHost().port}"
    yield server
    port.stopListening()
    server._poll.stop()
    server._thd_remove_all()
    server.exec_engine.stop()
    server._pool.stop()


def _kube_server(workdir, *args, image, instance, tuning, env, label):
    # The integration tests' server (small limits, admission off), for the
    # stand-in.
    return CapsuleServer(workdir, *args, instance=instance, tuning=tuning, env=env)


@pytest.fixture
def cluster(tmp_path):
    """
    A stand-in API server with real C{twistd capsule --engine kubernetes}
    servers on it (L{tests.support.kube_live.KubeCluster}): every server,
    pod, claim and volume it made is gone at the end, pass or fail.
    """
    import pytest_twisted
    from twisted.internet.defer import Deferred

    from tests.support.kube_live import KubeCluster
    made = KubeCluster(tmp_path, image=IMAGE, server_factory=_kube_server)
    yield made
    pytest_twisted.blockon(Deferred.fromCoroutine(made.close()))
