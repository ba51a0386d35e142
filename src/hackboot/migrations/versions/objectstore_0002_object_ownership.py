"""objectstore: S3 Object Ownership per bucket

Revision ID: objectstore_0002
Revises: objectstore_0001
Create Date: 2026-12-01 11:30:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'objectstore_0002'
down_revision = 'objectstore_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('s3_buckets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('object_ownership', sa.String(length=24), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('s3_buckets', schema=None) as batch_op:
        batch_op.drop_column('object_ownership')
