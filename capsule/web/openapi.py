"""
C{GET /api/openapi.json}: capsule's HTTP API as an OpenAPI 3.1 document.

L{ROUTES} lists every path and method capsule serves besides the page's
files; the document is built from it and a test checks it against the
resource tree of a live server, so the two cannot drift apart.
"""

from __future__ import annotations

import json

from capsule import __version__
from capsule.web.api import CREATE_MAX_BODY
from capsule.web.api_base import JsonResource
from capsule.web.keep_api import COPIES_AT_ONCE, COPIES_PER_CALLER, KEEP_MAX_BODY
from capsule.web.exec import (ENCODINGS, EXEC_MAX_BODY, EXEC_MAX_OUTPUT, EXEC_MAX_TIMEOUT,
                              EXEC_OUTPUT, EXEC_TIMEOUT, EXECS_PER_SESSION)

_ID = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "format": "uuid"}, "description": "a session id"}
_ERROR = {"$ref": "#/components/schemas/Error"}

_PORT = {"name": "port", "in": "path", "required": True,
         "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
         "description": "a TCP port in the session"}


def _json(schema) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _busy_container() -> dict:
    """
    The 409 and 429 of a route that runs a command in the session.
    """
    return {"409": {"description": "the session is still starting (code starting), or its"
                                   " workspace is being exported (code export_in_progress:"
                                   " Docker holds the container until the export has read"
                                   " it; try again once the export is done)",
                    **_json(_ERROR)},
            "429": {"description": "over a limit of the caller (Retry-After says when to try"
                                   " again): the session's commands or uploads at once, or"
                                   " the caller's Docker calls under way and waiting (code"
                                   " too_many_docker_calls), or throttled after failed logins",
                    **_json(_ERROR)}}


def _errors(*codes: int) -> dict:
    said = {400: "a malformed request (the body or its fields)",
            401: "no user (with --auth, --tokens or --user-header)",
            403: "a user who may not, or a request from another origin",
            404: "no such session, or another user's",
            405: "another method", 409: "the session is still starting",
            413: "a body over the route's limit, refused before it is read",
            415: "another Content-Type", 422: "the command failed",
            429: "over a limit of the caller, or throttled after failed logins"
                 " (Retry-After says when to try again)",
            503: "the server is full, draining, or the Docker engine does not answer"}
    # With users, any call may be throttled after failed logins (429).
    codes = sorted(set(codes) | ({429} if 401 in codes else set()))
    return {str(c): {"description": said[c], **_json(_ERROR)} for c in codes}


_BUSY_CONTAINER = _busy_container()


_SESSION = {"$ref": "#/components/schemas/Session"}
_SNAPSHOT = {"$ref": "#/components/schemas/Snapshot"}
_NAME = {"name": "name", "in": "path", "required": True,
         "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,62}$"},
         "description": "a snapshot's name"}
_STARTED = {"description": "not started in time (it goes on starting)", **_json(_ERROR)}
_COPY_LIMITS = {
    "429": {"description": f"the caller has {COPIES_PER_CALLER} copy of a session's files"
                           " under way (a fork or a snapshot; code copy_in_progress), or"
                           " over an admission quota (Retry-After says when to try again)",
            **_json(_ERROR)},
    "503": {"description": f"capsule copies {COPIES_AT_ONCE} sessions' files already (code"
                           " copies_busy), or is full, draining, or without its engine",
            **_json(_ERROR)}}
_SHARE = {"type": "object", "properties": {
    "id": {"type": "string", "description": "the link's handle, to revoke it"},
    "created_at": {"type": "number"}, "expires_at": {"type": "number"},
    "expires_in": {"type": "integer", "description": "seconds left"},
    "watchers": {"type": "integer"}}}

