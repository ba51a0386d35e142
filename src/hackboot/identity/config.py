"""Tuning knobs of the identity service.

Read from the settings object when it has them, else from `HACKBOOT_<NAME>` in the environment,
else from the default here (as `hackboot.events.config` does), so they can move into `Settings`
without any change here.
"""

from __future__ import annotations

import os
from typing import Any

from hackboot.core.config import get_settings

DEFAULTS: dict[str, Any] = {
    # Projects an organisation may hold (organisation admins create them; superusers are exempt).
    "org_max_projects": 100,
    # Password login throttling, per username and per source address; only failures count.
    # After the free failures, each further attempt waits base * 2**n seconds (capped).
    "login_user_free_failures": 5,
    "login_source_free_failures": 100,
    "login_backoff_base_s": 1.0,
    "login_backoff_max_s": 900.0,
    # A counter untouched for this long starts again from zero.
    "login_failure_window_s": 3600.0,
}


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
        return type(default)(raw)
    except ValueError:
        raise ValueError(f"HACKBOOT_{name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
