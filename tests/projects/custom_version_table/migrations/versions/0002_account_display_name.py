"""add account.display_name

Revision ID: cvt_0002
Revises: cvt_0001
Create Date: 2025-03-02 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "cvt_0002"
down_revision: str | Sequence[str] | None = "cvt_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column(
        "account",
        sa.Column("display_name", sa.Text),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("account", "display_name")
