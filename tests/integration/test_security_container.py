"""
Container hardening, against the real engine: each setting is read back from
a live session container (docker inspect) and tried from inside it, and a
session still does a developer's normal work under it.  Sessions cannot
reach each other, nor the host's capsule.
"""

import gzip
import io
import socket
import tarfile

import docker
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from capsule.core.spec import SUDO_CAPABILITIES

from .harness import WSClient, docker_client, eventually, instance_containers, session_container

# Bits of /proc/self/status capability masks (linux/capability.h).
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7,
            "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27}
# A TCP service in a session: perl is in the image (git needs it), nc and
# python3 are not.
SERVE = ("perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 8080,"
         " Listen => 5, ReuseAddr => 1) or die; while ($c = $s->accept) {"
         " print $c \"from-a\\n\"; close $c }' & true")
# Bash's /dev/tcp as the client: prints what it read, then rc=N.
CONNECT = "timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}; cat <&3'; echo rc=$?"


def inspect(session_id):
    return docker_client().api.inspect_container(session_container(session_id))


def status_masks(text):
    return {line.split(":")[0]: int(line.split()[1], 16)
            for line in text.splitlines() if line.startswith("Cap")}


def has(mask, name):
    return bool(mask >> CAP_BITS[name] & 1)


def address(container, network="capsule"):
    return container["NetworkSettings"]["Networks"][network]["IPAddress"]


