"""
The one way a session is opened for a client, whatever door it came in by
(the WebSocket, the API, and what comes next): drain, then admission, then
a new session or a warm one, then its creator counted and its owner kept.
Each door turns the refusals into its own answer (a close code, an HTTP
status) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from capsule.core.admission import AdmissionRefused
from capsule.core.profiles import (DEFAULT_PROFILE, BadRepository, Profile, check_repository,
                                   parse_profile_name)
from capsule.sessions.drain import DRAIN_REFUSAL, DRAINING
from capsule.sessions.session import WARM_SIZE, Session

_log = Logger()


@dataclass(frozen=True)
class OpenRequest:
    """
    Who asks for a session, from where, of which profile, at what size.

    @ivar user: the authenticated user (C{None}: capsule has no users).
    @ivar address: the client's address, as admission counts it.
    @ivar door: how it came (C{"websocket"}, C{"api"}), for the log.
    """

    user: str | None
    address: str | None
    profile: str | None = None
    size: tuple[int, int] = WARM_SIZE
    repository: str | None = None
    door: str = "websocket"


class SessionService:
    """
    Opens sessions for clients, once, for every door.

    @param manager: the registry (L{capsule.sessions.manager.SessionManager}).
    @param admission: who may open a session now
        (L{capsule.core.admission.AdmissionControl}), or C{None}: anyone.
    @param drain: whether capsule drains (L{capsule.sessions.drain.Drain}),
        or C{None}: it never does.
    """

    def __init__(self, manager, admission=None, drain=None, keeping=None) -> None:
        self.manager = manager
        self.admission = admission
        self.drain = drain
        # The kept sessions and snapshots (capsule.sessions.keeping), or
        # None: sessions are never kept (by default the manager's).
        self.keeping = keeping if keeping is not None else getattr(manager, "keeping", None)
        # The resumes under way, by session id.
        self._resuming: dict[str, Deferred] = {}

    @property
    def default_profile(self) -> str:
        """
        The profile's name a session gets when its client names none
        (--default-profile).
        """
        config = getattr(self.manager, "config", None)
        return getattr(config, "default_profile", DEFAULT_PROFILE)

    def profile(self, name: str | None, repository: str | None = None) -> Profile:
        """
        The profile a client names (C{None}: the default), having checked
        the repository it asks for, before anything is counted.

        @raise UnknownProfile: naming the profiles there are.
        @raise BadRepository: for a repository capsule refuses.
        """
        settings = parse_profile_name(self.default_profile if name is None else name,
                                      self.manager.profiles)
        if repository is not None:
            try:
                check_repository(repository)
            except (TypeError, ValueError) as e:
                raise BadRepository(f"repository: {e}") from None
        return settings

    def open(self, client, request: OpenRequest) -> Session:
        """
        Open a new session for C{client} (C{None}: nobody yet, the API's),
        which hears of it through L{ISessionClient}.

        @raise UnknownProfile, BadRepository: what it names is refused
            (nothing was counted).
        @raise AdmissionRefused: capsule drains (C{draining}), the client is
            over a quota (C{quota_exceeded}) or the server is full
            (C{server_full}); nothing was made.
        """
        settings = self.profile(request.profile, request.repository)
        self._admit(request, settings)
        session = self.manager.create(client, *request.size, user=request.user,
                                      profile=request.profile,
                                      repository=request.repository)
        if self.admission is not None:
            self.admission.created(session.id, request.address)
        # A user's session never waits for the warm pool: warm ones give up
        # their place in the memory budget.
        self.manager.give_up_warm()
        if request.user is not None:
            _log.info("{user} opened session {short} ({door})", user=request.user,
                      short=session.id[:8], door=request.door)
        elif request.door != "websocket":
            _log.info("session {short} opened ({door})", short=session.id[:8],
                      door=request.door)
        self.manager.observers.session_opened(session)
        return session

    def _admit(self, request: OpenRequest, settings: Profile | None) -> None:
        """
        Drain, then admission, for a session of C{settings} that
        C{request} would make live.

        @raise AdmissionRefused: as L{open} says; nothing was counted.
        """
        metrics = self.manager.metrics
        if self.drain is not None and self.drain.active:
            metrics.refused(DRAINING)
            raise AdmissionRefused(DRAINING, DRAIN_REFUSAL)
        if self.admission is not None:
            try:
                self.admission.admit(request.address, request.user, settings)
            except AdmissionRefused as e:
                metrics.refused(e.code)
                raise

    def _made(self, session_id: str, request: OpenRequest, what: str) -> None:
        """
        A session made live again, or anew, by the keeping (a resume, a
        fork, a session from a snapshot): its creator counted, warm
        sessions given up for it, the log told.
        """
        if self.admission is not None:
            self.admission.created(session_id, request.address)
        self.manager.give_up_warm()
        _log.info("{who}{what} session {short} ({door})",
                  who=f"{request.user} " if request.user is not None else "", what=what,
                  short=session_id[:8], door=request.door, user=request.user)

    def _settings_of(self, profile: str | None) -> Profile | None:
        return self.manager.profiles.get(profile or self.default_profile)

    def resume(self, request: OpenRequest, kept) -> Deferred:
        """
        Make the kept session C{kept} (a L{capsule.core.kept.KeptSession} of
        C{request.user}) live again, through drain and admission as a new
        one: fire with its L{Session} (same id, a new shell).  Two resumes
        of one session at once share the work.

        @raise AdmissionRefused: as L{open} says; nothing was done.
        """
        waiting = self._resuming.get(kept.id)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting.append(d)
            return d
        self._admit(request, self._settings_of(kept.profile))
        mine: Deferred = Deferred()
        waiting = self._resuming[kept.id] = [mine]
        try:
            work = self.keeping.resume(kept.id, request.user)
        except BaseException:
            del self._resuming[kept.id]
            raise

        def resumed(session):
            self._made(session.id, request, "resumed")
            return session

        def done(result):
            del self._resuming[kept.id]
            for each in waiting:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)
        work.addCallback(resumed).addBoth(done)
        return mine

    def fork(self, request: OpenRequest, source_id: str, profile: str | None) -> Deferred:
        """
        A new session of C{request.user} from a copy of the file system of
        its session C{source_id} (running or kept, of C{profile}), through
        drain and admission: fire with the new session's id.

        @raise AdmissionRefused: as L{open} says; nothing was done.
        """
        self._admit(request, self._settings_of(profile))
        d = self.keeping.fork(source_id, request.user)
        d.addCallback(lambda new_id: (self._made(new_id, request, "forked into"), new_id)[1])
        return d

    def from_snapshot(self, request: OpenRequest, name: str, profile: str | None) -> Deferred:
        """
        A new session of C{request.user} from its snapshot C{name} (of
        C{profile}), through drain and admission: fire with its id.

        @raise AdmissionRefused: as L{open} says; nothing was done.
        """
        self._admit(request, self._settings_of(profile))
        d = self.keeping.start_snapshot(name, request.user)
        d.addCallback(lambda new_id: (
            self._made(new_id, request, f"started from snapshot {name}:"), new_id)[1])
        return d

