"""identity: organisation roles (owner/admin/member) on users

Revision ID: core_0003
Revises: core_0002
Create Date: 2026-12-01 00:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'core_0003'
down_revision = 'core_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('org_role', sa.String(length=16), server_default='member', nullable=False))
    # The bootstrap administrator (and any other superuser) owns its organisation.
    op.execute("UPDATE users SET org_role = 'owner' WHERE is_superuser")


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('org_role')
