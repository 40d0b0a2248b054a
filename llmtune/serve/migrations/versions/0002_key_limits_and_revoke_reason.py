"""Per-key rate limits and the reason a key was revoked.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("revoke_reason", sa.String(500), nullable=True))
        batch.add_column(sa.Column("requests_per_minute", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("burst", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("burst")
        batch.drop_column("requests_per_minute")
        batch.drop_column("revoke_reason")
