import os

import pytest

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


@pytest.fixture
def server(make_server):
    return make_server("--grace", "30", tuning={"cleanup-interval": 0.5})
