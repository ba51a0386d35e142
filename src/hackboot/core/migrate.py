"""Apply Alembic migrations on start (never `create_all` in production paths)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    command.upgrade(alembic_config(url), "heads")


def revision(url: str, message: str, branch: str | None = None, head: str = "heads",
             depends_on: str | None = None) -> None:
    """Developer helper: autogenerate a migration (`python -m hackboot.core.migrate`)."""
    command.revision(alembic_config(url), message=message, autogenerate=True, head=head,
                     branch_label=branch, depends_on=depends_on)


if __name__ == "__main__":
    import sys
    import tempfile

    # usage: python -m hackboot.core.migrate "message" [--branch NAME --head base] [--depends-on REV]
    args = sys.argv[1:]
    opts = dict(zip(args[1::2], args[2::2], strict=False))
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/rev.db"
        upgrade(db)
        revision(db, args[0], branch=opts.get("--branch"), head=opts.get("--head", "heads"),
                 depends_on=opts.get("--depends-on"))
