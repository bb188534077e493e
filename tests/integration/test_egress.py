"""
Egress policies end to end: a real twistd capsule, real containers on the
fenced network (capsule-fenced: internal, no route out), curl inside them
going through the egress proxy behind the session door.

The allowed upstreams: a local HTTP server on 127.0.0.2 (named by the
operator with --egress-allow-address and --egress-port), and pypi.org over
CONNECT (the one internet host this machine and CI reach).
"""

from __future__ import annotations

import http.server
import threading
import urllib.request

import pytest
import pytest_twisted

import docker

from capsule.engine.network import FENCED_NETWORK, FENCED_NETWORK_OPTIONS, NETWORK_LABELS

from .harness import IMAGE, WSClient, docker_client, free_port, session_container

UPSTREAM = "127.0.0.2"


@pytest.fixture
def upstream():
    """
    A small HTTP server on 127.0.0.2 that says hello.
    """
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello from upstream\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer((UPSTREAM, 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def fenced_gateway() -> str:
    """
    The fenced network's gateway (the door's address there): made as
    capsule makes it, when missing, so that a profile can name it.
    """
    api = docker_client().api
    try:
        network = api.inspect_network(FENCED_NETWORK)
    except docker.errors.NotFound:
        try:
            api.create_network(FENCED_NETWORK, driver="bridge",
                               options=dict(FENCED_NETWORK_OPTIONS),
                               labels=dict(NETWORK_LABELS), internal=True)
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
        network = api.inspect_network(FENCED_NETWORK)
    return network["IPAM"]["Config"][0]["Gateway"]


@pytest_twisted.ensureDeferred
async def test_a_fenced_session_reaches_its_list_and_nothing_else(make_server, tmp_path,
                                                                   upstream):
    door = free_port()
    # The host's own address (the door's, on the fenced network) is listed:
    # refused all the same.
    gateway = fenced_gateway()
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[profiles.web]\nimage = "{IMAGE}"\n'
                        f'egress = ["{UPSTREAM}", "pypi.org", "localhost", "169.254.169.254",'
                        f' "{gateway}"]\n')
    server = make_server("--pool-size", "0", "--door-port", str(door), "--profiles",
                         str(profiles), "--egress-allow-address", f"{UPSTREAM}/32",
                         "--egress-port", str(upstream))
    client = await WSClient.connect(server.ws_url + "?profile=web")
    session_id = await client.start()
    container = docker_client().containers.get(session_container(session_id))
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [FENCED_NETWORK]
    out = await client.run('echo "[$HTTPS_PROXY] [$http_proxy] [$NO_PROXY]"')
    assert out.strip() == (f"[http://{gateway}:{door}] [http://{gateway}:{door}]"
                           f" [{gateway},localhost,127.0.0.1]")

    # An allowed host through the proxy: plain HTTP, and CONNECT (TLS).
    out = await client.run(f"curl -sS --max-time 20 http://{UPSTREAM}:{upstream}/")
    assert out.strip() == "hello from upstream"
    # (-k: where the machine's own network intercepts TLS, the image does
    # not know its authority; the tunnel is what is tested.)
    out = await client.run("curl -sSk --max-time 60 -o /dev/null -w 'code=%{http_code}'"
                           " https://pypi.org/simple/six/", timeout=90)
    assert "code=200" in out

    # A refused host: the session reads which host and which setting.
    out = await client.run("curl -sS --max-time 20 http://example.com/")
    assert ("capsule: egress to example.com refused: profile web allows only its egress list;"
            " add example.com to egress in the profiles file") in out
    notice = await client.next("notice")
    assert notice["code"] == "egress_refused" and "example.com" in notice["message"]
    out = await client.run("curl -sv --max-time 20 https://example.com/ 2>&1 | tr -d '\\r'")
    assert "403" in out and "X-Capsule-Egress: capsule: egress to example.com refused" in out

    # Listed, but never reached: the metadata address, a name resolving to
    # loopback, the host's own address; a port not allowed.
    out = await client.run("curl -sS --max-time 20 http://169.254.169.254/latest/meta-data/")
    assert "169.254.169.254 is a link-local address" in out
    out = await client.run(f"curl -sS --max-time 20 --noproxy '' -x $HTTP_PROXY"
                           f" http://localhost:{upstream}/")
    assert "refused" in out and "loopback" in out and "hello" not in out
    out = await client.run(f"curl -sS --max-time 20 --noproxy '' -x $HTTP_PROXY"
                           f" http://{gateway}/")
    assert f"egress to {gateway} refused: {gateway} is a private address" in out
    out = await client.run(f"curl -sS --max-time 20 http://{UPSTREAM}:1/")
    assert "port 1 refused" in out

    # Without the proxy's variables: no route out, to an address or a name.
    await client.run("unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY")
    for target in (f"http://{UPSTREAM}:{upstream}/", "https://151.101.0.223/",
                   "https://pypi.org/simple/six/", "http://169.254.169.254/"):
        out = await client.run(f"curl -sS --max-time 10 -o /dev/null {target}; echo rc=$?")
        assert "rc=0" not in out, target

    # An open session's way through the proxy holds the same floor.
    shell = await WSClient.connect(server.ws_url)
    await shell.start()
    capsule_gateway = docker_client().api.inspect_network("capsule")["IPAM"]["Config"][0][
        "Gateway"]
    out = await shell.run(f"curl -sS --max-time 20 -x http://{capsule_gateway}:{door}"
                          f" http://169.254.169.254/latest/meta-data/")
    assert "169.254.169.254 is a link-local address" in out
    await shell.exit()

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    assert 'capsule_egress_refusals_total{reason="policy"} 2.0' in metrics
    assert 'capsule_egress_refusals_total{reason="address"} 4.0' in metrics
    assert 'capsule_egress_refusals_total{reason="port"} 1.0' in metrics
    await client.exit()


@pytest_twisted.ensureDeferred
async def test_a_fenced_session_without_network_goes_out_through_its_keeper(
        make_server, tmp_path, upstream):
    # No network at all: the proxy is 127.0.0.1 in the container, carried
    # by the keeper's channel to the door, which knows the session by it.
    door = free_port()
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[profiles.cut]\nimage = "{IMAGE}"\nnetwork = "none"\n'
                        f'egress = ["{UPSTREAM}"]\n')
    server = make_server("--pool-size", "0", "--door-port", str(door), "--profiles",
                         str(profiles), "--egress-allow-address", f"{UPSTREAM}/32",
                         "--egress-port", str(upstream))
    client = await WSClient.connect(server.ws_url + "?profile=cut")
    await client.start()
    out = await client.run('echo "[$HTTP_PROXY]"')
    assert out.strip() == f"[http://127.0.0.1:{door}]"
    out = await client.run(f"curl -sS --max-time 20 http://{UPSTREAM}:{upstream}/")
    assert out.strip() == "hello from upstream"
    out = await client.run("curl -sS --max-time 20 http://example.com/")
    assert "capsule: egress to example.com refused: profile cut allows only its egress" in out
    await client.exit()
