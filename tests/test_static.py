"""
The page's static files in memory: compression, cache validators, the
versioned node_modules URLs, ranges and the cache's bound, through capsule's
whole site (so the security headers are checked too).
"""

import base64
import gzip
import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath
from twisted.web.http import datetimeToString

from capsule.web import static
from capsule.core.spec import ContainerSpec
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.web.static import StaticCache
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import Response, ask_later
from capsule.web.site import make_site

APP = b"// capsule's app\n" + b"".join(b"console.log('line %d');\n" % i for i in range(200))
LIB = b"/* lib */\n" + b"function f(x) { return x + 1; }\n" * 100
CSS = b".xterm { color: red; }\n" * 40
PNG = bytes(range(256)) * 8
INDEX = (b'<!doctype html><title>capsule</title>\n'
         b'<link rel="stylesheet" href="node_modules/pkg/css/lib.css">\n'
         b'<script src="node_modules/pkg/lib.js" defer></script>\n'
         b'<script src="/node_modules/pkg/lib.js" defer></script>\n'
         b'<script src="node_modules/pkg/missing.js" defer></script>\n'
         b'<script src="node_modules/../app.js" defer></script>\n'
         b'<script src="node_modules/pkg/lib.js?v=old" defer></script>\n'
         b"<script>var s = 'node_modules/pkg/lib.js';</script>\n"
         b'<script src="app.js" defer></script>\n' + b"<!-- padding -->\n" * 20)
MTIME = 1_700_000_000
SECURITY = ("content-security-policy", "x-content-type-options", "x-frame-options",
            "referrer-policy")


def version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.fixture
def www(tmp_path):
    www = tmp_path / "www"
    (www / "node_modules" / "pkg" / "css").mkdir(parents=True)
    files = {"index.html": INDEX, "app.js": APP, "tiny.js": b"x=1", "logo.png": PNG,
             "node_modules/pkg/lib.js": LIB, "node_modules/pkg/css/lib.css": CSS,
             "node_modules/pkg/packed.js.gz": gzip.compress(LIB, mtime=0)}
    for name, data in files.items():
        (www / name).write_bytes(data)
        os.utime(www / name, (MTIME, MTIME))
    (tmp_path / "secret.txt").write_bytes(b"not for the web")
    return www


class Site:
    def __init__(self, www) -> None:
        docker = FakeDockerAPI()
        manager = SessionManager(docker, MemoryReactorClock(), SessionConfig(
            spec=ContainerSpec(image="capsule-runtime:latest"), instance="static-test"))
        self.site = make_site(manager, docker, MemoryReactorClock(), str(www))

    async def ask(self, path: bytes, method: bytes = b"GET", **headers: str) -> Response:
        """
        The whole answer: Twisted sends a file through the global
        cooperator, so this waits (up to a deadline) for the global reactor.
        """
        return await ask_later(self.site, method, path,
                               [(name.replace("_", "-"), value) for name, value in headers.items()])


@pytest.fixture
def site(www):
    return Site(www)


def secured(answer: Response) -> None:
    missing = [name for name in SECURITY if answer[name] is None]
    assert missing == []


# -- compression --


@pytest_twisted.ensureDeferred
async def test_text_is_gzipped_for_a_client_that_accepts_it(site):
    answer = await site.ask(b"/app.js", accept_encoding="gzip, deflate, br")
    assert answer.status == 200
    assert answer["content-encoding"] == "gzip"
    assert answer["vary"] == "Accept-Encoding"
    assert gzip.decompress(answer.body) == APP
    assert int(answer["content-length"]) == len(answer.body) < len(APP)
    assert answer["content-type"] == "text/javascript"
    assert answer["etag"] == '"%s"' % hashlib.sha256(answer.body).hexdigest()[:32]
    assert answer["last-modified"] == datetimeToString(MTIME).decode()
    assert answer["cache-control"] == "no-cache"
    secured(answer)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", ["js/module.js", "js/module.mjs"])
async def test_the_pages_modules_are_javascript_and_revalidated(www, name):
    """
    A browser runs a module script only when it comes with a JavaScript
    type; the page's modules are its own files, revalidated like app.js.
    """
    (www / "js").mkdir()
    (www / name).write_bytes(APP)
    site = Site(www)
    answer = await site.ask(b"/" + name.encode(), accept_encoding="gzip")
    assert answer.status == 200
    assert answer["content-type"] in ("text/javascript", "application/javascript")
    assert answer["content-encoding"] == "gzip"
    assert gzip.decompress(answer.body) == APP
    assert answer["cache-control"] == "no-cache"
    secured(answer)
    again = await site.ask(b"/" + name.encode(), accept_encoding="gzip", if_none_match=answer["etag"])
    assert (again.status, again.body) == (304, b"")


