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

* every `qemu-img` call names the format explicitly (``json:{"driver": …}``): nothing is ever
  probed, and a qcow2's backing file is never opened (``"backing": null``);
* a raw image must not look like any format QEMU knows (magic numbers checked here);
* a qcow2 header is parsed here *before* `qemu-img` opens the file, so a backing file, an external
  data file or an encryption header is refused without QEMU ever opening the file it names; then
  ``qemu-img info`` is asked the same questions again (defence in depth), and ``qemu-img check``
  must find no corruption;
* `qemu-img` runs as the unprivileged account (``core.privsep``), with a clean environment, under
  ``prlimit`` (address space and CPU time) and a wall-clock timeout, since a crafted image can make
  it allocate or loop without bound (the lesson of OpenStack's CVE-2015-5162) or exploit a parser
  bug; it may read the file (group read, through a private directory) but not change it.

The same `validate` serves every disk file that arrives from a tenant-writable place: uploads,
instance snapshots, and the layers of a volume backup restored from the tenant's bucket.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hackboot.core import privsep

FORMATS = ("qcow2", "raw")
MiB = 1024 * 1024
GiB = 1024 * MiB
_BLOCK = 64 * 1024  # granularity of hole detection when writing
_ZEROS = bytes(_BLOCK)
_QCOW_MAGIC = b"QFI\xfb"
QEMU_IMG_TIMEOUT_S = 300.0
_INFO_LIMITS = (1 * GiB, 30)  # address space, CPU seconds
_CHECK_LIMITS = (2 * GiB, 120)

# qcow2 header (docs/interop/qcow2.txt in QEMU), big-endian.
_QCOW2_INCOMPAT_DIRTY = 1 << 0
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_INCOMPAT_KNOWN = (1 << 5) - 1  # dirty, corrupt, data file, compression type, extended L2
_QCOW2_EXT_END = 0
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_CRYPTO = 0x0537BE77
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_CRYPT_LUKS = 2


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


def check_qcow2_header(path: Path, *, layer: bool = False, encrypted: bool = False) -> None:
    """Refuse, from the header alone, a qcow2 that would make QEMU open another file or need a key.

    `layer`: the file is one layer of a chain that the caller assembles itself (a volume backup), so
    its header may *name* a backing file: that name is never opened (see `validate`). `encrypted`:
    the file must be LUKS-encrypted qcow2 (a layer of an encrypted volume), never plain or legacy AES.
    An external data file is refused in every case.
    """
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
        if (backing_offset != 0 or backing_size != 0) and not layer:
            raise ImageRejected("The image names a backing file: images must be self-contained "
                                "(flatten it with `qemu-img convert -O qcow2` first)", code="image_backing_file")
        if backing_size > 1023:  # QEMU's own limit; a longer name is a crafted header
            raise ImageRejected("Invalid qcow2 header: backing file name too long")
        if encrypted and crypt_method != _QCOW2_CRYPT_LUKS:
            raise ImageRejected("The layer of an encrypted volume is not LUKS-encrypted", code="image_encrypted")
        if crypt_method != 0 and not encrypted:
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
            if ext_type == _QCOW2_EXT_BACKING_FORMAT and not layer:
                raise ImageRejected("The image names a backing file format: images must be self-contained",
                                    code="image_backing_file")
            if ext_type == _QCOW2_EXT_CRYPTO and not encrypted:
                raise ImageRejected("Encrypted qcow2 images are not supported", code="image_encrypted")
            offset += 8 + ((ext_len + 7) & ~7)
            f.seek(offset)


# --- qemu-img ----------------------------------------------------------------------------------------

# The tool's environment: nothing of ours (no HACKBOOT_* secrets), C messages, few malloc arenas so that
# the address-space limit measures memory rather than per-thread arena reservations.
_TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "MALLOC_ARENA_MAX": "2"}
_IMAGE_NAME = "image"  # the name the tool sees (see `tool_access`)


