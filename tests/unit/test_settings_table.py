"""The README's settings table is generated from `Settings`, and only core/config.py reads `HACKBOOT_*`."""

from __future__ import annotations

import re
from pathlib import Path

from hackboot.core.config import Settings, markdown_table

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "hackboot"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"

# Modules that still read HACKBOOT_* variables themselves. Remove an entry when its knobs move into
# Settings; never add one for a server-side knob. (The CLI's client-side variables are not settings.)
NOT_YET_MOVED = {
    "cli/main.py",  # client: profile, URL, token, project; serve/agent set HACKBOOT_* for Settings
    "cli/config.py",  # client: HACKBOOT_CLI_CONFIG
    "cli/compute.py",  # `hackboot agent --database-url` sets HACKBOOT_DATABASE_URL for Settings
    "cli/identity.py",  # client: HACKBOOT_PASSWORD
    "compute/accel.py",  # HACKBOOT_ACCEL
    "compute/agent.py",  # AgentSettings (HACKBOOT_AGENT_*)
    "volumes/config.py",  # VolumeSettings (HACKBOOT_VOLUME_*)
    "volumes/tiers.py",  # HACKBOOT_VOLUME_TEST_TIERS
    "volumes/agent.py",  # HACKBOOT_VOLUME_CRASH_AT
    "images/service.py",  # names HACKBOOT_BUILTIN_IMAGES_DIR (read through Settings)
    "images/builder/debian.py",  # HACKBOOT_DEBIAN_MIRROR (image build tool)
}

# On a line naming HACKBOOT_*: an environment read, a settings class of its own with that prefix, or a
# variable name kept in a constant (to be read elsewhere).
ENV_READ = re.compile(r"environ|getenv|envvar=|env_prefix=|=\s*f?[\"']HACKBOOT_")


def test_readme_table_is_generated_from_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme, "README lacks the settings-table markers"
    current = readme.split(START, 1)[1].split(END, 1)[0].strip("\n")
    assert current == markdown_table().strip("\n"), (
        "README settings table is out of date: run `python -m hackboot.core.config --markdown` and paste its "
        "output between the markers")


def test_every_setting_is_documented() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert not missing, f"settings without description=: {missing}"


def test_only_core_config_reads_hackboot_environment() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/config.py" or rel in NOT_YET_MOVED:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "HACKBOOT_" in code and ENV_READ.search(code):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "read HACKBOOT_* through hackboot.core.config.get_settings():\n" + "\n".join(offenders)
