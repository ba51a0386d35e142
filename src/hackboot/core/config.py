"""One settings object for the whole cloud.

Values come from (highest first) environment variables `HACKBOOT_*`, a TOML file
(`HACKBOOT_CONFIG`, default `./hackboot.toml` when present), then the embedded
defaults, which run a complete cloud on one machine with SQLite under `./var/`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def _toml_path() -> Path:
    return Path(os.environ.get("HACKBOOT_CONFIG", "hackboot.toml"))


ACCEL_MODES = ("kvm", "tcg", "auto")


def _accel_mode(value: str) -> str:
    mode = value.strip().lower()
    if mode and mode not in ACCEL_MODES:
        raise ValueError(f"accelerator must be kvm, tcg, auto or empty, got {value!r}")
    return mode


# kvm | tcg | auto, any case; "" = not chosen at this level. Shared with the agent's options, whose
# explicit values (`hackboot agent --accel`) are checked the same way.
AccelMode = Annotated[str, AfterValidator(_accel_mode)]
AgentDriver = Literal["qemu", "fake"]


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
    s3_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), description=(
        "S3 processes sharing the port (one per core: hashing and HTTP parsing are CPU-bound); "
        "background work stays in one. Default: min(4, cores)"))
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
    debian_mirror: str = Field(default="", description=(
        "Debian mirror URL the image builder's debootstrap uses; empty: the one in /etc/apt/sources.list(.d)"))
    region: str = Field(default="PAR1", description="Region of this cloud")
    zone: str = Field(default="PAR1-a", description="Default zone")
    log_level: str = Field(default="info", description="Log level of the server processes")
    accel: AccelMode = Field(default="", description=(
        "Accelerator of guests: kvm, tcg or auto (probe: KVM only if a test guest really boots); empty: auto"))
    # The host agent (the local one `serve` runs; `hackboot agent` flags override these).
    agent_name: str = Field(default="", description="Agent: host name (unique in the cloud); default: hostname")
    agent_zone: str = Field(default="", description="Agent: zone of the host; default: the cloud's default zone")
    agent_state_dir: Path | None = Field(default=None, description=(
        "Agent: disks, seeds and QEMU run dirs; default: state_dir/agent"))
    agent_driver: AgentDriver = Field(default="qemu", description=(
        "Agent: guest driver, qemu or fake (an in-memory driver for tests)"))
    agent_accel: AccelMode = Field(default="", description="Agent: kvm, tcg or auto; empty: the accel setting")
    agent_vcpus: PositiveInt | None = Field(default=None, description="Agent: declared vCPUs; default: measured")
    agent_memory_mb: PositiveInt | None = Field(default=None, description=(
        "Agent: declared memory in MB; default: measured"))
    agent_disk_gb: PositiveInt | None = Field(default=None, description=(
        "Agent: declared disk capacity in GB (thin provisioning); default: free space"))
    agent_reserved_vcpus: NonNegativeInt = Field(default=0, description="Agent: vCPUs kept for the host")
    agent_reserved_memory_mb: NonNegativeInt = Field(default=1024, description="Agent: memory (MB) kept for the host")
    agent_reserved_disk_gb: NonNegativeInt = Field(default=2, description="Agent: disk (GB) kept for the host")
    agent_cpu_allocation_ratio: PositiveFloat = Field(default=1.0, description="Agent: vCPU overcommit ratio")
    agent_ram_allocation_ratio: PositiveFloat = Field(default=1.0, description="Agent: memory overcommit ratio")
    agent_disk_allocation_ratio: PositiveFloat = Field(default=1.0, description="Agent: disk overcommit ratio")
    agent_gpus: str = Field(default="", description=(
        "Agent: GPUs for passthrough, 'MODEL=0000:3b:00.0,0000:3c:00.0;MODEL2=…'"))
    agent_poll_interval: PositiveFloat = Field(default=1.0, description=(
        "Agent: seconds between looks for instance work (changes also wake it at once)"))
    agent_heartbeat_interval: PositiveFloat = Field(default=5.0, description="Agent: seconds between heartbeats")
    agent_check_interval: PositiveFloat = Field(default=5.0, description=(
        "Agent: seconds between checks of idle guests against their desired state"))
    agent_shutdown_timeout: PositiveFloat = Field(default=30.0, description=(
        "Agent: seconds a guest gets to power off on its own before it is stopped"))
    agent_workers: PositiveInt = Field(default=4, description="Agent: instances worked on at once")
    agent_extensions: str = Field(default="hackboot.volumes.agent", description=(
        "Agent: comma-separated modules whose `attach(agent)` registers hooks with it (other services' "
        "host-side reconcilers)"))
    # VPC networking: the data plane of a host (read by the network agent extension).
    network_underlay_address: str | None = Field(default=None, description=(
        "Network agent: this host's underlay address with prefix (e.g. `192.0.2.11/24`), the VXLAN source "
        "other hosts reach; unset = a single host, no VXLAN"))
    network_underlay_namespace: str | None = Field(default=None, description=(
        "Network agent: an `hb-` namespace holding the bridge that joins the hosts' underlays (one machine "
        "playing several hosts); unset = the underlay link is configured by the operator"))
    network_mtu: PositiveInt = Field(default=1500, description=(
        "Network agent: underlay MTU (guests get it minus the VXLAN overhead)"))
    network_uplink_address: str | None = Field(default=None, description=(
        "Network agent: uplink address with prefix for floating IPs and NAT (e.g. `198.51.100.11/24`); "
        "unset = no uplink, nothing leaves the VPCs (the safe default)"))
    network_uplink_gateway: str | None = Field(default=None, description=(
        "Network agent: the uplink's next hop (needed with `network_uplink_address`)"))
    network_uplink_namespace: str | None = Field(default=None, description=(
        "Network agent: an `hb-` namespace playing the outside world at the other end of the uplink (tests, "
        "demos); unset = the operator's uplink"))
    network_dns_upstreams: str = Field(default="", description=(
        "Network agent: comma-separated resolvers the VPCs' DNS forwards other names to (empty = none)"))
    network_state_dir: Path | None = Field(default=None, description=(
        "Network agent: its state directory (default: `<agent state dir>/network`)"))
    network_workers: PositiveInt = Field(default=2, description="Network agent: VPCs worked on at once")
    network_poll_interval_s: PositiveFloat = Field(default=5.0, description=(
        "Network agent: seconds between polls of the VPCs' desired versions (wake-ups come sooner)"))
    network_resync_interval_s: PositiveFloat = Field(default=30.0, description=(
        "Network agent: seconds between full comparisons of the data plane with the desired state"))
    network_flow_log_interval_s: PositiveFloat = Field(default=5.0, description=(
        "Network agent: seconds between moves of flow records from the data plane into the database"))
    network_port_wait_s: PositiveFloat = Field(default=60.0, description=(
        "Network agent: how long a guest start waits for its VPC ports to exist"))
    # Load balancers (read by the load-balancer agent extension).
    loadbalancer_state_dir: Path | None = Field(default=None, description=(
        "Load-balancer agent: its state directory (default: `<agent state dir>/loadbalancers`)"))
    loadbalancer_workers: PositiveInt = Field(default=2, description=(
        "Load-balancer agent: load balancers worked on at once"))
    loadbalancer_poll_interval_s: PositiveFloat = Field(default=5.0, description=(
        "Load-balancer agent: seconds between looks for load-balancer work (changes also wake it at once)"))
    loadbalancer_resync_interval_s: PositiveFloat = Field(default=30.0, description=(
        "Load-balancer agent: seconds between comparisons of the running proxies with the desired state"))
    loadbalancer_observe_interval_s: PositiveFloat = Field(default=2.0, description=(
        "Load-balancer agent: seconds between moves of member health, stats and access logs into the database"))
    # Functions.
    functions_enabled: bool = Field(default=True, description=(
        "`serve` runs this machine's function invoker (needs bubblewrap; off where it is missing)"))
    functions_max_concurrency: PositiveInt = Field(default=32, description=(
        "Functions: invocations running at once on this machine (over it: 429, asynchronous ones wait)"))
    functions_project_concurrency: PositiveInt = Field(default=16, description=(
        "Functions: invocations of one project running at once on this machine (its fair share)"))
    functions_idle_s: PositiveFloat = Field(default=300.0, description=(
        "Functions: a warm sandbox idle this long is stopped (scale to zero)"))
    functions_poll_interval_s: PositiveFloat = Field(default=0.5, description=(
        "Functions: seconds between looks for asynchronous invocations, object events and queue messages"))
    # Block storage.
    volume_min_size_gb: PositiveInt = Field(default=1, description="Smallest volume size in GB")
    volume_max_size_gb: PositiveInt = Field(default=16 * 1024, description=(
        "Largest volume size in GB (16 TiB, like the large public-cloud block volumes)"))
    volume_detach_timeout_s: PositiveFloat = Field(default=30.0, description=(
        "How long a detach waits for the guest to release the disk (a forced detach then cuts it off)"))
    volume_backup_endpoint: str = Field(default="", description=(
        "S3 endpoint URL of volume backups; empty: this cloud's own S3 service"))
    volume_backup_region: str = Field(default="PAR1", description="Region of the volume backups' buckets")
    volume_scheduler_interval_s: PositiveFloat = Field(default=10.0, description=(
        "How often backup policies, retention and purges of deleted backups run"))
    volume_poll_interval_s: PositiveFloat = Field(default=1.0, description=(
        "Volume agent: seconds between looks for volume work (changes also wake it at once)"))
    volume_check_interval_s: PositiveFloat = Field(default=5.0, description=(
        "Volume agent: seconds between checks of idle volumes against their desired state"))
    volume_workers: PositiveInt = Field(default=3, description="Volume agent: volumes worked on at once")
    volume_max_chain_incrementals: PositiveInt = Field(default=28, description=(
        "A full backup after this many incrementals: for backups outside a policy, and as the default "
        "full_every of new backup policies"))
    volume_test_tiers: bool = Field(default=False, description=(
        "Test only: also offer the test-200iops storage tier (slow enough for an emulated guest to hit)"))
    volume_crash_at: str = Field(default="", description=(
        "Test only (crash tests): the process kills itself (SIGKILL) when the volume agent reaches this "
        "fault point"))

    @model_validator(mode="after")
    def _volume_sizes_ordered(self) -> Settings:
        if self.volume_min_size_gb > self.volume_max_size_gb:
            raise ValueError(f"volume_min_size_gb ({self.volume_min_size_gb}) exceeds volume_max_size_gb "
                             f"({self.volume_max_size_gb})")
        return self

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


def _type_text(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:  # a constrained type: its base type
        return _type_text(get_args(annotation)[0])
    if origin is Literal:
        return " or ".join(str(value) for value in get_args(annotation))
    if origin in (Union, UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        text = " or ".join(_type_text(arg) for arg in args)
        return f"{text} (optional)" if len(args) < len(get_args(annotation)) else text
    return str(getattr(annotation, "__name__", annotation))


def markdown_table() -> str:
    """Every setting as a Markdown table (the README's Configuration section holds this output)."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| Environment variable | TOML key | Type | Default | Description |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{prefix}{name.upper()}` | `{name}` | {_type_text(field.annotation)} "
                     f"| `{_default_text(name)}` | {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m hackboot.core.config --markdown")
    sys.stdout.write(markdown_table())