@pytest_twisted.ensureDeferred
async def test_plain_for_a_client_that_does_not(site):
    answer = await site.ask(b"/app.js")
    assert (answer.status, answer.body, answer["content-encoding"]) == (200, APP, None)
    assert answer["vary"] == "Accept-Encoding"
    assert answer["etag"] == '"%s"' % hashlib.sha256(APP).hexdigest()[:32]
    assert answer["content-length"] == str(len(APP))
    assert answer["accept-ranges"] == "bytes"


@pytest.mark.parametrize("accept, compressed", [
    ("gzip", True),
    ("GZIP;q=0.5", True),
    ("x-gzip", True),
    ("*", True),
    ("br, *;q=0.1", True),
    ("gzip;q=0", False),
    ("*, gzip;q=0", False),
    ("*;q=0", False),
    ("identity", False),
    ("deflate, br", False),
    ("gzip;q=nonsense", False),
    (";;;,,,", False),
    ("gzip, " + "x" * 5000, False),
])
@pytest_twisted.ensureDeferred
async def test_accept_encoding(site, accept, compressed):
    answer = await site.ask(b"/app.js", accept_encoding=accept)
    assert answer.status == 200
    assert (answer["content-encoding"] == "gzip") is compressed
    assert (gzip.decompress(answer.body) if compressed else answer.body) == APP


@pytest_twisted.ensureDeferred
async def test_small_files_and_binary_types_are_sent_as_they_are(site):
    for path, data in ((b"/tiny.js", b"x=1"), (b"/logo.png", PNG)):
        answer = await site.ask(path, accept_encoding="gzip")
        assert (answer.status, answer.body) == (200, data)
        assert answer["content-encoding"] is None and answer["vary"] is None
        assert answer["etag"] == '"%s"' % hashlib.sha256(data).hexdigest()[:32]


@pytest_twisted.ensureDeferred
async def test_a_gz_file_is_sent_as_it_is(site):
    answer = await site.ask(b"/node_modules/pkg/packed.js.gz", accept_encoding="gzip")
    assert answer.status == 200
    assert answer["content-encoding"] == "gzip"
    assert gzip.decompress(answer.body) == LIB
    assert answer["etag"] is None and answer["cache-control"] == "no-cache"


# -- validators --


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
@pytest_twisted.ensureDeferred
async def test_if_none_match_is_a_304_without_a_body(site, encoding):
    first = await site.ask(b"/app.js", accept_encoding=encoding)
    etag = first["etag"]
    for condition in (etag, "W/" + etag, f'"other", {etag}', "*"):
        answer = await site.ask(b"/app.js", accept_encoding=encoding, if_none_match=condition)
        assert (answer.status, answer.body) == (304, b"")
        assert answer["content-length"] is None and answer["content-type"] is None
        assert answer["etag"] == etag
        assert answer["cache-control"] == "no-cache"
        assert answer["vary"] == "Accept-Encoding"
        assert answer["last-modified"] == first["last-modified"]
        secured(answer)


@pytest_twisted.ensureDeferred
async def test_the_etag_is_per_encoding(site):
    packed = await site.ask(b"/app.js", accept_encoding="gzip")
    plain = await site.ask(b"/app.js")
    assert packed["etag"] != plain["etag"]
    answer = await site.ask(b"/app.js", if_none_match=packed["etag"])
    assert (answer.status, answer.body) == (200, APP)
    answer = await site.ask(b"/app.js", accept_encoding="gzip", if_none_match=plain["etag"])
    assert answer.status == 200 and gzip.decompress(answer.body) == APP


@pytest_twisted.ensureDeferred
async def test_if_modified_since(site):
    same = datetimeToString(MTIME).decode()
    answer = await site.ask(b"/app.js", if_modified_since=same)
    assert (answer.status, answer.body) == (304, b"")
    answer = await site.ask(b"/app.js", if_modified_since=datetimeToString(MTIME - 1).decode())
    assert (answer.status, answer.body) == (200, APP)
    answer = await site.ask(b"/app.js", if_modified_since="yesterday, maybe")
    assert (answer.status, answer.body) == (200, APP)
    # If-None-Match wins when both are sent.
    answer = await site.ask(b"/app.js", if_modified_since=same, if_none_match='"stale"')
    assert (answer.status, answer.body) == (200, APP)


