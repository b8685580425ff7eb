"""A clean database for every test (``dbreset_clean = test``, or the
``dbreset_clean`` fixture), for real: pytester runs pytest in a subprocess,
plain and with ``-n 2``, against a real PostgreSQL and the seeded test project
(tests/projects/seeded), whose migrations seed rows and move sequences."""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import PROJECTS, copy_project
from dbreset import session
from dbreset.settings import resolve_settings
from dbstate import fresh_state
from pluginruns import (
    assert_ended_before_any_worker,
    clean_environment,
    output,
    run,
    write_project,
)

#: The seeded project keeps tables in two schemas.
CLEAN_INI = 'dbreset_clean = "test"\ndbreset_schemas = ["public", "refData"]'

#: Loads the freshly migrated state the outer test captured once, from a real
#: ``alembic upgrade heads`` of an empty database.
CONFTEST_EXPECTED = """\
import os
import pickle
from pathlib import Path

import pytest

URL = os.environ["DATABASE_URL"]  # the worker's own database under -n


@pytest.fixture(scope="session")
def expected():
    return pickle.loads(Path(os.environ["EXPECTED_STATE"]).read_bytes())
"""

#: The issue's held-out suite: every test asserts the freshly migrated state at
#: its start, then commits rows to several tables from two connections,
#: changes seeded rows and moves sequences.
TEST_HELD_OUT = """\
import psycopg
import pytest

from conftest import URL
from dbstate import diff_states, snapshot


def fresh_values(conn):
    # what a fresh migration leaves: the next value of every kind of key
    return conn.execute(
        "SELECT (SELECT count(*) FROM app_user), (SELECT count(*) FROM note), "
        "(SELECT count(*) FROM role), (SELECT count(*) FROM role_permission), "
        "(SELECT string_agg(name, ',' ORDER BY id) FROM role), "
        "(SELECT last_value FROM standalone_seq), (SELECT last_value FROM spare_seq), "
        "(SELECT is_called FROM spare_seq)"
    ).fetchone()


@pytest.mark.parametrize("i", range(20))
def test_starts_freshly_migrated_then_changes_everything(i, expected):
    diff = diff_states(snapshot(URL), expected)
    assert not diff, str(diff)

    # NullPool style: connections opened and closed, each committing
    with psycopg.connect(URL, autocommit=True) as a:
        assert fresh_values(a) == (0, 0, 3, 7, "administrator,editor,viewer", 115, 7, False)
        user = a.execute("INSERT INTO app_user (email, role_id, status_id) "
                         "VALUES ('ada@example.com', 2, 1) RETURNING id").fetchone()
        assert user == (1,)
        assert a.execute("INSERT INTO note (app_user_id, body) VALUES (1, 'n') "
                         "RETURNING id").fetchone() == (1,)
        a.execute("INSERT INTO activity (app_user_id, kind, happened_at) "
                  "VALUES (1, 'login', now()), (1, 'old', '2020-01-01')")
        assert a.execute('INSERT INTO "refData"."Rate Quote" (currency_code, rate, quoted_at) '
                         "VALUES ('EUR', 1.1, now()) RETURNING id").fetchone() == (1,)
        a.execute("INSERT INTO cache_entry (key, value) VALUES ('the-key', '{}')")
    with psycopg.connect(URL) as b:
        b.execute("UPDATE role SET name = name || ' (changed)' WHERE id = 2")
        b.execute("DELETE FROM role_permission WHERE role_id = 3")
        b.execute('UPDATE "refData"."Currency" SET name = upper(name)')
        b.execute("DELETE FROM status WHERE code = 'suspended'")
        assert b.execute("INSERT INTO permission (code) VALUES ('new') "
                         "RETURNING id").fetchone() == (5,)
        assert b.execute("INSERT INTO ticket_kind (name) VALUES ('other') "
                         "RETURNING code").fetchone() == (120,)
        assert b.execute("INSERT INTO role (name) VALUES ('new') RETURNING id").fetchone() == (5,)
        assert b.execute("SELECT nextval('report_number_seq')").fetchone() == (501,)
        b.execute("SELECT setval('spare_seq', 1000 + %s)", (i,))
        if i % 4 == 1:
            b.execute("UPDATE price_tier SET max_cents = max_cents + 1")  # generated column
        if i % 4 == 2:
            b.execute("DELETE FROM role WHERE id = 3")  # cascades to role_permission
        if i % 4 == 3:
            b.execute("SELECT setval(pg_get_serial_sequence('status', 'id'), 77)")
        b.commit()
    with psycopg.connect(URL, autocommit=True) as c:  # a third one sees them all
        assert c.execute("SELECT count(*) FROM app_user").fetchone() == (1,)
        changed = c.execute("SELECT count(*) FROM role WHERE name LIKE '%(changed)'")
        assert changed.fetchone() == (1,)
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    clean_environment(pytester, monkeypatch)

    def make(ini: str = CLEAN_INI, name: str = "seeded") -> Path:
        return write_project(pytester.path, name, ini=ini)

    return make


def test_the_held_out_suite_passes_plain_and_with_a_database_per_worker(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
) -> None:
    path = project()
    expected = fresh_state(make_db, PROJECTS / "seeded" / "alembic.ini")
    (path / "expected.pickle").write_bytes(pickle.dumps(expected))
    shutil.copy(Path(__file__).with_name("dbstate.py"), path / "dbstate.py")
    pytester.makeconftest(CONFTEST_EXPECTED)
    pytester.makepyfile(test_held_out=TEST_HELD_OUT)
    monkeypatch.setenv("DATABASE_URL", make_db())
    monkeypatch.setenv("EXPECTED_STATE", str(path / "expected.pickle"))

    plain = run(pytester)
    assert plain.ret == 0, output(plain)
    plain.assert_outcomes(passed=20)

    workers = run(pytester, "-n", "2", "--dbreset-isolation", "worker")
    assert workers.ret == 0, output(workers)
    workers.assert_outcomes(passed=20)

    # The control: without the cleaning, only the first test starts fresh.
    control = run(pytester, "--dbreset-clean", "off")
    assert control.ret == 1, output(control)
    control.assert_outcomes(passed=1, failed=19)


def test_clean_with_a_shared_database_under_xdist_is_refused_naming_the_fix(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
) -> None:
    project(CLEAN_INI + '\ndbreset_isolation = "shared"')
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    monkeypatch.setenv("DATABASE_URL", make_db())
    line = assert_ended_before_any_worker(run(pytester, "-n", "2"), 2)
    assert line == (
        "Exit: dbreset: dbreset_clean = test with dbreset_isolation = shared under -n 2 would "
        "wipe the other workers' rows between tests: set dbreset_isolation = worker (or pass "
        "--dbreset-isolation worker)"
    )


# --------------------------------------------------------------------------- a leaked session

TEST_LEAK = """\
import os
from pathlib import Path

