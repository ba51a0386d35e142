"""Alembic environment: one linear history per service (branch labels), applied with `upgrade heads`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from hackboot.core.db import make_engine
from hackboot.models import metadata

config = context.config


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url) if url else engine_from_config(config.get_section(config.config_ini_section, {}),
                                                              poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
