"""One database per xdist worker (``dbreset_isolation = worker``), for real:
pytester runs pytest with ``-n`` in a subprocess against a real PostgreSQL and
the seeded test project (tests/projects/seeded), whose migrations seed rows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from dbreset.database import mask_url
from pluginruns import (
    assert_ended_before_any_worker,
    clean_environment,
    databases,
    dbname,
    dbreset_cli,
    dbreset_lines,
    output,
    popen_pytest,
    run,
    wait_for,
    write_project,
)

WORKER_INI = 'dbreset_isolation = "worker"'

#: Tests that collide in a shared database: run with ``--dist each`` every
#: worker runs every one of them, at the same time.
TEST_COLLIDE = """\
import os
import time
from pathlib import Path

import psycopg
import pytest

URL = os.environ["DATABASE_URL"]
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
BARRIER = Path(os.environ["BARRIER"])


@pytest.fixture
def db():
    with psycopg.connect(URL, autocommit=True) as conn:
        yield conn


def test_a_database_of_its_own(db):
    assert db.execute("SELECT current_database()").fetchone() == (
        os.environ["TARGET_DB"] + "_" + WORKER,
    )


def test_the_seeded_rows_are_there(db):
    assert db.execute("SELECT id, name FROM role ORDER BY id").fetchall() == [
        (1, "administrator"), (2, "editor"), (3, "viewer")]
    assert db.execute('SELECT count(*) FROM "refData"."Currency"').fetchone() == (4,)
    # where the migrations left the sequence: moved here, put back before the next run
    assert db.execute("SELECT nextval('standalone_seq')").fetchone() == (120,)


def test_the_same_unique_key_in_every_test(db):
    db.execute("INSERT INTO cache_entry (key, value) VALUES ('the-key', '{}')")
    assert db.execute("SELECT count(*) FROM cache_entry").fetchone() == (1,)


def test_the_first_id_is_1(db):
    user = db.execute("INSERT INTO app_user (email, role_id) VALUES ('ada@example.com', 1) "
                      "RETURNING id").fetchone()
    assert user == (1,)
    note = db.execute("INSERT INTO note (app_user_id, body) VALUES (1, 'hi') "
                      "RETURNING id").fetchone()
    assert note == (1,)


