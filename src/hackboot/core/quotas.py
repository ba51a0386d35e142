"""Per-project quotas, enforced atomically in the database.

A claim is one conditional UPDATE (`used + n <= limit`): two concurrent requests can
never both take the last unit, on SQLite or PostgreSQL, without any lock in Python.
The claim runs in the caller's transaction, so a failed create releases it too.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import BigInteger, CursorResult, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from hackboot.core import errors
from hackboot.core.db import Base

# resource → default limit for a new project (the seed's VPS/GPU sizes fit in these)
DEFAULT_QUOTAS: dict[str, int] = {
    "instances": 20,
    "vcpus": 64,
    "ram_mb": 256 * 1024,
    "gpus": 2,
    "volumes": 50,
    "volume_gb": 2000,
    "snapshots": 100,
    "images": 20,
    "buckets": 100,
    "object_bytes": 1024**4,
    "objects": 10_000_000,
    "webhooks": 20,
    # VPC networking (AWS's defaults where it has one)
    "vpcs": 5,
    "subnets": 50,
    "network_interfaces": 200,
    "security_groups": 50,
    "security_group_rules": 100,  # per security group: `used` shows the project's fullest group
    "floating_ips": 5,
    "flow_logs": 20,
    # Load balancers (listeners, pools, members: per project, across its load balancers)
    "load_balancers": 10,
    "listeners": 50,
    "pools": 50,
    "members": 500,
    "certificates": 50,
    # Functions: function_concurrency bounds the sum of reserved concurrency and each function's maximum
    "functions": 50,
    "function_triggers": 100,
    "function_concurrency": 100,
    "queues": 100,
}


class QuotaUsage(Base):
    __tablename__ = "quota_usage"
    project_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    resource: Mapped[str] = mapped_column(String(32), primary_key=True)
    limit: Mapped[int] = mapped_column("limit_value", BigInteger)
    used: Mapped[int] = mapped_column(BigInteger, default=0)


def init_project_quotas(session: Session, project_id: str) -> None:
    for resource, limit in DEFAULT_QUOTAS.items():
        session.add(QuotaUsage(project_id=project_id, resource=resource, limit=limit, used=0))


def claim(session: Session, project_id: str, resource: str, amount: int) -> None:
    """Take `amount` units or raise QuotaExceeded; part of the caller's transaction."""
    if amount <= 0:
        return
    # An UPDATE's result is a CursorResult (it has the row count); Session.execute is typed for any statement.
    result = cast("CursorResult[Any]", session.execute(
        update(QuotaUsage)
        .where(QuotaUsage.project_id == project_id, QuotaUsage.resource == resource,
               QuotaUsage.used + amount <= QuotaUsage.limit)
        .values(used=QuotaUsage.used + amount)
    ))
    if result.rowcount != 1:
        row = session.get(QuotaUsage, (project_id, resource))
        if row is None:
            raise errors.QuotaExceeded(f"Project has no quota for '{resource}'")
        raise errors.QuotaExceeded(
            f"Quota exceeded for {resource}: {row.used} of {row.limit} used, {amount} more requested")


def release(session: Session, project_id: str, resource: str, amount: int) -> None:
    if amount <= 0:
        return
    session.execute(
        update(QuotaUsage)
        .where(QuotaUsage.project_id == project_id, QuotaUsage.resource == resource)
        .values(used=QuotaUsage.used - amount)
    )


def set_limit(session: Session, project_id: str, resource: str, limit: int) -> QuotaUsage:
    if resource not in DEFAULT_QUOTAS:
        raise errors.ValidationFailed(f"Unknown quota resource '{resource}'",
                                      errors=[{"loc": ["resource"], "msg": f"one of {sorted(DEFAULT_QUOTAS)}"}])
    row = session.get(QuotaUsage, (project_id, resource))
    if row is None:
        row = QuotaUsage(project_id=project_id, resource=resource, limit=limit, used=0)
        session.add(row)
    row.limit = limit
    return row


def usage(session: Session, project_id: str) -> list[QuotaUsage]:
    return list(session.scalars(select(QuotaUsage).where(QuotaUsage.project_id == project_id)
                                .order_by(QuotaUsage.resource)))
