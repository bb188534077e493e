"""
What one session, or the server's log, tells of other sessions' ids,
against the real engine: a full session id opens the session to whoever
holds it (with no users), so neither the shared network's names nor the
log may carry one.
"""

from __future__ import annotations

import io
import json
import pwd
import re
import shutil
import signal
import tarfile

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.support.httpclient import request

from .harness import WSClient, docker_client, eventually, session_container, sleep

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def ip_of(session_id: str) -> str:
    container = docker_client().api.inspect_container(session_container(session_id))
    return container["NetworkSettings"]["Networks"]["capsule"]["IPAddress"]


@pytest_twisted.ensureDeferred
async def test_the_network_names_no_session(make_server):
    """
    Docker's DNS on the sessions' network answers a reverse lookup of a
    container's address with its name: another session's id must not be
    in it, nor in a session's own host name.
    """
    server = make_server("--pool-size", "0")
    me = await WSClient.connect(server.ws_url)
    mine = await me.start()
    other = await WSClient.connect(server.ws_url)
    theirs = await other.start()
    ip = await deferToThread(ip_of, theirs)
    looked_up = await me.run(f"getent hosts {ip}; echo rc=$?; cat /etc/hostname")
    # The lookup answers (the name is there to be read), and says nothing.
    assert f"{ip} " in looked_up and "rc=0" in looked_up, looked_up
    assert theirs not in looked_up and theirs[:8] not in looked_up, looked_up
    assert mine not in looked_up, looked_up
    assert "capsule" in (await other.run("cat /etc/hostname"))
    await me.close()
    await other.close()


def call(server, path, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {} if data is None else {"Content-Type": "application/json"}
    status, _, payload = request(server.url + path, method, headers, data, timeout=60)
    return status, payload


@pytest_twisted.ensureDeferred
async def test_the_log_prints_no_full_session_id(make_server, tmp_path):
    """
    A session's whole life, through every door (created warm and cold,
    reconnected, taken over, exported, exec'd into, uploaded into, asked
    for by a wrong id, deleted, ended by the admin API, expired, its
    recording failing, its container a leftover at the next start), leaves
    no full session id in the log.
    """
    records = tmp_path / "records"
    server = make_server("--pool-size", "1", "--grace", "1", "--record", str(records),
                         "--retention", "0", tuning={"cleanup-interval": 0.5})
    # Recordings cannot be written: the directory is a file now.
    shutil.rmtree(records)
    records.write_text("not a directory")
    ids = []
    warm = await WSClient.connect(server.ws_url)
    ids.append(await warm.start())
    cold = await WSClient.connect(server.ws_url)
    ids.append(await cold.start())
    await cold.close()
    again = await WSClient.connect(server.ws_url, ids[1])
    await again.next("connected")
    taker = await WSClient.connect(server.ws_url, ids[1])
    await taker.next("connected")
    status, body = await deferToThread(call, server, f"/api/export/{ids[1]}")
    assert status == 200
    status, body = await deferToThread(call, server, "/api/sessions", "POST",
                                       {"cols": 80, "rows": 24})
    assert status == 201, body
    ids.append(json.loads(body)["id"])
    status, body = await deferToThread(call, server, f"/api/sessions/{ids[2]}/exec", "POST",
                                       {"argv": ["true"]})
    assert status == 200, body
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        member = tarfile.TarInfo("note.txt")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"hello"))
    status, body = await deferToThread(
        lambda: request(server.url + f"/api/sessions/{ids[2]}/workspace", "POST",
                        {"Content-Type": "application/gzip"}, archive.getvalue(), timeout=60)[::2])
    assert status == 200, body
    status, body = await deferToThread(call, server, f"/api/sessions/{ids[2]}", "DELETE")
    assert status in (200, 204), body
    # One more, ended by the admin API (loopback).
    status, body = await deferToThread(call, server, "/api/sessions", "POST",
                                       {"cols": 80, "rows": 24})
    assert status == 201, body
    ids.append(json.loads(body)["id"])
    status, body = await deferToThread(call, server, f"/api/admin/sessions/{ids[-1]}",
                                       "DELETE")
    assert status == 200, body
    # Ids that are no session's, through each door.
    wrong = "0123abcd-0000-4000-8000-000000000000"
    for method, path in (("GET", f"/api/sessions/{wrong}"),
                         ("POST", f"/api/sessions/{wrong}/exec"),
                         ("GET", f"/api/export/{wrong}"),
                         ("DELETE", f"/api/sessions/{wrong}")):
        status, _ = await deferToThread(call, server, path, method,
                                        {"argv": ["true"]} if method == "POST" else None)
        assert status == 404, (method, path, status)
    try:
        stranger = await WSClient.connect(server.ws_url, wrong)
        await stranger.closed
    except ConnectionError:
        pass
    ids.append(wrong)
    # One expires without its client.
    await warm.close()
    await eventually(lambda: f"session {ids[0][:8]} expired" in server.log())
    await taker.close()
    # A session whose container stopped while capsule was away is a
    # leftover at the next start.
    left = await WSClient.connect(server.ws_url)
    ids.append(await left.start())
    await deferToThread(server.stop, signal.SIGKILL)
    await deferToThread(lambda: docker_client().api.stop(session_container(ids[-1]), timeout=1))
    second = make_server("--pool-size", "0", "--retention", "0", instance=server.instance)
    await eventually(lambda: "leftover container" in second.log())
    await sleep(0.5)
    assert "cannot write the recording" in server.log()
    log = server.log() + second.log()
    for session_id in ids:
        assert session_id[:8] in log, session_id
        assert session_id not in log, [line for line in log.splitlines() if session_id in line]
    assert UUID.findall(log) == [], [line for line in log.splitlines() if UUID.search(line)]


@pytest_twisted.ensureDeferred
async def test_a_host_account_of_the_sessions_uid_is_said_at_start(make_server):
    """
    On the real engine: the warning is there exactly when this host has an
    account of uid 1000 and the engine does not remap users.
    """
    server = make_server("--pool-size", "0")
    remapped = any(option in ("name=userns", "name=rootless") or
                   option.startswith(("name=userns,", "name=rootless,"))
                   for option in docker_client().info().get("SecurityOptions") or ())
    try:
        pwd.getpwuid(1000)
        account = True
    except KeyError:
        account = False
    warning = "the sessions' processes run as uid 1000"
    if account and not remapped:
        await eventually(lambda: warning in server.log())
        assert '{"userns-remap": "default"} in /etc/docker/daemon.json' in server.log()
    else:
        # The check runs once recovery is done, before the first session.
        await eventually(lambda: "capsule is ready" in server.log())
        client = await WSClient.connect(server.ws_url)
        await client.start()
        await client.close()
        assert warning not in server.log()
