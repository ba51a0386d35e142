"""cloud-init NoCloud seed generation for instances.

The compute driver attaches the ISO built here as a read-only disk labelled ``cidata``; both the
built-in images (the busybox ``tiny`` image's own init and Debian's real cloud-init) discover it
by that label. This module is deliberately pure: no HTTP, no database, only files and
``genisoimage``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

#: Same limit as EC2/OpenStack user data: large enough for real configs, small enough to keep
#: seed ISOs and API payloads cheap.
MAX_USER_DATA_BYTES = 64 * 1024

CLOUD_CONFIG_HEADER = "#cloud-config"


class _SafeDumper(yaml.SafeDumper):
    """SafeDumper that indents block sequences under their key (``key:\\n  - item``).

    cloud-init does not care, but it is the layout people write by hand, which keeps the seed
    readable and is what the tiny image's small parser is most exercised with.
    """

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line strings (runcmd scripts, write_files content) as "|" blocks rather than one
    # "...\n..." line: the seed stays readable when someone debugs an instance.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SafeDumper.add_representer(str, _represent_str)


def _dump_yaml(data: dict[str, Any]) -> str:
    # width=inf: never fold long scalars (SSH keys, shell commands) over several lines.
    return yaml.dump(
        data,
        Dumper=_SafeDumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=True,
        width=float("inf"),
    )


def _is_cloud_config(text: str) -> bool:
    # cloud-init dispatches on the first line's prefix, exactly like this.
    return text.startswith(CLOUD_CONFIG_HEADER)


def _load_cloud_config(text: str) -> dict[str, Any]:
    """Parse a ``#cloud-config`` document; raise ValueError if it is not a YAML mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"user_data: #cloud-config is not valid YAML{where}: {problem}") from None
    if data is None:  # header only / comments only: cloud-init treats it as an empty config
        return {}
    if not isinstance(data, dict):
        # ValueError, not TypeError: this is bad user input, reported as such by the API.
        raise ValueError(f"user_data: #cloud-config must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def validate_user_data(text: str) -> None:
    """Reject user data that cloud-init would refuse or that is too large.

    Raises ValueError with a message suitable for an API 400 response. Formats other than
    ``#cloud-config`` (shell scripts, ``#include``, MIME multipart...) are passed through
    untouched: cloud-init interprets them and we have nothing reliable to check.
    """
    if not isinstance(text, str):
        raise TypeError("user_data must be a string")
    size = len(text.encode("utf-8"))
    if size > MAX_USER_DATA_BYTES:
        raise ValueError(f"user_data is {size} bytes; the limit is {MAX_USER_DATA_BYTES} bytes (64 KiB)")
    if _is_cloud_config(text):
        _load_cloud_config(text)


def _check_single_line(field: str, value: str) -> None:
    if not value or not value.strip():
        raise ValueError(f"{field} must not be empty")
    if "\n" in value or "\r" in value:
        raise ValueError(f"{field} must be a single line")


def _merge_keys(existing: Any, extra: list[str]) -> list[Any]:
    """Append ``extra`` keys to the user's ``ssh_authorized_keys`` without duplicates."""
    if existing is None:
        merged: list[Any] = []
    elif isinstance(existing, list):
        merged = list(existing)
    else:  # a single key given as a plain string is a common slip; cloud-init wants a list
        merged = [existing]
    for key in extra:
        if key not in merged:
            merged.append(key)
    return merged


def render_seed_files(
    *,
    instance_id: str,
    hostname: str,
    ssh_public_keys: list[str],
    user_data: str | None,
    network_config: str | None = None,
) -> dict[str, str]:
    """Return the NoCloud seed as ``{file name: content}`` (``meta-data``, ``user-data``...)."""
    _check_single_line("instance_id", instance_id)
    _check_single_line("hostname", hostname)
    keys = [k.strip() for k in ssh_public_keys if k and k.strip()]
    for key in keys:
        _check_single_line("ssh public key", key)

    meta: dict[str, Any] = {"instance-id": instance_id, "local-hostname": hostname}

    if user_data is None or not user_data.strip():
        config: dict[str, Any] = {"hostname": hostname}
        if keys:
            config["ssh_authorized_keys"] = keys
        rendered_user_data = f"{CLOUD_CONFIG_HEADER}\n{_dump_yaml(config)}"
    elif _is_cloud_config(user_data):
        validate_user_data(user_data)
        config = _load_cloud_config(user_data)
        if keys:
            # Merging forces a re-serialisation (comments are lost); only pay that price when
            # there is something to merge, otherwise hand cloud-init the user's exact text.
            config["ssh_authorized_keys"] = _merge_keys(config.get("ssh_authorized_keys"), keys)
            rendered_user_data = f"{CLOUD_CONFIG_HEADER}\n{_dump_yaml(config)}"
        else:
            rendered_user_data = user_data
    else:
        # Scripts, #include, MIME...: must stay byte-for-byte. NoCloud also installs the keys
        # listed under meta-data "public-keys", so they travel there instead.
        validate_user_data(user_data)
        rendered_user_data = user_data
        if keys:
            meta["public-keys"] = keys

    files = {"meta-data": _dump_yaml(meta), "user-data": rendered_user_data}
    if network_config is not None:
        try:
            net = yaml.safe_load(network_config)
        except yaml.YAMLError as exc:
            raise ValueError(f"network_config is not valid YAML: {exc}") from None
        if not isinstance(net, dict):
            raise ValueError("network_config must be a YAML mapping (network config v1 or v2)")
        files["network-config"] = network_config
    return files


def build_seed_iso(
    out_path: Path,
    *,
    instance_id: str,
    hostname: str,
    ssh_public_keys: list[str],
    user_data: str | None,
    network_config: str | None = None,
) -> Path:
    """Write a NoCloud seed ISO (volume label ``cidata``) to ``out_path`` atomically.

    The ISO may contain secrets from the user data, so it is created with mode 0600.
    Returns ``out_path``. Raises ValueError for invalid input, RuntimeError if genisoimage fails.
    """
    files = render_seed_files(
        instance_id=instance_id,
        hostname=hostname,
        ssh_public_keys=ssh_public_keys,
        user_data=user_data,
        network_config=network_config,
    )
    genisoimage = shutil.which("genisoimage")
    if genisoimage is None:
        raise RuntimeError("genisoimage not found; install the 'genisoimage' package")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the destination directory so the final rename is atomic: a reader (QEMU)
    # never sees a half-written ISO, and a crash leaves only a dot-file behind.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp_iso = Path(tmp_name)
    try:
        # Staged privately (user-data may hold secrets): `-r` (rationalised Rock Ridge) gives the
        # ISO's files root ownership and world-read modes whatever the staging modes are.
        with tempfile.TemporaryDirectory(prefix="hackboot-seed-") as staging:
            for name, content in files.items():
                path = Path(staging, name)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(content)
            proc = subprocess.run(
                [
                    genisoimage,
                    "-quiet",
                    "-output",
                    str(tmp_iso),
                    "-volid",
                    "cidata",
                    "-joliet",
                    "-r",
                    staging,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"genisoimage failed ({proc.returncode}): {proc.stderr.strip()}")
        tmp_iso.chmod(0o600)
        os.replace(tmp_iso, out_path)
    except BaseException:
        tmp_iso.unlink(missing_ok=True)
        raise
    return out_path
