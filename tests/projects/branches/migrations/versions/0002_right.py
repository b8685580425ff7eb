"""create right_thing (second head, not merged)

Revision ID: branches_right
Revises: branches_base
Create Date: 2025-03-01 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "branches_right"
down_revision: str | Sequence[str] | None = "branches_base"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "right_thing",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("note", sa.Text),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("right_thing")
