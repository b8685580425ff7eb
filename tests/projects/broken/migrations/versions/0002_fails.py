"""create bad_thing: fails, references a table that does not exist

PostgreSQL raises ``relation "missing_table" does not exist`` (SQLSTATE 42P01).
Alembic runs the whole upgrade in one transaction on PostgreSQL (transactional
DDL, ``transaction_per_migration`` off), so good_thing from the first
revision is rolled back too and the database is left as it was.

Revision ID: broken_0002
Revises: broken_0001
Create Date: 2025-03-02 10:00:00.000000

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "broken_0002"
down_revision: str | Sequence[str] | None = "broken_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute(
        """
        CREATE TABLE bad_thing (
            id serial PRIMARY KEY,
            missing_id integer NOT NULL REFERENCES missing_table (id)
        )
        """
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DROP TABLE IF EXISTS bad_thing")
