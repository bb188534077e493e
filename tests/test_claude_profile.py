"""
The URL opens Claude Code: --default-profile, the claude profile's state on
a volume (one local user's without users), its agent_permissions, and what
its command does before Claude Code starts (run here with bash and node,
against a stand-in claude).
"""

import json
import os
import shutil
import subprocess

import pytest
from twisted.python.usage import UsageError

from capsule.core.keeper import keeper_argv
from capsule.core.profiles import (CLAUDE_COMMAND, CLAUDE_CONFIG_DIR, CLONE_SCRIPT, Profile,
                                   ProfileError, agent_volume_name, builtin_profiles,
                                   load_profiles, start_command)
from capsule.core.spec import ContainerSpec
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

from .in_memory import Link, clock  # noqa: F401 (fixture)

SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


def builtins():
    shell = Profile(name="shell", spec=SPEC, command=("bash", "-l"))
    return builtin_profiles(shell, agent_image="capsule-agent:test")


def write(tmp_path, text):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def docker():
    return FakeDockerAPI(images=("capsule-runtime:latest", "capsule-agent:test"))


def make_manager(docker, profiles=None, **config):
    from twisted.internet.task import Clock
    return SessionManager(docker, Clock(), SessionConfig(
        spec=SPEC, instance="t", grace=60, replay_bytes=16,
        profiles=builtins() if profiles is None else profiles, **config))


# -- the built-in claude profile ------------------------------------------------------

def test_the_claude_profile_keeps_claude_codes_whole_state_on_a_volume():
    claude = builtins()["claude"]
    assert claude.agent_volume == CLAUDE_CONFIG_DIR == "/home/developer/.claude"
    assert claude.spec.environment["CLAUDE_CONFIG_DIR"] == CLAUDE_CONFIG_DIR
    assert claude.agent_permissions == "ask"
    assert builtins()["shell"].agent_volume is None


def test_agent_permissions_bypass(tmp_path):
    profiles = load_profiles(write(tmp_path, '[profiles.yolo]\nextends = "claude"\n'
                                             'agent_permissions = "bypass"\n'), builtins())
    yolo = profiles["yolo"]
    assert yolo.agent_permissions == "bypass" and yolo.command == CLAUDE_COMMAND
    command, environment = start_command(yolo, None)
    assert command == CLAUDE_COMMAND
    assert environment["CAPSULE_AGENT_PERMISSIONS"] == "bypass"
    assert environment["IS_SANDBOX"] == "1"
    _, asking = start_command(profiles["claude"], None)
    assert "CAPSULE_AGENT_PERMISSIONS" not in asking and "IS_SANDBOX" not in asking


@pytest.mark.parametrize("text, expected", [
    ('agent_permissions = "yes"', "key 'agent_permissions': must be 'ask' or 'bypass', got 'yes'"),
    ('agent_permissions = true', "key 'agent_permissions': must be 'ask' or 'bypass', got True"),
    ('environment = { CAPSULE_AGENT_PERMISSIONS = "bypass" }',
     "CAPSULE_AGENT_PERMISSIONS is set by capsule"),
])
def test_bad_agent_permissions_are_refused(tmp_path, text, expected):
    with pytest.raises(ProfileError) as e:
        load_profiles(write(tmp_path, f"[profiles.claude]\n{text}\n"), builtins())
    assert "profile 'claude'" in str(e.value) and expected in str(e.value)


def test_the_local_users_volume_is_apart_from_every_users():
    local = agent_volume_name("default", "claude", None)
    assert local.startswith("capsule-default-claude-local-")
    assert local != agent_volume_name("default", "claude", "local")
    assert local != agent_volume_name("default", "claude", "")
    assert local != agent_volume_name("other", "claude", None)
    assert local == agent_volume_name("default", "claude", None)


# -- sessions ---------------------------------------------------------------------------

def test_without_users_the_local_user_gets_a_volume(docker):
    manager = make_manager(docker, local_volumes=True)
    first = manager.create(RecordingClient(), 80, 24, profile="claude")
    second = manager.create(RecordingClient(), 80, 24, profile="claude")
    volume = (agent_volume_name("t", "claude", None), CLAUDE_CONFIG_DIR)
    for session in (first, second):
        spec = docker.containers[session.container_id]["spec"]
        assert spec.volumes == (volume,)
        assert spec.volume_labels["io.capsule.user"] == ""
        assert spec.volume_labels["io.capsule.profile"] == "claude"
    # Its command says so when the volume is not writable, as a user's does.
    assert docker.processes[0].argv == tuple(keeper_argv(
        ("sh", "-c", CLONE_SCRIPT, "capsule-start", *CLAUDE_COMMAND), 0, 16))
    assert docker.processes[0].env["CAPSULE_AGENT_VOLUME"] == CLAUDE_CONFIG_DIR
    # A shell has none.
    shell = manager.create(RecordingClient(), 80, 24)
    assert docker.containers[shell.container_id]["spec"].volumes == ()


