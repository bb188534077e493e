"""
The HTTP side in memory: requests go through the real Site (URL parsing,
the resource tree) over a StringTransport, against the fake engine.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from capsule import __version__
from capsule.core.spec import ContainerSpec
from capsule.core.errors import DockerUnavailable
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import Response, ask, ask_later, parse, send
from capsule.web.health import HEALTH_TIMEOUT
from capsule.web.site import make_site

IMAGE = "capsule-runtime:latest"


class Web:
    """
    The site of a capsule, and a way to ask it for a path.
    """

    def __init__(self, www, docker=None) -> None:
        self.reactor = MemoryReactorClock()
        self.docker = docker or FakeDockerAPI()
        spec = ContainerSpec(image=IMAGE)
        self.manager = SessionManager(self.docker, self.reactor,
                                      SessionConfig(spec=spec, instance="web-test"))
        self.site = make_site(self.manager, self.docker, self.reactor, str(www))

    def send(self, path: bytes, method: bytes = b"GET") -> StringTransport:
        return send(self.site, method, path)

    def get(self, path: bytes, method: bytes = b"GET") -> Response:
        """
        The answer, which must be complete at once.
        """
        return ask(self.site, method, path)

    async def get_file(self, path: bytes) -> Response:
        """
        The answer of a static file: Twisted sends files through the global
        cooperator, so this waits (up to a deadline) for the global reactor.
        """
        return await ask_later(self.site, "GET", path)


@pytest.fixture
def www(tmp_path):
    www = tmp_path / "www"
    (www / "node_modules" / "pkg").mkdir(parents=True)
    (www / "index.html").write_bytes(b"<!doctype html><title>capsule</title>")
    (www / "app.js").write_bytes(b"console.log('capsule');")
    (www / "node_modules" / "pkg" / "lib.js").write_bytes(b"// lib")
    (tmp_path / "secret.txt").write_bytes(b"not for the web")
    return www


@pytest.fixture
def web(www):
    return Web(www)


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _problems(logged):
    return [e for e in logged
            if e["log_level"] in (LogLevel.error, LogLevel.critical) or e.get("log_failure")]


# -- static files ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_static_files(web):
    status, headers, body = await web.get_file(b"/")
    assert (status, body) == (200, b"<!doctype html><title>capsule</title>")
    assert headers["content-type"].startswith("text/html")
    status, headers, body = await web.get_file(b"/app.js")
    assert (status, body) == (200, b"console.log('capsule');")
    assert (await web.get_file(b"/node_modules/pkg/lib.js"))[::2] == (200, b"// lib")


def test_no_directory_listing(web):
    status, _, body = web.get(b"/node_modules/")
    assert status == 403 and b"lib.js" not in body and b"pkg" not in body
    assert web.get(b"/node_modules/pkg/")[0] == 403


@pytest.mark.parametrize("path", [
    b"/index.html%00.js",
    b"/%00",
    b"/app.js%00",
    b"/node_modules%00/pkg/lib.js",
    b"/" + b"a" * 300,
    b"/" + b"%61" * 256,
    b"/%ff%fe",
    b"/%c0%af",                      # an overlong encoding of "/"
    b"/%c0%ae%c0%ae/secret.txt",     # ... and of "."
    b"/..%2Fsecret.txt",
    b"/%2e%2e/secret.txt",
    b"/node_modules/..%2F..%2Fsecret.txt",
    b"/node_modules/pkg/..%5C..%5C..%5Csecret.txt",
    b"/app.js/",
    b"/app.js/x",
    b"/missing.html",
], ids=lambda path: path.decode("ascii")[:40])
def test_a_bad_path_is_a_404_without_a_traceback(web, logged, path):
    status, _, body = web.get(path)
    assert status == 404
    assert b"not for the web" not in body
    assert _problems(logged) == []


def test_dot_dot_segments_stay_inside(web, logged):
    # The client may not normalise them away: the server must not climb.
    status, _, body = web.get(b"/../secret.txt")
    assert b"not for the web" not in body
    assert status == 404
    assert _problems(logged) == []


# -- /health ----------------------------------------------------------------------


def test_health_ok(web):
    status, headers, body = web.get(b"/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert json.loads(body) == {
        "status": "ok", "version": __version__, "docker": True,
        "docker_host": "fake://docker", "docker_version": "fake", "image": True,
        "image_name": IMAGE, "sessions": 0, "pool": {"size": 0, "target": 0, "ready": 0},
        "instance": "web-test"}


def test_health_unavailable(web):
    web.docker.reachable = False
    status, _, body = web.get(b"/health")
    answer = json.loads(body)
    assert status == 503
    assert (answer["status"], answer["docker"], answer["image"]) == ("unavailable", False, False)
    assert answer["error"] == "cannot reach the Docker engine at fake://docker"


def test_health_degraded_without_the_image(web):
    web.docker.images.clear()
    status, _, body = web.get(b"/health")
    answer = json.loads(body)
    assert status == 200
    assert (answer["status"], answer["docker"], answer["image"]) == ("degraded", True, False)
    assert answer["error"] == (f"the session image {IMAGE} is missing: build it with"
                               " `make image`")


class HeldDocker(FakeDockerAPI):
    """
    An engine whose pings wait until the test answers them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pings: list[Deferred] = []

    def ping(self):
        d = Deferred()
        self.pings.append(d)
        return d


