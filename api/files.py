"""The `/v1` routes of files in and artifacts out: upload, read back, download.

An upload streams the request body into the file store while hashing it
(`BlobUpload`): at most RUNNER_FILE_MAX_BYTES, refused at once when the
Content-Length says more, cut off with 413 (and nothing kept) when a body without one
grows past it. The same bytes from the same tenant are one file (200 the second time);
another tenant's file id is 404, even when the hash is right.
"""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, submitter, viewer
from api.deps import Services, run_or_404, services
from api.downloads import byte_range, stored_response
from api.schemas import ArtifactList, ArtifactOut, ErrorOut, FileOut
from runner.control.blobs import BlobUpload
from runner.control.mediatype import normalise
from runner.domain import Run
from runner.errors import InvalidRequestError, PayloadTooLargeError

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1", responses={
    401: {"model": ErrorOut, "description": "Missing, unknown or revoked API key"},
    404: {"model": ErrorOut, "description": "No such file, run or artifact (for this tenant)"},
})

UPLOAD_WRITE_BYTES = 1024 * 1024  # body chunks are gathered to this before each write
BINARY = {"type": "string", "format": "binary"}
RANGE_DOC = "One byte range (`bytes=a-b`, `a-`, `-n`): answered 206 with that part"


def _file_out(info: dict[str, object]) -> FileOut:
    return FileOut.model_validate(info)


@router.post("/files", status_code=201, response_model=FileOut, tags=["files"], responses={
    200: {"model": FileOut, "description": "This tenant already had these bytes"},
    413: {"model": ErrorOut, "description": "Over RUNNER_FILE_MAX_BYTES; nothing kept"},
    422: {"model": ErrorOut, "description": "Invalid name"},
}, openapi_extra={"requestBody": {"required": False, "content": {
    "*/*": {"schema": {"type": "string", "format": "binary"}}},
    "description": "The file's bytes (an empty body is an empty file)"}})
