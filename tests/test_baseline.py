"""A reset leaves the database as a fresh migration does: seeded rows, sequences
and materialized views included. Real PostgreSQL, real Alembic; the expected
state is a database migrated from empty by ``alembic upgrade heads``, compared
relation by relation (tests/dbstate.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

import dbreset
from conftest import copy_project, dbname_of, scalar, two_resets_at_once, with_dbname
from dbreset import operations, session
from dbreset.cli import app
from dbreset.errors import BusyError, MigrationError
from dbreset.settings import Settings, resolve_settings
from dbstate import assert_same_state, dirty_everything, fresh_state, snapshot

SEEDED_SCHEMAS = ["public", "refData"]
SEEDED_FLAGS = ["--schema", "public", "--schema", "refData"]
EXAMPLE_SCHEMAS = ["public", "audit"]


def settings_for(url: str, ini: Path, **flags: Any) -> Settings:
    return resolve_settings(
        {"url": url, "alembic_config": str(ini), **flags}, env={}, cwd=ini.parent
    )


def databases(admin: psycopg.Connection, prefix: str) -> list[str]:
    rows = admin.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (prefix,)
    )
    return [name for (name,) in rows]


@pytest.fixture
def seeded(isolated: Path) -> Path:
    return copy_project("seeded", isolated)


@pytest.mark.parametrize("project", ["seeded", "example"])
def test_reset_leaves_what_a_fresh_migration_leaves(
    isolated: Path, make_db: Callable[..., str], project: str
) -> None:
    ini = copy_project(project, isolated)
    schemas = SEEDED_SCHEMAS if project == "seeded" else EXAMPLE_SCHEMAS
    expected = fresh_state(make_db, ini)
    url = make_db()
    settings = settings_for(url, ini, schemas=schemas)
    first = dbreset.reset(settings)
    assert first.pristine_built and first.migrate.upgraded
    assert_same_state(url, expected)

    dirtied = dirty_everything(url)
    assert dirtied.updated and dirtied.deleted and dirtied.inserted and not dirtied.skipped
    with pytest.raises(AssertionError):
        assert_same_state(url, expected)
    result = dbreset.reset(settings)
    assert not result.pristine_built and not result.migrate.upgraded
    assert result.truncate.restored, "the seeded tables that changed are put back"
    assert_same_state(url, expected)

    again = dbreset.reset(settings)
    assert again.truncate.restored == () and again.truncate.emptied == ()
    assert again.truncate.sequences_restarted == () and again.truncate.matviews_refreshed == ()
    assert_same_state(url, expected)


def test_seeded_facts_survive_a_reset(seeded: Path, make_db: Callable[..., str]) -> None:
    """The issue's examples: an identity seeded with 4 rows continues at 5, a
    standalone sequence a seeding migration used continues after it, and a row
    a later data migration changed comes back as that migration left it."""
    url = make_db()
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE role SET name = 'boss' WHERE id = 1")
        conn.execute("DELETE FROM role WHERE id = 3")
        conn.execute("INSERT INTO role (name) VALUES ('intern')")
        conn.execute("INSERT INTO ticket_kind (name) VALUES ('extra')")
        conn.execute("SELECT setval('spare_seq', 50)")
    result = dbreset.reset(settings)
    restored = {r.table: r.rows for r in result.truncate.restored}
    assert restored["public.role"] == 3 and "public.ticket_kind" in restored
    with psycopg.connect(url, autocommit=True) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM role ORDER BY id")]
        assert names == ["administrator", "editor", "viewer"]
        assert conn.execute("INSERT INTO role (name) VALUES ('x') RETURNING id").fetchone() == (5,)
        assert conn.execute("SELECT nextval('standalone_seq')").fetchone() == (120,)
        assert conn.execute("SELECT nextval('spare_seq')").fetchone() == (7,)


def test_a_reset_that_restores_nothing_says_so(seeded: Path, make_db: Callable[..., str]) -> None:
    url = make_db()
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO app_user (email, role_id) VALUES ('a@example.com', 1)")
    result = dbreset.reset(settings)
    assert [t.table for t in result.truncate.emptied] == ["public.app_user"]
    assert result.truncate.restored == ()
    assert result.truncate.baseline and "pristine" in result.truncate.baseline


def test_dry_run_and_json_name_the_restored_tables(
    seeded: Path, make_db: Callable[..., str]
) -> None:
    url = make_db()
    args = ["--url", url, "--config", str(seeded), "--schema", "public", "--schema", "refData"]
    runner = CliRunner()
    assert runner.invoke(app, ["reset", "--yes", *args]).exit_code == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE status SET label = 'gone' WHERE id = 1")
    before = snapshot(url)
    dry = runner.invoke(app, ["reset", "--dry-run", *args])
    assert dry.exit_code == 0 and "would restore" in dry.stdout and "public.status" in dry.stdout
    assert_same_state(url, before)  # nothing changed
    done = runner.invoke(app, ["reset", "--yes", "--json", *args])
    data = json.loads(done.stdout)
    assert data["schema"] == 1
    assert data["truncate"]["restored"] == [{"table": "public.status", "rows": 2}]
    assert scalar(url, "SELECT label FROM status WHERE id = 1") != "gone"


def test_materialized_view_over_seeded_rows(seeded: Path, make_db: Callable[..., str]) -> None:
    url = make_db()
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    expected = snapshot(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO role (name) VALUES ('auditor')")
        conn.execute("REFRESH MATERIALIZED VIEW role_summary")
        conn.execute("REFRESH MATERIALIZED VIEW user_overview")  # unpopulated after migrating
    result = dbreset.reset(settings)
    assert set(result.truncate.matviews_refreshed) == {
        "public.role_summary",
        "public.user_overview",
    }
    assert_same_state(url, expected)


def test_a_new_revision_rebuilds_the_pristine_database_once(
    seeded: Path, make_db: Callable[..., str], admin: psycopg.Connection
) -> None:
    url = make_db()
    dbname = dbname_of(url)
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    (old,) = databases(admin, f"{dbname}_pristine_")
    versions = seeded.parent / "migrations" / "versions"
    (versions / "0005_more_roles.py").write_text(
        '"""one more seeded role"""\n'
        "from alembic import op\n\n"
        'revision = "seeded_0005"\n'
        'down_revision = "seeded_0004"\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n"
        "    op.execute(\"INSERT INTO role (name) VALUES ('support')\")\n\n\n"
        "def downgrade() -> None:\n"
        "    op.execute(\"DELETE FROM role WHERE name = 'support'\")\n"
    )
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    rebuilt = dbreset.reset(settings)
    assert rebuilt.pristine_built and rebuilt.migrate.upgraded
    (new,) = databases(admin, f"{dbname}_pristine_")
    assert new != old and rebuilt.pristine == new
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM role WHERE name = 'support'")
    again = dbreset.reset(settings)
    assert not again.pristine_built
    assert scalar(url, "SELECT count(*) FROM role WHERE name = 'support'") == 1


def test_a_failed_build_leaves_nothing_and_is_never_used(
    isolated: Path, make_db: Callable[..., str], admin: psycopg.Connection
) -> None:
    ini = copy_project("broken", isolated)
    url = make_db()
    dbname = dbname_of(url)
    with pytest.raises(MigrationError, match="missing_table"):
        dbreset.reset(settings_for(url, ini))
    assert databases(admin, f"{dbname}_") == []
    # the target was not touched either: the pristine build failed first
    assert scalar(url, "SELECT to_regclass('alembic_version')") is None
    broken = ini.parent / "migrations" / "versions" / "0002_fails.py"
    broken.unlink()
    result = dbreset.reset(settings_for(url, ini))
    assert result.pristine_built and databases(admin, f"{dbname}_pristine_")


def test_two_resets_at_once_and_a_reset_during_a_session(
    seeded: Path, make_db: Callable[..., str], admin: psycopg.Connection
) -> None:
    url = make_db()
    dbname = dbname_of(url)
    results = two_resets_at_once(settings_for(url, seeded, schemas=SEEDED_SCHEMAS, wait=60))
    assert all(isinstance(r, operations.ResetResult) for r in results), results
    assert sum(r.pristine_built for r in results) == 1  # type: ignore[attr-defined]
    assert len(databases(admin, f"{dbname}_pristine_")) == 1

    held = session.reset_and_guard(settings_for(url, seeded, schemas=SEEDED_SCHEMAS, wait=0.2))
    try:
        with pytest.raises(BusyError, match="test session"):
            dbreset.reset(settings_for(url, seeded, schemas=SEEDED_SCHEMAS, wait=0.2))
    finally:
        held.guard.close()


def _role_without_createdb(admin: psycopg.Connection, url: str) -> tuple[str, str]:
    role = "dbreset_test_nocreatedb_" + dbname_of(url).rsplit("_", 1)[-1][:8]
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB").format(sql.Identifier(role)))
    dbname = dbname_of(url)
    admin.execute(
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(dbname), sql.Identifier(role)
        )
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(role)))
    return role, url.replace("postgres@", f"{role}@", 1)


def _drop_role(admin: psycopg.Connection, url: str, role: str) -> None:
    dbname = dbname_of(url)
    admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(dbname)))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_without_createdb_the_baseline_comes_from_migrating_the_target_from_empty(
    seeded: Path, make_db: Callable[..., str], admin: psycopg.Connection
) -> None:
    url = make_db()
    role, role_url = _role_without_createdb(admin, url)
    try:
        settings = settings_for(role_url, seeded, schemas=SEEDED_SCHEMAS)
        first = dbreset.reset(settings)
        assert first.pristine is None and first.warnings == ()
        assert first.truncate.baseline and "migrated it from empty" in first.truncate.baseline
        expected = snapshot(url)
        dirty_everything(url)
        second = dbreset.reset(settings)
        assert second.warnings == () and second.truncate.restored
        assert_same_state(url, expected)
    finally:
        _drop_role(admin, url, role)


def test_without_createdb_and_a_migrated_database_it_says_what_it_did(
    seeded: Path, make_db: Callable[..., str], admin: psycopg.Connection
) -> None:
    url = make_db()
    role, role_url = _role_without_createdb(admin, url)
    try:
        # migrated by someone else: dbreset cannot know which rows are seeded
        from dbstate import alembic_upgrade

        alembic_upgrade(role_url, seeded)
        result = CliRunner().invoke(
            app,
            ["reset", "--yes", "--url", role_url, "--config", str(seeded), *SEEDED_FLAGS],
        )
        assert result.exit_code == 0, result.stderr
        warning = " ".join(result.stderr.split())
        assert "cannot know which rows the migrations seed" in warning
        assert "grant CREATEDB" in warning and "emptied instead" in warning
        assert scalar(url, "SELECT count(*) FROM role") == 0  # what it did instead
    finally:
        _drop_role(admin, url, role)


def test_a_database_from_another_branch_is_recreated(
    seeded: Path, make_db: Callable[..., str]
) -> None:
    url = make_db()
    expected = fresh_state(make_db, seeded)
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'other_branch_0042'")
        conn.execute("CREATE TABLE from_the_other_branch (id int)")
    with pytest.raises(MigrationError, match="other_branch_0042.*another branch.*--recreate"):
        dbreset.reset(settings)
    status = dbreset.status(settings)
    assert status.unknown_revisions == ("other_branch_0042",)
    assert status.problem and "--recreate" in status.problem
    result = dbreset.reset(settings, recreate=True)
    assert result.recreated and result.pristine
    assert_same_state(url, expected)
    assert dbreset.reset(settings).truncate.emptied == ()


def test_the_example_project_needs_no_exclude_for_its_reference_rows(
    isolated: Path, make_db: Callable[..., str]
) -> None:
    from conftest import ROOT

    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.dbreset]", 1)[1].split("\n[", 1)[0]
    assert "exclude" not in section
    ini = copy_project("example", isolated)
    url = make_db()
    settings = settings_for(url, ini, schemas=EXAMPLE_SCHEMAS)
    dbreset.reset(settings)
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "examples" / "seed.py"), url], check=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM country_codes WHERE code = 'KE'")
    dbreset.reset(settings)
    assert scalar(url, "SELECT count(*) FROM country_codes") == 12
    assert scalar(url, 'SELECT count(*) FROM "order"') == 0


def test_the_pristine_database_is_a_template_nobody_connects_to(
    seeded: Path, make_db: Callable[..., str], admin: psycopg.Connection, server_url: str
) -> None:
    url = make_db()
    result = dbreset.reset(settings_for(url, seeded, schemas=SEEDED_SCHEMAS))
    assert result.pristine
    row = admin.execute(
        "SELECT datistemplate, datallowconn, shobj_description(oid, 'pg_database') "
        "FROM pg_database WHERE datname = %s",
        (result.pristine,),
    ).fetchone()
    assert row is not None and row[0] is True and row[1] is False
    assert row[2].startswith("dbreset: ") and '"kind": "pristine"' in row[2]
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        psycopg.connect(with_dbname(server_url, result.pristine)).close()


def test_a_lost_baseline_file_is_read_again_from_the_pristine_database(
    seeded: Path, make_db: Callable[..., str], isolated: Path
) -> None:
    url = make_db()
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    expected = snapshot(url)
    shutil.rmtree(isolated.parent / "cache" / "dbreset")
    dirty_everything(url)
    result = dbreset.reset(settings)
    assert not result.pristine_built and result.truncate.restored
    assert_same_state(url, expected)


def test_seeded_tables_found_unchanged_are_trusted_by_their_row_versions(
    seeded: Path, make_db: Callable[..., str], isolated: Path
) -> None:
    """A reset that finds a seeded table as the baseline has it remembers its
    file, row count and row versions; the next reset trusts those instead of
    reading every row again, and still sees any change."""
    url = make_db()
    settings = settings_for(url, seeded, schemas=SEEDED_SCHEMAS)
    dbreset.reset(settings)
    dbreset.reset(settings)
    versions = list((isolated.parent / "cache" / "dbreset").glob("versions-*.json"))
    assert len(versions) == 1
    recorded = json.loads(versions[0].read_text())["tables"]
    assert "public.role" in recorded and recorded["public.role"][1] == 3
    expected = snapshot(url)
    changes = [
        "UPDATE role SET name = 'boss' WHERE id = 1",
        'DELETE FROM "refData"."Currency" WHERE code = \'JPY\'',
        "INSERT INTO status (code, label) VALUES ('new', 'New')",
    ]
    for change in changes:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(change)
        result = dbreset.reset(settings)
        assert result.truncate.restored, change
        assert_same_state(url, expected)
        assert dbreset.reset(settings).truncate.restored == ()
    # the same row deleted and inserted again: new row versions, the same rows,
    # so the digest is read again and finds nothing to put back
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "WITH gone AS (DELETE FROM status WHERE id = 1 RETURNING *) "
            "INSERT INTO status SELECT * FROM gone"
        )
    assert dbreset.reset(settings).truncate.restored == ()
    assert_same_state(url, expected)
