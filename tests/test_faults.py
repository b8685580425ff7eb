"""Nothing lost, nothing misreported: the faults and bad inputs of the issue,
each run for real (a real server, real drivers, the command line in process
and as real processes, the plugin through pytester) and checked for its exit
code, the gist of its message, and that nothing outside the chosen tables
changed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from cliruns import proc_env, pty_prompt, run
from conftest import copy_project, with_dbname

HEAD = "0e0692925689"
EXAMPLE = ["--schema", "public", "--schema", "audit", "--exclude", "country_*"]


# --------------------------------------------------------------------------- helpers


def popen(work: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    """``python -m dbreset ...`` in the background, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "dbreset", *args],
        cwd=work,
        env=proc_env(work, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dbname_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def scalar(url: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def counts(url: str, *tables: str) -> dict[str, int]:
    """Rows of each table (a quoted name), each counted ``ONLY`` itself."""
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM ONLY {t}").fetchone()[0]  # type: ignore[index]
            for t in tables
        }


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def role_url(url: str, role: str) -> str:
    assert "postgres@" in url
    return url.replace("postgres@", f"{role}@", 1)


@pytest.fixture
def make_role(admin: psycopg.Connection) -> Iterator[Callable[..., str]]:
    """Roles named ``dbreset_test_*``; their privileges are dropped in every
    database that still exists, and the roles with them, afterwards."""
    made: list[str] = []

    def make(options: str = "LOGIN") -> str:
        name = f"dbreset_test_role_{uuid.uuid4().hex[:10]}"
        admin.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name)))
        made.append(name)
        return name

    yield make
    server = admin.info
    for name in made:
        ident = sql.Identifier(name)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
        )
        dbs = [
            d
            for (d,) in admin.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND datname LIKE "
                "'dbreset\\_test\\_%%'"
            )
        ]
        for db in [*dbs, server.dbname]:
            with contextlib.suppress(psycopg.Error):
                url = with_dbname(os.environ["DBRESET_TEST_URL"], db)
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


@pytest.fixture
def project(isolated: Path) -> Path:
    """The example Alembic project in a working directory of its own."""
    copy_project("example", isolated)
    return isolated


# --------------------------------------------------------------------------- 9. bad choices


def test_unknown_schema_is_exit_2_and_an_unmatched_exclude_is_a_warning(
    isolated: Path, db_url: str
) -> None:
    execute(db_url, "CREATE TABLE kept (id int)", "INSERT INTO kept VALUES (1)")
    for extra in ([], ["--schema", "public"], ["--dry-run"]):
        code, out, err = run(
            "truncate", "--yes", "--url", db_url, "--schema", "nosuchschema", *extra
        )
        assert code == 2, (extra, out, err)
        assert "nosuchschema" in err and "--schema" in err, err
        assert "emptied" not in out
    code, out, _ = run("status", "--url", db_url, "--schema", "nosuchschema")
    assert "nosuchschema" in out  # status reports it as the problem
    assert counts(db_url, "kept") == {"kept": 1}

    code, out, err = run("truncate", "--yes", "--url", db_url, "--exclude", "no_such_*")
    assert code == 0, err
    assert "warning" in err and "'no_such_*' matched no table" in err, err
    assert counts(db_url, "kept") == {"kept": 0}
    code, out, err = run("truncate", "--yes", "--json", "--url", db_url, "--exclude", "nomatch")
    assert code == 0, err
    assert json.loads(out)["warnings"] == ["--exclude 'nomatch' matched no table"]


# --------------------------------------------------------------------------- 10. names printed


ESC_TABLE = "red\x1b[31mtable"
NL_TABLE = "new\nline"


def _no_raw_control(text: str) -> None:
    assert "\x1b" not in text, repr(text)
    for line in text.splitlines():
        assert not line.startswith("line"), repr(text)  # the name was cut by a raw newline


def test_control_characters_in_names_are_escaped_everywhere(project: Path, db_url: str) -> None:
    esc, nl = sql.Identifier(ESC_TABLE), sql.Identifier(NL_TABLE)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY)").format(esc))
        conn.execute(sql.SQL("CREATE TABLE {} (id serial, ref int REFERENCES {})").format(nl, esc))
        conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(esc))
        conn.execute(sql.SQL("INSERT INTO {} (ref) VALUES (1)").format(nl))
    shown_esc, shown_nl = "red\\x1b[31mtable", "new\\nline"

    code, out, err = run("status", "--url", db_url, "--schema", "public")
    assert code == 0, err
    assert shown_esc in out and shown_nl in out, out
    _no_raw_control(out + err)

    code, out, err = run("truncate", "--dry-run", "--url", db_url)
    assert code == 0, err
    assert shown_esc in out and shown_nl in out, out
    _no_raw_control(out + err)

    # an error that names them: emptying one would reach the other, excluded
    code, out, err = run("truncate", "--yes", "--url", db_url, "--exclude", "new*")
    assert code == 7, err
    assert shown_esc in err and shown_nl in err, err
    _no_raw_control(out + err)
    code, out, _ = run("truncate", "--yes", "--json", "--url", db_url, "--exclude", "new*")
    assert code == 7 and "\\x1b" in json.loads(out)["error"]
    _no_raw_control(json.loads(out)["error"])

    code, out, err = run("truncate", "--yes", "--url", db_url)
    assert code == 0, err
    assert f"{shown_esc} (1 row)" in out and f"{shown_nl} (1 row)" in out, out
    assert f"{shown_esc}_id_seq" in out, out  # the sequences it restarted
    _no_raw_control(out + err)

    # reset: the example project's tables beside them
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(esc))
    code, out, err = run("reset", "--yes", "--url", db_url, *EXAMPLE)
    assert code == 0, err
    assert f"{shown_esc} (1 row)" in out, out
    _no_raw_control(out + err)
    assert counts(db_url, esc.as_string(), nl.as_string()) == {  # type: ignore[arg-type]
        esc.as_string(): 0,  # type: ignore[arg-type]
        nl.as_string(): 0,  # type: ignore[arg-type]
    }


