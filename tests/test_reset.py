"""Library integration tests against a real PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import dbreset
from conftest import copy_project, dbname_of, two_resets_at_once, with_dbname
from dbreset import operations, session
from dbreset.errors import BusyError, ConnectError, MigrationError, SafetyError, TruncateError
from dbreset.settings import Settings, resolve_settings

HEAD = "0e0692925689"
EXAMPLE_SCHEMAS = ["public", "audit"]


def settings_for(url: str, ini: Path | None = None, **flags: Any) -> Settings:
    given: dict[str, Any] = {"url": url, **flags}
    if ini is not None:
        given["alembic_config"] = str(ini)
    return resolve_settings(given, env={}, cwd=Path.cwd())


def scalar(url: str, query: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def seed(url: str) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed.py"), url],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def example(isolated: Path, db_url: str) -> tuple[str, Path]:
    """A fresh database and a copy of the example project: migrated and seeded."""
    ini = copy_project("example", isolated)
    dbreset.migrate(settings_for(db_url, ini))
    seed(db_url)
    return db_url, ini


def total_rows(url: str, tables: list[str]) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


ALL_TABLES = [
    'public."UserProfile"',
    "public.address",
    'public."order"',
    'public."line item-x"',
    "public.invoice",
    "public.payment",
    "public.page_view",
    "audit.event",
    "audit.source_system",
]


def test_reset_empties_everything_and_restarts_sequences(example: tuple[str, Path]) -> None:
    url, ini = example
    assert sum(total_rows(url, ALL_TABLES).values()) > 0
    assert scalar(url, "SELECT count(*) FROM customer_order_totals") > 0
    result = dbreset.reset(settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"]))

    assert set(total_rows(url, ALL_TABLES).values()) == {0}
    # reference rows seeded by a migration are kept, and so is their sequence
    assert scalar(url, "SELECT count(*) FROM country_codes") == 12
    assert scalar(url, "SELECT last_value FROM country_regions_id_seq") == 4
    assert not any("country" in s for s in result.truncate.sequences_restarted)
    # every kind of sequence starts again: identity, serial, standalone DEFAULT nextval()
    with psycopg.connect(url) as conn:
        user = conn.execute(
            'INSERT INTO "UserProfile" ("displayName", email) VALUES (%s, %s) RETURNING id',
            ("a", "a@example.com"),
        ).fetchone()
        assert user == (1,)
        assert conn.execute("SELECT nextval('invoice_number_seq')").fetchone() == (1000,)
        assert conn.execute("SELECT nextval('audit.event_id_seq')").fetchone() == (1,)
        assert conn.execute("SELECT nextval('page_view_id_seq')").fetchone() == (1,)
        conn.rollback()
    # the version table is untouched, the materialized view shows no gone rows
    assert scalar(url, "SELECT version_num FROM alembic_version") == HEAD
    assert scalar(url, "SELECT count(*) FROM customer_order_totals") == 0
    assert result.migrate.after == (HEAD,) and not result.migrate.upgraded
    emptied = {t.table: t.rows for t in result.truncate.emptied}
    assert emptied["public.order"] == 4 and emptied["audit.event"] > 0
    assert "public.alembic_version (Alembic version table)" in result.truncate.excluded


def test_second_reset_finds_nothing_to_do(example: tuple[str, Path]) -> None:
    url, ini = example
    settings = settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"])
    dbreset.reset(settings)
    again = dbreset.reset(settings)
    assert again.truncate.emptied == () and again.truncate.sequences_restarted == ()
    assert again.truncate.matviews_refreshed == ()


def test_truncate_does_not_fire_row_triggers(example: tuple[str, Path]) -> None:
    url, ini = example
    settings = settings_for(url, ini, schemas=["public"], exclude=["country_*"])
    # audit.event references public."UserProfile", so audit must be chosen too
    with pytest.raises(TruncateError, match=r"audit\.event.*outside --schema"):
        dbreset.truncate(settings)
    before = scalar(url, "SELECT count(*) FROM audit.event")
    assert before > 0  # nothing was changed by the refusal
    dbreset.truncate(settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"]))
    # the order trigger writes to audit.event on DELETE; TRUNCATE must not fire it
    assert scalar(url, "SELECT count(*) FROM audit.event") == 0


def test_cascade_into_an_excluded_table_is_refused(example: tuple[str, Path]) -> None:
    url, ini = example
    before = total_rows(url, ALL_TABLES)
    settings = settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*", "invoice"])
    with pytest.raises(TruncateError) as info:
        dbreset.truncate(settings)
    assert info.value.exit_code == 7
    assert "public.invoice (--exclude 'invoice') references public.order" in str(info.value)
    assert total_rows(url, ALL_TABLES) == before


def test_failure_part_way_leaves_every_row(example: tuple[str, Path]) -> None:
    url, ini = example
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'payment may not be truncated'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER no_truncate BEFORE TRUNCATE ON payment "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse()"
        )
        seq_before = conn.execute('SELECT last_value FROM "UserProfile_id_seq"').fetchone()
    before = total_rows(url, ALL_TABLES)
    with pytest.raises(TruncateError, match="payment may not be truncated"):
        dbreset.reset(settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"]))
    assert total_rows(url, ALL_TABLES) == before
    assert scalar(url, 'SELECT last_value FROM "UserProfile_id_seq"') == seq_before[0]
    assert scalar(url, "SELECT count(*) FROM customer_order_totals") > 0


def test_awkward_names_and_relation_kinds(isolated: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Other Schema"')
        for name in [
            '"UserProfile"',
            '"order"',
            '"with space"',
            '"quo""te"',
            '"dash-x"',
            '"Other Schema"."Mixed Case"',
            '"select"',
        ]:
            conn.execute(f"CREATE TABLE {name} (id int GENERATED ALWAYS AS IDENTITY, v text)")
            conn.execute(f"INSERT INTO {name} (v) VALUES ('x'), ('y')")
        conn.execute('CREATE VIEW "a view" AS SELECT * FROM "order"')
        conn.execute('CREATE MATERIALIZED VIEW "a matview" AS SELECT * FROM "order"')
        conn.execute("CREATE MATERIALIZED VIEW never_populated AS SELECT 1 AS x WITH NO DATA")
        # a foreign table pointing at a table we must not touch
        conn.execute("CREATE SCHEMA remote")
        conn.execute("CREATE TABLE remote.src (v text)")
        conn.execute("INSERT INTO remote.src VALUES ('keep me')")
        conn.execute("CREATE EXTENSION postgres_fdw")
        info = conn.info
        host = info.host
        conn.execute(
            "CREATE SERVER loop FOREIGN DATA WRAPPER postgres_fdw "
            f"OPTIONS (host '{host}', port '{info.port}', dbname '{info.dbname}')"
        )
        conn.execute(
            f"CREATE USER MAPPING FOR CURRENT_USER SERVER loop OPTIONS (user '{info.user}')"
        )
        conn.execute(
            "CREATE FOREIGN TABLE public.far (v text) SERVER loop "
            "OPTIONS (schema_name 'remote', table_name 'src')"
        )
    other = psycopg.connect(db_url, autocommit=True)
    try:
        other.execute("CREATE TEMP TABLE mine (v text)")
        other.execute("INSERT INTO mine VALUES ('temp')")
        row = other.execute("SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()")
        temp_schema = row.fetchone()[0]  # type: ignore[index]
        result = dbreset.truncate(
            settings_for(db_url, schemas=["public", "Other Schema", temp_schema])
        )
        assert other.execute("SELECT count(*) FROM mine").fetchone() == (1,)
    finally:
        other.close()
    emptied = {t.table for t in result.emptied}
    assert emptied == {
        "public.UserProfile",
        "public.order",
        "public.with space",
        'public.quo"te',
        "public.dash-x",
        "Other Schema.Mixed Case",
        "public.select",
    }
    assert scalar(db_url, "SELECT count(*) FROM remote.src") == 1
    assert scalar(db_url, "SELECT count(*) FROM public.far") == 1
    assert scalar(db_url, 'SELECT count(*) FROM "a matview"') == 0
    assert scalar(db_url, 'SELECT count(*) FROM "a view"') == 0
    assert (
        scalar(db_url, "SELECT relispopulated FROM pg_class WHERE relname = 'never_populated'")
        is False
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute('INSERT INTO "quo""te" (v) VALUES (1) RETURNING id').fetchone() == (1,)


def test_partitions_follow_their_root(isolated: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id bigserial, at date NOT NULL) PARTITION BY RANGE (at)")
        conn.execute(
            "CREATE TABLE m_old PARTITION OF m FOR VALUES FROM ('2000-01-01') TO ('2020-01-01')"
        )
        conn.execute(
            "CREATE TABLE m_new PARTITION OF m FOR VALUES FROM ('2020-01-01') TO ('2100-01-01')"
        )
        conn.execute("INSERT INTO m (at) VALUES ('2010-01-01'), ('2030-01-01')")
    # an excluded partition is kept, the others are emptied
    kept = dbreset.truncate(settings_for(db_url, exclude=["m_old"]))
    assert "public.m_old (--exclude 'm_old')" in kept.excluded
    assert scalar(db_url, "SELECT count(*) FROM m_old") == 1
    assert scalar(db_url, "SELECT count(*) FROM m_new") == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO m (at) VALUES ('2030-01-01')")
    result = dbreset.truncate(settings_for(db_url))
    assert [t.table for t in result.emptied] == ["public.m"]
    assert scalar(db_url, "SELECT count(*) FROM m") == 0
    assert result.sequences_restarted == ("public.m_id_seq",)


def test_sequence_shared_with_a_kept_table_is_not_restarted(isolated: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE shared_seq")
        conn.execute("CREATE TABLE a (id bigint DEFAULT nextval('shared_seq'))")
        conn.execute("CREATE TABLE keep_b (id bigint DEFAULT nextval('shared_seq'))")
        conn.execute("INSERT INTO a DEFAULT VALUES; INSERT INTO keep_b DEFAULT VALUES")
    result = dbreset.truncate(settings_for(db_url, exclude=["keep_*"]))
    assert result.sequences_restarted == ()
    assert result.kept_sequences and "public.keep_b" in result.kept_sequences[0]
    assert scalar(db_url, "SELECT nextval('shared_seq')") == 3


def test_dry_run_changes_nothing(isolated: Path, db_url: str) -> None:
    ini = copy_project("example", isolated)
    result = dbreset.reset(settings_for(db_url, ini, schemas=EXAMPLE_SCHEMAS), dry_run=True)
    assert result.dry_run and len(result.migrate.pending) == 4
    assert result.migrate.pending[0].startswith("6516e0ad3b5d")
    assert scalar(db_url, "SELECT to_regclass('alembic_version')") is None
    dbreset.migrate(settings_for(db_url, ini))
    seed(db_url)
    before = total_rows(db_url, ALL_TABLES)
    planned = dbreset.reset(settings_for(db_url, ini, schemas=EXAMPLE_SCHEMAS), dry_run=True)
    assert {t.table for t in planned.truncate.emptied} >= {"public.order", "audit.event"}
    assert total_rows(db_url, ALL_TABLES) == before


def test_migrate_branches_to_all_heads(isolated: Path, db_url: str) -> None:
    ini = copy_project("branches", isolated)
    result = dbreset.migrate(settings_for(db_url, ini))
    assert result.after == ("branches_left", "branches_right") and result.upgraded


def test_async_template_with_asyncpg_url(isolated: Path, db_url: str) -> None:
    ini = copy_project("async", isolated)
    async_url = db_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    result = dbreset.reset(settings_for(async_url, ini))
    assert result.migrate.after == ("async_0002",)
    assert scalar(db_url, "SELECT to_regclass('gadget')") is not None


def test_async_template_inside_a_running_event_loop(isolated: Path, db_url: str) -> None:
    import asyncio

    ini = copy_project("async", isolated)
    async_url = db_url.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def main() -> operations.ResetResult:
        return dbreset.reset(settings_for(async_url, ini))

    assert asyncio.run(main()).migrate.after == ("async_0002",)


def test_custom_version_table_is_found_and_kept(isolated: Path, db_url: str) -> None:
    ini = copy_project("custom_version_table", isolated)
    settings = settings_for(db_url, ini, schemas=["public", "meta"])
    first = dbreset.reset(settings)
    assert first.migrate.version_table == "meta.schema_history"
    assert "meta.schema_history (Alembic version table)" in first.truncate.excluded
    assert scalar(db_url, "SELECT version_num FROM meta.schema_history") == "cvt_0002"
    second = dbreset.reset(settings)
    assert not second.migrate.upgraded and second.migrate.after == ("cvt_0002",)


def test_broken_migration_is_a_migration_error(isolated: Path, db_url: str) -> None:
    ini = copy_project("broken", isolated)
    with pytest.raises(MigrationError, match='relation "missing_table" does not exist') as info:
        dbreset.reset(settings_for(db_url, ini))
    assert info.value.exit_code == 5


def test_password_with_special_characters_reaches_alembic(
    isolated: Path, make_db: Callable[..., str], admin: psycopg.Connection
) -> None:
    url = make_db()
    # the role's password is irrelevant under trust authentication, but the URL
    # must survive Alembic's '%' interpolation and libpq's decoding unchanged
    special = url.replace("postgres@", "postgres:p%25s%40s%3Aw@", 1).replace(
        "postgres@", "postgres:p%25s%40s%3Aw@"
    )
    assert "p%25s%40s%3Aw" in special
    ini = copy_project("example", isolated)
    result = dbreset.migrate(settings_for(special, ini))
    assert result.after == (HEAD,)


def test_user_logging_survives_env_fileconfig(isolated: Path, db_url: str) -> None:
    ini = copy_project("example", isolated)
    mine = logging.getLogger("myapp.tests")
    handler = logging.NullHandler()
    mine.addHandler(handler)
    mine.setLevel(logging.DEBUG)
    root_handlers = list(logging.getLogger().handlers)
    try:
        dbreset.migrate(settings_for(db_url, ini))
        assert not mine.disabled
        assert handler in mine.handlers and mine.level == logging.DEBUG
        assert logging.getLogger().handlers == root_handlers
    finally:
        mine.removeHandler(handler)


def test_env_py_is_pointed_at_the_target_not_database_url(
    isolated: Path, make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target, bystander = make_db(), make_db()
    monkeypatch.setenv("DATABASE_URL", bystander)
    ini = copy_project("example", isolated)
    dbreset.migrate(resolve_settings({"url": target, "alembic_config": str(ini)}, cwd=isolated))
    assert scalar(target, "SELECT version_num FROM alembic_version") == HEAD
    assert scalar(bystander, "SELECT to_regclass('alembic_version')") is None


def test_concurrent_resets_both_succeed(isolated: Path, db_url: str) -> None:
    ini = copy_project("example", isolated)
    # Alembic's module-level proxies are not thread-safe: the advisory lock is
    # what makes the second wait; use processes for real parallelism in test_cli.
    results = two_resets_at_once(settings_for(db_url, ini, schemas=EXAMPLE_SCHEMAS, wait=60))
    assert all(isinstance(r, operations.ResetResult) for r in results), results
    assert sum(r.migrate.upgraded for r in results) == 1  # type: ignore[attr-defined]


def test_idle_in_transaction_blocker_is_named(example: tuple[str, Path]) -> None:
    url, ini = example
    blocker = psycopg.connect(url, application_name="leaky test")
    try:
        blocker.execute('SELECT count(*) FROM "order"')  # opens a transaction, stays idle
        pid = blocker.info.backend_pid
        with pytest.raises(BusyError) as info:
            dbreset.truncate(
                settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"], wait=0.5)
            )
    finally:
        blocker.close()
    message = str(info.value)
    assert f"pid {pid}" in message and "leaky test" in message
    assert "idle in transaction" in message and "since" in message
    assert info.value.exit_code == 6


def test_a_second_reset_waits_for_the_lock_holder_or_names_it(example: tuple[str, Path]) -> None:
    url, ini = example
    settings = settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"], wait=0.3)
    guard = session.reset_and_guard(settings).guard
    try:
        with pytest.raises(BusyError, match="a test session: pid .*dbreset pytest session"):
            dbreset.reset(settings)
    finally:
        guard.close()
    dbreset.reset(settings)


def test_missing_database_and_create(isolated: Path, make_db: Callable[..., str]) -> None:
    url = make_db(create=False)
    ini = copy_project("example", isolated)
    with pytest.raises(ConnectError, match="does not exist.*--create") as info:
        dbreset.reset(settings_for(url, ini, schemas=EXAMPLE_SCHEMAS))
    assert info.value.exit_code == 4
    result = dbreset.reset(settings_for(url, ini, schemas=EXAMPLE_SCHEMAS), create=True)
    assert result.created and result.migrate.after == (HEAD,)
    again = dbreset.reset(settings_for(url, ini, schemas=EXAMPLE_SCHEMAS), create=True)
    assert not again.created


def test_unknown_role_is_a_connect_error(isolated: Path, server_url: str) -> None:
    url = with_dbname(server_url, "postgres").replace("postgres@", "nobody_here@", 1)
    with pytest.raises(ConnectError):
        dbreset.truncate(settings_for(url))


def test_permission_denied_is_exit_7(
    isolated: Path, db_url: str, admin: psycopg.Connection
) -> None:
    role = "dbreset_test_reader_" + dbname_of(db_url).rsplit("_", 1)[-1][:8]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE owned (id serial, v text)")
        conn.execute("INSERT INTO owned (v) VALUES ('x')")
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT SELECT ON owned TO "{role}"')
    try:
        url = db_url.replace("postgres@", f"{role}@", 1)
        with pytest.raises(TruncateError, match="permission denied|cannot restart") as info:
            dbreset.truncate(settings_for(url))
        assert info.value.exit_code == 7
        assert scalar(db_url, "SELECT count(*) FROM owned") == 1
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_non_owner_with_privileges_restarts_sequences(
    isolated: Path, db_url: str, admin: psycopg.Connection
) -> None:
    role = "dbreset_test_writer_" + dbname_of(db_url).rsplit("_", 1)[-1][:8]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE owned (id serial, v text)")
        conn.execute("INSERT INTO owned (v) VALUES ('x'), ('y')")
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT SELECT, INSERT, TRUNCATE ON owned TO "{role}"')
        conn.execute(f'GRANT SELECT, UPDATE, USAGE ON SEQUENCE owned_id_seq TO "{role}"')
    try:
        url = db_url.replace("postgres@", f"{role}@", 1)
        result = dbreset.truncate(settings_for(url))
        assert result.sequences_restarted == ("public.owned_id_seq",)
        assert scalar(url, "INSERT INTO owned (v) VALUES ('z') RETURNING id") == 1
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_remote_target_is_refused_before_connecting(isolated: Path) -> None:
    with pytest.raises(SafetyError) as info:
        dbreset.reset(settings_for("postgresql://u:hunter2@db.example.com/app"))
    assert info.value.exit_code == 3 and "hunter2" not in str(info.value)


def test_status_reports_rows_revision_and_holders(example: tuple[str, Path]) -> None:
    url, ini = example
    settings = settings_for(url, ini, schemas=EXAMPLE_SCHEMAS, exclude=["country_*"])
    st = dbreset.status(settings)
    assert st.at_head and st.current == (HEAD,)
    assert {t.table for t in st.nonempty} >= {"public.order", "audit.event"}
    assert st.settings["schemas"] == operations.Setting(["public", "audit"], "--schema")
    assert st.holders == ()
    guard = session.reset_and_guard(settings).guard
    try:
        held = dbreset.status(settings)
        assert held.nonempty == ()
        assert len(held.holders) == 1 and "test session" in held.holders[0]
    finally:
        guard.close()


def _how(result: operations.TruncateResult) -> dict[str, str]:
    return {t.table: t.how for t in result.emptied}


def test_few_rows_without_triggers_are_deleted_children_first(isolated: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE parent (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE child (id serial PRIMARY KEY, "
            "parent_id int NOT NULL REFERENCES parent ON DELETE RESTRICT)"
        )
        conn.execute(
            "CREATE TABLE grandchild (id bigserial, child_id int REFERENCES child, "
            "parent_id int REFERENCES parent)"
        )
        conn.execute("CREATE TABLE empty_ref (parent_id int REFERENCES parent)")
        conn.execute("INSERT INTO parent DEFAULT VALUES; INSERT INTO parent DEFAULT VALUES")
        conn.execute("INSERT INTO child (parent_id) VALUES (1), (2)")
        conn.execute("INSERT INTO grandchild (child_id, parent_id) VALUES (1, 1), (2, 2)")
        before = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 'empty_ref'")
        empty_ref_node = before.fetchone()
    result = dbreset.truncate(settings_for(db_url))
    assert _how(result) == {
        "public.parent": "delete",
        "public.child": "delete",
        "public.grandchild": "delete",
    }
    assert result.also_truncated == 0
    assert set(result.sequences_restarted) == {
        "public.parent_id_seq",
        "public.child_id_seq",
        "public.grandchild_id_seq",
    }
    for table in ("parent", "child", "grandchild"):
        assert scalar(db_url, f"SELECT count(*) FROM {table}") == 0
    # an empty table that references a dirty one was not rebuilt for nothing
    assert (
        scalar(db_url, "SELECT relfilenode FROM pg_class WHERE relname = 'empty_ref'")
        == (
            empty_ref_node[0]  # type: ignore[index]
        )
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("INSERT INTO parent DEFAULT VALUES RETURNING id").fetchone() == (1,)
    # dead rows left by DELETE are no rows: the next run finds nothing to do
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM parent")
        conn.execute("SELECT setval('parent_id_seq', 1, false)")
    again = dbreset.truncate(settings_for(db_url))
    assert again.emptied == () and again.sequences_restarted == ()


def test_cycles_triggers_rules_and_many_rows_are_truncated(isolated: Path, db_url: str) -> None:
    from dbreset.postgres import DELETE_MAX_PAGES

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY, b_id int)")
        conn.execute("CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a)")
        conn.execute("ALTER TABLE a ADD FOREIGN KEY (b_id) REFERENCES b")
        conn.execute("INSERT INTO a VALUES (1, NULL); INSERT INTO b VALUES (1, 1)")
        conn.execute("UPDATE a SET b_id = 1")
        conn.execute("CREATE TABLE logged (v int)")
        conn.execute("CREATE TABLE audit_log (v int)")
        conn.execute(
            "CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO audit_log VALUES (OLD.v); RETURN OLD; END $$"
        )
        conn.execute(
            "CREATE TRIGGER log_delete AFTER DELETE ON logged "
            "FOR EACH ROW EXECUTE FUNCTION log_it()"
        )
        conn.execute("CREATE TABLE ruled (v int)")
        conn.execute("CREATE RULE keep AS ON DELETE TO ruled DO INSTEAD NOTHING")
        conn.execute("CREATE TABLE big (v int)")
        # one page more than DELETE would take: about 226 such rows fit in a page
        big_rows = 226 * (DELETE_MAX_PAGES + 1)
        conn.execute(f"INSERT INTO big SELECT generate_series(1, {big_rows})")
        assert (
            conn.execute("SELECT pg_relation_size('big') / 8192").fetchone()[0]  # type: ignore[index]
            > DELETE_MAX_PAGES
        )
        conn.execute(
            "CREATE TABLE tree (id int PRIMARY KEY, up int REFERENCES tree ON DELETE RESTRICT)"
        )
        conn.execute("INSERT INTO tree VALUES (1, NULL), (2, 1)")
        conn.execute("INSERT INTO logged VALUES (7); INSERT INTO ruled VALUES (8)")
    result = dbreset.truncate(settings_for(db_url, exclude=["audit_log"]))
    how = _how(result)
    assert how == {
        "public.a": "truncate",
        "public.b": "truncate",
        "public.logged": "truncate",
        "public.ruled": "truncate",
        "public.big": "truncate",
        "public.tree": "truncate",
    }
    assert dict((t.table, t.rows) for t in result.emptied)["public.big"] == big_rows
    for table in ("a", "b", "logged", "ruled", "big", "tree"):
        assert scalar(db_url, f"SELECT count(*) FROM {table}") == 0
    assert scalar(db_url, "SELECT count(*) FROM audit_log") == 0  # no DELETE trigger fired


def test_rows_hidden_by_row_security_are_still_emptied(
    isolated: Path, db_url: str, admin: psycopg.Connection
) -> None:
    role = "dbreset_test_owner_" + dbname_of(db_url).rsplit("_", 1)[-1][:8]
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
        owner_url = db_url.replace("postgres@", f"{role}@", 1)
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE secret (id serial, v text)")
            conn.execute("INSERT INTO secret (v) VALUES ('hidden'), ('hidden too')")
            conn.execute("ALTER TABLE secret ENABLE ROW LEVEL SECURITY")
            conn.execute("ALTER TABLE secret FORCE ROW LEVEL SECURITY")
            conn.execute("CREATE POLICY nothing ON secret USING (false)")
            assert conn.execute("SELECT count(*) FROM secret").fetchone() == (0,)
        result = dbreset.truncate(settings_for(owner_url))
        assert _how(result) == {"public.secret": "truncate"}
        assert scalar(db_url, "SELECT count(*) FROM secret") == 0  # as superuser: all rows
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_sequence_set_elsewhere_without_being_called_is_restarted(
    isolated: Path, db_url: str
) -> None:
    """is_called = false is not 'at the start': setval(seq, 50, false) must be undone.
    PostgreSQL 18 reads every sequence's state in one query and names it; before 18
    only reading each sequence would tell, so every sequence never called is set to
    its start unread, in the same transaction, after everything else."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE moved START 10")
        conn.execute("CREATE TABLE t (id bigint DEFAULT nextval('moved'), n serial)")
        conn.execute("SELECT setval('moved', 50, false)")
        pg18 = conn.info.server_version >= 180000
    result = dbreset.truncate(settings_for(db_url))
    if pg18:
        assert result.sequences_restarted == ("public.moved",)
        assert result.sequences_put_back == 0
    else:
        assert result.sequences_restarted == ()
        assert result.sequences_put_back == 2  # moved and t_n_seq, neither called
    assert scalar(db_url, "SELECT nextval('moved')") == 10
    again = dbreset.truncate(settings_for(db_url))
    assert again.sequences_restarted == ("public.moved",)  # nextval above moved it on
    assert scalar(db_url, "SELECT nextval('moved')") == 10
    assert scalar(db_url, "SELECT nextval('moved')") == 11
    dbreset.truncate(settings_for(db_url))
    assert dbreset.truncate(settings_for(db_url)).sequences_restarted == ()
    # a dry run reads every sequence, on any version: it names the moved one
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT setval('moved', 50, false)")
    dry = dbreset.truncate(settings_for(db_url), dry_run=True)
    assert dry.sequences_restarted == ("public.moved",)
    assert scalar(db_url, "SELECT last_value FROM moved") == 50


