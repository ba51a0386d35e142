"""NoCloud seed generation: user-data validation and the ISO's contents (read back with isoinfo)."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

from hackboot.compute.cloudinit import (
    MAX_USER_DATA_BYTES,
    build_seed_iso,
    render_seed_files,
    validate_user_data,
)

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm2n9mCJzR6iJ0ZpXn1bA6G6qyyR5rUP3lWmRkGkQ6K alice@laptop"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJcO4b3nmWqk4oR7D3Y0HwVQk0xq2n2f1G5s6Zq7wX2h bob@ci"

needs_genisoimage = pytest.mark.skipif(
    not (shutil.which("genisoimage") and shutil.which("isoinfo")), reason="genisoimage/isoinfo not installed"
)


def iso_read(iso: Path, name: str, *, joliet: bool = False) -> str:
    flag = "-J" if joliet else "-R"
    return subprocess.run(
        ["isoinfo", flag, "-i", str(iso), "-x", f"/{name}"], capture_output=True, text=True, check=True
    ).stdout


def iso_names(iso: Path) -> set[str]:
    out = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    return {line.strip().lstrip("/") for line in out.splitlines() if line.strip()}


def seed(tmp_path: Path, **kwargs) -> Path:
    args = {"instance_id": "i-0123", "hostname": "web-1", "ssh_public_keys": [KEY_A], "user_data": None}
    return build_seed_iso(tmp_path / "seed.iso", **(args | kwargs))


# --- validate_user_data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "#cloud-config\nhostname: x\nruncmd:\n  - echo hi\n",
        "#cloud-config\n",  # empty config is fine for cloud-init
        "#cloud-config\n# only a comment\n",
        "#!/bin/sh\necho hello\n",
        "#include\nhttps://example.invalid/cfg\n",
        "arbitrary text cloud-init will ignore",
        "",
        "#cloud-config\nmessage: 'héllo wörld'\n",
    ],
)
def test_validate_accepts(text: str) -> None:
    validate_user_data(text)


def test_validate_rejects_oversized() -> None:
    validate_user_data("#!/bin/sh\n" + "x" * (MAX_USER_DATA_BYTES - 10))  # exactly at the limit
    with pytest.raises(ValueError, match=r"65537 bytes.*64 KiB"):
        validate_user_data("#!/bin/sh\n" + "x" * (MAX_USER_DATA_BYTES - 9))


def test_validate_counts_bytes_not_characters() -> None:
    text = "#!/bin/sh\n" + "é" * (MAX_USER_DATA_BYTES // 2)  # 2 bytes per character
    with pytest.raises(ValueError, match="64 KiB"):
        validate_user_data(text)


def test_validate_rejects_invalid_yaml_with_location() -> None:
    with pytest.raises(ValueError, match=r"not valid YAML at line 4"):
        validate_user_data("#cloud-config\nruncmd:\n  - [unclosed\nfoo: bar\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        validate_user_data("#cloud-config\nkey: value\n\tbad: tab\n")


@pytest.mark.parametrize("body,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_validate_rejects_non_mapping(body: str, kind: str) -> None:
    with pytest.raises(ValueError, match=f"must be a YAML mapping.*{kind}"):
        validate_user_data("#cloud-config\n" + body)


# --- seed contents -------------------------------------------------------------------------------


def test_render_without_user_data_generates_cloud_config() -> None:
    files = render_seed_files(instance_id="i-1", hostname="web-1", ssh_public_keys=[KEY_A, KEY_B], user_data=None)
    assert set(files) == {"meta-data", "user-data"}
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "i-1", "local-hostname": "web-1"}
    assert files["user-data"].startswith("#cloud-config\n")
    assert yaml.safe_load(files["user-data"]) == {"hostname": "web-1", "ssh_authorized_keys": [KEY_A, KEY_B]}


def test_render_merges_keys_into_cloud_config() -> None:
    user_data = f"#cloud-config\nssh_authorized_keys:\n  - {KEY_B}\n  - {KEY_A}\nruncmd:\n  - [ls, -l, /]\n"
    files = render_seed_files(instance_id="i-1", hostname="h", ssh_public_keys=[KEY_A], user_data=user_data)
    assert files["user-data"].startswith("#cloud-config\n")
    config = yaml.safe_load(files["user-data"])
    assert config["ssh_authorized_keys"] == [KEY_B, KEY_A]  # no duplicate
    assert config["runcmd"] == [["ls", "-l", "/"]]
    assert "public-keys" not in yaml.safe_load(files["meta-data"])


def test_render_turns_single_string_key_into_list() -> None:
    files = render_seed_files(
        instance_id="i-1",
        hostname="h",
        ssh_public_keys=[KEY_A],
        user_data=f"#cloud-config\nssh_authorized_keys: {KEY_B}\n",
    )
    assert yaml.safe_load(files["user-data"])["ssh_authorized_keys"] == [KEY_B, KEY_A]


def test_render_keeps_cloud_config_verbatim_without_keys() -> None:
    user_data = "#cloud-config\n# my comment\nhostname: custom\n"
    files = render_seed_files(instance_id="i-1", hostname="h", ssh_public_keys=[], user_data=user_data)
    assert files["user-data"] == user_data


def test_render_script_is_untouched_and_keys_go_to_meta_data() -> None:
    script = "#!/bin/bash\nset -e\necho 'hello' > /tmp/x\n"
    files = render_seed_files(instance_id="i-1", hostname="h", ssh_public_keys=[KEY_A], user_data=script)
    assert files["user-data"] == script
    assert yaml.safe_load(files["meta-data"])["public-keys"] == [KEY_A]


def test_render_long_keys_stay_on_one_line() -> None:
    long_key = "ssh-rsa " + "A" * 700 + " someone@somewhere"
    files = render_seed_files(instance_id="i-1", hostname="h", ssh_public_keys=[long_key], user_data=None)
    assert f"- {long_key}\n" in files["user-data"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hostname": ""}, "hostname must not be empty"),
        ({"hostname": "a\nb"}, "hostname must be a single line"),
        ({"instance_id": "x\ny"}, "instance_id must be a single line"),
        ({"ssh_public_keys": ["ssh-ed25519 AAAA\nssh-ed25519 BBBB"]}, "ssh public key must be a single line"),
        ({"user_data": "#cloud-config\n[1, 2]\n"}, "must be a YAML mapping"),
        ({"network_config": "version: [2"}, "network_config is not valid YAML"),
        ({"network_config": "- a\n"}, "network_config must be a YAML mapping"),
    ],
)
def test_render_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"instance_id": "i-1", "hostname": "h", "ssh_public_keys": [], "user_data": None} | kwargs
    with pytest.raises(ValueError, match=match):
        render_seed_files(**args)


# --- the ISO itself ------------------------------------------------------------------------------


@needs_genisoimage
def test_iso_label_names_and_contents(tmp_path: Path) -> None:
    network = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
    iso = seed(tmp_path, network_config=network)
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in info
    assert "Rock Ridge" in info and "Joliet" in info
    assert iso_names(iso) == {"meta-data", "user-data", "network-config"}
    meta = yaml.safe_load(iso_read(iso, "meta-data"))
    assert meta == {"instance-id": "i-0123", "local-hostname": "web-1"}
    assert yaml.safe_load(iso_read(iso, "user-data")) == {"hostname": "web-1", "ssh_authorized_keys": [KEY_A]}
    assert iso_read(iso, "network-config") == network
    assert iso_read(iso, "user-data", joliet=True) == iso_read(iso, "user-data")


@needs_genisoimage
def test_iso_keeps_script_bytes(tmp_path: Path) -> None:
    script = "#!/bin/sh\nprintf 'a\\tb ünïcode\\n' > /tmp/out\n"
    iso = seed(tmp_path, user_data=script)
    assert iso_read(iso, "user-data") == script
    assert yaml.safe_load(iso_read(iso, "meta-data"))["public-keys"] == [KEY_A]
    assert "network-config" not in iso_names(iso)


@needs_genisoimage
def test_iso_written_atomically_and_private(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    iso.write_text("old")
    seed(tmp_path)
    assert iso.stat().st_mode & 0o777 == 0o600
    assert iso.read_bytes()[32769:32774] == b"CD001"  # ISO 9660 primary volume descriptor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]  # no temp files left

    with pytest.raises(ValueError):
        seed(tmp_path, user_data="#cloud-config\n: [\n")
    assert iso.read_bytes()[32769:32774] == b"CD001"  # a failed build leaves the old ISO alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]


# --- the tiny image's parser reads what we write ----------------------------------------------------


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox not installed")
def test_tiny_image_parser_understands_generated_seed(tmp_path: Path) -> None:
    """The tiny image parses user-data with a small awk script; check it against our output."""
    user_data = (
        "#cloud-config\n"
        "hostname: from-user-data  # comment\n"
        "runcmd:\n"
        "  - echo hello > /tmp/x\n"
        "  - [sh, -c, \"echo 'quoted # not a comment'\"]\n"
        "  - |\n"
        "    if true; then\n"
        "      echo multi\n"
        "    fi\n"
        "users:\n"
        "  - default\n"
        "  - name: bob\n"
        "    groups: [adm]\n"
        f"    ssh_authorized_keys: ['{KEY_B}']\n"
    )
    files = render_seed_files(instance_id="i-9", hostname="meta-host", ssh_public_keys=[KEY_A], user_data=user_data)
    awk = resources.files("hackboot.images.builder").joinpath("tiny-cloudconfig.awk")

    def parse(mode: str, text: str, name: str = "") -> dict[str, str]:
        out = tmp_path / (name or mode)
        out.mkdir()
        source = tmp_path / f"{name or mode}.yaml"
        source.write_text(text)
        subprocess.run(
            ["busybox", "awk", "-v", f"mode={mode}", "-v", f"out={out}", "-f", str(awk), str(source)],
            check=True,
        )
        return {p.name: p.read_text() for p in out.iterdir()}

    meta = parse("meta", files["meta-data"])
    assert meta == {"instance-id": "i-9\n", "local-hostname": "meta-host\n"}
    user = parse("user", files["user-data"])
    assert user["hostname"] == "from-user-data\n"
    assert user["users"] == "bob\n"
    assert sorted(user["keys"].splitlines()) == sorted([f":{KEY_A}", f"bob:{KEY_B}"])
    assert user["runcmd"] == (
        "echo hello > /tmp/x\n'sh' '-c' 'echo '\"'\"'quoted # not a comment'\"'\"''\nif true; then\n  echo multi\nfi\n"
    )
    # The generated runcmd must be valid shell that does what the YAML says.
    result = subprocess.run(
        ["busybox", "sh", "-c", user["runcmd"].splitlines()[1]], capture_output=True, text=True, check=False
    )
    assert result.stdout == "quoted # not a comment\n"

    script_meta = parse(
        "meta",
        render_seed_files(instance_id="i-9", hostname="h", ssh_public_keys=[KEY_A, KEY_B], user_data="#!/bin/sh\n")[
            "meta-data"
        ],
        name="script-meta",
    )
    assert script_meta["keys"] == f":{KEY_A}\n:{KEY_B}\n"
