"""Safe unpacking of an uploaded function package (a zip, or a single source file) into a directory.

The upload comes from a tenant, so nothing in it is trusted: entry names that climb out of the target
(``../x``), absolute names, symlinks, devices and other special entries are refused, and so are archives
with too many entries or too many bytes once uncompressed. The declared sizes are checked first (cheap),
then the bytes actually written are counted while extracting, since a crafted archive can lie about them.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_ENTRIES = 2000
MAX_UNPACKED_BYTES = 250 * 1024 * 1024  # like Lambda's unzipped package limit
_CHUNK = 64 * 1024
_SINGLE_FILE_SUFFIXES = (".py", ".js", ".mjs", ".cjs")


class InvalidPackage(ValueError):
    """The upload is not an acceptable function package (the message says why, for the API's 400)."""


@dataclass(frozen=True)
class Package:
    sha256: str  # of the uploaded bytes: identifies the code of a version
    files: int
    unpacked_bytes: int


def _safe_relative(name: str) -> PurePosixPath:
    if "\x00" in name:
        raise InvalidPackage(f"entry name {name!r} contains a NUL byte")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InvalidPackage(f"entry {name!r} has an absolute path")
    if "\\" in name:
        raise InvalidPackage(f"entry {name!r} uses backslashes in its path")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise InvalidPackage(f"entry {name!r} climbs out of the package (..)")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise InvalidPackage(f"entry {name!r} has an empty path")
    return PurePosixPath(*parts)


def _check_entry_type(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # made on Unix: the high bits are st_mode
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise InvalidPackage(f"entry {info.filename!r} is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InvalidPackage(f"entry {info.filename!r} is not a regular file or directory")


def _unpack_zip(data: bytes, target: Path, *, max_entries: int, max_bytes: int) -> tuple[int, int]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidPackage(f"not a valid zip archive: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_entries:
            raise InvalidPackage(f"too many entries ({len(infos)} > {max_entries})")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise InvalidPackage(f"unpacked size {declared} bytes exceeds the limit of {max_bytes}")
        planned: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        seen: set[PurePosixPath] = set()
        for info in infos:
            _check_entry_type(info)
            if info.flag_bits & 0x1:
                raise InvalidPackage(f"entry {info.filename!r} is encrypted")
            rel = _safe_relative(info.filename)
            if rel in seen:
                raise InvalidPackage(f"entry {info.filename!r} appears twice")
            seen.add(rel)
            planned.append((info, rel))
        written = files = 0
        target_root = target.resolve()
        for info, rel in planned:
            dest = target_root.joinpath(*rel.parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Every directory on the way was made here from checked names, never a link, so the
            # resolved parent stays inside the target; checked again for defence in depth.
            if not dest.parent.resolve().is_relative_to(target_root):
                raise InvalidPackage(f"entry {info.filename!r} leaves the package directory")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            executable = bool((info.external_attr >> 16) & 0o111) and info.create_system == 3
            try:
                fd = os.open(dest, flags, 0o755 if executable else 0o644)
            except FileExistsError:
                raise InvalidPackage(f"entry {info.filename!r} collides with another entry") from None
            try:
                with archive.open(info) as source, os.fdopen(fd, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise InvalidPackage(f"unpacked size exceeds the limit of {max_bytes} bytes")
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
                raise InvalidPackage(f"entry {info.filename!r} cannot be read: {exc}") from None
            except RuntimeError as exc:  # e.g. an unsupported compression method or a bad password
                raise InvalidPackage(f"entry {info.filename!r} cannot be read: {exc}") from None
            files += 1
        if files == 0:
            raise InvalidPackage("the archive holds no file")
        return files, written


def unpack(data: bytes, target: Path, *, filename: str | None = None, max_entries: int = MAX_ENTRIES,
           max_bytes: int = MAX_UNPACKED_BYTES) -> Package:
    """Unpack `data` into the empty directory `target` and return the package's sha256.

    A zip archive is unpacked; otherwise the upload must be a single source file, stored as `filename`
    (a plain name such as ``handler.py``). Raises :class:`InvalidPackage`; the caller removes `target`
    after a failure (it may hold part of the archive).
    """
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise InvalidPackage("the target directory is not empty")
    digest = hashlib.sha256(data).hexdigest()
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        files, size = _unpack_zip(data, target, max_entries=max_entries, max_bytes=max_bytes)
        return Package(sha256=digest, files=files, unpacked_bytes=size)
    if filename is None:
        raise InvalidPackage("not a zip archive, and no file name given for a single-file upload")
    if "/" in filename or "\\" in filename or filename in ("", ".", "..") or "\x00" in filename:
        raise InvalidPackage(f"single-file name {filename!r} must be a plain file name")
    if not filename.endswith(_SINGLE_FILE_SUFFIXES):
        raise InvalidPackage(f"single-file upload {filename!r} must end in one of {', '.join(_SINGLE_FILE_SUFFIXES)}")
    if len(data) > max_bytes:
        raise InvalidPackage(f"file size {len(data)} bytes exceeds the limit of {max_bytes}")
    fd = os.open(target / filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return Package(sha256=digest, files=1, unpacked_bytes=len(data))
