"""The state helper (tests/dbstate.py) and the seeded project, on a real server.

Every comparison that should fail is checked to fail, naming exactly the
relations that changed; every comparison that should pass is checked on
databases that hold rows, so "equal" is never "both empty".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conftest import copy_project, with_dbname
from dbstate import (
    DbState,
    alembic_upgrade,
    assert_same_state,
    dirty_everything,
    fresh_database,
    fresh_state,
    snapshot,
    unique_database_name,
)

SEEDED_HEAD = "seeded_0004"
EXAMPLE_HEAD = "0e0692925689"

# Every relation of the seeded project that stores rows, and every sequence.
SEEDED_TABLES = {
    "public.activity_before_2025",
    "public.activity_since_2025",
    "public.alembic_version",
    "public.app_user",
    "public.cache_entry",
    "public.note",
    "public.permission",
    "public.price_tier",
    "public.role",
    "public.role_permission",
    "public.status",
    "public.ticket_kind",
    '"refData"."Currency"',
    '"refData"."Rate Quote"',
}
SEEDED_SEQUENCES = {
    "public.activity_id_seq",
    "public.app_user_id_seq",
    "public.note_id_seq",
    "public.permission_id_seq",
    "public.price_tier_id_seq",
    "public.report_number_seq",
    "public.role_id_seq",
    "public.spare_seq",
    "public.standalone_seq",
    "public.status_id_seq",
    '"refData"."Rate Quote_id_seq"',
}


def execute(url: str, statements: str | sql.Composed) -> None:
    """Run statements (several, without parameters) in autocommit mode."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


def create_database(admin: psycopg.Connection, name: str, template: str | None = None) -> None:
    stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    admin.execute(stmt)


