"""
`capsule-admin user add|remove NAME --htpasswd FILE`: a user added to, or
changed or removed in, the file `--auth` reads, with a bcrypt hash that
capsule's own checker accepts; other lines kept, the file replaced at once.
"""

import io
import os
import stat

import bcrypt
import pytest

from capsule.admin import main
from capsule.auth.checkers import _bcrypt_check
from capsule.auth.stores import hash_password, parse_htpasswd, set_htpasswd_user


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def cheap(request, monkeypatch):
    """
    Hashes of cost 4 (capsule refuses less than 10) but where the cost
    itself is tested: bcrypt at the real costs is slow by design.
    """
    if "default_cost" not in request.node.name:
        monkeypatch.setattr("capsule.auth.stores.BCRYPT_COSTS", range(4, 17))


def run(*argv, stdin="", tty=False):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err,
                stdin=Terminal(stdin) if tty else io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def users(path) -> dict:
    return parse_htpasswd(path.read_text(), str(path))


def test_add_makes_a_file_of_mode_600_whose_hash_capsule_accepts(tmp_path):
    path = tmp_path / "htpasswd"
    code, out, err = run("user", "add", "alice", "--htpasswd", str(path), "--password-stdin",
                         "--cost", "4", stdin="s3cret pass\n")
    assert (code, err) == (0, "")
    assert out.startswith(f"added alice to {path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = users(path)
    assert list(found) == ["alice"]
    assert found["alice"].startswith(b"$2b$04$")
    assert _bcrypt_check(b"s3cret pass", found["alice"])
    assert not _bcrypt_check(b"s3cret pass\n", found["alice"])
    assert not _bcrypt_check(b"other", found["alice"])


def test_change_keeps_every_other_line_and_the_files_mode(tmp_path):
    path = tmp_path / "htpasswd"
    bob = bcrypt.hashpw(b"bob's", bcrypt.gensalt(4)).decode()
    path.write_text(f"# the team\nbob:{bob}\nalice:$2y$05$old\n\ncarol:{bob}\nalice:$2y$05$dup\n")
    os.chmod(path, 0o640)
    code, out, _ = run("user", "add", "alice", "--htpasswd", str(path), "--password-stdin",
                       "--cost", "4", stdin="new\r\n")
    assert code == 0 and out.startswith(f"changed the password of alice in {path}")
    lines = path.read_text().splitlines()
    assert lines[0] == "# the team" and lines[1] == f"bob:{bob}" and lines[3:] == ["", f"carol:{bob}"]
    assert lines[2].startswith("alice:$2b$04$") and _bcrypt_check(b"new", lines[2][6:].encode())
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["htpasswd"]


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("")
    os.chmod(path, 0o644)
    assert run("user", "add", "dan", "--htpasswd", str(path), "--password-stdin", "--cost",
               "4", stdin="pw")[0] == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_remove_and_what_is_refused(tmp_path):
    path = tmp_path / "htpasswd"
    run("user", "add", "alice", "--htpasswd", str(path), "--password-stdin", "--cost", "4",
        stdin="pw\n")
    before = path.read_text()
    for argv, stdin, said in [
        (("user", "add", "al ice"), "pw", "not a valid user name"),
        (("user", "add", "bob:x"), "pw", "not a valid user name"),
        (("user", "add", "bob", "--password-stdin"), "\n", "the password is empty"),
        (("user", "add", "bob", "--password-stdin"), "x" * 73, "longer than 72 bytes"),
        (("user", "add", "bob"), "pw\n", "no terminal to read the password from"),
        (("user", "remove", "bob"), "", "has no user bob"),
    ]:
        code, out, err = run(*argv, "--htpasswd", str(path), stdin=stdin)
        assert (code, out) == (1, ""), argv
        assert said in err, (argv, err)
        assert path.read_text() == before
    code, out, _ = run("user", "remove", "alice", "--htpasswd", str(path))
    assert code == 0 and out.startswith(f"removed alice from {path}")
    assert users(path) == {}


def test_at_a_terminal_the_password_is_asked_twice_without_echo(tmp_path, monkeypatch):
    path = tmp_path / "htpasswd"
    asked = []
    answers = iter(["typed", "typed", "one", "other"])

    def getpass(prompt, stream=None):
        asked.append(prompt)
        return next(answers)
    monkeypatch.setattr("getpass.getpass", getpass)
    code, _, _ = run("user", "add", "erin", "--htpasswd", str(path), "--cost", "4", tty=True)
    assert code == 0 and asked == ["New password for erin: ", "Type it again: "]
    assert _bcrypt_check(b"typed", users(path)["erin"])
    code, _, err = run("user", "add", "erin", "--htpasswd", str(path), "--cost", "4", tty=True)
    assert code == 1 and "the two passwords differ" in err
    assert _bcrypt_check(b"typed", users(path)["erin"])


def test_a_file_that_cannot_be_written_is_said_and_left_alone(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "htpasswd"
    path.write_text("")
    os.chmod(folder, 0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        code, _, err = run("user", "add", "x", "--htpasswd", str(path), "--password-stdin",
                           "--cost", "4", stdin="pw")
        assert code == 1 and f"cannot write {path}" in err
    finally:
        os.chmod(folder, 0o700)


def test_the_default_cost_is_12_and_less_than_10_is_refused(tmp_path):
    assert hash_password("pw").startswith("$2b$12$")
    code, _, err = run("user", "add", "bob", "--htpasswd", str(tmp_path / "f"),
                       "--password-stdin", "--cost", "9", stdin="pw")
    assert code == 1 and "the cost must be 10 to 16, not 9" in err
    with pytest.raises(ValueError):
        set_htpasswd_user("/nonexistent/htpasswd", "bad name", "x")
