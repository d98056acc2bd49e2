"""fair dequeue: each run's priority among its tenant's runs

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

Additive (no min_code_revision): code of 0008 runs on it (its inserts get the
server default, normal), so hosts can be upgraded one by one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.String(length=8), nullable=False,
                                      server_default='normal'))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('priority')
