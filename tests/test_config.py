"""
The configuration as data: the options make one frozen L{CapsuleConfig},
the internal knobs are a tuning table rather than options, and the docs'
tables are generated from both.
"""

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from capsule.config import CapsuleConfig
from capsule.docs import DOCS_COMMAND, generated_docs
from capsule.services import make_service
from capsule.tap import Options
from capsule.tuning import KNOBS, Tuning, TuningError, load_tuning, parse_pairs, tune

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


@pytest.fixture(autouse=True)
def no_tuning(monkeypatch):
    monkeypatch.delenv("CAPSULE_TUNING", raising=False)


def parse(*args):
    options = Options()
    options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", *args])
    return options


def test_the_options_make_one_frozen_config_of_parsed_values():
    config = parse("--memory", "1g", "--disk", "2g", "--memory-budget", "3g",
                   "--session-rate", "3/30", "--trusted-proxy", "10.0.0.0/8",
                   "--shell", "zsh -i", "--no-keeper").config
    assert isinstance(config, CapsuleConfig)
    assert (config.memory_bytes, config.disk_bytes, config.memory_budget) == (GIB, 2 * GIB,
                                                                              3 * GIB)
    assert not config.memory_budget_from_engine
    assert config.session_rate == (3, 30.0)
    assert config.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert (config.shell, config.keeper) == (("zsh", "-i"), False)
    assert config.spec.memory == "1g" and config.spec.disk == "2g"
    assert set(config.profiles) == {"shell", "claude"}
    assert config.tuning == Tuning()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grace = 1.0
    with pytest.raises(TypeError):
        config.profiles["new"] = config.profiles["shell"]


def test_the_memory_budget_default_is_the_engines_and_off_is_none():
    assert parse().config.memory_budget_from_engine
    off = parse("--memory-budget", "off").config
    assert off.memory_budget is None and not off.memory_budget_from_engine


def test_the_memory_request_and_reserve():
    config = parse().config
    assert (config.memory_request, config.memory_reserve,
            config.memory_reserve_from_engine) == (64 * 1024 ** 2, None, True)
    config = parse("--memory-request", "256m", "--memory-reserve", "2g").config
    assert (config.memory_request, config.memory_reserve,
            config.memory_reserve_from_engine) == (256 * 1024 ** 2, 2 * GIB, False)
    assert config.profiles["shell"].request == 256 * 1024 ** 2
    # The agent's request is its own.
    assert config.profiles["claude"].request == 512 * 1024 ** 2
    off = parse("--memory-reserve", "off").config
    assert off.memory_reserve is None and not off.memory_reserve_from_engine


def test_make_service_builds_from_a_config_alone():
    config = parse("--record-max-bytes", "2m").config
    config = dataclasses.replace(config, tuning=tune(config.tuning, {
        "max-message-size": "4096", "start-at-first-frame": "true"}, "test"))
    service = make_service(config, MemoryReactorClock())
    factory = service.websocket_factory
    assert factory.maxMessagePayloadSize == 4096 and factory.start_at_open is False
    assert factory.sessions.admission is service.sessions._admission
    site = service.listeners.services[0].factory
    assert site.websocket_factory is factory and factory.sessions.drain is site.drain
    assert site.session_api.sessions is factory.sessions
    assert site.metrics is service.docker.metrics
    assert service.manager.metrics is site.metrics
    assert (tuple(site.exports.client_address.trusted_proxies)
            == tuple(factory.sessions.admission.trusted_proxies))


# -- the tuning table ---------------------------------------------------------------


def test_help_shows_no_tuning_knob_but_the_tuning_file():
    text = Options().getUsage(width=200)
    for name in KNOBS:
        assert f"--{name}" not in text
    assert "--tuning=" in text and "--max-sessions=" in text


def test_the_defaults_are_those_the_options_had():
    assert Tuning() == Tuning(
        cleanup_interval=5.0, orphan_sweep=30.0, disk_check_interval=30.0,
        pool_max_age=3600.0, start_at_first_frame=False, max_message_size=256 * 1024,
        ping_interval=20.0, ping_timeout=20.0, flow_window=1024 * 1024, coalesce_ms=2.0,
        docker_threads=16, export_threads=4)


def test_the_environment_sets_knobs(monkeypatch):
    monkeypatch.setenv("CAPSULE_TUNING", " cleanup-interval=0.5 , start-at-first-frame=yes,")
    tuning = parse().config.tuning
    assert (tuning.cleanup_interval, tuning.start_at_first_frame) == (0.5, True)


def test_a_file_sets_knobs_and_the_environment_wins(tmp_path, monkeypatch):
    path = tmp_path / "tuning.toml"
    path.write_text("coalesce-ms = 0\ndocker-threads = 4\nstart-at-first-frame = true\n")
    monkeypatch.setenv("CAPSULE_TUNING", "docker-threads=8")
    tuning = parse("--tuning", str(path)).config.tuning
    assert (tuning.coalesce_ms, tuning.docker_threads, tuning.start_at_first_frame) == (
        0.0, 8, True)
    path.write_text("[tuning]\nflow_window = 4096\n")
    assert load_tuning(str(path), {}).flow_window == 4096


