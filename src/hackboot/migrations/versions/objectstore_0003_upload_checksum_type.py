"""objectstore: checksum type of multipart uploads (COMPOSITE or FULL_OBJECT)

Revision ID: objectstore_0003
Revises: objectstore_0002
Create Date: 2026-12-01 11:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'objectstore_0003'
down_revision = 'objectstore_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('s3_uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checksum_type', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('s3_uploads', schema=None) as batch_op:
        batch_op.drop_column('checksum_type')
