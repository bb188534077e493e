"""
The engine contract (tests/engine_contract.py), against the Kubernetes
engine (L{capsule.engine.kubernetes}) on the stand-in API server
(tests/support/kube_standin.py), whose pods are real containers on the
local Docker engine; and what the Kubernetes engine and the stand-in do of
their own.

Where a contract case is Docker's alone it is skipped, with the reason.

Against a real cluster (TestKubernetesOnCluster), whenever
CAPSULE_TEST_KUBECONFIG is set.  With kind (https://kind.sigs.k8s.io)::

    kind create cluster --name capsule-test
    kind load docker-image capsule-runtime:main --name capsule-test
    kind get kubeconfig --name capsule-test > /tmp/capsule-kind.yaml
    CAPSULE_TEST_KUBECONFIG=/tmp/capsule-kind.yaml CAPSULE_TEST_IMAGE=capsule-runtime:main \
        .venv/bin/python -m pytest tests/integration/test_kube_contract.py -k OnCluster \
        --timeout 900
    kind delete cluster --name capsule-test

With k3s (https://k3s.io; as root, or with sudo)::

    curl -sfL https://get.k3s.io | sh -
    docker save capsule-runtime:main | k3s ctr images import -
    cp /etc/rancher/k3s/k3s.yaml /tmp/capsule-k3s.yaml
    CAPSULE_TEST_KUBECONFIG=/tmp/capsule-k3s.yaml CAPSULE_TEST_IMAGE=capsule-runtime:main \
        .venv/bin/python -m pytest tests/integration/test_kube_contract.py -k OnCluster \
        --timeout 900

Each run makes a namespace of its own (capsule-test-XXXXXXXX) and deletes
it, or uses CAPSULE_TEST_KUBE_NAMESPACE (which must exist) and removes
what it made there.
"""

import io
import json
import os
import socket
import tarfile
import time
import uuid
from dataclasses import replace

import pytest
import pytest_twisted
import kubernetes.client
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.threads import deferToThread

from capsule.core.keeper import RELAY_FRAMES, FrameReader, encode_input, keeper_argv
from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable
from capsule.core.kept import SCREEN_PATH, Snapshot
from capsule.core.spec import ContainerSpec
from capsule.engine.kubernetes import LABELS_ANNOTATION, KubernetesAPI, Unsupported

pytest.register_assert_rewrite("tests.engine_contract")
from ..engine_contract import (DEADLINE, LABEL_INSTANCE, SCRIPT, SCRIPT_COMMAND,  # noqa: E402
                               EngineContract, ExecRecorder)
from .harness import IMAGE, docker_client, remove_instance_containers  # noqa: E402

DOCKER_ONLY = "Docker's alone: "
# What a cluster would do with VolumeSnapshots, refused with Unsupported for now
# (test_not_yet_calls_are_refused).
NO_SNAPSHOTS = ("not yet on Kubernetes: a pod's files are not snapshotted (a cluster has no"
                " commit: VolumeSnapshots of its claims); the snapshot calls are Unsupported")
NO_FORKS = ("not yet on Kubernetes: a pod is not forked (a new pod on VolumeSnapshots of its"
            " claims); fork_container is Unsupported")


def configuration(host: str):
    c = kubernetes.client.Configuration()
    c.host = host
    return c


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def namespace():
    return f"contract-{uuid.uuid4().hex[:10]}"


def _kube_api(url: str, namespace: str, timeout: float = 30):
    api = KubernetesAPI(reactor, configuration(url), namespace=namespace, threads=4,
                        export_threads=1, timeout=timeout, start_timeout=60)
    api.start()
    return api


