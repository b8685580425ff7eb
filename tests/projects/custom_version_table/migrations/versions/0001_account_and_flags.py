"""create public.account and meta.feature_flag

The schema ``meta`` also holds the version table ``meta.schema_history``
(created by env.py / Alembic, not here): a reset of schema ``meta`` must empty
``meta.feature_flag`` and leave ``meta.schema_history`` alone.

Revision ID: cvt_0001
Revises:
Create Date: 2025-03-01 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "cvt_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # env.py creates the schema already; repeated here so the migration does
    # not depend on it.
    op.execute("CREATE SCHEMA IF NOT EXISTS meta")
    op.create_table(
        "account",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("email", sa.Text, nullable=False, unique=True),
    )
    op.create_table(
        "feature_flag",
        sa.Column("id", sa.Integer, primary_key=True),  # serial
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.false()),
        schema="meta",
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("feature_flag", schema="meta")
    op.drop_table("account")