def drop_database(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def seeded_ini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project("seeded", tmp_path_factory.mktemp("seeded"))


@pytest.fixture(scope="module")
def seeded_template(server_url: str, admin: psycopg.Connection, seeded_ini: Path) -> Iterator[str]:
    """The name of a database migrated fresh from the seeded project, once per module.

    Never connected to after it is migrated and read, so it can be cloned."""
    name = unique_database_name()
    create_database(admin, name)
    try:
        alembic_upgrade(with_dbname(server_url, name), seeded_ini)
        yield name
    finally:
        drop_database(admin, name)


@pytest.fixture(scope="module")
def seeded_expected(server_url: str, seeded_template: str) -> DbState:
    return snapshot(with_dbname(server_url, seeded_template))


@pytest.fixture
def seeded_db(
    server_url: str, admin: psycopg.Connection, seeded_template: str, seeded_expected: DbState
) -> Iterator[str]:
    """A clone of the freshly migrated seeded database (~0.2 s instead of ~0.6 s for
    a migration), checked equal to the expected state before the test changes it."""
    name = unique_database_name()
    create_database(admin, name, template=seeded_template)
    try:
        url = with_dbname(server_url, name)
        assert_same_state(url, seeded_expected)
        yield url
    finally:
        drop_database(admin, name)


# --------------------------------------------------------------------------- the seeded project


def test_seeded_project_leaves_these_facts(seeded_expected: DbState) -> None:
    """What a reset test may rely on: a fresh migration of tests/projects/seeded."""
    state = seeded_expected
    assert set(state.rows) == SEEDED_TABLES | {"public.role_summary"}
    assert set(state.sequences) == SEEDED_SEQUENCES
    assert state.rows["public.alembic_version"] == (f"({SEEDED_HEAD})",)

    assert state.rows["public.role"] == ("(1,administrator)", "(2,editor)", "(3,viewer)")
    assert state.rows["public.permission"] == (
        '(1,read,"Read anything")',
        "(100,superuser,)",
        '(2,write,"Create and change")',
        '(3,delete,"Remove anything")',
        '(4,export,"Download data")',
    )
    assert state.row_count("public.role_permission") == 7
    assert state.rows["public.status"] == ("(1,active,Active)", "(2,suspended,Suspended)")
    assert state.rows["public.ticket_kind"] == (
        "(100,bug)",
        "(105,feature)",
        "(110,question)",
        "(115,incident)",
    )
    assert "(JPY,Yen,0,3)" in state.rows['"refData"."Currency"']
    assert "(2,plus,EUR,1000,8000,7000)" in state.rows["public.price_tier"]
    for table in (
        "public.app_user",
        "public.note",
        "public.cache_entry",
        "public.activity_before_2025",
        "public.activity_since_2025",
        '"refData"."Rate Quote"',
    ):
        assert state.rows[table] == (), table

    assert state.populated("public.role_summary")
    assert state.rows["public.role_summary"] == (
        '(1,administrator,4,"delete,read,superuser,write")',
        '(2,editor,2,"read,write")',
        "(3,viewer,1,read)",
    )
    assert not state.populated("public.user_overview")
    assert "public.user_overview" not in state.rows

    nextval = {name: seq.next_value for name, seq in state.sequences.items()}
    assert nextval == {
        "public.role_id_seq": 5,  # 4 seeded, 'guest' (4) deleted: not 4
        "public.permission_id_seq": 5,  # 1-4 from the sequence; 100 explicit
        "public.status_id_seq": 4,  # 'archived' (3) deleted
        "public.price_tier_id_seq": 4,
        "public.standalone_seq": 120,  # owned by nobody, called by the seeds
        "public.report_number_seq": 501,  # used by nobody, setval(500)
        "public.spare_seq": 7,  # never called: START 7
        "public.app_user_id_seq": 1,
        "public.note_id_seq": 1,
        "public.activity_id_seq": 1,
        '"refData"."Rate Quote_id_seq"': 1,
    }
    never_called = {n for n, s in state.sequences.items() if not s.is_called}
    assert never_called == {
        "public.spare_seq",
        "public.app_user_id_seq",
        "public.note_id_seq",
        "public.activity_id_seq",
        '"refData"."Rate Quote_id_seq"',
    }
    assert state.sequences["public.standalone_seq"].increment == 5
    assert state.relations["public.standalone_seq"].owned_by is None
    assert state.relations["public.role_id_seq"].owned_by == "public.role.id"
    assert state.relations["public.cache_entry"].kind == "unlogged table"
    assert state.relations["public.activity"].kind == "partitioned table"
    assert state.relations["public.activity_since_2025"].parent == "public.activity"


def test_two_fresh_migrations_compare_equal(
    make_db: Callable[..., str], seeded_ini: Path, seeded_expected: DbState
) -> None:
    url = fresh_database(make_db, seeded_ini)
    again = snapshot(url)
    assert not again.diff(seeded_expected)
    assert again == seeded_expected
    assert_same_state(url, seeded_expected)
    assert_same_state(seeded_expected, url)


# --------------------------------------------------------------------------- every change is seen

CHANGES = {
    "insert into an application table": (
        "INSERT INTO app_user (email, role_id) VALUES ('ann@example.org', 2)",
        {"public.app_user": "rows", "public.app_user_id_seq": "sequence"},
        "+ (1,ann@example.org,2,,",
    ),
    "update a seeded row": (
        "UPDATE role SET name = 'editors' WHERE id = 2",
        {"public.role": "rows"},
        "- (2,editor)\n      + (2,editors)",
    ),
    "delete a seeded row": (
        "DELETE FROM status WHERE code = 'suspended'",
        {"public.status": "rows"},
        "- (2,suspended,Suspended)",
    ),
    "delete a seeded row, cascading": (
        "DELETE FROM role WHERE name = 'viewer'",
        {"public.role": "rows", "public.role_permission": "rows"},
        "- (3,1)",
    ),
    "add a seeded row": (
        "INSERT INTO ticket_kind (name) VALUES ('chore')",
        {"public.ticket_kind": "rows", "public.standalone_seq": "sequence"},
        "+ (120,chore)",
    ),
    "change a seeded row's generated column": (
        "UPDATE price_tier SET min_cents = 100 WHERE name = 'basic'",
        {"public.price_tier": "rows"},
        "+ (1,basic,EUR,100,1000,900)",
    ),
    "change a seeded row in the mixed-case schema": (
        """UPDATE "refData"."Currency" SET "decimal places" = 3 WHERE code = 'GBP'""",
        {'"refData"."Currency"': "rows"},
        '+ (GBP,"Pound Sterling",3,4)',
    ),
    "insert into a table with a space in its name": (
        """INSERT INTO "refData"."Rate Quote" (currency_code, rate, quoted_at)
           VALUES ('EUR', 1.1, '2025-06-01 12:00+02')""",
        {'"refData"."Rate Quote"': "rows", '"refData"."Rate Quote_id_seq"': "sequence"},
        '+ (1,EUR,1.100000,"2025-06-01 10:00:00+00")',
    ),
    "insert into a partitioned table: the partition is named": (
        "INSERT INTO activity (kind, happened_at) VALUES ('login', '2024-06-01')",
        {"public.activity_before_2025": "rows", "public.activity_id_seq": "sequence"},
        "+ (1,,login,",
    ),
    "insert into an unlogged table": (
        """INSERT INTO cache_entry (key, value) VALUES ('k', '{"a": 1}')""",
        {"public.cache_entry": "rows"},
        '+ (k,"{""a"": 1}",)',
    ),
    "nextval on a sequence owned by nobody": (
        "SELECT nextval('standalone_seq')",
        {"public.standalone_seq": "sequence"},
        "last_value=120 is_called=true, expected last_value=115 is_called=true",
    ),
    "nextval on an untouched identity": (
        "SELECT nextval('note_id_seq')",
        {"public.note_id_seq": "sequence"},
        "last_value=1 is_called=true, expected last_value=1 is_called=false",
    ),
    "setval(.., false) on an untouched sequence": (
        "SELECT setval('spare_seq', 42, false)",
        {"public.spare_seq": "sequence"},
        "actual:   last_value=42 is_called=false (nextval gives 42)\n"
        "      expected: last_value=7 is_called=false (nextval gives 7)",
    ),
    "setval to the same value, not called": (
        "SELECT setval('role_id_seq', 4, false)",
        {"public.role_id_seq": "sequence"},
        "last_value=4 is_called=false, expected last_value=4 is_called=true",
    ),
    "refresh the materialized view after changing a seeded row": (
        "UPDATE permission SET code = 'read-only' WHERE id = 1;"
        " REFRESH MATERIALIZED VIEW role_summary",
        {"public.permission": "rows", "public.role_summary": "rows"},
        "+ (3,viewer,1,read-only)",
    ),
    "populate the materialized view left WITH NO DATA": (
        "REFRESH MATERIALIZED VIEW user_overview",
        {"public.user_overview": "populated"},
        "populated=true, expected populated=false",
    ),
    "unpopulate a populated materialized view": (
        "REFRESH MATERIALIZED VIEW role_summary WITH NO DATA",
        {"public.role_summary": "populated"},
        "populated=false, expected populated=true",
    ),
    "change the Alembic version table": (
        "UPDATE alembic_version SET version_num = 'seeded_0003'",
        {"public.alembic_version": "rows"},
        f"- ({SEEDED_HEAD})",
    ),
    "add a column": (
        "ALTER TABLE app_user ADD COLUMN nickname text",
        {"public.app_user": "shape"},
        "+ column nickname text",
    ),
    "drop a foreign key": (
        "ALTER TABLE note DROP CONSTRAINT note_app_user_id_fkey",
        {"public.note": "shape"},
        "- constraint note_app_user_id_fkey: FOREIGN KEY (app_user_id) REFERENCES public.app_user",
    ),
    "add an index": (
        "CREATE INDEX note_body_idx ON note (body)",
        {"public.note": "shape"},
        "+ index CREATE INDEX note_body_idx ON public.note USING btree (body)",
    ),
    "change a sequence's increment": (
        "ALTER SEQUENCE spare_seq INCREMENT BY 4",
        {"public.spare_seq": "sequence"},
        "increment: 4, expected 3",
    ),
    "an extra table": (
        'CREATE TABLE "refData"."New Thing" (id int)',
        {'"refData"."New Thing"': "unexpected"},
        '"refData"."New Thing" (table): present but not expected',
    ),
    "a missing materialized view": (
        "DROP MATERIALIZED VIEW user_overview",
        {"public.user_overview": "missing"},
        "public.user_overview (materialized view): expected but missing",
    ),
}


@pytest.mark.parametrize(
    ("statements", "differing", "shown"), list(CHANGES.values()), ids=list(CHANGES)
)
def test_a_change_is_reported_naming_the_relation(
    seeded_db: str,
    seeded_expected: DbState,
    statements: str,
    differing: dict[str, str],
    shown: str,
) -> None:
    execute(seeded_db, statements)
    diff = snapshot(seeded_db).diff(seeded_expected)
    assert diff.relations == set(differing), str(diff)
    for relation, aspect in differing.items():
        assert diff.aspects(relation) == {aspect}, str(diff)
    report = str(diff)
    assert shown in report
    with pytest.raises(AssertionError) as failed:
        assert_same_state(seeded_db, seeded_expected)
    assert str(failed.value) == report
    for relation in differing:
        assert f"  {relation} (" in report


def test_a_truncating_reset_is_not_a_reset(seeded_db: str, seeded_expected: DbState) -> None:
    """What dbreset reset did before: empty every table, restart owned sequences."""
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        tables = [
            sql.Identifier(s, t)
            for s, t in conn.execute(
                "SELECT schemaname, tablename FROM pg_tables"
                " WHERE schemaname IN ('public', 'refData') AND tablename <> 'alembic_version'"
            )
        ]
        conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(tables)))
        conn.execute("REFRESH MATERIALIZED VIEW role_summary")
    diff = snapshot(seeded_db).diff(seeded_expected)
    assert diff.relations == {
        "public.permission",
        "public.permission_id_seq",
        "public.price_tier",
        "public.price_tier_id_seq",
        "public.role",
        "public.role_id_seq",
        "public.role_permission",
        "public.role_summary",
        "public.status",
        "public.status_id_seq",
        "public.ticket_kind",
        '"refData"."Currency"',
    }, str(diff)
    # Owned by nobody: RESTART IDENTITY leaves them where the migration did.
    assert "public.standalone_seq" not in diff.relations
    assert "public.report_number_seq" not in diff.relations