class TestKubernetesOnStandin(EngineContract):
    @pytest.fixture
    def spec(self):
        instance = f"contract-{uuid.uuid4().hex[:10]}"
        yield ContainerSpec(image=IMAGE, memory="256m", cpus=0.5, pids=64,
                            labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance})
        remove_instance_containers(instance)

    @pytest.fixture
    def api(self, standin, namespace, spec):
        api = _kube_api(standin.url, namespace)
        yield api
        api.stop()

    @pytest.fixture
    def unreachable_api(self, namespace):
        api = _kube_api(f"http://127.0.0.1:{closed_port()}", namespace, timeout=5)
        yield api
        api.stop()

    @pytest.fixture
    def kill_container(self, standin, namespace):
        def kill(pod):
            container = standin.container_of(namespace, pod)
            return deferToThread(lambda: docker_client().api.kill(container))
        return kill

    @pytest.fixture
    def put_file(self, standin, namespace):
        def put(pod, path, data):
            container = standin.container_of(namespace, pod)
            return deferToThread(_thd_write_file, container, path, data)
        return put

    @pytest.fixture
    def network_name(self):
        return f"capsule-contract-{uuid.uuid4().hex[:10]}"

    @pytest.fixture
    def make_symlink(self, api):
        # As the pod's user, by an exec: what a session's user can do.
        async def link(pod, path, target):
            result = await api.run_command(pod, ["ln", "-sfn", target, path], "developer",
                                           "/workspace", {})
            assert result.exit_code == 0, result.stderr
        return lambda pod, path, target: Deferred.fromCoroutine(link(pod, path, target))

    # -- what differs from Docker ----------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_ping_image_exists_and_info(self, api, spec):
        version = await api.ping()
        assert isinstance(version.get("Version"), str)
        # A cluster has no image store to ask: every image "exists" until a
        # pod's node fails to pull it (test_create_with_a_missing_image).
        assert await api.image_exists(spec.image) is True
        info = await api.info()
        assert info["LiveRestoreEnabled"] is True

    @pytest.mark.skip(reason=DOCKER_ONLY + "a writable layer's size; the kubelet enforces a"
                      " pod's ephemeral-storage limit (test_docker_only_calls_are_refused)")
    def test_container_sizes_of_running_containers_by_labels(self):
        pass

    @pytest.mark.skip(reason=DOCKER_ONLY + "layer and volume sizes from /system/df")
    def test_disk_usage_of_running_containers_and_their_volumes(self):
        pass

    @pytest.mark.skip(reason=DOCKER_ONLY + "a running container's CPU weight (a pod's"
                      " resources are fixed; in-place resize is not used)")
    def test_set_cpu_shares_of_a_container(self):
        pass

    @pytest.mark.skip(reason=DOCKER_ONLY + "bridge networks; a cluster's network is its own"
                      " (sessions are kept apart by NetworkPolicies)")
    def test_ensure_network_creates_it_once(self):
        pass

    # -- snapshots and forks: not yet on Kubernetes -------------------------------

    @pytest.mark.skip(reason="a pod's CPU time is not known: the metrics API (metrics.k8s.io)"
                      " is optional and gives a sample, not a counter, so container_cpu fires"
                      " None (test_container_cpu_of_a_pod_is_unknown)")
    def test_container_cpu_grows_while_it_works(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_snapshot_of_the_writable_layer(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_snapshot_copies_the_anonymous_volumes(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_a_snapshot_of_a_fork_copies_the_copies(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_remove_snapshot_removes_its_image_and_volumes(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_prune_removes_what_a_removed_fork_leaves(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_sessions_from_a_named_snapshot_leave_it_as_it_was(self):
        pass

    @pytest.mark.skip(reason=NO_SNAPSHOTS)
    def test_snapshot_of_a_removed_container(self):
        pass

    @pytest.mark.skip(reason=NO_FORKS)
    def test_a_fork_has_the_sources_files(self):
        pass

    @pytest.mark.skip(reason=NO_FORKS)
    def test_a_fork_copies_the_anonymous_volumes(self):
        pass

    @pytest.mark.skip(reason=NO_FORKS)
    def test_a_fork_shares_the_named_volumes_its_spec_mounts(self):
        pass

    @pytest.mark.skip(reason=NO_FORKS)
    def test_a_fork_is_of_the_sources_image(self):
        pass

    @pytest.mark.skip(reason=NO_FORKS)
    def test_a_fork_of_a_removed_container(self):
        pass

    @pytest.mark.parametrize("call", [
        lambda api, spec: api.ping(),
        lambda api, spec: api.info(),
        lambda api, spec: api.image_exists(spec.image),
        lambda api, spec: api.create_session_container(str(uuid.uuid4()), spec),
        lambda api, spec: api.remove_container("0" * 64),
        lambda api, spec: api.list_containers(spec.labels),
        lambda api, spec: api.container_state("0" * 64),
        lambda api, spec: api.spawn_exec(ExecRecorder(), "0" * 64, list(SCRIPT), "developer",
                                         "/workspace", {}, None, tty=False),
        lambda api, spec: api.export_workspace("0" * 64, "/workspace", lambda chunk: None),
        lambda api, spec: api.run_command("0" * 64, SCRIPT_COMMAND, "developer", "/tmp", {}),
        lambda api, spec: api.stop_container("0" * 64),
        lambda api, spec: api.start_container("0" * 64),
        lambda api, spec: api.kept_containers(spec.labels),
        lambda api, spec: api.put_file("0" * 64, SCREEN_PATH, b"x"),
        lambda api, spec: api.read_file("0" * 64, SCREEN_PATH, 10),
        lambda api, spec: api.unpause_container("0" * 64),
    ], ids=["ping", "info", "image_exists", "create", "remove", "list", "state", "spawn_exec",
            "export", "run_command", "stop", "start", "kept", "put_file", "read_file",
            "unpause"])
    @pytest_twisted.ensureDeferred
    async def test_an_unreachable_engine(self, unreachable_api, spec, call):
        # inspect_network and ensure_network are Docker's alone, and the
        # calls of snapshots and forks not yet made: refused whether or not
        # the cluster is reachable.
        d = call(unreachable_api, spec)
        d.addTimeout(DEADLINE, reactor)
        with pytest.raises(DockerUnavailable):
            await d

    # -- the Kubernetes engine's own ------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_docker_only_calls_are_refused(self, api, spec):
        container_id = await self.create(api, spec)
        for d in (api.container_sizes(spec.labels), api.disk_usage(spec.labels),
                  api.set_cpu_shares(container_id, 100), api.inspect_network("capsule"),
                  api.ensure_network("capsule", {}, {})):
            with pytest.raises(Unsupported):
                await d

    @pytest_twisted.ensureDeferred
    async def test_not_yet_calls_are_refused(self, api, spec):
        """
        Snapshots and forks (VolumeSnapshots of a session's claim, which the
        stand-in does not have): refused, saying so, and the pod runs on
        untouched.
        """
        pod = await self.create(api, spec)
        snapshot = Snapshot("capsule-snapshot:t", {"/workspace": "v"}, {}, 0.0)
        for d in (api.snapshot_container(pod, "capsule-snapshot", "t", {}),
                  api.list_snapshots(spec.labels), api.remove_snapshot(snapshot),
                  api.copy_snapshot_volumes(snapshot, spec.labels),
                  api.prune_snapshots(spec.labels, grace=0),
                  api.fork_container(pod, str(uuid.uuid4()), spec)):
            with pytest.raises(Unsupported) as refused:
                await d
            assert "not yet on Kubernetes" in str(refused.value)
        assert (await api.container_state(pod))["Running"] is True
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert [c["id"] for c in await api.list_containers(instance)] == [pod]

    # -- kept sessions: the pod deleted, its claim kept ---------------------------

    async def _stopped(self, api, pod):
        for _ in range(100):
            if (await api.container_state(pod))["Running"] is False:
                return
            await task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"{pod} still runs")

    @pytest_twisted.ensureDeferred
    async def test_an_ended_pod_is_kept_by_its_claim(self, api, spec, kill_container,
                                                     put_file, standin):
        """
        A pod whose container ended (killed, evicted) cannot run again, but
        its claim holds the session's files: it is kept, as Docker keeps a
        stopped container, and its resume makes the pod anew.
        """
        running = await self.create(api, spec)
        ended = await self.create(api, spec)
        await put_file(ended, "/workspace/notes.txt", b"before the end")
        await kill_container(ended)
        await self._stopped(api, ended)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert sorted(c["state"] for c in await api.list_containers(instance)) == [
            "exited", "running"]
        kept = await api.kept_containers(instance)
        assert [(c["id"], c["state"], c["record"]) for c in kept] == [(ended, "exited", {})]
        assert kept[0]["finished"] >= kept[0]["created"] > 0
        assert await api.unpause_container(running) is False
        # Its files are read on its node (a files pod there), while it ended.
        assert await api.read_file(ended, "/workspace/notes.txt", 100) == b"before the end"
        files = [p for p in standin.store.history if p[1] == "Pod" and p[2] == "ADDED"
                 and p[3]["metadata"].get("labels", {}).get("io.capsule.files-of") == ended]
        assert [p[3]["spec"]["nodeName"] for p in files] == ["standin-node"]
        await api.start_container(ended)
        assert (await api.container_state(ended))["Running"] is True
        assert await api.read_file(ended, "/workspace/notes.txt", 100) == b"before the end"
        assert await api.kept_containers(instance) == []

    @pytest_twisted.ensureDeferred
    async def test_a_kept_session_is_its_claim(self, api, spec):
        """
        What is kept: /workspace and the saved screen, on the session's own
        claim, which carries what lists it and makes its pod again (the
        manifest, capsule's labels, when, and capsule's record: whose, why);
        what is not: files elsewhere, the pod's own.
        """
        labelled = replace(spec, labels={**spec.labels, "io.capsule.user": "ann@example.org",
                                         "io.capsule.profile": "shell"})
        pod = await self.create(api, labelled, "kept")
        screen = "/home/developer/.cache/capsule/screen-" + "a" * 8
        await api.put_file(pod, "/workspace/notes.txt", b"in the workspace")
        await api.put_file(pod, screen, b"the screen")
        await api.put_file(pod, "/home/developer/elsewhere", b"the pod's own")
        claim = await api._get_claim(pod)
        assert claim["metadata"]["name"] == pod
        assert claim["metadata"]["labels"]["io.capsule.claim"] == "session"
        assert claim["metadata"]["labels"][LABEL_INSTANCE] == spec.labels[LABEL_INSTANCE]
        manifest = json.loads(claim["metadata"]["annotations"]["io.capsule.pod"])
        mounts = {m["mountPath"]: m.get("subPath")
                  for m in manifest["spec"]["containers"][0]["volumeMounts"]}
        assert mounts == {"/workspace": "workspace",
                          "/home/developer/.cache/capsule": "screen"}
        assert await api.stop_container(pod, timeout=1) is True
        await api.note_kept(pod, {"user": "ann@example.org", "reason": "put_away",
                                  "kept_at": 1.5})
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        kept = await api.kept_containers({**instance, "io.capsule.user": "ann@example.org"})
        assert [c["id"] for c in kept] == [pod]
        assert kept[0]["labels"] == {**labelled.labels, "io.capsule.contract": "kept"}
        assert kept[0]["record"] == {"user": "ann@example.org", "reason": "put_away",
                                     "kept_at": 1.5}
        assert kept[0]["size"] is None
        assert [(c["id"], c["state"]) for c in await api.list_containers(instance)] == [
            (pod, "exited")]
        state = await api.container_state(pod)
        assert (state["Running"], state["Reason"]) == (False, "Kept")
        await api.start_container(pod)
        assert await api.read_file(pod, "/workspace/notes.txt", 100) == b"in the workspace"
        assert await api.read_file(pod, screen, 100) == b"the screen"
        assert await api.read_file(pod, "/home/developer/elsewhere", 100) is None
        # Resumed: the record goes with the kept state.
        claim = await api._get_claim(pod)
        assert "io.capsule.kept-record" not in claim["metadata"]["annotations"]
        assert await api.kept_containers(instance) == []
        # Removed: the claim with the pod, kept or not.
        await api.stop_container(pod, timeout=1)
        assert await api.remove_container(pod) is True
        assert await api._get_claim(pod) is None
        assert await api.container_state(pod) is None
        assert await api.remove_container(pod) is False
        assert await api.list_containers(instance) == []

    @pytest_twisted.ensureDeferred
    async def test_export_of_a_kept_session(self, api, spec):
        """
        A kept session's workspace exports from its claim (a short-lived pod
        mounts it, and goes).
        """
        pod = await self.create(api, spec, "kept")
        await api.put_file(pod, "/workspace/notes.txt", b"exported while kept")
        await api.stop_container(pod, timeout=1)
        chunks: list[bytes] = []
        await api.export_workspace(pod, "/workspace", chunks.append)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            notes = tar.getmember("workspace/notes.txt")
            assert tar.extractfile(notes).read() == b"exported while kept"
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert [(c["id"], c["state"]) for c in await api.list_containers(instance)] == [
            (pod, "exited")]
        await api.remove_container(pod)
        with pytest.raises(ContainerGone):
            await api.export_workspace(pod, "/workspace", chunks.append)

    @pytest_twisted.ensureDeferred
    async def test_a_pod_without_its_claim_is_not_kept(self, api, spec):
        """
        A pod whose claim someone deleted cannot be kept: stopping it is
        refused (it runs on), and a pod gone with its claim is gone.
        """
        pod = await self.create(api, spec)
        assert await api._delete_claim(pod) is True
        with pytest.raises(Unsupported):
            await api.stop_container(pod, timeout=1)
        assert (await api.container_state(pod))["Running"] is True
        await api.remove_container(pod)
        with pytest.raises(ContainerGone):
            await api.start_container(pod)

    # -- secrets: a Secret of the session's own, never values in its pod ------------

    async def _secrets(self, api, spec) -> list[dict]:
        found = await api._core("list_namespaced_secret", api.namespace,
                                label_selector=f"{LABEL_INSTANCE}={spec.labels[LABEL_INSTANCE]}")
        return found.get("items") or []

    async def _environment(self, api, pod) -> bytes:
        result = await api.run_command(pod, ["sh", "-c", 'printf %s "$CAPSULE_TOKEN"'],
                                       "developer", "/workspace", {})
        assert result.exit_code == 0, result.stderr
        return result.stdout

    @pytest_twisted.ensureDeferred
    async def test_secrets_reach_the_session_not_its_pod(self, api, spec):
        """
        A spec's secrets are in the session's environment, from a Secret of
        its own (named after the pod, labelled like it): not in the pod nor
        in its claim's copy of it.  Kept, the Secret stays with the claim
        and the resumed pod has them; removed, it goes.
        """
        value = f"the secret {uuid.uuid4().hex}"
        secret = replace(spec, secrets={"CAPSULE_TOKEN": value})
        pod = await self.create(api, secret)
        assert await self._environment(api, pod) == value.encode()
        [made] = await self._secrets(api, spec)
        assert made["metadata"]["name"] == f"{pod}-env"
        read = await api._get_pod(pod)
        assert made["metadata"]["labels"] == read["metadata"]["labels"]
        assert value not in json.dumps(read)
        claim = await api._get_claim(pod)
        assert value not in json.dumps(claim)
        # Owned by the claim: the cluster deletes it with the claim.
        assert [(o["kind"], o["name"], o["uid"]) for o in made["metadata"][
            "ownerReferences"]] == [("PersistentVolumeClaim", pod, claim["metadata"]["uid"])]
        assert await api.stop_container(pod, timeout=1) is True
        assert [s["metadata"]["name"] for s in await self._secrets(api, spec)] == [
            f"{pod}-env"]
        await api.start_container(pod)
        assert await self._environment(api, pod) == value.encode()
        assert await api.remove_container(pod) is True
        assert await self._secrets(api, spec) == []
        # A kept session removed: its Secret with its claim.
        kept = await self.create(api, secret)
        await api.stop_container(kept, timeout=1)
        assert await api.remove_container(kept) is True
        assert await self._secrets(api, spec) == []
        # No secrets, no Secret.
        plain = await self.create(api, spec)
        assert await self._secrets(api, spec) == []
        assert await self._environment(api, plain) == b""

    @pytest_twisted.ensureDeferred
    async def test_a_pod_that_cannot_be_made_leaves_no_secret(self, api, spec):
        missing = replace(spec, image="capsule-contract-no-such-image:missing",
                          secrets={"CAPSULE_TOKEN": "x"})
        with pytest.raises(DockerError):
            await self.create(api, missing)
        assert await self._secrets(api, spec) == []
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert await api.list_containers(instance) == []

    @pytest_twisted.ensureDeferred
    async def test_a_kept_session_whose_secret_is_gone_does_not_resume(self, api, spec):
        """
        The resumed pod needs its Secret: deleted (by someone else), the pod
        cannot be made and resuming says why.
        """
        pod = await self.create(api, replace(spec, secrets={"CAPSULE_TOKEN": "x"}))
        await api.stop_container(pod, timeout=1)
        assert await api._delete_secret(pod) is True
        with pytest.raises(DockerError) as refused:
            await api.start_container(pod)
        assert "CreateContainerConfigError" in str(refused.value)
        assert f'secret "{pod}-env" not found' in str(refused.value)
        assert await api.remove_container(pod) is True

    @pytest_twisted.ensureDeferred
    async def test_container_cpu_of_a_pod_is_unknown(self, api, spec):
        pod = await self.create(api, spec)
        assert await api.container_cpu(pod) is None

    @pytest_twisted.ensureDeferred
    async def test_a_symlink_in_a_running_pod_is_never_followed(self, api, spec, make_symlink):
        """
        As the contract's case, in a running pod: a path through a link the
        pod's user made reads as no file, and writing it is refused, the
        link and what it points to left as they were.
        """
        pod = await self.create(api, spec)
        await api.put_file(pod, "/workspace/mine", b"mine\n")
        await make_symlink(pod, "/workspace/screen", "/workspace/mine")
        assert await api.read_file(pod, "/workspace/screen", 4096) is None
        await make_symlink(pod, "/workspace/dir", "/workspace")
        assert await api.read_file(pod, "/workspace/dir/mine", 4096) is None
        with pytest.raises(DockerError):
            await api.put_file(pod, "/workspace/screen", b"through the link")
        with pytest.raises(DockerError):
            await api.put_file(pod, "/workspace/dir/mine", b"through the link")
        with pytest.raises(DockerError):
            await api.put_file(pod, "/workspace/dir/new/file", b"through the link")
        # A directory is not replaced by a file.
        with pytest.raises(DockerError):
            await api.put_file(pod, "/workspace", b"x")
        assert await api.read_file(pod, "/workspace/mine", 4096) == b"mine\n"
        result = await api.run_command(pod, ["sh", "-c", "readlink /workspace/screen;"
                                             " ls -A /workspace"], "developer", "/", {})
        assert result.stdout.split(b"\n")[0] == b"/workspace/mine"
        # Nothing left half-written.
        assert sorted(result.stdout.split(b"\n")[1:-1]) == [b"dir", b"mine", b"screen"]

    @pytest_twisted.ensureDeferred
    async def test_a_session_pod_is_hardened(self, api, spec, standin, namespace):
        hardened = replace(spec, read_only_root=True, environment={"TERM": "xterm", "A": "b"},
                           labels={**spec.labels, "io.capsule.user": "ann@example.org"})
        pod = await self.create(api, hardened, "hardened")
        found = json.loads((await _get(standin.url,
                                       f"/api/v1/namespaces/{namespace}/pods/{pod}"))[1])
        container = found["spec"]["containers"][0]
        assert container["securityContext"] == {
            "runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True,
            "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
            "readOnlyRootFilesystem": True}
        assert container["resources"] == {
            "limits": {"memory": str(256 * 2**20), "cpu": "500m"},
            "requests": {"memory": str(256 * 2**20), "cpu": "250m"}}
        assert found["spec"]["automountServiceAccountToken"] is False
        # A label value no label can hold lives in the annotation; both
        # select the pod.
        assert "io.capsule.user" not in found["metadata"]["labels"]
        assert json.loads(found["metadata"]["annotations"][LABELS_ANNOTATION]) == {
            **hardened.labels, "io.capsule.contract": "hardened"}
        listed = await api.list_containers({LABEL_INSTANCE: spec.labels[LABEL_INSTANCE],
                                            "io.capsule.user": "ann@example.org"})
        assert [c["id"] for c in listed] == [pod]
        assert listed[0]["labels"] == {**hardened.labels, "io.capsule.contract": "hardened"}
        # What the container is, on the engine that runs it.
        info = await deferToThread(docker_client().api.inspect_container,
                                   standin.container_of(namespace, pod))
        host = info["HostConfig"]
        assert info["Config"]["User"] == "1000:1000"
        assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["ReadonlyRootfs"] is True and host["Memory"] == 256 * 2**20
        result = await api.run_command(pod, ["sh", "-c", "id -u; echo $A; pwd; touch /x"],
                                       "developer", "/workspace", {"B": "c"})
        assert result.stdout.split(b"\n")[:3] == [b"1000", b"b", b"/workspace"]
        assert result.exit_code != 0 and b"Read-only" in result.stderr

    @pytest_twisted.ensureDeferred
    async def test_an_exec_with_a_tty_is_resized(self, api, spec):
        pod = await self.create(api, spec)
        recorder, process = await self.spawn(api, pod, [
            "sh", "-c", "printf ready; while read x; do [ \"$x\" = q ] && exit 5; stty size;"
            " done"], tty=True)
        await recorder.wait_for(b"ready")
        process.resize(123, 45)
        # The resize reaches the terminal on its own channel: ask until the
        # terminal has it.
        for _ in range(50):
            process.write(b"\r")
            if b"45 123" in recorder.output[1]:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert b"45 123" in recorder.output[1]
        process.write(b"q\r")
        await recorder.wait_ended()
        assert recorder.reason.value.exitCode == 5

    @pytest_twisted.ensureDeferred
    async def test_files_in_and_out_of_a_running_pod(self, api, spec):
        pod = await self.create(api, spec)
        await api.put_file(pod, "/home/developer/.capsule/screen", b"\x1b[1mscreen\n", 0o600)
        assert await api.read_file(pod, "/home/developer/.capsule/screen", 100) == (
            b"\x1b[1mscreen\n")
        assert await api.read_file(pod, "/home/developer/.capsule/screen", 4) == b"een\n"
        assert await api.read_file(pod, "/nowhere", 4) is None
        chunks = []
        await api.export_workspace(pod, "/home/developer/.capsule", chunks.append)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            member = tar.getmember(".capsule/screen")
            assert member.mode & 0o777 == 0o600 and member.uid == 1000

    @pytest_twisted.ensureDeferred
    async def test_a_pod_deleted_from_under_an_exec(self, api, spec, standin, namespace):
        pod = await self.create(api, spec)
        recorder, _ = await self.spawn(api, pod, ["sh", "-c", "printf ready; exec sleep 100"])
        await recorder.wait_for(b"ready")
        status, _ = await _request(standin.url, "DELETE",
                                   f"/api/v1/namespaces/{namespace}/pods/{pod}",
                                   {"gracePeriodSeconds": 0})
        assert status == 200
        await recorder.wait_ended()
        assert recorder.reason.value.exitCode != 0
        # Its claim holds its files: a session stopped under it, kept where
        # its profile keeps sessions.
        state = await api.container_state(pod)
        assert (state["Running"], state["Reason"], state["ExitCode"]) == (False, "Deleted", 137)
        assert "not by capsule" in state["Error"]
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert [c["id"] for c in await api.kept_containers(instance)] == [pod]
        assert await api.remove_container(pod) is True
        assert await api.container_state(pod) is None

    @pytest_twisted.ensureDeferred
    async def test_volume_claims_of_named_volumes(self, api, spec, standin, namespace):
        volume = f"capsule-agent-{uuid.uuid4().hex[:6]}"
        with_volume = replace(spec, volumes=((volume, "/home/developer/.claude"),),
                              volume_labels={LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]})
        first = await self.create(api, with_volume)
        await api.put_file(first, "/home/developer/.claude/kept", b"kept\n")
        await api.remove_container(first)
        second = await self.create(api, with_volume)
        assert await api.read_file(second, "/home/developer/.claude/kept", 10) == b"kept\n"
        status, body = await _get(standin.url, f"/api/v1/namespaces/{namespace}/"
                                  f"persistentvolumeclaims/{volume}")
        assert status == 200 and json.loads(body)["status"]["phase"] == "Bound"
        await api.remove_container(second)
        await _request(standin.url, "DELETE",
                       f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{volume}")


CLUSTER = os.environ.get("CAPSULE_TEST_KUBECONFIG")
STANDIN_ONLY = "looks at the pods' containers through the stand-in and Docker"
NOT_KILLED = ("a pod's container cannot be killed from outside but by its node (the stand-in"
              " kills its Docker container)")


@pytest.fixture(scope="module")
def cluster_namespace():
    """
    The real cluster's namespace: CAPSULE_TEST_KUBE_NAMESPACE, else one
    made for the run and deleted after it.
    """
    given = os.environ.get("CAPSULE_TEST_KUBE_NAMESPACE")
    if given:
        yield given
        return
    from capsule.engine.kubernetes import kube_configuration
    client = kubernetes.client.ApiClient(kube_configuration(CLUSTER))
    core = kubernetes.client.CoreV1Api(client)
    name = f"capsule-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"io.capsule.test": "engine-contract"}}})
    try:
        # Pods are refused until the namespace's default service
        # account is made (by the controller manager, at once).
        for _ in range(300):
            try:
                core.read_namespaced_service_account("default", name)
                break
            except kubernetes.client.exceptions.ApiException as e:
                if e.status != 404:
                    raise
                time.sleep(0.1)
        yield name
    finally:
        core.delete_namespace(name)
        client.close()


@pytest.mark.skipif(not CLUSTER, reason="CAPSULE_TEST_KUBECONFIG is not set")
class TestKubernetesOnCluster(TestKubernetesOnStandin):
    """
    The same contract against a real cluster (kind, k3s...), whenever
    CAPSULE_TEST_KUBECONFIG names its kubeconfig: in the namespace
    CAPSULE_TEST_KUBE_NAMESPACE (which must exist), else in one made for
    the run and deleted after it (the kubeconfig's user may then create
    namespaces).  The session image (CAPSULE_TEST_IMAGE) must be where the
    nodes find it; the namespace needs a default storage class (kind's and
    k3s's local-path is one).  Cases that reach into the stand-in or the
    Docker engine under it (killing a pod's container, putting files by
    docker exec, reading what a container is) are skipped, saying so.
    Not run on capsule's CI machines, which have no cluster.  See this
    module's docstring for the command lines.
    """

    @pytest.fixture
    def api(self, spec, cluster_namespace):
        from capsule.engine.kubernetes import kube_configuration
        api = KubernetesAPI(reactor, kube_configuration(CLUSTER), namespace=cluster_namespace,
                            threads=4, export_threads=1, timeout=60, start_timeout=300)
        api.start()
        yield api
        for pod in pytest_twisted.blockon(api.list_containers(
                {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]})):
            pytest_twisted.blockon(api.remove_container(pod["id"]))
        api.stop()

    @pytest.fixture
    def put_file(self, api):
        # No other way into a pod than an exec.
        def put(pod, path, data):
            return api.put_file(pod, path, data)
        return put

    @pytest.mark.skip(reason=NOT_KILLED)
    def test_a_killed_container(self):
        pass

    @pytest.mark.skip(reason=NOT_KILLED)
    def test_an_ended_pod_is_kept_by_its_claim(self):
        pass

    @pytest.mark.skip(reason=STANDIN_ONLY)
    def test_a_session_pod_is_hardened(self):
        pass

    @pytest.mark.skip(reason=STANDIN_ONLY)
    def test_a_pod_deleted_from_under_an_exec(self):
        pass

    @pytest.mark.skip(reason=STANDIN_ONLY)
    def test_volume_claims_of_named_volumes(self):
        pass


def _thd_write_file(container_id: str, path: str, data: bytes) -> None:
    result = docker_client().containers.get(container_id).exec_run(
        ["sh", "-c", 'printf %s "$1" > "$0"', path, data.decode("ascii")], user="1000")
    assert result.exit_code == 0, result.output


def _request(base: str, method: str, path: str, body=None, headers=None):
    def _thd():
        import requests
        response = requests.request(method, base + path, json=body, headers=headers,
                                    timeout=30, stream=False)
        return response.status_code, response.content
    return deferToThread(_thd)


def _get(base: str, path: str):
    return _request(base, "GET", path)


# -- the stand-in's fidelity: the API server's answers ------------------------

POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "p", "labels": {"app": "x"}},
       "spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "60"]}]}}


def _pod(name: str, **labels) -> dict:
    pod = json.loads(json.dumps(POD))
    pod["metadata"]["name"] = name
    pod["metadata"]["labels"] = {LABEL_INSTANCE: f"standin-{name}", **labels}
    return pod


@pytest_twisted.ensureDeferred
async def test_standin_errors_are_status_objects(standin, namespace):
    base = f"/api/v1/namespaces/{namespace}/pods"
    status, body = await _get(standin.url, f"{base}/nobody")
    assert status == 404 and json.loads(body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "nobody" not found', "reason": "NotFound",
        "details": {"name": "nobody", "kind": "pods"}, "code": 404}
    name = f"p-{uuid.uuid4().hex[:8]}"
    try:
        status, body = await _request(standin.url, "POST", base, _pod(name))
        assert status == 201
        created = json.loads(body)
        assert created["status"]["phase"] == "Pending" and created["metadata"]["uid"]
        status, body = await _request(standin.url, "POST", base, _pod(name))
        assert status == 409 and json.loads(body)["reason"] == "AlreadyExists"
        status, body = await _request(standin.url, "DELETE", f"{base}/{name}",
                                      {"preconditions": {"uid": "not-its-uid"}})
        assert status == 409 and json.loads(body)["reason"] == "Conflict"
        status, body = await _request(standin.url, "POST", base, _pod("Not_A_Name"))
        answer = json.loads(body)
        assert status == 422 and answer["reason"] == "Invalid"
        assert answer["details"]["causes"][0]["field"] == "metadata.name"
        status, body = await _request(standin.url, "POST", base, _pod("ok", bad="a b"))
        assert status == 422 and "metadata.labels" in json.loads(body)["message"]
        status, body = await _get(standin.url, f"{base}/{name}/exec?command=true")
        assert status == 400 and json.loads(body)["reason"] == "BadRequest"
    finally:
        await _request(standin.url, "DELETE", f"{base}/{name}", {"gracePeriodSeconds": 0})
        remove_instance_containers(f"standin-{name}")


@pytest_twisted.ensureDeferred
async def test_standin_watch_by_label_and_a_stale_resource_version(standin, namespace):
    base = f"/api/v1/namespaces/{namespace}/pods"
    name = f"w-{uuid.uuid4().hex[:8]}"
    status, body = await _get(standin.url, f"{base}?labelSelector=app%3Dnone")
    assert status == 200 and json.loads(body)["items"] == []
    start = json.loads(body)["metadata"]["resourceVersion"]
    try:
        await _request(standin.url, "POST", base, _pod(name, app="w"))
        # From the list's version: the pod's ADDED, then its changes to Running.
        status, body = await _get(
            standin.url, f"{base}?watch=true&labelSelector=app%3Dw&resourceVersion={start}"
            "&timeoutSeconds=3")
        events = [json.loads(line) for line in body.splitlines()]
        assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == name
        assert any(e["type"] == "MODIFIED" and e["object"]["status"]["phase"] == "Running"
                   for e in events)
        status, body = await _get(standin.url, f"{base}?watch=true&labelSelector=app%3Dother"
                                  f"&resourceVersion={start}&timeoutSeconds=1")
        assert body == b""
        standin.compact()
        status, body = await _get(standin.url, f"{base}?watch=true&resourceVersion={start}")
        event = json.loads(body.splitlines()[0])
        assert status == 200 and event["type"] == "ERROR"
        assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    finally:
        await _request(standin.url, "DELETE", f"{base}/{name}", {"gracePeriodSeconds": 0})
        remove_instance_containers(f"standin-{name}")


@pytest_twisted.ensureDeferred
async def test_standin_network_policies(standin, namespace):
    base = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "sessions"},
              "spec": {"podSelector": {"matchLabels": {"io.capsule.managed": "true"}},
                       "policyTypes": ["Ingress"], "ingress": []}}
    assert (await _request(standin.url, "POST", base, policy))[0] == 201
    assert (await _request(standin.url, "POST", base, policy))[0] == 409
    status, body = await _get(standin.url, base)
    assert [p["metadata"]["name"] for p in json.loads(body)["items"]] == ["sessions"]
    assert (await _request(standin.url, "DELETE", f"{base}/sessions"))[0] == 200
    assert (await _get(standin.url, f"{base}/sessions"))[0] == 404



class KeeperReader(ExecRecorder):
    """
    A relay exec's output as the keeper's frames: the terminal's bytes (its
    preamble first) gathered from its C{o} frames, as C{output[1]}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reader = FrameReader(RELAY_FRAMES)
        self.terminal = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            for kind, payload in self.reader.feed(data):
                if kind == b"o":
                    self.terminal += payload
            self.output[1] = b""
            data = self.terminal
        super().childDataReceived(fd, data)


@pytest_twisted.ensureDeferred
async def test_the_keeper_runs_in_a_pod_and_keeps_its_output_across_relays(standin, namespace):
    """
    capsule's keeper, started by a relay exec through the pods/exec stream,
    holds the shell and its output: a second relay (as another capsule
    replica would make) gets the replay and types on.
    """
    instance = f"contract-{uuid.uuid4().hex[:10]}"
    api = _kube_api(standin.url, namespace)
    try:
        pod = await api.create_session_container("s", ContainerSpec(
            image=IMAGE, memory="256m", cpus=0.5,
            labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance}))
        shell = ("sh", "-c", "echo first-line; while read x; do echo \"got $x\"; done")
        first = KeeperReader()
        process = await api.spawn_exec(first, pod, keeper_argv(shell), "developer",
                                       "/workspace", {"TERM": "xterm"}, None, tty=False)
        await first.wait_for(b"first-line")
        assert first.terminal.startswith(b"\x1b_capsule-keeper;offset=0;")
        process.write(encode_input(b"one\n"))
        await first.wait_for(b"got one")
        process.loseConnection()
        await first.wait_ended()
        second = KeeperReader()
        process = await api.spawn_exec(second, pod, keeper_argv(shell), "developer",
                                       "/workspace", {"TERM": "xterm"}, None, tty=False)
        await second.wait_for(b"got one")
        assert b"first-line" in second.terminal
        process.write(encode_input(b"two\n"))
        await second.wait_for(b"got two")
        process.loseConnection()
        await second.wait_ended()
    finally:
        api.stop()
        remove_instance_containers(instance)


@pytest.mark.parametrize("subprotocol", ["v4.channel.k8s.io", "v5.channel.k8s.io"])
@pytest_twisted.ensureDeferred
async def test_standin_exec_framing(standin, namespace, subprotocol):
    """
    The exec stream as a client of the API reads it: the subprotocol
    chosen, an empty message on stdout first, output on 1 and 2, the end
    as a Status on 3; with v5, stdin's end on 255.
    """
    import websocket
    base = f"/api/v1/namespaces/{namespace}/pods"
    name = f"x-{uuid.uuid4().hex[:8]}"
    await _request(standin.url, "POST", base, _pod(name))
    try:
        for _ in range(100):
            status, body = await _get(standin.url, f"{base}/{name}")
            if json.loads(body)["status"]["phase"] == "Running":
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        script = "read x; echo out $x; echo err >&2; exit 3"
        url = (standin.url.replace("http", "ws") + f"{base}/{name}/exec?command=sh&command=-c"
               f"&command={script.replace(' ', '+').replace(';', '%3B').replace('>&', '%3E%26')}"
               "&stdin=true&stdout=true&stderr=true")

        def _thd():
            ws = websocket.create_connection(url, subprotocols=[subprotocol], timeout=20)
            chosen = ws.getsubprotocol()
            ws.send_binary(b"\x00" + (b"in" if subprotocol.startswith("v5") else b"in\n"))
            if subprotocol.startswith("v5"):
                ws.send_binary(b"\xff\x00")
            messages = []
            while True:
                try:
                    message = ws.recv()
                except websocket.WebSocketConnectionClosedException:
                    break
                if not message:
                    break
                messages.append(message)
            ws.close()
            return chosen, messages
        chosen, messages = await deferToThread(_thd)
        assert chosen == subprotocol
        assert messages[0] == b"\x01"
        output = {1: b"", 2: b""}
        for m in messages[1:-1]:
            output[m[0]] += m[1:]
        # v5: the input's end reached read, without a newline.
        assert output == {1: b"out in\n", 2: b"err\n"}
        end = json.loads(messages[-1][1:])
        assert messages[-1][0] == 3 and end["reason"] == "NonZeroExitCode"
        assert end["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    finally:
        await _request(standin.url, "DELETE", f"{base}/{name}", {"gracePeriodSeconds": 0})
        remove_instance_containers(f"standin-{name}")


@pytest_twisted.ensureDeferred
async def test_an_evicted_pod_is_a_state_with_its_reason(standin, namespace):
    """
    A pod the node evicts ends its execs, and its state says why.
    """
    instance = f"contract-{uuid.uuid4().hex[:10]}"
    api = _kube_api(standin.url, namespace)
    try:
        pod = await api.create_session_container("s", ContainerSpec(
            image=IMAGE, memory="256m", cpus=0.5,
            labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance}))
        recorder = ExecRecorder()
        await api.spawn_exec(recorder, pod, ["sh", "-c", "printf ready; exec sleep 100"],
                             "developer", "/workspace", {}, None, tty=False)
        await recorder.wait_for(b"ready")
        await standin.evict(namespace, pod)
        await recorder.wait_ended()
        assert recorder.reason.check(ProcessTerminated)
        state = await api.container_state(pod)
        assert (state["Running"], state["Reason"], state["Phase"]) == (False, "Evicted", "Failed")
        assert "low on resource: memory" in state["Error"]
        assert [c["state"] for c in await api.list_containers({LABEL_INSTANCE: instance})] == [
            "exited"]
        assert await api.keeper_address(pod) == (None, None)
    finally:
        api.stop()
        remove_instance_containers(instance)


@pytest_twisted.ensureDeferred
async def test_standin_claims_by_label_and_their_merge_patch(standin, namespace):
    """
    Claims listed by label, and patched (their metadata) as the API server
    patches them with a JSON merge patch: a null removes, a stale
    resourceVersion is a 409 Conflict, another patch type a 415.
    """
    base = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims"
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "c", "labels": {"app": "kept"},
                          "annotations": {"a": "1", "b": "2"}},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "1Gi"}}}}
    assert (await _request(standin.url, "POST", base, claim))[0] == 201
    try:
        status, body = await _get(standin.url, f"{base}?labelSelector=app%3Dkept")
        [found] = json.loads(body)["items"]
        merge = {"Content-Type": "application/merge-patch+json"}
        status, body = await _request(standin.url, "PATCH", f"{base}/c", {"metadata": {
            "annotations": {"a": None, "c": "3"}}}, merge)
        patched = json.loads(body)
        assert status == 200 and patched["metadata"]["annotations"] == {"b": "2", "c": "3"}
        assert patched["spec"] == found["spec"]
        status, body = await _request(standin.url, "PATCH", f"{base}/c", {"metadata": {
            "resourceVersion": found["metadata"]["resourceVersion"], "labels": {"x": "y"}}},
            merge)
        assert status == 409 and json.loads(body)["reason"] == "Conflict"
        status, body = await _request(standin.url, "PATCH", f"{base}/c", [
            {"op": "add", "path": "/metadata/labels/x", "value": "y"}],
            {"Content-Type": "application/json-patch+json"})
        assert status == 415 and json.loads(body)["reason"] == "UnsupportedMediaType"
        status, body = await _request(standin.url, "PATCH", f"{base}/none", {}, merge)
        assert status == 404
    finally:
        await _request(standin.url, "DELETE", f"{base}/c")


@pytest_twisted.ensureDeferred
async def test_standin_subpath_mounts(standin, namespace):
    """
    A claim mounted by subPath: a directory of it, made where missing with
    the owner and mode of the volume's root (its fsGroup's); an absolute
    subPath or one with '..' fails the pod.
    """
    claims = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims"
    pods = f"/api/v1/namespaces/{namespace}/pods"
    name = f"s-{uuid.uuid4().hex[:8]}"
    await _request(standin.url, "POST", claims, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Gi"}}}})

    def pod(pod_name, sub):
        body = _pod(pod_name)
        body["spec"]["securityContext"] = {"runAsUser": 1000, "runAsGroup": 1000,
                                           "fsGroup": 1000}
        body["spec"]["containers"][0]["volumeMounts"] = [
            {"name": "v", "mountPath": "/data", "subPath": sub}]
        body["spec"]["volumes"] = [{"name": "v", "persistentVolumeClaim": {"claimName": name}}]
        return body

    async def phase_and_reason(pod_name):
        for _ in range(100):
            found = json.loads((await _get(standin.url, f"{pods}/{pod_name}"))[1])
            waiting = ((found["status"].get("containerStatuses") or [{}])[0].get("state")
                       or {}).get("waiting") or {}
            if found["status"]["phase"] == "Running" or waiting.get("reason"):
                return found["status"]["phase"], waiting.get("reason")
            await task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("the pod did not start")

    try:
        await _request(standin.url, "POST", pods, pod(f"{name}-a", "deep/sub"))
        assert await phase_and_reason(f"{name}-a") == ("Running", None)
        container = standin.container_of(namespace, f"{name}-a")
        result = await deferToThread(docker_client().containers.get(container).exec_run, [
            "sh", "-c", "touch /data/f && stat -c '%g %A' /data"], user="1000")
        assert result.exit_code == 0, result.output
        assert result.output.split()[0] == b"1000" and result.output.split()[1][5] == ord("w")
        await _request(standin.url, "POST", pods, pod(f"{name}-b", "../up"))
        assert await phase_and_reason(f"{name}-b") == ("Pending", "CreateContainerConfigError")
    finally:
        for p in ("a", "b"):
            await _request(standin.url, "DELETE", f"{pods}/{name}-{p}", {"gracePeriodSeconds": 0})
            remove_instance_containers(f"standin-{name}-{p}")
        await _request(standin.url, "DELETE", f"{claims}/{name}")


@pytest_twisted.ensureDeferred
async def test_standin_secrets(standin, namespace):
    """
    Secrets as the API server keeps them (stringData merged into data, a
    key or data it refuses), listed by label, and a pod's env taken from
    one by secretKeyRef when its container is made; a missing one leaves
    the pod Pending with the kubelet's reason and message.
    """
    import base64

    base = f"/api/v1/namespaces/{namespace}/secrets"
    pods = f"/api/v1/namespaces/{namespace}/pods"
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "s", "labels": {"app": "secret"}},
              "data": {"A": base64.b64encode(b"from data").decode()},
              "stringData": {"B": "from stringData"}}
    status, body = await _request(standin.url, "POST", base, secret)
    made = json.loads(body)
    assert status == 201 and made["type"] == "Opaque" and "stringData" not in made
    assert {k: base64.b64decode(v) for k, v in made["data"].items()} == {
        "A": b"from data", "B": b"from stringData"}
    env_pod = _pod(f"e-{uuid.uuid4().hex[:8]}")
    stuck = _pod(f"m-{uuid.uuid4().hex[:8]}")
    try:
        assert (await _request(standin.url, "POST", base, secret))[0] == 409
        status, body = await _request(standin.url, "POST", base, {
            "metadata": {"name": "bad"}, "data": {"A": "not base64!"}})
        assert status == 400 and "illegal base64 data" in json.loads(body)["message"]
        status, body = await _request(standin.url, "POST", base, {
            "metadata": {"name": "bad"}, "stringData": {"not a key": "x"}})
        assert status == 422 and json.loads(body)["details"]["causes"][0]["field"] == (
            "data[not a key]")
        status, body = await _get(standin.url, f"{base}?labelSelector=app%3Dsecret")
        assert [s["metadata"]["name"] for s in json.loads(body)["items"]] == ["s"]
        status, body = await _get(standin.url, f"{base}/s")
        assert status == 200 and json.loads(body)["data"] == made["data"]
        container = env_pod["spec"]["containers"][0]
        # (The name the engine's execs ask for.)
        container["name"] = "session"
        container["env"] = [
            {"name": "PLAIN", "value": "p"},
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "B"}}},
            {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {
                "name": "none", "key": "B", "optional": True}}}]
        await _request(standin.url, "POST", pods, env_pod)
        stuck["spec"]["containers"][0]["env"] = [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "C"}}}]
        await _request(standin.url, "POST", pods, stuck)
        api = _kube_api(standin.url, namespace)
        try:
            name = env_pod["metadata"]["name"]
            await api._running(name, None)
            result = await api.run_command(name, ["sh", "-c", 'echo "$PLAIN,$FROM_SECRET,'
                                                  '${OPTIONAL-unset}"'], "", "", {})
            assert result.stdout == b"p,from stringData,unset\n"
            with pytest.raises(DockerError, match="CreateContainerConfigError: couldn't find"
                               f" key C in Secret {namespace}/s"):
                await api._running(stuck["metadata"]["name"], None)
            pod = await api._get_pod(stuck["metadata"]["name"])
            assert pod["status"]["phase"] == "Pending"
        finally:
            api.stop()
        assert (await _request(standin.url, "DELETE", f"{base}/s"))[0] == 200
        assert (await _get(standin.url, f"{base}/s"))[0] == 404
        assert (await _request(standin.url, "DELETE", f"{base}/s"))[0] == 404
    finally:
        await _request(standin.url, "DELETE", f"{base}/s")
        for pod in (env_pod, stuck):
            await _request(standin.url, "DELETE", f"{pods}/{pod['metadata']['name']}",
                           {"gracePeriodSeconds": 0})
            remove_instance_containers(pod["metadata"]["labels"][LABEL_INSTANCE])
