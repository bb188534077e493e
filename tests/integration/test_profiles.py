"""
Profiles end to end: a real twistd capsule, the real engine, real WebSockets.

The claude profile's test needs the agent image (CAPSULE_TEST_AGENT_IMAGE,
e.g. capsule-agent:latest from `make image`); without it that test is
skipped, unless CAPSULE_REQUIRE_DOCKER=1 makes it fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from .harness import IMAGE, WSClient, docker_client, poll, session_container, sleep, wait_for

AGENT_IMAGE = os.environ.get("CAPSULE_TEST_AGENT_IMAGE")


def write_profiles(tmp_path, text: str) -> str:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return str(path)


def container_of(session_id):
    return docker_client().containers.get(session_container(session_id))


@pytest_twisted.ensureDeferred
async def test_unknown_profile_is_refused_with_the_list(make_server, tmp_path):
    server = make_server("--pool-size", "0", "--profiles", write_profiles(
        tmp_path, f'[profiles.py]\nimage = "{IMAGE}"\ncommand = ["bash", "-l"]\n'))
    client = await WSClient.connect(server.ws_url + "?profile=nope")
    message = await client.next("error")
    assert message == {"type": "error", "code": "unknown_profile",
                       "message": "no profile 'nope': the profiles are claude, py, shell"}
    await client.closed
    assert client.close_code == 4400
    assert server.containers() == []


@pytest_twisted.ensureDeferred
async def test_a_secret_is_in_the_container_and_nowhere_else(make_server, tmp_path):
    from_env = f"envsecret-{uuid.uuid4().hex}"
    from_file = f"filesecret-{uuid.uuid4().hex}"
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# test\nFILE_TOKEN={from_file}\n")
    os.chmod(secrets, 0o600)
    server = make_server(
        "--pool-size", "1", "--secrets-file", str(secrets),
        "--profiles", write_profiles(tmp_path, f"""
[profiles.agent]
image = "{IMAGE}"
secrets = ["ENV_TOKEN", "FILE_TOKEN", "ABSENT_TOKEN"]
"""), env={"ENV_TOKEN": from_env})
    client = await WSClient.connect(server.ws_url + "?profile=agent")
    session_id = await client.start()
    out = await client.run('echo "[$ENV_TOKEN] [$FILE_TOKEN] [${ABSENT_TOKEN-unset}]"')
    assert out.strip() == f"[{from_env}] [{from_file}] [unset]"
    # A session of another profile does not get them.
    plain = await WSClient.connect(server.ws_url)
    await plain.start()
    out = await plain.run('echo "[${ENV_TOKEN-unset}] [${FILE_TOKEN-unset}]"')
    assert out.strip() == "[unset] [unset]"
    container = container_of(session_id)
    assert container.labels["io.capsule.profile"] == "agent"
    # The engine has them in the container's environment (whoever has the
    # engine has everything); its command line does not.
    assert f"ENV_TOKEN={from_env}" in container.attrs["Config"]["Env"]
    assert from_env not in " ".join(container.attrs["Config"]["Cmd"] or [])
    seen = []
    for path in ("/", "/index.html", "/health", "/metrics", "/api/sessions",
                 f"/api/sessions/{session_id}", "/api/openapi.json", "/app.js"):
        status, headers, body = await deferToThread(server.get, path)
        seen.append((path, status))
        text = body.decode("utf-8", "replace") + repr(headers)
        assert from_env not in text and from_file not in text, path
    assert ("/health", 200) in seen and ("/metrics", 200) in seen
    # The host's process list.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert from_env not in ps and from_file not in ps
    await client.close()
    await plain.close()
    log = server.log()
    assert from_env not in log and from_file not in log
    # A missing secret is named (not its value: it has none) in a warning.
    assert ("profile agent names the secret ABSENT_TOKEN, which has no value" in log)
    for name in ("ENV_TOKEN", "FILE_TOKEN"):
        assert f"names the secret {name}" not in log


@pytest_twisted.ensureDeferred
async def test_a_clone_that_fails_says_so_in_the_terminal(make_server, tmp_path):
    # Port 9 of the container's own loopback: nothing listens, the
    # connection is refused at once.
    server = make_server("--pool-size", "0", "--profiles", write_profiles(tmp_path, f"""
