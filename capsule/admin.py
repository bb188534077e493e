"""
C{python -m capsule.admin} (or C{capsule-admin}): steer a running capsule
through its admin API (C{list}, C{end}, C{drain}), remove the containers of
one that is not running (C{cleanup}, through Docker), list or remove users'
agent volumes (C{volumes}, C{remove-volumes}, through Docker), and add,
change or remove a user of an C{--auth} file (C{user add}, C{user remove}).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.request

LABEL_MANAGED = "io.capsule.managed"
LABEL_INSTANCE = "io.capsule.instance"
LABEL_SESSION = "io.capsule.session"
LABEL_USER = "io.capsule.user"
LABEL_PROFILE = "io.capsule.profile"
LABEL_VOLUME = "io.capsule.volume"
DEFAULT_URL = "http://127.0.0.1:3001"
TOKEN_ENV = "CAPSULE_ADMIN_TOKEN"


class AdminError(Exception):
    """
    What went wrong, as a sentence for the operator.
    """


class AdminClient:
    """
    The admin API of the capsule at C{url}.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, admin: bool = True) -> tuple[int, dict]:
        url = f"{self.url}{'/api/admin/' if admin else '/'}{path}"
        request = urllib.request.Request(url, method=method)
        if self.token and admin:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as e:
            return e.code, _json(e.read())
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminError(f"no capsule answers at {self.url} ({reason})") from None

    def ask(self, method: str, path: str) -> dict:
        """
        The answer of a successful call; else raise L{AdminError} with the
        server's sentence.
        """
        status, body = self.call(method, path)
        if status == 200:
            return body
        message = body.get("error") or f"HTTP {status}"
        if status in (401, 403) and not self.token:
            message += (f" (set {TOKEN_ENV} to the admin token; on capsule's host, loopback"
                        " needs none when capsule has no users or runs with --admin-loopback)")
        raise AdminError(f"{self.url}: {message}")

    def health(self) -> dict | None:
        """
        C{/health}, or C{None} when nothing answers there.
        """
        try:
            _, body = self.call("GET", "health", admin=False)
        except AdminError:
            return None
        return body


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_sessions(answer: dict) -> str:
    """
    The sessions of C{GET /api/admin/sessions} as a table.
    """
    rows = [("SESSION", "OWNER", "STATE", "AGE", "IDLE", "CONTAINER", "CLIENT", "BYTES OUT")]
    for s in answer.get("sessions", []):
        rows.append((s["id"][:8], s.get("owner") or "-", s["state"], _duration(s["age"]),
                     _duration(s["idle"]), (s.get("container") or "-")[:12],
                     "attached" if s["client_attached"] else "-", str(s["bytes_out"])))
    kept = answer.get("kept", [])
    for k in kept:
        # A kept session: its container stopped, its files kept (docs/keeping.md).
        rows.append((k["id"][:8], k.get("owner") or "-", "kept", _duration(k["age"]), "-",
                     (k.get("container") or "-")[:12], "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    count = len(rows) - 1 - len(kept)
    lines.append(f"{count} session{'' if count == 1 else 's'}"
                 + (f" and {len(kept)} kept" if kept else "") + f" of instance"
                 f" {answer.get('instance')}" + (" (draining)" if answer.get("draining") else ""))
    return "\n".join(lines)


def do_list(client: AdminClient, args, out) -> int:
    answer = client.ask("GET", "sessions")
    print(json.dumps(answer, indent=2) if args.json else format_sessions(answer), file=out)
    return 0


def do_end(client: AdminClient, args, out) -> int:
    if args.all == bool(args.session_id):
        raise AdminError("end: give a session id, or --all")
    if args.all:
        answer = client.ask("DELETE", "sessions")
        print(f"ended {answer['ended']} session(s)", file=out)
    else:
        answer = client.ask("DELETE", f"sessions/{urllib.request.quote(args.session_id)}")
        print(f"ended session {answer['ended']}", file=out)
    return 0


def do_drain(client: AdminClient, args, out) -> int:
    if args.cancel:
        client.ask("DELETE", "drain")
        print("capsule takes new sessions again", file=out)
        return 0
    query = "" if args.deadline is None else f"?deadline={args.deadline:g}"
    state = client.ask("POST", f"drain{query}")
    until = ("until they end" if state["deadline_in"] is None
             else f"for at most {state['deadline_in']:.0f} s")
    print(f"draining: no new sessions; {state['sessions']} session(s) go on {until}", file=out)
    if not args.wait:
        return 0
    while state["sessions"]:
        time.sleep(args.interval)
        state = client.ask("GET", "drain")
    print("drained: no session left", file=out)
    return 0


def do_cleanup(client: AdminClient, args, out, docker_client=None) -> int:
    """
    Remove the containers of an instance that does not run.  Refused while
    a capsule of that instance answers at C{--url}, or while one is attached
    to its sessions' shells (a running exec in a container).
    """
    health = client.health()
    if health is not None and health.get("instance") == args.instance:
        raise AdminError(
            f"capsule instance {args.instance} is running at {client.url}: its containers are"
            " its sessions. End them with `end --all`, or stop capsule first (its sessions"
            " then live on, and a restart recovers them)")
    import docker.errors
    try:
        if docker_client is None:
            docker_client = docker.from_env(timeout=60)
        api = docker_client.api
        found = api.containers(all=True, filters={"label": [
            f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={args.instance}"]})
    except docker.errors.DockerException as e:
        raise AdminError(f"cannot reach the Docker engine: {e}") from None
    if not args.force:
        for container in found:
            if container.get("State") != "running":
                continue
            attached = [e for e in api.inspect_container(container["Id"]).get("ExecIDs") or ()
                        if _exec_running(api, e)]
            if attached:
                raise AdminError(
                    f"{_name(container)} has a running exec: a capsule of instance"
                    f" {args.instance} seems attached to it (on another address than"
                    f" {client.url}?). Stop it first, or give --force")
    for container in found:
        name = _name(container)
        if args.dry_run:
            print(f"would remove {name} ({container.get('State')})", file=out)
            continue
        try:
            api.remove_container(container["Id"], force=True, v=True)
        except Exception as e:
            if "No such container" in str(e) or "already in progress" in str(e):
                continue
            raise
        print(f"removed {name}", file=out)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(found)} container(s) of instance {args.instance}", file=out)
    return 0


def _agent_volumes(args, docker_client=None) -> tuple[object, list[dict]]:
    """
    The Docker API and the agent volumes of C{args.instance} (of
    C{args.user} and C{args.profile}, when given).
    """
    import docker.errors
    labels = [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={args.instance}",
              f"{LABEL_VOLUME}=agent"]
    if getattr(args, "user", None) is not None:
        labels.append(f"{LABEL_USER}={args.user}")
    if getattr(args, "profile", None) is not None:
        labels.append(f"{LABEL_PROFILE}={args.profile}")
    try:
        if docker_client is None:
            docker_client = docker.from_env(timeout=60)
        api = docker_client.api
        found = api.volumes(filters={"label": labels}).get("Volumes") or []
    except docker.errors.DockerException as e:
        raise AdminError(f"cannot reach the Docker engine: {e}") from None
    # The engine's filter is the first word; each volume's labels the last.
    wanted = dict(label.split("=", 1) for label in labels)
    found = [v for v in found
             if all((v.get("Labels") or {}).get(k) == value for k, value in wanted.items())]
    return api, sorted(found, key=lambda v: (v["Labels"].get(LABEL_USER, ""),
                                              v["Labels"].get(LABEL_PROFILE, ""), v["Name"]))


def _volume_sizes(api) -> dict[str, int]:
    """
    Volumes' sizes in bytes by name, as the engine's C{/system/df} counts
    them (it walks each volume: slow for large ones); none when it cannot.
    """
    import docker.errors
    try:
        found = api.df().get("Volumes") or []
    except docker.errors.DockerException:
        return {}
    sizes = {}
    for volume in found:
        size = (volume.get("UsageData") or {}).get("Size", -1)
        if isinstance(size, int) and size >= 0:
            sizes[volume["Name"]] = size
    return sizes


def do_volumes(client: AdminClient, args, out, docker_client=None) -> int:
    """
    The agent volumes of an instance: whose, of which profile, how large.
    """
    api, found = _agent_volumes(args, docker_client)
    sizes = _volume_sizes(api) if found else {}
    rows = [("USER", "PROFILE", "SIZE", "VOLUME")]
    for volume in found:
        labels = volume.get("Labels") or {}
        size = sizes.get(volume["Name"])
        # The one local user of a capsule without users has no name.
        rows.append((labels.get(LABEL_USER, "?") or "(local)", labels.get(LABEL_PROFILE, "?"),
                     "?" if size is None else f"{size / (1024 * 1024):.1f}MiB",
                     volume["Name"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    print(f"{len(found)} agent volume(s) of instance {args.instance}", file=out)
    return 0


def do_remove_volumes(client: AdminClient, args, out, docker_client=None) -> int:
    """
    Remove a user's agent volumes (what their agents remember: logins,
    settings).  A volume a live session uses is kept, and said: end that
    session first.
    """
    import docker.errors
    api, found = _agent_volumes(args, docker_client)
    kept = 0
    for volume in found:
        name = volume["Name"]
        if args.dry_run:
            print(f"would remove {name}", file=out)
            continue
        try:
            api.remove_volume(name)
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as e:
            if e.status_code == 409:
                kept += 1
                print(f"kept {name}: a live session of {args.user} uses it (end it first:"
                      " `list`, then `end SESSION`)", file=out)
                continue
            raise AdminError(f"could not remove {name}: {e.explanation or e}") from None
        print(f"removed {name}", file=out)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(found) - kept} agent volume(s) of {args.user or '(local)'} (instance"
          f" {args.instance})", file=out)
    return 1 if kept else 0


def _exec_running(api, exec_id: str) -> bool:
    try:
        return bool(api.exec_inspect(exec_id).get("Running"))
    except Exception:
        return False


def _name(container: dict) -> str:
    names = container.get("Names") or [container["Id"][:12]]
    return names[0].lstrip("/")


def _read_password(args, stdin, err) -> str:
    """
    The new password: one line of standard input with C{--password-stdin},
    else typed twice at the terminal, without echo.
    """
    if args.password_stdin:
        line = stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        return password[:-1] if password.endswith("\r") else password
    if not stdin.isatty():
        raise AdminError("no terminal to read the password from: give it on standard input"
                         " with --password-stdin")
    first = getpass.getpass(f"New password for {args.name}: ", stream=err)
    if getpass.getpass("Type it again: ", stream=err) != first:
        raise AdminError("the two passwords differ; nothing was changed")
    return first


def do_user(client: AdminClient, args, out, stdin=None, err=None) -> int:
    from capsule.auth.stores import BCRYPT_COST, hash_password, set_htpasswd_user
    from capsule.auth.users import valid_user_name
    if not valid_user_name(args.name):
        raise AdminError(f"{args.name!r} is not a valid user name (up to 64 characters of"
                         " A-Z a-z 0-9 . _ @ + -)")
    try:
        if args.action == "remove":
            done = set_htpasswd_user(args.htpasswd, args.name, None)
        else:
            password = _read_password(args, stdin or sys.stdin, err or sys.stderr)
            hashed = hash_password(password, args.cost or BCRYPT_COST)
            done = set_htpasswd_user(args.htpasswd, args.name, hashed)
    except (ValueError, LookupError) as e:
        raise AdminError(str(e).strip("'\"")) from None
    except OSError as e:
        raise AdminError(f"cannot write {args.htpasswd}: {e.strerror or e}") from None
    what = {"added": f"added {args.name} to", "changed": f"changed the password of {args.name} in",
            "removed": f"removed {args.name} from"}[done]
    print(f"{what} {args.htpasswd} (a capsule with --auth {args.htpasswd} reads it again at its"
          " next login: no restart)", file=out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m capsule.admin",
        description="Steer a running capsule through its admin API, and remove the"
                    " containers of one that is not running.")
    p.add_argument("--url", default=os.environ.get("CAPSULE_URL", DEFAULT_URL),
                   help=f"the capsule to steer [default: $CAPSULE_URL, else {DEFAULT_URL}];"
                        f" the admin token is read from ${TOKEN_ENV} (loopback needs none when"
                        " capsule has no users or runs with --admin-loopback)")
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the live sessions: owner, state, age, container,"
                                          " client, bytes")
    listing.add_argument("--json", action="store_true", help="as the API's JSON")
    end = sub.add_parser("end", help="end a session (its client is told), or every session")
    end.add_argument("session_id", nargs="?", help="its id, or a unique prefix (8 characters)")
    end.add_argument("--all", action="store_true", help="end every session")
    drain = sub.add_parser("drain", help="take no new sessions; keep the others until they"
                                         " end or the deadline passes")
    drain.add_argument("--deadline", type=float, metavar="S",
                       help="end the sessions still live after S seconds [default: never]")
    drain.add_argument("--wait", action="store_true", help="return once no session is left")
    drain.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    drain.add_argument("--cancel", action="store_true", help="take new sessions again")
    cleanup = sub.add_parser("cleanup", help="remove the containers of an instance that is not"
                                             " running (through Docker)")
    cleanup.add_argument("--instance", default="default", help="[default: default]")
    cleanup.add_argument("--dry-run", action="store_true", help="say what would be removed")
    cleanup.add_argument("--force", action="store_true",
                         help="remove even containers a capsule seems attached to")
    volumes = sub.add_parser("volumes", help="the users' agent volumes (through Docker)")
    volumes.add_argument("--instance", default="default", help="[default: default]")
    volumes.add_argument("--user", help="only this user's")
    volumes.add_argument("--profile", help="only this profile's")
    remove = sub.add_parser("remove-volumes", help="remove a user's agent volumes (through"
                                                   " Docker): their agents forget them")
    remove.add_argument("--user", required=True,
                        help="whose volumes ('': the local user's, of a capsule without users)")
    remove.add_argument("--instance", default="default", help="[default: default]")
    remove.add_argument("--profile", help="only this profile's [default: every profile's]")
    remove.add_argument("--dry-run", action="store_true", help="say what would be removed")
    user = sub.add_parser("user", help="add a user to an --auth file or change their password"
                                       " (bcrypt), or remove them")
    user.add_argument("action", choices=("add", "remove"),
                      help="add: add the user, or give them a new password; remove: remove them")
    user.add_argument("name", help="the user's name (up to 64 characters of"
                                   " A-Z a-z 0-9 . _ @ + -)")
    user.add_argument("--htpasswd", required=True, metavar="FILE",
                      help="the file capsule's --auth reads (made, mode 0600, if missing)")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the password from the first line of standard input (for"
                           " scripts) rather than asking twice at the terminal")
    user.add_argument("--cost", type=int, metavar="N",
                      help="bcrypt's cost, 10 to 16 [default: 12]")
    return p


COMMANDS = {"list": do_list, "end": do_end, "drain": do_drain, "cleanup": do_cleanup,
            "volumes": do_volumes, "remove-volumes": do_remove_volumes}


def main(argv=None, out=sys.stdout, err=sys.stderr, stdin=None) -> int:
    args = parser().parse_args(argv)
    client = AdminClient(args.url, os.environ.get(TOKEN_ENV) or None)
    try:
        if args.command == "user":
            return do_user(client, args, out, stdin, err)
        return COMMANDS[args.command](client, args, out)
    except AdminError as e:
        print(f"capsule.admin: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
