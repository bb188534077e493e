"""
Archives uploaded into a session's C{/workspace}: checked whole before any
byte of them is written, then rewritten in a plain form.

L{check} reads an archive (C{.tar} or C{.tar.gz}, told apart by their first
bytes) as a stream and refuses it, naming the entry, when an entry would
land outside C{/workspace}: an absolute name, a C{..} component, a symbolic
link whose target (followed through the archive's other links) leaves it,
a hard link to anything but an earlier file of the archive, an entry under
one of the archive's symbolic links (it would be written wherever the link
points), a device, a fifo, or a kind of entry tar does not define.  It also
bounds the number of entries, the length of names and the unpacked size.

L{rewrite} then writes the same entries as a new tar: names relative to
C{/workspace} without C{./}, owned by C{developer} (1000:1000), modes
without set-uid, set-gid and sticky bits, and nothing else (no extended
attributes, no owner names from elsewhere).  Both read at most one entry's
header and one buffer of data at a time: memory use does not depend on the
archive's size.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from dataclasses import dataclass

GZIP_MAGIC = b"\x1f\x8b"
# POSIX tar's magic ("ustar\0" or GNU's "ustar  "), at offset 257 of the
# first header.
TAR_MAGIC_AT = 257
TAR_MAGIC = b"ustar"
# Bytes to read to tell the kind of an archive.
HEAD_BYTES = 512

MAX_ENTRIES = 100_000
MAX_NAME = 4096
MAX_COMPONENT = 255
# Bytes of names and link targets, in all: what the check holds in memory.
MAX_NAMES_BYTES = 16 * 1024 * 1024
# Links followed through one another before a target is called a loop.
MAX_LINK_DEPTH = 40
# Bytes a .tar.gz may hold after tar's end-of-archive blocks (GNU tar pads
# to its 10 KiB records), read to check that the gzip stream is whole.
MAX_TRAILING = 16 * 1024 * 1024

DEVELOPER_UID = DEVELOPER_GID = 1000
DEVELOPER = "developer"
ROOT = "/workspace"


class Interrupted(Exception):
    """
    Raised by the archive's reads or writes to stop a check or a rewrite
    (capsule stops, the command went away): passed through as it is.
    """


class ArchiveRefused(Exception):
    """
    The archive may not be unpacked: C{message} says why, C{entry} names
    the entry at fault (C{None}: the archive as a whole).
    """

    def __init__(self, message: str, entry: str | None = None,
                 code: str = "bad_archive") -> None:
        super().__init__(message)
        self.message = message
        self.entry = entry
        self.code = code


@dataclass
class Summary:
    """
    @ivar compressed: whether the archive was gzip-compressed.
    @ivar entries: entries to unpack (the archive's own root left out).
    @ivar files, directories, links: of those, how many of each.
    @ivar size: bytes of file contents.
    """

    compressed: bool = False
    entries: int = 0
    files: int = 0
    directories: int = 0
    links: int = 0
    size: int = 0


def kind_of(head: bytes) -> str:
    """
    C{"gzip"} or C{"tar"}, from an archive's first bytes.

    @raise ArchiveRefused: for anything else.
    """
    if not head:
        raise ArchiveRefused("the body is empty: send a .tar or .tar.gz archive", code="empty")
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[TAR_MAGIC_AT:TAR_MAGIC_AT + len(TAR_MAGIC)] == TAR_MAGIC:
        return "tar"
    raise ArchiveRefused("the body is not a .tar or .tar.gz archive (POSIX tar, optionally"
                         " gzip-compressed)", code="not_an_archive")


# Bytes of tar a .tar.gz may unpack to per compressed byte read, past the
# first EXPANSION_SLACK: source trees compress 3 to 10 times, a run of
# zeros 1000 times (a small upload that would take a long while to check
# and to unpack).  Checked as the archive is read.
MAX_EXPANSION = 100
EXPANSION_SLACK = 1024 * 1024

# Bytes of an extended header (pax, or GNU's long names): tarfile reads one
# whole into memory.
MAX_HEADER = 1024 * 1024
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _BoundedInfo(tarfile.TarInfo):
    """
    A header whose extended headers are refused past L{MAX_HEADER}, before
    they are read.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        # tarfile ends its members at a block of zeros (tar's end of
        # archive) and, silently, at the end of the data or at a header that
        # does not parse: only the first is an archive that is whole.
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_.capsule_whole = True
            raise

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED and self.size > MAX_HEADER:
            raise ArchiveRefused(f"the archive has an extended header of {self.size} bytes"
                                 f" (at most {MAX_HEADER})", code="bad_archive")
        return super()._proc_member(tarfile_)


def _open(fileobj):
    head = fileobj.read(HEAD_BYTES)
    kind = kind_of(head)
    fileobj.seek(0)
    try:
        if kind == "gzip":
            # Python's gzip reader, not tarfile's: it checks the stream's
            # end, length and CRC.
            packed = _Counted(fileobj)
            unpacked = _Expansion(gzip.GzipFile(fileobj=packed, mode="rb"), packed)
            archive = tarfile.open(fileobj=unpacked, mode="r|", tarinfo=_BoundedInfo)
            archive.capsule_gzip = unpacked
            return archive, True
        return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_BoundedInfo), False
    except (ArchiveRefused, Interrupted):
        raise
    except Exception as e:
        # Whatever the parser trips on (a truncated gzip header raises
        # TypeError): the bytes are the client's.
        raise ArchiveRefused(f"the archive cannot be read: {_why(e)}") from None


