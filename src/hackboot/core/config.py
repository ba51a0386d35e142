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
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # API processes sharing the port (one per core suits Python); background work stays in one.
    api_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1))
    s3_host: str = "127.0.0.1"
    s3_port: int = 9000
    public_url: str = ""
    # Master key wrapping every stored secret (S3 secret keys, volume keys, webhook secrets).
    # Empty: generated once into state_dir/master.key (mode 0600).
    master_key: str = ""
    # System account (created when missing) that QEMU and qemu-img on tenant files run as.
    unprivileged_user: str = "hackboot-guest"
    # Bearer token Prometheus sends to read /metrics (superusers' tokens work too); empty: superusers only.
    metrics_token: str = ""
    max_body_bytes: int = 1024 * 1024
    # Writes are refused (507) while the state directory's filesystem has less than this free.
    min_free_bytes: int = 64 * 1024**2
    # Kept allocated in state_dir and released when the disk fills, so deletes can still commit.
    disk_reserve_bytes: int = 16 * 1024**2
    token_default_ttl_hours: int = 24 * 30
    # Projects an organisation may hold (organisation admins create them; superusers are exempt).
    org_max_projects: int = 100
    # Password checks are throttled per username and per source address; only failures count.
    # After the free failures, each further attempt waits base * 2**n seconds (capped); a counter
    # untouched for the window starts again from zero.
    login_user_free_failures: int = 5
    login_source_free_failures: int = 100
    login_backoff_base_s: float = 1.0
    login_backoff_max_s: float = 900.0
    login_failure_window_s: float = 3600.0
    login_token_ttl_hours: int = 12
    run_local_agent: bool = True
    run_workers: bool = True
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_max_s: float = 3600.0
    webhook_poll_interval_s: float = 1.0
    # SSRF guard: tenants must not make the cloud call loopback/private/link-local addresses.
    webhook_allow_private_targets: bool = False
    events_retention_days: int = 90  # the seed keeps access logs 90 days
    events_stream_poll_s: float = 0.5
    events_stream_heartbeat_s: float = 15.0
    host_down_after_s: float = 30.0
    # Images: where `make up` builds the built-in guest images, and upload limits.
    builtin_images_dir: Path | None = None  # default: state_dir/images/builtin
    image_max_bytes: int = 64 * 1024**3
    image_max_virtual_bytes: int = 4 * 1024**4
    region: str = "PAR1"
    zone: str = "PAR1-a"
    log_level: str = "info"

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
