"""Fill the example schema with a handful of rows: the "before" state of a demo.

Usage::

    python examples/seed.py [URL]        # or set DATABASE_URL

The URL may be any SQLAlchemy PostgreSQL URL (``postgresql+psycopg://``,
``postgresql+asyncpg://``, ``postgresql://``, ``postgres://``); the script
itself talks to the database with psycopg 3.  It expects the database to be
migrated to head (``alembic upgrade head``).  Running it twice is harmless:
rows with natural keys are skipped, only the sequences move on.
"""

from __future__ import annotations

import os
import sys

import psycopg
from psycopg import sql

USERS = [
    # email, displayName, referred by (email)
    ("ada@example.com", "Ada Lovelace", None),
    ("grace@example.com", "Grace Hopper", "ada@example.com"),
    ("edsger@example.com", "Edsger Dijkstra", "grace@example.com"),
    ("barbara@example.com", "Barbara Liskov", "ada@example.com"),
]

ADDRESSES = [
    # email, line1, city, postal code, country
    ("ada@example.com", "5 Rue de Rivoli", "Paris", "75004", "FR"),
    ("grace@example.com", "1 Navy Yard", "Arlington", "22202", "US"),
    ("edsger@example.com", "Oudegracht 200", "Utrecht", "3511 NR", "NL"),
    ("barbara@example.com", "32 Vassar Street", "Cambridge", "02139", "US"),
    ("barbara@example.com", "Marktplatz 1", "Berlin", "10178", "DE"),
]

ORDERS = [
    # reference, email, status, placed at, source system
    ("ORD-0001", "ada@example.com", "shipped", "2024-11-02 10:15:00+00", "web"),
    ("ORD-0002", "grace@example.com", "paid", "2025-01-17 08:30:00+00", "web"),
    ("ORD-0003", "grace@example.com", "new", "2025-02-01 19:45:00+00", "pos"),
    ("ORD-0004", "barbara@example.com", "cancelled", "2025-02-03 12:00:00+00", "pos"),
]

LINE_ITEMS = [
    # order reference, sku, quantity, unit price, "select"
    ("ORD-0001", "BOOK-ANALYTICAL-ENGINE", 1, "42.00", True),
    ("ORD-0001", "PUNCH-CARDS-100", 3, "4.50", False),
    ("ORD-0002", "COBOL-MANUAL", 2, "19.90", True),
    ("ORD-0003", "MOTH-IN-A-FRAME", 1, "99.00", False),
    ("ORD-0004", "CLU-REFERENCE", 1, "35.00", False),
]

PAYMENTS = [
    # order reference, external reference, amount
    ("ORD-0001", "psp_1a2b3c", "55.50"),
    ("ORD-0002", "psp_4d5e6f", "20.00"),
    ("ORD-0002", "psp_7a8b9c", "19.80"),
]

PAGE_VIEWS = [
    # email, path, viewed at (one partition per year boundary side)
    ("ada@example.com", "/", "2024-10-30 09:00:00+00"),
    ("ada@example.com", "/books/analytical-engine", "2024-11-02 10:10:00+00"),
    ("grace@example.com", "/manuals/cobol", "2025-01-17 08:25:00+00"),
    ("edsger@example.com", "/goto-considered-harmful", "2025-02-02 07:00:00+00"),
    (None, "/", "2025-02-04 00:00:01+00"),
]

TABLES = [
    ("public", "country_regions"),
    ("public", "country_codes"),
    ("public", "UserProfile"),
    ("public", "address"),
    ("public", "order"),
    ("public", "line item-x"),
    ("public", "invoice"),
    ("public", "payment"),
    ("public", "page_view"),
    ("public", "page_view_before_2025"),
    ("public", "page_view_since_2025"),
    ("public", "customer_order_totals"),
    ("audit", "source_system"),
    ("audit", "event"),
]


def conninfo_from_url(url_text: str) -> dict[str, str]:
    """libpq parameters for any SQLAlchemy-style PostgreSQL URL (asyncpg's too)."""
    from dbreset.database import conninfo_params

    return conninfo_params(url_text)