@pytest_twisted.ensureDeferred
async def test_an_overlong_condition_is_ignored(site):
    etag = (await site.ask(b"/app.js"))["etag"]
    answer = await site.ask(b"/app.js", if_none_match=etag + ", " + '"x", ' * 1000)
    assert (answer.status, answer.body) == (200, APP)


@pytest_twisted.ensureDeferred
async def test_a_changed_file_has_new_validators(site, www):
    before = await site.ask(b"/app.js", accept_encoding="gzip")
    (www / "app.js").write_bytes(APP + b"// more\n")
    os.utime(www / "app.js", (MTIME + 10, MTIME + 10))
    answer = await site.ask(b"/app.js", accept_encoding="gzip", if_none_match=before["etag"])
    assert answer.status == 200
    assert gzip.decompress(answer.body) == APP + b"// more\n"
    assert answer["etag"] != before["etag"]
    assert answer["last-modified"] == datetimeToString(MTIME + 10).decode()


# -- HEAD --


@pytest.mark.parametrize("path, encoding", [
    (b"/app.js", "gzip"), (b"/app.js", "identity"), (b"/", "gzip"), (b"/", "identity"),
    (b"/logo.png", "gzip")])
@pytest_twisted.ensureDeferred
async def test_head_says_what_get_would_send(site, path, encoding):
    get = await site.ask(path, accept_encoding=encoding)
    head = await site.ask(path, b"HEAD", accept_encoding=encoding)
    assert (head.status, head.body) == (200, b"")
    for name in ("content-length", "content-type", "content-encoding", "etag",
                 "last-modified", "cache-control", "vary"):
        assert head[name] == get[name], name
    assert int(head["content-length"]) == len(get.body)
    secured(head)


# -- ranges --


@pytest_twisted.ensureDeferred
async def test_a_range_is_of_the_plain_file(site):
    plain = await site.ask(b"/app.js")
    answer = await site.ask(b"/app.js", accept_encoding="gzip", range="bytes=3-9")
    assert (answer.status, answer.body) == (206, APP[3:10])
    assert answer["content-range"] == f"bytes 3-9/{len(APP)}"
    assert answer["content-encoding"] is None
    assert answer["etag"] == plain["etag"]
    secured(answer)


@pytest_twisted.ensureDeferred
async def test_if_range(site):
    plain = await site.ask(b"/app.js")
    packed = await site.ask(b"/app.js", accept_encoding="gzip")
    for current in (plain["etag"], plain["last-modified"]):
        answer = await site.ask(b"/app.js", accept_encoding="gzip", range="bytes=0-4",
                                if_range=current)
        assert (answer.status, answer.body) == (206, APP[:5])
    for stale in (packed["etag"], "W/" + plain["etag"], datetimeToString(MTIME - 60).decode()):
        answer = await site.ask(b"/app.js", accept_encoding="gzip", range="bytes=0-4",
                                if_range=stale)
        assert answer.status == 200
        assert gzip.decompress(answer.body) == APP


@pytest_twisted.ensureDeferred
async def test_a_malformed_range_is_the_whole_file(site):
    answer = await site.ask(b"/app.js", range="bytes=banana")
    assert (answer.status, answer.body) == (200, APP)


@pytest_twisted.ensureDeferred
async def test_many_ranges_are_the_whole_file(site):
    few = ",".join(f"{i}-{i}" for i in range(static.MAX_RANGES))
    answer = await site.ask(b"/app.js", range=f"bytes={few}")
    assert answer.status == 206
    assert answer["content-type"].startswith("multipart/byteranges")
    many = ",".join(f"{i}-{i}" for i in range(static.MAX_RANGES + 1))
    answer = await site.ask(b"/app.js", accept_encoding="gzip", range=f"bytes={many}")
    assert answer.status == 200 and gzip.decompress(answer.body) == APP
    answer = await site.ask(b"/node_modules/pkg/packed.js.gz", range=f"bytes={many}")
    assert answer.status == 200 and gzip.decompress(answer.body) == LIB


@pytest_twisted.ensureDeferred
async def test_an_unsatisfiable_range_is_a_416(site):
    answer = await site.ask(b"/app.js", range=f"bytes={len(APP) + 10}-")
    assert answer.status == 416
    secured(answer)


# -- versioned node_modules --


