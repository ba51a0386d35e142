"""Tuning knobs of the events service.

`webhook_timeout_s` and `webhook_max_attempts` live in `hackboot.core.config.Settings`. The knobs
below are read from the settings object when it has them, else from `HACKBOOT_<NAME>` in the
environment, else from the default here, so they can move into `Settings` without any change here.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from hackboot.core.config import get_settings

T = TypeVar("T", bool, int, float, str)

DEFAULTS: dict[str, Any] = {
    # Webhook retries: base * 2**(attempt-1), capped, with jitter (see webhooks.backoff_delay).
    "webhook_backoff_base_s": 1.0,
    "webhook_backoff_max_s": 3600.0,
    # How often the webhook sender looks for due deliveries.
    "webhook_poll_interval_s": 1.0,
    # Allow webhook URLs that resolve to loopback, private, link-local… addresses (SSRF guard).
    # Off by default, as in GitLab: a tenant must not make the cloud call its own internal services.
    "webhook_allow_private_targets": False,
    # Events, webhook deliveries and audit records older than this are deleted; 0 keeps everything.
    "events_retention_days": 90,
    # Server-sent events: database poll interval and keep-alive comment interval.
    "events_stream_poll_s": 0.5,
    "events_stream_heartbeat_s": 15.0,
}


def _cast(raw: str, default: T) -> T:
    if isinstance(default, bool):
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True  # type: ignore[return-value]
        if value in ("0", "false", "no", "off", ""):
            return False  # type: ignore[return-value]
        raise ValueError(f"not a boolean: {raw!r}")
    return type(default)(raw)


def setting(name: str) -> Any:
    """The value of knob `name` (settings object, then HACKBOOT_<NAME>, then the default)."""
    settings = get_settings()
    if name in type(settings).model_fields:
        return getattr(settings, name)
    default = DEFAULTS[name]
    raw = os.environ.get(f"HACKBOOT_{name.upper()}")
    if raw is None:
        return default
    try:
        return _cast(raw, default)
    except ValueError:
        raise ValueError(f"HACKBOOT_{name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
