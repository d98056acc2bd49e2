"""Serving stored bytes (a file's content, an artifact) to a client: one byte range
at most, always as an attachment, never sniffed or rendered by a browser.

A `Range: bytes=a-b` (or `a-`, or `-n`) header gets a 206 with that part; a range
outside the content a 416 naming the size; several ranges at once, or a header we do
not read, the whole content (a server may always ignore Range). The headers make a
browser save, not show, whatever a processor or a client wrote: `attachment`,
`nosniff` and a `sandbox` content security policy, so even an HTML artifact opened
directly runs no script with the API's origin.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

from fastapi.responses import StreamingResponse

from runner.errors import RangeNotSatisfiableError

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) asked for by a Range header, or None for the whole content.

    Raises:
        RangeNotSatisfiableError: the range starts past the end (416).
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match[1] and not match[2]):
        return None  # several ranges, or another unit: the whole content
    if not match[1]:  # the last n bytes
        suffix = int(match[2])
        if suffix == 0:
            raise RangeNotSatisfiableError("an empty suffix range", size=size)
        return max(0, size - suffix), size
    start = int(match[1])
    end = min(int(match[2]) + 1, size) if match[2] else size
    if start >= size or end <= start:
        raise RangeNotSatisfiableError(f"range {header.strip()[:60]} is outside the "
                                       f"{size} bytes", size=size)
    return start, end


def _ascii_name(name: str) -> str:
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9._-]", "_", plain).strip("._") or "download"


def disposition(filename: str) -> str:
    """An `attachment` Content-Disposition naming the file (ASCII fallback, and the
    UTF-8 name for clients that read it)."""
    base = filename.rsplit("/", 1)[-1] or "download"
    return (f'attachment; filename="{_ascii_name(base)}"; '
            f"filename*=UTF-8''{urllib.parse.quote(base, safe='')}")


def stored_response(read: Iterator[bytes] | None, *, size: int, media_type: str,
                    filename: str, part: tuple[int, int] | None, sha256: str) -> StreamingResponse:
    """The response streaming `read` (bytes [start, end) of `part`, or all `size`)."""
    headers = {"Content-Disposition": disposition(filename), "Accept-Ranges": "bytes",
               "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "sandbox; default-src 'none'",
               "ETag": f'"{sha256}"', "Cache-Control": "private, max-age=0"}
    status = 200
    length = size
    if part is not None:
        start, end = part
        length = end - start
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        status = 206
    headers["Content-Length"] = str(length)
    return StreamingResponse(read if read is not None else iter(()), status_code=status,
                             media_type=media_type, headers=headers)
