"""
The addresses of previews (capsule.core.preview): paths, host names, and
host names that are not a preview's.
"""

from capsule.core.preview import (parse_preview_host, preview_host, preview_path, preview_url,
                                  valid_port)

SID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def test_path_and_host():
    assert preview_path(SID, 3000) == f"/preview/{SID}/3000/"
    assert preview_host(SID, 3000, "Preview.Example.") == f"3000-{SID}.preview.example"


def test_parse_round_trip():
    assert parse_preview_host(preview_host(SID, 8080, "p.example"), "p.example") == (SID, 8080)
    assert parse_preview_host(f"8080-{SID}.P.EXAMPLE:443", "p.example") == (SID, 8080)


def test_parse_refuses_what_is_not_a_preview():
    for host in ("p.example", f"{SID}.p.example", f"0-{SID}.p.example",
                 f"70000-{SID}.p.example", f"3000-{SID}.other.example",
                 f"3000-{SID}x.p.example", f"a.3000-{SID}.p.example", f"03000-{SID}.p.example"):
        assert parse_preview_host(host, "p.example") is None, host


def test_urls():
    assert preview_url(SID, 3000, base="https://c.example/") == \
        f"https://c.example/preview/{SID}/3000/"
    assert preview_url(SID, 3000, base="https://c.example", domain="p.example") == \
        f"https://3000-{SID}.p.example/"


def test_valid_port():
    assert valid_port(1) and valid_port(65535)
    assert not valid_port(0) and not valid_port(65536) and not valid_port(True)