def rewritten_index() -> bytes:
    lib, css = version(LIB).encode(), version(CSS).encode()
    return (INDEX
            .replace(b'"node_modules/pkg/css/lib.css"', b'"node_modules/pkg/css/lib.css?v=' + css + b'"')
            .replace(b'"node_modules/pkg/lib.js"', b'"node_modules/pkg/lib.js?v=' + lib + b'"')
            .replace(b'"/node_modules/pkg/lib.js"', b'"/node_modules/pkg/lib.js?v=' + lib + b'"')
            .replace(b"'node_modules/pkg/lib.js'", b"'node_modules/pkg/lib.js?v=" + lib + b"'"))


@pytest_twisted.ensureDeferred
async def test_the_page_names_node_modules_files_by_version(site):
    answer = await site.ask(b"/")
    assert answer.status == 200
    assert answer.body == rewritten_index()
    # What is not a file under node_modules is left alone.
    for kept in (b'"node_modules/pkg/missing.js"', b'"node_modules/../app.js"',
                 b'"node_modules/pkg/lib.js?v=old"', b'"app.js"'):
        assert kept in answer.body
    assert answer["cache-control"] == "no-cache"
    assert answer["accept-ranges"] is None
    assert answer["etag"] == '"%s"' % hashlib.sha256(answer.body).hexdigest()[:32]
    packed = await site.ask(b"/index.html", accept_encoding="gzip")
    assert gzip.decompress(packed.body) == rewritten_index()
    again = await site.ask(b"/", accept_encoding="gzip", if_none_match=packed["etag"])
    assert (again.status, again.body) == (304, b"")
    # A range of the page is answered with the whole page.
    ranged = await site.ask(b"/", range="bytes=0-9")
    assert (ranged.status, ranged.body) == (200, rewritten_index())


@pytest_twisted.ensureDeferred
async def test_a_versioned_file_is_immutable_under_its_version(site):
    path = b"/node_modules/pkg/lib.js"
    current = path + b"?v=" + version(LIB).encode()
    answer = await site.ask(current, accept_encoding="gzip")
    assert answer.status == 200 and gzip.decompress(answer.body) == LIB
    assert answer["cache-control"] == "max-age=31536000, immutable"
    answer = await site.ask(current, accept_encoding="gzip", if_none_match=answer["etag"])
    assert (answer.status, answer["cache-control"]) == (304, "max-age=31536000, immutable")
    for other in (path, path + b"?v=0123456789abcdef", current + b"&v=" + version(LIB).encode()):
        assert (await site.ask(other))["cache-control"] == "no-cache", other
    # The page's own files are never immutable, whatever the query says.
    answer = await site.ask(b"/app.js?v=" + version(APP).encode())
    assert answer["cache-control"] == "no-cache"


@pytest_twisted.ensureDeferred
async def test_a_new_node_modules_file_changes_the_page(site, www):
    before = await site.ask(b"/")
    new = LIB + b"// 1.0.1\n"
    (www / "node_modules/pkg/lib.js").write_bytes(new)
    os.utime(www / "node_modules/pkg/lib.js", (MTIME + 100, MTIME + 100))
    answer = await site.ask(b"/", if_none_match=before["etag"])
    assert answer.status == 200
    assert b'"node_modules/pkg/lib.js?v=' + version(new).encode() + b'"' in answer.body
    assert version(LIB).encode() not in answer.body
    assert answer["etag"] != before["etag"]
    # The page changed when the file did.
    assert answer["last-modified"] == datetimeToString(MTIME + 100).decode()
    assert (await site.ask(b"/", if_modified_since=before["last-modified"])).status == 200


# -- inline scripts --


BOOT = (b"\n  window.boot = new WebSocket('ws://' + location.host + '/ws');"
        b" window.lib = 'node_modules/pkg/lib.js';\n")


@pytest_twisted.ensureDeferred
async def test_the_pages_inline_scripts_are_allowed_by_hash(site, www):
    page = (b"<!doctype html><script>" + BOOT + b"</script>"
            b"<SCRIPT type=module>import('./app.js')</SCRIPT >"
            b"<script src=\"app.js\"></script><script>" + BOOT + b"</script>")
    (www / "index.html").write_bytes(page)
    answer = await site.ask(b"/")
    served_boot = BOOT.replace(b"lib.js", b"lib.js?v=" + version(LIB).encode())
    assert answer.body == page.replace(BOOT, served_boot)

    def allowed(script: bytes) -> str:
        return "'sha256-%s'" % base64.b64encode(hashlib.sha256(script).digest()).decode()

    policy = answer["content-security-policy"]
    directive = [d.strip() for d in policy.split(";") if d.strip().startswith("script-src")]
    module = allowed(b"import('./app.js')")
    assert directive == [f"script-src 'self' 'wasm-unsafe-eval' {allowed(served_boot)} {module}"]
    # Only the page's own scripts: the rest of the policy is as it was.
    plain = await site.ask(b"/app.js")
    assert policy.replace(" " + directive[0].split(" ", 3)[3], "") == plain["content-security-policy"]
    assert (await site.ask(b"/", if_none_match=answer["etag"]))["content-security-policy"] == policy


