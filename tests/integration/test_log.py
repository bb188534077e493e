"""
The default foreground log tells an operator what happened to sessions
(opened, ended and why, refused), not which files the page loaded nor each
connection to Docker; `--access-log` brings every request's line back.
"""

import re

from tests.support.httpclient import request

from .harness import BlockingTerminal, wait_for


def load_page(server) -> list[str]:
    """
    The page and every file it names, as a browser loads them; their paths.
    """
    status, _, body = request(server.url + "/")
    assert status == 200
    paths = ["/"]
    for name in re.findall(rb'(?:src|href)="/?([^"#]+)"', body):
        path = "/" + name.decode()
        if path.startswith("//") or "://" in path:
            continue
        assert request(server.url + path)[0] == 200, path
        paths.append(path)
    assert any(p.startswith("/node_modules/") for p in paths)
    assert any(p.startswith("/js/") or p == "/app.js" for p in paths)
    return paths


def use_sessions(server) -> tuple[str, str]:
    """
    One session opened and ended; one refused (the server is full).
    """
    first = BlockingTerminal(server.ws_url)
    session_id = first.start()
    second = BlockingTerminal(server.ws_url)
    try:
        second.send({"type": "resize", "cols": 80, "rows": 24})
        refused = second.next("error")
    except Exception as e:  # the refusal may come as the close itself
        refused = {"error": str(e)}
    finally:
        second.close()
    first.exit()
    return session_id, str(refused)


def test_the_default_log_is_about_sessions(make_server):
    server = make_server("--pool-size", "1", "--max-sessions", "1")
    wait_for(server.settled, 30, "the warm pool to fill")
    paths = load_page(server)
    session_id, refused = use_sessions(server)
    wait_for(lambda: f"session {session_id[:8]} ended" in server.log(), 20,
             "the session's end in the log")
    assert "server_full" in refused or "full" in refused, refused
    log = server.log()
    for path in paths:
        assert f'"GET {path} HTTP/1.1"' not in log, path
    assert "Starting factory" not in log and "Stopping factory" not in log, log
    assert re.search(rf"session {session_id[:8]} started in \d+ ms \(warm", log), log
    assert re.search(rf"session {session_id[:8]} ended: .*exit", log), log
    assert re.search(r"refused .*(full|max-sessions)", log), log


def test_access_log_puts_every_request_back(make_server):
    server = make_server("--pool-size", "0", "--access-log")
    paths = load_page(server)
    wait_for(lambda: all(f'"GET {p}' in server.log() for p in paths), 10,
             "an access line for each file")
    assert "Starting factory" not in server.log()
