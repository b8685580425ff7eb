"""The command line: Typer's CliRunner for the contract, real processes for
terminals, concurrency and ``python -m``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from typer.testing import CliRunner

from cliruns import proc_env, pty_prompt, run
from conftest import copy_project, with_dbname
from dbreset.cli import app

HEAD = "0e0692925689"
EXAMPLE = ["--schema", "public", "--schema", "audit", "--exclude", "country_*"]


def dbreset_proc(work: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbreset", *args],
        cwd=work,
        env=proc_env(work),
        capture_output=True,
        text=True,
        timeout=120,
        **kw,  # type: ignore[call-overload]
    )


@pytest.fixture
def project(isolated: Path) -> Path:
    copy_project("example", isolated)
    return isolated


def test_version_and_help() -> None:
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("dbreset ")
    code, out, _ = run("--help")
    assert code == 0 and "dbreset reset --dry-run" in out and "Exit codes" in out
    code, out, _ = run("reset", "--help")
    assert code == 0 and "--create" in out and "Example:" in out


def test_python_m_dbreset(isolated: Path) -> None:
    done = dbreset_proc(isolated, "--help")
    assert done.returncode == 0 and "migrate" in done.stdout


def test_no_url_is_exit_2(project: Path) -> None:
    code, _, err = run("reset", "--yes")
    assert code == 2 and "no database URL" in err and "DATABASE_URL" in err
    assert "Traceback" not in err


def test_bad_flag_is_exit_2() -> None:
    code, _, _ = run("reset", "--no-such-flag")
    assert code == 2


@pytest.mark.parametrize("url", ["mysql://root@localhost/app", "sqlite:///test.db"])
def test_not_postgresql_is_exit_2(project: Path, url: str) -> None:
    code, _, err = run("reset", "--yes", "--url", url)
    assert code == 2 and "not a PostgreSQL URL" in err


def test_malformed_url_is_exit_2(project: Path) -> None:
    code, _, err = run("status", "--url", "postgresql://u:pw@host:port/db")
    assert code == 2 and "malformed" in err and ":pw@" not in err


def test_missing_alembic_ini_is_exit_2(isolated: Path, db_url: str) -> None:
    code, _, err = run("reset", "--yes", "--url", db_url)
    assert code == 2 and "--config" in err


def test_unknown_config_key_is_exit_2(project: Path, db_url: str) -> None:
    (project / "pyproject.toml").write_text('[tool.dbreset]\nschema = ["public"]\n')
    code, _, err = run("status", "--url", db_url)
    assert code == 2 and "unknown key" in err and "schema" in err


def test_remote_is_exit_3_and_allow_remote_is_strict(project: Path) -> None:
    url = "postgresql://app:hunter2@db.example.com/app_test"
    code, _, err = run("reset", "--yes", "--url", url)
    assert code == 3 and "--allow-remote" in err and "hunter2" not in err
    code, _, err = run("reset", "--yes", "--url", url, env={"DBRESET_ALLOW_REMOTE": "ture"})
    assert code == 2 and "not a boolean" in err


def test_no_terminal_needs_yes(project: Path, db_url: str) -> None:
    code, _, err = run("reset", "--url", db_url, *EXAMPLE)
    assert code == 3 and "--yes" in err


def test_unreachable_is_exit_4_and_masks_the_password(project: Path) -> None:
    url = "postgresql://app:hunter2@127.0.0.1:1/app_test"
    code, out, err = run("reset", "--yes", "--url", url)
    assert code == 4 and "cannot connect" in err
    assert "hunter2" not in out + err


def test_missing_database_is_exit_4_with_create_hint(project: Path, make_db) -> None:  # type: ignore[no-untyped-def]
    url = make_db(create=False)
    code, _, err = run("reset", "--yes", "--url", url, *EXAMPLE)
    assert code == 4 and "--create" in err
    code, out, err = run("reset", "--yes", "--create", "--url", url, *EXAMPLE)
    assert code == 0, err
    assert "created" in out


def test_broken_migration_is_exit_5_traceback_only_with_verbose(
    isolated: Path, db_url: str
) -> None:
    copy_project("broken", isolated)
    code, _, err = run("reset", "--yes", "--url", db_url)
    assert code == 5 and "missing_table" in err and "Traceback" not in err
    code, _, err = run("reset", "--yes", "--url", db_url, "--verbose")
    assert code == 5 and "Traceback" in err


def test_busy_is_exit_6_naming_the_blocker(project: Path, db_url: str) -> None:
    assert run("reset", "--yes", "--url", db_url, *EXAMPLE)[0] == 0
    with psycopg.connect(db_url, application_name="forgotten shell") as blocker:
        blocker.execute("INSERT INTO \"UserProfile\" (\"displayName\", email) VALUES ('a', 'b')")
        code, _, err = run("reset", "--yes", "--wait", "0.5", "--url", db_url, *EXAMPLE)
    assert code == 6 and "forgotten shell" in err and "idle in transaction" in err


def test_cascade_into_excluded_is_exit_7(project: Path, db_url: str) -> None:
    code, _, err = run("reset", "--yes", "--url", db_url, *EXAMPLE, "--exclude", "payment")
    assert code == 7 and "public.payment" in err and "references public.invoice" in err


def test_reset_json_and_status_json(project: Path, db_url: str) -> None:
    code, out, _ = run("reset", "--yes", "--json", "--url", db_url, *EXAMPLE)
    assert code == 0
    data = json.loads(out)
    assert data["ok"] and data["migrate"]["after"] == [HEAD]
    assert data["truncate"]["tables_checked"] == 9
    code, out, _ = run("status", "--json", "--url", db_url)
    status = json.loads(out)
    assert code == 0 and status["at_head"] and status["current"] == [HEAD]
    assert status["settings"]["url"] == {"value": db_url, "source": "--url"}
    assert status["settings"]["allow_remote"] == {"value": False, "source": "default"}
    assert status["settings"]["wait"] == {"value": 5.0, "source": "default"}
    assert status["settings"]["exclude"] == {"value": [], "source": "default"}
    assert data["schema"] == status["schema"] == 1


def test_error_json_goes_to_stdout(project: Path) -> None:
    code, out, _ = run("status", "--json", "--url", "mysql://x/y")
    assert code == 2 and json.loads(out) == {
        "ok": False,
        "schema": 1,
        "error": json.loads(out)["error"],
        "exit_code": 2,
    }


def test_human_output_summarises(project: Path, db_url: str) -> None:
    from conftest import ROOT

    assert run("migrate", "--url", db_url)[0] == 0
    subprocess.run(
        [sys.executable, str(ROOT / "examples/seed.py"), db_url], check=True, capture_output=True
    )
    code, out, _ = run("reset", "--dry-run", "--url", db_url, *EXAMPLE)
    assert code == 0 and "nothing was changed" in out and "would empty" in out
    code, out, _ = run("reset", "--yes", "--url", db_url, *EXAMPLE)
    assert code == 0
    assert f"at head {HEAD}" in out and "emptied" in out and "public.order (4 rows)" in out
    assert "restarted" in out and "public.invoice_number_seq" in out
    assert "kept" in out and "country_codes" in out
    code, out, _ = run("status", "--url", db_url, env={"DBRESET_SCHEMAS": "public,audit"})
    # country_* hold the rows the migrations seed: as freshly migrated
    assert "all 11 tables are empty but for the seeded rows" in out
    assert "(--url)" in out and "(DBRESET_SCHEMAS)" in out


def test_settings_from_pyproject_and_environment(project: Path, db_url: str) -> None:
    (project / "pyproject.toml").write_text(
        '[tool.dbreset]\nschemas = ["public", "audit"]\nexclude = ["country_*"]\n'
        'url_env = "APP_TEST_DB"\n'
    )
    code, out, err = run("status", env={"APP_TEST_DB": db_url, "DBRESET_WAIT": "2"})
    assert code == 0, err
    assert "APP_TEST_DB" in out and "pyproject.toml [tool.dbreset]" in out
    assert "DBRESET_WAIT" in out


def test_terminal_asks_and_names_the_database(project: Path, db_url: str) -> None:
    dbname = urlsplit(db_url).path.lstrip("/")
    code, text = pty_prompt(project, ["reset", "--url", db_url, *EXAMPLE], b"n\n")
    assert code == 3 and dbname in text
    code, text = pty_prompt(project, ["reset", "--url", db_url, *EXAMPLE], b"y\n")
    assert code == 0 and "dbreset reset" in text


def test_two_processes_at_once_both_succeed(project: Path, db_url: str) -> None:
    args = [sys.executable, "-m", "dbreset", "reset", "--yes", "--url", db_url, *EXAMPLE]
    procs = [
        subprocess.Popen(
            args,
            cwd=project,
            env=proc_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]


def test_status_of_a_server_default_database(project: Path, server_url: str) -> None:
    code, out, err = run("status", "--url", with_dbname(server_url, "postgres"))
    assert code == 0, err and "PostgreSQL" in out


# --------------------------------------------------------------------------- plain lines

PLAIN_OPTIONS = [
    ["--url", "postgresql://u:p%40ss@127.0.0.1/app_test"],
    ["--url=postgresql://127.0.0.1/a=b"],
    ["-c", "conf/alembic.ini"],
    ["--config", "alembic.ini"],
    ["--config="],
    ["--wait", "0"],
    ["--wait=2.5"],
    ["--wait", "1e-1"],
    ["--wait", "-1"],
    ["--wait", "inf"],
    ["--schema", "public"],
    ["--schema=audit"],
    ["--exclude", "country_*"],
    ["--exclude", "--yes"],
    ["--yes"],
    ["-y"],
    ["--dry-run"],
    ["--create"],
    ["--json"],
    ["--allow-remote"],
    ["-q"],
    ["--quiet"],
    ["-v"],
    ["--verbose"],
]

TYPER_ONLY = [
    [],
    ["status"],
    ["--version"],
    ["reset", "--help"],
    ["reset", "-h"],
    ["reset", "-yq"],
    ["reset", "-c=alembic.ini"],
    ["reset", "--yes=1"],
    ["reset", "--wait", "soon"],
    ["reset", "--url"],
    ["reset", "--url", "a", "--url", "b"],
    ["reset", "--yes", "--yes"],
    ["reset", "--no-yes"],
    ["reset", "--", "--yes"],
    ["reset", "extra"],
    ["migrate", "--schema", "public"],
    ["truncate", "--create"],
    ["--url", "x", "reset"],
]


def typer_reads(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """What the Typer app hands to ``execute`` for *argv* (None: it did not)."""
    from dbreset import cli

    calls: list[object] = []
    monkeypatch.setattr(cli, "execute", lambda call: calls.append(call) or 0)
    CliRunner().invoke(app, argv, catch_exceptions=False)
    return calls[0] if calls else None


def plain_lines() -> list[list[str]]:
    """Every option alone, in pairs and in a few long lines, for each command."""
    import random

    lines = []
    picker = random.Random(5)
    for command in ("migrate", "truncate", "reset"):
        lines += [[command]] + [[command, *opt] for opt in PLAIN_OPTIONS]
        for _ in range(60):
            options = picker.sample(PLAIN_OPTIONS, picker.randint(2, 7))
            lines.append([command, *(part for opt in options for part in opt)])
    return lines


def test_plain_lines_are_read_as_typer_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from dbreset.console import parse_plain

    read = 0
    for argv in plain_lines():
        plain = parse_plain(argv)
        if plain is not None:
            read += 1
            assert plain == typer_reads(argv, monkeypatch), argv
    assert read > 100  # most plain lines are read without Typer
    for argv in (
        ["reset", "--yes"],
        ["reset", "--yes", "-q", "--url", "postgresql://127.0.0.1/a", "-c", "alembic.ini"],
        ["truncate", "-y", "--schema", "public", "--schema", "audit", "--exclude", "c_*"],
        ["migrate", "--json", "--wait", "3"],
    ):
        assert parse_plain(argv) == typer_reads(argv, monkeypatch) != None  # noqa: E711
    for argv in TYPER_ONLY:
        assert parse_plain(argv) is None, argv


def test_a_plain_reset_does_not_import_typer(tmp_path: Path) -> None:
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('typer' in sys.modules))\n"
        "from dbreset.main import main\n"
        "main()\n"
    )
    unreachable = "postgresql://nobody@127.0.0.1:9/nothing"
    for argv, typer_loaded, code in (
        (["truncate", "--yes", "--url", unreachable], "False", 4),
        (["truncate", "--url", unreachable, "--help"], "True", 0),
    ):
        done = subprocess.run(
            [sys.executable, "-c", script, *argv],
            cwd=tmp_path,
            env=proc_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == code, done.stderr
        assert done.stdout.strip().splitlines()[-1] == typer_loaded
