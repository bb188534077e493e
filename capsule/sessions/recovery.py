"""
What a server finds when it starts: the sessions of its earlier run whose
containers still run (with the keeper, so do their shells), kept for their
clients; the kept sessions, whose containers are stopped
(L{capsule.sessions.keeping}); everything else of this server's is a
leftover and goes.  And the
engine's settings and images that would make sessions fail later, said once
at start.
"""

from __future__ import annotations

import pwd
import uuid

from twisted.logger import Logger

from capsule.core.errors import CapsuleError, DockerError
from capsule.core.profiles import DEFAULT_PROFILE, LABEL_PROFILE
from capsule.sessions.keeping import own_volumes
from capsule.sessions.replicas import UNKNOWN, owner_of

_log = Logger()

LABEL_SESSION = "io.capsule.session"

# The uid of the session image's user (developer, docker/Dockerfile): without
# user namespaces, the sessions' processes run as this uid on the host too.
SESSION_UID = 1000


def host_account(uid: int) -> str | None:
    """
    The name of the account with C{uid} where capsule runs, or C{None}.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def remaps_users(info: dict) -> bool | None:
    """
    Whether the engine (its C{docker info}) maps containers' uids to others
    on the host: C{userns-remap}, or a rootless engine.  C{None}: it did not
    say.
    """
    options = info.get("SecurityOptions")
    if not isinstance(options, list):
        return None
    names = {part.partition("=")[2] for option in options if isinstance(option, str)
             for part in option.split(",") if part.startswith("name=")}
    return bool(names & {"userns", "rootless"})


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class Recovery:
    """
    Finds a server's sessions again after a restart, and its leftovers.

    @param manager: the sessions' registry (L{capsule.sessions.manager}).
    @param owners: the users of the earlier run's sessions by id (C{get}),
        e.g. L{capsule.sessions.owners.OwnerFile}; C{None}: no users.
    @ivar pending: whether the earlier run's sessions are still to be found
        (the engine did not answer yet): a reconnect cannot be told "no such
        session" meanwhile.
    """

    def __init__(self, manager, docker, owners=None) -> None:
        self._manager = manager
        self._docker = docker
        self._owners = owners
        self.pending = False

    def expect(self) -> None:
        """
        The earlier run's sessions are to be looked for: until L{recover}
        succeeds, a reconnect is told to try again, not that its session
        does not exist.
        """
        self.pending = True

    async def recover(self) -> int:
        """
        Find the sessions of an earlier run whose containers still run and
        keep them for the grace period, waiting for their clients, and the
        kept sessions (stopped containers, L{Keeping.load}); remove every
        other container of this server.  Return how many running ones were
        found.
        """
        manager = self._manager
        found = await self._docker.list_containers(manager.labels)
        if manager.replicas is not None:
            # Another live replica's sessions are its own.
            found = await manager.replicas.sift(found)
        for container in found:
            if container["state"] == "paused":
                # Paused by a fork's copy on the host when an earlier run
                # stopped: thawed, it is what it was.
                try:
                    if await self._docker.unpause_container(container["id"]):
                        _log.warn("container {container} was left paused by an earlier run"
                                  " (a fork's copy): thawed", container=container["id"][:12])
                        container["state"] = "running"
                except DockerError as e:
                    _log.error("container {container} is paused and could not be thawed:"
                               " {error}", container=container["id"][:12], error=e.message)
        recovered = []
        for container in found:
            session_id = container["labels"].get(LABEL_SESSION)
            if (manager.config.keeper and container["state"] == "running" and session_id
                    and session_id not in manager.sessions and _is_uuid(session_id)):
                user = self._owners.get(session_id) if self._owners is not None else None
                if manager.replicas is not None:
                    # On a cluster, the container says whose session it is.
                    owner = owner_of(container)
                    if owner is UNKNOWN:
                        continue
                    user = owner
                session = manager.recovered_session(session_id, container["id"], user)
                self.assign_profile(session, container["labels"].get(LABEL_PROFILE))
                session.own_volumes = own_volumes(container["labels"])
                session.untaken = (manager.keeping is not None and manager.keeping.untaken(
                    session_id, container["labels"]))
                session.events.recover()
                recovered.append(session_id)
        # The stopped ones are kept sessions (their owners are read before
        # the owners' file forgets them).
        if manager.keeping is not None:
            await manager.keeping.load()
        if self._owners is not None:
            # Only the owners of sessions found again are kept.
            self._owners.save(manager.sessions)
        if recovered:
            _log.info("found {count} session(s) of an earlier run; each waits {grace:g} s"
                      " for its client: {ids}", count=len(recovered),
                      grace=manager.config.grace, ids=", ".join(i[:8] for i in recovered))
        # Everything else of this server's is a leftover.
        await self.remove_leftovers()
        self.pending = False
        return len(recovered)

    def assign_profile(self, session, name: str | None) -> None:
        """
        A session of an earlier run keeps its profile (its container's
        label); one whose profile is no longer configured gets the default
        profile's limits, under its own name.
        """
        profiles = self._manager.profiles
        name = name or DEFAULT_PROFILE
        settings = profiles.get(name)
        if settings is None:
            _log.warn("session {session_id} of an earlier run has profile {profile}, which is"
                      " no longer configured: the limits of {default} apply to it",
                      session_id=session.id[:8], profile=name[:64], default=DEFAULT_PROFILE)
            settings = profiles[DEFAULT_PROFILE]
        session.profile, session.settings = name[:64], settings

    async def remove_leftovers(self, why: str = "left by an earlier run") -> int:
        """
        Remove this server's containers that no live session or warm slot
        owns: those left by an earlier run, or whose removal failed (Docker
        was unreachable when their session ended).
        """
        manager = self._manager
        found = await self._docker.list_containers(manager.labels)
        if manager.replicas is not None:
            # Another live replica's containers are its own; a lapsed one's
            # sessions are adopted here, as an earlier run's.
            found = await manager.replicas.sift(found)
            await manager.replicas.adopt_orphans(found)
        live = {s.container_id for s in manager.sessions.values()} | manager.pool.container_ids
        owners = manager.sessions.keys() | manager.pool.pending
        stale = [c for c in found if c["id"] not in live
                 and c["labels"].get(LABEL_SESSION) not in owners
                 and not (manager.keeping is not None
                          and manager.keeping.holds(c["labels"].get(LABEL_SESSION)))]
        for container in stale:
            await self._docker.remove_container(container["id"])
        if stale:
            _log.info("removed {count} leftover container(s) {why}: {names}",
                      count=len(stale), why=why, names=", ".join(c["name"] for c in stale))
        return len(stale)

    async def check_engine(self) -> dict | None:
        """
        Warn, once at start, of the engine's settings that no server can
        make up for (L{check_live_restore}, L{check_session_uid}); return
        what the engine said of itself (C{None}: it did not answer).
        """
        try:
            info = await self._docker.info()
        except CapsuleError as e:
            _log.warn("could not ask the Docker engine for its settings (live-restore, user"
                      " namespaces): {message}", message=e.message)
            return None
        self.check_live_restore(info)
        self.check_session_uid(info)
        return info

    def check_session_uid(self, info: dict) -> str | None:
        """
        Warn when a host account has the sessions' uid and the engine does
        not remap containers' uids: that account can read the sessions'
        environment (the profiles' secrets) and signal their processes.
        Return that account's name (C{None}: no such account, or remapped).
        """
        if remaps_users(info) is not False:
            return None
        account = host_account(SESSION_UID)
        if account is None:
            return None
        _log.warn(
            "the sessions' processes run as uid {uid} on this host, which is the account"
            " {account}'s: it can read their environment (the profiles' secrets, in"
            " /proc/PID/environ) and signal them. Run the Docker engine with user namespaces:"
            " {{\"userns-remap\": \"default\"}} in /etc/docker/daemon.json, then"
            " `sudo systemctl restart docker` (the engine then keeps its images and"
            " containers apart: build the images again); or give that account another uid."
            " See docs/security.md.", uid=SESSION_UID, account=account)
        return account

    def check_live_restore(self, info: dict) -> bool | None:
        """
        Warn when the engine runs without live-restore, which no server can
        make up for: restarting dockerd then stops every container.  Return
        the engine's setting (C{None}: it did not say).
        """
        enabled = info.get("LiveRestoreEnabled")
        if enabled is False:
            _log.warn(
                "the Docker engine runs without live-restore: restarting or upgrading dockerd"
                " stops every container, and so every session's processes (their files are"
                " kept where --retention is on: docs/keeping.md). Turn it on with"
                " {{\"live-restore\": true}} in /etc/docker/daemon.json, then"
                " `sudo systemctl reload docker` (no container is stopped by that).")
        return enabled

    async def check_profile_images(self) -> list[str]:
        """
        Warn, once at start, of each profile whose image the engine does not
        have (its sessions would fail to start); return those profiles' names.
        """
        missing = []
        for name, settings in sorted(self._manager.profiles.items()):
            image = settings.spec.image
            try:
                present = await self._docker.image_exists(image)
            except CapsuleError as e:
                _log.warn("could not check the images of the profiles: {message}",
                          message=e.message)
                return missing
            if not present:
                missing.append(name)
                _log.warn("profile {profile}: its image {image} is missing, so its sessions"
                          " cannot start: build it (`make image`, or docker/build-image.sh)"
                          " or name another image", profile=name, image=image)
        return missing
