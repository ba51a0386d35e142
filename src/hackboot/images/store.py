"""The image store: image files on this host's disk, checked with `qemu-img`. No HTTP, no database.

Layout under the store's root (the service uses ``settings.state_dir/images``)::

    <img-id>.<fmt>                  uploaded images and snapshots
    <img-id>.<sha12>.<fmt>          built-in images, one file per version (see ``service.seed``)
    <img-id>.<sha12>.vmlinuz|initrd their kernel and initrd for direct kernel boot
    .tmp/                           partial uploads and imports, on the same filesystem so that
                                    publishing an image is one atomic rename
    builtin/                        the guest image builder's output (not ours: never written here)

Why so much checking. A disk image is a program for the block layer: a qcow2 header can name a
*backing file* or an *external data file* anywhere on the host (``/etc/shadow``, ``/dev/sda``),
and QEMU would open it and show its bytes to the guest; a "raw" image whose first bytes are a
qcow2 header turns into such an image the moment anything probes its format. So:

* every `qemu-img` call passes an explicit ``-f <format>``: nothing is ever probed;
* a raw image must not look like any format QEMU knows (magic numbers checked here);
* a qcow2 header is parsed here *before* `qemu-img` opens the file, so a backing file, an external
  data file or an encryption header is refused without QEMU ever opening the file it names; then
  ``qemu-img info`` is asked the same questions again (defence in depth), and ``qemu-img check``
  must find no corruption;
* `qemu-img` runs under ``prlimit`` (address space and CPU time) and a wall-clock timeout, since a
  crafted image can make it allocate or loop without bound (the lesson of OpenStack's
  CVE-2015-5162).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("qcow2", "raw")
MiB = 1024 * 1024
GiB = 1024 * MiB
_BLOCK = 64 * 1024  # granularity of hole detection when writing
_ZEROS = bytes(_BLOCK)
_QCOW_MAGIC = b"QFI\xfb"
QEMU_IMG_TIMEOUT_S = 300.0
_INFO_LIMITS = ("--as=1073741824", "--cpu=30")  # 1 GiB address space, 30 s of CPU
_CHECK_LIMITS = ("--as=2147483648", "--cpu=120")

# qcow2 header (docs/interop/qcow2.txt in QEMU), big-endian.
_QCOW2_INCOMPAT_DIRTY = 1 << 0
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_INCOMPAT_KNOWN = (1 << 5) - 1  # dirty, corrupt, data file, compression type, extended L2
_QCOW2_EXT_END = 0
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_CRYPTO = 0x0537BE77
_QCOW2_EXT_DATA_FILE = 0x44415441


class ImageRejected(Exception):
    """The bytes are not an acceptable image. ``reason`` is written for the user who sent them."""

    code = "image_invalid"

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code:
            self.code = code


class ImageTooLarge(ImageRejected):
    code = "image_too_large"


class ChecksumMismatch(ImageRejected):
    code = "checksum_mismatch"


class QemuImgMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * GiB  # bytes of the file itself
    max_virtual_bytes: int = 4 * 1024 * GiB  # the disk size the image declares


@dataclass(frozen=True)
class ImageInfo:
    disk_format: str
    size_bytes: int
    virtual_size_bytes: int
    sha256: str


# --- format sniffing -------------------------------------------------------------------------------

def sniff_format(path: Path) -> str | None:
    """Name the non-raw format whose signature `path` carries, or None for plain data.

    Covers the formats QEMU's block layer would recognise when probing (qcow/qcow2, QED, VMDK,
    VDI, VHD, VHDX, LUKS, Parallels, Bochs, cloop). An ISO 9660 image or a partitioned disk is
    plain data here: raw is the right format for them.
    """
    with path.open("rb") as f:
        head = f.read(1024)
    if head.startswith(_QCOW_MAGIC):
        version = struct.unpack(">I", head[4:8])[0] if len(head) >= 8 else 0
        return "qcow2" if version >= 2 else "qcow"
    signatures = (
        (0, b"QED\x00", "qed"),
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
        (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
        (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    )
    for offset, magic, name in signatures:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def check_qcow2_header(path: Path) -> None:
    """Refuse, from the header alone, a qcow2 that would make QEMU open another file or need a key."""
    with path.open("rb") as f:
        head = f.read(104)
        if len(head) < 72 or not head.startswith(_QCOW_MAGIC):
            raise ImageRejected("The file is not a qcow2 image (no qcow2 header)")
        (version, backing_offset, backing_size, cluster_bits, _size, crypt_method) = struct.unpack(
            ">IQIIQI", head[4:36])
        if version not in (2, 3):
            raise ImageRejected(f"Unsupported qcow2 version {version} (2 or 3 expected)")
        if not 9 <= cluster_bits <= 21:
            raise ImageRejected(f"Invalid qcow2 header: cluster_bits={cluster_bits}")
        if backing_offset != 0 or backing_size != 0:
            raise ImageRejected("The image names a backing file: images must be self-contained "
                                "(flatten it with `qemu-img convert -O qcow2` first)", code="image_backing_file")
        if crypt_method != 0:
            raise ImageRejected("Encrypted qcow2 images are not supported", code="image_encrypted")
        header_length = 72
        if version == 3:
            if len(head) < 104:
                raise ImageRejected("Invalid qcow2 header: truncated")
            incompatible = struct.unpack(">Q", head[72:80])[0]
            header_length = struct.unpack(">I", head[100:104])[0]
            if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
                raise ImageRejected("The image uses an external data file: images must be self-contained",
                                    code="image_data_file")
            if incompatible & _QCOW2_INCOMPAT_CORRUPT:
                raise ImageRejected("The image is marked corrupt", code="image_corrupt")
            if incompatible & _QCOW2_INCOMPAT_DIRTY:
                raise ImageRejected("The image was not closed cleanly (dirty): repair it with "
                                    "`qemu-img check -r all` first", code="image_corrupt")
            if incompatible & ~_QCOW2_INCOMPAT_KNOWN:
                raise ImageRejected(f"The image uses unknown qcow2 features (0x{incompatible:x})")
            if header_length < 104 or header_length % 8:
                raise ImageRejected(f"Invalid qcow2 header length {header_length}")
        # Header extensions follow the header, up to the end of the first cluster.
        limit = min(1 << cluster_bits, 2 * MiB)
        offset = header_length
        f.seek(offset)
        while offset + 8 <= limit:
            raw = f.read(8)
            if len(raw) < 8:
                break
            ext_type, ext_len = struct.unpack(">II", raw)
            if ext_type == _QCOW2_EXT_END:
                break
            if ext_type == _QCOW2_EXT_DATA_FILE:
                raise ImageRejected("The image names an external data file: images must be self-contained",
                                    code="image_data_file")
            if ext_type == _QCOW2_EXT_BACKING_FORMAT:
                raise ImageRejected("The image names a backing file format: images must be self-contained",
                                    code="image_backing_file")
            if ext_type == _QCOW2_EXT_CRYPTO:
                raise ImageRejected("Encrypted qcow2 images are not supported", code="image_encrypted")
            offset += 8 + ((ext_len + 7) & ~7)
            f.seek(offset)


# --- qemu-img ----------------------------------------------------------------------------------------

def _qemu_img(args: list[str], limits: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise QemuImgMissing("qemu-img not found: install the 'qemu-utils' package")
    cmd = [exe, *args]
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        cmd = [prlimit, *limits, *cmd]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ImageRejected(f"qemu-img took over {QEMU_IMG_TIMEOUT_S:.0f}s to inspect the image") from None


def _tool_message(stderr: str, path: Path) -> str:
    """qemu-img's own words, without our file paths."""
    lines = [ln.strip() for ln in stderr.replace(str(path), "image").splitlines() if ln.strip()]
    text = lines[-1] if lines else "unknown error"
    return text.removeprefix("qemu-img: ")[:300]


