"""CLI profiles: `~/.config/hackboot/config.toml` (or HACKBOOT_CLI_CONFIG), one table per profile."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path


def config_path() -> Path:
    env = os.environ.get("HACKBOOT_CLI_CONFIG")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "hackboot" / "config.toml"


@dataclass
class Profile:
    url: str = "http://127.0.0.1:8080"
    token: str = ""
    project: str = ""
    username: str = ""


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_all() -> dict[str, Profile]:
    path = config_path()
    if not path.exists():
        return {}
    data = tomllib.loads(path.read_text())
    return {name: Profile(**{k: str(v) for k, v in values.items() if k in Profile.__dataclass_fields__})
            for name, values in data.get("profiles", {}).items()}


def load(name: str) -> Profile:
    return load_all().get(name, Profile())


def save(name: str, profile: Profile) -> Path:
    profiles = load_all()
    profiles[name] = profile
    lines = []
    for pname, prof in sorted(profiles.items()):
        lines.append(f"[profiles.{_quote(pname)}]")
        lines += [f"{k} = {_quote(v)}" for k, v in asdict(prof).items()]
        lines.append("")
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds tokens: owner only
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path