# --------------------------------------------------------------------------- 5. passwords


PASSWORD_CHARS = ["/", "#", "?", ":", " ", "@"]


def _bad_url(char: str, dbname: str = "app_test") -> str:
    # port 1: nothing listens, so a URL that does parse fails fast (exit 4)
    return f"postgresql://app:Hunter{char}Secret@127.0.0.1:1/{dbname}"


def _assert_masked(text: str) -> None:
    assert "Hunter" not in text and "Secret" not in text, text


@pytest.mark.parametrize("char", PASSWORD_CHARS, ids=repr)
def test_a_password_with_an_unencoded_character_is_never_printed(project: Path, char: str) -> None:
    url = _bad_url(char)
    for command in (["status"], ["reset", "--yes"], ["truncate", "--yes"], ["migrate"]):
        code, out, err = run(*command, "--url", url)
        assert code in (2, 4), (command, out, err)
        assert ("malformed database URL" in err) == (code == 2), err
        _assert_masked(out + err)
        code, out, err = run(*command, "--json", "--url", url)
        assert json.loads(out)["ok"] is False
        _assert_masked(out + err)
    # the same through the environment, a real process and the plain-line reader
    done = subprocess.run(
        [sys.executable, "-m", "dbreset", "reset", "--yes"],
        cwd=project,
        env=proc_env(project, DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (2, 4), done.stderr
    assert "dbreset: error:" in done.stderr
    _assert_masked(done.stdout + done.stderr)


@pytest.mark.parametrize("char", ["/", "#", "?", " "], ids=repr)  # those that do not parse
def test_the_plugin_never_prints_such_a_password(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, char: str
) -> None:
    copy_project("example", pytester.path)
    (pytester.path / "pyproject.toml").write_text("[tool.pytest.ini_options]\ndbreset = true\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    for name in list(os.environ):
        if name.startswith("DBRESET_") and name != "DBRESET_TEST_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", _bad_url(char))
    monkeypatch.setenv("XDG_CACHE_HOME", str(pytester.path / ".xdg-cache"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    text = result.stdout.str() + result.stderr.str()
    assert result.ret in (2, 4), text
    assert "Exit: dbreset: " in text
    _assert_masked(text)


# --------------------------------------------------------------------------- 11. SQLAlchemy


def test_sqlalchemy_2_1_is_required_where_a_bare_url_means_psycopg_3() -> None:
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from sqlalchemy.engine import make_url

    (req,) = [
        r for r in map(Requirement, requires("dbreset") or []) if r.name.lower() == "sqlalchemy"
    ]
    assert not req.marker, req
    assert not req.specifier.contains("2.0.99"), f"dbreset allows {req}"
    assert req.specifier.contains("2.1.0"), f"dbreset excludes 2.1.0: {req}"
    # what the installed SQLAlchemy makes of the URL exported to env.py
    assert make_url("postgresql://u@localhost/app").get_dialect().driver == "psycopg"


# --------------------------------------------------------------------------- 1. rows elsewhere


def _fdw_server(conn: psycopg.Connection, remote_db: str) -> None:
    """postgres_fdw pointing at *remote_db* on this very server."""
    info = conn.info
    conn.execute("CREATE EXTENSION postgres_fdw")
    conn.execute(
        sql.SQL("CREATE SERVER far FOREIGN DATA WRAPPER postgres_fdw OPTIONS ({})").format(
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.SQL(k), sql.Literal(str(v)))
                for k, v in (("host", info.host), ("port", info.port), ("dbname", remote_db))
            )
        )
    )
    conn.execute(
        sql.SQL("CREATE USER MAPPING FOR CURRENT_USER SERVER far OPTIONS (user {})").format(
            sql.Literal(info.user)
        )
    )


@pytest.mark.parametrize("command", ["truncate", "reset"])
def test_only_the_chosen_tables_are_emptied(
    project: Path, make_db: Callable[..., str], command: str
) -> None:
    target, remote = make_db(), make_db()
    execute(
        remote,
        "CREATE TABLE measure_far (id int, region text)",
        "INSERT INTO measure_far SELECT g, 'far' FROM generate_series(1, 10) g",
        "CREATE TABLE base_far (id int)",
        "INSERT INTO base_far SELECT generate_series(1, 10)",
    )
    if command == "reset":
        assert run("migrate", "--url", target)[0] == 0
    with psycopg.connect(target, autocommit=True) as conn:
        _fdw_server(conn, dbname_of(remote))
        for statement in (
            # a partitioned table with a local and a foreign partition
            "CREATE TABLE measure (id int, region text) PARTITION BY LIST (region)",
            "CREATE TABLE measure_here PARTITION OF measure FOR VALUES IN ('here')",
            "CREATE FOREIGN TABLE measure_remote PARTITION OF measure FOR VALUES IN ('far') "
            "SERVER far OPTIONS (table_name 'measure_far')",
            "INSERT INTO measure_here VALUES (1, 'here'), (2, 'here')",
            # a foreign table that inherits from a local one
            "CREATE TABLE base (id int)",
            "CREATE FOREIGN TABLE base_remote () INHERITS (base) "
            "SERVER far OPTIONS (table_name 'base_far')",
            "INSERT INTO base VALUES (1), (2)",
            # inheritance children: one excluded, one in a schema outside --schema
            "CREATE TABLE parent (id int)",
            "CREATE TABLE keep_child () INHERITS (parent)",
            "CREATE SCHEMA elsewhere",
            "CREATE TABLE elsewhere.child () INHERITS (parent)",
            "INSERT INTO parent VALUES (1)",
            "INSERT INTO keep_child VALUES (2), (3)",
            "INSERT INTO elsewhere.child VALUES (4), (5), (6)",
            # an excluded partition that is itself partitioned: its leaves are kept
            "CREATE TABLE events (id int, y int, q int) PARTITION BY LIST (y)",
            "CREATE TABLE keep_events_2020 PARTITION OF events FOR VALUES IN (2020) "
            "PARTITION BY LIST (q)",
            "CREATE TABLE events_2020_q1 PARTITION OF keep_events_2020 FOR VALUES IN (1)",
            "CREATE TABLE events_2021 PARTITION OF events FOR VALUES IN (2021)",
            "INSERT INTO events VALUES (1, 2020, 1), (2, 2021, 1), (3, 2021, 2)",
        ):
            conn.execute(statement)  # type: ignore[arg-type]
    outside = ("measure_remote", "base_remote", "keep_child", "elsewhere.child", "events_2020_q1")
    before = counts(target, *outside)
    assert before == {
        "measure_remote": 10,
        "base_remote": 10,
        "keep_child": 2,
        "elsewhere.child": 3,
        "events_2020_q1": 1,
    }
    schemas = EXAMPLE if command == "reset" else ["--schema", "public"]
    args = ["--url", target, *schemas, "--exclude", "keep_*"]

    code, out, err = run(command, "--dry-run", *args)
    assert code == 0, err
    code, out, err = run(command, "--yes", *args)
    assert code == 0, err
    assert counts(target, *outside) == before
    assert counts(remote, "measure_far", "base_far") == {"measure_far": 10, "base_far": 10}
    assert counts(target, "measure_here", "base", "parent", "events_2021") == {
        "measure_here": 0,
        "base": 0,
        "parent": 0,
        "events_2021": 0,
    }
    kept = next(line for line in out.splitlines() if line.strip().startswith("kept"))
    assert "public.keep_child (--exclude 'keep_*')" in kept, out
    assert "public.measure_remote (foreign partition" in kept, out
    assert "public.events_2020_q1 (a partition of public.keep_events_2020" in kept, out
    emptied = next(line for line in out.splitlines() if line.strip().startswith("emptied"))
    assert "public.measure (2 rows)" in emptied and "public.base (2 rows)" in emptied, out
    assert "public.parent (1 row)" in emptied and "public.events (2 rows)" in emptied, out
    for name in ("keep_", "elsewhere", "remote", "_far", "2020"):
        assert name not in emptied, out

    # the partitioned table again, now with rows in the foreign partition too
    execute(target, "INSERT INTO measure VALUES (3, 'here')")
    code, out, err = run("status", *args)
    assert code == 0 and "public.measure (1 row)" in out, out
    assert run(command, "--yes", *args)[0] == 0
    assert counts(remote, "measure_far", "base_far") == {"measure_far": 10, "base_far": 10}
    assert counts(target, *outside) == before


# --------------------------------------------------------------------------- 2. test databases


def _dev_db(make_db: Callable[..., str]) -> str:
    """A database whose name says nothing of tests, with rows in a table."""
    url = make_db(name=f"dbreset_devdb_{uuid.uuid4().hex[:10]}")
    execute(
        url,
        "CREATE TABLE customers (id serial, name text)",
        "INSERT INTO customers (name) VALUES ('Ada'), ('Grace')",
    )
    return url


def _assert_refused(code: int, err: str, dbname: str) -> None:
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    (line,) = lines
    assert f"'{dbname}'" in line and "not look like a test database" in line, line
    assert "dbreset mark" in line and "allowed_databases" in line and "rename" in line, line


def test_a_database_that_is_not_a_test_database_is_refused(
    project: Path, make_db: Callable[..., str]
) -> None:
    url = _dev_db(make_db)
    dbname = dbname_of(url)
    for command in (
        ["truncate", "--yes"],
        ["reset", "--yes", *EXAMPLE],
        ["reset", "--yes", "--recreate", *EXAMPLE],
    ):
        code, _, err = run(*command, "--url", url)
        _assert_refused(code, err, dbname)
    # the same through DATABASE_URL in a real process, the plain-line reader's path
    done = subprocess.run(
        [sys.executable, "-m", "dbreset", "reset", "--yes", *EXAMPLE],
        cwd=project,
        env=proc_env(project, DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_refused(done.returncode, done.stderr, dbname)
    assert counts(url, "customers") == {"customers": 2}
    assert scalar(url, "SELECT to_regclass('alembic_version')") is None  # not migrated either
    code, out, _ = run("status", "--url", url)
    assert code == 0 and re.search(r"test db\s+no", out), out

    # allowed_databases: by environment, flag-less
    code, out, err = run(
        "truncate", "--yes", "--url", url, env={"DBRESET_ALLOWED_DATABASES": "dbreset_devdb_*"}
    )
    assert code == 0, err
    assert counts(url, "customers") == {"customers": 0}
    execute(url, "INSERT INTO customers (name) VALUES ('Ada')")

    # dbreset mark: a comment on the database, nothing in its tables
    relations = scalar(url, "SELECT count(*) FROM pg_class")
    code, _, err = run("mark", "--url", url)
    assert code == 3 and "--yes" in err  # no terminal to ask on
    code, out, err = run("mark", "--yes", "--url", url)
    assert code == 0 and "now a test database" in out, err
    assert scalar(url, "SELECT count(*) FROM pg_class") == relations
    comment = scalar(
        url,
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname = current_database()",
    )
    assert comment.startswith("dbreset: ")
    code, out, _ = run("status", "--url", url)
    assert re.search(r"test db\s+dbreset's mark \(marked\)", out), out
    code, out, err = run("reset", "--yes", "--url", url, *EXAMPLE)
    assert code == 0, err
    assert counts(url, "customers") == {"customers": 0}
    assert scalar(url, "SELECT version_num FROM alembic_version") == HEAD


def test_the_mark_costs_no_round_trip(
    isolated: Path, make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marked database is judged on the query every command makes anyway: a
    truncate makes as many round trips there as on a database named *test*."""
    from dbreset import operations
    from dbreset.settings import resolve_settings

    marked, named = _dev_db(make_db), make_db()
    execute(
        named,
        "CREATE TABLE customers (id serial, name text)",
        "INSERT INTO customers (name) VALUES ('Ada'), ('Grace')",
    )
    assert run("mark", "--yes", "--url", marked)[0] == 0
    calls: list[str] = []
    original = psycopg.Connection.execute

    def counting(self: psycopg.Connection, query: Any, *args: Any, **kw: Any) -> Any:
        calls.append(str(query)[:40])
        return original(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.Connection, "execute", counting)
    trips = []
    for url in (named, marked):
        calls.clear()
        operations.truncate(resolve_settings({"url": url}, env={}))
        trips.append(len(calls))
    assert trips[0] == trips[1], trips
    assert counts(marked, "customers") == {"customers": 0}


def test_databases_dbreset_creates_carry_its_mark(
    project: Path, make_db: Callable[..., str]
) -> None:
    url = make_db(create=False, name=f"dbreset_devdb_{uuid.uuid4().hex[:10]}")
    code, _, err = run("reset", "--yes", "--create", "--url", url, *EXAMPLE)
    _assert_refused(code, err, dbname_of(url))
    allowed = {"DBRESET_ALLOWED_DATABASES": dbname_of(url)}
    code, out, err = run("reset", "--yes", "--create", "--url", url, *EXAMPLE, env=allowed)
    assert code == 0 and "created" in out, err
    # no longer allowed by name: its mark says dbreset made it
    execute(url, "INSERT INTO audit.source_system (name) VALUES ('x')")
    code, out, err = run("reset", "--yes", "--url", url, *EXAMPLE)
    assert code == 0, err
    assert counts(url, "audit.source_system") == {"audit.source_system": 0}


PLUGIN_PYPROJECT = """\
[tool.pytest.ini_options]
dbreset = true
{extra}

[tool.dbreset]
schemas = ["public", "audit"]
exclude = ["country_*"]
"""


def test_the_plugin_obeys_the_same_guard(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, make_db: Callable[..., str]
) -> None:
    url = _dev_db(make_db)
    copy_project("example", pytester.path)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    for name in list(os.environ):
        if name.startswith("DBRESET_") and name != "DBRESET_TEST_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(pytester.path / ".xdg-cache"))
    monkeypatch.setenv("DATABASE_URL", url)

    def pytest_run(extra: str = "") -> tuple[int, str]:
        (pytester.path / "pyproject.toml").write_text(PLUGIN_PYPROJECT.format(extra=extra))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
        return int(result.ret), result.stdout.str() + "\n" + result.stderr.str()

    code, text = pytest_run()
    exits = [line for line in text.splitlines() if line.startswith("Exit: dbreset: ")]
    assert len(exits) == 1, text
    _assert_refused(code, exits[0], dbname_of(url))
    assert counts(url, "customers") == {"customers": 2}
    assert scalar(url, "SELECT to_regclass('alembic_version')") is None

    code, text = pytest_run('dbreset_allowed_databases = ["dbreset_devdb_*"]')
    assert code == 0, text
    assert counts(url, "customers") == {"customers": 0}


# --------------------------------------------------------------------------- 4. ordinary conditions


def _grant_all(url: str, role: str) -> None:
    ident = sql.Identifier(role)
    with psycopg.connect(url, autocommit=True) as conn:
        for schema in ("public", "audit"):
            s = sql.Identifier(schema)
            for statement in (
                "GRANT USAGE ON SCHEMA {s} TO {r}",
                "GRANT ALL ON ALL TABLES IN SCHEMA {s} TO {r}",
                "GRANT ALL ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
            ):
                conn.execute(sql.SQL(statement).format(s=s, r=ident))


def test_no_privilege_on_the_version_table_is_exit_5(
    project: Path, db_url: str, make_role: Callable[..., str]
) -> None:
    assert run("reset", "--yes", "--url", db_url, *EXAMPLE)[0] == 0
    role = make_role()
    _grant_all(db_url, role)
    execute(
        db_url,
        f'REVOKE ALL ON alembic_version FROM "{role}"',
        "INSERT INTO audit.source_system (name) VALUES ('x')",
    )
    url = role_url(db_url, role)
    for command in (["reset", "--yes", *EXAMPLE], ["status"], ["migrate"]):
        code, out, err = run(*command, "--url", url)
        assert code == 5, (command, out, err)
        message = err if err.strip() else out
        assert "public.alembic_version" in message and f"permission denied for '{role}'" in message
        assert "GRANT SELECT, INSERT, UPDATE ON" in message, message
        assert "internal error" not in out + err
    assert counts(db_url, "audit.source_system") == {"audit.source_system": 1}


def test_a_role_statement_timeout_does_not_cancel_dbreset(
    project: Path, db_url: str, make_role: Callable[..., str]
) -> None:
    assert run("reset", "--yes", "--url", db_url, *EXAMPLE)[0] == 0  # builds the pristine db
    role = make_role()
    _grant_all(db_url, role)
    # only its owner may refresh a materialized view
    execute(db_url, f'ALTER MATERIALIZED VIEW customer_order_totals OWNER TO "{role}"')
    execute(db_url, f"ALTER ROLE \"{role}\" SET statement_timeout = '1ms'")
    url = role_url(db_url, role)
    assert scalar(url, "SHOW statement_timeout") == "1ms"
    for command in (["reset", "--yes", *EXAMPLE], ["truncate", "--yes", *EXAMPLE], ["status"]):
        execute(
            db_url,
            "INSERT INTO audit.source_system (name) "
            "SELECT 'x' || g FROM generate_series(1, 5000) g",
        )
        code, out, err = run(*command, "--url", url)
        assert code == 0, (command, out, err)
    assert counts(db_url, "audit.source_system") == {"audit.source_system": 5000}  # status
    code, out, err = run("reset", "--yes", "--url", url, *EXAMPLE)
    assert code == 0, err
    assert counts(db_url, "audit.source_system") == {"audit.source_system": 0}


def test_create_on_a_read_only_server_is_exit_4(
    project: Path,
    make_db: Callable[..., str],
    make_role: Callable[..., str],
    admin: psycopg.Connection,
) -> None:
    role = make_role("LOGIN CREATEDB")
    url = make_db(create=False)
    # what a hot standby answers: every transaction is read-only
    admin.execute(
        sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(role))
    )
    code, out, err = run("reset", "--yes", "--create", "--url", role_url(url, role), *EXAMPLE)
    assert code == 4, (out, err)
    assert "read-only server (a hot standby?)" in err and "primary" in err, err
    assert "internal error" not in err
    dbname = dbname_of(url)
    made = admin.execute(
        "SELECT count(*) FROM pg_database WHERE starts_with(datname, %s)", (dbname,)
    ).fetchone()
    assert made == (0,)


def test_a_backend_terminated_after_the_commit_is_not_an_error(
    project: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dbreset import render

    assert run("reset", "--yes", "--url", db_url, *EXAMPLE)[0] == 0
    execute(db_url, "INSERT INTO audit.source_system (name) VALUES ('x')")
    terminated: list[int] = []

    @contextlib.contextmanager
    def kill_after(label: str) -> Iterator[None]:
        yield
        if label.startswith("emptying"):  # committed: now the server ends our session
            with psycopg.connect(db_url, autocommit=True) as conn:
                (pid,) = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'dbreset reset %%'"
                ).fetchone()  # type: ignore[misc]
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                wait_for(
                    lambda: (
                        not conn.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                        ).fetchone()
                    ),
                    "the backend to end",
                )
            terminated.append(pid)

    monkeypatch.setattr(render, "progress", kill_after)
    code, out, err = run("reset", "--yes", "--url", db_url, *EXAMPLE)
    assert terminated, "the reset emptied nothing"
    assert code == 0, (out, err)
    assert "internal error" not in err
    assert counts(db_url, "audit.source_system") == {"audit.source_system": 0}
    with psycopg.connect(db_url) as conn:  # and the lock went with the session
        assert conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone() == (0,)


def test_ctrl_c_at_the_prompt_is_not_confirmed(project: Path, db_url: str) -> None:
    assert run("reset", "--yes", "--url", db_url, *EXAMPLE)[0] == 0
    execute(db_url, "INSERT INTO audit.source_system (name) VALUES ('x')")
    for command in (["reset", *EXAMPLE], ["truncate", *EXAMPLE], ["mark"]):
        code, text = pty_prompt(project, [*command, "--url", db_url], b"\x03")
        assert code == 3, text
        assert "not confirmed; nothing was changed" in text, text
        assert "Abort" not in text and "internal error" not in text, text
    assert counts(db_url, "audit.source_system") == {"audit.source_system": 1}


# --------------------------------------------------------------------------- 3. what committed

SLOW_INI = """\
[alembic]
script_location = %(here)s/migrations
path_separator = os
sqlalchemy.url = postgresql+psycopg://postgres@localhost/unused
"""

#: One transaction per revision: what a revision did stays when a later one fails.
SLOW_ENV = """\
import os

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
section = config.get_section(config.config_ini_section, {})
section["sqlalchemy.url"] = os.environ["DATABASE_URL"]
engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
"""

SLOW_0001 = """\
from alembic import op

revision = "slow_0001"
down_revision = None


def upgrade():
    op.execute("CREATE TABLE widget (id serial PRIMARY KEY, name text)")
    op.execute("INSERT INTO widget (name) VALUES ('seeded')")
"""

#: Sleeps in the database named by $FAULTS_SLOW_DB only (not while the pristine
#: database is built), for $FAULTS_SLEEP seconds.
SLOW_0002 = """\
import os

from alembic import op

revision = "slow_0002"
down_revision = "slow_0001"


def upgrade():
    bind = op.get_bind()
    here = bind.exec_driver_sql("SELECT current_database()").scalar()
    if here == os.environ.get("FAULTS_SLOW_DB"):
        seconds = float(os.environ.get("FAULTS_SLEEP", "60"))
        bind.exec_driver_sql(f"SELECT pg_sleep({seconds})")
    op.execute("CREATE TABLE gadget (id serial PRIMARY KEY)")
"""


def slow_project(work: Path) -> Path:
    versions = work / "migrations" / "versions"
    versions.mkdir(parents=True)
    (work / "alembic.ini").write_text(SLOW_INI)
    (work / "migrations" / "env.py").write_text(SLOW_ENV)
    (versions / "slow_0001.py").write_text(SLOW_0001)
    (versions / "slow_0002.py").write_text(SLOW_0002)
    return work


def _sleeping(url: str) -> int | None:
    """The pid of a backend of *url*'s database sleeping in pg_sleep."""
    return scalar(  # type: ignore[no-any-return]
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()",
    )


def _versions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute("SELECT version_num FROM alembic_version")]


@pytest.mark.slow
def test_sigint_during_a_migration_says_what_had_committed(isolated: Path, db_url: str) -> None:
    work = slow_project(isolated)
    proc = popen(work, "reset", "--yes", "--url", db_url, FAULTS_SLOW_DB=dbname_of(db_url))
    try:
        wait_for(lambda: _sleeping(db_url) or proc.poll() is not None, "the migration to sleep")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "slow_0001" in err and "had committed" in err, err
    assert "nothing was changed" not in err and "rolled back" not in err, err
    assert _versions(db_url) == ["slow_0001"]  # as the message says
    assert scalar(db_url, "SELECT to_regclass('gadget')") is None


def _interrupt_at(when: str, step: str) -> Callable[[str], Any]:
    """A progress callback that raises KeyboardInterrupt as *step* begins
    ("enter") or just after it ended ("exit")."""

    @contextlib.contextmanager
    def progress(label: str) -> Iterator[None]:
        if when == "enter" and label.startswith(step):
            raise KeyboardInterrupt
        yield
        if when == "exit" and label.startswith(step):
            raise KeyboardInterrupt

    return progress


def test_ctrl_c_before_and_after_a_commit_says_what_is_true(
    isolated: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dbreset import render

    slow_project(isolated)
    original = render.progress
    assert run("migrate", "--url", db_url)[0] == 0

    def fill() -> None:
        execute(db_url, "INSERT INTO widget (name) SELECT 'w' || g FROM generate_series(1, 500) g")

    fill()
    # just before the emptying transaction: nothing was changed, and that is true
    monkeypatch.setattr(render, "progress", _interrupt_at("enter", "emptying"))
    code, _, err = run("truncate", "--yes", "--url", db_url)
    assert code == 130 and "interrupted; nothing was changed" in err, err
    assert counts(db_url, "widget") == {"widget": 501}
    # just after its COMMIT: the truncate is done, and the message says so
    monkeypatch.setattr(render, "progress", _interrupt_at("exit", "emptying"))
    code, _, err = run("truncate", "--yes", "--url", db_url)
    assert code == 130, err
    assert f"the reset of '{dbname_of(db_url)}' had committed" in err, err
    assert "nothing was changed" not in err and "rolled back" not in err, err
    assert counts(db_url, "widget") == {"widget": 0}

    # a reset: the migration committed, then Ctrl-C before the emptying began
    execute(db_url, "DROP TABLE gadget", "UPDATE alembic_version SET version_num = 'slow_0001'")
    fill()
    monkeypatch.setattr(render, "progress", _interrupt_at("enter", "emptying"))
    code, _, err = run("reset", "--yes", "--url", db_url)
    assert code == 130, err
    assert "the migration to slow_0002 had committed" in err, err
    assert "nothing was changed" not in err, err
    assert _versions(db_url) == ["slow_0002"] and counts(db_url, "widget") == {"widget": 500}
    # Ctrl-C just as the migration's last revision had committed
    execute(db_url, "DROP TABLE gadget", "UPDATE alembic_version SET version_num = 'slow_0001'")
    monkeypatch.setattr(render, "progress", _interrupt_at("exit", "migrating"))
    code, _, err = run("reset", "--yes", "--url", db_url)
    assert code == 130, err
    assert "the migration to slow_0002 had committed" in err, err
    assert "nothing was changed" not in err, err
    assert _versions(db_url) == ["slow_0002"] and counts(db_url, "widget") == {"widget": 500}
    monkeypatch.setattr(render, "progress", original)
    code, _, err = run("reset", "--yes", "--url", db_url)
    assert code == 0, err
    assert counts(db_url, "widget") == {"widget": 1}  # as freshly migrated


@pytest.fixture
def own_server() -> Iterator[tuple[str, Path]]:
    """A throwaway embedded server of this test's own (its URL and data
    directory), stopped afterwards whatever became of it."""
    import shutil
    import tempfile

    from dbreset.embedded import EmbeddedServer

    # not tmp_path: as root the server runs as 'nobody', who cannot enter it
    base = Path(tempfile.mkdtemp(prefix="dbreset-faults-"))
    base.chmod(0o755)
    server = EmbeddedServer(base / "pg")
    try:
        url = server.start(watchdog=False)
        yield url, server.data_dir
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_server_gone_during_commit_says_the_outcome_is_unknown(
    isolated: Path, own_server: tuple[str, Path]
) -> None:
    server_url, data_dir = own_server
    url = with_dbname(server_url, "dbreset_test_commit")
    execute(server_url, "CREATE DATABASE dbreset_test_commit")
    execute(
        url,
        "CREATE TABLE t (id int)",
        "INSERT INTO t SELECT generate_series(1, 100)",
        # refreshed in the message that holds the COMMIT; slow for dbreset only
        "CREATE FUNCTION slow() RETURNS int LANGUAGE sql AS $$ SELECT 1 FROM pg_sleep("
        "CASE WHEN current_setting('application_name') LIKE 'dbreset%' THEN 60 ELSE 0 END) $$",
        "CREATE MATERIALIZED VIEW slow_view AS SELECT slow() AS one",
    )
    killed: list[int] = []

    def kill_the_postmaster() -> None:
        wait_for(lambda: _sleeping(url), "the COMMIT's message to be under way")
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        killed.append(postmaster)

    killer = threading.Thread(target=kill_the_postmaster, daemon=True)
    killer.start()
    code, out, err = run("truncate", "--yes", "--url", url)
    killer.join(timeout=60)
    assert killed, err
    assert code == 4, (out, err)
    assert "unknown" in err and "dbreset status" in err, err
    assert "nothing was changed" not in err and "rolled back" not in err, err
    assert "internal error" not in err


# --------------------------------------------------------------------------- 6. migration locks

NOTE_REVISION = """\
from alembic import op

revision = "faults_note"
down_revision = {head!r}


def upgrade():
    op.execute({statement!r})
"""

LOCK_WAITERS = """
SELECT pid, application_name FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> %s
"""


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg", "psycopg2"])
def test_a_migration_waits_for_a_lock_no_longer_than_wait(
    isolated: Path, db_url: str, driver: str
) -> None:
    if driver == "psycopg2":
        pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed")
    example = driver != "asyncpg"
    copy_project("example" if example else "async", isolated)
    url = db_url.replace("postgresql://", f"postgresql+{driver}://", 1)
    code, _, err = run("migrate", "--url", url)
    assert code == 0, err
    # the reset with psycopg; migrate (no pristine database to build) for the others
    if driver == "psycopg":
        command, args = ["reset", "--yes"], ["--url", url, *EXAMPLE]
    else:
        command, args = ["migrate"], ["--url", url]
    table, head = ('"order"', HEAD) if example else ("widget", "async_0002")
    statement = f"ALTER TABLE {table} ADD COLUMN note text"
    versions = isolated / "migrations" / "versions"
    (versions / "faults_note.py").write_text(NOTE_REVISION.format(head=head, statement=statement))

    with psycopg.connect(db_url, application_name="faults blocker") as blocker:
        blocker.execute(f"SELECT * FROM {table}")  # and stays idle in transaction
        blocker_pid = blocker.info.backend_pid
        proc = popen(isolated, *command, "--wait", "2", *args)
        try:
            with psycopg.connect(db_url, autocommit=True) as watch:

                def waiter() -> Any:
                    if proc.poll() is not None:
                        return "ended"
                    return watch.execute(LOCK_WAITERS, (blocker_pid,)).fetchone()

                found = wait_for(waiter, "the migration to wait for its lock")
            seen = time.monotonic()
            out, err = proc.communicate(timeout=60)
            waited = time.monotonic() - seen
        finally:
            if proc.poll() is None:
                proc.kill()
    assert found != "ended", (out, err)
    assert proc.returncode == 6, (out, err)
    assert waited < 2 + 4, waited  # --wait 2, not forever
    assert "a migration of" in err and "waited 2s for a lock" in err, err
    assert f"pid {blocker_pid} (faults blocker" in err, err
    assert "--wait SECONDS" in err
    if driver != "asyncpg":  # asyncpg reads no PGAPPNAME
        assert found[1].startswith("dbreset migrate pid "), found
    assert _versions(db_url) == [head]
    assert scalar(db_url, "SELECT count(*) FROM pg_attribute WHERE attname = 'note'") == 0
    # and once the blocker has gone, the same command goes through
    code, _, err = run(*command, *args)
    assert code == 0, err
    assert _versions(db_url) == ["faults_note"]


# --------------------------------------------------------------------------- 7. create at once


@pytest.mark.slow
def test_two_creates_at_once_both_succeed(project: Path, make_db: Callable[..., str]) -> None:
    url = make_db(create=False)
    procs = [popen(project, "reset", "--yes", "--create", "--url", url, *EXAMPLE) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    outs = [out for out, _ in results]
    assert sum("the database did not exist and was created" in out for out in outs) == 1, outs
    assert _versions(url) == [HEAD]
    assert scalar(url, "SELECT count(*) FROM country_codes") > 0  # cloned freshly migrated
    for _, err in results:
        assert "UniqueViolation" not in err and "internal error" not in err


# --------------------------------------------------------------------------- 8. many tables


def _create_tables(url: str, n: int, batch: int = 250) -> None:
    """*n* tables ``t1`` … each holding one row, with a primary key, a TOAST
    table and an ON TRUNCATE trigger (so that each is truncated, never deleted
    from), *batch* to a transaction (one transaction would itself need more
    locks than a default server holds)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RETURN NULL; END $$"
        )
        for first in range(1, n + 1, batch):
            last = min(n, first + batch - 1)
            conn.execute(
                f"DO $$ BEGIN FOR i IN {first}..{last} LOOP EXECUTE format("  # type: ignore[arg-type]
                "'CREATE TABLE t%s (id int PRIMARY KEY, note text); "
                "INSERT INTO t%s VALUES (1, ''x''); "
                "CREATE TRIGGER on_truncate AFTER TRUNCATE ON t%s EXECUTE FUNCTION noop()', "
                "i, i, i); END LOOP; END $$"
            )


def _total_rows(url: str, n: int, batch: int = 500) -> int:
    total = 0
    with psycopg.connect(url, autocommit=True) as conn:
        for first in range(1, n + 1, batch):
            query = " UNION ALL ".join(
                f"SELECT count(*) FROM t{i}" for i in range(first, min(n, first + batch - 1) + 1)
            )
            total += sum(c for (c,) in conn.execute(query))  # type: ignore[arg-type]
    return total


def _pty_stderr(work: Path, args: list[str], **extra: str) -> tuple[int, str, str]:
    """Run dbreset with stderr on a terminal: exit code, stdout, what the terminal showed."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbreset", *args],
        cwd=work,
        env=proc_env(work, **extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    return proc.returncode, out.decode(), shown.decode(errors="replace")


@pytest.mark.slow
def test_progress_of_a_slow_step_only_on_a_terminal(
    isolated: Path, make_db: Callable[..., str]
) -> None:
    work = slow_project(isolated)
    first, second = make_db(), make_db()
    slow = {"FAULTS_SLEEP": "1.6"}
    code, out, shown = _pty_stderr(
        work, ["migrate", "--url", first], FAULTS_SLOW_DB=dbname_of(first), **slow
    )
    assert code == 0, shown
    assert f"dbreset: migrating {dbname_of(first)} … 1 s" in shown, shown
    assert "dbreset: migrating" not in out  # progress is never on stdout
    piped = subprocess.run(
        [sys.executable, "-m", "dbreset", "migrate", "--url", second],
        cwd=work,
        env=proc_env(work, FAULTS_SLOW_DB=dbname_of(second), **slow),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert "…" not in piped.stderr and "\x1b[K" not in piped.stderr, piped.stderr
    assert _versions(first) == _versions(second) == ["slow_0002"]


@pytest.mark.slow
def test_more_tables_than_the_lock_table_holds_are_refused_then_the_named_value_works(
    isolated: Path, own_server: tuple[str, Path]
) -> None:
    """5,000 dirty tables on a server with the default lock table (one of the
    test's own, so that its setting can be changed): refused before anything
    changes, naming the setting and a value; with that value, emptied."""
    from dbreset.embedded import EmbeddedServer

    server_url, data_dir = own_server
    url = with_dbname(server_url, "dbreset_test_locks")
    execute(server_url, "CREATE DATABASE dbreset_test_locks")
    n = 5000
    _create_tables(url, n)
    assert scalar(url, "SHOW max_locks_per_transaction") == "64"  # the default
    code, out, err = run("truncate", "--yes", "--url", url)
    assert code == 7, (out, err)
    wanted = re.search(r"Set max_locks_per_transaction = (\d+) in postgresql\.conf", err)
    assert wanted, err
    assert "nothing was changed" in err and "out of shared memory" not in err, err
    assert _total_rows(url, n) == n

    execute(server_url, f"ALTER SYSTEM SET max_locks_per_transaction = {wanted.group(1)}")
    server = EmbeddedServer(data_dir)
    server.stop()
    server.start(watchdog=False)
    assert scalar(url, "SHOW max_locks_per_transaction") == wanted.group(1)
    code, out, err = run("truncate", "--yes", "--url", url)
    assert code == 0, err
    assert f"{n} of {n} tables" in out, out
    assert _total_rows(url, n) == 0
