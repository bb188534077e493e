"""
The warm pool against the real engine: warm sessions whose shells already
run, taken without a Docker call.
"""

import json
import re
import signal

import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from .harness import WSClient, docker_client, eventually, instance_containers, session_container
from .test_faults import DockerProxy

# Docker API requests that make or start something: a take makes none.
MAKING = re.compile(rb"^(POST|PUT|DELETE) /[^ ]*(containers/create|/exec|/start|/update|"
                    rb"/kill|containers/[^/ ]+\?)")


class CountingProxy(DockerProxy):
    """
    The engine's socket through a proxy that notes each request capsule makes.
    """

    def __init__(self, path):
        super().__init__(path)
        self.requests: list[bytes] = []

    def buildProtocol(self, addr):
        front = super().buildProtocol(addr)
        relay = front.dataReceived

        def noted(data):
            if MAKING.match(data):
                self.requests.append(data.split(b"\r\n", 1)[0])
            relay(data)
        front.dataReceived = noted
        return front


def pool_ready(server) -> int:
    status, _, body = server.get("/health")
    return json.loads(body)["pool"]["ready"]


async def the_warm_one(server) -> dict:
    """
    The container of C{server}'s pool of one, once it is ready.
    """
    await eventually(lambda: pool_ready(server) == 1)
    (warm,) = instance_containers(server.instance)
    return warm


def screen(data: bytes, cols: int, rows: int) -> list[str]:
    """
    The lines a terminal of C{cols} x C{rows} shows after C{data}: text,
    carriage return, line feed, backspace, erase to the end of the line;
    other escape sequences (colours, modes, the title) change no text.
    """
    text = data.decode("utf-8", "replace")
    lines = [[]]
    row = col = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\x1b":
            if text.startswith("]", i + 1):
                end = text.find("\x07", i)
                i = len(text) if end < 0 else end + 1
                continue
            match = re.compile(r"\[[0-9;?]*([@-~])").match(text, i + 1)
            if match:
                if match.group(1) == "K":
                    del lines[row][col:]
                i = match.end()
                continue
            i += 2
            continue
        if c == "\r":
            col = 0
        elif c == "\n":
            row += 1
            while len(lines) <= row:
                lines.append([])
        elif c == "\b":
            col = max(0, col - 1)
        elif c >= " ":
            if col >= cols:
                row, col = row + 1, 0
                while len(lines) <= row:
                    lines.append([])
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = c
            else:
                line.append(c)
            col += 1
        i += 1
    shown = ["".join(line).rstrip() for line in lines]
    return shown[-rows:]


@pytest_twisted.ensureDeferred
async def test_a_warm_take_makes_no_docker_call_and_shows_one_prompt_of_the_right_size(
        make_server, tmp_path):
    proxy = CountingProxy(str(tmp_path / "docker.sock"))
    await proxy.up()
    server = make_server("--pool-size", "1", env={"DOCKER_HOST": f"unix://{proxy.path}"},
                         start=False)
    await deferToThread(server.start)
    warm = await the_warm_one(server)
    proxy.requests.clear()
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start(120, 40)
    await client.until(rb"\$ $")
    client.type("stty size\r")
    await client.until(rb"stty size\r\n.*40 120\r\n.*\$ $")
    # Whatever the pool does meanwhile (its refill), nothing is asked about
    # the session taken.
    about = [r for r in proxy.requests
             if warm["Id"].encode() in r or session_id.encode() in r]
    assert about == [], "taking a warm session asked the engine for something"
    assert session_container(session_id) == warm["Id"]
    shown = [line for line in screen(client.output, 120, 40) if line]
    assert shown[0].startswith("capsule — capsule, Debian"), shown
    assert shown[0].endswith(", 1 CPUs, 512MiB memory"), shown
    assert shown[1].startswith("files in /workspace"), shown
    # One prompt, then the command and its answer: the size the client has.
    assert shown[2:] == ["developer@capsule:/workspace$ stty size", "40 120",
                         "developer@capsule:/workspace$"], shown
    await client.close()
    await proxy.down()


@pytest_twisted.ensureDeferred
async def test_a_warm_session_whose_shell_was_killed_is_replaced_not_handed_out(make_server):
    server = make_server("--pool-size", "1")
    first = await the_warm_one(server)
    container = docker_client().containers.get(first["Id"])
    await eventually(lambda: container.exec_run(["pgrep", "-x", "bash"]).exit_code == 0)
    # As its own user: the container's root has no capability to signal it.
    killed = await deferToThread(lambda: container.exec_run(["pkill", "-KILL", "-x", "bash"],
                                                            user="developer"))
    assert killed.exit_code == 0
    await eventually(lambda: first["Id"] not in {c["Id"] for c in
                                                 instance_containers(server.instance)})
    await eventually(lambda: pool_ready(server) == 1)
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer" in await client.run("whoami")
    assert docker_client().containers.get(session_container(session_id)).id != first["Id"]
    assert "ended while it waited" in server.log()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_warm_sessions_older_than_the_max_age_are_replaced(make_server):
    server = make_server("--pool-size", "1", tuning={"pool-max-age": 4})
    first = await the_warm_one(server)
    await eventually(lambda: first["Id"] not in {c["Id"] for c in
                                                 instance_containers(server.instance)},
                     timeout=20)
    assert "it is older than 4 s" in server.log()
    second = await the_warm_one(server)
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer" in await client.run("whoami")
    assert docker_client().containers.get(session_container(session_id)).id in (
        second["Id"], *(c["Id"] for c in instance_containers(server.instance)))
    await client.close()


