"""
The page's static files (C{www/}), served so that a returning visitor loads
nothing twice.

 - Text types (HTML, CSS, JavaScript, JSON, SVG) are sent gzip-compressed
   to a client that accepts it, with C{Vary: Accept-Encoding}.  Each file is
   read, hashed and compressed once, and kept in a bounded in-memory cache
   (L{StaticCache}) under its path, valid while its modification time and
   size (and those of the files it names, for a page) stay the same.
 - Every answer has a strong C{ETag} (a hash of the bytes sent: the gzip
   and the plain representations have different ones) and C{Last-Modified};
   C{If-None-Match}, else C{If-Modified-Since}, is answered with 304 and no
   body.
 - Files under C{node_modules/} are versioned by the page: when a page
   (C{index.html}) is served, each quoted C{node_modules/...} URL in it gets
   C{?v=<hash of that file>}, and such a file asked for with its current
   C{v} is served C{Cache-Control: max-age=31536000, immutable}.  A new
   file has a new hash, so a new URL.  Everything else (the page itself,
   C{app.js}, C{style.css}, a C{node_modules} file without its current
   C{v}) is C{no-cache}: the browser revalidates it and gets a 304.
 - A page's inline scripts are allowed by their hashes in the answer's
   C{Content-Security-Policy} (its C{script-src} otherwise allows the
   page's own origin only), so that the page can open its WebSocket before
   its scripts load.
 - C{Range} is answered from the file, as Twisted's L{File} does, plain
   (never a range of the gzip), and only while C{If-Range}, when sent, is
   the plain representation's C{ETag} or its C{Last-Modified}, and at most
   L{MAX_RANGES} ranges are asked for; otherwise the whole representation
   is sent.  A rewritten page ignores C{Range}.

Files larger than L{MAX_CACHED_FILE} are served as L{File} serves them
(C{Last-Modified}, ranges), C{no-cache}, without C{ETag} or compression.
A file is read and compressed on the reactor thread, once per change: www/
is the operator's, small, and compressing capsule's largest file takes a
few milliseconds.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.logger import Logger
from twisted.python.filepath import FilePath, InsecurePath
from twisted.web import http
from twisted.web.http import datetimeToString, stringToDatetime
from twisted.web.pages import forbidden, notFound
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import File, getTypeAndEncoding

_log = Logger()

# The longest file name capsule serves (Linux's NAME_MAX).
_MAX_NAME = 255

# Files up to this size get validators of their content (and are cached
# when compressible); larger ones are served as Twisted serves them.
MAX_CACHED_FILE = 4 * 1024 * 1024
# Compressed only between these sizes: smaller gains nothing worth a
# header, larger would hold the reactor too long the first time.
MIN_COMPRESS = 256
MAX_COMPRESS = 1024 * 1024
GZIP_LEVEL = 6
# What the cache may hold, in bytes of compressed or rewritten bodies, and
# in files; the least recently used go first.
CACHE_BYTES = 16 * 1024 * 1024
CACHE_FILES = 512

# Types worth compressing.
COMPRESSIBLE = ("text/", "application/javascript", "application/json", "application/xml",
                "application/wasm", "image/svg+xml")

# The tree whose files the page versions, and what they are served with.
VERSIONED_DIR = "node_modules"
IMMUTABLE = b"max-age=31536000, immutable"
REVALIDATE = b"no-cache"

# Longest header value read for content negotiation and conditions (a
# longer one is treated as absent: the answer is then the plain 200).
MAX_NEGOTIATION_HEADER = 4096
# Ranges one request may ask for; more (a way to make a small request cost
# a large multipart answer) get the whole representation instead.
MAX_RANGES = 16

# Bytes of a page read for the packages it names.
_MAX_PAGE_SCAN = 1024 * 1024
# A quoted node_modules URL in a page: an attribute or a script's string.
_REFERENCE = re.compile(rb"""(["'])(/?node_modules/[A-Za-z0-9@._~+/-]{1,512})\1""")
# An inline script of a page (no src): its text, as CSP hashes it.
_INLINE_SCRIPT = re.compile(rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script\s*>",
                            re.IGNORECASE | re.DOTALL)
_SCRIPT_SRC = re.compile(rb"((?<![\w-])script-src(?![\w-])[^;]*)")



def missing_packages(root: str, pages=("index.html", "login.html")) -> list[str]:
    """
    The C{node_modules/} files that the pages of C{root} name but C{root}
    does not hold (npm's packages, which an installed capsule gets apart
    from its own files), in the order named.
    """
    missing = []
    for page in pages:
        try:
            with open(os.path.join(root, page), "rb") as f:
                data = f.read(_MAX_PAGE_SCAN)
        except OSError:
            continue
        for match in _REFERENCE.finditer(data):
            name = match.group(2).decode("ascii").lstrip("/")
            if name not in missing and not os.path.isfile(os.path.join(root, name)):
                missing.append(name)
    return missing

@dataclass
class Representation:
    """
    One encoding of a file's content.

    @ivar body: the bytes to send, or C{None}: the file itself, read as
        it is sent.
    """

    etag: bytes
    length: int
    encoding: bytes | None = None
    body: bytes | None = None


@dataclass
class Entry:
    """
    What capsule knows of one file while it is unchanged.

    @ivar stamp: the file's (modification time in ns, size), and those of
        the files a page names, by path: the entry is valid while they are
        the same.
    @ivar version: a hash of the plain content, for C{?v=}.
    @ivar rewritten: the plain body is the page with versioned URLs (not
        the file's bytes): ranges are not served from the file.
    @ivar scripts: a page's inline scripts, as CSP source expressions
        (C{'sha256-...'}).
    """

    stamp: tuple
    mtime: float
    version: str
    plain: Representation
    gzip: Representation | None = None
    rewritten: bool = False
    held: int = field(default=0)
    scripts: tuple[bytes, ...] = ()


def _stamp(path: FilePath) -> tuple[int, int] | None:
    """
    The file's (modification time in ns, size), or C{None} when it is no
    regular file.
    """
    try:
        st = os.stat(path.path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_mtime_ns, st.st_size


def _etag(data: bytes) -> bytes:
    return b'"' + hashlib.sha256(data).hexdigest()[:32].encode("ascii") + b'"'


def compressible(content_type: str | None) -> bool:
    return bool(content_type) and content_type.startswith(COMPRESSIBLE)


class StaticCache:
    """
    The files of one C{www/} directory, read, hashed and compressed once
    each, bounded by L{CACHE_BYTES} and L{CACHE_FILES}.

    @param root: the directory; C{node_modules/} under it is versioned.
    """

    def __init__(self, root: FilePath, max_bytes: int = CACHE_BYTES,
                 max_files: int = CACHE_FILES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.held = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._versioned = root.child(VERSIONED_DIR)

    def __len__(self) -> int:
        return len(self._entries)

    def versioned(self, path: FilePath) -> bool:
        """
        Whether C{path} lies in the tree the page versions.
        """
        return path.path.startswith(self._versioned.path + "/")

    def entry(self, path: FilePath, content_type: str | None) -> Entry | None:
        """
        The entry of the file at C{path}, made again if the file changed;
        C{None} when it is too large, or cannot be read.
        """
        key = path.path
        old = self._entries.get(key)
        if old is not None and self._valid(old, path):
            self._entries.move_to_end(key)
            return old
        if old is not None:
            self._drop(key)
        entry = self._make(path, content_type)
        if entry is not None:
            self._keep(key, entry)
        return entry

    def _valid(self, entry: Entry, path: FilePath) -> bool:
        own, *named = entry.stamp
        if _stamp(path) != own:
            return False
        return all(_stamp(FilePath(other)) == stamp for other, stamp in named)

    def _make(self, path: FilePath, content_type: str | None) -> Entry | None:
        stamp = _stamp(path)
        if stamp is None or stamp[1] > MAX_CACHED_FILE:
            return None
        try:
            with path.open() as f:
                data = f.read(MAX_CACHED_FILE + 1)
        except OSError as e:
            _log.warn("could not read {path}: {error}", path=path.path, error=e)
            return None
        if len(data) != stamp[1] or _stamp(path) != stamp:
            # Being written: served from the file this time, cached later.
            return None
        version = hashlib.sha256(data).hexdigest()[:16]
        stamps = [stamp]
        mtime = stamp[0] / 1e9
        rewritten = False
        body = data
        scripts: tuple[bytes, ...] = ()
        if content_type == "text/html" and not self.versioned(path):
            body, named = self._rewrite(path, data)
            for other, (other_stamp, other_mtime) in sorted(named.items()):
                stamps.append((other, other_stamp))
                mtime = max(mtime, other_mtime)
            rewritten = body != data
            scripts = inline_script_hashes(body)
        plain = Representation(_etag(body), len(body), None, body if rewritten else None)
        packed = None
        if compressible(content_type) and MIN_COMPRESS <= len(body) <= MAX_COMPRESS:
            compressed = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            if len(compressed) < len(body):
                packed = Representation(_etag(compressed), len(compressed), b"gzip", compressed)
        held = (len(plain.body) if plain.body is not None else 0) + (
            packed.length if packed is not None else 0)
        return Entry(tuple(stamps), mtime, version, plain, packed, rewritten, held, scripts)

    def _rewrite(self, page: FilePath, data: bytes) -> tuple[bytes, dict]:
        """
        The page with C{?v=<version>} after each quoted URL of a file under
        C{node_modules/}, and the stamps of the files it names.
        """
        named: dict[str, tuple] = {}

        def version(match: re.Match) -> bytes:
            url = match.group(2)
            target = self._resolve(page, url)
            if target is None:
                return match.group(0)
            entry = self.entry(target, getTypeAndEncoding(
                target.basename(), File.contentTypes, File.contentEncodings, None)[0])
            if entry is None:
                return match.group(0)
            named[target.path] = (entry.stamp[0], entry.mtime)
            quote = match.group(1)
            return quote + url + b"?v=" + entry.version.encode("ascii") + quote

        return _REFERENCE.sub(version, data), named

    def _resolve(self, page: FilePath, url: bytes) -> FilePath | None:
        text = url.decode("ascii")
        base = self.root if text.startswith("/") else page.parent()
        segments = text.lstrip("/").split("/")
        if any(s in ("", ".", "..") for s in segments):
            return None
        try:
            target = base.descendant(segments)
        except InsecurePath:
            return None
        if not self.versioned(target) or not target.isfile():
            return None
        return target

    def _keep(self, key: str, entry: Entry) -> None:
        if entry.held > self.max_bytes:
            return
        self._entries[key] = entry
        self.held += entry.held
        while self.held > self.max_bytes or len(self._entries) > self.max_files:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.held -= entry.held


def inline_script_hashes(page: bytes) -> tuple[bytes, ...]:
    """
    The CSP source expressions (C{'sha256-...'}) that allow the page's
    inline scripts, in their order, without repeats.
    """
    found: dict[bytes, None] = {}
    for match in _INLINE_SCRIPT.finditer(page):
        digest = base64.b64encode(hashlib.sha256(match.group(1)).digest())
        found[b"'sha256-" + digest + b"'"] = None
    return tuple(found)


def allow_scripts(request, scripts: tuple[bytes, ...]) -> None:
    """
    Add C{scripts} to the C{script-src} of the answer's
    C{Content-Security-Policy}, when it has one: the page's own inline
    scripts run, and no other inline script does.
    """
    policy = request.responseHeaders.getRawHeaders(b"content-security-policy")
    if not scripts or not policy:
        return
    extra = b" " + b" ".join(scripts)
    request.setHeader(b"content-security-policy",
                      _SCRIPT_SRC.sub(lambda m: m.group(1).rstrip() + extra, policy[-1], count=1))


# -- what the request asks for --


def _header(request, name: bytes) -> bytes | None:
    value = request.getHeader(name)
    if value is None or len(value) > MAX_NEGOTIATION_HEADER:
        return None
    return value


def accepts_gzip(request) -> bool:
    """
    Whether the request's C{Accept-Encoding} admits gzip (C{gzip},
    C{x-gzip} or C{*}, with a q-value above 0).
    """
    value = _header(request, b"accept-encoding")
    if not value:
        return False
    named = star = None
    for part in value.split(b","):
        coding, *params = (p.strip() for p in part.split(b";"))
        q = 1.0
        for param in params:
            key, _, number = param.partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    q = float(number.strip())
                except ValueError:
                    q = 0.0
        coding = coding.lower()
        if coding in (b"gzip", b"x-gzip"):
            named = q > 0 if named is None else named or q > 0
        elif coding == b"*":
            star = q > 0
    return named if named is not None else bool(star)


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag.startswith(b"W/") else tag


def not_modified(request, etag: bytes, mtime: float) -> bool:
    """
    Whether the client's copy is current: C{If-None-Match} (weak
    comparison, C{*} matches), or, only without it, C{If-Modified-Since}.
    """
    if request.getHeader(b"if-none-match") is not None:
        value = _header(request, b"if-none-match")
        if value is None:
            return False
        tags = [_opaque(t) for t in value.split(b",")]
        return b"*" in tags or etag in tags
    since = _header(request, b"if-modified-since")
    if not since:
        return False
    try:
        when = stringToDatetime(since.split(b";", 1)[0])
    except (ValueError, IndexError, OverflowError):
        return False
    return int(mtime) <= when


def range_allowed(request, etag: bytes, mtime: float) -> bool:
    """
    Whether a C{Range} may be served: no C{If-Range}, or one naming the
    plain representation (strong comparison), or its C{Last-Modified}.
    """
    value = request.getHeader(b"if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith((b'"', b"W/")):
        return value == etag
    return value == datetimeToString(int(mtime))


class StaticFiles(File):
    """
    The static page, without directory listings, compressed and with cache
    validators (see the module).  A path segment that cannot name a file in
    the directory (not UTF-8, a NUL or a slash in it, too long, C{..}) is a
    404, like a missing file: never an error.

    @ivar cache: the L{StaticCache} shared by a directory and its files.
    """

    childNotFound = notFound("Not Found", "No such file.")

    def __init__(self, path: str, *args, cache: StaticCache | None = None, **kwargs) -> None:
        super().__init__(path, *args, **kwargs)
        self.cache = cache if cache is not None else StaticCache(FilePath(self.path))

    def directoryListing(self):
        return forbidden("Forbidden", "Directory listings are off.")

    def createSimilarFile(self, path):
        similar = super().createSimilarFile(path)
        similar.cache = self.cache
        return similar

    def getChild(self, path: bytes, request):
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return self.childNotFound
        if len(path) > _MAX_NAME or "\0" in name or "/" in name:
            return self.childNotFound
        try:
            return super().getChild(path, request)
        except (OSError, ValueError):
            # What the file system says about a name no file can have.
            return self.childNotFound

    def render_GET(self, request):
        self.restat(False)
        if not self.exists() or self.isdir():
            return super().render_GET(request)
        ranges = request.getHeader(b"range")
        if ranges is not None and ranges.count(b",") >= MAX_RANGES:
            _log.info("answered a request for {count} ranges of {path} with the whole file",
                      count=ranges.count(b",") + 1, path=self.basename())
            request.requestHeaders.removeHeader(b"range")
        if self.type is None:
            self.type, self.encoding = getTypeAndEncoding(
                self.basename(), self.contentTypes, self.contentEncodings, self.defaultType)
        # A file already compressed (.gz) is sent as it is.
        entry = self.cache.entry(self, self.type) if self.encoding is None else None
        if entry is None:
            request.setHeader(b"cache-control", REVALIDATE)
            return super().render_GET(request)
        version = request.args.get(b"v")
        current = self.cache.versioned(self) and version == [entry.version.encode("ascii")]
        request.setHeader(b"cache-control", IMMUTABLE if current else REVALIDATE)
        allow_scripts(request, entry.scripts)
        request.setHeader(b"last-modified", datetimeToString(int(entry.mtime)))
        if entry.gzip is not None:
            request.setHeader(b"vary", b"Accept-Encoding")
        if not entry.rewritten:
            request.setHeader(b"accept-ranges", b"bytes")
        ranged = False
        if request.getHeader(b"range") is not None and not entry.rewritten:
            ranged = range_allowed(request, entry.plain.etag, entry.mtime)
            if not ranged:
                request.requestHeaders.removeHeader(b"range")
        chosen = entry.plain
        if entry.gzip is not None and not ranged and accepts_gzip(request):
            chosen = entry.gzip
        request.setHeader(b"etag", chosen.etag)
        if not_modified(request, chosen.etag, entry.mtime):
            request.setResponseCode(http.NOT_MODIFIED)
            # No body, and no Content-Length (it would have to be the full
            # answer's); nothing else to read from the file.
            request.finish()
            return NOT_DONE_YET
        if chosen.body is None:
            return self._send_file(request)
        request.setResponseCode(http.OK)
        request.setHeader(b"content-type", self.type.encode("ascii"))
        if chosen.encoding is not None:
            request.setHeader(b"content-encoding", chosen.encoding)
        request.setHeader(b"content-length", b"%d" % chosen.length)
        return b"" if request.method == b"HEAD" else chosen.body

    render_HEAD = render_GET

    def _send_file(self, request):
        """
        The file's own bytes, or the ranges asked for, as L{File} sends
        them.
        """
        try:
            opened = self.openForReading()
        except OSError:
            return self.forbidden.render(request)
        if request.method == b"HEAD":
            self._setContentHeaders(request)
            opened.close()
            return b""
        self.makeProducer(request, opened).start()
        return NOT_DONE_YET
