"""HTTP for images: metadata, streamed upload and download of the file, sharing, deletion."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema
from starlette.requests import ClientDisconnect

from hackboot.core import errors
from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Name, Out, omitted
from hackboot.images import service
from hackboot.images.models import Image

router = APIRouter(prefix="/v1", tags=["images"])

DiskFormat = Literal["qcow2", "raw"]
Visibility = Literal["private", "public"]
Status = Literal["queued", "saving", "active", "error"]
Source = Literal["upload", "builtin", "snapshot"]
Label = Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]*$", max_length=63)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
FLUSH_BYTES = 1024 * 1024  # body chunks are gathered up to this size before each write to disk
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


class UnsupportedMediaType(errors.ApiError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class ImageIn(Body):
    name: Name
    disk_format: DiskFormat = "qcow2"
    visibility: Visibility = Field("private", description="'public' (every project sees it) needs a superuser")
    os: Label = ""
    os_version: Label = ""
    min_disk_gb: int = Field(0, ge=0, le=65536)
    min_ram_mb: int = Field(0, ge=0, le=16 * 1024 * 1024)
    protected: bool = Field(False, description="A protected image cannot be deleted")


class ImageUpdate(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    visibility: Visibility | SkipJsonSchema[None] = omitted()
    protected: bool | SkipJsonSchema[None] = omitted()
    os: Label | SkipJsonSchema[None] = omitted()
    os_version: Label | SkipJsonSchema[None] = omitted()
    min_disk_gb: Annotated[int, Field(ge=0, le=65536)] | SkipJsonSchema[None] = omitted()
    min_ram_mb: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] | SkipJsonSchema[None] = omitted()


class ImageOut(Out):
    id: str
    project_id: str | None = Field(description="None for the platform's built-in images")
    name: str
    status: str
    status_reason: str
    visibility: str
    disk_format: str
    os: str
    os_version: str
    min_disk_gb: int
    min_ram_mb: int
    size_bytes: int | None
    virtual_size_bytes: int | None
    sha256: str | None
    direct_kernel_boot: bool = Field(description="Boots with its own kernel and initrd (built-in images)")
    cmdline: str | None
    source: str
    source_instance_id: str | None
    protected: bool
    created_at: dt.datetime
    updated_at: dt.datetime


@router.post("/images", status_code=201, response_model=ImageOut)
def create_image(body: ImageIn, p: Member, response: Response) -> ImageOut:
    """Register an image (status `queued`); then send its file with `PUT /v1/images/{id}/file`."""
    img = service.create_image(p, **body.model_dump())
    response.headers["Location"] = f"/v1/images/{img.id}"
    return ImageOut.model_validate(img)


@router.get("/images", response_model=Page[ImageOut])
def list_images(p: Viewer, page: Pagination,
                name: Annotated[Name | None, Query()] = None,
                status: Annotated[Status | None, Query()] = None,
                visibility: Annotated[Visibility | None, Query()] = None,
                os: Annotated[Label | None, Query()] = None,
                disk_format: Annotated[DiskFormat | None, Query()] = None,
                source: Annotated[Source | None, Query()] = None) -> Page[ImageOut]:
    """The project's own images and every public image."""
    with session_scope(write=False) as s:
        stmt = service.visible_query(p.project)
        for column, value in ((Image.name, name), (Image.status, status), (Image.visibility, visibility),
                              (Image.os, os), (Image.disk_format, disk_format), (Image.source, source)):
            if value is not None:
                stmt = stmt.where(column == value)
        rows, nxt = paginate(s, stmt, Image.id, page)
        return Page[ImageOut](items=[ImageOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/images/{image_id}", response_model=ImageOut)
def get_image(image_id: str, p: Viewer) -> ImageOut:
    with session_scope(write=False) as s:
        return ImageOut.model_validate(service.get_image(s, p, image_id))


@router.patch("/images/{image_id}", response_model=ImageOut)
def update_image(image_id: str, body: ImageUpdate, p: Member) -> ImageOut:
    """Rename, share (`public`: superusers only), protect, or change the OS and minimum sizes."""
    changes = body.model_dump(exclude_unset=True)
    nulls = sorted(k for k, v in changes.items() if v is None)
    if nulls:
        raise errors.ValidationFailed(f"These fields cannot be null: {', '.join(nulls)}",
                                      errors=[{"loc": ["body", k], "msg": "may not be null"} for k in nulls])
    return ImageOut.model_validate(service.update_image(p, image_id, changes))


@router.delete("/images/{image_id}", status_code=204)
def delete_image(image_id: str, p: Member) -> Response:
    """Delete an image; 409 while it is protected, being written, or used by instances."""
    service.delete_image(p, image_id)
    return Response(status_code=204)


@router.put(
    "/images/{image_id}/file", response_model=ImageOut,
    openapi_extra={"requestBody": {"required": True, "content": _BINARY}},
    responses={415: {"description": "The body must be application/octet-stream", "content": _PROBLEM},
               507: {"description": "The image store is full", "content": _PROBLEM}},
)
async def upload_image_file(
    image_id: str, request: Request, p: Member,
    x_image_sha256: Annotated[Sha256 | None, Header(description="sha256 of the file, checked on arrival")] = None,
) -> ImageOut:
    """Stream the image file (`application/octet-stream`), never held in memory.

    The file is hashed as it arrives, checked with `qemu-img` (the declared format, no backing file
    nor external data file, no corruption) and published: the image becomes `active`. A refused
    file leaves the image in `error` (or back in `queued` for a checksum mismatch or a broken
    transfer) with the reason in `status_reason`; nothing of it is kept. A failed upload may be
    retried.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/octet-stream":
        raise UnsupportedMediaType("Send the image file as 'Content-Type: application/octet-stream'")
    length = request.headers.get("content-length", "")
    upload = await anyio.to_thread.run_sync(service.begin_upload, p, image_id,
                                            int(length) if length.isdigit() else None)
    try:
        buffer = bytearray()
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= FLUSH_BYTES:
                data, buffer = bytes(buffer), bytearray()
                await anyio.to_thread.run_sync(upload.write, data)
        if buffer:
            await anyio.to_thread.run_sync(upload.write, bytes(buffer))
        image = await anyio.to_thread.run_sync(upload.finish, x_image_sha256)
    except ClientDisconnect:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(upload.abort, "The client went away before sending the whole file")
        raise errors.BadRequest("The client disconnected during the upload", code="upload_incomplete") from None
    except BaseException as exc:
        reason = exc.detail if isinstance(exc, errors.ApiError) else "The upload failed on the server"
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(upload.abort, reason)
        raise
    return ImageOut.model_validate(image)


@router.get(
    "/images/{image_id}/file", response_class=FileResponse,
    responses={200: {"description": "The image file, streamed", "content": _BINARY}},
)
def download_image_file(image_id: str, p: Viewer) -> FileResponse:
    """Download an `active` image's file (its sha256 in `X-Image-Sha256`); supports `Range`."""
    with session_scope(write=False) as s:
        img = service.get_image(s, p, image_id)
        if img.status != "active":
            raise errors.Conflict(f"Image {image_id} has no file yet (status {img.status})", code="image_not_active")
        path = service.image_file(img)
        headers: dict[str, Any] = {"X-Image-Sha256": img.sha256 or ""}
        filename = f"{img.name}.{img.disk_format}"
    if not path.is_file():
        raise errors.Unavailable(f"The file of image {image_id} is missing on this server")
    return FileResponse(path, media_type="application/octet-stream", filename=filename, headers=headers)
