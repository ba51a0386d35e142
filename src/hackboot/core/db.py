"""Database engine, declarative base and short-lived sessions.

SQLite (one machine) and PostgreSQL (many machines) run the same code. On SQLite
every write transaction starts with BEGIN IMMEDIATE: the write lock is taken up
front, so two writers queue on busy_timeout instead of dead-locking when both
upgrade a read lock. Read-only sessions use a deferred BEGIN and run in parallel
with writers thanks to WAL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from sqlalchemy import DateTime, Engine, MetaData, Table, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.types import TypeDecorator

from hackboot.core.config import get_settings

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime()}
    # Every model maps one Table (none maps a join or a select), so hot paths can run Core statements
    # on `Model.__table__` (insert/update/delete take a Table, not any FromClause).
    __table__: ClassVar[Table]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_engine: Engine | None = None
_read_engine: Engine | None = None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                               max_overflow=20)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see module docstring)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # acknowledged means durable
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


def get_engine() -> Engine:
    global _engine, _read_engine
    if _engine is None:
        _engine = make_engine(get_settings().effective_database_url)
        _read_engine = _engine.execution_options(sqlite_begin="DEFERRED")
    return _engine


def dispose_engine() -> None:
    global _engine, _read_engine
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _read_engine = None


@contextmanager
def session_scope(*, write: bool = True) -> Iterator[Session]:
    """A short transaction: commit on success, roll back on any error.

    Never do slow work (processes, network, disk copies) inside one.
    """
    engine = get_engine()
    bind = engine if write else _read_engine
    session = Session(bind=bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_postgres() -> bool:
    return get_engine().dialect.name == "postgresql"