def test_ignore_leaves_out_only_the_matching_relations(
    seeded_db: str, seeded_expected: DbState
) -> None:
    execute(
        seeded_db,
        "INSERT INTO app_user (email, role_id) VALUES ('ann@example.org', 2);"
        " INSERT INTO cache_entry (key, value) VALUES ('k', '1')",
    )
    assert_same_state(seeded_db, seeded_expected, ignore=("public.app_user*", "cache_entry"))
    assert_same_state(seeded_db, seeded_expected, ignore=("app_*", "*.cache_*"))
    with pytest.raises(AssertionError, match=r"public\.cache_entry \(unlogged table\)"):
        assert_same_state(seeded_db, seeded_expected, ignore=("app_user", "app_user_id_seq"))


def test_schemas_limit_both_snapshot_and_comparison(
    seeded_db: str, seeded_expected: DbState
) -> None:
    execute(seeded_db, """DELETE FROM "refData"."Currency" WHERE code = 'GBP'""")
    public = snapshot(seeded_db, schemas=["public"])
    assert {r.schema for r in public.relations.values()} == {"public"}
    assert not public.diff(seeded_expected, schemas=["public"])
    assert_same_state(seeded_db, seeded_expected, schemas=["public"])
    with pytest.raises(AssertionError, match=r'"refData"\."Currency" \(table\): 3 rows'):
        assert_same_state(seeded_db, seeded_expected, schemas=["refData"])
    # A snapshot of one schema against the whole expected state: the rest is missing.
    assert public.diff(seeded_expected).relations == {
        r.name for r in seeded_expected.relations.values() if r.schema == "refData"
    }


