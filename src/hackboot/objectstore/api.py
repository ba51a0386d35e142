"""REST management API for object storage: S3 credentials, buckets with usage, public access switch."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import select

from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, encode_cursor, paginate
from hackboot.core.schemas import Body, Name, Out
from hackboot.objectstore import service
from hackboot.objectstore.models import Bucket, S3Credential

router = APIRouter(prefix="/v1", tags=["object storage"])
BucketName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]


class CredentialIn(Body):
    name: Name = "s3"
    read_only: bool = Field(False, description="Only read operations (GET, HEAD, lists)")
    buckets: list[BucketName] | None = Field(None, max_length=100,
                                             description="Limit the key to these buckets (default: all)")


class CredentialOut(Out):
    id: str
    project_id: str
    user_id: str
    name: str
    access_key: str
    read_only: bool
    buckets: list[str] | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class IssuedCredentialOut(CredentialOut):
    secret_key: str = Field(description="Shown once: store it now")


class BucketOut(Out):
    id: str
    name: str
    project_id: str
    region: str
    versioning: str
    object_lock: bool
    created_at: dt.datetime
    objects: int = 0
    bytes: int = 0
    bytes_by_storage_class: dict[str, int] = Field(default_factory=dict)


class PublicAccessIn(Body):
    block_public_access: bool


class PublicAccessOut(Out):
    project_id: str
    block_public_access: bool


@router.post("/s3/credentials", status_code=201, response_model=IssuedCredentialOut)
def create_credential(body: CredentialIn, p: Member) -> IssuedCredentialOut:
    """Issue an S3 access key / secret key bound to the caller's project (the secret is shown once)."""
    issued = service.create_credential(p.project, p.user_id, name=body.name, read_only=body.read_only,
                                       buckets=body.buckets)
    return IssuedCredentialOut(**CredentialOut.model_validate(issued.credential).model_dump(),
                               secret_key=issued.secret_key)


@router.get("/s3/credentials", response_model=Page[CredentialOut])
def list_credentials(p: Viewer, page: Pagination) -> Page[CredentialOut]:
    with session_scope(write=False) as s:
        stmt = select(S3Credential).where(S3Credential.project_id == p.project, S3Credential.revoked_at.is_(None))
        rows, nxt = paginate(s, stmt, S3Credential.id, page)
        return Page[CredentialOut](items=[CredentialOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.delete("/s3/credentials/{credential_id}", response_model=CredentialOut)
def revoke_credential(credential_id: str, p: Member) -> CredentialOut:
    """Revoke by id or access key; takes effect immediately."""
    return CredentialOut.model_validate(service.revoke_credential(p, credential_id))


@router.get("/s3/public-access-block", response_model=PublicAccessOut)
def get_public_access(p: Viewer) -> PublicAccessOut:
    return PublicAccessOut(project_id=p.project, block_public_access=service.get_block_public_access(p.project))


@router.put("/s3/public-access-block", response_model=PublicAccessOut)
def set_public_access(body: PublicAccessIn, p: Member) -> PublicAccessOut:
    """The project's switch: when on (the default), public ACLs and policies are refused and ignored."""
    if not p.has_role("admin"):
        from hackboot.core import errors

        raise errors.Forbidden("Only project admins may change the public access block")
    service.set_block_public_access(p.project, body.block_public_access)
    return PublicAccessOut(project_id=p.project, block_public_access=body.block_public_access)


def _bucket_out(b: Bucket, usage: service.BucketUsage) -> BucketOut:
    out = BucketOut.model_validate(b)
    out.objects = usage.objects
    out.bytes = usage.bytes
    out.bytes_by_storage_class = dict(usage.by_class)
    return out


@router.get("/buckets", response_model=Page[BucketOut])
def list_buckets(p: Viewer, page: Pagination,
                 name: Annotated[str | None, Query(max_length=63)] = None) -> Page[BucketOut]:
    """The project's buckets with their usage (objects, bytes, bytes per storage class)."""
    with session_scope(write=False) as s:
        stmt = select(Bucket).where(Bucket.project_id == p.project)
        if name:
            stmt = stmt.where(Bucket.name == name)
        rows, nxt = paginate(s, stmt, Bucket.id, page)
        usage = service.bucket_usage(s, rows)
        return Page[BucketOut](items=[_bucket_out(b, usage[b.id]) for b in rows], next_cursor=nxt)


@router.get("/buckets/{name}", response_model=BucketOut)
def get_bucket(name: str, p: Viewer) -> BucketOut:
    with session_scope(write=False) as s:
        b = service.get_bucket(s, p, name)
        return _bucket_out(b, service.bucket_usage(s, [b])[b.id])


__all__ = ["encode_cursor", "router"]
