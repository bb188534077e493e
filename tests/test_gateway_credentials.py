"""
The placeholder store and the real keys (capsule.gateway.credentials).
"""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from capsule.gateway.credentials import Keys, PlaceholderStore, load_key


def store(live, key=b"k" * 32):
    return PlaceholderStore(key, lambda: live)


def test_a_placeholder_names_its_live_session_only():
    live = {"s1": object(), "s2": object()}
    placeholders = store(live)
    one, two = placeholders.issue("s1"), placeholders.issue("s2")
    assert one != two and placeholders.issue("s1") == one
    assert placeholders.session_for(one) == "s1"
    assert placeholders.session_for(two) == "s2"
    # Forged: another token of the same shape, a prefix, garbage, too long.
    for forged in (one[:-1] + ("A" if one[-1] != "A" else "B"), one[:-3], "", "capsule-",
                   "capsule-" + "x" * 200, None, 3, b"bytes"):
        assert placeholders.session_for(forged) is None


def test_a_placeholder_dies_with_its_session():
    live = {"s1": object()}
    placeholders = store(live)
    token = placeholders.issue("s1")
    del live["s1"]
    assert placeholders.session_for(token) is None
    placeholders.session_ended(SimpleNamespace(id="s1"))
    assert len(placeholders) == 0
    assert placeholders.session_for(token) is None


def test_a_session_found_after_a_restart_keeps_its_placeholder():
    live = {"s1": object()}
    token = store(live).issue("s1")
    # A new run with the same key, which never issued it, knows it.
    assert store(live).session_for(token) == "s1"
    # Not with another key.
    assert PlaceholderStore(b"j" * 32, lambda: live).session_for(token) is None


def test_the_key_is_read_once_and_only_when_a_placeholder_is_needed():
    calls = []

    def key():
        calls.append(1)
        return b"k" * 32
    live = {}
    placeholders = PlaceholderStore(key, lambda: live)
    assert placeholders.session_for("capsule-x") is None
    assert calls == []
    live["s1"] = 1
    token = placeholders.issue("s1")
    assert placeholders.session_for(token) == "s1" and calls == [1]
    assert token == store({"s1": 1}).issue("s1")


def test_the_key_is_kept_in_the_state_directory(tmp_path):
    key = load_key(str(tmp_path / "state"), "main")
    path = tmp_path / "state" / "gateway-key-main"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(str(tmp_path / "state"), "main") == key
    assert load_key(str(tmp_path / "state"), "other") != key


def test_without_a_state_directory_the_key_is_the_run_s(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        assert len(load_key(str(tmp_path / "state"), "main")) == 32
    finally:
        os.chmod(tmp_path, 0o700)
    assert load_key(None, "main") != load_key(None, "main")


def test_keys_are_never_shown():
    keys = Keys.from_secrets({"ANTHROPIC_API_KEY": "sk-real", "OTHER": "x"})
    assert keys.get("anthropic") == "sk-real" and "anthropic" in keys
    assert "github" not in keys and keys.get("github") is None
    assert "sk-real" not in repr(keys) and repr(keys) == "<Keys anthropic>"


def test_a_key_in_the_environment_is_every_replicas(tmp_path):
    """
    Replicas on a cluster each have a state directory of their own: the
    key they share comes from CAPSULE_GATEWAY_KEY, so a session's
    placeholder is known to whichever replica serves it.
    """
    environ = {"CAPSULE_GATEWAY_KEY": "ab" * 32}
    first = load_key(str(tmp_path / "a"), "main", environ)
    assert first == bytes.fromhex("ab" * 32)
    assert load_key(str(tmp_path / "b"), "main", environ) == first
    assert not (tmp_path / "a").exists()
    # Two replicas' stores: one placeholder for the session.
    assert store({"s1": 1}, first).issue("s1") == store({"s1": 1}, first).issue("s1")
    assert store({"s1": 1}, first).issue("s1") != store({"s1": 1}).issue("s1")


@pytest.mark.parametrize("text, words", [
    ("not hex", "must be hex digits"),
    ("ab" * 16, "holds 16 bytes: it needs 32"),
])
def test_a_bad_key_in_the_environment_is_refused_at_start(text, words, monkeypatch):
    from twisted.python import usage

    from capsule.tap import Options
    monkeypatch.setenv("CAPSULE_GATEWAY_KEY", text)
    with pytest.raises(usage.UsageError, match=words):
        Options().parseOptions([])
