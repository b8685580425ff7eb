"""page views (partitioned), reporting view and materialized view

* ``page_view`` is range-partitioned on ``viewed_at`` with two partitions;
  its bigserial sequence is owned by the partitioned parent.  TRUNCATE of the
  parent empties the partitions.
* ``order_summary`` is a view and ``customer_order_totals`` a materialized
  view: neither can be truncated ("is not a table").  The materialized view
  keeps its rows until it is refreshed.

Revision ID: 0e0692925689
Revises: 6807df343641
Create Date: 2025-02-20 14:27:51.066093

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0e0692925689"
down_revision: str | Sequence[str] | None = "6807df343641"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute(
        """
        CREATE TABLE page_view (
            id bigserial NOT NULL,
            user_profile_id bigint
                REFERENCES "UserProfile" (id) ON DELETE CASCADE,
            path text NOT NULL,
            viewed_at timestamptz NOT NULL,
            PRIMARY KEY (id, viewed_at),
            UNIQUE (user_profile_id, path, viewed_at)
        ) PARTITION BY RANGE (viewed_at)
        """
    )
    op.execute(
        """
        CREATE TABLE page_view_before_2025 PARTITION OF page_view
            FOR VALUES FROM (MINVALUE) TO ('2025-01-01 00:00:00+00')
        """
    )
    op.execute(
        """
        CREATE TABLE page_view_since_2025 PARTITION OF page_view
            FOR VALUES FROM ('2025-01-01 00:00:00+00') TO (MAXVALUE)
        """
    )

    op.execute(
        """
        CREATE VIEW order_summary AS
        SELECT o.id AS order_id,
               o.reference,
               o.status,
               p.email,
               count(li.id) AS line_count,
               coalesce(sum(li.quantity * li.unit_price), 0) AS total
        FROM "order" o
        JOIN "UserProfile" p ON p.id = o.user_profile_id
        LEFT JOIN "line item-x" li ON li.order_id = o.id
        GROUP BY o.id, p.email
        """
    )
    op.execute(
        """
        CREATE MATERIALIZED VIEW customer_order_totals AS
        SELECT p.id AS user_profile_id,
               p.email,
               count(DISTINCT o.id) AS orders,
               coalesce(sum(li.quantity * li.unit_price), 0) AS spent
        FROM "UserProfile" p
        LEFT JOIN "order" o ON o.user_profile_id = p.id
        LEFT JOIN "line item-x" li ON li.order_id = o.id
        GROUP BY p.id, p.email
        WITH DATA
        """
    )
    # A unique index allows REFRESH MATERIALIZED VIEW CONCURRENTLY.
    op.execute(
        "CREATE UNIQUE INDEX customer_order_totals_user_profile_id_idx "
        "ON customer_order_totals (user_profile_id)"
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DROP MATERIALIZED VIEW customer_order_totals")
    op.execute("DROP VIEW order_summary")
    op.execute("DROP TABLE page_view")
