"""The usual hand-written hook, second half (after ``alembic upgrade head``).

What test suites write by hand: list the tables, then empty all of them in one
``TRUNCATE ... RESTART IDENTITY CASCADE``, every name quoted, the Alembic
version table left alone. ``python bench/hook_truncate.py URL``
"""

import sys

import psycopg
from psycopg import sql

with psycopg.connect(sys.argv[1]) as conn:
    tables = conn.execute(
        "SELECT schemaname, tablename FROM pg_tables "
        "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
    ).fetchall()
    if tables:
        names = sql.SQL(", ").join(sql.Identifier(schema, table) for schema, table in tables)
        conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(names))
    # leaving the block commits
