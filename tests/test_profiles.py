"""
Profiles: the file and its refusals, secrets, and what a profile makes of a
session (its container, its command, its limits), against the in-memory
Docker engine.
"""

import os
import re

import pytest
from twisted.internet.task import Clock

from capsule.core.spec import ContainerSpec
from capsule.core.keeper import keeper_argv
from capsule.core.profiles import (AGENT_PROFILE, CLAUDE_COMMAND, CLONE_SCRIPT, LABEL_PROFILE,
                              BadRepository, Profile, ProfileError, Secrets, UnknownProfile,
                              agent_volume_name, builtin_profiles, check_repository,
                              load_profiles, load_secrets)
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import LABEL_SESSION, SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

from .in_memory import Link, clock  # noqa: F401 (fixture)

SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


def shell(**fields) -> Profile:
    return Profile(name="shell", spec=SPEC, command=("bash", "-l"), idle_timeout=600,
                   max_lifetime=0, pool=2, **fields)


def builtins(**fields):
    return builtin_profiles(shell(**fields), agent_image="capsule-agent:test")


def write(tmp_path, text: str, name: str = "profiles.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- the built-in profiles -------------------------------------------------------

def test_builtin_profiles():
    profiles = builtins()
    assert sorted(profiles) == ["claude", "shell"]
    assert profiles["shell"].spec is SPEC and profiles["shell"].pool == 2
    claude = profiles[AGENT_PROFILE]
    assert claude.spec.image == "capsule-agent:test"
    assert claude.spec.memory == "1g"
    assert claude.command == CLAUDE_COMMAND
    assert claude.pool == 0
    assert claude.idle_timeout == 600


def test_memory_requests_are_small_for_a_shell_and_larger_for_an_agent(tmp_path):
    profiles = builtins()
    assert profiles["shell"].request == 64 * 1024 ** 2
    assert profiles["claude"].request == 512 * 1024 ** 2
    path = write(tmp_path, '[profiles.big]\nmemory = "8g"\nmemory_request = "1g"\n'
                           '[profiles.tiny]\nextends = "claude"\nmemory = "256m"\n')
    loaded = load_profiles(path, builtins())
    assert loaded["big"].request == 1024 ** 3 and loaded["big"].memory == 8 * 1024 ** 3
    # An inherited request past its own limit counts at its limit.
    assert loaded["tiny"].request == 256 * 1024 ** 2


def test_no_file_is_the_builtins():
    assert load_profiles(None, builtins()) == builtins()


# -- the file -----------------------------------------------------------------

def test_a_file_changes_and_adds_profiles(tmp_path):
    path = write(tmp_path, """
[profiles.claude]
secrets = ["NPM_TOKEN"]
agent_volume = "/home/developer/.claude"
memory = "2g"

[profiles.py]
description = "Python"
image = "python-dev:1"
command = ["python3"]
environment = { PYTHONDONTWRITEBYTECODE = "1" }
cpus = 0.5
pids = 100
disk = "5g"
network = "none"
idle_timeout = 60
max_lifetime = 3600
repository = "https://example.com/r.git"
clone_timeout = 30
pool = 1

[profiles.review]
extends = "claude"
command = ["claude", "--help"]
""")
    profiles = load_profiles(path, builtins())
    assert sorted(profiles) == ["claude", "py", "review", "shell"]
    claude = profiles["claude"]
    assert claude.spec.image == "capsule-agent:test" and claude.spec.memory == "2g"
    assert claude.secrets == ("NPM_TOKEN",)
    assert claude.agent_volume == "/home/developer/.claude"
    assert claude.command == CLAUDE_COMMAND
    py = profiles["py"]
    assert py.spec.image == "python-dev:1" and py.command == ("python3",)
    assert py.spec.environment == {"TERM": "xterm-256color", "LANG": "en_US.UTF-8",
                                   "PYTHONDONTWRITEBYTECODE": "1"}
    assert (py.spec.cpus, py.spec.pids, py.spec.disk, py.spec.network) == (0.5, 100, "5g", "none")
    assert (py.idle_timeout, py.max_lifetime, py.clone_timeout, py.pool) == (60, 3600, 30, 1)
    assert py.repository == "https://example.com/r.git"
    assert py.description == "Python"
    review = profiles["review"]
    assert review.spec.image == "capsule-agent:test" and review.spec.memory == "2g"
    assert review.secrets == ("NPM_TOKEN",)
    assert review.command == ("claude", "--help")


@pytest.mark.parametrize("text, expected", [
    ('[profiles.a]\nimage = 3\n', "profile 'a': key 'image': must be a non-empty string"),
    ('[profiles.a]\nmemroy = "1g"\n', "profile 'a': unknown key 'memroy'"),
    ('[profiles.a]\nmemory = "lots"\n', "profile 'a': key 'memory': not a size"),
    ('[profiles.a]\ncommand = "bash"\n', "profile 'a': key 'command': must be a non-empty list"),
    ('[profiles.a]\ncommand = []\n', "profile 'a': key 'command': must be a non-empty list"),
    ('[profiles.a]\ncpus = 0\n', "profile 'a': key 'cpus': must be more than 0"),
    ('[profiles.a]\nmemory_request = "some"\n', "profile 'a': key 'memory_request': not a size"),
    ('[profiles.a]\nmemory = "256m"\nmemory_request = "512m"\n',
     "profile 'a': key 'memory_request': 512m is more than its memory limit 256m"),
    ('[profiles.a]\ncpus = true\n', "profile 'a': key 'cpus': must be a number"),
    ('[profiles.a]\npids = 1.5\n', "profile 'a': key 'pids': must be an integer"),
    ('[profiles.a]\npool = -1\n', "profile 'a': key 'pool': must be at least 0"),
    ('[profiles.a]\nidle_timeout = -1\n', "profile 'a': key 'idle_timeout': must be at least 0"),
    ('[profiles.a]\nrepository = "http://example.com/r.git"\n',
     "profile 'a': key 'repository': must be an https:// URL"),
    ('[profiles.a]\nrepository = "git@example.com:r.git"\n',
     "profile 'a': key 'repository': must be an https:// URL"),
    ('[profiles.a]\nrepository = "https://user:tok@example.com/r.git"\n',
     "profile 'a': key 'repository': must not hold credentials"),
    ('[profiles.a]\nrepository = "https://example.com/r.git; rm -rf /"\n',
     "profile 'a': key 'repository': must not hold spaces"),
    ('[profiles.a]\nagent_volume = "relative/.claude"\n',
     "profile 'a': key 'agent_volume': must be an absolute, normal path"),
    ('[profiles.a]\nagent_volume = "/home/developer/../../etc"\n',
     "profile 'a': key 'agent_volume': must be an absolute, normal path"),
    ('[profiles.a]\nagent_volume = "/workspace"\n',
     "profile 'a': key 'agent_volume': cannot be /workspace"),
    ('[profiles.a]\nagent_volume = "/"\n', "profile 'a': key 'agent_volume'"),
    ('[profiles.a]\nnetwork = "host"\n', "profile 'a': key 'network': host would share"),
    ('[profiles.a]\nsecrets = ["NOT A NAME"]\n',
     "profile 'a': key 'secrets': not an environment variable's name"),
    ('[profiles.a]\nsecrets = "KEY"\n', "profile 'a': key 'secrets': must be a list"),
    ('[profiles.a]\nenvironment = { A = 1 }\n', "profile 'a': key 'environment': A: must be a string"),
    ('[profiles.a]\nenvironment = { CAPSULE_REPOSITORY = "x" }\n',
     "profile 'a': key 'environment': CAPSULE_REPOSITORY is set by capsule"),
    ('[profiles.a]\nsecrets = ["K"]\nenvironment = { K = "x" }\n',
     "profile 'a': key 'secrets': K is also in environment"),
    ('[profiles.a]\nextends = "nope"\n', "profile 'a': key 'extends': no profile 'nope'"),
    ('[profiles.a]\nextends = "b"\n[profiles.b]\nextends = "a"\n', "extend each other in a circle"),
    ('[profiles."Bad Name"]\n', "profile 'Bad Name': a name is 1 to 32"),
    ('[profile.a]\n', "unknown key 'profile'"),
    ('[profiles]\na = 1\n', "profile 'a': must be a table"),
    ('not toml = = 1\n', "not TOML"),
])
def test_a_bad_file_is_refused_naming_file_profile_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as e:
        load_profiles(path, builtins())
    assert str(e.value).startswith(f"{path}: ")
    assert expected in str(e.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="No such file"):
        load_profiles(str(tmp_path / "none.toml"), builtins())


def test_repository_checks():
    assert check_repository("https://github.com/a/b.git") == "https://github.com/a/b.git"
    for bad in ("https://", "https://x@y/", "file:///etc", "ext::sh -c x", "https://a/b#c",
                "https://a/" + "x" * 3000, 5):
        with pytest.raises((TypeError, ValueError)):
            check_repository(bad)


# -- secrets -----------------------------------------------------------------------

def test_secrets_from_the_environment_and_the_file(tmp_path):
    profiles = load_profiles(write(tmp_path, """
[profiles.claude]
secrets = ["NPM_TOKEN", "GH_TOKEN", "MISSING"]
"""), builtins())
    path = tmp_path / "secrets"
    path.write_text("# tokens\n\nGH_TOKEN = ghp_file=with=equals\nOTHER=not-named\n")
    os.chmod(path, 0o600)
    secrets = load_secrets(str(path), profiles,
                           environ={"NPM_TOKEN": "sk-env", "GH_TOKEN": "from-env",
                                    "HOME": "/root"})
    assert secrets.values == {"NPM_TOKEN": "sk-env", "GH_TOKEN": " ghp_file=with=equals"}
    assert secrets.for_profile(profiles["claude"]) == secrets.values
    assert secrets.for_profile(profiles["shell"]) == {}
    assert secrets.missing(profiles) == [("claude", "MISSING")]
    assert "sk-env" not in repr(secrets) and "ghp" not in repr(secrets)
    assert repr(secrets) == "<Secrets GH_TOKEN, NPM_TOKEN>"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_a_secrets_file_others_may_read_is_refused(tmp_path, mode):
    path = tmp_path / "secrets"
    path.write_text("KEY=value\n")
    os.chmod(path, mode)
    with pytest.raises(ProfileError, match="readable or writable by every user.*chmod 600"):
        load_secrets(str(path), builtins(), environ={})


def test_a_secrets_file_that_does_not_parse_is_refused_without_its_values(tmp_path):
    path = tmp_path / "secrets"
    path.write_text("KEY=fine\nthis is the-secret-value\n")
    os.chmod(path, 0o600)
    with pytest.raises(ProfileError) as e:
        load_secrets(str(path), builtins(), environ={})
    assert str(e.value) == f"{path}, line 2: not NAME=value"


def test_agent_volume_names_differ_per_user_profile_and_instance():
    names = {agent_volume_name(i, p, u) for i in ("a", "b") for p in ("claude", "x")
             for u in ("alice", "bob", "al/ice", "al_ice")}
    assert len(names) == 16
    name = agent_volume_name("default", "claude", "al/ice")
    assert name.startswith("capsule-default-claude-al_ice-")
    assert all(c.isalnum() or c in "_.-" for c in name)


# -- sessions -----------------------------------------------------------------------

@pytest.fixture
def docker():
    return FakeDockerAPI(images=("capsule-runtime:latest", "capsule-agent:test"))


def make_manager(docker, profiles=None, secrets=Secrets(), **config):
    return SessionManager(docker, Clock(), SessionConfig(
        spec=SPEC, instance="t", grace=60, replay_bytes=16, profiles=profiles,
        secrets=secrets, **config))


def test_the_default_profile_is_the_servers_shell(docker):
    manager = make_manager(docker)
    session = manager.create(RecordingClient(), 80, 24)
    assert session.profile == "shell"
    container = docker.containers[session.container_id]
    assert container["labels"][LABEL_PROFILE] == "shell"
    assert container["spec"].image == "capsule-runtime:latest"
    assert container["spec"].secrets == {} and container["spec"].volumes == ()
    assert docker.processes[0].argv == tuple(keeper_argv(("bash", "-l"), 0, 16))


def test_a_profile_makes_its_container_and_command(docker):
    manager = make_manager(docker, builtins())
    client = RecordingClient()
    session = manager.create(client, 80, 24, profile="claude")
    assert session.profile == "claude" and session.settings.name == "claude"
    assert client.events == [("started", session.id, False)]
    container = docker.containers[session.container_id]
    assert container["spec"].image == "capsule-agent:test"
    assert container["labels"][LABEL_PROFILE] == "claude"
    assert container["labels"][LABEL_SESSION] == session.id
    assert docker.processes[0].argv == tuple(keeper_argv(CLAUDE_COMMAND, 0, 16))


def test_an_unknown_profile_makes_nothing(docker):
    manager = make_manager(docker, builtins())
    with pytest.raises(UnknownProfile) as e:
        manager.create(RecordingClient(), 80, 24, profile="nope")
    assert e.value.message == "no profile 'nope': the profiles are claude, shell"
    assert e.value.code == "unknown_profile"
    assert manager.sessions == {} and docker.containers == {}


def test_a_bad_repository_makes_nothing(docker):
    manager = make_manager(docker, builtins())
    with pytest.raises(BadRepository, match="must not hold credentials"):
        manager.create(RecordingClient(), 80, 24, repository="https://u:p@example.com/r")
    assert manager.sessions == {} and docker.containers == {}


def test_secrets_reach_the_container_only(docker, tmp_path):
    profiles = load_profiles(write(tmp_path, '[profiles.claude]\nsecrets = ["API_KEY"]\n'),
                             builtins())
    manager = make_manager(docker, profiles, Secrets({"API_KEY": "s3cret"}))
    claude = manager.create(RecordingClient(), 80, 24, profile="claude")
    plain = manager.create(RecordingClient(), 80, 24)
    assert docker.containers[claude.container_id]["spec"].secrets == {"API_KEY": "s3cret"}
    assert docker.containers[plain.container_id]["spec"].secrets == {}
    assert "s3cret" not in repr(docker.containers[claude.container_id]["spec"])
    for process in docker.processes:
        assert "s3cret" not in repr(process.argv) and "API_KEY" not in process.env


def test_a_repository_is_cloned_by_the_sessions_command(docker):
    manager = make_manager(docker, builtins())
    session = manager.create(RecordingClient(), 80, 24, profile="claude",
                             repository="https://example.com/r.git")
    assert session.repository == "https://example.com/r.git"
    process = docker.processes[-1]
    assert process.argv == tuple(keeper_argv(
        ("sh", "-c", CLONE_SCRIPT, "capsule-start", *CLAUDE_COMMAND), 0, 16))
    assert "example.com" not in " ".join(process.argv)
    assert process.env["CAPSULE_REPOSITORY"] == "https://example.com/r.git"
    assert process.env["CAPSULE_CLONE_TIMEOUT"] == "300"


def test_agent_volume_per_user(docker, tmp_path):
    profiles = load_profiles(write(tmp_path, """
[profiles.claude]
agent_volume = "/home/developer/.claude"
"""), builtins())
    manager = make_manager(docker, profiles)
    alice = manager.create(RecordingClient(), 80, 24, user="alice", profile="claude")
    bob = manager.create(RecordingClient(), 80, 24, user="bob", profile="claude")
    anonymous = manager.create(RecordingClient(), 80, 24, profile="claude")
    spec = docker.containers[alice.container_id]["spec"]
    assert spec.volumes == ((agent_volume_name("t", "claude", "alice"),
                             "/home/developer/.claude"),)
    assert spec.volume_labels == {"io.capsule.managed": "true", "io.capsule.instance": "t",
                                  "io.capsule.user": "alice", "io.capsule.profile": "claude",
                                  "io.capsule.volume": "agent"}
    assert docker.containers[bob.container_id]["spec"].volumes == (
        (agent_volume_name("t", "claude", "bob"), "/home/developer/.claude"),)
    assert docker.containers[anonymous.container_id]["spec"].volumes == ()


def test_a_recovered_session_keeps_its_profile(docker):
    manager = make_manager(docker, builtins())
    docker.add_container("c1", {"io.capsule.managed": "true", "io.capsule.instance": "t",
                                LABEL_SESSION: "00000000-0000-4000-8000-000000000001",
                                LABEL_PROFILE: "claude"})
    docker.add_container("c2", {"io.capsule.managed": "true", "io.capsule.instance": "t",
                                LABEL_SESSION: "00000000-0000-4000-8000-000000000002",
                                LABEL_PROFILE: "gone"})
    from twisted.internet.defer import Deferred
    Deferred.fromCoroutine(manager.recovery.recover())
    one = manager.sessions["00000000-0000-4000-8000-000000000001"]
    two = manager.sessions["00000000-0000-4000-8000-000000000002"]
    assert one.profile == "claude" and one.settings is manager.profiles["claude"]
    assert two.profile == "gone" and two.settings is manager.profiles["shell"]


# -- the WebSocket: ?profile= ---------------------------------------------------------

def _link(clock, docker, query):
    from capsule.web.websocket_factory import CapsuleServerFactory
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", grace=60, profiles=builtins()))
    factory = CapsuleServerFactory(manager, clock, max_message_size=1024)
    link = Link(clock, factory, query)
    link.flush()
    return manager, link


def test_ws_profile_opens_a_session_of_that_profile(clock, docker):
    manager, link = _link(clock, docker, "profile=claude")
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [connected] = link.new()
    assert connected["type"] == "connected"
    session = manager.sessions[connected["session_id"]]
    assert session.profile == "claude"
    assert docker.containers[session.container_id]["spec"].image == "capsule-agent:test"


@pytest.mark.parametrize("query, shown", [
    ("profile=nope", "'nope'"),
    ("profile=" + "x" * 500, "'(too long)'"),
    ("profile=%1b%5b2J", "'?[2J'"),
])
def test_ws_unknown_profile_is_refused_with_the_list(clock, docker, query, shown):
    manager, link = _link(clock, docker, query)
    assert link.new() == [{"type": "error", "code": "unknown_profile",
                           "message": f"no profile {shown}: the profiles are claude, shell"}]
    assert link.client.closed[1] == 4400
    assert manager.sessions == {} and docker.containers == {}


# -- the options ---------------------------------------------------------------------

def _options(*args):
    from capsule.tap import Options
    options = Options()
    options.parseOptions(["--www", os.path.join(os.path.dirname(__file__), "..", "www"),
                          *args])
    return options


def test_options_make_the_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    path = write(tmp_path, '[profiles.claude]\ncredentials = ["anthropic"]\n'
                           '[profiles.py]\ncommand = ["python3"]\n')
    options = _options("--profiles", path, "--agent-image", "agent:2", "--memory", "2g",
                       "--pool-size", "3", "--clone-timeout", "20", "--idle-timeout", "99")
    profiles = options["profile-table"]
    assert sorted(profiles) == ["claude", "py", "shell"]
    assert profiles["claude"].spec.image == "agent:2"
    assert profiles["shell"].spec.image == "capsule-runtime:latest"
    assert all(p.spec.memory == "2g" and p.clone_timeout == 20 and p.idle_timeout == 99
               for p in profiles.values())
    assert (profiles["shell"].pool, profiles["claude"].pool, profiles["py"].pool) == (3, 0, 3)
    assert options["secrets"].values == {"ANTHROPIC_API_KEY": "sk-from-env"}


def test_options_refuse_a_bad_profiles_file(tmp_path):
    from twisted.python.usage import UsageError
    path = write(tmp_path, '[profiles.claude]\nrepository = "http://x/y"\n')
    with pytest.raises(UsageError) as e:
        _options("--profiles", path)
    assert str(e.value) == (f"--profiles: {path}: profile 'claude': key 'repository':"
                            " must be an https:// URL")


def test_options_refuse_a_world_readable_secrets_file(tmp_path):
    from twisted.python.usage import UsageError
    path = tmp_path / "secrets"
    path.write_text("A=b\n")
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match=r"^--secrets-file: .*readable or writable by every"):
        _options("--secrets-file", str(path))