import psycopg

URL = os.environ["DATABASE_URL"]
LEAKED = []  # kept open until the process ends, as a forgotten session is


def test_1_leaves_a_transaction_open():
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("INSERT INTO cache_entry (key, value) VALUES ('k', '{}')")
        conn.execute("UPDATE role SET name = 'changed' WHERE id = 2")
    leak = psycopg.connect(URL, application_name="leaky test")
    if os.environ["LEAK"] == "lock":
        leak.execute("LOCK TABLE cache_entry IN ACCESS SHARE MODE")
    else:
        leak.execute("UPDATE role SET name = 'not committed' WHERE id = 1")
    LEAKED.append(leak)
    Path(os.environ["LEAK_PID"]).write_text(str(leak.info.backend_pid))


def test_2_next():
    pass
"""


@pytest.mark.parametrize(
    ("leak", "args"),
    [("lock", []), ("update", ["-n", "2", "--dist", "loadfile", "--dbreset-isolation", "worker"])],
    ids=["lock-plain", "update-worker"],
)
def test_a_leaked_transaction_fails_the_next_setup_within_the_wait_naming_it(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
    leak: str,
    args: list[str],
) -> None:
    path = project(CLEAN_INI + '\ndbreset_wait = "1"')
    pytester.makepyfile(test_leak=TEST_LEAK)
    monkeypatch.setenv("DATABASE_URL", make_db())
    monkeypatch.setenv("LEAK", leak)
    monkeypatch.setenv("LEAK_PID", str(path / "leak.pid"))
    result = run(pytester, *args)
    text = output(result)
    assert result.ret == 1, text
    result.assert_outcomes(passed=1, errors=1)
    pid = (path / "leak.pid").read_text()
    # one line, once: what happened, who holds the tables, what to do
    (message,) = [
        line for line in text.splitlines() if "could not put" in line and "::" not in line
    ]
    assert message.startswith("dbreset: could not put "), message
    assert " back before this test within 1s, other connections hold its tables: " in message
    assert f"pid {pid} (leaky test, " in message, message
    assert "or raise dbreset_wait" in message, message
    assert "During handling of the above exception" not in text, text
    # bounded by dbreset_wait: the session did not hang behind the leak
    took = re.search(r"1 passed, 1 error in ([\d.]+)s", text)
    assert took and float(took.group(1)) < 15, text


# --------------------------------------------------------------------------- the fixture

TEST_FIXTURE = """\
import os