def test_with_users_a_session_without_one_gets_no_volume(docker):
    manager = make_manager(docker, local_volumes=False)
    alice = manager.create(RecordingClient(), 80, 24, user="alice", profile="claude")
    nobody = manager.create(RecordingClient(), 80, 24, profile="claude")
    assert docker.containers[alice.container_id]["spec"].volumes == (
        (agent_volume_name("t", "claude", "alice"), CLAUDE_CONFIG_DIR),)
    assert docker.containers[nobody.container_id]["spec"].volumes == ()


def test_the_default_profile_is_what_a_session_without_one_gets(docker):
    manager = make_manager(docker, default_profile="claude")
    session = manager.create(RecordingClient(), 80, 24)
    assert session.profile == "claude"
    assert docker.containers[session.container_id]["spec"].image == "capsule-agent:test"
    assert manager.create(RecordingClient(), 80, 24, profile="shell").profile == "shell"


def test_a_websocket_without_a_profile_opens_the_default_and_is_told_which(clock, docker):
    from capsule.web.websocket_factory import CapsuleServerFactory
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", grace=60, profiles=builtins(), default_profile="claude"))
    for query, profile in (("", "claude"), ("profile=shell", "shell")):
        link = Link(clock, CapsuleServerFactory(manager, clock, max_message_size=1024), query)
        link.flush()
        link.send({"type": "resize", "cols": 80, "rows": 24})
        [connected] = link.new()
        assert connected["type"] == "connected" and connected["profile"] == profile
        assert manager.sessions[connected["session_id"]].profile == profile


def test_the_api_names_the_default_profile_and_opens_it(tmp_path):
    from dataclasses import replace
    from tests.test_api import Api
    (tmp_path / "index.html").write_text("<html></html>")
    api = Api(tmp_path)
    api.manager.profiles = builtin_profiles(api.manager.profiles["shell"])
    api.docker.images.add("capsule-agent:latest")
    api.manager.config = replace(api.manager.config, default_profile="claude")
    status, _, body = api.request("/api/profiles")
    assert (status, body["default"]) == (200, "claude")
    assert api.create()["profile"] == "claude"
    status, _, body = api.request("/api/sessions", "POST",
                                  {"cols": 80, "rows": 24, "profile": "shell"})
    assert (status, body["profile"]) == (201, "shell")


# -- the option ---------------------------------------------------------------------------

def _options(*args):
    from capsule.tap import Options
    options = Options()
    options.parseOptions(["--www", os.path.join(os.path.dirname(__file__), "..", "www"),
                          *args])
    return options


def test_default_profile_option(tmp_path):
    assert _options().config.default_profile == "shell"
    assert _options("--default-profile", "claude").config.default_profile == "claude"
    path = write(tmp_path, '[profiles.review]\nextends = "claude"\n')
    config = _options("--profiles", path, "--default-profile", "review").config
    assert config.default_profile == "review"


def test_an_unknown_default_profile_is_refused_at_start(tmp_path):
    with pytest.raises(UsageError) as e:
        _options("--default-profile", "cluade")
    assert str(e.value) == ("--default-profile: no profile 'cluade': the profiles are claude,"
                            " shell (--profiles FILE adds others)")
    path = write(tmp_path, "[profiles.review]\n")
    with pytest.raises(UsageError) as e:
        _options("--profiles", path, "--default-profile", "\x1b[2J")
    assert str(e.value) == ("--default-profile: no profile '?[2J': the profiles are claude,"
                            " review, shell")


def test_sessions_are_told_the_default_and_whether_there_are_users(tmp_path):
    from capsule.services import session_config
    config = session_config(_options("--default-profile", "claude").config)
    assert (config.default_profile, config.local_volumes) == ("claude", True)
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:" + "t" * 32 + "\n")
    tokens.chmod(0o600)
    assert session_config(_options("--tokens", str(tokens)).config).local_volumes is False


# -- the command before Claude Code ------------------------------------------------------------

needs_node = pytest.mark.skipif(shutil.which("node") is None or shutil.which("bash") is None,
                                reason="needs bash and node")