# (path, method): the operation.  Every route capsule answers.
ROUTES: dict[tuple[str, str], dict] = {
    ("/health", "get"): {
        "summary": "Health: the engine, the image, the sessions; 503 when unavailable or"
                   " draining",
        "security": [],
        "responses": {"200": {"description": "healthy (or degraded: image missing)",
                              **_json({"type": "object"})},
                      "503": {"description": "the engine does not answer, or capsule drains",
                              **_json({"type": "object"})}}},
    ("/metrics", "get"): {
        "summary": "Prometheus metrics (loopback, or the --metrics-token)",
        "security": [{"metricsToken": []}],
        "responses": {"200": {"description": "the metrics, in Prometheus' text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "403": {"description": "neither loopback nor the token"}}},
    ("/ws", "get"): {
        "summary": "The terminal's WebSocket (an HTTP upgrade): JSON or binary frames, see"
                   " the README's Protocol",
        "parameters": [
            {"name": "session_id", "in": "query", "schema": {"type": "string"},
             "description": "resume this session"},
            {"name": "offset", "in": "query", "schema": {"type": "integer"}},
            {"name": "profile", "in": "query", "schema": {"type": "string"}},
            {"name": "resume", "in": "query", "schema": {"type": "string", "enum": ["1"]},
             "description": "with session_id of a kept session: resume it and attach (without"
                            " it, a kept session is an error frame session_kept, then close"
                            " 4404)"},
            {"name": "watch", "in": "query", "schema": {"type": "string"},
             "description": "a share link's token: watch its session, read-only, without a"
                            " login"}],
        "responses": {"101": {"description": "switching to the WebSocket protocol"},
                      "400": {"description": "not a WebSocket upgrade"},
                      "401": {"description": "no user (with --auth, --tokens or"
                                             " --user-header)"},
                      "403": {"description": "another origin or host"},
                      "429": {"description": "throttled after failed logins"}}},
    ("/login", "get"): {
        "summary": "With users: the login form (no route without users)",
        "security": [],
        "parameters": [{"name": "next", "in": "query", "schema": {"type": "string"},
                        "description": "the path to go to once logged in"}],
        "responses": {"200": {"description": "the form",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}},
    ("/login", "post"): {
        "summary": "With users: log in; 303 to next with a new cookie, or the form again",
        "security": [],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object", "properties": {
                    "username": {"type": "string"}, "password": {"type": "string"},
                    "next": {"type": "string"}}}}}},
        "responses": {"303": {"description": "logged in: to next, with the cookie"},
                      "401": {"description": "wrong user name or password: the form again",
                              "content": {"text/html": {"schema": {"type": "string"}}}},
                      "403": {"description": "not from capsule's own page", **_json(_ERROR)},
                      "413": {"description": "a body over the form's limit",
                              **_json(_ERROR)},
                      "429": {"description": "throttled (Retry-After): the form again",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}},
    ("/logout", "post"): {
        "summary": "With users: end this browser's login and clear its cookie",
        "security": [],
        "responses": {"303": {"description": "to /login"},
                      "403": {"description": "not from capsule's own page",
                              **_json(_ERROR)}}},
    ("/api/openapi.json", "get"): {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}}},
    ("/api/profiles", "get"): {
        "summary": "The profiles a client may name (profile in POST /api/sessions,"
                   " /ws?profile=, /?profile=), with their descriptions",
        "responses": {"200": {"description": "the profiles, by name", **_json({
            "type": "object", "properties": {
                "default": {"type": "string", "description": "the profile of a session that"
                                                             " names none"},
                "profiles": {"type": "array", "items": {
                    "type": "object", "properties": {
                        "name": {"type": "string"}, "description": {"type": "string"}}}}}})},
            **_errors(401)}},
    ("/api/sessions", "get"): {
        "summary": "The caller's sessions: live ones (oldest first), then kept ones (state"
                   " kept, oldest put away first)",
        "responses": {"200": {"description": "the sessions", **_json({
            "type": "object", "properties": {
                "user": {"type": ["string", "null"]},
                "sessions": {"type": "array", "items": _SESSION}}})},
            **_errors(401)}},
    ("/api/sessions", "post"): {
        "summary": "Create a session; answers once its shell runs. With no client it is"
                   " kept for the grace period (--grace) from then and from each API call"
                   " on it; its url opens it in a browser",
        "requestBody": {"required": False, **_json({
            "type": "object", "additionalProperties": False,
            "description": f"at most {CREATE_MAX_BODY} bytes",
            "properties": {
                "profile": {"type": "string", "description": "default: shell"},
                "cols": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 80},
                "rows": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 24},
                "repository": {"type": "string", "description": "an https git URL cloned"
                                                                " into /workspace"}}})},
        "responses": {"201": {"description": "the session runs", **_json(_SESSION)},
                      **_errors(400, 401, 413, 415, 429, 503),
                      "504": {"description": "not started in time (it goes on starting)",
                              **_json(_ERROR)}}},
    ("/api/sessions/{id}", "get"): {
        "summary": "One session of the caller, live or kept", "parameters": [_ID],
        "responses": {"200": {"description": "the session", **_json(_SESSION)},
                      **_errors(401, 404)}},
    ("/api/sessions/{id}", "delete"): {
        "summary": "End a session (its container is removed; an attached client is told);"
                   " a kept one is deleted (its container and volumes removed)",
        "parameters": [_ID],
        "responses": {"200": {"description": "ending", **_json({
            "type": "object", "properties": {"id": {"type": "string"},
                                             "ended": {"type": "boolean"},
                                             "deleted": {"type": "boolean", "description":
                                                         "a kept session's"}}})},
            "409": {"description": "the kept session is being resumed or copied (code"
                                   " busy), or its workspace exported", **_json(_ERROR)},
            **_errors(401, 404)}},
    ("/api/sessions/{id}/put-away", "post"): {
        "summary": "Put a live session away: its screen saved, its container stopped (memory"
                   " and CPU freed), its files kept for its profile's retention; a kept"
                   " session answers as it is (docs/keeping.md)",
        "parameters": [_ID],
        "responses": {"200": {"description": "the kept session", **_json(_SESSION)},
                      "409": {"description": "its profile keeps nothing (code not_kept), it"
                                             " is still starting (starting), another change"
                                             " of it is under way (busy)", **_json(_ERROR)},
                      **_errors(401, 404, 413)}},
    ("/api/sessions/{id}/resume", "post"): {
        "summary": "Resume a kept session: same id, a new shell, its files and its last"
                   " screen; passes admission as a new session; answers once it runs (a live"
                   " session answers as it is)",
        "parameters": [_ID],
        "responses": {"200": {"description": "the session runs", **_json(_SESSION)},
                      "409": {"description": "another change of it is under way (busy), or"
                                             " its workspace is being exported",
                              **_json(_ERROR)},
                      **_errors(401, 404, 413, 429, 503), "504": _STARTED}},
    ("/api/sessions/{id}/fork", "post"): {
        "summary": "A new session (new id, same profile) from a copy of a live or kept"
                   " session's files; passes admission; answers once it runs, detached",
        "parameters": [_ID],
        "responses": {"201": {"description": "the new session runs", **_json(_SESSION)},
                      "409": {"description": "the session is still starting, or another"
                                             " change of it is under way (busy)",
                              **_json(_ERROR)},
                      **_errors(401, 404, 413), **_COPY_LIMITS, "504": _STARTED}},
    ("/api/snapshots", "get"): {
        "summary": "The caller's named snapshots, oldest first",
        "responses": {"200": {"description": "the snapshots", **_json({
            "type": "object", "properties": {
                "user": {"type": ["string", "null"]},
                "snapshots": {"type": "array", "items": _SNAPSHOT}}})},
            **_errors(401)}},
    ("/api/snapshots", "post"): {
        "summary": "Name a copy of a live or kept session's files (its writable layer and"
                   " volumes); it lives until deleted",
        "requestBody": {"required": True, **_json({
            "type": "object", "additionalProperties": False, "required": ["session", "name"],
            "description": f"at most {KEEP_MAX_BODY} bytes",
            "properties": {"session": {"type": "string", "format": "uuid"},
                           "name": {"type": "string",
                                    "pattern": "^[a-z0-9][a-z0-9_.-]{0,62}$"}}})},
        "responses": {"201": {"description": "the snapshot", **_json(_SNAPSHOT)},
                      "409": {"description": "a snapshot of that name exists (code"
                                             " snapshot_exists), the caller keeps as many"
                                             " as allowed (kept_limit), or the session is"
                                             " busy", **_json(_ERROR)},
                      **_errors(400, 401, 404, 413, 415), **_COPY_LIMITS}},
    ("/api/snapshots/{name}", "delete"): {
        "summary": "Delete a snapshot (its image and volumes; sessions made from it keep"
                   " theirs)",
        "parameters": [_NAME],
        "responses": {"200": {"description": "deleted", **_json({
            "type": "object", "properties": {"name": {"type": "string"},
                                             "deleted": {"type": "boolean"}}})},
            **_errors(401, 404)}},
    ("/api/snapshots/{name}/sessions", "post"): {
        "summary": "A new session from a snapshot; passes admission; answers once it runs",
        "parameters": [_NAME],
        "responses": {"201": {"description": "the new session runs", **_json(_SESSION)},
                      **_errors(401, 404, 413), **_COPY_LIMITS, "504": _STARTED}},
    ("/api/sessions/{id}/shares", "get"): {
        "summary": "The session's live read-only share links (never their tokens), each with"
                   " how many watch through it; the owner's only",
        "parameters": [_ID],
        "responses": {"200": {"description": "the links, oldest first", **_json({
            "type": "object", "properties": {
                "session": {"type": "string"},
                "watchers": {"type": "integer", "description": "spectators now, in all"},
                "shares": {"type": "array", "items": _SHARE}}})},
            **_errors(401, 404)}},
    ("/api/sessions/{id}/shares", "post"): {
        "summary": "Make a read-only link to watch the session live, without a login (the"
                   " token is the credential); it expires, and dies with the session",
        "parameters": [_ID],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "properties": {
                "ttl": {"type": "number", "description": "seconds it lives (default one"
                        " hour; at most the share-max-ttl tuning knob, one day)"}}}}}},
        "responses": {"201": {"description": "the link: its token is told this once",
                              **_json({"allOf": [_SHARE, {"type": "object", "properties": {
                                  "token": {"type": "string"},
                                  "url": {"type": "string", "description":
                                          "the page that watches: /watch/#TOKEN"},
                                  "read_only": {"type": "boolean"}}}]})},
                      "409": {"description": "the session has as many links as it may",
                              **_json(_ERROR)},
                      **_errors(400, 401, 404)}},
    ("/api/sessions/{id}/shares/{share_id}", "delete"): {
        "summary": "Revoke a share link: whoever watches through it is disconnected",
        "parameters": [_ID, {"name": "share_id", "in": "path", "required": True,
                             "schema": {"type": "string"}}],
        "responses": {"200": {"description": "revoked", **_json({
            "type": "object", "properties": {"id": {"type": "string"},
                                             "revoked": {"type": "boolean"}}})},
            **_errors(401, 404)}},
    ("/api/sessions/{id}/ports", "get"): {
        "summary": "The TCP ports listening in the session now, with their preview addresses;"
                   " the owner's only (the keeper reads the container's socket table: no"
                   " Docker call)",
        "parameters": [_ID],
        "responses": {"200": {"description": "the ports, ascending", **_json({
            "type": "object", "properties": {
                "session": {"type": "string"},
                "ports": {"type": "array", "items": {"type": "object", "properties": {
                    "port": {"type": "integer"},
                    "url": {"type": "string", "description":
                            "its preview: https://PORT-ID.DOMAIN/ under --preview-domain,"
                            " else /preview/ID/PORT/ on capsule's site"},
                    "public": {"type": "boolean", "description":
                               "whether it is open to anyone (else its owner's only)"}}}},
                "known": {"type": "boolean", "description":
                          "false while the session's keeper said nothing of its ports (an"
                          " image with an older keeper never does)"},
                "more": {"type": "integer", "description":
                         "how many more listen than are listed (at most 64 are)"}}})},
        **_errors(401, 404)}},
    ("/api/sessions/{id}/ports/{port}", "put"): {
        "summary": "Open a port's preview to anyone who has its URL (public: true), or to"
                   " the session's owner only again (false); see docs/previews.md",
        "parameters": [_ID, _PORT],
        "requestBody": {"required": True, **_json({
            "type": "object", "additionalProperties": False, "required": ["public"],
            "properties": {"public": {"type": "boolean"}}})},
        "responses": {"200": {"description": "the port's preview", **_json({
            "type": "object", "properties": {
                "session": {"type": "string"}, "port": {"type": "integer"},
                "public": {"type": "boolean"}, "url": {"type": "string"}}})},
            **_errors(400, 401, 404, 415)}},
    ("/api/sessions/{id}/ports/{port}/shares", "get"): {
        "summary": "A port's live preview links (never their tokens), whether it is public,"
                   " its URL; the owner's only",
        "parameters": [_ID, _PORT],
        "responses": {"200": {"description": "the links, oldest first", **_json({
            "type": "object", "properties": {
                "session": {"type": "string"}, "port": {"type": "integer"},
                "public": {"type": "boolean"}, "url": {"type": "string"},
                "shares": {"type": "array", "items": _SHARE}}})},
            **_errors(401, 404)}},
    ("/api/sessions/{id}/ports/{port}/shares", "post"): {
        "summary": "Make a link to a port's preview, without a login (the token is the"
                   " credential); it expires, and dies with the session",
        "parameters": [_ID, _PORT],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "properties": {
                "ttl": {"type": "number", "description": "seconds it lives (default one"
                        " hour; at most the share-max-ttl tuning knob, one day)"}}}}}},
        "responses": {"201": {"description": "the link: its token is told this once",
                              **_json({"allOf": [_SHARE, {"type": "object", "properties": {
                                  "token": {"type": "string"}, "port": {"type": "integer"},
                                  "url": {"type": "string", "description": "opens the"
                                          " preview: .../__capsule_preview_auth?share=TOKEN"}
                              }}]})},
                      "409": {"description": "the port has as many links as it may",
                              **_json(_ERROR)},
                      **_errors(400, 401, 404)}},
    ("/api/sessions/{id}/ports/{port}/shares/{share_id}", "delete"): {
        "summary": "Revoke a preview link: what was opened through it is closed",
        "parameters": [_ID, _PORT, {"name": "share_id", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
        "responses": {"200": {"description": "revoked", **_json({
            "type": "object", "properties": {"id": {"type": "string"},
                                             "revoked": {"type": "boolean"}}})},
            **_errors(401, 404)}},
    ("/watch", "get"): {
        "summary": "The page for spectators (/watch/#TOKEN): a session, read-only, without a"
                   " login",
        "security": [],
        "responses": {"200": {"description": "the page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}},
    ("/api/sessions/{id}/exec", "post"): {
        "summary": "Run a command to completion beside the terminal, as developer, without"
                   f" a TTY; at most {EXECS_PER_SESSION} at once per session",
        "parameters": [_ID],
        "requestBody": {"required": True, **_json({
            "type": "object", "required": ["argv"], "additionalProperties": False,
            "description": f"at most {EXEC_MAX_BODY} bytes",
            "properties": {
                "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "stdin": {"type": "string", "description": "written as UTF-8, then closed"},
                "cwd": {"type": "string", "description": "absolute; default /workspace"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "timeout": {"type": "number", "exclusiveMinimum": 0,
                            "maximum": EXEC_MAX_TIMEOUT, "default": EXEC_TIMEOUT,
                            "description": "seconds, after which the command and what it"
                                           " started are killed (SIGKILL)"},
                "max_output": {"type": "integer", "minimum": 0, "maximum": EXEC_MAX_OUTPUT,
                               "default": EXEC_OUTPUT,
                               "description": "bytes kept of each of stdout and stderr"},
                "output_encoding": {"type": "string", "enum": list(ENCODINGS),
                                    "default": "auto",
                                    "description": "auto: each stream as text when it is"
                                                   " UTF-8 that JSON's escapes at most"
                                                   " double, else base64; base64: always"
                                                   " base64"}}})},
        "responses": {"200": {"description": "it ended (whatever its exit code)", **_json({
            "type": "object", "properties": {
                "stdout": {"type": "string"}, "stderr": {"type": "string"},
                "stdout_encoding": {"type": "string", "enum": ["utf-8", "base64"]},
                "stderr_encoding": {"type": "string", "enum": ["utf-8", "base64"]},
                "exit_code": {"type": ["integer", "null"]},
                "timed_out": {"type": "boolean"},
                "truncated": {"type": "object", "properties": {
                    "stdout": {"type": "boolean"}, "stderr": {"type": "boolean"}}},
                "duration": {"type": "number"}},
            "description": "output past max_output is dropped (never mid-character in"
                           " text); a stream that is not UTF-8, or that escaping would more"
                           " than double, is base64 (its _encoding says which)"})},
            **_errors(400, 401, 404, 409, 413, 415, 429, 503), **_BUSY_CONTAINER}},
    ("/api/sessions/{id}/workspace", "post"): {
        "summary": "Unpack a .tar or .tar.gz into /workspace as developer; every entry is"
                   " checked first and nothing is written if one is refused",
        "parameters": [_ID],
        "requestBody": {"required": True, "content": {
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "unpacked", **_json({
            "type": "object", "properties": {
                "entries": {"type": "integer"}, "files": {"type": "integer"},
                "directories": {"type": "integer"}, "links": {"type": "integer"},
                "bytes": {"type": "integer"}, "compressed": {"type": "boolean"}}})},
            "400": {"description": "not an archive, or an entry refused (its name in"
                                   " entry)", **_json(_ERROR)},
            **_errors(401, 404, 413, 415, 422, 429, 503), **_BUSY_CONTAINER}},
    ("/api/export/{id}", "get"): {
        "summary": "The session's /workspace as a .tar.gz (entries under workspace/); a kept"
                   " session's too (Docker reads its stopped container's files)",
        "parameters": [_ID],
        "responses": {"200": {"description": "the archive", "content": {
            "application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(401, 404, 409, 429),
            "503": {"description": "the Docker engine does not answer, an export cut off"
                                   " before its first byte (code export_limit), or the"
                                   " exports' spool is full (code exports_busy, Retry-After)",
                    **_json(_ERROR)}}},
    ("/api/admin/sessions", "get"): {
        "summary": "Every session (admin): live ones under sessions, kept ones under kept",
        "security": [{"adminToken": []}],
        "responses": {"200": {"description": "the sessions", **_json({"type": "object"})},
                      **_errors(401, 403)}},
    ("/api/admin/sessions", "delete"): {
        "summary": "End every session (admin)", "security": [{"adminToken": []}],
        "responses": {"200": {"description": "how many", **_json({"type": "object"})},
                      **_errors(401, 403)}},
    ("/api/admin/sessions/{id}", "delete"): {
        "summary": "End one session (admin)", "security": [{"adminToken": []}],
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string", "minLength": 4},
                        "description": "a session id, or its first 4 or more characters"}],
        "responses": {"200": {"description": "ended", **_json({"type": "object"})},
                      **_errors(401, 403, 404),
                      "409": {"description": "the prefix names more than one session",
                              **_json(_ERROR)}}},
    ("/api/admin/drain", "get"): {
        "summary": "The drain's state (admin)", "security": [{"adminToken": []}],
        "responses": {"200": {"description": "the state", **_json({"type": "object"})},
                      **_errors(401, 403)}},
    ("/api/admin/drain", "post"): {
        "summary": "Start draining: no new sessions (admin)", "security": [{"adminToken": []}],
        "parameters": [{"name": "deadline", "in": "query",
                        "schema": {"type": "number", "minimum": 0},
                        "description": "seconds after which the sessions left are ended"}],
        "responses": {"200": {"description": "draining", **_json({"type": "object"})},
                      **_errors(400, 401, 403)}},
    ("/api/admin/drain", "delete"): {
        "summary": "Stop draining (admin)", "security": [{"adminToken": []}],
        "responses": {"200": {"description": "not draining", **_json({"type": "object"})},
                      **_errors(401, 403)}},
}


def document() -> dict:
    paths: dict[str, dict] = {}
    for (path, method), operation in ROUTES.items():
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "capsule", "version": __version__,
                 "description": "Terminals in Docker containers, for people and programs."
                                " Every error is JSON: {\"error\": sentence, \"code\": word}."},
        "paths": paths,
        "security": [{}, {"bearer": []}, {"basic": []}, {"cookie": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a token of --tokens"},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "a user and password of --auth"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "capsule_session",
                           "description": "the page's login (--auth)"},
                "metricsToken": {"type": "http", "scheme": "bearer"},
                "adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "code"], "properties": {
                    "error": {"type": "string"}, "code": {"type": "string"},
                    "entry": {"type": ["string", "null"],
                              "description": "an upload's refused entry (400)"},
                    "profiles": {"type": "array", "items": {"type": "string"},
                                 "description": "the profiles there are (unknown_profile)"},
                    "limit": {"type": "integer",
                              "description": "the route's body limit, in bytes (413)"},
                    "id": {"type": "string",
                           "description": "the session still starting (504)"}}},
                "Session": {"type": "object", "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "status": {"type": "string"},
                    "state": {"type": "string", "description":
                              "running, detached, ... for a live session; kept"},
                    "created": {"type": "number"}, "client_attached": {"type": "boolean"},
                    "profile": {"type": "string"},
                    "url": {"type": "string", "description": "the page that opens it"},
                    "user": {"type": ["string", "null"]},
                    "kept_at": {"type": "number", "description": "(kept) when it was put"
                                                                " away"},
                    "kept_until": {"type": "number", "description": "(kept) when it is"
                                                                   " removed"},
                    "age": {"type": "number", "description": "(kept) seconds since created"},
                    "size": {"type": ["integer", "null"],
                             "description": "(kept) bytes of its writable layer"},
                    "command": {"type": "string", "description": "(kept) what it ran"},
                    "reason": {"type": "string", "enum": ["put_away", "grace", "idle",
                                                          "stopped"]},
                    "reason_text": {"type": "string"}}},
                "Snapshot": {"type": "object", "properties": {
                    "name": {"type": "string"}, "created": {"type": "number"},
                    "size": {"type": ["integer", "null"]},
                    "profile": {"type": ["string", "null"]}}}}},
    }


class OpenApiResource(JsonResource):
    """
    C{GET /api/openapi.json}; another method is a JSON 405, as everywhere
    under C{/api}.
    """

    isLeaf = True
    methods = (b"GET",)

    def __init__(self) -> None:
        super().__init__()
        self._body = json.dumps(document(), indent=1).encode("utf-8")

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache")
        return self._body
