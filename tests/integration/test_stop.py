"""
A capsule stopped right after its start leaves none of its warm containers
behind, whichever step of their making the stop comes in.
"""

import time

import pytest

from .harness import wait_for


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6, 1.0, 1.5])
def test_a_stop_right_after_ready_leaves_no_warm_container(make_server, delay):
    server = make_server("--pool-size", "2")
    wait_for(lambda: "capsule is ready" in server.log(), 30, "capsule to say it is ready")
    time.sleep(delay)
    assert server.stop() == 0, server.log()[-4000:]
    left = server.containers()
    assert left == [], (f"{len(left)} container(s) of the stopped capsule remain"
                        f" ({[c['State'] for c in left]}):\n{server.log()[-4000:]}")
    assert server.unhandled_errors() == []
