"""objectstore: the owner of an object written under ObjectWriter ownership

Revision ID: objectstore_0004
Revises: objectstore_0003
Create Date: 2026-12-01 11:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'objectstore_0004'
down_revision = 'objectstore_0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('s3_objects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=40), nullable=True))
    with op.batch_alter_table('s3_uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('s3_uploads', schema=None) as batch_op:
        batch_op.drop_column('owner')
    with op.batch_alter_table('s3_objects', schema=None) as batch_op:
        batch_op.drop_column('owner')
