"""The remote side of backups: a small S3 client (boto3) for one endpoint and one project key.

Objects are the volume's qcow2 layer files, uploaded as they are (multipart, streamed from disk):
a layer of an encrypted volume is LUKS ciphertext, so the object store never sees plaintext.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("hackboot.volumes.backups")
PART = 64 * 1024 * 1024


class S3:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str = "PAR1") -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.client: Any = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            region_name=region, config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5},
                                              signature_version="s3v4"))
        self.transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4,
                                       use_threads=True)

    def ensure_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
        try:
            self.client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
                raise

    def upload(self, bucket: str, key: str, path: Path, meta: dict[str, str] | None = None) -> None:
        self.client.upload_file(str(path), bucket, key, Config=self.transfer,
                                ExtraArgs={"Metadata": meta or {}, "ContentType": "application/x-qemu-disk"})

    def download(self, bucket: str, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(bucket, key, str(path), Config=self.transfer)

    def delete(self, bucket: str, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                              "Quiet": True})


class BackupTampered(Exception):
    """An object in the bucket is not what the backup recorded (its size or SHA-256 differ)."""


def download_verified(s3: S3, bucket: str, key: str, path: Path, *, sha256: str, size: int) -> None:
    """Download one object into a new private file (0600), checking it against what the backup recorded.

    The bucket is the tenant's to write: whatever comes back is proven to be the bytes uploaded at backup
    time (size, then SHA-256 over the whole stream) before anything else looks at it. Any mismatch
    removes the file and raises BackupTampered.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            resp = s3.client.get_object(Bucket=bucket, Key=key)
            if int(resp.get("ContentLength", -1)) != size:
                raise BackupTampered(f"object {key} has {resp.get('ContentLength')} bytes, the backup recorded "
                                     f"{size}")
            digest, received = hashlib.sha256(), 0
            for chunk in resp["Body"].iter_chunks(4 * 1024 * 1024):
                received += len(chunk)
                if received > size:
                    raise BackupTampered(f"object {key} is larger than the backup recorded ({size} bytes)")
                digest.update(chunk)
                f.write(chunk)
            if received != size or not hmac.compare_digest(digest.hexdigest(), sha256.lower()):
                raise BackupTampered(f"object {key} does not match the SHA-256 recorded when the backup was made")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