# --------------------------------------------------------------------------- rows, names, text


def test_rows_are_a_multiset_and_awkward_names_are_quoted(make_db: Callable[..., str]) -> None:
    setup = """
        CREATE SCHEMA "select";
        CREATE TABLE "select"."Weird ""Quoted"" Name" ("order" int, "Mixed Case" text);
        INSERT INTO "select"."Weird ""Quoted"" Name" VALUES (1, 'x'), (1, 'x'), (NULL, 'a b');
    """
    one, two = make_db(), make_db()
    execute(one, setup)
    execute(two, setup)
    assert_same_state(one, two)
    state = snapshot(one)
    name = '"select"."Weird ""Quoted"" Name"'
    assert state.rows[name] == ('(,"a b")', "(1,x)", "(1,x)")

    execute(
        two,
        """DELETE FROM "select"."Weird ""Quoted"" Name" WHERE ctid IN (
        SELECT ctid FROM "select"."Weird ""Quoted"" Name" WHERE "order" = 1 LIMIT 1)""",
    )
    diff = snapshot(one).diff(snapshot(two))
    assert diff.relations == {name}
    assert f"{name} (table): 3 rows, expected 2: 0 missing, 1 unexpected\n      + (1,x)" in str(
        diff
    )


def test_each_row_is_counted_once_where_it_lives(make_db: Callable[..., str]) -> None:
    """Inheritance children and partitions under their own names, parents ``ONLY``."""
    setup = """
        CREATE TABLE parent (id int, note text);
        CREATE TABLE child (extra int) INHERITS (parent);
        CREATE TABLE part (id int, at date) PARTITION BY RANGE (at);
        CREATE TABLE part_old PARTITION OF part FOR VALUES FROM (MINVALUE) TO ('2025-01-01');
        CREATE TABLE part_new PARTITION OF part FOR VALUES FROM ('2025-01-01') TO (MAXVALUE);
        INSERT INTO parent VALUES (1, 'in parent');
    """
    one, two = make_db(), make_db()
    execute(one, setup)
    execute(two, setup)
    execute(one, "INSERT INTO child VALUES (2, 'in child', 3); INSERT INTO part VALUES (4, now())")
    state = snapshot(one)
    assert state.rows["public.parent"] == ('(1,"in parent")',)
    assert state.rows["public.child"] == ('(2,"in child",3)',)
    assert "public.part" not in state.rows and state.row_count("public.part_new") == 1
    assert state.relations["public.child"].parent == "public.parent"
    diff = state.diff(snapshot(two))
    assert diff.relations == {"public.child", "public.part_new"}, str(diff)


