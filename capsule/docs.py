"""
The reference tables of C{docs/}, generated from the code: C{options.md}
from L{capsule.tap.Options}, C{tuning.md} from L{capsule.tuning}'s table.
C{python -m capsule.docs --write} writes them; a test fails when the
committed files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from capsule.tap import Options
from capsule.tuning import tuning_markdown

DOCS_COMMAND = "python -m capsule.docs --write"

# Options by subject, for the table; any option not named here goes last.
_GROUPS = [
    ("Listening and users", [
        "listen", "insecure-no-auth", "auth", "tokens", "user-header", "trusted-proxy",
        "public-url", "allowed-host", "allowed-origin", "admin-user", "admin-token",
        "admin-token-file", "metrics-token", "metrics-token-file"]),
    ("Session containers", [
        "image", "memory", "cpus", "pids", "cpu-shares", "disk", "network", "runtime",
        "cap-add", "allow-sudo", "read-only-root", "shell", "no-keeper"]),
    ("Session lifetime", [
        "instance", "grace", "max-lifetime", "idle-timeout", "replay-buffer", "pool-size"]),
    ("Profiles", ["profiles", "agent-image", "secrets-file", "clone-timeout"]),
    ("Admission", [
        "max-sessions", "max-sessions-per-client", "max-sessions-per-user", "session-rate",
        "memory-budget"]),
    ("Exports and uploads", [
        "exports-per-client", "export-max-bytes", "export-timeout", "upload-max-bytes"]),
    ("Operations", [
        "www", "state-dir", "log-format", "record", "record-max-bytes", "tuning"]),
]


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_markdown() -> str:
    """
    docs/options.md: every option of C{twistd capsule} (those C{--help}
    shows), its default and its meaning, as Markdown tables by subject.
    """
    options = Options()
    rows = {}
    for entry in options.describe():
        rows[entry["long"]] = entry
    lines = [
        "# Options",
        "",
        "<!-- Generated from capsule/tap.py by `" + DOCS_COMMAND + "`; do not edit. -->",
        "",
        "The options of `twistd capsule` (`twistd -n capsule --help` says the same)."
        " Sizes take Docker's syntax (`512m`, `4g`); durations are in seconds. Options"
        " marked repeatable may be given more than once. capsule's internal knobs (thread"
        " pools, timers, protocol windows) are not options: see [tuning](tuning.md).",
    ]
    seen = set()
    for title, names in _GROUPS + [("Other", sorted(rows))]:
        names = [n for n in names if n in rows and n not in seen]
        if not names:
            continue
        lines += ["", f"## {title}", "", "| option | default | meaning |",
                  "| --- | --- | --- |"]
        for name in names:
            seen.add(name)
            entry = rows[name]
            option = f"`--{name}`" + (f", `-{entry['short']}`" if entry["short"] else "")
            default = entry["default"]
            shown = ("off" if entry["kind"] == "flag" else "" if default is None
                     else f"`{_cell(default)}`")
            lines.append(f"| {option} | {shown} | {_cell(entry['doc'])} |")
    return "\n".join(lines) + "\n"


def generated_docs() -> dict[str, str]:
    """
    The generated files under docs/, by name.
    """
    return {"options.md": options_markdown(), "tuning.md": tuning_markdown()}


def main(argv: list[str]) -> int:
    docs = Path(__file__).resolve().parents[1] / "docs"
    if argv == ["--write"]:
        docs.mkdir(exist_ok=True)
        for name, text in generated_docs().items():
            (docs / name).write_text(text, encoding="utf-8")
            print(f"wrote {docs / name}")
        return 0
    if argv == ["--options"]:
        sys.stdout.write(options_markdown())
        return 0
    if argv == ["--tuning"]:
        sys.stdout.write(tuning_markdown())
        return 0
    print("usage: python -m capsule.docs --write | --options | --tuning",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
