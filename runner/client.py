"""A small Python client for the HTTP API, used by the CLI and the tests.

Batches go up a chunk at a time (`submit_many`): an iterator of any length is read one
chunk ahead, and a chunk refused whole with 429 is sent again after its Retry-After.

Files go up and artifacts come down as streams: an upload is read from disk in
chunks with its Content-Length declared, a download is written to a temporary file
beside its destination and renamed into place only once it is whole (and its SHA-256
matches, when known), so a broken transfer never leaves a half file under the name.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from itertools import islice
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any
from urllib.parse import quote

import httpx

from runner.errors import RunnerError

LONG_POLL_SECONDS = 30.0
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "dead_letter"}
CHUNK_BYTES = 1024 * 1024
# After the last byte of an upload the server still hashes, sniffs and records it.
TRANSFER_TIMEOUT = httpx.Timeout(30, read=300)
DEFAULT_MEDIA_TYPE = "application/octet-stream"
BATCH_MAX_ITEMS = 1000  # the contract's cap on one POST /v1/runs/batch
RETRY_AFTER_MAX_SECONDS = 60.0  # the longest one wait on a 429's Retry-After

# Called as a transfer goes: (bytes done so far, total bytes or None when unknown).
Progress = Callable[[int, int | None], None]


def guess_media_type(name: str | None) -> str:
    """The media type a file name suggests (the server sniffs the bytes anyway)."""
    guessed = mimetypes.guess_type(name, strict=False)[0] if name else None
    return guessed or DEFAULT_MEDIA_TYPE


def artifact_target(dest_dir: str | os.PathLike[str], name: str) -> Path:
    """Where artifact `name` lands under `dest_dir`, its "/" kept as subdirectories.

    Raises:
        RunnerError: the name is empty, absolute, has an empty, "." or ".." part or a
            NUL, or would land outside `dest_dir` (through a symlink in it, say).
    """
    parts = name.split("/")
    if (not name or name.startswith("/") or "\x00" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise RunnerError(f"refusing artifact name {name!r}: not a relative path inside "
                          "the destination")
    root = Path(dest_dir)
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise RunnerError(f"refusing artifact name {name!r}: it would land outside {root}")
    return target


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`items` in lists of `size` (the last may be shorter), read one list at a time."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class ApiError(RunnerError):
    """The API answered with an error."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "",
                 field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})", status=status, code_=code,
                         request_id=request_id, field=field, retry_after=retry_after)
        self.status, self.code, self.field = status, code, field
        self.retry_after = retry_after  # seconds, from a 429's or 503's Retry-After


class BatchInterruptedError(RunnerError):
    """A batch stopped part way; the items before the chunk that failed were answered."""

    def __init__(self, *, results: list[dict[str, Any]], cause: RunnerError) -> None:
        answered = f"{len(results)} item{'' if len(results) == 1 else 's'}"
        super().__init__(f"the batch stopped after {answered}: {cause.message}",
                         results=results, cause=cause)
        self.results, self.cause = results, cause


