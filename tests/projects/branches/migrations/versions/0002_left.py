"""create left_thing (first head)

Revision ID: branches_left
Revises: branches_base
Create Date: 2025-03-01 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "branches_left"
down_revision: str | Sequence[str] | None = "branches_base"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "left_thing",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("base_id", sa.Integer, sa.ForeignKey("base_thing.id"), nullable=False),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("left_thing")