def test_only_my_rows_are_visible(db):
    db.execute("INSERT INTO activity (kind, happened_at) VALUES (%s, now())", (WORKER,))
    (BARRIER / WORKER).touch()
    # every worker has committed its row before any looks
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    deadline = time.monotonic() + 30
    while len(list(BARRIER.iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert db.execute("SELECT kind FROM activity").fetchall() == [(WORKER,)]
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    clean_environment(pytester, monkeypatch)

    def make(ini: str = WORKER_INI, name: str = "seeded", **kw: str) -> Path:
        return write_project(pytester.path, name, ini=ini, **kw)

    return make


@pytest.fixture
def target_url(
    project: Callable[..., Path], make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """A new database for the inner run, after ``project`` cleared the environment: its URL
    (returned) as DATABASE_URL, its name as TARGET_DB."""
    url = make_db()
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("TARGET_DB", dbname(url))
    return url


def barrier(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    path = pytester.path / "barriers" / name
    path.mkdir(parents=True)
    monkeypatch.setenv("BARRIER", str(path))


# --------------------------------------------------------------------------- isolation


def test_a_colliding_suite_passes_with_one_database_per_worker_twice_in_a_row(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    target_url: str,
    admin: psycopg.Connection,
) -> None:
    project()
    target = dbname(target_url)
    pytester.makepyfile(test_collide=TEST_COLLIDE)

    for attempt in ("first", "second"):
        barrier(pytester, monkeypatch, attempt)
        result = run(pytester, "-n", "3", "--dist", "each")
        assert result.ret == 0, output(result)
        result.assert_outcomes(passed=15)
        (line,) = dbreset_lines(result)
        how = "cloned" if attempt == "first" else r"reset \(\d+ tables\)"
        assert re.fullmatch(
            rf"dbreset: 3 worker databases for {re.escape(mask_url(target_url))} in \d+ ms "
            rf"\(gw0 {how}, gw1 {how}, gw2 {how}"
            + (r"; built \S+_pristine_\w+\)" if attempt == "first" else r"\)"),
            line,
        ), line
    made = databases(admin, target)
    assert {f"{target}_gw{i}" for i in range(3)} < set(made)

    # The control: in the one shared database the same suite collides.
    barrier(pytester, monkeypatch, "shared")
    shared = run(pytester, "-n", "3", "--dist", "each", "--dbreset-isolation", "shared")
    assert shared.ret == 1, output(shared)
    assert "UniqueViolation" in output(shared)
    # each test passes in one worker at most: the one that got there first, if any
    shared.assert_outcomes(passed=3, failed=12)


# --------------------------------------------------------------------------- the URL variables

#: Import-time code, as applications have it: a settings module or an engine
#: made when the conftest is imported.
CONFTEST_AT_IMPORT = """\
import json
import os

NAMES = ("APP_DB_URL", "DATABASE_URL", "REPLICA_URL")
AT_IMPORT = {name: os.environ.get(name) for name in NAMES}


def _log(when, seen):
    with open(os.environ["LOG"], "a") as log:
        log.write(json.dumps({"when": when, "pid": os.getpid(),
                              "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                              "vars": seen}) + "\\n")


_log("conftest import", AT_IMPORT)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        return
    _log("worker configure", {name: os.environ.get(name) for name in NAMES})


def pytest_sessionfinish(session):
    _log("sessionfinish", {name: os.environ.get(name) for name in NAMES})
"""

TEST_AT_IMPORT = """\
import os

import psycopg

from conftest import AT_IMPORT, NAMES

MODULE_URL = os.environ["APP_DB_URL"]


def test_import_time_urls_are_the_workers_database():
    worker = os.environ["PYTEST_XDIST_WORKER"]
    assert MODULE_URL == AT_IMPORT["APP_DB_URL"]
    for name in NAMES:
        with psycopg.connect(AT_IMPORT[name]) as conn:
            (db,) = conn.execute("SELECT current_database()").fetchone()
        assert db == os.environ["TARGET_DB"] + "_" + worker, name


def test_other():
    pass
"""


def hostless(url: str) -> str:
    """*url* as ``postgresql:///db?host=...&port=...&user=...``."""
    from urllib.parse import urlencode

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    query = {k: str(params[k]) for k in ("host", "port", "user") if k in params}
    return f"postgresql:///{params['dbname']}?{urlencode(query, safe='/')}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h:5/app_test", "postgresql://u@h:5/app_test_gw0"),
        (
            "postgresql+asyncpg://u:pw@h/app_test?ssl=require",
            "postgresql+asyncpg://u:pw@h/app_test_gw0?ssl=require",
        ),
        (
            "postgresql:///app_test?host=/run/pg&port=5",
            "postgresql:///app_test_gw0?host=/run/pg&port=5",
        ),
        ("postgresql://u@/app_test?host=/run/pg", "postgresql://u@/app_test_gw0?host=/run/pg"),
        (
            "postgresql://u@h/?dbname=app_test&sslmode=disable",
            "postgresql://u@h/app_test_gw0?sslmode=disable",
        ),
    ],
    ids=["plain", "driver-and-query", "no-host-part", "socket-in-query", "dbname-in-query"],
)
def test_a_worker_url_is_the_users_url_with_the_workers_database(url: str, expected: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from dbreset.database import with_dbname

    worker = with_dbname(url, "app_test_gw0")
    assert worker == expected
    plain = worker.replace("+asyncpg", "").replace("ssl=require", "sslmode=require")
    assert conninfo_to_dict(plain)["dbname"] == "app_test_gw0"


def test_each_workers_url_variables_point_at_its_database_before_any_conftest_import(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
) -> None:
    path = project(
        ini=WORKER_INI + '\ndbreset_url_env = "APP_DB_URL"\n'
        'dbreset_export_env = ["DATABASE_URL", "REPLICA_URL"]'
    )
    # The shape of a Unix-socket URL: no host part, the host in the query.
    url = hostless(make_db())
    target = dbname(url)
    pytester.makeconftest(CONFTEST_AT_IMPORT)
    pytester.makepyfile(test_at_import=TEST_AT_IMPORT)
    log = path / "vars.log"
    monkeypatch.setenv("APP_DB_URL", url)
    monkeypatch.setenv("LOG", str(log))
    monkeypatch.setenv("TARGET_DB", target)

    result = run(pytester, "-n", "2")
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=2)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    workers = [e for e in entries if e["worker"]]
    controller = [e for e in entries if not e["worker"]]

    # Every worker saw its own database in every variable from its first import on.
    assert {(e["worker"], e["when"]) for e in workers} == {
        (w, when)
        for w in ("gw0", "gw1")
        for when in ("conftest import", "worker configure", "sessionfinish")
    }
    for entry in workers:
        for value in entry["vars"].values():
            assert value is not None and dbname(value) == f"{target}_{entry['worker']}", entry
            assert mask_url(value) == mask_url(url).replace(
                f"/{target}", f"/{target}_{entry['worker']}"
            )

    # The controller: the target, and the exported variables point at it too.
    (imported, finished) = controller
    assert imported["when"] == "conftest import" and imported["vars"]["APP_DB_URL"] == url
    assert finished["when"] == "sessionfinish"
    assert finished["vars"] == {"APP_DB_URL": url, "DATABASE_URL": url, "REPLICA_URL": url}


# --------------------------------------------------------------------------- the databases kept

TEST_RUN_ROW = """\
import os

import psycopg


def test_commit_a_row():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("INSERT INTO activity (kind, happened_at) VALUES (%s, now()) "
                           "RETURNING id", (os.environ["RUN"],)).fetchone()
    assert row == (1,)
"""


def activity(admin_url: str, name: str) -> list[tuple[int, str]]:
    from conftest import with_dbname

    with psycopg.connect(with_dbname(admin_url, name)) as conn:
        return [(int(i), str(k)) for i, k in conn.execute("SELECT id, kind FROM activity")]


def test_worker_databases_are_kept_reused_listed_and_dropped(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    make_db: Callable[..., str],
    target_url: str,
    admin: psycopg.Connection,
    server_url: str,
) -> None:
    from conftest import with_dbname

    path = project()
    target = dbname(target_url)
    pytester.makepyfile(test_run_row=TEST_RUN_ROW)
    workers = {f"{target}_gw{i}" for i in range(3)}

    def rows(worker: int) -> list[tuple[int, str]]:
        return activity(server_url, f"{target}_gw{worker}")

    headers = []
    for count, label in ((3, "run 1"), (2, "run 2"), (3, "run 3")):
        monkeypatch.setenv("RUN", label)
        result = run(pytester, "-n", str(count), "--dist", "each")
        assert result.ret == 0, output(result)
        result.assert_outcomes(passed=count)
        (line,) = dbreset_lines(result)
        headers.append(line)
        if label == "run 1":
            after_first = databases(admin, target)
            (pristine_db,) = set(after_first) - workers - {target}
            assert pristine_db.startswith(f"{target}_pristine_")
        if label == "run 2":  # gw2 was left alone: its rows are those of run 1
            assert databases(admin, target) == after_first
            assert rows(2) == [(1, "run 1")]
            assert rows(0) == rows(1) == [(1, "run 2")]
    assert "(gw0 cloned, gw1 cloned, gw2 cloned; built " in headers[0]
    assert re.search(r"\(gw0 reset \(\d+ tables?\), gw1 reset \(\d+ tables?\)\)$", headers[1])
    assert re.search(
        r"\(gw0 reset \(\d+ tables?\), gw1 reset \(\d+ tables?\), gw2 reset ", headers[2]
    )
    # the same databases (the same oids: reset in place, not cloned again)
    assert databases(admin, target) == after_first
    assert [rows(i) for i in range(3)] == [[(1, "run 3")]] * 3

    def listed() -> dict[str, dict[str, object]]:
        done = dbreset_cli(path, "list", "--json")
        assert done.returncode == 0, done.stderr
        return {db["name"]: db for db in json.loads(done.stdout)["databases"]}

    # dbreset list shows them
    found = listed()
    assert set(found) == workers | {pristine_db}
    assert {found[name]["kind"] for name in workers} == {"worker"}
    assert found[pristine_db]["kind"] == "pristine"
    assert all(db["current"] is True for db in found.values())

    # A worker database reset on its own between runs is still the target's,
    # with whatever that reset made for it (today: a pristine database of its own).
    alone = dbreset_cli(path, "reset", "--url", with_dbname(target_url, f"{target}_gw2"), "--yes")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    made_for_it = set(databases(admin, target)) - set(after_first)
    assert set(listed()) == workers | {pristine_db} | made_for_it

    # dbreset drop --all drops them, and only them: not the target, not a
    # database named like a worker's that dbreset did not make
    by_hand = dbname(make_db(name=f"{target}_gw7"))
    dropped = dbreset_cli(path, "drop", "--all", "--yes")
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert set(databases(admin, target)) == {target, by_hand}


# --------------------------------------------------------------------------- failures


def test_a_worker_database_dbreset_did_not_make_ends_the_run_before_any_worker(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    make_db: Callable[..., str],
    target_url: str,
) -> None:
    project()
    target = dbname(target_url)
    theirs = make_db(name=f"{target}_gw1")
    with psycopg.connect(theirs, autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (42)")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")

    line = assert_ended_before_any_worker(run(pytester, "-n", "2"), 3)
    assert line == (
        f"Exit: dbreset: database '{target}_gw1' exists and dbreset did not make it as "
        f"'{target}''s gw1 database, so it is not touched; drop or rename it"
    )
    with psycopg.connect(theirs) as conn:
        assert conn.execute("SELECT x FROM precious").fetchall() == [(42,)]


def test_a_lock_held_on_a_worker_database_ends_the_run_naming_the_holder(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    target_url: str,
) -> None:
    from conftest import with_dbname

    project()
    target = dbname(target_url)
    pytester.makepyfile(test_run_row=TEST_RUN_ROW)
    monkeypatch.setenv("RUN", "1")
    first = run(pytester, "-n", "2", "--dist", "each")
    assert first.ret == 0, output(first)

    # A session left open on gw1's table that the reset has to empty.
    with psycopg.connect(
        with_dbname(target_url, f"{target}_gw1"), application_name="leaky psql"
    ) as leak:
        leak.execute("LOCK TABLE activity IN ACCESS SHARE MODE")
        pid = leak.info.backend_pid
        line = assert_ended_before_any_worker(run(pytester, "-n", "2", "--dbreset-wait", "0.5"), 6)
    assert line.startswith(f"Exit: dbreset: preparing '{target}_gw1' for worker gw1: "), line
    assert f"pid {pid} (leaky psql" in line, line
    assert "--dbreset-wait" in line, line


# --------------------------------------------------------------------------- guard and canary

TEST_HOLD = """\
import os
import time
from pathlib import Path

HERE = Path(__file__).parent


def test_hold():
    (HERE / ("holding-" + os.environ["PYTEST_XDIST_WORKER"])).touch()
    deadline = time.monotonic() + 60
    while not (HERE / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_after():
    pass
"""


def test_each_worker_database_is_guarded_and_checked_by_its_own_canary(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    target_url: str,
) -> None:
    from conftest import with_dbname

    path = project()
    target = dbname(target_url)
    pytester.makepyfile(test_hold=TEST_HOLD)
    proc = popen_pytest(path, "-n", "2", "--dist", "each")
    try:
        wait_for(
            lambda: all((path / f"holding-gw{i}").exists() for i in range(2)),
            "both workers to hold",
        )
        # A reset of a worker database from elsewhere is refused: the session holds it.
        refused = dbreset_cli(
            path, "reset", "--url", with_dbname(target_url, f"{target}_gw0"), "--yes", "--wait", "0"
        )
        assert refused.returncode == 6, refused.stdout + refused.stderr
        assert f"'{target}_gw0' is busy, waited 0s: a test session: pid " in refused.stderr
        assert f"(dbreset pytest session pid {proc.pid} on " in refused.stderr

        # Something else empties gw1's tables while the session runs.
        with psycopg.connect(with_dbname(target_url, f"{target}_gw1"), autocommit=True) as conn:
            conn.execute("TRUNCATE app_user CASCADE")
        (path / "release").touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        (path / "release").touch()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out
    assert "4 passed" in out, out
    prefix = "dbreset: the database was reset/truncated/rebuilt during this session: "
    found = [line for line in out.splitlines() if prefix in line]
    (line,) = found  # gw1's canary, and gw1's only
    assert line.startswith(f"[gw1] {prefix}truncated or rewritten: "), out
    assert set(line.split(": ")[-1].split(", ")) == {
        "public.app_user",
        "public.note",
        "public.activity_before_2025",
        "public.activity_since_2025",
    }, line


# --------------------------------------------------------------------------- without xdist

TEST_TARGET = """\
import os

import psycopg


def test_the_target_itself():
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (os.environ["TARGET_DB"],)
"""


def test_without_xdist_the_run_uses_the_target(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    target_url: str,
    admin: psycopg.Connection,
) -> None:
    project()
    target = dbname(target_url)
    pytester.makepyfile(test_target=TEST_TARGET)
    for args in ([], ["-n", "0"]):
        result = run(pytester, *args)
        assert result.ret == 0, output(result)
        result.assert_outcomes(passed=1)
        (line,) = dbreset_lines(result)
        assert line.startswith(f"dbreset: reset {mask_url(target_url)} in "), line
    assert not [name for name in databases(admin, target) if "_gw" in name]


# --------------------------------------------------------------------------- a crashed worker

CONFTEST_LOG_URL = """\
import json
import os

with open(os.environ["LOG"], "a") as log:
    log.write(json.dumps([os.environ.get("PYTEST_XDIST_WORKER"),
                          os.environ.get("DATABASE_URL")]) + "\\n")
"""

TEST_CRASH = """\
import os
from pathlib import Path

import psycopg
import pytest


@pytest.mark.parametrize("i", range(4))
def test_crash_once(i):
    marker = Path(os.environ["LOG"]).with_name("crashed")
    if i == 0 and not marker.exists():
        marker.touch()
        os._exit(1)  # a segfault, the OOM killer: xdist starts a replacement
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() != (os.environ["TARGET_DB"],)
        assert conn.execute("SELECT count(*) FROM role").fetchone() == (3,)
        conn.execute("INSERT INTO cache_entry (key, value) VALUES ('the-key', '{}')")
"""


def test_a_replacement_for_a_crashed_worker_gets_a_worker_database(
    pytester: pytest.Pytester,
    project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    target_url: str,
) -> None:
    path = project(WORKER_INI + '\ndbreset_clean = "test"')
    target = dbname(target_url)
    pytester.makeconftest(CONFTEST_LOG_URL)
    pytester.makepyfile(test_crash=TEST_CRASH)
    monkeypatch.setenv("LOG", str(path / "urls.log"))
    result = run(pytester, "-n", "2")
    text = output(result)
    assert "replacing crashed worker" in text, text
    result.assert_outcomes(failed=1, passed=3)  # the crash, and the others where they ran
    assert "reset/truncated/rebuilt" not in text, text
    seen = dict(json.loads(line) for line in (path / "urls.log").read_text().splitlines())
    assert set(seen) == {None, "gw0", "gw1", "gw2"}, seen
    assert dbname(seen[None]) == target
    assert {dbname(seen[w]) for w in ("gw0", "gw1")} == {f"{target}_gw0", f"{target}_gw1"}
    # the replacement took over the crashed worker's database
    assert dbname(seen["gw2"]) in {f"{target}_gw0", f"{target}_gw1"}, seen