@pytest_twisted.ensureDeferred
async def test_default_hardening_of_a_live_session(make_server):
    server = make_server("--grace", "60", "--pool-size", "1")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    container = inspect(session_id)
    host = container["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert not host["GroupAdd"]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is False
    assert host["NetworkMode"] == "capsule"
    assert host["Init"] is True
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (
        512 * 1024 * 1024, 1_000_000_000, 256)
    assert container["Config"]["User"] == "developer"

    # The shell, and what the keeper runs as: no capabilities at all, and
    # none to gain.
    masks = status_masks(await client.run("command grep -E '^Cap|^NoNewPrivs' /proc/self/status"))
    assert masks == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
    out = await client.run("command grep NoNewPrivs /proc/self/status;"
                           " ps -o uid=,args= -C capsule-keeper | sort -u")
    assert "NoNewPrivs:\t1" in out
    keepers = [line.split(None, 1) for line in out.splitlines()[1:] if line.strip()]
    assert keepers and all(uid == "1000" for uid, _ in keepers), out
    assert "sudo=1" in await client.run("sudo -n true 2>/dev/null; echo sudo=$?")

    # The keeper and the system files are root's and not writable.
    out = await client.run("stat -c '%U:%G %a' /usr/local/bin/capsule-keeper;"
                           " test -w /usr/local/bin/capsule-keeper && echo WRITABLE;"
                           " cp /bin/true /usr/local/bin/capsule-keeper 2>/dev/null || echo refused")
    assert out.split() == ["root:root", "755", "refused"]
    out = await client.run(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /tmp"
        " -o -path /var/tmp -o -path /run/lock -o -path /workspace -o -path /home/developer \\)"
        " -prune -o -writable -not -type l -print 2>/dev/null | head -5; echo found-end", timeout=60)
    assert out.split() == ["found-end"]

    # A developer's normal work.
    assert (await client.run("command ls -d /workspace /tmp")).split() == ["/tmp", "/workspace"]
    out = await client.run(
        "git init -q demo && cd demo && printf 'int main(void) { return 42; }\\n' > m.c"
        " && printf 'm: m.c\\n\\tcc -O2 -o m m.c\\n' > Makefile && make -s"
        " && ./m; echo rc=$?; git add -A && git -c user.name=d -c user.email=d@x"
        " commit -qm one && git log --oneline | wc -l", timeout=60)
    assert out.split() == ["rc=42", "1"]
    out = await client.run("sleep 300 & jobs; ls -a /tmp/.capsule-keeper >/dev/null && echo sock")
    assert "sleep 300" in out and "sock" in out

    # The restart path: a new capsule reattaches to the same shell.
    await deferToThread(server.stop)
    await client.closed
    second = make_server("--grace", "60", "--pool-size", "1", instance=server.instance)
    await eventually(lambda: "found 1 session(s) of an earlier run" in second.log())
    again = await WSClient.connect(second.ws_url, session_id)
    connected = await again.next("connected")
    assert connected["resumed"] is True
    again.send({"type": "resize", "cols": 80, "rows": 24})
    out = await again.run("pwd; jobs")
    assert "/workspace/demo" in out and "sleep 300" in out

    # Warm containers are made the same way.
    def pool_hardened():
        found = [c for c in instance_containers(second.instance)
                 if c["Labels"].get("io.capsule.session") != session_id]
        hosts = [docker_client().api.inspect_container(c["Id"])["HostConfig"] for c in found]
        return hosts and all(h["CapDrop"] == ["ALL"] and not h["CapAdd"]
                             and h["SecurityOpt"] == ["no-new-privileges:true"]
                             and h["NetworkMode"] == "capsule" for h in hosts)
    await eventually(pool_hardened)
    await again.close()


@pytest_twisted.ensureDeferred
async def test_the_capsule_network_is_made_without_inter_container_traffic(make_server):
    server = make_server("--pool-size", "0")
    await eventually(lambda: "host firewall" in server.log())
    network = docker_client().api.inspect_network("capsule")
    assert network["Driver"] == "bridge"
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert network["Options"]["com.docker.network.bridge.name"] == "capsule0"
    assert network["Labels"] == {"io.capsule.network": "true"}
    # The test servers leave the firewall to the host (--firewall off), whose
    # DOCKER-USER chain has none of the rules: capsule says which are
    # missing, and what to add.
    log = server.log()
    assert "the host firewall lets sessions on capsule (bridge capsule0) reach" in log
    assert "169.254.0.0/16 (link-local: the cloud metadata service)" in log
    assert ("iptables -w -C DOCKER-USER -i capsule0 -m comment --comment capsule -j"
            " CAPSULE-OUT-capsule0") in log


@pytest_twisted.ensureDeferred
async def test_a_session_cannot_reach_another(make_server):
    server = make_server("--pool-size", "0")
    a = await WSClient.connect(server.ws_url)
    a_id = await a.start()
    b = await WSClient.connect(server.ws_url)
    b_id = await b.start()
    a_address = address(inspect(a_id))
    await a.run(SERVE)
    await a.run("timeout 10 bash -c 'until (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null;"
                " do sleep 0.1; done'")
    # The service answers in A itself, and from the host...
    assert "from-a" in await a.run(CONNECT.format(host="127.0.0.1", port=8080))

    def from_host():
        with socket.create_connection((a_address, 8080), timeout=5) as s:
            return s.makefile().readline()
    assert await deferToThread(from_host) == "from-a\n"
    # ...but not from session B, on the same network.
    assert address(inspect(b_id)) != a_address
    out = await b.run(CONNECT.format(host=a_address, port=8080), timeout=30)
    assert "from-a" not in out and "rc=0" not in out and "rc=" in out
    await a.close()
    await b.close()


@pytest_twisted.ensureDeferred
async def test_a_session_cannot_reach_the_hosts_capsule(make_server):
    server = make_server("--pool-size", "0")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    container = inspect(session_id)
    gateway = container["NetworkSettings"]["Networks"]["capsule"]["Gateway"]
    assert gateway
    # A service of the host's that listens on the gateway's address is
    # reachable (so the probe can tell)...
    listener = socket.create_server((gateway, 0))
    listener.settimeout(10)
    try:
        port = listener.getsockname()[1]
        probe = defer.ensureDeferred(client.run(CONNECT.format(host=gateway, port=port), timeout=30))
        accepted, _ = await deferToThread(listener.accept)
        accepted.sendall(b"from-host\n")
        accepted.close()
        assert "from-host" in await probe
    finally:
        listener.close()
    # ...capsule, on loopback, is not.
    out = await client.run(CONNECT.format(host=gateway, port=server.port), timeout=30)
    assert "rc=0" not in out and "rc=" in out
    await client.close()


@pytest_twisted.ensureDeferred
async def test_allow_sudo(make_server):
    server = make_server("--pool-size", "0", "--allow-sudo")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    host = inspect(session_id)["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(SUDO_CAPABILITIES)
    assert not host["SecurityOpt"]
    assert host["GroupAdd"] == ["capsule-sudo"]
    out = await client.run("sudo -n id -u; sudo -n sh -c 'touch /etc/capsule-t"
                           " && chown developer /etc/capsule-t && stat -c %U /etc/capsule-t'")
    assert out.split() == ["0", "developer"]
    masks = status_masks(await client.run("sudo -n /bin/grep ^Cap /proc/self/status"))
    assert has(masks["CapEff"], "SETUID") and has(masks["CapEff"], "CHOWN")
    for dropped in ("NET_RAW", "MKNOD", "SYS_CHROOT"):
        assert not has(masks["CapBnd"], dropped)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_cap_add_and_runtime_are_passed_through(make_server):
    server = make_server("--pool-size", "0", "--cap-add", "net_bind_service",
                         "--runtime", "runc")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    host = inspect(session_id)["HostConfig"]
    assert host["CapAdd"] == ["NET_BIND_SERVICE"]
    assert host["Runtime"] == "runc"
    masks = status_masks(await client.run("command grep ^Cap /proc/self/status"))
    assert masks["CapBnd"] == 1 << CAP_BITS["NET_BIND_SERVICE"]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_read_only_root(make_server):
    server = make_server("--pool-size", "0", "--read-only-root")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    container = inspect(session_id)
    assert container["HostConfig"]["ReadonlyRootfs"] is True
    assert set(container["HostConfig"]["Tmpfs"]) == {"/tmp", "/run"}
    volumes = {m["Destination"]: m["Name"] for m in container["Mounts"]
               if m["Type"] == "volume"}
    assert set(volumes) == {"/workspace", "/home/developer"}
    out = await client.run("touch /usr/x 2>&1; touch /etc/x 2>&1; command ls -ld /workspace ~"
                           " | awk '{print $3}'; test -f ~/.bashrc && echo bashrc", timeout=30)
    assert out.count("Read-only file system") == 2
    assert out.split()[-3:] == ["developer", "developer", "bashrc"]
    out = await client.run(
        "cd /tmp && printf 'int main(void) { return 7; }\\n' > m.c && cc -o m m.c && ./m;"
        " echo rc=$?; cd /workspace && git init -q r && echo kept > r/f.txt && echo ok",
        timeout=60)
    assert out.split() == ["rc=7", "ok"]
    status, _, body = await deferToThread(server.get, f"/api/export/{session_id}")
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        assert tar.extractfile("workspace/r/f.txt").read() == b"kept\n"
    await client.exit()
    # The session's volumes go with its container.

    def volumes_gone():
        for name in volumes.values():
            try:
                docker_client().api.inspect_volume(name)
                return False
            except docker.errors.NotFound:
                pass
        return True
    await eventually(volumes_gone)


@pytest_twisted.ensureDeferred
async def test_network_none(make_server):
    server = make_server("--pool-size", "0", "--network", "none")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert inspect(session_id)["HostConfig"]["NetworkMode"] == "none"
    assert (await client.run("command ls /sys/class/net")).split() == ["lo"]
    await client.close()
