"""The remote side of backups: a small S3 client (boto3) for one endpoint and one project key.

Objects are the volume's qcow2 layer files, uploaded as they are (multipart, streamed from disk):
a layer of an encrypted volume is LUKS ciphertext, so the object store never sees plaintext.
"""

from __future__ import annotations

import logging
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