def qemu_img_info(path: Path, disk_format: str) -> dict[str, object]:
    """`qemu-img info --output=json -f <disk_format>`: never probes, never follows a backing chain."""
    proc = _qemu_img(["info", "--output=json", "-f", disk_format, "-U", str(path)], _INFO_LIMITS)
    if proc.returncode != 0:
        raise ImageRejected(f"Not a valid {disk_format} image: {_tool_message(proc.stderr, path)}")
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        raise ImageRejected("qemu-img info gave unreadable output for this image") from None
    if not isinstance(info, dict):
        raise ImageRejected("qemu-img info gave unreadable output for this image")
    return info


def qemu_img_check(path: Path) -> None:
    """`qemu-img check` on a qcow2: corruption (exit 2) or a failed check (exit 1) refuse the image.

    Leaked clusters alone (exit 3) are wasted space, not danger: accepted.
    """
    proc = _qemu_img(["check", "--output=json", "-f", "qcow2", "-U", str(path)], _CHECK_LIMITS)
    if proc.returncode in (0, 3):
        return
    if proc.returncode == 2:
        corruptions = "some"
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            corruptions = str(json.loads(proc.stdout).get("corruptions", "some"))
        raise ImageRejected(f"The qcow2 image is corrupt ({corruptions} errors found by qemu-img check; "
                            "is the file truncated?)", code="image_corrupt")
    raise ImageRejected(f"The qcow2 image could not be checked: {_tool_message(proc.stderr, path)}",
                        code="image_corrupt")


