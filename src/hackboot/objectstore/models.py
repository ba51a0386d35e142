"""Object storage tables: S3 credentials, buckets, object versions, multipart uploads, blobs.

Design notes
- Every object version (and delete marker) is one row of `s3_objects`. The current version of a
  key has `is_latest = true`; a partial unique index on (bucket_id, key) WHERE is_latest makes
  "one current version per key" a database invariant and serves listings in key order
  (ListObjects on a 100,000-key bucket is an index range scan, O(page)).
- Object keys are never file names. Data lives either inline in the row (small objects: one
  transaction makes them durable) or in blobs named by generated ids (`segments`, a list of
  [blob_id, size] pairs: a multipart object is its parts' blobs, never re-copied).
- Blobs are reference counted (`s3_blobs.refs`): CopyObject / UploadPartCopy share them. A blob
  whose count drops to zero is marked dead in the same transaction and its data removed after
  commit (again by a worker if the process died in between).
- Keys sort in UTF-8 byte order as S3 requires: SQLite's BINARY collation does so, PostgreSQL
  needs the "C" collation (set below).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text, true
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

KeyType = String(1024).with_variant(String(1024, collation="C"), "postgresql")
BigId = BigInteger().with_variant(Integer, "sqlite")


class S3Credential(Base):
    __tablename__ = "s3_credentials"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63), default="")
    access_key: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sealed: Mapped[str] = mapped_column(Text)
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    # None: every bucket of the project (and others' buckets that grant the project); else only these names
    buckets: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class S3ProjectSettings(Base):
    __tablename__ = "s3_project_settings"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    block_public_access: Mapped[bool] = mapped_column(Boolean, default=True)


class Bucket(Base):
    __tablename__ = "s3_buckets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    region: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    versioning: Mapped[str] = mapped_column(String(16), default="")  # "" | Enabled | Suspended
    object_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    # {"mode": "GOVERNANCE"|"COMPLIANCE", "days": n} or {"mode":..., "years": n}
    lock_default: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    acl: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True)  # extra grants
    policy: Mapped[str | None] = mapped_column(Text, nullable=True)
    cors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    lifecycle: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    encryption: Mapped[str | None] = mapped_column(String(16), nullable=True)  # default SSE: "AES256"
    tags: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    public_access_block: Mapped[dict[str, bool] | None] = mapped_column(JSON, nullable=True)
    # S3 Object Ownership: BucketOwnerEnforced | BucketOwnerPreferred | ObjectWriter; None: never set
    object_ownership: Mapped[str | None] = mapped_column(String(24), nullable=True)


class ObjectVersion(Base):
    __tablename__ = "s3_objects"
    __table_args__ = (
        Index("ix_s3_objects_versions", "bucket_id", "key", "id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bucket_id: Mapped[str] = mapped_column(ForeignKey("s3_buckets.id"))
    key: Mapped[str] = mapped_column(KeyType)
    version_id: Mapped[str] = mapped_column(String(40))  # "null" for the null version
    is_latest: Mapped[bool] = mapped_column(Boolean, default=True)
    delete_marker: Mapped[bool] = mapped_column(Boolean, default=False)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    etag: Mapped[str] = mapped_column(String(80), default="")
    last_modified: Mapped[dt.datetime] = mapped_column(default=utcnow)
    storage_class: Mapped[str] = mapped_column(String(24), default="STANDARD")
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)  # content-type & co
    user_meta: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    data: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # inline small objects
    segments: Mapped[list[list[Any]] | None] = mapped_column(JSON, nullable=True)  # [[blob_id, size, part#]]
    parts_count: Mapped[int] = mapped_column(Integer, default=0)
    checksum: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)  # {"CRC32": b64, "type": ...}
    sse: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    lock_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    lock_until: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    tags: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    acl: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True)
    # the project owning this version when not the bucket's (a writer, under ObjectWriter ownership)
    owner: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # when the version became noncurrent (lifecycle NoncurrentDays counts from there)
    noncurrent_since: Mapped[dt.datetime | None] = mapped_column(nullable=True)


Index("ix_s3_objects_latest", ObjectVersion.bucket_id, ObjectVersion.key, unique=True,
      sqlite_where=ObjectVersion.is_latest == true(), postgresql_where=ObjectVersion.is_latest == true())


class Upload(Base):
    __tablename__ = "s3_uploads"
    __table_args__ = (Index("ix_s3_uploads_bucket_key", "bucket_id", "key", "id"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_id: Mapped[str] = mapped_column(ForeignKey("s3_buckets.id"))
    key: Mapped[str] = mapped_column(KeyType)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    storage_class: Mapped[str] = mapped_column(String(24), default="STANDARD")
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    user_meta: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    sse: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    checksum_algorithm: Mapped[str | None] = mapped_column(String(16), nullable=True)
    checksum_type: Mapped[str | None] = mapped_column(String(16), nullable=True)  # COMPOSITE | FULL_OBJECT
    tags: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    acl: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True)
    lock_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    lock_until: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    initiator: Mapped[str] = mapped_column(String(40), default="")
    owner: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the completed object's owner


class Part(Base):
    __tablename__ = "s3_parts"
    upload_id: Mapped[str] = mapped_column(ForeignKey("s3_uploads.id", ondelete="CASCADE"), primary_key=True)
    part_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    etag: Mapped[str] = mapped_column(String(80))
    blob_id: Mapped[str] = mapped_column(String(40))
    checksum: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    last_modified: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Blob(Base):
    __tablename__ = "s3_blobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    refs: Mapped[int] = mapped_column(Integer, default=1)
    dead: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
