"""
capsule.engine.forks without the engine: which way a fork is copied, and
the copy on the host (its guards, and what it keeps).  The calls
themselves are in the Docker contract (tests/engine_contract.py).
"""

import os
import stat

import docker.errors
import pytest

from capsule.core.spec import ContainerSpec
from capsule.engine import forks
from capsule.engine.forks import CopyRefused, Forks, copy_tree

IMAGE_ID = "sha256:" + "b" * 64
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the copy on the host needs root")


class Client:
    def __init__(self, driver="overlay2", image=IMAGE_ID):
        self.driver, self.image = driver, image
        self.info_calls = 0

    def info(self):
        self.info_calls += 1
        return {"Driver": self.driver, "DockerRootDir": "/var/lib/docker"}

    def inspect_image(self, name):
        if self.image is None:
            raise docker.errors.ImageNotFound(name)
        return {"Id": self.image}


def source(driver="overlay2"):
    return {"Id": "c" * 64, "Image": IMAGE_ID, "GraphDriver": {"Name": driver}}


def engine(host="unix:///var/run/docker.sock"):
    forks_ = Forks()
    forks_.host = host
    return forks_


SPEC = ContainerSpec(image="capsule-runtime:latest")


def test_on_the_host_only_where_it_can_be(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    client = Client()
    local = engine()
    assert local._thd_why_not_on_host(client, source(), SPEC) is None
    assert local._thd_why_not_on_host(client, source(), SPEC) is None
    assert client.info_calls == 1
    assert "not local" in engine("tcp://10.0.0.2:2375")._thd_why_not_on_host(
        client, source(), SPEC)
    assert "overlay2" in engine()._thd_why_not_on_host(Client("btrfs"), source(), SPEC)
    assert "overlay2" in engine()._thd_why_not_on_host(Client(), source("vfs"), SPEC)
    # Whatever image the spec names: the fork's is the source's.
    assert engine()._thd_why_not_on_host(Client(image=None), source(), SPEC) is None
    assert "not known" in engine()._thd_why_not_on_host(Client(), {**source(), "Image": ""},
                                                        SPEC)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "not root" in engine()._thd_why_not_on_host(Client(), source(), SPEC)


@pytest.fixture
def root(tmp_path):
    """
    A data root with a source and a target directory in it.
    """
    data = tmp_path / "docker"
    (data / "overlay2" / "from" / "diff").mkdir(parents=True)
    (data / "overlay2" / "to" / "diff").mkdir(parents=True)
    return data


def test_copy_refuses_what_is_not_under_the_data_root(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(root / "overlay2" / "to" / "diff")
    with pytest.raises(CopyRefused, match="not under"):
        copy_tree(str(outside), target, str(root))
    with pytest.raises(CopyRefused, match="not under"):
        copy_tree(target, str(outside), str(root))
    # A sibling whose name starts like the root's is not under it.
    sibling = tmp_path / "docker2"
    sibling.mkdir()
    with pytest.raises(CopyRefused, match="not under"):
        copy_tree(str(sibling), target, str(root))
    with pytest.raises(CopyRefused, match="not under"):
        copy_tree(str(root), target, str(root))


def test_copy_refuses_links_paths_and_files(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(root / "overlay2" / "to" / "diff")
    (root / "overlay2" / "link").symlink_to(outside)
    with pytest.raises(CopyRefused, match="symbolic link"):
        copy_tree(str(root / "overlay2" / "link"), target, str(root))
    (root / "overlay2" / "dirlink").symlink_to(root / "overlay2" / "from")
    with pytest.raises(CopyRefused, match="symbolic link"):
        copy_tree(str(root / "overlay2" / "dirlink" / "diff"), target, str(root))
    (root / "overlay2" / "file").write_text("x")
    with pytest.raises(CopyRefused, match="not a directory"):
        copy_tree(str(root / "overlay2" / "file"), target, str(root))
    with pytest.raises(CopyRefused, match="cannot be seen"):
        copy_tree(str(root / "overlay2" / "none"), target, str(root))
    for bad in ("overlay2/from/diff", str(root) + "/overlay2/../overlay2/from/diff",
                str(root) + "/overlay2/from/diff\0"):
        with pytest.raises(CopyRefused, match="normal absolute"):
            copy_tree(bad, target, str(root))
    with pytest.raises(CopyRefused, match="is the directory"):
        copy_tree(target, target, str(root))


def test_a_failed_copy_is_refused(root, monkeypatch):
    monkeypatch.setattr(forks, "COPY_COMMAND", ("false",))
    with pytest.raises(CopyRefused, match="cp failed"):
        copy_tree(str(root / "overlay2" / "from" / "diff"),
                  str(root / "overlay2" / "to" / "diff"), str(root))
    monkeypatch.setattr(forks, "COPY_COMMAND", ("/nonexistent/cp",))
    with pytest.raises(CopyRefused, match="could not run"):
        copy_tree(str(root / "overlay2" / "from" / "diff"),
                  str(root / "overlay2" / "to" / "diff"), str(root))


@root_only
def test_the_copy_keeps_what_overlay_needs(root):
    """
    A deleted file's mark (a character device 0/0), a replaced directory's
    (the trusted.overlay.opaque attribute), owners, modes, a set-uid bit,
    links not followed, hard links, times.
    """
    upper = root / "overlay2" / "from" / "diff"
    os.mknod(upper / "deleted", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "replaced").mkdir(mode=0o750)
    os.setxattr(upper / "replaced", "trusted.overlay.opaque", b"y")
    (upper / "replaced" / "only").write_bytes(b"new")
    os.chown(upper / "replaced" / "only", 1000, 1001)
    (upper / "tool").write_bytes(b"#!/bin/sh\n")
    os.chown(upper / "tool", 1000, 1000)
    os.chmod(upper / "tool", 0o4750)
    os.link(upper / "tool", upper / "same")
    (upper / "escape").symlink_to("/etc")
    os.lchown(upper / "escape", 1000, 1000)
    os.utime(upper / "tool", ns=(1_000_000_000, 1_500_000_000))
    target = root / "overlay2" / "to" / "diff"
    copy_tree(str(upper), str(target), str(root))
    deleted = os.lstat(target / "deleted")
    assert stat.S_ISCHR(deleted.st_mode) and deleted.st_rdev == os.makedev(0, 0)
    assert os.getxattr(target / "replaced", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.stat(target / "replaced").st_mode) == 0o750
    only = os.stat(target / "replaced" / "only")
    assert (only.st_uid, only.st_gid) == (1000, 1001)
    tool = os.stat(target / "tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4750 and (tool.st_uid, tool.st_gid) == (1000, 1000)
    assert tool.st_mtime_ns == 1_500_000_000
    assert os.path.samefile(target / "tool", target / "same") and tool.st_nlink == 2
    assert os.readlink(target / "escape") == "/etc"
    assert os.lstat(target / "escape").st_uid == 1000
    assert not (target / "passwd").exists()
