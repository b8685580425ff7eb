"""data migration: rename, correct, delete and add seeded rows

A later revision that changes what earlier ones seeded, as real projects do:

* ``role``: 'admin' becomes 'administrator'; 'guest' (id 4) is deleted, its
  ``role_permission`` rows go with it (ON DELETE CASCADE).  The remaining ids
  are 1-3 but the identity continues at 5, not 4: "max(id) + 1" is wrong.
* ``permission``: 'delete' gets a new description; 'export' is added and
  takes id 4 from the sequence (the system row with id 100 stays), so the
  next id is 5 while ``max(id)`` is 100.
* ``status``: 'archived' (id 3) is deleted; the serial continues at 4.
* ``"refData"."Currency"``: JPY's ``"decimal places"`` is corrected to 0.
* ``price_tier``: 'plus' is widened; its generated ``span_cents`` follows.
* ``ticket_kind``: 'incident' takes 115 from ``standalone_seq``: the
  sequence owned by nobody continues at 120.

A reset that replays only the first revision's seeds, or keeps the seeded
rows as first inserted, leaves the wrong rows.

Revision ID: seeded_0003
Revises: seeded_0002
Create Date: 2025-04-15 09:00:00.000000

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "seeded_0003"
down_revision: str | Sequence[str] | None = "seeded_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute("UPDATE role SET name = 'administrator' WHERE name = 'admin'")
    op.execute("DELETE FROM role WHERE name = 'guest'")
    op.execute("UPDATE permission SET description = 'Remove anything' WHERE code = 'delete'")
    op.execute("INSERT INTO permission (code, description) VALUES ('export', 'Download data')")
    op.execute("DELETE FROM status WHERE code = 'archived'")
    op.execute("""UPDATE "refData"."Currency" SET "decimal places" = 0 WHERE code = 'JPY'""")
    op.execute("UPDATE price_tier SET max_cents = 8000 WHERE name = 'plus'")
    op.execute("INSERT INTO ticket_kind (name) VALUES ('incident')")


def downgrade() -> None:
    """Downgrade schema (data migrations are not reversed)."""
