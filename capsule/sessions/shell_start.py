"""
A session's shell, started (or, under the keeper, attached to again) in
its container for the manager (L{capsule.sessions.manager}): the keeper
over the direct path where the container has one, else through a relay
exec; the channels a session without a network asks of its keeper; what
its stream hears (output for the observers, the ports that listen in it).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from twisted.logger import Logger

from capsule.core.channels import CHANNEL_ENV
from capsule.core.keeper import (ListeningPorts, has_own_address, keeper_argv,
                                 keeper_environment, own_ports)
from capsule.core.kept import screen_path
from capsule.core.profiles import Profile, start_command
from capsule.engine.channels import ChannelOptions
from capsule.engine.keeper_direct import KeeperUnreachable
from capsule.engine.keeper_stream import ShellProtocol
from capsule.sessions.session import Session, SessionConfig

_log = Logger()


class ShellStarter:
    """
    Starts sessions' shells (L{spawn}).

    @param config: the manager's configuration, as it is when asked.
    @param settings: a session's profile (its own, else the default).
    @param has_volume: whether a user's sessions get an agent volume.
    @param direct: the direct path to keepers, or C{None}: relay execs only.
    @param door: the session door (its port and factory), or C{None}.
    @param observers: told a session's output and its listening ports.
    """

    def __init__(self, docker, config: Callable[[], SessionConfig], *,
                 settings: Callable[[Session], Profile],
                 has_volume: Callable[[str | None], bool], direct, door, observers) -> None:
        self._docker = docker
        self._config = config
        self._settings = settings
        self._has_volume = has_volume
        self._direct = direct
        self._door = door
        self.observers = observers
        self._direct_failed_logged = False

    @property
    def config(self) -> SessionConfig:
        return self._config()

    async def spawn(self, session: Session, offset: int,
                    secret: bytes | None = None) -> None:
        """
        Start (or, under the keeper, attach to) the session's shell: its
        protocol feeds the lifecycle.  Under the keeper, over the direct
        path where the container has one (C{secret}: a new container's,
        whose keeper is started first), else (or when that fails) through a
        relay exec.
        """
        settings = self._settings(session)
        spec = settings.spec
        command, environment = start_command(
            settings, session.repository,
            volume=bool(settings.agent_volume and self._has_volume(session.core.user)))
        # The exec that starts the keeper tells it where to keep the screen
        # (its own variable: the shell does not get it).
        shell_environment, environment = environment, keeper_environment(environment,
                                                                   screen_path(session.id))
        if (self._direct is not None and has_own_address(spec.network)
                and self._direct.available):
            protocol = session.shell = ShellProtocol(session, True, offset,
                                                     partial(self._heard, session),
                                                     ports=partial(self._ports_heard, session))
            start = dict(shell=tuple(command), buffer=self.config.replay_bytes,
                         socket=self.config.keeper_socket, user=spec.user,
                         workdir=spec.workdir, env=environment,
                         secret=secret) if secret is not None else None
            try:
                await self._direct.attach(protocol, session.container_id, offset, start)
                return
            except KeeperUnreachable as e:
                if session.shell is not protocol:
                    return  # let go meanwhile
                if not self._direct_failed_logged:
                    self._direct_failed_logged = True
                    _log.info("session {session_id}'s keeper cannot be reached directly"
                              " ({reason}): its stream goes through a relay exec (said once)",
                              session_id=session.id[:8], reason=str(e))
        channels = None
        if self.config.keeper and spec.network == "none":
            channels, environment = self._channels(session, environment)
        protocol = session.shell = ShellProtocol(session, self.config.keeper, offset,
                                                 partial(self._heard, session),
                                                 channels=channels,
                                                 ports=partial(self._ports_heard, session))
        if not self.config.keeper:
            await self._docker.spawn_exec(
                protocol, session.container_id, list(command), spec.user,
                spec.workdir, shell_environment, None)
            return
        argv = keeper_argv(command, offset, self.config.replay_bytes,
                           self.config.keeper_socket)
        await self._docker.spawn_exec(
            protocol, session.container_id, argv, spec.user, spec.workdir,
            environment, None, tty=False)

    def _channels(self, session: Session,
                  environment: dict[str, str]) -> tuple[ChannelOptions, dict[str, str]]:
        """
        The channels a session without a network asks of its keeper: the
        door's port at 127.0.0.1 in its container (if capsule has a door),
        and capsule's to ports in it (previews); the keeper's exec is told
        with its environment (the keeper's own: the shell does not get it).
        """
        door = self._door
        port = door.port if door is not None else 0
        accept = None
        if door is not None:
            # A channel's connection is this session's, whatever its address
            # (the door's factory knows it so, where it can: the egress proxy).
            for_session = getattr(door.factory, "for_session", None)
            accept = (partial(for_session, session) if for_session is not None
                      else door.factory.buildProtocol)
        return (ChannelOptions(port, accept),
                {**environment, CHANNEL_ENV: str(port)})

    def _heard(self, session: Session, data: bytes) -> None:
        """
        Output of C{session}'s shell, before its lifecycle gets it: someone's
        session's (not a warm one's, whose output is told when it is taken)
        is told to the observers.
        """
        if not session.pooled:
            self.observers.session_output(session, data)

    def _ports_heard(self, session: Session, found: ListeningPorts) -> None:
        """
        C{session}'s keeper said which TCP ports listen in its container:
        capsule's own left out, a change is told to the observers and to
        its client (a warm session's only once it is taken).
        """
        settings = self._settings(session)
        own = own_ports(settings.spec.network, self.config.door_port)
        ports = tuple(port for port in found.ports if port not in own)
        if (session.ports_known and ports == session.listening_ports
                and found.more == session.ports_more):
            return
        session.listening_ports, session.ports_more = ports, found.more
        session.ports_known = True
        if session.pooled or session.over:
            return
        self.observers.session_ports(session)
        tell = getattr(session.client, "session_ports", None)
        if tell is not None:
            tell(session)
