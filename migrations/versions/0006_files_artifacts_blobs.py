"""files in, artifacts out: uploaded files, run files, artifacts, database blobs, reuse

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('files', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('reuse_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('reused_from', sa.String(length=36), nullable=True))
        batch_op.create_index('ix_runs_tenant_reuse_key', ['tenant', 'reuse_key'])
    op.create_table(
        'files',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('media_type', sa.String(length=255), nullable=False),
        sa.Column('declared_media_type', sa.String(length=255), nullable=True),
        sa.Column('name', sa.String(length=255), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('touched_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'sha256'),
    )
    op.create_index('ix_files_touched_at', 'files', ['touched_at'])
    op.create_index('ix_files_sha256', 'files', ['sha256'])
    op.create_table(
        'run_files',
        sa.Column('run_id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'name'),
    )
    op.create_index('ix_run_files_tenant_sha256', 'run_files', ['tenant', 'sha256'])
    op.create_table(
        'artifacts',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('run_id', sa.String(length=36), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=1024), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('media_type', sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_artifacts_run_attempt', 'artifacts', ['run_id', 'attempt'])
    op.create_index('ix_artifacts_sha256', 'artifacts', ['sha256'])
    op.create_table(
        'blobs',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('key', sa.String(length=200), nullable=True),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('key'),
    )
    op.create_table(
        'blob_chunks',
        sa.Column('blob_id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('blob_id', 'seq'),
    )


def downgrade() -> None:
    op.drop_table('blob_chunks')
    op.drop_table('blobs')
    op.drop_index('ix_artifacts_sha256', table_name='artifacts')
    op.drop_index('ix_artifacts_run_attempt', table_name='artifacts')
    op.drop_table('artifacts')
    op.drop_index('ix_run_files_tenant_sha256', table_name='run_files')
    op.drop_table('run_files')
    op.drop_index('ix_files_sha256', table_name='files')
    op.drop_index('ix_files_touched_at', table_name='files')
    op.drop_table('files')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_tenant_reuse_key')
        batch_op.drop_column('reused_from')
        batch_op.drop_column('reuse_key')
        batch_op.drop_column('files')