class _Counted:
    """
    A compressed archive, counting the bytes read from it.
    """

    def __init__(self, fileobj) -> None:
        self._fileobj = fileobj
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fileobj.read(size)
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fileobj.seek(offset, whence)

    def tell(self) -> int:
        return self._fileobj.tell()


class _Expansion:
    """
    What a gzip stream unpacks to, refused once it is more than
    L{MAX_EXPANSION} times what was read of the stream (past
    L{EXPANSION_SLACK}).
    """

    def __init__(self, unpacked, packed: _Counted) -> None:
        self._unpacked, self._packed = unpacked, packed
        self.count = 0
        # The entry being read, to name it in a refusal.
        self.entry: str | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._unpacked.read(size)
        self.count += len(data)
        if self.count > MAX_EXPANSION * self._packed.count + EXPANSION_SLACK:
            raise ArchiveRefused(
                f"the archive unpacks to more than {MAX_EXPANSION} times its compressed size"
                f" ({self.count} bytes of tar from {self._packed.count} bytes read): send it"
                " less compressed, or uncompressed", self.entry, "expands_too_much")
        return data

    def close(self) -> None:
        self._unpacked.close()


def _why(error: Exception) -> str:
    return str(error) or type(error).__name__


def _members(archive):
    """
    The archive's members, in order; an archive that breaks off or does
    not parse is refused.
    """
    try:
        yield from archive
    except (ArchiveRefused, Interrupted):
        raise
    except Exception as e:
        raise ArchiveRefused(f"the archive is truncated or corrupt: {_why(e)}") from None


def normalize(name: str) -> str | None:
    """
    C{name} relative to C{/workspace}, without C{.} and empty components;
    C{None} for the root itself.

    @raise ArchiveRefused: for an absolute name, a C{..}, an overlong name.
    """
    if "\0" in name:
        raise ArchiveRefused(f"the entry {name!r} has a NUL in its name", name)
    if name.startswith("/"):
        raise ArchiveRefused(f"the entry {name!r} has an absolute name: entries are unpacked"
                             f" into {ROOT} and must be relative to it", name, "unsafe_entry")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveRefused(f"the entry {name!r} has a '..' in its name: it would land"
                             f" outside {ROOT}", name, "unsafe_entry")
    if len(name) > MAX_NAME or any(len(p) > MAX_COMPONENT for p in parts):
        raise ArchiveRefused(f"the entry {name[:100]!r}... has a name longer than"
                             f" {MAX_NAME} bytes or a component longer than {MAX_COMPONENT}",
                             name[:200])
    return "/".join(parts) or None