[profiles.repo]
image = "{IMAGE}"
repository = "https://127.0.0.1:9/nothing.git"
"""))
    client = await WSClient.connect(server.ws_url + "?profile=repo")
    await client.start()
    await client.until(r"capsule: cloning https://127\.0\.0\.1:9/nothing\.git into /workspace")
    await client.until(r"Failed to connect to 127\.0\.0\.1 port 9")
    await client.until(r"capsule: the clone failed \(git exited with 128\)")
    # The shell follows, and the variables are gone from it.
    out = await client.run('echo "[${CAPSULE_REPOSITORY-unset}]"; ls -A /workspace | wc -l')
    assert out.split() == ["[unset]", "0"]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_clone_past_its_time_limit_is_stopped(make_server, tmp_path):
    # A TLS port on the host that accepts and never answers: git waits on
    # the handshake until the time limit.
    listener = await _silent_listener()
    gateway = _gateway("capsule")
    try:
        server = make_server("--pool-size", "0", "--profiles", write_profiles(tmp_path, f"""
[profiles.slow]
image = "{IMAGE}"
repository = "https://{gateway}:{listener.getHost().port}/slow.git"
clone_timeout = 2
"""))
        client = await WSClient.connect(server.ws_url + "?profile=slow")
        await client.start()
        await client.until("capsule: cloning")
        await client.until(r"capsule: the clone was stopped after 2 s \(clone_timeout\)",
                           timeout=30)
        out = await client.run("echo alive")
        assert out.strip() == "alive"
        await client.close()
    finally:
        await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_repository_is_cloned_over_https(make_server, tmp_path):
    # A bare repository served over TLS (git's dumb HTTP protocol: static
    # files) on the host, reached from the container through its network's
    # gateway; the test profile trusts its self-signed certificate.
    repo = _bare_repository(tmp_path)
    port, listener = await _tls_file_server(tmp_path, repo.parent)
    gateway = _gateway("capsule")
    try:
        server = make_server("--pool-size", "0", "--profiles", write_profiles(tmp_path, f"""
