"""second schema "refData", price tiers with a generated column, report numbers

* ``"refData"."Currency"``: a seeded table in a second, mixed-case schema,
  with a natural ``char(3)`` key and columns called ``"decimal places"`` and
  ``"order"`` (a space, a reserved word): every name must be quoted.
* ``price_tier``: ``smallint GENERATED ALWAYS AS IDENTITY``, a foreign key
  into the other schema's seeded table, and ``span_cents``, a ``GENERATED
  ALWAYS AS (...) STORED`` column: it cannot be inserted, and a row written
  back by a reset must not name it.
* ``report_number_seq``: a standalone sequence no column uses; the migration
  moves it with ``setval(..., 500)`` (called), so the next value is 501.
  Nothing links it to a table: only a catalog scan of sequences finds it.

Revision ID: seeded_0002
Revises: seeded_0001
Create Date: 2025-04-08 09:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "seeded_0002"
down_revision: str | Sequence[str] | None = "seeded_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURRENCIES = [
    {"code": "EUR", "name": "Euro", "decimal places": 2, "order": 1},
    {"code": "USD", "name": "US Dollar", "decimal places": 2, "order": 2},
    # Wrong on purpose: the data migration in seeded_0003 corrects it to 0.
    {"code": "JPY", "name": "Yen", "decimal places": 2, "order": 3},
    {"code": "GBP", "name": "Pound Sterling", "decimal places": 2, "order": 4},
]


def upgrade() -> None:
    """Upgrade schema."""
    op.execute('CREATE SCHEMA "refData"')
    op.create_table(
        "Currency",
        sa.Column("code", sa.CHAR(3), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("decimal places", sa.SmallInteger, nullable=False),
        sa.Column("order", sa.SmallInteger, nullable=False, unique=True),
        schema="refData",
    )
    currency = sa.table(
        "Currency",
        sa.column("code", sa.CHAR(3)),
        sa.column("name", sa.Text),
        sa.column("decimal places", sa.SmallInteger),
        sa.column("order", sa.SmallInteger),
        schema="refData",
    )
    op.bulk_insert(currency, CURRENCIES)

    op.execute(
        """
        CREATE TABLE price_tier (
            id smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL UNIQUE,
            currency_code char(3) NOT NULL REFERENCES "refData"."Currency" (code),
            min_cents integer NOT NULL,
            max_cents integer NOT NULL,
            span_cents integer GENERATED ALWAYS AS (max_cents - min_cents) STORED,
            CHECK (max_cents > min_cents)
        )
        """
    )
    op.execute(
        """
        INSERT INTO price_tier (name, currency_code, min_cents, max_cents) VALUES
            ('basic', 'EUR', 0, 1000),
            ('plus', 'EUR', 1000, 5000),
            ('pro', 'USD', 5000, 20000)
        """
    )

    op.execute("CREATE SEQUENCE report_number_seq AS bigint")
    op.execute("SELECT setval('report_number_seq', 500)")


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DROP SEQUENCE report_number_seq")
    op.execute("DROP TABLE price_tier")
    op.execute('DROP SCHEMA "refData" CASCADE')