def run_qemu_img(args: list[str], *, cwd: Path, secrets: dict[str, str] | None = None,
                 address_space: int = 2 * GiB, cpu_seconds: int = 120,
                 timeout: float = QEMU_IMG_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`qemu-img <args>` as the unprivileged account under prlimit, in `cwd`, on tenant-supplied files.

    The files are named relative to `cwd` (the process enters it before dropping privileges, so the
    directories above it need not be open to that account). Keys (``secrets``: QMP secret id → value)
    travel through pipes named by ``--object secret,file=/dev/fd/N``, never argv.
    """
    exe = shutil.which("qemu-img")
    if exe is None:
        raise QemuImgMissing("qemu-img not found: install the 'qemu-utils' package")
    account = privsep.unprivileged_account()
    fds: list[int] = []
    objects: list[str] = []
    try:
        for secret_id, value in (secrets or {}).items():
            r, w = os.pipe()
            os.write(w, value.encode())  # a passphrase fits any pipe buffer
            os.close(w)
            fds.append(r)
            if not account.is_current:
                os.fchown(r, account.uid, account.gid)  # /dev/fd/N of a pipe reopens with its owner's rights
            objects += ["--object", f"secret,id={secret_id},file=/dev/fd/{r},format=raw"]
        argv = privsep.limited_argv([exe, args[0], *objects, *args[1:]], address_space=address_space,
                                    cpu_seconds=cpu_seconds)
        switch = not account.is_current  # None: run as we are (subprocess's defaults)
        return subprocess.run(argv, cwd=cwd, env=_TOOL_ENV, pass_fds=tuple(fds), capture_output=True, text=True,
                              timeout=timeout, check=False, user=account.uid if switch else None,
                              group=account.gid if switch else None, extra_groups=[] if switch else None)
    except subprocess.TimeoutExpired:
        raise ImageRejected(f"qemu-img took over {timeout:.0f}s on the image") from None
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def tool_access(path: Path) -> Iterator[tuple[Path, str]]:
    """Let the unprivileged account *read* `path` for the duration: yields (cwd, name) to hand to the tool.

    The file is hard-linked as ``image`` into a fresh directory that only that account's group may
    enter, and made group-readable (never writable: a tool compromised by a crafted image cannot
    change what was validated); its owner, group and mode are restored afterwards.
    """
    account = privsep.unprivileged_account()
    if account.is_current:
        yield path.parent, path.name
        return
    st = path.stat()
    cell = path.parent / f".tool-{uuid.uuid4().hex[:12]}"
    cell.mkdir(mode=0o700)
    try:
        os.chown(cell, 0, account.gid)
        os.chmod(cell, 0o710)
        os.link(path, cell / _IMAGE_NAME)
        os.chown(path, st.st_uid, account.gid)
        os.chmod(path, 0o640)
        yield cell, _IMAGE_NAME
    finally:
        with contextlib.suppress(OSError):
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)
        (cell / _IMAGE_NAME).unlink(missing_ok=True)
        cell.rmdir()


def image_opts(name: str, disk_format: str, *, secret: str | None = None) -> str:
    """The ``json:`` filename of one file alone: the format is explicit (nothing is probed) and a qcow2's
    backing file, whatever its header names, is never opened."""
    node: dict[str, object] = {"driver": disk_format, "file": {"driver": "file", "filename": name}}
    if disk_format == "qcow2":
        node["backing"] = None
        if secret is not None:
            node["encrypt"] = {"format": "luks", "key-secret": secret}
    return "json:" + json.dumps(node)


def _tool_message(stderr: str, path: Path | str) -> str:
    """qemu-img's own words, without our file paths."""
    lines = [ln.strip() for ln in stderr.replace(str(path), "image").splitlines() if ln.strip()]
    text = lines[-1] if lines else "unknown error"
    return text.removeprefix("qemu-img: ")[:300]


def qemu_img_info(cwd: Path, name: str, disk_format: str) -> dict[str, object]:
    """`qemu-img info` of one file: explicit format, never follows a backing chain, never needs a key."""
    proc = run_qemu_img(["info", "--output=json", image_opts(name, disk_format)], cwd=cwd,
                        address_space=_INFO_LIMITS[0], cpu_seconds=_INFO_LIMITS[1])
    if proc.returncode != 0:
        raise ImageRejected(f"Not a valid {disk_format} image: {_tool_message(proc.stderr, name)}")
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        raise ImageRejected("qemu-img info gave unreadable output for this image") from None
    if not isinstance(info, dict):
        raise ImageRejected("qemu-img info gave unreadable output for this image")
    return info


def qemu_img_check(cwd: Path, name: str, key: str | None = None) -> None:
    """`qemu-img check` on a qcow2: corruption (exit 2) or a failed check (exit 1) refuse the image.

    Leaked clusters alone (exit 3) are wasted space, not danger: accepted. `key` opens a LUKS layer.
    """
    secret = "hbchk" if key is not None else None
    proc = run_qemu_img(["check", "--output=json", image_opts(name, "qcow2", secret=secret)], cwd=cwd,
                        secrets={secret: key} if secret and key else None,
                        address_space=_CHECK_LIMITS[0], cpu_seconds=_CHECK_LIMITS[1])
    if proc.returncode in (0, 3):
        return
    if proc.returncode == 2:
        corruptions = "some"
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            corruptions = str(json.loads(proc.stdout).get("corruptions", "some"))
        raise ImageRejected(f"The qcow2 image is corrupt ({corruptions} errors found by qemu-img check; "
                            "is the file truncated?)", code="image_corrupt")
    raise ImageRejected(f"The qcow2 image could not be checked: {_tool_message(proc.stderr, name)}",
                        code="image_corrupt")


def validate(path: Path, disk_format: str, limits: Limits, *, layer: bool = False, encrypted: bool = False,
             key: str | None = None) -> int:
    """Apply every rule to the file at `path` declared as `disk_format`; return its virtual size.

    One rule for every disk file that arrives from a tenant-writable place: image uploads, instance
    snapshots, and each layer of a volume backup restored from S3. For the latter, `layer` allows the
    header to *name* a backing file (the restore assembles the chain itself, in the order recorded at
    backup time, and never opens a name a header carries) and `encrypted` requires a LUKS layer,
    checked with `key`. qemu-img runs as the unprivileged account under prlimit, on the file only.
    Raises ImageRejected (or ImageTooLarge) with a reason meant for the uploader.
    """
    if disk_format not in FORMATS:
        raise ImageRejected(f"Unsupported disk format {disk_format!r}: use one of {', '.join(FORMATS)}")
    if (layer or encrypted) and disk_format != "qcow2":
        raise ImageRejected("A layer of a volume must be a qcow2 image", code="image_format_mismatch")
    path = path.resolve()
    if not path.is_file():
        raise ImageRejected("The image is not a regular file")
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
        check_qcow2_header(path, layer=layer, encrypted=encrypted)
    with tool_access(path) as (cwd, name):
        info = qemu_img_info(cwd, name, disk_format)
        virtual = _check_info(info, disk_format, limits, layer=layer, encrypted=encrypted)
        if disk_format == "qcow2":
            if encrypted and key is None:
                raise ImageRejected("The key of an encrypted layer is needed to check it", code="image_encrypted")
            qemu_img_check(cwd, name, key if encrypted else None)
    return virtual


def _check_info(info: dict[str, object], disk_format: str, limits: Limits, *, layer: bool,
                encrypted: bool) -> int:
    """The header questions asked again of qemu-img's own reading (defence in depth)."""
    if info.get("format") != disk_format:
        raise ImageRejected(f"Declared {disk_format}, but qemu-img reads it as {info.get('format')}",
                            code="image_format_mismatch")
    if not layer and any(key in info for key in ("backing-filename", "full-backing-filename",
                                                 "backing-filename-format")):
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
        crypt = data.get("encrypt")
        if crypt is not None and not (encrypted and isinstance(crypt, dict) and crypt.get("format") == "luks"):
            raise ImageRejected("Encrypted images are not supported", code="image_encrypted")
        if encrypted and crypt is None:
            raise ImageRejected("The layer of an encrypted volume is not encrypted", code="image_encrypted")
    if info.get("encrypted") and not encrypted:
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

    def _private_copy(self, src: Path, dst: Path) -> None:
        """Copy through a descriptor opened with O_NOFOLLOW into a new file (0640) nobody else holds."""
        try:
            fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageRejected(f"Cannot open the image file {src.name}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd_in).st_mode):
                raise ImageRejected(f"The image file {src.name} is not a regular file")
            fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                with os.fdopen(fd_in, "rb", closefd=False) as fin, os.fdopen(fd_out, "wb", closefd=False) as fout:
                    shutil.copyfileobj(fin, fout, MiB)
                    fout.flush()
                    os.fsync(fd_out)
            except BaseException:
                dst.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)

    def import_file(self, src: Path, file_name: str, disk_format: str, *, move: bool,
                    expected_sha256: str | None = None) -> ImageInfo:
        """Bring an existing file into the store (a snapshot made by compute, a built-in image).

        The file is first moved or hard-linked (copied across filesystems) into ``.tmp``, so what
        is validated is exactly what gets published, then renamed to `file_name`. A file that
        someone else owns (a snapshot written by a guest's unprivileged QEMU) is *copied*, through a
        descriptor opened without following links: whoever still holds it open for writing cannot
        change the store's copy after it was validated, and a link planted in its place is refused.
        Raises ImageRejected (the file is then left where it was, when `move` is False, or removed).
        """
        given = Path(src).absolute()
        tmp = self._tmp_path(file_name)
        if move and given.is_symlink():
            raise ImageRejected(f"The image file {given.name} is a symbolic link")
        src = given.resolve()
        if not src.is_file():
            raise ImageRejected(f"No such image file: {src}")
        if src.stat().st_uid != os.geteuid():
            self._private_copy(src, tmp)
            if move:
                src.unlink()
        else:
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