[profiles.repo]
image = "{IMAGE}"
repository = "https://{gateway}:{port}/{repo.name}"
environment = {{ GIT_SSL_NO_VERIFY = "1" }}
"""))
        client = await WSClient.connect(server.ws_url + "?profile=repo")
        await client.start()
        await client.until(r"capsule: cloned into /workspace", timeout=60)
        out = await client.run("cat /workspace/hello.txt; stat -c %U /workspace/hello.txt;"
                               " git --no-pager -C /workspace log --format=%s")
        assert out.split("\r\n")[:3] == ["hello from capsule", "developer", "first"]
        await client.close()
    finally:
        await listener.stopListening()


@pytest.mark.skipif(not AGENT_IMAGE and not os.environ.get("CAPSULE_REQUIRE_DOCKER"),
                    reason="set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image)")
@pytest_twisted.ensureDeferred
async def test_claude_runs_in_a_claude_session(make_server):
    assert AGENT_IMAGE, "CAPSULE_TEST_AGENT_IMAGE is not set"
    server = make_server("--pool-size", "0", "--agent-image", AGENT_IMAGE)
    client = await WSClient.connect(server.ws_url + "?profile=claude")
    # A large image on a busy engine may take a while to start.
    session_id = await client.start(120, 40, timeout=90)
    container = container_of(session_id)
    assert container.labels["io.capsule.profile"] == "claude"
    assert container.attrs["Config"]["Image"] == AGENT_IMAGE

    # Claude Code starts; when it exits (here it is interrupted: Ctrl-C
    # twice at its prompt) a login shell follows in the same terminal.
    async def claude_runs():
        top = await deferToThread(container.top, ps_args="-eo pid,args")
        return any(p[-1].split()[0].endswith("claude") for p in top["Processes"])
    await poll(claude_runs, 60, "claude running in the container")

    async def shell_answers():
        try:
            answers.append(await client.run("claude --version; pwd; whoami", timeout=3))
        except AssertionError:
            client.send_input(b"\x03")
            await sleep(0.3)
            client.send_input(b"\x03")
            return False
        return True
    answers = []
    await poll(shell_answers, 90, "the login shell after claude", interval=0.5)
    out = answers[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+ \(Claude Code\)", out.split("\r\n")[0]), out
    assert out.split("\r\n")[1:3] == ["/workspace", "developer"]
    await client.close()


# -- helpers ------------------------------------------------------------------------

def _admin(*argv):
    import io
    from capsule.admin import main
    out, err = io.StringIO(), io.StringIO()
    code = main(["--url", "http://127.0.0.1:9", *argv], out, err)
    return code, (out.getvalue() + err.getvalue()).splitlines()


def _gateway(network: str) -> str:
    return docker_client().networks.get(network).attrs["IPAM"]["Config"][0]["Gateway"]


async def _silent_listener():
    from twisted.internet.protocol import Factory, Protocol
    factory = Factory.forProtocol(Protocol)
    return reactor.listenTCP(0, factory, interface="0.0.0.0")


def _bare_repository(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (work / "hello.txt").write_text("hello from capsule\n")
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "hello.txt"],
                 ["git", "commit", "-q", "-m", "first"]):
        subprocess.run(argv, cwd=work, env=env, check=True)
    served = tmp_path / "served"
    served.mkdir()
    repo = served / "hello.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(repo)], check=True)
    subprocess.run(["git", "update-server-info"], cwd=repo, check=True)
    return repo


async def _tls_file_server(tmp_path, root):
    from twisted.internet import ssl
    from twisted.web.server import Site
    from twisted.web.static import File
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=capsule-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.DefaultOpenSSLContextFactory(str(key), str(cert))
    listener = reactor.listenSSL(0, Site(File(str(root))), context, interface="0.0.0.0")
    return listener.getHost().port, listener


@pytest_twisted.ensureDeferred
async def test_an_agent_volume_is_a_users_own_and_outlives_the_container():
    # Through capsule's DockerAPI, as the session manager makes containers:
    # the volume is made on first use with capsule's labels, filled from the
    # image's directory (owner included), kept after the container goes, and
    # another user's is another volume.
    from capsule.core.spec import ContainerSpec
    from capsule.engine.docker import DockerAPI
    from capsule.core.profiles import agent_volume_name

    instance = f"volumes-{uuid.uuid4().hex[:10]}"
    names = {user: agent_volume_name(instance, "agent", user) for user in ("ann", "bob")}
    api = DockerAPI(reactor, threads=2, export_threads=1, timeout=30)
    api.start()
    engine = docker_client().api
    made = []

    def spec(user):
        return ContainerSpec(
            image=IMAGE, memory="256m", cpus=0.5, pids=64, network="none",
            labels={"io.capsule.managed": "true", "io.capsule.instance": instance},
            volumes=((names[user], "/home/developer"),),
            volume_labels={"io.capsule.managed": "true", "io.capsule.instance": instance,
                           "io.capsule.user": user, "io.capsule.profile": "agent",
                           "io.capsule.volume": "agent"})

    def run(container_id, command):
        return engine.exec_start(engine.exec_create(container_id, ["sh", "-c", command],
                                                    user="developer")).decode()
    try:
        first = await api.create_session_container(str(uuid.uuid4()), spec("ann"))
        made.append(first)
        out = await deferToThread(run, first, "stat -c %U /home/developer; echo kept >"
                                              " /home/developer/login")
        assert out.strip() == "developer"
        await api.remove_container(first)
        volume = await deferToThread(engine.inspect_volume, names["ann"])
        assert volume["Labels"]["io.capsule.user"] == "ann"
        assert volume["Labels"]["io.capsule.instance"] == instance
        second = await api.create_session_container(str(uuid.uuid4()), spec("ann"))
        other = await api.create_session_container(str(uuid.uuid4()), spec("bob"))
        made += [second, other]
        assert (await deferToThread(run, second, "cat /home/developer/login")).strip() == "kept"
        assert (await deferToThread(run, other, "cat /home/developer/login 2>&1")).strip() \
            .endswith("No such file or directory")
        # The admin command keeps a volume a live session uses, and removes
        # it once that session's container is gone; bob's stays.
        code, out = await deferToThread(_admin, "remove-volumes", "--user", "ann",
                                        "--instance", instance)
        assert code == 1 and out[0].startswith(f"kept {names['ann']}: a live session")
        await api.remove_container(second)
        code, out = await deferToThread(_admin, "remove-volumes", "--user", "ann",
                                        "--instance", instance)
        assert (code, out) == (0, [f"removed {names['ann']}",
                                   f"removed 1 agent volume(s) of ann (instance {instance})"])
        code, out = await deferToThread(_admin, "volumes", "--instance", instance)
        user, profile, size, volume = out[1].split()
        assert (user, profile, volume) == ("bob", "agent", names["bob"])
        assert re.fullmatch(r"\d+\.\dMiB", size), size
    finally:
        for container_id in made:
            await api.remove_container(container_id)
        for name in names.values():
            try:
                await deferToThread(engine.remove_volume, name)
            except Exception:
                pass
        api.stop()


@pytest.mark.skipif(not AGENT_IMAGE and not os.environ.get("CAPSULE_REQUIRE_DOCKER"),
                    reason="set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image)")
def test_a_users_agent_state_outlives_the_session_and_is_theirs_alone(make_server, tmp_path):
    # Two users (API tokens); the claude profile with its agent volume at
    # ~/.claude in the agent image (a shell instead of claude: the volume is
    # what is tested). What ann leaves there is there in her next session,
    # not in bob's; the admin command then removes hers.
    import base64
    import json

    import websocket

    assert AGENT_IMAGE, "CAPSULE_TEST_AGENT_IMAGE is not set"
    tokens = {"ann": "ann-token-" + "1" * 30, "bob": "bob-token-" + "2" * 30}
    path = tmp_path / "tokens"
    path.write_text("".join(f"{u}:{t}\n" for u, t in tokens.items()))
    server = make_server("--pool-size", "0", "--tokens", str(path), "--agent-image",
                         AGENT_IMAGE, "--profiles", write_profiles(tmp_path, """
