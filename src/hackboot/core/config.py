"""One settings object for the whole cloud.

Values come from (highest first) environment variables `HACKBOOT_*`, a TOML file
(`HACKBOOT_CONFIG`, default `./hackboot.toml` when present), then the embedded
defaults, which run a complete cloud on one machine with SQLite under `./var/`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def _toml_path() -> Path:
    return Path(os.environ.get("HACKBOOT_CONFIG", "hackboot.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HACKBOOT_", extra="ignore")

    state_dir: Path = Field(default=Path("var"), description="Where the cloud keeps its state on this host")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty means SQLite in state_dir")
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on")
    api_port: int = Field(default=8080, description="Port the API listens on")
    api_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), description=(
        "API processes sharing the port (one per core suits Python); background work stays in one. "
        "Default: min(4, cores)"))
    s3_host: str = Field(default="127.0.0.1", description="Address the S3 service listens on")
    s3_port: int = Field(default=9000, description="Port the S3 service listens on")
    s3_domains: str = Field(default="s3.localhost,localhost",
                            description="Comma-separated base domains of virtual-host-style S3 requests")
    s3_lifecycle_day_s: float = Field(default=86400.0,
                                      description='Length of a lifecycle "day" in seconds (tests use 1)')
    s3_min_part_size: int = Field(default=5 * 1024 * 1024,
                                  description="Minimum size in bytes of every multipart part but the last")
    s3_upload_ttl_days: float = Field(default=7.0,
                                      description="Incomplete multipart uploads are aborted after this many days")
    public_url: str = Field(default="", description="Public base URL of the cloud (not read by any service yet)")
    master_key: str = Field(default="", description=(
        "Master key wrapping every stored secret (base64url, 32 bytes); empty: generated once into "
        "state_dir/master.key (mode 0600)"))
    unprivileged_user: str = Field(default="hackboot-guest", description=(
        "System account (created when missing) that QEMU and qemu-img on tenant files run as"))
    metrics_token: str = Field(default="", description=(
        "Bearer token Prometheus sends to read /metrics; empty: superusers' tokens only"))
    max_body_bytes: int = Field(default=1024 * 1024, description="Largest request body of non-upload API routes")
    min_free_bytes: int = Field(default=64 * 1024**2, description=(
        "Writes are refused (507) while the state directory's filesystem has less than this free"))
    disk_reserve_bytes: int = Field(default=16 * 1024**2, description=(
        "Kept allocated in state_dir and released when the disk fills, so deletes can still commit"))
    token_default_ttl_hours: int = Field(default=24 * 30, description="Lifetime of API tokens created without one")
    org_max_projects: int = Field(default=100, description=(
        "Projects an organisation may hold (organisation admins create them; superusers are exempt)"))
    # Password checks are throttled per username and per source address; only failures count.
    # After the free failures, each further attempt waits base * 2**n seconds (capped); a counter
    # untouched for the window starts again from zero.
    login_user_free_failures: int = Field(default=5, description=(
        "Failed password checks per username before login attempts are throttled"))
    login_source_free_failures: int = Field(default=100, description=(
        "Failed password checks per source address before login attempts are throttled"))
    login_backoff_base_s: float = Field(default=1.0, description="Throttled logins wait base * 2**n seconds")
    login_backoff_max_s: float = Field(default=900.0, description="Cap on one login throttling delay")
    login_failure_window_s: float = Field(default=3600.0, description=(
        "A login failure counter untouched this long starts again from zero"))
    login_token_ttl_hours: int = Field(default=12, description="Lifetime of the token a password login issues")
    run_local_agent: bool = Field(default=True, description="`serve` runs a compute agent for this host in-process")
    run_workers: bool = Field(default=True, description="`serve` runs the background workers")
    webhook_timeout_s: float = Field(default=5.0, description="Timeout of one webhook delivery attempt")
    webhook_max_attempts: int = Field(default=8, description="Delivery attempts before a webhook delivery fails")
    webhook_backoff_base_s: float = Field(default=1.0, description="First webhook retry delay; doubles each attempt")
    webhook_backoff_max_s: float = Field(default=3600.0, description="Cap on one webhook retry delay")
    webhook_poll_interval_s: float = Field(default=1.0, description="How often the sender looks for due deliveries")
    webhook_allow_private_targets: bool = Field(default=False, description=(
        "Allow webhook URLs resolving to loopback/private/link-local addresses (SSRF guard off)"))
    events_retention_days: int = Field(default=90, description=(
        "Events, webhook deliveries and audit records older than this are deleted; 0 keeps everything"))
    events_stream_poll_s: float = Field(default=0.5, description="Server-sent events: database poll interval")
    events_stream_heartbeat_s: float = Field(default=15.0, description="Server-sent events: keep-alive interval")
    host_down_after_s: float = Field(default=30.0, description="A host without a heartbeat this long is down")
    builtin_images_dir: Path | None = Field(default=None, description=(
        "Where `make up` builds the built-in guest images; default: state_dir/images/builtin"))
    image_max_bytes: int = Field(default=64 * 1024**3, description="Largest image file accepted by an upload")
    image_max_virtual_bytes: int = Field(default=4 * 1024**4, description="Largest virtual disk size of an image")
    region: str = Field(default="PAR1", description="Region of this cloud")
    zone: str = Field(default="PAR1-a", description="Default zone")
    log_level: str = Field(default="info", description="Log level of the server processes")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_toml_path()))

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'hackboot.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return settings


def reset_settings_cache() -> None:
    """Tests and `serve` call this after changing the environment."""
    get_settings.cache_clear()


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    return repr(value) if isinstance(value, str) and not value else str(value)


def _type_text(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("pathlib.", "").replace("typing.", "")
    return text.replace(" | None", " (optional)")


def markdown_table() -> str:
    """Every setting as a Markdown table (the README's Configuration section holds this output)."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| Environment variable | TOML key | Type | Default | Description |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{prefix}{name.upper()}` | `{name}` | {_type_text(name)} | `{_default_text(name)}` "
                     f"| {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m hackboot.core.config --markdown")
    sys.stdout.write(markdown_table())