def test_rows_are_read_in_a_pinned_session(make_db: Callable[..., str]) -> None:
    """The databases' own TimeZone, DateStyle, ... must not make equal rows differ,
    nor hide a difference (extra_float_digits=0 prints 0.1+0.2 as 0.3)."""
    one, two = make_db(), make_db()
    for url, tz, style, digits, out in (
        (one, "Asia/Tokyo", "SQL, DMY", "0", "escape"),
        (two, "America/Lima", "German", "-2", "hex"),
    ):
        with psycopg.connect(url) as conn:
            dbname = conn.info.dbname
        execute(
            url,
            sql.SQL(
                "ALTER DATABASE {db} SET TimeZone = {tz};"
                " ALTER DATABASE {db} SET DateStyle = {style};"
                " ALTER DATABASE {db} SET extra_float_digits = {digits};"
                " ALTER DATABASE {db} SET bytea_output = {out};"
                " ALTER DATABASE {db} SET IntervalStyle = 'sql_standard'"
            ).format(
                db=sql.Identifier(dbname),
                tz=sql.Literal(tz),
                style=sql.Literal(style),
                digits=sql.Literal(digits),
                out=sql.Literal(out),
            ),
        )
        execute(
            url,
            "CREATE TABLE t (at timestamptz, d date, f float8, b bytea, i interval);"
            " INSERT INTO t VALUES ('2025-01-02 03:04:05+00', '2025-01-02', 0.3,"
            " '\\x00ff', '1 day 2 hours')",
        )
    assert_same_state(one, two)
    assert snapshot(one).rows["public.t"] == (
        '("2025-01-02 03:04:05+00",2025-01-02,0.3,"\\\\x00ff","1 day 02:00:00")',
    )
    execute(two, "UPDATE t SET f = 0.1::float8 + 0.2::float8")
    diff = snapshot(one).diff(snapshot(two))
    assert diff.relations == {"public.t"}
    assert "0.30000000000000004" in str(diff)


