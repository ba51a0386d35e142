"""Password login throttling: per username and per source address, exponential backoff, 429.

Every attempt is counted as a failure *before* the password is checked, in one short write
transaction on a locked row: parallel guesses cannot slip past the limit, and the count holds
across API worker processes. A success then clears the username's counter and gives the source
its attempt back, so only failures add up. Once a counter reaches its free allowance, each
further attempt must wait base * 2**n seconds (capped): 429 with `Retry-After`.
"""

from __future__ import annotations

import datetime as dt
import math
import random

from sqlalchemy import delete, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from hackboot.core import errors
from hackboot.core.config import get_settings
from hackboot.core.db import is_postgres, session_scope, utcnow
from hackboot.identity.models import LoginThrottle


class TooManyAttempts(errors.ApiError):
    status = 429
    code = "too_many_attempts"
    title = "Too many requests"


def _keys(username: str, source: str) -> list[tuple[str, int]]:
    return [(f"user:{username}", get_settings().login_user_free_failures),
            (f"source:{source}", get_settings().login_source_free_failures)]


def _locked_row(s: Session, key: str, now: dt.datetime) -> LoginThrottle:
    insert = pg_insert if is_postgres() else sqlite_insert
    s.execute(insert(LoginThrottle).values(key=key, failures=0, updated_at=now)
              .on_conflict_do_nothing(index_elements=["key"]))
    row = s.scalar(select(LoginThrottle).where(LoginThrottle.key == key).with_for_update())
    assert row is not None
    return row


def _count(s: Session, key: str, free: int, now: dt.datetime) -> float | None:
    """Count one more attempt on `key`; the seconds to wait instead when it is locked out."""
    row = _locked_row(s, key, now)
    if row.locked_until is not None and row.locked_until > now:
        return (row.locked_until - now).total_seconds()
    if now - row.updated_at > dt.timedelta(seconds=get_settings().login_failure_window_s):
        row.failures = 0
    row.failures += 1
    row.updated_at = now
    if row.failures >= free:
        delay = min(get_settings().login_backoff_base_s * 2 ** min(row.failures - free, 30),
                    get_settings().login_backoff_max_s)
        row.locked_until = now + dt.timedelta(seconds=delay)
    return None


def reserve(username: str, source: str) -> None:
    """Count this login attempt as a failure, or raise 429 if the username or the source must wait."""
    now = utcnow()
    with session_scope() as s:
        if random.random() < 0.01:  # keep the table small: forget idle, unlocked counters
            window = dt.timedelta(seconds=get_settings().login_failure_window_s)
            s.execute(delete(LoginThrottle).where(
                LoginThrottle.updated_at < now - window,
                or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until < now)))
        waits = [w for key, free in _keys(username, source) if (w := _count(s, key, free, now)) is not None]
        if waits:
            # Raising rolls the transaction back: a refused attempt does not lengthen the lockout.
            retry = max(1, math.ceil(max(waits)))
            raise TooManyAttempts(f"Too many failed logins: try again in {retry} s",
                                  headers={"Retry-After": str(retry)})


def succeeded(username: str, source: str) -> None:
    """The password was right: clear the username's counter and give the source its attempt back."""
    user_key, (source_key, free) = (f"user:{username}", _keys(username, source)[1])
    with session_scope() as s:
        s.execute(delete(LoginThrottle).where(LoginThrottle.key == user_key))
        row = s.scalar(select(LoginThrottle).where(LoginThrottle.key == source_key).with_for_update())
        if row is not None:
            row.failures = max(0, row.failures - 1)
            if row.failures < free:
                row.locked_until = None
