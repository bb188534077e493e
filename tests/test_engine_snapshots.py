"""
The pure parts of capsule.engine.snapshots and capsule.engine.container_files:
Docker's times, the cgroup's CPU counters, the paths capsule reads and
writes, a file's last bytes from an archive.  The calls themselves are in the Docker contract
(tests/engine_contract.py).
"""

import io
import tarfile

import pytest

from capsule.engine import snapshots
from capsule.engine.container_files import Chunks as _Chunks
from capsule.engine.container_files import absolute_path as _absolute
from capsule.engine.container_files import last_bytes as _last_bytes
from capsule.engine.container_files import path_parts as _parts
from capsule.engine.snapshots import KeptContainers, _snapshot_volumes, docker_time

ID = "a" * 64


def test_docker_time():
    assert docker_time("2026-12-07T08:27:25.123456789Z") == pytest.approx(1796632045.123456789)
    assert docker_time("2026-12-07T09:27:25+01:00") == 1796632045.0
    assert docker_time("0001-01-01T00:00:00Z") == 0.0
    assert docker_time(None) == 0.0
    assert docker_time("yesterday") == 0.0


def test_paths():
    assert _parts("/home/developer/x") == ["/home", "/home/developer", "/home/developer/x"]
    assert _absolute("/a/b") == "/a/b"
    for bad in ("a/b", "/a/../b", "/a//b", "/a/", "/", "/a\0b", None):
        with pytest.raises(ValueError):
            _absolute(bad)


def _tar(name, data, kind=tarfile.REGTYPE) -> bytes:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        entry = tarfile.TarInfo(name)
        entry.type = kind
        entry.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(entry, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return archive.getvalue()


def test_last_bytes_of_an_archive_in_small_chunks():
    data = bytes(range(256)) * 5000
    raw = _tar("screen", data)
    chunks = [raw[at:at + 1000] for at in range(0, len(raw), 1000)]
    assert _last_bytes(_Chunks(chunks), 300000) == data[-300000:]
    assert _last_bytes(_Chunks([raw]), 10 ** 9) == data
    assert _last_bytes(_Chunks([raw]), 0) == b""


def test_last_bytes_of_a_link_is_none():
    assert _last_bytes(_Chunks([_tar("screen", b"", tarfile.SYMTYPE)]), 100) is None


def test_snapshot_volumes_from_a_label():
    label = snapshots.LABEL_SNAPSHOT_VOLUMES
    assert _snapshot_volumes({label: '{"/workspace": "ab"}'}) == {"/workspace": "ab"}
    for bad in ("[1]", "{", "", "null"):
        assert _snapshot_volumes({label: bad}) == {}
    assert _snapshot_volumes({}) == {}


@pytest.mark.parametrize("name, text, seconds", [
    ("cpuacct.usage", "1500000000\n", 1.5),
    ("cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n", 2.5),
])
def test_cpu_from_the_cgroup(tmp_path, monkeypatch, name, text, seconds):
    (tmp_path / ID).mkdir()
    (tmp_path / ID / name).write_text(text)
    monkeypatch.setattr(snapshots, "CGROUP_V1", (str(tmp_path / "none" / "{id}" / name),))
    monkeypatch.setattr(snapshots, "CGROUP_V2", (str(tmp_path / "{id}" / name),))
    engine = KeptContainers()
    assert engine._cgroup_cpu(ID) == seconds
    # The place found is remembered.
    assert engine._cgroup_path == str(tmp_path / "{id}" / name)
    assert engine._cgroup_cpu("b" * 64) is None


def test_cpu_from_a_cgroup_that_says_nonsense(tmp_path, monkeypatch):
    (tmp_path / ID).mkdir()
    (tmp_path / ID / "cpuacct.usage").write_text("lots\n")
    monkeypatch.setattr(snapshots, "CGROUP_V1", (str(tmp_path / "{id}" / "cpuacct.usage"),))
    monkeypatch.setattr(snapshots, "CGROUP_V2", ())
    assert KeptContainers()._cgroup_cpu(ID) is None
