"""Small pytest suites that use the database, as a real suite would, for the
worker-database and per-test-cleaning benchmarks.

Each suite is a directory with its own ``pytest.ini`` (pointing at the
project's ``alembic.ini``), a ``conftest.py`` and one parametrized test:

- ``write``: every test commits one row to each of three tables (``"user"``,
  ``"order"``, ``"group"``: identity and serial keys; ``"user"`` is referenced
  by about a third of the schema) in one statement, and, when every test is
  to start clean (``--dbreset-clean test``), asserts that the three new ids
  are 1: the tables were empty and their sequences restarted;
- ``read``: every test only reads those tables and asserts they are empty.

The conftest opens one autocommit connection per process to ``DATABASE_URL``
(which the plugin points at a worker's own database with
``--dbreset-isolation worker``; ``BENCH_EXPECT_DB=worker`` makes it check that
it is), and, with ``BENCH_TIMES=FILE``, times the setup of the
``dbreset_clean`` fixture -- the per-test cleaning, in the test's process --
and writes one ``[ms, reported ms, tables put back]`` per test to FILE.

After a run, :func:`suite_state` reads what the written tables hold, so a
benchmark can check that the run started from the freshly migrated state:
``count`` rows with ids ``1..count`` and the sequence at ``count``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

#: The tables a ``write`` test commits to.
WRITTEN = ("user", "order", "group")

CONFTEST = """\
import json
import os
import re
import time
from pathlib import Path

import psycopg
import pytest

TIMES = []

def _url():
    url = os.environ["DATABASE_URL"]
    return re.sub(r"^postgres(?:ql)?(?:\\+\\w+)?://", "postgresql://", url)


@pytest.fixture(scope="session")
def conn():
    c = psycopg.connect(_url(), autocommit=True)
    if os.environ.get("BENCH_EXPECT_DB") == "worker":
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        name = c.execute("SELECT current_database()").fetchone()[0]
        assert worker and name.endswith("_" + worker), f"{worker} is on {name}"
    yield c
    c.close()


@pytest.fixture(scope="session")
def clean_each_test(request):
    return request.config.getoption("dbreset_clean", None) == "test"


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.argname != "dbreset_clean" or not os.environ.get("BENCH_TIMES"):
        return (yield)
    start = time.perf_counter()
    result = yield
    ms = (time.perf_counter() - start) * 1000
    last = getattr(result, "last", None)
    tables = len(getattr(last, "tables", ()) or ())
    TIMES.append([ms, getattr(last, "elapsed_ms", None), tables])
    return result


def pytest_sessionfinish(session):
    out = os.environ.get("BENCH_TIMES")
    if out and TIMES:
        Path(out).write_text(json.dumps(TIMES))
"""

WRITE_TEST = """\
import pytest

WRITE = (
    'WITH a AS (INSERT INTO "user" (name) VALUES (%(n)s) RETURNING id), '
    'b AS (INSERT INTO "order" (name) VALUES (%(n)s) RETURNING id), '
    'c AS (INSERT INTO "group" (name) VALUES (%(n)s) RETURNING id) '
    "SELECT (SELECT id FROM a), (SELECT id FROM b), (SELECT id FROM c)"
)


@pytest.mark.parametrize("i", range({n}))
def test_write(conn, clean_each_test, i):
    ids = conn.execute(WRITE, {{"n": f"test {{i}}"}}).fetchone()
    if clean_each_test:
        assert ids == (1, 1, 1), f"not freshly migrated before this test: ids {{ids}}"
"""

READ_TEST = """\
import pytest

READ = 'SELECT (SELECT count(*) FROM "user") + (SELECT count(*) FROM "order") + ' \\
    '(SELECT count(*) FROM "group")'


@pytest.mark.parametrize("i", range({n}))
def test_read(conn, i):
    assert conn.execute(READ).fetchone()[0] == 0
"""


def write_suite(root: Path, kind: str, n: int, alembic_ini: Path) -> Path:
    """The suite *kind* (``write`` or ``read``) of *n* tests in ``root/suite_<kind>_<n>``."""
    suite = root / f"suite_{kind}_{n}"
    (suite / "tests").mkdir(parents=True, exist_ok=True)
    (suite / "pytest.ini").write_text(
        f"[pytest]\ntestpaths = tests\ndbreset_alembic_config = {alembic_ini}\n"
        "dbreset_schemas = public\n"
    )
    (suite / "tests" / "conftest.py").write_text(CONFTEST)
    body = (WRITE_TEST if kind == "write" else READ_TEST).format(n=n)
    (suite / "tests" / f"test_{kind}.py").write_text(body)
    return suite


def suite_state(url: str) -> dict[str, dict[str, Any]]:
    """For each written table: rows, highest id, its sequence's name and state."""
    out: dict[str, dict[str, Any]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for table in WRITTEN:
            quoted = '"' + table + '"'
            n, top, seq = conn.execute(
                f"SELECT count(*), coalesce(max(id), 0), "
                f"pg_get_serial_sequence('public.{quoted}', 'id') FROM public.{quoted}"
            ).fetchone() or (0, 0, None)
            last, called = conn.execute(f"SELECT last_value, is_called FROM {seq}").fetchone() or (
                None,
                None,
            )
            relname = conn.execute("SELECT relname FROM pg_class WHERE oid = %s::regclass", (seq,))
            out[table] = {
                "rows": int(n),
                "top": int(top),
                "sequence": str((relname.fetchone() or ("",))[0]),
                "last_value": last,
                "is_called": called,
            }
    return out


def state_problems(
    state: dict[str, dict[str, Any]], fresh: dict[tuple[str, str], str]
) -> list[str]:
    """What says a run did not start fresh: ids not 1..rows, sequences elsewhere."""
    bad = []
    for table, s in state.items():
        if s["top"] != s["rows"]:
            bad.append(f"{table}: {s['rows']} rows up to id {s['top']}")
        if s["rows"]:
            if (s["last_value"], s["is_called"]) != (s["rows"], True):
                bad.append(f"{table}: sequence at {s['last_value']}, {s['rows']} rows")
        elif f"{s['last_value']} {str(s['is_called']).lower()}" != fresh.get(
            ("sequence", s["sequence"])
        ):
            bad.append(f"{table}: no rows, sequence at {s['last_value']}")
    return bad


def ignored(state: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """The state-check keys of the written tables and their sequences."""
    keys = {("table", t) for t in state}
    return keys | {("sequence", s["sequence"]) for s in state.values()}