def check(fileobj, max_unpacked: int) -> Summary:
    """
    Check the archive in C{fileobj} (seekable, at its start) whole.

    @param max_unpacked: bytes of file contents the archive may unpack to.
    @raise ArchiveRefused: at the first entry that may not be unpacked.
    """
    archive, compressed = _open(fileobj)
    summary = Summary(compressed=compressed)
    kinds: dict[str, str] = {}
    symlinks: dict[str, str] = {}
    names_bytes = 0
    expansion = getattr(archive, "capsule_gzip", None)
    with archive:
        for member in _members(archive):
            raw = member.name
            if expansion is not None:
                expansion.entry = raw
            name = normalize(raw)
            if name is None:
                if not member.isdir():
                    raise ArchiveRefused(f"the entry {raw!r} names {ROOT} itself but is not a"
                                         " directory", raw, "unsafe_entry")
                continue
            summary.entries += 1
            if summary.entries > MAX_ENTRIES:
                raise ArchiveRefused(f"the archive has more than {MAX_ENTRIES} entries",
                                     code="too_many_entries")
            names_bytes += len(name) + len(member.linkname)
            if names_bytes > MAX_NAMES_BYTES:
                raise ArchiveRefused(f"the archive's names add up to more than"
                                     f" {MAX_NAMES_BYTES} bytes", code="too_many_entries")
            if name in kinds:
                raise ArchiveRefused(f"the entry {raw!r} appears twice in the archive", raw)
            if member.isreg():
                kind = "file"
                summary.files += 1
                summary.size += member.size
                if summary.size > max_unpacked:
                    raise ArchiveRefused(f"the archive unpacks to more than {max_unpacked}"
                                         " bytes", raw, "too_large")
            elif member.isdir():
                kind = "dir"
                summary.directories += 1
            elif member.issym():
                kind = "symlink"
                summary.links += 1
                if not member.linkname or "\0" in member.linkname:
                    raise ArchiveRefused(f"the link {raw!r} has an empty target", raw)
                symlinks[name] = member.linkname
            elif member.islnk():
                kind = "hardlink"
                summary.links += 1
                target = _hardlink_target(raw, member.linkname)
                if kinds.get(target) not in ("file", "hardlink"):
                    raise ArchiveRefused(
                        f"the hard link {raw!r} points to {member.linkname!r}, which is not a"
                        " file earlier in the archive", raw, "unsafe_entry")
            elif member.ischr() or member.isblk():
                raise ArchiveRefused(f"the entry {raw!r} is a device: devices are refused",
                                     raw, "unsafe_entry")
            elif member.isfifo():
                raise ArchiveRefused(f"the entry {raw!r} is a fifo: fifos are refused", raw,
                                     "unsafe_entry")
            else:
                raise ArchiveRefused(f"the entry {raw!r} is of a kind tar does not define"
                                     f" ({member.type!r})", raw, "unsafe_entry")
            kinds[name] = kind
        _check_whole(archive)
    _check_links(kinds, symlinks)
    return summary


def _check_whole(archive) -> None:
    """
    @raise ArchiveRefused: if the archive ended without tar's end-of-archive
        blocks (it was cut off at an entry's end, or what follows does not
        parse), or its gzip stream is cut off, corrupt or followed by other
        data.
    """
    if not getattr(archive, "capsule_whole", False):
        raise ArchiveRefused("the archive is truncated or corrupt: it ends without tar's"
                             " end-of-archive blocks")
    unpacked = getattr(archive, "capsule_gzip", None)
    if unpacked is None:
        return
    left = MAX_TRAILING
    try:
        while left >= 0:
            data = unpacked.read(min(64 * 1024, left + 1))
            if not data:
                return
            left -= len(data)
    except (Interrupted, ArchiveRefused):
        raise
    except (EOFError, OSError, zlib.error) as e:
        raise ArchiveRefused(f"the archive is truncated or corrupt: {_why(e)}") from None
    raise ArchiveRefused(f"the archive has more than {MAX_TRAILING} bytes after its end")


