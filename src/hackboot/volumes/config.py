"""Block storage settings (`HACKBOOT_VOLUME_*`)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class VolumeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HACKBOOT_VOLUME_", extra="ignore")

    min_size_gb: int = 1
    max_size_gb: int = 16 * 1024  # 16 TiB, like the large public-cloud block volumes
    detach_timeout_s: float = 30.0
    # Remote backups: an S3 endpoint; empty = this cloud's own S3 service (s3_host:s3_port)
    backup_endpoint: str = Field("", description="S3 endpoint URL for remote backups")
    backup_region: str = "PAR1"
    scheduler_interval_s: float = 10.0
    poll_interval_s: float = 1.0
    check_interval_s: float = 5.0
    workers: int = 3
    max_chain_incrementals: int = 28  # a policy takes a full backup after this many incrementals


@lru_cache
def volume_settings() -> VolumeSettings:
    return VolumeSettings()