def test_the_old_options_still_set_their_knobs_and_win(monkeypatch):
    monkeypatch.setenv("CAPSULE_TUNING", "cleanup-interval=3")
    options = parse("--cleanup-interval", "0.2", "--start-at-first-frame",
                    "--coalesce-ms=0")
    tuning = options.config.tuning
    assert (tuning.cleanup_interval, tuning.start_at_first_frame, tuning.coalesce_ms) == (
        0.2, True, 0.0)
    assert options.knob_options == {"cleanup-interval": "0.2", "start-at-first-frame": "true",
                                    "coalesce-ms": "0"}


@pytest.mark.parametrize("text, message", [
    ("nope=1", "CAPSULE_TUNING: no tuning knob 'nope'"),
    ("cleanup-interval=0", "CAPSULE_TUNING: cleanup-interval: must be more than 0"),
    ("coalesce-ms=-1", "CAPSULE_TUNING: coalesce-ms: must be 0 or more"),
    ("docker-threads=2.5", "CAPSULE_TUNING: docker-threads: not a whole number"),
    ("start-at-first-frame=maybe", "start-at-first-frame: not true or false"),
    ("ping-interval", "CAPSULE_TUNING: not name=value: 'ping-interval'"),
])
def test_bad_knobs_are_refused_by_name(monkeypatch, text, message):
    monkeypatch.setenv("CAPSULE_TUNING", text)
    with pytest.raises(usage.UsageError, match=message):
        parse()


def test_bad_files_and_old_options_are_refused_by_name(tmp_path):
    path = tmp_path / "tuning.toml"
    path.write_text("flow-window = 1.5\n")
    with pytest.raises(usage.UsageError, match="tuning.toml: flow-window: not a whole number"):
        parse("--tuning", str(path))
    path.write_text("flow-window = [1]\n")
    with pytest.raises(usage.UsageError, match="flow-window: not a single value"):
        parse("--tuning", str(path))
    path.write_text("flow-window = \n")
    with pytest.raises(usage.UsageError, match="not TOML"):
        parse("--tuning", str(path))
    with pytest.raises(usage.UsageError, match="--tuning: no such file"):
        parse("--tuning", str(tmp_path / "none.toml"))
    with pytest.raises(usage.UsageError, match="--coalesce-ms: must be 0 or more"):
        parse("--coalesce-ms", "-1")


def test_parse_pairs_and_tune():
    assert parse_pairs("a=1, b = 2 ,,") == {"a": "1", "b": "2"}
    assert tune(Tuning(), {"flow_window": 10}, "x").flow_window == 10
    with pytest.raises(TuningError, match="^x: no tuning knob 'flow'"):
        tune(Tuning(), {"flow": 10}, "x")
    with pytest.raises(TuningError, match="^ping-timeout: not a number"):
        tune(Tuning(), {"ping-timeout": True}, "")


def test_twistd_stops_with_status_1_naming_the_knob():
    twistd = Path(sys.executable).with_name("twistd")
    result = subprocess.run(
        [str(twistd), "-n", "--pidfile=", "capsule", "-l", "tcp:0:interface=127.0.0.1"],
        env={"CAPSULE_TUNING": "flow-window=lots", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    assert "CAPSULE_TUNING: flow-window: not a whole number: 'lots'" in result.stdout


# -- the generated docs ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(generated_docs()))
def test_the_docs_tables_are_generated_from_the_code(name):
    path = ROOT / "docs" / name
    committed = path.read_text(encoding="utf-8") if path.exists() else None
    assert committed == generated_docs()[name], (
        f"docs/{name} is not what the code says: run `.venv/bin/{DOCS_COMMAND}` and commit"
        f" docs/{name}")


def test_the_options_table_has_every_option_and_no_knob():
    text = generated_docs()["options.md"]
    for entry in Options().describe():
        assert f"`--{entry['long']}`" in text
    for name in KNOBS:
        assert f"`--{name}`" not in text
        assert f"`{name}`" in generated_docs()["tuning.md"]
    assert "| `--memory` | `4g` |" in text


def test_an_old_option_is_told_to_become_a_knob():
    from twisted.logger import formatEvent, globalLogPublisher

    from capsule.tap import makeService
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        makeService(parse("--cleanup-interval", "0.2", "--start-at-first-frame"),
                    MemoryReactorClock())
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events if "tuning knobs now" in e.get("log_format", "")]
    assert said == ["--cleanup-interval, --start-at-first-frame: tuning knobs now, not options"
                    " (see docs/tuning.md); say"
                    ' CAPSULE_TUNING="cleanup-interval=0.2,start-at-first-frame=true"']
