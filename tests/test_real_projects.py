"""The seams between dbreset and a real project's own configuration: the
variables env.py reads, per-branch databases, a plugin that needs no hand
steps, and output that says what is true. Real PostgreSQL, real git, real
pytest."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from conftest import copy_project, dbname_of, drop_family, scalar, with_dbname
from dbreset.cli import app
from test_plugin import dbreset_lines, make_project, output, run  # noqa: F401

HEAD = "0e0692925689"
EXAMPLE = ["--schema", "public", "--schema", "audit"]


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def asyncpg(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


# --------------------------------------------------------------------------- export_env


def test_env_py_reading_another_variable_is_refused_before_anything_migrates(
    isolated: Path, make_db: Callable[..., str]
) -> None:
    """env.py reads DATABASE__URL, which points at a development database: the
    reset refuses before a single migration runs there, and names the fix."""
    ini = copy_project("other_variable", isolated)
    target, dev = make_db(), make_db()
    env = {"DATABASE__URL": asyncpg(dev)}
    code, _, err = invoke("reset", "--yes", "--url", asyncpg(target), "-c", str(ini), env=env)
    message = " ".join(err.split())
    assert code == 2, err
    assert "env.py connected to" in message and dbname_of(dev) in message
    assert "DATABASE__URL points there" in message and "export_env" in message
    assert "nothing was migrated" in message
    for url in (dev, target):
        assert scalar(url, "SELECT to_regclass('widget')") is None

    env["DBRESET_EXPORT_ENV"] = "DATABASE__URL"
    code, _, err = invoke("reset", "--yes", "--url", asyncpg(target), "-c", str(ini), env=env)
    assert code == 0, err
    assert scalar(target, "SELECT version_num FROM alembic_version") == "async_0002"
    assert scalar(dev, "SELECT to_regclass('widget')") is None


def test_export_env_reaches_the_application_and_the_workers(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],  # noqa: F811
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_project(extra='dbreset_export_env = ["APP__DATABASE__URL"]')
    pytester.makeconftest(
        """
        import os

        AT_IMPORT = os.environ.get("APP__DATABASE__URL")
        """
    )
    pytester.makepyfile(
        test_x="""
        import os

        from conftest import AT_IMPORT

        def test_the_application_sees_the_target():
            assert os.environ["APP__DATABASE__URL"] == os.environ["DATABASE_URL"]
            assert AT_IMPORT == os.environ["DATABASE_URL"]
        """
    )
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("APP__DATABASE__URL", "postgresql://localhost/app_development")
    for args in ([], ["-n", "2"]):
        result = run(pytester, *args)
        assert result.ret == 0, output(result)
        result.assert_outcomes(passed=1)


# --------------------------------------------------------------------------- {branch}


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def checkout(isolated: Path) -> Path:
    git(isolated, "init", "-q", "-b", "main")
    git(isolated, "commit", "-q", "--allow-empty", "-m", "first")
    return isolated


def test_every_branch_gets_its_own_database(
    checkout: Path, server_url: str, admin: psycopg.Connection
) -> None:
    copy_project("example", checkout)
    token = uuid.uuid4().hex[:8]
    template = with_dbname(server_url, f"dbreset_test_{token}_{{branch}}")
    main_db, feature_db = f"dbreset_test_{token}_main", f"dbreset_test_{token}_feature_x_42"
    env = {"DATABASE_URL": template}
    try:
        code, out, err = invoke("reset", "--create", "--yes", *EXAMPLE, env=env)
        assert code == 0, err
        assert main_db in out and "created" in out
        git(checkout, "checkout", "-q", "-b", "Feature/X-42")
        code, out, err = invoke("reset", "--create", "--yes", *EXAMPLE, env=env)
        assert code == 0, err
        assert feature_db in out
        assert scalar(with_dbname(server_url, feature_db), "SELECT count(*) FROM country_codes")

        code, out, _ = invoke("list", "--json", env=env)
        listed = {db["name"]: db for db in json.loads(out)["databases"]}
        assert listed[main_db]["kind"] == "created" and listed[main_db]["branch"] == "main"
        assert listed[main_db]["stale"] is None

        git(checkout, "branch", "-q", "-D", "main")
        code, out, _ = invoke("list", "--json", env=env)
        listed = {db["name"]: db for db in json.loads(out)["databases"]}
        assert "no longer exists" in listed[main_db]["stale"]
        code, out, err = invoke("drop", "--stale", "--yes", env=env)
        assert code == 0, err
        names = {n for (n,) in admin.execute("SELECT datname FROM pg_database")}
        assert main_db not in names and feature_db in names
        assert not any(n.startswith(f"{main_db}_") for n in names)  # its pristine too
    finally:
        for name in (main_db, feature_db):
            drop_family(admin, name)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (
            "postgresql:///app_test_{branch}?host=/run/pg",
            "postgresql:///app_test_main?host=/run/pg",
        ),
        (
            "postgresql+psycopg://u:p%40ss@db.local:5433/app_test_{branch}?sslmode=disable",
            "postgresql+psycopg://u:p%40ss@db.local:5433/app_test_main?sslmode=disable",
        ),
    ],
    ids=["no-host-part", "driver-password-port"],
)
def test_a_branch_url_keeps_all_but_the_database_name(
    checkout: Path, written: str, expected: str
) -> None:
    from dbreset.database import conninfo_params
    from dbreset.settings import resolve_settings

    settings = resolve_settings({"url": written}, env={}, cwd=checkout)
    assert settings.url == expected
    assert conninfo_params(expected)["dbname"] == "app_test_main"


def test_a_branch_placeholder_outside_a_checkout_is_a_clear_error(
    isolated: Path, server_url: str
) -> None:
    copy_project("example", isolated)
    env = {"DATABASE_URL": with_dbname(server_url, "dbreset_test_{branch}")}
    code, _, err = invoke("reset", "--yes", env=env)
    assert code == 2 and "git" in err and "{branch}" in err


def test_a_branch_database_from_another_branch_is_recreated(
    checkout: Path, server_url: str, admin: psycopg.Connection
) -> None:
    copy_project("example", checkout)
    name = f"dbreset_test_{uuid.uuid4().hex[:8]}_main"
    env = {"DATABASE_URL": with_dbname(server_url, name.replace("_main", "_{branch}"))}
    try:
        assert invoke("reset", "--create", "--yes", *EXAMPLE, env=env)[0] == 0
        url = with_dbname(server_url, name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE alembic_version SET version_num = 'elsewhere_0001'")
        code, _, err = invoke("reset", "--yes", *EXAMPLE, env=env)
        assert code == 5 and "another branch" in err and "--recreate" in err
        code, _, err = invoke("reset", "--recreate", "--yes", *EXAMPLE, env=env)
        assert code == 0, err
        assert scalar(url, "SELECT version_num FROM alembic_version") == HEAD
    finally:
        drop_family(admin, name)


# --------------------------------------------------------------------------- the plugin


def test_the_plugin_creates_a_missing_database_when_told_to(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],  # noqa: F811
    make_db: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_project()
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    url = make_db(create=False)
    monkeypatch.setenv("DATABASE_URL", url)
    missing = run(pytester, "-n", "2")
    assert missing.ret == 4
    (line,) = [ln for ln in output(missing).splitlines() if ln.startswith("Exit:")]
    assert "--dbreset-create" in line and "dbreset_create" in line and "dbreset reset" not in line
    created = run(pytester, "-n", "2", "--dbreset-create")
    assert created.ret == 0, output(created)
    (reset,) = [ln for ln in dbreset_lines(created) if ln.startswith("dbreset: reset")]
    assert f"(created the database; at head {HEAD}; " in reset
    assert scalar(url, "SELECT count(*) FROM country_codes") == 12


def test_the_canary_checks_at_the_end_of_the_session_by_itself(
    pytester: pytest.Pytester,
    make_project: Callable[..., Path],  # noqa: F811
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_project()  # dbreset_canary = "session"
    pytester.makepyfile(
        test_x="""
        import os

        import psycopg

        def test_a_raw_truncate_from_elsewhere():
            with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
                conn.execute('TRUNCATE "order" CASCADE')

        def test_other():
            pass
        """
    )
    monkeypatch.setenv("DATABASE_URL", db_url)
    for args in ([], ["-n", "2"]):
        result = run(pytester, *args)
        assert result.ret == 1, output(result)
        result.assert_outcomes(passed=2)
        assert "dbreset: the database was reset/truncated/rebuilt during this session" in (
            output(result)
        )


# --------------------------------------------------------------------------- true output


def test_the_summary_names_where_an_exclude_came_from(isolated: Path, db_url: str) -> None:
    copy_project("example", isolated)
    (isolated / "pyproject.toml").write_text(
        '[tool.dbreset]\nschemas = ["public", "audit"]\nexclude = ["country_*", "nothing_*"]\n'
    )
    code, out, err = invoke("reset", "--yes", "--url", db_url)
    assert code == 0, err
    assert "(exclude 'country_*' from pyproject.toml [tool.dbreset])" in " ".join(out.split())
    assert "--exclude 'country_*'" not in out
    assert "exclude 'nothing_*' from pyproject.toml [tool.dbreset] matched no table" in (
        " ".join(err.split())
    )


def test_a_migration_error_keeps_the_file_and_line(isolated: Path, db_url: str) -> None:
    copy_project("broken", isolated)
    code, _, err = invoke("reset", "--yes", "--url", db_url)
    assert code == 5
    assert os.path.join("migrations", "versions", "0002_fails.py") + ", line " in err


def test_status_json_is_typed_and_promises_no_method(isolated: Path, db_url: str) -> None:
    copy_project("example", isolated)
    assert invoke("reset", "--yes", "--url", db_url, *EXAMPLE)[0] == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO \"UserProfile\" (email, \"displayName\") VALUES ('a', 'A')")
    code, out, _ = invoke("status", "--json", "--url", db_url, *EXAMPLE)
    data = json.loads(out)
    assert code == 0 and data["schema"] == 1
    assert data["nonempty"] == [
        {"table": "public.UserProfile", "rows": 1, "more": False, "how": None}
    ]
    assert data["settings"]["schemas"] == {"value": ["public", "audit"], "source": "--schema"}
    assert data["settings"]["wait"]["value"] == 5.0
