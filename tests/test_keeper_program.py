"""
capsule-keeper itself (docker/keeper/capsule-keeper.c), compiled for this
machine and run without Docker: the relay's frames on a pipe, as capsule
reads them from an exec (see tests/keeper_harness.py).  Its flood batching.
"""

from tests.keeper_harness import keeper, relay  # noqa: F401 (fixtures)


def test_every_flood_is_delivered_whole_and_at_once(relay):
    """
    A flood is sent in held-back batches; what is held when the flood stops
    must still go out, without waiting for more output.  Each round waits
    for input that is sent only once the round's marker has arrived.
    """
    rounds = 200
    r = relay(["sh", "-c", f"stty -echo; i=0; while [ $i -lt {rounds} ]; do i=$((i+1));"
                           " head -c 60000 /dev/zero | base64; echo MARK$i.; read x; done;"
                           " echo ALLDONE"])
    since = 0
    for i in range(1, rounds + 1):
        since = r.until(f"MARK{i}.".encode(), since)
        r.send(b"go\n")
    r.until(b"ALLDONE", since)
    body = bytes(r.output).replace(b"\r\n", b"\n")
    assert body.count(b"A" * 76 + b"\n") == rounds * (60000 // 57)
    assert [kind for kind, _ in r.frames if kind not in (b"o", b"P")] in ([], [b"x"])


def test_a_flood_goes_out_in_large_frames(relay):
    r = relay(["sh", "-c", "stty -echo; head -c 5000000 /dev/zero | base64; echo END.; read x"])
    r.until(b"END.", timeout=30)
    sizes = [size for kind, size in r.frames if kind == b"o"]
    assert max(sizes) > 16 * 1024
    assert sum(sizes) / len(sizes) > 8 * 1024, f"{len(sizes)} frames"


def test_a_small_reply_is_not_held(relay):
    """
    Interactive output (an echo) goes out at once, also right after a flood:
    the reply comes with no more output after it to push it out.
    """
    r = relay(["sh", "-c", "head -c 1000000 /dev/zero | base64; echo END.;"
                           " while read line; do echo got:$line.; done"])
    since = r.until(b"END.", timeout=30)
    for i in range(20):
        r.send(f"k{i}\n".encode())
        since = r.until(f"got:k{i}.".encode(), since, timeout=5)