def _run(tmp_path, env=None, config=None, settings=None):
    """
    The claude profile's command, with a stand-in claude that prints its
    arguments, CLAUDE_CONFIG_DIR in tmp_path; what it printed.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "claude").write_text('#!/bin/sh\necho "claude ran: $*"\n')
    (bin_dir / "claude").chmod(0o755)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    if config is not None:
        (state / ".claude.json").write_text(config)
    if settings is not None:
        (state / "settings.json").write_text(settings)
    environ = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
               "CLAUDE_CONFIG_DIR": str(state), **(env or {})}
    # Not a login shell here (this host's /etc/profile would set PATH);
    # without a terminal, the login shell at the end reads nothing and ends.
    program, login, *rest = CLAUDE_COMMAND
    assert login == "-lc"
    done = subprocess.run([program, "-c", *rest], env=environ, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr, state


@needs_node
def test_without_a_key_or_a_login_it_says_how_to_log_in(tmp_path):
    said, state = _run(tmp_path)
    assert "capsule: no Anthropic key, no login yet." in said
    assert "type /login in Claude Code" in said and "ANTHROPIC_API_KEY" in said
    assert said.index("no login yet") < said.index("claude ran:")
    config = json.loads((state / ".claude.json").read_text())
    assert config == {"hasCompletedOnboarding": True,
                      "projects": {"/workspace": {"hasTrustDialogAccepted": True}}}
    assert not (state / "settings.json").exists()
    assert oct((state / ".claude.json").stat().st_mode & 0o777) == "0o600"


@needs_node
@pytest.mark.parametrize("env, files", [
    ({"ANTHROPIC_API_KEY": "sk-x"}, {}),
    # The gateway's placeholder (capsule.gateway) is a key too.
    ({"ANTHROPIC_AUTH_TOKEN": "placeholder"}, {}),
    ({"CLAUDE_CODE_OAUTH_TOKEN": "t"}, {}),
    ({}, {".credentials.json": '{"claudeAiOauth": {}}'}),
    ({}, {".claude.json": '{"primaryApiKey": "sk-x"}'}),
    ({}, {"settings.json": '{"apiKeyHelper": "/bin/key"}'}),
])
def test_with_a_key_or_a_login_it_says_nothing(tmp_path, env, files):
    state = tmp_path / "state"
    state.mkdir()
    for name, text in files.items():
        (state / name).write_text(text)
    said, _ = _run(tmp_path, env)
    assert "no login yet" not in said and "claude ran: \n" in said + "\n"


@needs_node
def test_a_users_own_settings_are_never_changed(tmp_path):
    mine = {"theme": "light", "hasCompletedOnboarding": False,
            "projects": {"/workspace": {"hasTrustDialogAccepted": False, "allowedTools": ["x"]},
                         "/elsewhere": {"hasTrustDialogAccepted": True}}}
    _, state = _run(tmp_path, config=json.dumps(mine))
    assert json.loads((state / ".claude.json").read_text()) == mine
    # Added to where absent, the rest kept.
    _, state = _run(tmp_path, config=json.dumps({"theme": "dark", "projects": {
        "/workspace": {"allowedTools": ["y"]}}}))
    assert json.loads((state / ".claude.json").read_text()) == {
        "theme": "dark", "hasCompletedOnboarding": True,
        "projects": {"/workspace": {"allowedTools": ["y"], "hasTrustDialogAccepted": True}}}
    # A file that does not parse is left as it is.
    _, state = _run(tmp_path, config="{not json")
    assert (state / ".claude.json").read_text() == "{not json"
    assert [p.name for p in state.iterdir() if ".capsule-" in p.name] == []


@needs_node
def test_bypass_runs_claude_without_asking_and_accepts_its_warning_once(tmp_path):
    said, state = _run(tmp_path, {"CAPSULE_AGENT_PERMISSIONS": "bypass"})
    assert "claude ran: --dangerously-skip-permissions" in said
    assert json.loads((state / "settings.json").read_text()) == {
        "skipDangerousModePermissionPrompt": True}
    _, state = _run(tmp_path, {"CAPSULE_AGENT_PERMISSIONS": "bypass"},
                    settings='{"skipDangerousModePermissionPrompt": false}')
    assert json.loads((state / "settings.json").read_text()) == {
        "skipDangerousModePermissionPrompt": False}
    said, _ = _run(tmp_path)
    assert "claude ran: \n" in said + "\n" and "dangerously" not in said


# -- the admin command ----------------------------------------------------------------------------

def test_admin_names_the_local_users_volume_and_removes_it():
    from tests.test_profiles import FakeVolumesAPI, _admin
    local = {"Name": agent_volume_name("default", "claude", None), "Labels": {
        "io.capsule.managed": "true", "io.capsule.instance": "default",
        "io.capsule.user": "", "io.capsule.profile": "claude", "io.capsule.volume": "agent"}}
    alice = {**local, "Name": agent_volume_name("default", "claude", "alice"),
             "Labels": {**local["Labels"], "io.capsule.user": "alice"}}
    api = FakeVolumesAPI([local, alice])
    code, lines = _admin(["volumes"], api)
    assert code == 0
    assert [line.split()[:2] for line in lines[1:3]] == [["(local)", "claude"],
                                                         ["alice", "claude"]]
    code, lines = _admin(["remove-volumes", "--user", ""], api)
    assert (code, lines) == (0, [f"removed {local['Name']}",
                                 "removed 1 agent volume(s) of (local) (instance default)"])
    assert list(api._volumes) == [alice["Name"]]