# -- per-profile limits ----------------------------------------------------------------

def test_a_profiles_lifetime_limit_is_its_own(docker, tmp_path):
    # (Its idle limit: tests/test_idle.py.)
    from capsule.sessions.cleanup import end_overdue
    profiles = load_profiles(write(tmp_path, """
[profiles.brief]
max_lifetime = 50
"""), builtins())
    clock = Clock()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", grace=60, profiles=profiles))
    clients = {name: RecordingClient() for name in ("shell", "brief")}
    sessions = {name: manager.create(client, 80, 24, profile=name)
                for name, client in clients.items()}
    clock.advance(50)
    assert end_overdue(manager, clock) == [sessions["brief"]]
    assert clients["brief"].events[-1][2] == (
        "the session reached its maximum lifetime (50 s, the max_lifetime of profile brief)")
    clock.advance(3600)
    assert end_overdue(manager, clock) == [], "the shell profile has no lifetime limit"


def test_a_session_with_an_agent_volume_checks_it_can_write_there(docker, tmp_path):
    profiles = load_profiles(write(tmp_path, """
[profiles.claude]
agent_volume = "/home/developer/.claude"
"""), builtins())
    manager = make_manager(docker, profiles)
    manager.create(RecordingClient(), 80, 24, user="alice", profile="claude")
    manager.create(RecordingClient(), 80, 24, profile="claude")
    with_volume, without = docker.processes
    assert with_volume.argv == tuple(keeper_argv(
        ("sh", "-c", CLONE_SCRIPT, "capsule-start", *CLAUDE_COMMAND), 0, 16))
    assert with_volume.env["CAPSULE_AGENT_VOLUME"] == "/home/developer/.claude"
    assert without.argv == tuple(keeper_argv(CLAUDE_COMMAND, 0, 16))
    assert "CAPSULE_AGENT_VOLUME" not in without.env


