"""
C{--log-format json}: one JSON object per log event, one event per line.

Each line holds C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message}
(the event's text, as the plain log shows it) and, for capsule's own events,
the event's simple fields (strings, numbers, booleans): C{session_id} (its
first 8 characters), C{user}, C{container}, C{ms}, ...  A field whose name
is one of those four is written as C{event_NAME}.  Fields that are not
simple (bytes, objects) are never written, nor any field whose name speaks
of a secret; events of other namespaces (Twisted, Autobahn) give their text
only.  A failure adds C{failure}, its traceback.

twistd starts logging to the observer an application carries as its
L{ILogObserver} component (a C{.tac} file's way of choosing one);
L{capsule.tap.CapsuleService} gives it to the application it is added to.
The observer writes where twistd's own would: stdout with C{-n} and no
C{--logfile} (or C{--logfile -}), else the C{--logfile} (C{twistd.log} by
default).  twistd's C{--logger}, when given, still takes precedence.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import IO, Callable

from twisted.logger import ILogObserver, formatEvent
from twisted.python import usage
from twisted.python.logfile import LogFile
from zope.interface import implementer

FORMATS = ("text", "json")

RESERVED = ("time", "level", "namespace", "message", "failure")

# Field names that may hold a secret are never written, whatever their value.
_SECRET_WORDS = ("password", "passwd", "token", "secret", "cookie", "authorization",
                 "credential", "key")

_SIMPLE = (str, int, float, bool, type(None))


def _secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def event_as_dict(event: dict) -> dict:
    """
    What one line of the JSON log says of C{event}.
    """
    when = datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
    level = event.get("log_level")
    namespace = event.get("log_namespace", "")
    record = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if level is not None else "info",
        "namespace": namespace,
        "message": formatEvent(event),
    }
    if namespace == "capsule" or namespace.startswith("capsule."):
        for name, value in event.items():
            if (name.startswith("log_") or not isinstance(value, _SIMPLE)
                    or _secret(name) or name in ("format", "failure")):
                continue
            if isinstance(value, float) and value != value:
                value = None
            record[f"event_{name}" if name in RESERVED else name] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["failure"] = failure.getTraceback()
        except Exception:
            record["failure"] = repr(failure)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each event as one line of JSON to C{stream} and flushes it.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict) -> None:
        try:
            line = json.dumps(event_as_dict(event), ensure_ascii=False, allow_nan=False,
                              default=str)
        except Exception as e:
            line = json.dumps({"time": None, "level": "error", "namespace": "capsule.ops.logformat",
                               "message": f"an event could not be written as JSON: {e!r}"})
        self._stream.write(line + "\n")
        self._stream.flush()


def check_server_options(server_options) -> None:
    """
    Refuse twistd options that C{--log-format json} cannot honour.
    C{server_options} is twistd's own (C{None}: not run by twistd).
    """
    if server_options is None:
        return
    if server_options.get("syslog"):
        raise usage.UsageError("--log-format json does not go to syslog: drop --syslog,"
                               " or use --log-format text")
    if server_options.get("logfile") == "-" and not server_options.get("nodaemon"):
        raise usage.UsageError("--log-format json: a daemon cannot log to stdout")


def json_observer(server_options, stdout: IO[str] | None = None,
                  open_file: Callable[[str], IO[str]] = LogFile.fromFullPath
                  ) -> JSONLinesObserver:
    """
    The JSON observer writing where twistd would write its text log, given
    twistd's options (C{None}: stdout).  C{stdout} is taken now, before
    twistd turns C{sys.stdout} into a logger of its own.
    """
    stdout = sys.stdout if stdout is None else stdout
    if server_options is None:
        return JSONLinesObserver(stdout)
    name = server_options.get("logfile")
    if name == "-" or (not name and server_options.get("nodaemon")):
        return JSONLinesObserver(stdout)
    return JSONLinesObserver(open_file(name or "twistd.log"))


_UUID = re.compile(r"\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)


def short_ids(text: str) -> str:
    """
    C{text} with each session id cut to its first 8 characters: a full id
    lets whoever reads it into the session, so logs carry the prefix only.
    """
    return _UUID.sub(r"\1", text)
