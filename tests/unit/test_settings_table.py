"""The README's settings table is generated from `Settings`, and only core/config.py reads `HACKBOOT_*`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from hackboot.compute.agent import AgentSettings
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


def test_agent_options_default_to_the_agent_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every agent option is an `agent_*` setting (HACKBOOT_AGENT_*); explicit values (flags) win."""
    monkeypatch.setenv("HACKBOOT_AGENT_HEARTBEAT_INTERVAL", "2.5")
    monkeypatch.setenv("HACKBOOT_AGENT_EXTENSIONS", "")
    settings = Settings()
    monkeypatch.setattr("hackboot.compute.agent.get_settings", lambda: settings)
    options = AgentSettings(workers=7)
    for name in AgentSettings.model_fields:
        expected = 7 if name == "workers" else getattr(settings, f"agent_{name}")
        assert getattr(options, name) == expected, name
    assert (options.heartbeat_interval, options.extensions) == (2.5, "")


@pytest.mark.parametrize(("env", "value", "error"), [
    ("HACKBOOT_ACCEL", "xen", "accelerator must be kvm, tcg, auto or empty"),
    ("HACKBOOT_AGENT_ACCEL", "hvf", "accelerator must be kvm, tcg, auto or empty"),
    ("HACKBOOT_AGENT_DRIVER", "libvirt", "Input should be 'qemu' or 'fake'"),
    ("HACKBOOT_AGENT_WORKERS", "0", "greater than 0"),
    ("HACKBOOT_AGENT_RESERVED_MEMORY_MB", "-1", "greater than or equal to 0"),
    ("HACKBOOT_VOLUME_POLL_INTERVAL_S", "0", "greater than 0"),
    ("HACKBOOT_VOLUME_MIN_SIZE_GB", "20000", r"volume_min_size_gb \(20000\) exceeds volume_max_size_gb \(16384\)"),
    ("HACKBOOT_VOLUME_TEST_TIERS", "maybe", "valid boolean"),
])
def test_bad_values_are_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                                error: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=error):
        Settings()


def test_accel_values_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HACKBOOT_ACCEL", " KVM ")
    assert Settings().accel == "kvm"
    with pytest.raises(ValidationError, match="accelerator must be"):
        AgentSettings(accel="xen")  # a `hackboot agent --accel` flag is checked like the setting
    with pytest.raises(ValidationError, match="greater than 0"):
        AgentSettings(cpu_allocation_ratio=0)