# -- the admin command: agent volumes ---------------------------------------------------

class FakeVolumesAPI:
    def __init__(self, volumes, in_use=(), sizes=None):
        self._volumes = {v["Name"]: v for v in volumes}
        self.in_use = set(in_use)
        self.filters = []
        self.sizes = dict(sizes or {})

    @property
    def api(self):
        return self

    def volumes(self, filters):
        self.filters.append(filters)
        wanted = dict(f.split("=", 1) for f in filters["label"])
        # The engine filters by every label given.
        return {"Volumes": [v for v in self._volumes.values()
                            if all(v["Labels"].get(k) == x for k, x in wanted.items())]}

    def df(self):
        return {"Volumes": [{**v, "UsageData": {"Size": self.sizes.get(v["Name"], -1),
                                                "RefCount": 0}}
                            for v in self._volumes.values()]}

    def remove_volume(self, name):
        import docker.errors
        from requests import Response
        if name in self.in_use:
            response = Response()
            response.status_code = 409
            raise docker.errors.APIError("in use", response, "volume is in use")
        if name not in self._volumes:
            raise docker.errors.NotFound("no such volume")
        del self._volumes[name]


def _volume(user, profile="claude", instance="default"):
    return {"Name": agent_volume_name(instance, profile, user), "Labels": {
        "io.capsule.managed": "true", "io.capsule.instance": instance,
        "io.capsule.volume": "agent", "io.capsule.user": user, "io.capsule.profile": profile}}


