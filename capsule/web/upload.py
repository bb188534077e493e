"""
C{POST /api/sessions/{id}/workspace}: a C{.tar} or C{.tar.gz} body, spooled,
checked entry by entry (L{capsule.core.tarcheck}), rewritten and unpacked
into C{/workspace} as C{developer} through an exec's stdin.
"""

from __future__ import annotations


from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from capsule.engine.command import utf8_text
from capsule.web.streams import ThreadFedProducer
from capsule.core.tarcheck import ArchiveRefused, Interrupted, check, rewrite

from capsule.web.api_base import ApiError, SessionPost, answer_when
from capsule.web.exec import EXEC_SLACK, session_spec, timed_argv


_log = Logger()

# --upload-max-bytes: bytes of archive an upload may send.
UPLOAD_MAX_BYTES = 1024 * 1024 * 1024
# Bytes of file contents an archive may unpack to, per byte it may send.
UNPACK_RATIO = 8
UPLOADS_PER_SESSION = 1
UPLOADS_AT_ONCE = 4
UPLOAD_TIMEOUT = 1800.0
# Where an upload is unpacked first: a hidden directory of /workspace (the
# same file system, so that its files can be linked into place).
STAGING = "/workspace/.capsule-upload"
# The command an upload runs, as developer: GNU tar unpacks the archive
# into STAGING, keeping the modes it is given (set-uid and the like are
# gone by then), not the owners; only once tar has read the whole archive
# is each entry linked into /workspace (cp -l: a file appears whole, or not
# at all, never cut short, even when capsule is killed in the middle of an
# upload), and STAGING removed.  A STAGING left over by an upload that was
# killed goes with the next upload.
UNPACK_SCRIPT = f"""
s={STAGING}
rm -rf "$s" && mkdir -m 700 "$s" || exit 1
if tar -x -p --no-same-owner --warning=no-timestamp -C "$s" -f -; then
  cd "$s" && find . -mindepth 1 -maxdepth 1 -exec \\
    cp -R -P -l --remove-destination -t /workspace -- {{}} +
  r=$?
else
  r=$?
fi
cd / && rm -rf "$s"
exit $r
"""
UNPACK_ARGV = ("sh", "-c", UNPACK_SCRIPT)
ARCHIVE_TYPES = (b"application/x-tar", b"application/gzip", b"application/x-gzip",
                 b"application/octet-stream", b"application/x-compressed-tar")


def check_archive_type(request) -> None:
    """
    @raise ApiError: 415 unless C{request}'s C{Content-Type} is an archive's.
    """
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind not in ARCHIVE_TYPES:
        raise ApiError(415, "an upload's body is a .tar or .tar.gz archive (Content-Type:"
                            " application/x-tar, application/gzip or"
                            " application/octet-stream)", "unsupported_media_type")


