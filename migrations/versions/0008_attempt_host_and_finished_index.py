"""several hosts: each attempt's host id; an index for the windowed figures

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Additive (no min_code_revision): code of 0007 runs on it, so hosts can be upgraded
one by one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('host_id', sa.String(length=63), nullable=True))
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_tenant_finished_at', ['tenant', 'finished_at'])
        batch_op.create_index('ix_runs_finished_at', ['finished_at'])


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_finished_at')
        batch_op.drop_index('ix_runs_tenant_finished_at')
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('host_id')