def _admin(command, api):
    import io
    from capsule.admin import COMMANDS, AdminClient, parser
    args = parser().parse_args(command)
    out = io.StringIO()
    code = COMMANDS[args.command](AdminClient("http://127.0.0.1:9"), args, out,
                                  docker_client=api)
    return code, out.getvalue().splitlines()


def test_admin_lists_and_removes_one_users_volumes():
    api = FakeVolumesAPI([_volume("alice"), _volume("alice", "py"), _volume("bob"),
                          _volume("alice", instance="other")])
    code, lines = _admin(["volumes"], api)
    assert code == 0
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["alice", "claude"], ["alice", "py"], ["bob", "claude"]]
    assert lines[-1] == "3 agent volume(s) of instance default"
    code, lines = _admin(["remove-volumes", "--user", "alice", "--dry-run"], api)
    assert code == 0 and lines[-1] == "would remove 2 agent volume(s) of alice (instance default)"
    code, lines = _admin(["remove-volumes", "--user", "alice"], api)
    assert code == 0
    assert lines == [f"removed {agent_volume_name('default', 'claude', 'alice')}",
                     f"removed {agent_volume_name('default', 'py', 'alice')}",
                     "removed 2 agent volume(s) of alice (instance default)"]
    assert sorted(api._volumes) == sorted([_volume("bob")["Name"],
                                           _volume("alice", instance="other")["Name"]])
    assert "io.capsule.user=alice" in api.filters[-1]["label"]


