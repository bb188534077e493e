"""
The documentation holds together: every relative link in README.md and
docs/*.md leads to a file that exists, every #anchor to a heading of the
page it names (with a forge's heading slugs), and the README stays short.
No network: links with a scheme (https:, mailto:) are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 320

# [text](target) and [text](target "title"); the text may span lines and
# hold `code`, but not brackets.  Images (![alt](src)) are links too.
_INLINE_LINK = re.compile(r"\[[^\[\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _outside_code(text: str) -> str:
    """
    The text without fenced code blocks and inline code spans, whose
    brackets and hashes are not Markdown.
    """
    kept, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else line)
    prose = "\n".join(kept)
    # A code span inside a link's text stays part of the link: replace the
    # span by its content without backticks (brackets in code are rare and
    # would not be a link anyway).
    return re.sub(r"`+([^`]*)`+", lambda m: m.group(1).replace("[", "(").replace("]", ")"), prose)


def slug(heading: str) -> str:
    """
    The anchor a forge (GitHub) gives a heading: inline markup dropped,
    lower case, punctuation but hyphens and underscores removed, each space
    a hyphen.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """
    The anchors of a page's headings; a repeated heading gets -1, -2, ...
    """
    seen: dict[str, int] = {}
    found = set()
    for line in _fenceless_lines(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def _fenceless_lines(text: str):
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def links(page: Path) -> list[str]:
    prose = _outside_code(page.read_text(encoding="utf-8"))
    return _INLINE_LINK.findall(prose) + _REFERENCE.findall(prose)


def _relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def _cases():
    for page in PAGES:
        for target in links(page):
            if _relative(target):
                yield pytest.param(page, target, id=f"{page.relative_to(ROOT)}->{target}")


def test_there_are_pages_and_links():
    assert (ROOT / "docs").is_dir()
    assert len(PAGES) > 5
    assert sum(1 for _ in _cases()) > 50


@pytest.mark.parametrize("page, target", list(_cases()))
def test_relative_link_resolves(page: Path, target: str):
    path, _, anchor = target.partition("#")
    destination = (page.parent / unquote(path)).resolve() if path else page
    assert destination.exists(), f"{page.relative_to(ROOT)}: {target}: no such file"
    assert ROOT in destination.parents or destination == ROOT, (
        f"{page.relative_to(ROOT)}: {target}: leaves the repository")
    if anchor:
        assert destination.suffix == ".md", (
            f"{page.relative_to(ROOT)}: {target}: an anchor into a file that is not Markdown")
        assert unquote(anchor) in anchors(destination), (
            f"{page.relative_to(ROOT)}: {target}: no heading with that anchor in "
            f"{destination.relative_to(ROOT)} (it has: {sorted(anchors(destination))})")


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the manual goes in docs/"


def test_docs_index_lists_every_page():
    index = ROOT / "docs" / "README.md"
    listed = {Path(t.partition("#")[0]).name for t in links(index) if _relative(t)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= listed, f"docs/README.md does not list {sorted(pages - listed)}"


@pytest.mark.parametrize("heading, expected", [
    ("How a session works", "how-a-session-works"),
    ("Binary protocol (`capsule.binary.v1`)", "binary-protocol-capsulebinaryv1"),
    ("What the engine's socket grants", "what-the-engines-socket-grants"),
    ("Instant terminals: warm sessions, refills and the page",
     "instant-terminals-warm-sessions-refills-and-the-page"),
    ("snake_case and CAPS", "snake_case-and-caps"),
])
def test_slug(heading, expected):
    assert slug(heading) == expected