import psycopg

URL = os.environ["DATABASE_URL"]


def add_user():
    with psycopg.connect(URL, autocommit=True) as conn:
        return conn.execute("INSERT INTO app_user (email, role_id) VALUES ('a@example.com', 1) "
                            "RETURNING id").fetchone()


def users():
    with psycopg.connect(URL) as conn:
        return conn.execute("SELECT count(*) FROM app_user").fetchone()


def test_1_commits_a_row():
    assert add_user() == (1,)


def test_2_without_the_fixture_sees_it():
    assert users() == (1,)


def test_3_with_the_fixture_starts_clean(dbreset_clean):
    assert users() == (0,)
    assert "public.app_user" in dbreset_clean.last.tables
    assert "public.app_user_id_seq" in dbreset_clean.last.sequences
    assert add_user() == (1,)  # the identity restarted


def test_4_without_the_fixture_sees_it_again():
    assert users() == (1,)
"""


def test_the_fixture_cleans_only_the_tests_that_ask_when_the_ini_says_off(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
) -> None:
    project('dbreset_clean = "off"')
    pytester.makepyfile(test_fixture=TEST_FIXTURE)
    monkeypatch.setenv("DATABASE_URL", make_db())
    result = run(pytester, "-p", "no:randomly")
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=4)


# --------------------------------------------------------------------------- the canary

#: ``"order"`` has a row trigger that fires on DELETE, so the cleaner empties it
#: with TRUNCATE (a new relfilenode), with the tables that reference it.
TEST_TRUNCATED = """\
import os

import psycopg

URL = os.environ["DATABASE_URL"]
FILENODES = []


def order_filenode(conn):
    return conn.execute("SELECT pg_relation_filenode('\\"order\\"')").fetchone()[0]


def test_1_commits_an_order():
    with psycopg.connect(URL, autocommit=True) as conn:
        FILENODES.append(order_filenode(conn))
        (user,) = conn.execute(
            'INSERT INTO "UserProfile" (email, "displayName") VALUES (%s, %s) RETURNING id',
            ("ada@example.com", "Ada"),
        ).fetchone()
        conn.execute('INSERT INTO "order" (reference, user_profile_id) VALUES (%s, %s)',
                     ("A-1", user))
        assert conn.execute("SELECT count(*) FROM audit.event").fetchone() == (1,)


