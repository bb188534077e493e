"""
capsule-keeper's command line (see tests/keeper_harness.py): what capsule
gives it works, in any order getopt allows; anything else is refused with
the usage and status 2, before anything is started or created.
"""

import pytest

from tests.keeper_harness import keeper, kill_keepers, relay  # noqa: F401 (fixtures)

USAGE = b"usage: capsule-keeper [-r | -d] [-t PORT] [-b BYTES] [-o OFFSET] SOCKET -- COMMAND [ARG...]\n"
MAX_PATH = 107  # sun_path holds 108 bytes, the last a NUL

BYTES = "a whole number from 1 to 4294967296"
OFFSET = "a whole number from 0 to 18446744073709551615"

# (arguments after the program, with S for the socket; the message before the usage)
REFUSED = [
    ([], "no SOCKET"),
    (["-r"], "no SOCKET"),
    (["-r", "--"], "no SOCKET"),
    (["-x", "S", "--", "sh"], "unknown option -x"),
    (["-r", "-?", "S", "--", "sh"], "unknown option -?"),
    (["-b"], "-b needs a value"),
    (["-r", "-o"], "-o needs a value"),
    (["S"], "SOCKET must be followed by -- and COMMAND"),
    (["S", "sh"], "SOCKET must be followed by -- and COMMAND"),
    (["S", "sh", "--", "sh"], "SOCKET must be followed by -- and COMMAND"),
    (["S", "--"], "no COMMAND after --"),
    (["-r", "-o", "0", "S", "--"], "no COMMAND after --"),
    (["", "--", "sh"], f"SOCKET must be a path of 1 to {MAX_PATH} bytes: ''"),
    *[(["-b", value, "S", "--", "sh"], f"-b takes {BYTES}, not '{value}'")
      for value in ["", "0", "-1", "+5", " 5", "5 ", "5k", "0x10", "1e3", "4294967297",
                    "18446744073709551616", "99999999999999999999999999"]],
    *[(["-r", "-o", value, "S", "--", "sh"], f"-o takes {OFFSET}, not '{value}'")
      for value in ["", "-1", "+1", "1.5", " 0", "abc", "18446744073709551616",
                    "-18446744073709551615"]],
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[" ".join(a) or "none" for a, _ in REFUSED])
def test_bad_arguments_are_refused_with_the_usage(keeper, tmp_path, args, message):
    socket = str(tmp_path / "missing" / "s")
    try:
        done = keeper.run(*[socket if a == "S" else a for a in args])
        assert (done.returncode, done.stdout) == (2, b"")
        assert done.stderr == f"capsule-keeper: {message}\n".encode() + USAGE
        assert not (tmp_path / "missing").exists()
    finally:
        kill_keepers(socket)  # one that took the arguments and started


def test_a_socket_path_too_long_is_refused(keeper, tmp_path):
    directory = tmp_path / "missing"
    socket = str(directory / ("x" * (MAX_PATH + 1 - len(str(directory)) - 1)))
    assert len(socket) == MAX_PATH + 1
    done = keeper.run("-r", socket, "--", "sh")
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == (f"capsule-keeper: SOCKET must be a path of 1 to {MAX_PATH} bytes:"
                           f" '{socket}'\n").encode() + USAGE
    assert not directory.exists()


def test_h_prints_the_usage(keeper):
    done = keeper.run("-h")
    assert (done.returncode, done.stdout, done.stderr) == (0, USAGE, b"")


def test_the_command_keeps_its_own_options(relay):
    """
    Options end at SOCKET: what follows -- is COMMAND's, options and
    another -- included.
    """
    r = relay(["sh", "-c", 'printf "[%s]" "$@"; echo', "sh", "-b", "x", "-o", "--", "-r"])
    r.until(b"[-b][x][-o][--][-r]\r\n")


@pytest.mark.parametrize("options", [
    ["-r", "-b", "4096", "-o", "0"],
    ["-o", "0", "-b", "4096", "-r"],
    ["-rb4096", "-o0"],
    ["-r", "-b", "0004096", "--"],
    ["-r", "-b", "1"],
], ids=["as capsule", "reordered", "grouped", "leading zeros and --", "one byte kept"])
def test_options_as_getopt_takes_them(relay, options):
    # The shell prints only once asked: with one byte kept, output made
    # before the relay attached would be dropped, and the preamble say so.
    r = relay(["sh", "-c", "read x; echo hello; read x"], options=options)
    at, dropped, start = r.preamble()
    assert (at, dropped) == (0, 0)
    r.send(b"go\n")
    r.until(b"hello\r\n", start)
    # The terminal echoes what was typed, then the shell answers.
    assert bytes(r.output[start:]) == b"go\r\nhello\r\n"
