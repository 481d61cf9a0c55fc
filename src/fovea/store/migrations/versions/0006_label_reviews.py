"""reviews of suspected label errors in a training data set

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 18:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=20), server_default='upload', nullable=False))
        batch_op.add_column(sa.Column('given', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('data_root', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_column('data_root')
        batch_op.drop_column('given')
        batch_op.drop_column('kind')
