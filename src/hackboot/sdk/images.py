"""SDK: images (create, streamed upload and download, list, update, delete)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from hackboot.sdk.client import ApiError, Client, JSONObject, JSONObjects, Resource, as_object

Progress = Callable[[int, int], None]  # (bytes done, bytes in total)
CHUNK = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"


def guess_format(path: str | os.PathLike[str]) -> str:
    """'qcow2' when the file starts with the qcow2 signature, else 'raw' (the server checks either way)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    resp.read()
    try:
        problem = resp.json()
    except ValueError:
        problem = {"code": "http_error", "detail": resp.text[:500]}
    raise ApiError(resp.status_code, str(problem.get("code", "http_error")),
                   str(problem.get("detail", resp.reason_phrase)), problem)


class Images(Resource):
    path = "/v1/images"

    def create(self, name: str, disk_format: str = "qcow2", *, visibility: str = "private", os: str = "",
               os_version: str = "", min_disk_gb: int = 0, min_ram_mb: int = 0,
               protected: bool = False) -> JSONObject:
        """Register an image (status 'queued'); send its file with `upload`."""
        return as_object(self.c.post(self.path, {
            "name": name, "disk_format": disk_format, "visibility": visibility, "os": os, "os_version": os_version,
            "min_disk_gb": min_disk_gb, "min_ram_mb": min_ram_mb, "protected": protected}))

    def list(self, name: str | None = None, status: str | None = None, visibility: str | None = None,
             os: str | None = None, **filters: Any) -> JSONObjects:
        """The project's images and every public image; filters: name, status, visibility, os, disk_format,
        source."""
        return self._list({"name": name, "status": status, "visibility": visibility, "os": os, **filters})

    def get(self, ref: str) -> JSONObject:
        """An image by id, or by name (a private image, necessarily the project's, wins over public ones)."""
        if ref.startswith("img-"):
            return as_object(self.c.get(f"{self.path}/{ref}"))
        pool = self.list(name=ref)
        private = [i for i in pool if i.get("visibility") == "private"]
        if len(pool) > 1 and len(private) == 1:
            pool = private
        if not pool:
            raise ApiError(404, "not_found", f"Image {ref} not found")
        if len(pool) > 1:
            raise ApiError(409, "ambiguous_image", f"Several images are named '{ref}': use the image id "
                                                   f"({', '.join(i['id'] for i in pool)})")
        return pool[0]

    def upload(self, image_id: str, path: str | os.PathLike[str], *, progress: Progress | None = None,
               sha256: str | None = None, timeout: float | None = 600.0) -> JSONObject:
        """Stream the file at `path` into image `image_id`; returns the image (normally 'active').

        The file is read in 1 MiB chunks, never whole. `progress(done, total)` is called after each
        chunk. With `sha256` the server refuses a file that arrives different; without it, the
        checksum the server computed is compared with the one computed here while sending.
        """
        total = os.path.getsize(path)
        local = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            done = 0
            if progress:
                progress(0, total)
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    local.update(chunk)
                    done += len(chunk)
                    yield chunk
                    if progress:
                        progress(done, total)

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(total)}
        if sha256:
            headers["X-Image-Sha256"] = sha256
        try:
            resp = self.c.http.put(f"{self.path}/{image_id}/file", content=chunks(), headers=headers,
                                   timeout=httpx.Timeout(30.0, read=timeout))
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"Upload to {self.c.url} failed: {exc}") from exc
        _raise_for(resp)
        image = as_object(resp.json())
        if image.get("sha256") and image["sha256"] != local.hexdigest():
            raise ApiError(0, "checksum_mismatch", f"The server stored sha256 {image['sha256']} but the file sent "
                                                   f"has {local.hexdigest()}: the file changed while being sent?")
        return image

    def create_from_file(self, name: str, path: str | os.PathLike[str], disk_format: str | None = None, *,
                         progress: Progress | None = None, sha256: str | None = None,
                         **properties: Any) -> JSONObject:
        """`create` then `upload` (the format guessed from the file when not given)."""
        image = self.create(name, disk_format or guess_format(path), **properties)
        return self.upload(image["id"], path, progress=progress, sha256=sha256)

    def download(self, image_id: str, dest: str | os.PathLike[str], *, progress: Progress | None = None,
                 verify: bool = True) -> Path:
        """Stream the image file to `dest` (written beside, then renamed); checks its sha256."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        try:
            with self.c.http.stream("GET", f"{self.path}/{image_id}/file",
                                    timeout=httpx.Timeout(30.0, read=300.0)) as resp:
                _raise_for(resp)
                total = int(resp.headers.get("content-length", 0))
                expected = resp.headers.get("x-image-sha256", "")
                done = 0
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes(CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
        except httpx.TransportError as exc:
            tmp.unlink(missing_ok=True)
            raise ApiError(0, "unreachable", f"Download from {self.c.url} failed: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if verify and expected and digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ApiError(0, "checksum_mismatch", f"Downloaded sha256 {digest.hexdigest()} is not {expected}")
        os.replace(tmp, dest)
        return dest

    def update(self, image_id: str, **fields: Any) -> JSONObject:
        """Change name, visibility, protected, os, os_version, min_disk_gb, min_ram_mb."""
        return as_object(self.c.patch(f"{self.path}/{image_id}", fields))

    def delete(self, image_id: str) -> None:
        self.c.delete(f"{self.path}/{image_id}")

    def wait(self, image_id: str, timeout: float = 600.0) -> JSONObject:
        """Wait until the image is 'active' (or 'error')."""
        return self.c.wait_for(lambda: self.c.get(f"{self.path}/{image_id}"),
                               lambda i: i["status"] in ("active", "error"), timeout=timeout)


def attach(client: Client) -> None:
    client.images = Images(client)