def test_admin_lists_each_volumes_size():
    api = FakeVolumesAPI([_volume("alice"), _volume("bob")],
                         sizes={_volume("alice")["Name"]: 300 * 1024 * 1024})
    code, lines = _admin(["volumes"], api)
    assert code == 0
    assert [line.split() for line in lines[:3]] == [
        ["USER", "PROFILE", "SIZE", "VOLUME"],
        ["alice", "claude", "300.0MiB", _volume("alice")["Name"]],
        ["bob", "claude", "?", _volume("bob")["Name"]]]


def test_admin_keeps_a_volume_in_use_and_says_so():
    api = FakeVolumesAPI([_volume("alice")], in_use=[_volume("alice")["Name"]])
    code, lines = _admin(["remove-volumes", "--user", "alice"], api)
    assert code == 1
    assert lines[0].startswith(f"kept {_volume('alice')['Name']}: a live session of alice uses it")
    assert lines[-1] == "removed 0 agent volume(s) of alice (instance default)"


def test_the_example_file_loads():
    path = os.path.join(os.path.dirname(__file__), "..", "docker", "profiles.example.toml")
    profiles = load_profiles(path, builtins())
    assert sorted(profiles) == ["claude", "offline", "python", "review", "shell"]
    assert profiles["python"].egress.hosts == ("pypi.org", "files.pythonhosted.org")
    assert profiles["review"].repository == "https://github.com/example/capsule.git"
    assert profiles["review"].agent_volume == "/home/developer/.claude"
    assert profiles["offline"].spec.network == "none"