@pytest_twisted.ensureDeferred
async def test_warm_sessions_have_the_same_limits_and_the_pool_refills(make_server):
    server = make_server("--pool-size", "2")
    await eventually(lambda: pool_ready(server) == 2)
    warm_ids = {c["Id"] for c in instance_containers(server.instance)}
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer /workspace" in await client.run("echo $(whoami) $PWD")
    container = docker_client().containers.get(session_container(session_id))
    assert container.id in warm_ids
    host = container.attrs["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (
        512 * 1024 * 1024, 1_000_000_000, 256)
    assert "(warm," in server.log()
    await eventually(lambda: pool_ready(server) == 2)
    assert len(instance_containers(server.instance)) == 3
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_cold_start_begins_at_the_upgrade_and_a_client_gone_before_its_first_frame_leaks_nothing(  # noqa: E501
        make_server):
    server = make_server("--pool-size", "0")
    client = await WSClient.connect(server.ws_url)
    # No frame sent: the container is asked for all the same.
    await eventually(lambda: len(instance_containers(server.instance)) == 1)
    client.drop()
    await eventually(lambda: instance_containers(server.instance) == [])
    assert "its client left before it sent its terminal size" in server.log()

    # A client whose session has started, but that never said its size.
    client = await WSClient.connect(server.ws_url)
    await eventually(lambda: "(cold, container" in server.log())
    await client.close()
    await eventually(lambda: instance_containers(server.instance) == [])
    assert "its client left before it sent its terminal size" in server.log()

    # And one that does say it gets its shell at its size.
    client = await WSClient.connect(server.ws_url)
    await client.start(100, 30)
    assert await client.run("stty size") == "30 100\r\n"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_warm_sessions_of_a_killed_run_are_never_handed_out_and_expire(make_server):
    first = make_server("--pool-size", "1")
    warm = await the_warm_one(first)
    await deferToThread(first.stop, sig=signal.SIGKILL)
    second = make_server("--pool-size", "1", "--grace", "3", tuning={"cleanup-interval": 0.2},
                         instance=first.instance)
    await eventually(lambda: "found 1 session(s)" in second.log())
    await eventually(lambda: pool_ready(second) == 1)
    client = await WSClient.connect(second.ws_url)
    session_id = await client.start()
    assert "developer" in await client.run("whoami")
    assert docker_client().containers.get(session_container(session_id)).id != warm["Id"]
    # Nobody knows its id: it is kept for the grace period, then removed.
    await eventually(lambda: warm["Id"] not in {c["Id"] for c in
                                                instance_containers(first.instance)},
                     timeout=20)
    assert "expired" in second.log()
    await client.close()


def pool_of(server) -> dict:
    status, _, body = server.get("/health")
    return json.loads(body)["pool"]


@pytest_twisted.ensureDeferred
async def test_a_burst_of_opens_all_get_usable_shells_and_the_pool_returns_to_its_size(
        make_server):
    burst = 8
    server = make_server("--pool-size", "2", "--max-sessions", "40",
                         "--max-sessions-per-client", "40", "--session-rate", "1000/1",
                         "--memory-budget", "off",
                         tuning={"pool-window": 30, "pool-grow-by": 3})
    await eventually(lambda: pool_ready(server) == 2, timeout=60)

    async def one(i: int):
        client = await WSClient.connect(server.ws_url)
        session_id = await client.start(timeout=120)
        answer = await client.run(f"echo burst-$((40+{i}))", timeout=120)
        return client, session_id, answer

    outcomes = await defer.DeferredList([defer.ensureDeferred(one(i)) for i in range(burst)],
                                        consumeErrors=True)
    failures = [value for ok, value in outcomes if not ok]
    assert failures == []
    clients = [value[0] for _, value in outcomes]
    assert [value[2].strip() for _, value in outcomes] == [
        f"burst-{40 + i}" for i in range(burst)]
    # Each got a shell of its own.
    assert len({value[1] for _, value in outcomes}) == burst
    assert len({session_container(value[1]) for _, value in outcomes}) == burst
    # Takes came fast: the pool wants more than its size, up to its cap,
    # and grows once the burst's own sessions run.
    assert 2 < pool_of(server)["target"] <= 5
    for client in clients:
        await client.exit(timeout=60)
    await eventually(lambda: pool_of(server)["ready"] > 2, timeout=30)
    # A window after the last take, it is back at its size, and the
    # sessions' containers are gone.
    await eventually(lambda: pool_of(server) == {"size": 2, "target": 2, "ready": 2}
                     and len(instance_containers(server.instance)) == 2, timeout=90)
    assert "shrinks from" in server.log()
    assert not server.unhandled_errors()
