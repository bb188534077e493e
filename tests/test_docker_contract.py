"""
The engine contract (tests/engine_contract.py), against the fake engine.
"""

import uuid

import pytest
from twisted.internet.defer import succeed

from capsule.core.spec import ContainerSpec
from tests.support.fakes import FakeDockerAPI

# The suite lives outside a test module: let pytest explain its failures.
pytest.register_assert_rewrite("tests.engine_contract")
from .engine_contract import (FORK_PATHS, LABEL_INSTANCE, SCRIPT, SCRIPT_COMMAND, SCRIPT_SLEEP,
                              SCRIPT_TTY, EngineContract)


class ScriptProgram:
    """
    What the contract's scripts do, for the fake's execs.
    """

    def __init__(self, code: int, stderr: bytes) -> None:
        self._code, self._stderr = code, stderr
        self._line = b""

    def started(self, process) -> None:
        process.emit(b"ready")

    def received(self, process, data: bytes) -> None:
        self._line += data
        for end in (b"\n", b"\r"):
            if end in self._line:
                line = self._line.split(end, 1)[0]
                process.emit(b"got " + line)
                if self._stderr:
                    process.emit(self._stderr, fd=2)
                process.exit(self._code)
                return

    def closed(self, process) -> None:
        # read sees the end of its input; the rest goes nowhere.
        process.end(self._code)


class SleepProgram:
    """
    Says it is ready and runs on, whatever it is given.
    """

    def started(self, process) -> None:
        process.emit(b"ready")

    def received(self, process, data: bytes) -> None:
        pass


class TestFakeDocker(EngineContract):
    @pytest.fixture
    def api(self):
        api = FakeDockerAPI()
        api.programs[SCRIPT] = lambda: ScriptProgram(3, b"oops")
        api.programs[SCRIPT_TTY] = lambda: ScriptProgram(0, b"")
        api.programs[SCRIPT_SLEEP] = SleepProgram
        api.commands[SCRIPT_COMMAND] = lambda stdin: (stdin, b"oops", 3)
        return api

    @pytest.fixture
    def unreachable_api(self):
        api = FakeDockerAPI()
        api.reachable = False
        return api

    @pytest.fixture
    def spec(self):
        return ContainerSpec(image="capsule-runtime:latest",
                             labels={"io.capsule.managed": "true",
                                     LABEL_INSTANCE: f"contract-{uuid.uuid4().hex[:10]}"})

    @pytest.fixture
    def kill_container(self, api):
        def kill(container_id):
            api.kill_container(container_id)
            return succeed(None)
        return kill

    @pytest.fixture
    def network_name(self):
        return f"capsule-contract-{uuid.uuid4().hex[:10]}"

    @pytest.fixture
    def put_file(self, api):
        def put(container_id, path, data):
            api.add_file(container_id, path, data)
            return succeed(None)
        return put

    @pytest.fixture
    def make_symlink(self, api):
        def link(container_id, path, target):
            api.add_symlink(container_id, path, target)
            return succeed(None)
        return link

    @pytest.fixture
    def burn_cpu(self, api):
        def burn(container_id):
            before = api.cpu.get(container_id) or 0.0
            api.set_cpu(container_id, before + 1.0)
            return succeed(None)
        return burn

    @pytest.fixture
    def shape_files(self, api):
        def shape(container_id):
            container = api.containers[container_id]
            files = container.setdefault("files", {})
            modes = container.setdefault("modes", {})
            for path, data, mode, owner in (("/etc/skel/only", b"new\n", 0o644, 0),
                                            ("/rootfile", b"root\n", 0o644, 0),
                                            ("/workspace/a", b"a\n", 0o640, 1000),
                                            ("/workspace/b", b"a\n", 0o640, 1000)):
                files[path] = data
                modes[path] = (mode, owner, owner)
            modes["/etc/skel"] = (0o755, 0, 0)
            modes["/workspace/d"] = (0o751, 1000, 1000)
            api.add_symlink(container_id, "/workspace/link", "/etc/passwd")
            return succeed(None)
        return shape

    @pytest.fixture
    def file_tree(self, api):
        def tree(container_id):
            container = api.containers[container_id]
            files, modes = container.get("files", {}), container.get("modes", {})
            links = container.get("links", {})
            described = {}
            for path in FORK_PATHS:
                if path in links:
                    described[path] = f"link {links[path]}"
                elif path in files:
                    described[path] = f"file {modes.get(path)} {files[path]!r}"
                elif path in modes:
                    described[path] = f"directory {modes[path]}"
                else:
                    described[path] = "absent"
            return succeed(described)
        return tree