def test_a_secrets_file_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ProfileError, match="not a regular file"):
        load_secrets(str(fifo), builtins(), environ={})
    with pytest.raises(ProfileError, match="No such file"):
        load_secrets(str(tmp_path / "none"), builtins(), environ={})


def test_an_out_of_memory_end_names_the_profiles_limit(docker, tmp_path):
    profiles = load_profiles(write(tmp_path, '[profiles.big]\nmemory = "3g"\n'), builtins())
    manager = make_manager(docker, profiles)
    client = RecordingClient()
    session = manager.create(client, 80, 24, profile="big")
    docker.processes[0].exit(137)
    assert client.events[-1] == ("ended", 137, "the shell was killed (signal 9; most often it"
                                 " ran out of memory under the 3g limit)")
    assert session.status() in ("ending", "ended")


# -- brokered credentials ------------------------------------------------------

def test_the_claude_profile_brokers_anthropic_and_github():
    profiles = builtins()
    assert profiles["claude"].credentials == ("anthropic", "github")
    assert profiles["shell"].credentials == ()


def test_credentials_are_read_and_inherited(tmp_path):
    profiles = load_profiles(write(tmp_path, '[profiles.a]\ncredentials = ["anthropic"]\n'
                                             '[profiles.b]\nextends = "a"\n'
                                             '[profiles.claude]\ncredentials = []\n'),
                             builtins())
    assert profiles["a"].credentials == ("anthropic",)
    assert profiles["b"].credentials == ("anthropic",)
    assert profiles["claude"].credentials == ()


