"""functions: asynchronous invocations, the event-log cursor of object-storage triggers, a function's
dead-letter queue

Revision ID: functions_0002
Revises: functions_0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import hackboot.core.db

revision = 'functions_0002'
down_revision = 'functions_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('function_async_invocations',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('function_id', sa.String(length=40), nullable=False),
    sa.Column('qualifier', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('trigger_id', sa.String(length=40), nullable=True),
    sa.Column('event', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', hackboot.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.String(length=1024), nullable=False),
    sa.Column('created_at', hackboot.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_function_async_invocations'))
    )
    with op.batch_alter_table('function_async_invocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_function_async_invocations_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_function_async_invocations_function_id'), ['function_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_function_async_invocations_next_attempt_at'), ['next_attempt_at'],
                              unique=False)
    op.create_table('function_event_cursors',
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_function_event_cursors'))
    )
    with op.batch_alter_table('functions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dead_letter_queue_id', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('functions', schema=None) as batch_op:
        batch_op.drop_column('dead_letter_queue_id')
    op.drop_table('function_event_cursors')
    with op.batch_alter_table('function_async_invocations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_function_async_invocations_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_function_async_invocations_function_id'))
        batch_op.drop_index(batch_op.f('ix_function_async_invocations_project_id'))
    op.drop_table('function_async_invocations')
