"""Function packages: uploads are unpacked safely or refused with InvalidPackage."""

from __future__ import annotations

import hashlib
import io
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from hackboot.functions.codepkg import InvalidPackage, unpack


def make_zip(entries: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_zip_unpacked_with_sha256(tmp_path: Path) -> None:
    data = make_zip({"handler.py": b"def handler(e, c):\n    return e\n", "lib/util.py": b"X = 1\n", "./a.txt": b"a"})
    pkg = unpack(data, tmp_path / "code")
    assert pkg.sha256 == hashlib.sha256(data).hexdigest()
    assert pkg.files == 3
    assert files_under(tmp_path / "code") == ["a.txt", "handler.py", "lib/util.py"]
    assert (tmp_path / "code" / "lib" / "util.py").read_bytes() == b"X = 1\n"


def test_single_file_becomes_the_package(tmp_path: Path) -> None:
    pkg = unpack(b"exports.handler = async () => 1;\n", tmp_path / "code", filename="index.js")
    assert pkg.files == 1
    assert (tmp_path / "code" / "index.js").read_bytes() == b"exports.handler = async () => 1;\n"


@pytest.mark.parametrize("filename", [None, "../x.py", "a/b.py", "run.sh", ".."])
def test_single_file_bad_names_refused(tmp_path: Path, filename: str | None) -> None:
    with pytest.raises(InvalidPackage):
        unpack(b"print(1)\n", tmp_path / "code", filename=filename)
    assert files_under(tmp_path / "code") == []


@pytest.mark.parametrize("name", ["../x.py", "a/../../x.py", "/etc/cron.d/x", "\\windows\\x", "C:/x", "a\\..\\x"])
def test_traversal_and_absolute_names_refused(tmp_path: Path, name: str) -> None:
    data = make_zip({"ok.py": b"1", name: b"pwned"})
    with pytest.raises(InvalidPackage):
        unpack(data, tmp_path / "deep" / "code")
    assert not (tmp_path / "deep" / "x.py").exists() and not (tmp_path / "x.py").exists()
    assert files_under(tmp_path / "deep" / "code") == []  # refused before anything was written


def test_symlink_entry_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("passwd")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(InvalidPackage, match="symbolic link"):
        unpack(buf.getvalue(), tmp_path / "code")
    assert not (tmp_path / "code" / "passwd").exists()


def test_device_entry_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        dev = zipfile.ZipInfo("null")
        dev.create_system = 3
        dev.external_attr = (stat.S_IFCHR | 0o666) << 16
        zf.writestr(dev, "")
    with pytest.raises(InvalidPackage, match="not a regular file"):
        unpack(buf.getvalue(), tmp_path / "code")


def test_too_many_entries_refused(tmp_path: Path) -> None:
    data = make_zip({f"f{i}.txt": b"x" for i in range(30)})
    with pytest.raises(InvalidPackage, match="too many entries"):
        unpack(data, tmp_path / "code", max_entries=20)
    assert unpack(data, tmp_path / "ok", max_entries=30).files == 30


def test_zip_bomb_declared_size_refused(tmp_path: Path) -> None:
    data = make_zip({"bomb.bin": bytes(8 * 1024 * 1024)})
    assert len(data) < 64 * 1024  # a high compression ratio
    with pytest.raises(InvalidPackage, match="exceeds the limit"):
        unpack(data, tmp_path / "code", max_bytes=1024 * 1024)
    assert files_under(tmp_path / "code") == []


def _lie_about_sizes(data: bytes, fake_size: int) -> bytes:
    """Rewrite the uncompressed sizes in the local and central headers (a bomb that lies)."""
    out = bytearray(data)
    pos = out.find(b"PK\x03\x04")
    struct.pack_into("<I", out, pos + 22, fake_size)
    pos = out.find(b"PK\x01\x02")
    struct.pack_into("<I", out, pos + 24, fake_size)
    return bytes(out)


def test_zip_bomb_lying_about_its_size_refused(tmp_path: Path) -> None:
    data = _lie_about_sizes(make_zip({"bomb.bin": bytes(8 * 1024 * 1024)}), 100)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.infolist()[0].file_size == 100  # the declared-size check alone would let it through
    with pytest.raises(InvalidPackage):
        unpack(data, tmp_path / "code", max_bytes=1024 * 1024)
    written = sum(p.stat().st_size for p in (tmp_path / "code").rglob("*") if p.is_file())
    assert written <= 1024 * 1024


def test_bytes_counted_while_extracting(tmp_path: Path) -> None:
    # Honest declared sizes under the limit each, but the sum of what is written is over: refused
    # by the running count as well as by the declared total.
    data = make_zip({"a.bin": bytes(600 * 1024), "b.bin": bytes(600 * 1024)})
    with pytest.raises(InvalidPackage, match="exceeds the limit"):
        unpack(data, tmp_path / "code", max_bytes=1024 * 1024)


def test_duplicate_entries_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.py", b"1")
        zf.writestr("./a.py", b"2")  # another spelling of the same file
    with pytest.raises(InvalidPackage, match="twice"):
        unpack(buf.getvalue(), tmp_path / "code")


def test_garbage_and_empty_archives_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidPackage, match="not a valid zip"):
        unpack(b"PK\x03\x04garbage", tmp_path / "a")
    with pytest.raises(InvalidPackage, match="no file"):
        unpack(make_zip({"dir/": b""}), tmp_path / "b")


def test_target_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "old.py").write_text("x")
    with pytest.raises(InvalidPackage, match="not empty"):
        unpack(make_zip({"a.py": b"1"}), tmp_path / "code")