def seed(conn: psycopg.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO audit.source_system (name) VALUES ('web'), ('pos') "
            "ON CONFLICT (name) DO NOTHING"
        )

        for email, display_name, _ in USERS:
            cur.execute(
                'INSERT INTO "UserProfile" (email, "displayName") VALUES (%s, %s) '
                "ON CONFLICT (email) DO NOTHING",
                (email, display_name),
            )
        for email, _, referrer in USERS:
            if referrer is not None:
                cur.execute(
                    'UPDATE "UserProfile" SET referred_by_id = '
                    '(SELECT id FROM "UserProfile" WHERE email = %s) WHERE email = %s',
                    (referrer, email),
                )

        for email, line1, city, postal_code, country in ADDRESSES:
            cur.execute(
                "INSERT INTO address (user_profile_id, line1, city, postal_code, country_code) "
                'SELECT id, %s, %s, %s, %s FROM "UserProfile" WHERE email = %s '
                "ON CONFLICT (user_profile_id, line1) DO NOTHING",
                (line1, city, postal_code, country, email),
            )

        # "order".id is GENERATED ALWAYS AS IDENTITY: never given explicitly.
        # Each new order fires the audit trigger (one row in audit.event).
        for reference, email, status, placed_at, source in ORDERS:
            cur.execute(
                'INSERT INTO "order" '
                "(reference, user_profile_id, shipping_address_id, status, placed_at, "
                "source_system_id) "
                "SELECT %s, p.id, "
                "(SELECT min(a.id) FROM address a WHERE a.user_profile_id = p.id), "
                "%s::order_status, %s, "
                "(SELECT s.id FROM audit.source_system s WHERE s.name = %s) "
                'FROM "UserProfile" p WHERE p.email = %s '
                "ON CONFLICT (reference) DO NOTHING",
                (reference, status, placed_at, source, email),
            )

        for reference, sku, quantity, unit_price, selected in LINE_ITEMS:
            cur.execute(
                'INSERT INTO "line item-x" (order_id, sku, quantity, unit_price, "select") '
                'SELECT id, %s, %s, %s, %s FROM "order" WHERE reference = %s '
                "ON CONFLICT (order_id, sku) DO NOTHING",
                (sku, quantity, unit_price, selected, reference),
            )

        # invoice.number comes from the standalone invoice_number_seq (1000, 1005, ...).
        cur.execute(
            "INSERT INTO invoice (order_id, issued_at) "
            "SELECT id, placed_at + interval '1 hour' FROM \"order\" "
            "WHERE status IN ('paid', 'shipped') ORDER BY id "
            "ON CONFLICT (order_id) DO NOTHING"
        )
        for reference, external_ref, amount in PAYMENTS:
            cur.execute(
                "INSERT INTO payment (invoice_id, external_ref, amount, paid_at) "
                "SELECT i.id, %s, %s, i.issued_at + interval '5 minutes' "
                'FROM invoice i JOIN "order" o ON o.id = i.order_id WHERE o.reference = %s '
                "ON CONFLICT (external_ref) DO NOTHING",
                (external_ref, amount, reference),
            )
        # Closes the invoice <-> payment cycle (deferrable foreign key).
        cur.execute(
            "UPDATE invoice i SET latest_payment_id = "
            "(SELECT max(p.id) FROM payment p WHERE p.invoice_id = i.id)"
        )
        # Numbers lost to rolled-back invoices: the sequence is now ahead of the data.
        cur.execute("SELECT nextval('invoice_number_seq') FROM generate_series(1, 3)")

        for email, path, viewed_at in PAGE_VIEWS:
            cur.execute(
                "INSERT INTO page_view (user_profile_id, path, viewed_at) "
                '(SELECT (SELECT id FROM "UserProfile" WHERE email = %s), %s, %s) '
                "ON CONFLICT (user_profile_id, path, viewed_at) DO NOTHING",
                (email, path, viewed_at),
            )
        # An anonymous view (user_profile_id NULL) escapes the unique constraint,
        # so a second run adds one more: that is fine for a demo.

        cur.execute(
            "INSERT INTO audit.event (table_name, action, payload) "
            "VALUES ('seed', 'RUN', jsonb_build_object('by', current_user))"
        )

        cur.execute("REFRESH MATERIALIZED VIEW customer_order_totals")


def report(conn: psycopg.Connection) -> None:
    with conn.cursor() as cur:
        print("rows:")
        for schema, table in TABLES:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table)))
            row = cur.fetchone()
            print(f"  {schema}.{table}: {row[0] if row else '?'}")
        print("sequences (last_value):")
        cur.execute(
            "SELECT schemaname, sequencename, start_value, last_value FROM pg_sequences "
            "WHERE schemaname IN ('public', 'audit') ORDER BY schemaname, sequencename"
        )
        for schema, name, start, last in cur.fetchall():
            print(f"  {schema}.{name}: {last} (starts at {start})")


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("DATABASE_URL")
    if not url:
        print("usage: python examples/seed.py URL   (or set DATABASE_URL)", file=sys.stderr)
        return 2
    with psycopg.connect(**conninfo_from_url(url), application_name="dbreset-seed") as conn:
        seed(conn)
        conn.commit()
        report(conn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