[profiles.claude]
agent_volume = "/home/developer/.claude"
environment = { CLAUDE_CONFIG_DIR = "/home/developer/.claude" }
command = ["bash", "-l"]
"""))

    def session(user: str, command: str, expect: str) -> str:
        ws = websocket.create_connection(server.ws_url + "?profile=claude", timeout=60,
                                         header=[f"Authorization: Bearer {tokens[user]}"])
        try:
            ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
            seen = b""
            ws.send(json.dumps({"type": "input", "data": command + "; exit\n"}))
            while True:
                message = json.loads(ws.recv())
                if message["type"] == "output":
                    seen += base64.b64decode(message["data"])
                elif message["type"] == "exit":
                    break
                else:
                    assert message["type"] in ("connected", "notice"), message
            text = seen.decode("utf-8", "replace")
            assert expect in text, text[-2000:]
            return text
        finally:
            ws.close()

    volume = {u: f"capsule-{server.instance}-claude-{u}-" for u in tokens}

    def volumes() -> list[str]:
        return sorted(v.name for v in docker_client().volumes.list(
            filters={"label": f"io.capsule.instance={server.instance}"}))
    try:
        session("ann", 'echo "$CLAUDE_CONFIG_DIR" > ~/.claude/where; echo WROTE_$((1+1))',
                "WROTE_2")
        text = session("ann", "cat ~/.claude/where; echo READ_$((2+2))", "READ_4")
        assert "/home/developer/.claude\r\nREAD_4" in text
        text = session("bob", "ls -A ~/.claude | wc -l; stat -c %U ~/.claude;"
                              " echo BOB_$((3+3))", "BOB_6")
        assert "0\r\ndeveloper\r\nBOB_6" in text
        assert "not writable" not in text
        assert [n[:len(volume["ann"])] for n in volumes()] == [volume["ann"], volume["bob"]]
        # Each session's container is removed once its shell exited.
        wait_for(lambda: server.containers() == [], 30, "the containers removed")
        code, out = _admin("remove-volumes", "--user", "ann", "--instance", server.instance)
        assert code == 0, out
        assert out[-1] == f"removed 1 agent volume(s) of ann (instance {server.instance})"
        assert [n[:len(volume["bob"])] for n in volumes()] == [volume["bob"]]
    finally:
        server.stop()
        server.remove_containers()
        for name in volumes():
            docker_client().volumes.get(name).remove(force=True)