async def upload_file(request: Request, who: Annotated[Principal, Depends(submitter)],
                      svc: Annotated[Services, Depends(services)],
                      name: Annotated[str | None, Query(
                          max_length=255, description="The file's own name, kept as "
                                                      "metadata")] = None,
                      content_type: Annotated[str | None, Header(max_length=255)] = None,
                      ) -> JSONResponse:
    """Store a file: the raw bytes are the body, `Content-Type` its media type (the
    stored one is sniffed from the bytes, the header kept beside it)."""
    if name is not None and (not name or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise InvalidRequestError("name: a control character is not allowed", field="name")
    cap = svc.settings.file_max_bytes
    metrics = request.app.state.metrics
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        metrics.uploads.labels("too_large").inc()
        raise PayloadTooLargeError(f"the file is {length} bytes, over the {cap} byte cap "
                                   "(RUNNER_FILE_MAX_BYTES)", cap=cap)
    upload = BlobUpload(svc.files.blobs, cap)
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= UPLOAD_WRITE_BYTES:
                await run_in_threadpool(upload.write, bytes(pending))
                pending.clear()
        if pending:
            await run_in_threadpool(upload.write, bytes(pending))
        uploaded = await run_in_threadpool(upload.finish, who.tenant)
    except PayloadTooLargeError:
        metrics.uploads.labels("too_large").inc()
        raise
    except BaseException:  # the client went away, or the store failed: nothing kept
        await run_in_threadpool(upload.abort)
        metrics.uploads.labels("aborted").inc()
        raise
    info, created = await run_in_threadpool(svc.files.record, who.tenant, uploaded,
                                            declared=normalise(content_type), name=name)
    metrics.uploads.labels("created" if created else "existing").inc()
    metrics.uploaded_bytes.inc(uploaded.size)
    log.info("file_uploaded", file_id=info.id, size=info.size, media_type=info.media_type,
             created=created, tenant=who.tenant)
    return JSONResponse(_file_out(info.public()).model_dump(mode="json"),
                        status_code=201 if created else 200)


FileIdPath = Annotated[str, Path(max_length=80, description="sha256:<64 hex>")]


@router.get("/files/{file_id}", response_model=FileOut, tags=["files"])
def get_file(file_id: FileIdPath, who: Annotated[Principal, Depends(viewer)],
             svc: Annotated[Services, Depends(services)]) -> FileOut:
    """A file's size, media types, name and upload time."""
    return _file_out(svc.files.get(who.tenant, file_id).public())


@router.get("/files/{file_id}/content", response_class=StreamingResponse, tags=["files"],
            responses={200: {"content": {"*/*": {"schema": BINARY}},
                             "description": "The file's bytes, with its sniffed media type"},
                       206: {"content": {"*/*": {"schema": BINARY}},
                             "description": "The part asked for by Range"},
                       416: {"model": ErrorOut, "description": "Range outside the file"}})
def get_file_content(file_id: FileIdPath, who: Annotated[Principal, Depends(viewer)],
                     svc: Annotated[Services, Depends(services)],
                     range_: Annotated[str | None, Header(alias="Range", max_length=200,
                                                          description=RANGE_DOC)] = None,
                     ) -> StreamingResponse:
    """The file's bytes, as an attachment."""
    info = svc.files.get(who.tenant, file_id)
    part = byte_range(range_, info.size)
    start, end = part or (0, info.size)
    read = svc.files.content(who.tenant, info.sha256, start=start, end=end) if end > start \
        else None
    return stored_response(read, size=info.size, media_type=info.media_type,
                           filename=info.name or info.sha256, part=part, sha256=info.sha256)


AttemptQuery = Annotated[int | None, Query(ge=0, le=10_000, description=(
    "Which attempt's artifacts; the run's last attempt by default"))]


@router.get("/runs/{run_id}/artifacts", response_model=ArtifactList, tags=["runs"])
def list_artifacts(run_id: str, who: Annotated[Principal, Depends(viewer)],
                   svc: Annotated[Services, Depends(services)],
                   attempt: AttemptQuery = None) -> ArtifactList:
    """What an attempt left under /run/out (the last attempt's by default)."""
    run = run_or_404(svc, run_id, who.tenant)
    number = run.attempt if attempt is None else attempt
    return ArtifactList(attempt=number, items=[
        ArtifactOut(**a.public()) for a in svc.files.artifacts(run.id, number)])


@router.get("/runs/{run_id}/artifacts/{name:path}", response_class=StreamingResponse,
            tags=["runs"],
            responses={200: {"content": {"*/*": {"schema": BINARY}},
                             "description": "The artifact's bytes, with its sniffed media "
                                            "type"},
                       206: {"content": {"*/*": {"schema": BINARY}},
                             "description": "The part asked for by Range"},
                       416: {"model": ErrorOut, "description": "Range outside the artifact"}})
def get_artifact(run_id: str, name: Annotated[str, Path(max_length=1024)],
                 who: Annotated[Principal, Depends(viewer)],
                 svc: Annotated[Services, Depends(services)],
                 attempt: AttemptQuery = None,
                 range_: Annotated[str | None, Header(alias="Range", max_length=200,
                                                      description=RANGE_DOC)] = None,
                 ) -> StreamingResponse:
    """One artifact's bytes, as an attachment with its sniffed media type."""
    return artifact_response(svc, run_or_404(svc, run_id, who.tenant), name,
                             attempt=attempt, range_header=range_)


def artifact_response(svc: Services, run: Run, name: str, *, attempt: int | None,
                      range_header: str | None) -> StreamingResponse:
    """The artifact `name` of an attempt of `run` (the last one by default), streamed
    with the attachment headers; the API's route and the dashboard's download share it.

    Raises:
        NotFoundError: the attempt left no such artifact.
        RangeNotSatisfiableError: the range is outside it.
    """
    found = svc.files.artifact(run.id, run.attempt if attempt is None else attempt, name)
    part = byte_range(range_header, found.size)
    start, end = part or (0, found.size)
    read = (svc.files.content(run.tenant, found.sha256, start=start, end=end)
            if end > start else None)
    return stored_response(read, size=found.size, media_type=found.media_type,
                           filename=found.name, part=part, sha256=found.sha256)