def validate(path: Path, disk_format: str, limits: Limits) -> int:
    """Apply every rule to the file at `path` declared as `disk_format`; return its virtual size.

    Raises ImageRejected (or ImageTooLarge) with a reason meant for the uploader.
    """
    if disk_format not in FORMATS:
        raise ImageRejected(f"Unsupported disk format {disk_format!r}: use one of {', '.join(FORMATS)}")
    path = path.resolve()
    size = path.stat().st_size
    if size == 0:
        raise ImageRejected("The file is empty")
    if size > limits.max_bytes:
        raise ImageTooLarge(f"The file is {size} bytes; images may be at most {limits.max_bytes} bytes")
    found = sniff_format(path)
    if disk_format == "raw" and found is not None:
        hint = " (declare it as qcow2)" if found == "qcow2" else f" (convert it with `qemu-img convert -f {found} " \
                                                                   "-O qcow2`)"
        raise ImageRejected(f"Declared raw, but the file is a {found} image{hint}", code="image_format_mismatch")
    if disk_format == "qcow2":
        if found != "qcow2":
            what = f"a {found} image" if found else "not a qcow2 image (raw data?)"
            raise ImageRejected(f"Declared qcow2, but the file is {what}", code="image_format_mismatch")
        check_qcow2_header(path)
    info = qemu_img_info(path, disk_format)
    if info.get("format") != disk_format:
        raise ImageRejected(f"Declared {disk_format}, but qemu-img reads it as {info.get('format')}",
                            code="image_format_mismatch")
    if any(key in info for key in ("backing-filename", "full-backing-filename", "backing-filename-format")):
        raise ImageRejected("The image names a backing file: images must be self-contained",
                            code="image_backing_file")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict):
        if data.get("data-file") is not None or data.get("data-file-raw"):
            raise ImageRejected("The image uses an external data file: images must be self-contained",
                                code="image_data_file")
        if data.get("corrupt"):
            raise ImageRejected("The image is marked corrupt", code="image_corrupt")
        if data.get("encrypt") is not None:
            raise ImageRejected("Encrypted images are not supported", code="image_encrypted")
    if info.get("encrypted"):
        raise ImageRejected("Encrypted images are not supported", code="image_encrypted")
    if info.get("dirty-flag"):
        raise ImageRejected("The image was not closed cleanly (dirty)", code="image_corrupt")
    children = info.get("children")
    if isinstance(children, list) and any(isinstance(c, dict) and c.get("name") != "file" for c in children):
        raise ImageRejected("The image refers to other files: images must be self-contained",
                            code="image_data_file")
    virtual = info.get("virtual-size")
    if not isinstance(virtual, int) or virtual <= 0:
        raise ImageRejected("The image declares no usable disk size")
    if virtual > limits.max_virtual_bytes:
        raise ImageTooLarge(f"The image's disk is {virtual} bytes; at most {limits.max_virtual_bytes} allowed")
    if disk_format == "qcow2":
        qemu_img_check(path)
    return virtual


# --- files -----------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


