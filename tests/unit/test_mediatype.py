"""Media types come from the bytes (libmagic); the client's word only refines plain
UTF-8 text; `accepts` patterns match case-insensitively, wildcards included."""

from __future__ import annotations

import threading

import pytest

from runner.control import mediatype
from runner.control.mediatype import matches, normalise, sniff

PDF = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"
       b"\x00\x00\x00\x1f\x15\xc4\x89")
TEXT = b"hello world\nthis is a note, nothing more\n"
CSV_LIKE = b"id;value\n1;2\n3;4\n"  # libmagic calls this text/plain
HTML = b"<!DOCTYPE html>\n<html><head><title>x</title></head><body>hi</body></html>\n"
BINARY = b"\x00\x01\x02\xff\xfe\x80" * 100


@pytest.mark.parametrize(("head", "declared", "expected"), [
    (PDF, None, "application/pdf"),
    (PDF, "text/plain", "application/pdf"),  # the bytes win
    (PNG, "application/octet-stream", "image/png"),
    (TEXT, None, "text/plain"),
    (TEXT, "application/pdf", "text/plain"),  # a spoofed header is refused
    (TEXT, "image/png", "text/plain"),
    (CSV_LIKE, "text/csv", "text/csv"),  # the refinement
    (CSV_LIKE, "Text/CSV; charset=utf-8", "text/csv"),
    (b"# Title\n\nSome *markdown*.\n", "text/markdown", "text/markdown"),
    (b'{"a": 1, "b": [1, 2,', "application/json", "application/json"),  # a cut-off head
    (b"name,age\nalice,30\nbob,25\n", None, "text/csv"),  # libmagic knows CSV itself
    (HTML, None, "text/html"),
    (HTML, "application/pdf", "text/html"),
    (BINARY, None, "application/octet-stream"),
    (BINARY, "text/plain", "application/octet-stream"),
    (b"", None, "application/octet-stream"),
    (b"", "text/plain", "application/octet-stream"),
])
def test_the_bytes_decide_the_media_type(head: bytes, declared: str | None,
                                         expected: str) -> None:
    assert sniff(head, declared) == expected


def test_latin_1_text_is_not_refined_to_the_declared_type() -> None:
    head = "caf\xe9 cr\xe8me; br\xfbl\xe9e\n".encode("latin-1")
    assert sniff(head, "text/csv") == "text/plain"


def test_utf_8_cut_in_the_middle_of_a_character_still_counts_as_utf_8() -> None:
    head = ("a;b\n" + "é" * 40).encode()[:-1]
    assert sniff(head, "text/csv") == "text/csv"


def test_a_declared_non_text_type_does_not_refine_plain_text() -> None:
    assert sniff(TEXT, "application/zip") == "text/plain"
    assert sniff(TEXT, "not a media type") == "text/plain"


def test_a_libmagic_failure_is_octet_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def from_buffer(self, _head: bytes) -> str:
            raise OSError("no magic database")

    monkeypatch.setattr(mediatype, "libmagic", Broken)
    assert sniff(PDF, "application/pdf") == "application/octet-stream"


def test_sniffing_from_many_threads_gives_the_same_answers() -> None:
    answers: list[str] = []

    def work() -> None:
        answers.extend(sniff(head, None) for head in (PDF, PNG, TEXT, HTML) * 25)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers.count("application/pdf") == answers.count("image/png") == 100
    assert answers.count("text/plain") == answers.count("text/html") == 100


@pytest.mark.parametrize(("raw", "expected"), [
    ("Text/CSV; charset=utf-8", "text/csv"),
    ("application/vnd.ms-excel", "application/vnd.ms-excel"),
    ("  image/svg+xml ", "image/svg+xml"),
    (None, None),
    ("", None),
    ("text", None),
    ("text/", None),
    ("text/plain/extra", None),
    ("te xt/plain", None),
    ("text/pl\u00e4in", None),
])
def test_normalise(raw: str | None, expected: str | None) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(("media_type", "patterns", "expected"), [
    ("application/pdf", ["application/pdf"], True),
    ("Application/PDF", ["application/pdf"], True),
    ("application/pdf", ["APPLICATION/PDF"], True),
    ("text/csv", ["text/*"], True),
    ("text/csv; charset=utf-8", ["text/*"], True),
    ("image/png", ["*/*"], True),
    ("image/png", ["application/pdf", "image/*"], True),
    ("image/png", ["application/pdf", "text/*"], False),
    ("text/csv", ["text/plain"], False),
    ("application/pdf", [], False),
    ("textual/csv", ["text/*"], False),
    ("garbage", ["*/*"], False),
])
def test_matches(media_type: str, patterns: list[str], expected: bool) -> None:
    assert matches(media_type, patterns) is expected