def test_delete_path_as_a_plain_owner_keeps_foreign_key_checks(
    isolated: Path, db_url: str, admin: psycopg.Connection
) -> None:
    """A superuser deletes in replica mode; anyone else with foreign-key checks on,
    children first: both must end empty."""
    role = "dbreset_test_plain_" + dbname_of(db_url).rsplit("_", 1)[-1][:8]
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
        url = db_url.replace("postgres@", f"{role}@", 1)
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone() == (False,)
            conn.execute("CREATE TABLE p (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY)")
            conn.execute("CREATE TABLE c (id serial, p_id int REFERENCES p ON DELETE RESTRICT)")
            conn.execute("CREATE TABLE gc (c_p int REFERENCES p, other int)")
            conn.execute("INSERT INTO p DEFAULT VALUES; INSERT INTO p DEFAULT VALUES")
            conn.execute("INSERT INTO c (p_id) VALUES (1), (2); INSERT INTO gc VALUES (1, 1)")
        result = dbreset.truncate(settings_for(url))
        assert _how(result) == {"public.p": "delete", "public.c": "delete", "public.gc": "delete"}
        for table in ("p", "c", "gc"):
            assert scalar(db_url, f"SELECT count(*) FROM {table}") == 0
        assert scalar(url, "INSERT INTO p DEFAULT VALUES RETURNING id") == 1
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_matviews_follow_what_the_deletes_found(isolated: Path, db_url: str) -> None:
    """A small table is deleted from without counting it first, so only its DELETE
    tells whether it had rows: then every populated matview is refreshed; a table
    with dead rows only (pages left by an earlier DELETE) refreshes only the matviews
    that are not empty."""

    def filenode(name: str) -> int:
        return int(scalar(db_url, f"SELECT relfilenode FROM pg_class WHERE relname = '{name}'"))

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE item (id serial PRIMARY KEY, name text)")
        conn.execute("CREATE MATERIALIZED VIEW item_names AS SELECT name FROM item")
        conn.execute("CREATE MATERIALIZED VIEW always_one AS SELECT 1 AS one")
        conn.execute("INSERT INTO item (name) VALUES ('a'), ('b')")
        conn.execute("REFRESH MATERIALIZED VIEW item_names")
    assert scalar(db_url, "SELECT count(*) FROM item_names") == 2
    result = dbreset.truncate(settings_for(db_url))
    assert _how(result) == {"public.item": "delete"}
    assert [(t.table, t.rows) for t in result.emptied] == [("public.item", 2)]
    assert set(result.matviews_refreshed) == {"public.item_names", "public.always_one"}
    assert scalar(db_url, "SELECT count(*) FROM item_names") == 0
    assert scalar(db_url, "SELECT pg_relation_size('item')") > 0  # dead rows, until VACUUM

    item_names = filenode("item_names")
    again = dbreset.truncate(settings_for(db_url))
    assert again.emptied == ()
    assert again.matviews_refreshed == ("public.always_one",)  # not empty: maybe stale
    assert filenode("item_names") == item_names  # empty: left alone

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO item (name) VALUES ('c')")
    third = dbreset.truncate(settings_for(db_url))
    assert [(t.table, t.rows, t.how) for t in third.emptied] == [("public.item", 1, "delete")]
    assert set(third.matviews_refreshed) == {"public.item_names", "public.always_one"}
    assert third.sequences_restarted == ("public.item_id_seq",)
    assert scalar(db_url, "INSERT INTO item (name) VALUES ('d') RETURNING id") == 1