class UploadResource(SessionPost):
    """
    C{POST /api/sessions/{id}/workspace}: a .tar or .tar.gz body, unpacked
    into C{/workspace} once every entry was checked (L{capsule.core.tarcheck}).
    """

    def render_POST(self, request):
        api = self.api
        session = api.running(request, self.session_id)
        api.not_exporting(session)
        check_archive_type(request)
        # Taken when the headers came (capsule.web.api), or now.
        slot = api.upload_slot(request, session)
        try:
            turn = api.enter_docker(request)
        except BaseException:
            slot.release()
            raise
        api.touch(session)
        return answer_when(
            request, Deferred.fromCoroutine(self._upload(request, session, slot, turn)),
            "an upload")

    async def _upload(self, request, session, slot, turn):
        api = self.api
        body = _Stoppable(request.content, api)
        keep = api.hold(session)
        docker_slot = None
        try:
            try:
                summary = await api.in_thread(check, body,
                                              api.upload_max_bytes * UNPACK_RATIO)
            except ArchiveRefused as e:
                _log.info("refused an upload into session {short}: {message}",
                          short=session.id[:8], message=e.message)
                raise ApiError(400, e.message, e.code, entry=e.entry) from None
            except _FeedAborted:
                raise ApiError(503, "capsule is stopping: send the upload again once it is"
                                    " back", "restarting") from None
            spec = session_spec(api.manager, session)
            feeder = _Feeder(api, body)
            # A place among its caller's Docker calls (see capsule.sessions.call_gate).
            docker_slot = await turn
            api.ended_meanwhile(session, "the upload waited")

            def feed(consumer) -> Deferred:
                # The exec is made and its stream open: no Docker thread is
                # held while it unpacks.
                docker_slot.release()
                return feeder.feed(consumer)
            result = await api.docker.run_command(
                session.container_id, timed_argv(list(UNPACK_ARGV), UPLOAD_TIMEOUT), spec.user,
                spec.workdir, dict(spec.environment), feed, 64 * 1024,
                UPLOAD_TIMEOUT + EXEC_SLACK)
        finally:
            if docker_slot is not None:
                docker_slot.release()
            else:
                # Refused before its turn was used: given back, or given up.
                turn.addCallbacks(lambda given: given.release(),
                                  lambda failure: failure.trap(CancelledError))
                turn.cancel()
            keep.stop()
            slot.release()
            api.touch(session)
        api.ended_meanwhile(session, "the upload")
        if result.exit_code != 0:
            stderr = utf8_text(result.stderr, result.truncated_stderr).strip()
            _log.warn("an upload into session {short} failed: unpacking exited {code}:"
                      " {stderr}",
                      short=session.id[:8], code=result.exit_code, stderr=repr(stderr[-500:]))
            raise ApiError(422, f"unpacking failed (exit code {result.exit_code}):"
                                f" {stderr[-2000:]}", "unpack_failed")
        _log.info("unpacked {entries} entries ({size} bytes) into session {short}",
                  entries=summary.entries, size=summary.size, short=session.id[:8])
        return 200, {"entries": summary.entries, "files": summary.files,
                     "directories": summary.directories, "links": summary.links,
                     "bytes": summary.size, "compressed": summary.compressed}


class _FeedAborted(Interrupted):
    pass


class _Stoppable:
    """
    An upload's body, whose reads fail once capsule stops.
    """

    def __init__(self, body, api) -> None:
        self._body, self._api = body, api

    def read(self, size: int = -1) -> bytes:
        if self._api.stopping:
            raise _FeedAborted("capsule is stopping")
        return self._body.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._body.seek(offset, whence)

    def tell(self) -> int:
        return self._body.tell()


class _Feeder(ThreadFedProducer):
    """
    Rewrites a checked archive on a worker thread into an exec's input,
    waiting while that input is full: one buffer in memory at a time.
    """

    def __init__(self, api, body) -> None:
        super().__init__()
        self._api = api
        self._body = body
        self._consumer = None
        self._stopped = False

    def feed(self, consumer) -> Deferred:
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._body.seek(0)
        self._api.feeders.add(self)
        d = self._api.in_thread(rewrite, self._body, self._thd_write)

        def done(result):
            self._api.feeders.discard(self)
            consumer.unregisterProducer()
            return result

        def gone(failure):
            # The command ended before it read everything: its exit code
            # and its stderr say why.
            failure.trap(_FeedAborted)
        return d.addBoth(done).addErrback(gone)

    def _thd_write(self, chunk: bytes) -> None:
        if self._api.stopping:
            raise _FeedAborted("capsule is stopping")
        blockingCallFromThread(self._api.reactor, self._write, chunk)

    def _write(self, chunk: bytes):
        if self._stopped or getattr(self._consumer, "disconnected", False):
            raise _FeedAborted("the unpacking command went away")
        self._consumer.write(chunk)
        return self._written()

    def stopProducing(self) -> None:
        self._stopped = True
        self._release(_FeedAborted("the unpacking command went away"))
