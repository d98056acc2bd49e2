"""Media types: sniffed from a file's first bytes, and matched against `accepts`.

Sniffing uses libmagic (python-magic), file(1)'s maintained database: it recognises
text formats (CSV, JSON, HTML) as well as magic numbers. What the bytes say wins over
what the client declared, so a text file sent as application/pdf is text/plain. The
one exception is a refinement libmagic cannot make: of UTF-8 text, the client's text
type is taken (libmagic only guesses among text kinds: Markdown quoting C is
"text/x-c" to it, a CSV plain text), and of what it calls text/plain also a
declared application/json or application/x-ndjson. An empty file has no type:
application/octet-stream, not libmagic's non-standard application/x-empty, so only an
`accepts` of application/octet-stream or */* takes it.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Sequence

import magic

OCTET_STREAM = "application/octet-stream"
# type "/" subtype, each an RFC 9110 token; parameters after ";" are dropped.
MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
# Declared types that refine libmagic's text/plain (besides every text/* type).
TEXT_APPLICATION_TYPES = frozenset({"application/json", "application/x-ndjson"})

# A libmagic handle per thread: loading the database costs milliseconds, and one
# handle shared by threads would serialise every sniff on its lock.
_handles = threading.local()


def normalise(media_type: str | None) -> str | None:
    """"Text/CSV; charset=utf-8" → "text/csv"; None for no or invalid syntax."""
    if media_type is None:
        return None
    essence = media_type.split(";", 1)[0].strip().lower()
    return essence if MEDIA_TYPE.fullmatch(essence) else None


def matches(media_type: str, patterns: Sequence[str]) -> bool:
    """Whether `media_type` is one of `patterns` ("application/pdf", "text/*", "*/*");
    case-insensitive, parameters ignored. An invalid type matches nothing."""
    essence = normalise(media_type)
    if essence is None:
        return False
    kind = essence.split("/", 1)[0]
    for pattern in patterns:
        wanted = pattern.split(";", 1)[0].strip().lower()
        if wanted in ("*/*", essence, f"{kind}/*"):
            return True
    return False


def sniff(head: bytes, declared: str | None) -> str:
    """The media type of a file whose first bytes are `head` (at most HEAD_BYTES of
    it); `declared` (the client's Content-Type) only refines libmagic's text/plain.
    Never raises: whatever libmagic cannot tell is application/octet-stream."""
    if not head:
        return OCTET_STREAM
    try:
        sniffed = normalise(libmagic().from_buffer(head)) or OCTET_STREAM
    except Exception:  # noqa: BLE001 - libmagic's failures all mean "unknown bytes"
        return OCTET_STREAM
    wanted = normalise(declared)
    if wanted is None or wanted == sniffed or not sniffed.startswith("text/"):
        return sniffed
    if ((wanted.startswith("text/")
         or (sniffed == "text/plain" and wanted in TEXT_APPLICATION_TYPES))
            and is_utf8(head)):
        return wanted
    return sniffed


def is_utf8(head: bytes) -> bool:
    """Whether `head` is UTF-8, allowing a character cut off at its end (the head of a
    longer file stops at a byte count, not at a character)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def libmagic() -> magic.Magic:
    """This thread's libmagic handle (libmagic handles are not thread-safe)."""
    handle: magic.Magic | None = getattr(_handles, "magic", None)
    if handle is None:
        handle = magic.Magic(mime=True)
        _handles.magic = handle
    return handle