class PartialUpload:
    """One image arriving as a stream of chunks: hashed on the fly, written sparse, published atomically.

    ``write`` as often as needed, then ``finish`` (validate, rename into place) or ``abort``.
    All-zero blocks become holes, so a raw disk mostly made of zeros costs no disk space.
    """

    def __init__(self, tmp_path: Path, final_path: Path, disk_format: str, limits: Limits) -> None:
        self.tmp_path = tmp_path
        self.final_path = final_path
        self.disk_format = disk_format
        self.limits = limits
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self.done = False

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise RuntimeError("upload already finished or aborted")
        n = len(data)
        if self.size + n > self.limits.max_bytes:
            raise ImageTooLarge(f"The file is over the limit of {self.limits.max_bytes} bytes per image")
        self._hash.update(data)
        fd, view = self._fd, memoryview(data)
        for off in range(0, n, _BLOCK):
            end = min(off + _BLOCK, n)
            if data.startswith(_ZEROS if end - off == _BLOCK else _ZEROS[: end - off], off):
                os.lseek(fd, end - off, os.SEEK_CUR)
                continue
            block = view[off:end]
            while block:
                written = os.write(fd, block)
                block = block[written:]
        self.size += n

    def finish(self, expected_sha256: str | None = None) -> ImageInfo:
        """Check the checksum and the image, then rename it into place. Aborts on any failure."""
        try:
            if self._fd is None:
                raise RuntimeError("upload already finished or aborted")
            os.ftruncate(self._fd, self.size)  # trailing holes still count
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            digest = self._hash.hexdigest()
            if expected_sha256 and expected_sha256.lower() != digest:
                raise ChecksumMismatch(f"Checksum mismatch: the server received sha256 {digest}, "
                                       f"the client announced {expected_sha256.lower()}")
            virtual = validate(self.tmp_path, self.disk_format, self.limits)
            os.replace(self.tmp_path, self.final_path)
            _fsync_dir(self.final_path.parent)
            self.done = True
            return ImageInfo(self.disk_format, self.size, virtual, digest)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Forget the partial data (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.done:
            self.tmp_path.unlink(missing_ok=True)


class ImageStore:
    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / ".tmp"
        self.limits = limits or Limits()

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, file_name: str) -> Path:
        """Absolute path of a file of the store (qcow2 overlays need absolute backing paths)."""
        if "/" in file_name or file_name.startswith("."):
            raise ValueError(f"not a store file name: {file_name!r}")
        return self.root / file_name

    def free_bytes(self) -> int:
        self.ensure()
        return shutil.disk_usage(self.root).free

    def _tmp_path(self, file_name: str) -> Path:
        self.ensure()
        return self.tmp / f"{file_name}.{uuid.uuid4().hex[:12]}.part"

    def begin_upload(self, file_name: str, disk_format: str) -> PartialUpload:
        return PartialUpload(self._tmp_path(file_name), self.path(file_name), disk_format, self.limits)

    def _place(self, src: Path, dst: Path, *, move: bool) -> None:
        """Move (or hard-link, when `move` is False) `src` to `dst`; copy across filesystems."""
        try:
            if move:
                os.rename(src, dst)
            else:
                os.link(src, dst)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        shutil.copyfile(src, dst)
        with dst.open("rb+") as f:
            os.fsync(f.fileno())
        if move:
            src.unlink()

    def import_file(self, src: Path, file_name: str, disk_format: str, *, move: bool,
                    expected_sha256: str | None = None) -> ImageInfo:
        """Bring an existing file into the store (a snapshot made by compute, a built-in image).

        The file is first moved or hard-linked (copied across filesystems) into ``.tmp``, so what
        is validated is exactly what gets published, then renamed to `file_name`.
        Raises ImageRejected (the file is then left where it was, when `move` is False, or removed).
        """
        src = Path(src).resolve()
        if not src.is_file():
            raise ImageRejected(f"No such image file: {src}")
        tmp = self._tmp_path(file_name)
        self._place(src, tmp, move=move)
        try:
            digest = sha256_file(tmp)
            if expected_sha256 and expected_sha256.lower() != digest:
                raise ChecksumMismatch(f"Checksum mismatch: the file has sha256 {digest}, "
                                       f"{expected_sha256.lower()} was expected")
            virtual = validate(tmp, disk_format, self.limits)
            size = tmp.stat().st_size
            os.replace(tmp, self.path(file_name))
            _fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ImageInfo(disk_format, size, virtual, digest)

    def link_file(self, src: Path, file_name: str) -> Path:
        """Publish an auxiliary file (kernel, initrd) under `file_name`; hard link when possible."""
        src = Path(src).resolve()
        dst = self.path(file_name)
        if dst.exists() and dst.samefile(src):
            return dst
        tmp = self._tmp_path(file_name)
        self._place(src, tmp, move=False)
        os.replace(tmp, dst)
        return dst

    def remove(self, file_name: str) -> None:
        self.path(file_name).unlink(missing_ok=True)