@pytest.mark.parametrize("text, expected", [
    ('[profiles.a]\ncredentials = ["openai"]\n',
     "profiles.toml: profile 'a': key 'credentials': unknown credential 'openai'"
     " (known: anthropic, github)"),
    ('[profiles.a]\ncredentials = "anthropic"\n',
     "profile 'a': key 'credentials': must be a list of credential names"),
    ('[profiles.a]\ncredentials = [3]\n',
     "profile 'a': key 'credentials': unknown credential '(not a name)'"),
])
def test_unknown_credentials_are_refused(tmp_path, text, expected):
    with pytest.raises(ProfileError, match=re.escape(expected)):
        load_profiles(write(tmp_path, text), builtins())


@pytest.mark.parametrize("text, key", [
    ('[profiles.claude]\nsecrets = ["ANTHROPIC_API_KEY"]\n', "secrets"),
    ('[profiles.x]\nextends = "claude"\nsecrets = ["ANTHROPIC_API_KEY"]\n', "secrets"),
    ('[profiles.x]\ncredentials = ["anthropic"]\nenvironment = { ANTHROPIC_API_KEY = "k" }\n',
     "environment"),
    ('[profiles.x]\nsecrets = ["ANTHROPIC_AUTH_TOKEN"]\ncredentials = ["anthropic"]\n',
     "secrets"),
])
def test_a_key_in_the_container_beside_the_gateway_is_refused(tmp_path, text, key):
    with pytest.raises(ProfileError) as caught:
        load_profiles(write(tmp_path, text), builtins())
    message = str(caught.value)
    assert f"key {key!r}" in message and "credentials" in message
    assert "capsule's gateway" in message


def test_the_key_is_read_for_the_gateway_never_given_to_a_container(tmp_path):
    profiles = builtins()
    secrets = load_secrets(None, profiles, environ={"ANTHROPIC_API_KEY": "sk-real"})
    assert secrets.values == {"ANTHROPIC_API_KEY": "sk-real"}
    assert all(secrets.for_profile(p) == {} for p in profiles.values())
