"""The floor: the least a Python process that resets a database must do.

Import psycopg, connect, run one query. ``python bench/floor.py URL``
"""

import sys

import psycopg

with psycopg.connect(sys.argv[1]) as conn:
    conn.execute("SELECT 1").fetchone()