# --------------------------------------------------------------------------- dirty everything


def test_dirty_everything_changes_every_relation_of_the_seeded_project(
    seeded_db: str, seeded_expected: DbState
) -> None:
    done = dirty_everything(seeded_db)
    assert done.skipped == {}
    stored = SEEDED_TABLES - {"public.alembic_version", "public.activity_before_2025"}
    assert set(done.inserted) == stored  # activity: lands in activity_since_2025
    seeded = {
        "public.permission",
        "public.price_tier",
        "public.role",
        "public.status",
        "public.ticket_kind",
        '"refData"."Currency"',
    }
    assert set(done.updated) == seeded
    assert set(done.deleted) == seeded | {"public.role_permission"}
    assert set(done.advanced) | set(done.set_back) == SEEDED_SEQUENCES
    assert done.advanced and done.set_back
    assert done.refreshed == ["public.role_summary"]

    diff = snapshot(seeded_db).diff(seeded_expected)
    assert diff.relations == done.relations, str(diff)
    assert "public.alembic_version" not in diff.relations
    assert len(diff.relations) == 24  # 12 tables or partitions, 11 sequences, 1 matview
    with pytest.raises(AssertionError) as failed:
        assert_same_state(seeded_db, seeded_expected)
    message = str(failed.value)
    assert "differs from the expected one in 24 relations" in message
    for relation in ("public.role_summary", "public.spare_seq", '"refData"."Rate Quote"'):
        assert f"  {relation} (" in message


def test_dirty_everything_respects_exclude_and_schemas(
    seeded_db: str, seeded_expected: DbState
) -> None:
    done = dirty_everything(seeded_db, schemas=["refData"], exclude=["Currency"])
    assert done.relations == {'"refData"."Rate Quote"', '"refData"."Rate Quote_id_seq"'}
    assert snapshot(seeded_db).diff(seeded_expected).relations == done.relations


# --------------------------------------------------------------------------- the example project


@pytest.fixture(scope="module")
def example_ini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project("example", tmp_path_factory.mktemp("example"))


def test_example_project(make_db: Callable[..., str], example_ini: Path) -> None:
    expected = fresh_state(make_db, example_ini)
    assert expected.rows["public.alembic_version"] == (f"({EXAMPLE_HEAD})",)
    assert expected.row_count("public.country_codes") == 12
    assert expected.sequences["public.invoice_number_seq"].next_value == 1000
    assert expected.sequences["public.country_regions_id_seq"].next_value == 5

    url = fresh_database(make_db, example_ini)
    assert_same_state(url, expected)

    execute(
        url,
        """INSERT INTO "UserProfile" (email, "displayName") VALUES ('a@example.org', 'A');
           INSERT INTO page_view (user_profile_id, path, viewed_at)
           SELECT id, '/', '2024-03-01' FROM "UserProfile";""",
    )
    diff = snapshot(url).diff(expected)
    assert diff.relations == {
        'public."UserProfile"',
        'public."UserProfile_id_seq"',
        "public.page_view_before_2025",
        "public.page_view_id_seq",
    }, str(diff)

    done = dirty_everything(url)
    assert done.skipped == {}
    assert "public.page_view" not in done.inserted
    assert 'public."line item-x"' in done.inserted and "audit.event" in done.inserted
    assert done.refreshed == ["public.customer_order_totals"]
    diff = snapshot(url).diff(expected)
    assert done.relations <= diff.relations, str(diff)
    assert len(diff.relations) >= 20
    assert "public.alembic_version" not in diff.relations


# --------------------------------------------------------------------------- migrating


def test_a_failed_migration_raises_with_alembic_output(
    make_db: Callable[..., str], tmp_path: Path
) -> None:
    ini = copy_project("broken", tmp_path)
    with pytest.raises(AssertionError, match="missing_table"):
        alembic_upgrade(make_db(), ini)


def test_the_password_is_masked() -> None:
    from dbstate import _mask

    url = "postgresql://app:s3cr%40t@localhost/app_test"
    assert _mask("failed for s3cr%40t and s3cr@t", url) == "failed for *** and ***"