def test_inline_script_hashes():
    assert static.inline_script_hashes(b"<p>no scripts</p><script src=x.js></script>") == ()
    assert static.inline_script_hashes(b"<script></script><script>\n</script>") == (
        b"'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
        b"'sha256-AbpHGcgLb+kRsJGnwFEktk7uzpZOCcBY74+YBdrKVGs='")


# -- the cache --


def test_the_cache_keeps_one_entry_per_file_and_reuses_it(www):
    cache = StaticCache(FilePath(str(www)))
    app = FilePath(str(www / "app.js"))
    first = cache.entry(app, "text/javascript")
    assert cache.entry(app, "text/javascript") is first
    assert (len(cache), cache.held) == (1, first.gzip.length)
    (www / "app.js").write_bytes(APP[:-1])
    second = cache.entry(app, "text/javascript")
    assert second is not first and second.version == version(APP[:-1])
    assert (len(cache), cache.held) == (1, second.gzip.length)


def test_the_cache_is_bounded(www):
    files = [FilePath(str(www / name)) for name in
             ("app.js", "node_modules/pkg/lib.js", "node_modules/pkg/css/lib.css")]
    cache = StaticCache(FilePath(str(www)), max_files=2)
    entries = [cache.entry(f, "text/javascript") for f in files]
    assert len(cache) == 2
    assert cache.held == entries[1].gzip.length + entries[2].gzip.length
    # The least recently used went first.
    assert cache.entry(files[0], "text/javascript") is not entries[0]
    by_bytes = StaticCache(FilePath(str(www)), max_bytes=entries[0].gzip.length - 1)
    entry = by_bytes.entry(files[0], "text/javascript")
    assert entry.gzip is not None and (len(by_bytes), by_bytes.held) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_a_large_file_is_served_as_twisted_serves_it(site, www, monkeypatch):
    monkeypatch.setattr(static, "MAX_CACHED_FILE", len(APP) - 1)
    answer = await site.ask(b"/app.js", accept_encoding="gzip")
    assert (answer.status, answer.body) == (200, APP)
    assert answer["etag"] is None and answer["content-encoding"] is None
    assert answer["cache-control"] == "no-cache"
    assert answer["last-modified"] == datetimeToString(MTIME).decode()
    ranged = await site.ask(b"/app.js", range="bytes=0-1")
    assert (ranged.status, ranged.body) == (206, APP[:2])


def test_the_pages_files_get_no_access_line_unless_they_fail_or_asked():
    from types import SimpleNamespace

    from capsule.web.site import CapsuleSite, logged_by_default
    from twisted.web.resource import Resource

    def ask(method, path, code):
        return SimpleNamespace(method=method, path=path, code=code)
    for quiet in (ask(b"GET", b"/", 200), ask(b"GET", b"/js/tar.js", 304),
                  ask(b"HEAD", b"/node_modules/@xterm/xterm/lib/xterm.js", 200),
                  ask(b"GET", b"/health", 200), ask(b"GET", b"/metrics", 200)):
        assert not logged_by_default(quiet), quiet
    for told in (ask(b"GET", b"/nope.js", 404), ask(b"GET", b"/health", 503),
                 ask(b"POST", b"/api/sessions", 201), ask(b"GET", b"/api/sessions", 200),
                 ask(b"GET", b"/ws", 101), ask(b"POST", b"/login", 303),
                 ask(b"GET", b"/login", 200), ask(b"PUT", b"/", 405)):
        assert logged_by_default(told), told

    written = []
    for access_log, expected in ((False, 1), (True, 3)):
        written.clear()
        site = CapsuleSite(Resource(), access_log=access_log,
                           logFormatter=lambda _, request: request.path.decode())
        site._logFile = SimpleNamespace(write=written.append)
        site._logDateTime = "-"
        for request in (ask(b"GET", b"/app.js", 200), ask(b"GET", b"/style.css", 304),
                        ask(b"POST", b"/api/sessions", 201)):
            site.log(request)
        assert len(written) == expected, written
    assert CapsuleSite.noisy is False