def test_health_checks_share_one_probe_and_time_out(www):
    web = Web(www, HeldDocker())
    first, second = web.send(b"/health"), web.send(b"/health")
    assert len(web.docker.pings) == 1 and first.value() == second.value() == b""
    web.reactor.advance(HEALTH_TIMEOUT)
    for transport in (first, second):
        status, _, body = parse(transport.value())
        assert status == 503
        assert json.loads(body)["error"] == f"Docker did not answer within {HEALTH_TIMEOUT:g} s"
    # The hung ping is not asked again while it runs.
    third = web.send(b"/health")
    assert len(web.docker.pings) == 1
    web.docker.pings[0].callback({"Version": "27.0"})
    status, _, body = parse(third.value())
    assert status == 200 and json.loads(body)["docker_version"] == "27.0"
    fourth = web.send(b"/health")
    assert len(web.docker.pings) == 2 and fourth.value() == b""


def test_health_says_why_the_image_could_not_be_checked(www):
    docker = FakeDockerAPI()
    docker.image_exists = lambda image: fail(DockerUnavailable("the engine went away"))
    web = Web(www, docker)
    status, _, body = web.get(b"/health")
    answer = json.loads(body)
    assert status == 200
    assert (answer["status"], answer["docker"], answer["image"]) == ("degraded", True, False)
    assert answer["error"] == "could not check the image: the engine went away"


def test_health_of_a_client_that_left(www, logged):
    web = Web(www, HeldDocker())
    transport = web.send(b"/health")
    transport.channel.connectionLost(Failure(ConnectionDone()))
    web.docker.pings[0].callback({"Version": "27.0"})
    assert transport.value() == b""
    assert _problems(logged) == []


# -- /api/export ------------------------------------------------------------------


@pytest.mark.parametrize("path, code", [
    (b"/api/export/not-a-uuid", "invalid_session_id"),
    (b"/api/export/..%2F..%2Fetc%2Fpasswd", "invalid_session_id"),
    (b"/api/export/%00", "invalid_session_id"),
    (b"/api/export/%ff", "invalid_session_id"),
    (b"/api/export/00000000-0000-4000-8000-000000000000", "session_not_found"),
])
def test_export_of_bad_and_unknown_ids_is_a_json_404(web, logged, path, code):
    status, headers, body = web.get(path)
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == code
    assert _problems(logged) == []


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_export_of_a_live_session_by_another_method_is_a_json_405(web, method):
    from tests.support.fakes import RecordingClient
    session = web.manager.create(RecordingClient(), 80, 24)
    status, headers, body = web.get(b"/api/export/" + session.id.encode(), method)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert json.loads(body) == {"error": f"{method.decode()} is not allowed here; use GET",
                                "code": "method_not_allowed"}


def test_export_without_an_id(web):
    status, headers, body = web.get(b"/api/export")
    assert status == 404 and json.loads(body)["code"] == "not_found"