def test_2_the_cleaner_truncated_it():
    with psycopg.connect(URL) as conn:
        assert conn.execute('SELECT count(*) FROM "order"').fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM audit.event").fetchone() == (0,)
        FILENODES.append(order_filenode(conn))
    assert FILENODES[0] != FILENODES[1]


def test_3_and_the_canary_knows_it_was_ours(dbreset_canary):
    assert dbreset_canary.active
    dbreset_canary.check()
"""


@pytest.mark.parametrize(
    "args", [[], ["-n", "2", "--dist", "loadfile", "--dbreset-isolation", "worker"]]
)
def test_the_cleaners_own_truncate_does_not_fire_the_canary(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
    args: list[str],
) -> None:
    project('dbreset_clean = "test"\ndbreset_canary = "test"', name="example")
    pytester.makepyfile(test_truncated=TEST_TRUNCATED)
    monkeypatch.setenv("DATABASE_URL", make_db())
    result = run(pytester, *args)
    text = output(result)
    assert result.ret == 0, text
    result.assert_outcomes(passed=3)
    assert "reset/truncated/rebuilt" not in text


# ---------------------------------------------------------------- the cheap check, in process


@contextlib.contextmanager
def seeded_cleaner(work: Path, url: str, **given: object) -> Iterator[session.Cleaner]:
    """A Cleaner of *url* reset to the seeded project (in *work*); its guard closed after."""
    ini = copy_project("seeded", work)
    settings = resolve_settings(
        {"url": url, "alembic_config": str(ini), "schemas": ["public", "refData"], **given},
        env={},
        cwd=work,
    )
    done = session.reset_and_guard(settings)
    try:
        yield session.Cleaner(
            done.guard.conn, settings, done.baseline, version_table=done.version_table
        )
    finally:
        done.guard.close()


def test_nothing_written_since_the_last_check_is_trusted_but_a_bare_nextval_is_seen(
    isolated: Path, make_db: Callable[..., str]
) -> None:
    """When the server wrote no WAL since the last full check, nothing changed:
    one cheap query. That holds for sequences too only because the cleaner
    empties every called sequence's cache of logged values (setval), so that a
    nextval alone, with no row written, still writes WAL and is seen."""
    import psycopg

    from conftest import scalar

    url = make_db()
    # cache_entry is unlogged: its changes write no WAL
    with seeded_cleaner(isolated, url, exclude=["cache_entry"]) as cleaner:
        cleaner.clean()  # prepares: plans, checks in full
        assert cleaner._wal_ok
        assert scalar(url, "SELECT log_cnt FROM role_id_seq") == 0
        assert not cleaner.clean().changed  # a full check, which notes the WAL position
        assert not cleaner.clean().changed  # the cheap one
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT nextval('role_id_seq')").fetchone() == (5,)
        assert cleaner.clean().sequences == ("public.role_id_seq",)
        assert not cleaner.clean().changed
        assert scalar(url, "SELECT nextval('role_id_seq')") == 5
        assert cleaner.clean().sequences == ("public.role_id_seq",)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE role SET name = 'boss' WHERE id = 1")
        # role_permission references role: it is put back with it
        assert set(cleaner.clean().tables) == {"public.role", "public.role_permission"}
        assert scalar(url, "SELECT name FROM role WHERE id = 1") == "administrator"


def test_with_an_unlogged_table_every_check_is_a_full_one(
    isolated: Path, make_db: Callable[..., str]
) -> None:
    import psycopg

    url = make_db()
    with seeded_cleaner(isolated, url) as cleaner:
        cleaner.clean()
        assert not cleaner._wal_ok
        assert not cleaner.clean().changed
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("""INSERT INTO cache_entry (key, value) VALUES ('k', '"v"')""")
        assert cleaner.clean().tables == ("public.cache_entry",)