class RunnerClient:
    """`RunnerClient(url, api_key)`: submit runs, read them, follow their logs; upload
    files for runs and download their artifacts."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"},
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RunnerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, error["code"], error["message"],
                               error.get("request_id", ""), error.get("field"),
                               _seconds(response.headers.get("Retry-After")))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:200]) from None
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._check(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise RunnerError(f"cannot reach the API at {self._http.base_url}: {exc}") from exc

    def submit(self, processor: str, input: dict[str, Any] | None = None, *,
               version: str | None = None, timeout_seconds: int | None = None,
               labels: dict[str, str] | None = None,
               idempotency_key: str | None = None,
               files: dict[str, str] | None = None,
               reuse: bool | dict[str, Any] | None = None,
               webhook_url: str | None = None,
               priority: str | None = None) -> dict[str, Any]:
        """Submit a run. `files` maps a name under /run/in to an uploaded file's id;
        `reuse` (True, or `{"max_age": "1h"}`) lets an earlier succeeded run of the
        same image, input and files stand in for this one (`reused_from` says which);
        `webhook_url` is POSTed the run when it ends (under the operator's prefixes);
        `priority` ("high", "normal", "low") orders it among its tenant's queued runs."""
        body: dict[str, Any] = {"processor": processor, "input": input or {}}
        if version is not None:
            body["version"] = version
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        if labels:
            body["labels"] = labels
        if files:
            body["files"] = files
        if reuse is not None and reuse is not False:
            body["reuse"] = reuse
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        if priority is not None:
            body["priority"] = priority
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        run: dict[str, Any] = self._request("POST", "/v1/runs", json=body,
                                            headers=headers).json()
        return run

    def submit_many(self, items: Iterable[dict[str, Any]], *, chunk_size: int = 500,
                    on_progress: Progress | None = None, total: int | None = None,
                    patience: float = 300.0) -> list[dict[str, Any]]:
        """Submit runs through POST /v1/runs/batch, `chunk_size` (at most 1000) a request:
        one entry per item, in order, the run object or `{"error": {"code", "message",
        "field"}}`. An item is the body of submit, plus "idempotency_key" if wanted.

        `items` is read a chunk at a time, so an iterator of any length is fine. A chunk
        refused whole with 429 accepted nothing: it is sent again after its Retry-After
        (each wait at most 60 s, all at most `patience` s). One whose answer is lost is
        not, and no key is made up here: give each item an idempotency key, so that
        sending the batch again after a failure returns the runs made, never doubles
        them. A chunk over the server's cap (422 on "runs") is sent in halves.
        `on_progress(done, total)` follows each request; `total` defaults to `len(items)`.

        Raises:
            BatchInterruptedError: a chunk failed otherwise; its `results` are the
                entries of the items before that chunk, its `cause` the failure.
        """
        if not 1 <= chunk_size <= BATCH_MAX_ITEMS:
            raise ValueError(f"chunk_size must be 1 to {BATCH_MAX_ITEMS}, got {chunk_size}")
        if total is None and isinstance(items, Sized):
            total = len(items)
        results: list[dict[str, Any]] = []
        size, waited = chunk_size, 0.0
        for chunk in chunked(items, chunk_size):
            sent = 0
            while sent < len(chunk):
                part = chunk[sent:sent + size]
                try:
                    results.extend(self._post_batch(part))
                except ApiError as exc:
                    if exc.status == 422 and exc.field == "runs" and len(part) > 1:
                        size = (len(part) + 1) // 2
                        continue
                    pause = min(exc.retry_after or 1.0, RETRY_AFTER_MAX_SECONDS)
                    if exc.status != 429 or waited + pause > patience:
                        raise BatchInterruptedError(results=results, cause=exc) from exc
                    time.sleep(pause)
                    waited += pause
                    continue
                except RunnerError as exc:
                    raise BatchInterruptedError(results=results, cause=exc) from exc
                sent += len(part)
                if on_progress is not None:
                    on_progress(len(results), total)
        return results

    def _post_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = self._request("POST", "/v1/runs/batch", json={"runs": items})
        try:
            entries: list[dict[str, Any]] = response.json()["items"]
            if len(entries) == len(items):
                return entries
        except (ValueError, KeyError, TypeError):
            pass
        raise RunnerError(f"the API's answer to a batch of {len(items)} is not "
                          f"{len(items)} items: {response.text[:200]}")

    def run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("GET", f"/v1/runs/{run_id}").json()
        return run

    def runs(self, **filters: Any) -> dict[str, Any]:
        """A page of runs. Items carry `input` and `result` only when asked for:
        `include=["input", "result"]` (or `"input,result"`), each up to the server's
        cap; `omitted` in an item names what was left out (`run(id)` has it whole)."""
        params = {k: v for k, v in filters.items() if v is not None}
        if isinstance(params.get("include"), list | tuple | set | frozenset):
            params["include"] = ",".join(params["include"])
        page: dict[str, Any] = self._request("GET", "/v1/runs", params=params).json()
        return page

    def cancel(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("POST", f"/v1/runs/{run_id}/cancel").json()
        return run

    def replay(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("POST", f"/v1/runs/{run_id}/replay").json()
        return run

    def processors(self) -> dict[str, Any]:
        found: dict[str, Any] = self._request("GET", "/v1/processors").json()
        return found

    # Files in, artifacts out --------------------------------------------------

    def upload_file(self, source: str | os.PathLike[str] | IO[bytes], *,
                    name: str | None = None, media_type: str | None = None,
                    size: int | None = None, progress: Progress | None = None
                    ) -> dict[str, Any]:
        """Upload a file (a path, or a binary stream) for runs; the file object.

        Streamed in chunks with its Content-Length declared, never read whole. `name`
        defaults to a path's base name, `media_type` to what the name suggests. A
        stream needs `size` unless it can seek.

        Raises:
            ApiError: refused (413 `file_too_large` over the server's cap).
            RunnerError: the file cannot be read, or changed size while being sent.
        """
        with contextlib.ExitStack() as stack:
            known: int | None
            if isinstance(source, str | os.PathLike):
                path = Path(source)
                try:
                    stream: IO[bytes] = stack.enter_context(path.open("rb"))
                    stat = os.fstat(stream.fileno())
                except OSError as exc:
                    raise RunnerError(f"cannot read {path}: {exc.strerror or exc}") from exc
                if not S_ISREG(stat.st_mode):
                    raise RunnerError(f"cannot upload {path}: not a regular file")
                known = stat.st_size
                name = path.name if name is None else name
            else:
                stream, known = source, _remaining(source)
            total = size if size is not None else known
            if total is None:
                raise RunnerError("upload_file: pass size= for a stream that cannot seek")
            params = {"name": name} if name else {}
            headers = {"Content-Type": media_type or guess_media_type(name),
                       "Content-Length": str(total)}
            response = self._request("POST", "/v1/files", params=params, headers=headers,
                                     content=_chunks(stream, total, progress),
                                     timeout=TRANSFER_TIMEOUT)
        found: dict[str, Any] = response.json()
        return found

    def get_file(self, file_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._request("GET", f"/v1/files/{_segment(file_id)}").json()
        return found

    def file_content(self, file_id: str, dest_path: str | os.PathLike[str], *,
                     progress: Progress | None = None) -> Path:
        """Download a file's bytes to `dest_path` (atomically; checked against its
        id, which is their SHA-256); the path written.

        Raises:
            RunnerError: the transfer broke or the bytes do not match the id.
        """
        digest = file_id if file_id.startswith("sha256:") else None
        return self._download(f"/v1/files/{_segment(file_id)}/content", Path(dest_path),
                              params={}, sha256=digest, progress=progress)

    def artifacts(self, run_id: str, attempt: int | None = None) -> dict[str, Any]:
        """`{"attempt": N, "items": [{"name", "size", "sha256", "media_type"}]}`:
        the artifacts of one attempt (by default the last)."""
        params = {"attempt": attempt} if attempt is not None else {}
        found: dict[str, Any] = self._request("GET", f"/v1/runs/{_segment(run_id)}/artifacts",
                                              params=params).json()
        return found

    def download_artifact(self, run_id: str, name: str, dest_dir: str | os.PathLike[str], *,
                          attempt: int | None = None, sha256: str | None = None,
                          progress: Progress | None = None) -> Path:
        """Download artifact `name` to `dest_dir/name`, creating its subdirectories;
        the path written. Atomic; checked against `sha256` when given.

        Raises:
            RunnerError: the name would escape `dest_dir` (absolute, "..": nothing is
                requested then), the transfer broke or the bytes do not match.
        """
        target = artifact_target(dest_dir, name)
        params = {"attempt": attempt} if attempt is not None else {}
        path = f"/v1/runs/{_segment(run_id)}/artifacts/{quote(name, safe='/')}"
        return self._download(path, target, params=params, sha256=sha256, progress=progress)

    def _download(self, path: str, target: Path, *, params: dict[str, Any],
                  sha256: str | None, progress: Progress | None) -> Path:
        expected = sha256.lower().removeprefix("sha256:") if sha256 else None
        # Beside the target (so the rename is atomic), mode 0666 less the umask.
        partial = target.with_name(f".{target.name[:200]}.{secrets.token_hex(4)}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise RunnerError(f"cannot write {target}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as handle, self._http.stream(
                    "GET", path, params=params, timeout=TRANSFER_TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                length = response.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None
                hasher, done = hashlib.sha256(), 0
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    handle.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            if expected is not None and hasher.hexdigest() != expected:
                raise RunnerError(f"{path}: the bytes received do not match "
                                  f"sha256:{expected}")
            os.replace(partial, target)
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if isinstance(exc, httpx.TransportError):
                raise RunnerError(f"download of {path} broke: {exc}") from exc
            if isinstance(exc, OSError):
                raise RunnerError(f"cannot write {target}: {exc.strerror or exc}") from exc
            raise
        return target

    def logs(self, run_id: str, *, offset: int = 0) -> bytes:
        return self._request("GET", f"/v1/runs/{run_id}/logs",
                             params={"offset": offset}).content

    def follow_logs(self, run_id: str, *, offset: int = 0) -> Iterator[bytes]:
        """Output as it is captured, until the run ends.

        The server ends a follow stream after RUNNER_FOLLOW_MAX_SECONDS; this resumes
        from the last byte received until the run has ended.
        """
        while True:
            try:
                with self._http.stream("GET", f"/v1/runs/{run_id}/logs",
                                       params={"offset": offset, "follow": "true"},
                                       timeout=httpx.Timeout(30, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    for chunk in response.iter_bytes():
                        offset += len(chunk)
                        yield chunk
            except httpx.TransportError as exc:
                raise RunnerError(f"log stream broke: {exc}") from exc
            if self.run(run_id)["status"] in TERMINAL:
                tail = self.logs(run_id, offset=offset)
                if tail:
                    yield tail
                return

    def wait(self, run_id: str, *, timeout: float = 600, poll: float = 0.1) -> dict[str, Any]:
        """Poll until the run ends; its final state.

        Raises:
            RunnerError: the run is not over after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            # A long poll: the server answers as soon as the run ends.
            hold = max(0.0, min(LONG_POLL_SECONDS, deadline - time.monotonic()))
            run: dict[str, Any] = self._request("GET", f"/v1/runs/{run_id}",
                                                params={"wait": f"{hold:.2f}"},
                                                timeout=hold + 30).json()
            if run["status"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise RunnerError(f"run {run_id} still {run['status']} after {timeout:g}s")
            time.sleep(poll)


def _seconds(value: str | None) -> float | None:
    """A Retry-After of delta-seconds as a number; None for none, or a date."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _segment(value: str) -> str:
    """`value` as one URL path segment (an id from a user cannot walk the path)."""
    return quote(value, safe=":")


def _remaining(stream: IO[bytes]) -> int | None:
    """How many bytes a seekable stream has left from where it is; None if it cannot seek."""
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
    except (OSError, ValueError):
        return None
    return end - here


def _chunks(stream: IO[bytes], total: int, progress: Progress | None) -> Iterator[bytes]:
    """Exactly `total` bytes of `stream`, a chunk at a time.

    Raises:
        RunnerError: the stream ends early (a file that shrank while it was sent):
            the server then sees a short body, not a wrong file.
    """
    done = 0
    while done < total:
        try:
            chunk = stream.read(min(CHUNK_BYTES, total - done))
        except OSError as exc:
            raise RunnerError(f"reading the upload failed: {exc.strerror or exc}") from exc
        if not chunk:
            raise RunnerError(f"the upload ended after {done} of {total} bytes "
                              "(did the file shrink while it was sent?)")
        done += len(chunk)
        if progress is not None:
            progress(done, total)
        yield chunk