def _hardlink_target(raw: str, linkname: str) -> str:
    try:
        target = normalize(linkname)
    except ArchiveRefused:
        target = None
    if target is None:
        raise ArchiveRefused(f"the hard link {raw!r} points to {linkname!r}, outside {ROOT}",
                             raw, "unsafe_entry")
    return target


def _check_links(kinds: dict[str, str], symlinks: dict[str, str]) -> None:
    """
    No entry is under one of the archive's symbolic links, and every
    symbolic link, followed through the others, stays in C{/workspace}.
    """
    if not symlinks:
        return
    for name in kinds:
        parts = name.split("/")
        for end in range(1, len(parts)):
            parent = "/".join(parts[:end])
            if parent in symlinks:
                raise ArchiveRefused(
                    f"the entry {name!r} is under the link {parent!r}: it would be written"
                    " wherever that link points", name, "unsafe_entry")
    resolved: dict[str, list[str]] = {}
    for name in symlinks:
        _resolve(name, symlinks, resolved, set())


def _resolve(name: str, symlinks: dict[str, str], resolved: dict[str, list[str]],
             following: set[str]) -> list[str]:
    """
    Where the link C{name} leads, as components under C{/workspace}.
    """
    if name in resolved:
        return resolved[name]
    if name in following or len(following) >= MAX_LINK_DEPTH:
        raise ArchiveRefused(f"the link {name!r} is part of a loop of links", name,
                             "unsafe_entry")
    following.add(name)
    target = symlinks[name]
    outside = ArchiveRefused(f"the link {name!r} points to {target!r}, outside {ROOT}", name,
                             "unsafe_entry")
    if target.startswith("/"):
        if not (target == ROOT or target.startswith(ROOT + "/")):
            raise outside
        at: list[str] = []
        rest = target[len(ROOT):]
    else:
        at = name.split("/")[:-1]
        rest = target
    for part in rest.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not at:
                raise outside
            at.pop()
            continue
        at.append(part)
        joined = "/".join(at)
        if joined in symlinks:
            at = list(_resolve(joined, symlinks, resolved, following))
    following.discard(name)
    resolved[name] = at
    return at


def rewrite(fileobj, write) -> int:
    """
    Write the entries of the (checked) archive in C{fileobj} as a plain tar
    through C{write(chunk)}; return the entries written.
    """
    archive, _ = _open(fileobj)
    out = tarfile.open(fileobj=_Writer(write), mode="w|", format=tarfile.PAX_FORMAT)
    count = 0
    with archive, out:
        for member in _members(archive):
            name = normalize(member.name)
            if name is None:
                continue
            info = tarfile.TarInfo(name)
            info.mode = member.mode & 0o777
            info.uid, info.gid = DEVELOPER_UID, DEVELOPER_GID
            info.uname = info.gname = DEVELOPER
            info.mtime = member.mtime
            data = None
            if member.isreg():
                info.type = tarfile.REGTYPE
                info.size = member.size
                data = archive.extractfile(member)
            elif member.isdir():
                info.type = tarfile.DIRTYPE
            elif member.issym():
                info.type = tarfile.SYMTYPE
                info.linkname = member.linkname
            elif member.islnk():
                info.type = tarfile.LNKTYPE
                info.linkname = normalize(member.linkname)
            else:
                raise ArchiveRefused(f"the entry {member.name!r} was not checked", member.name)
            out.addfile(info, data)
            count += 1
    return count


class _Writer:
    def __init__(self, write) -> None:
        self.write = write
