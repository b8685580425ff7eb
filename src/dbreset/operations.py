"""The library verbs: ``migrate``, ``truncate``, ``reset``, ``status``.

Each takes :class:`~dbreset.settings.Settings` and returns a frozen result; none
prints or exits. Errors are :class:`~dbreset.errors.DbResetError` subclasses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from dbreset import database, migrations, postgres
from dbreset.errors import BusyError, ConfigError, DbResetError, MigrationError, TruncateError

if TYPE_CHECKING:
    import psycopg

    from dbreset.settings import Settings


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TableRows:
    table: str
    rows: int
    #: True when there were more rows than were counted
    more: bool = False
    #: "truncate" or "delete" (few rows, no triggers or rules: same end state, faster)
    how: str = "truncate"


@dataclass(frozen=True)
class MigrateResult(Result):
    target: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    heads: tuple[str, ...]
    upgraded: bool
    #: revisions an upgrade applies (dry run) or applied, oldest first
    pending: tuple[str, ...] = ()
    version_table: str = "public.alembic_version"
    dry_run: bool = False
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class TruncateResult(Result):
    target: str
    emptied: tuple[TableRows, ...]
    tables_checked: int
    sequences_restarted: tuple[str, ...]
    matviews_refreshed: tuple[str, ...]
    excluded: tuple[str, ...]
    kept_sequences: tuple[str, ...] = ()
    #: empty tables truncated only because they reference a truncated one
    also_truncated: int = 0
    #: sequences never called (PostgreSQL before 18 cannot tell cheaply whether
    #: ``setval(..., false)`` moved one) set to their start without being read
    sequences_put_back: int = 0
    dry_run: bool = False
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class ResetResult(Result):
    target: str
    migrate: MigrateResult
    truncate: TruncateResult
    created: bool = False
    dry_run: bool = False
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class StatusResult(Result):
    target: str
    server_version: str
    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    at_head: bool
    nonempty: tuple[TableRows, ...]
    tables_checked: int
    holders: tuple[str, ...]
    settings: dict[str, tuple[str, str]] = field(default_factory=dict)
    problem: str | None = None


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


# --------------------------------------------------------------------------- plumbing


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """env.py files often read the URL variable themselves: point it at our target."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _target(settings: Settings) -> database.Target:
    target = database.make_target(settings.require_url())
    database.check_safety(target, settings)
    return target


def _project(settings: Settings, *, required: bool) -> migrations.Project | None:
    default = settings.sources.get("alembic_config", "default") == "default"
    if not required and default and not settings.alembic_config.exists():
        return None
    return migrations.load_project(settings.alembic_config)


def ensure_database(target: database.Target, settings: Settings) -> bool:
    """Create the target database if it does not exist; True if it was created."""
    import psycopg
    from psycopg import sql

    try:
        database.connect(target, settings, role="create").close()
        return False
    except DbResetError as exc:
        if "does not exist" not in str(exc):
            raise
    conn = None
    for maintenance in ("postgres", "template1"):
        try:
            conn = database.connect(target, settings, role="create", dbname=maintenance)
            break
        except DbResetError:
            continue
    if conn is None:
        raise database.connect_error(
            psycopg.OperationalError("cannot reach a maintenance database (postgres, template1)"),
            target,
            target.dbname,
        )
    with conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False  # created by someone else meanwhile
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"cannot create database {target.dbname!r}: {exc.diag.message_primary}; "
                "grant CREATEDB to this role or create it once by hand"
            ) from None
    return True


def _version_table(
    project: migrations.Project | None, cached: migrations.CachedHeads | None
) -> tuple[str, str]:
    if project is None:
        return migrations.DEFAULT_VERSION_TABLE
    if cached is not None and not project.version_table_from_ini:
        return cached.version_table
    return project.version_table_key


def _migrate_locked(
    conn: psycopg.Connection[Any],
    project: migrations.Project,
    target: database.Target,
    settings: Settings,
    *,
    dry_run: bool,
) -> MigrateResult:
    start = time.perf_counter()
    key = migrations.fingerprint(project)
    cached = migrations.read_cache(project, key)
    version_table = _version_table(project, cached)
    current = migrations.database_heads(conn, version_table)
    label = ".".join(version_table)
    if cached is not None and current == cached.heads:
        return MigrateResult(
            target.masked_url,
            current,
            current,
            current,
            False,
            version_table=label,
            dry_run=dry_run,
            elapsed_ms=_ms(start),
        )
    heads = migrations.script_heads(project)
    if current == heads:
        migrations.write_cache(project, key, migrations.CachedHeads(heads, version_table))
        return MigrateResult(
            target.masked_url,
            current,
            current,
            heads,
            False,
            version_table=label,
            dry_run=dry_run,
            elapsed_ms=_ms(start),
        )
    if dry_run:
        pending = migrations.pending_revisions(project, current)
        return MigrateResult(
            target.masked_url,
            current,
            current,
            heads,
            False,
            pending=pending,
            version_table=label,
            dry_run=True,
            elapsed_ms=_ms(start),
        )
    with _environ(settings.url_env, target.url):
        outcome = migrations.upgrade(project, target.url)
    after = migrations.database_heads(conn, outcome.version_table)
    if after != heads:
        raise MigrationError(
            f"after the upgrade {target.display} is at {', '.join(after) or 'no revision'} "
            f"but the scripts' heads are {', '.join(heads)}: does env.py use another URL?"
        )
    migrations.write_cache(project, key, migrations.CachedHeads(heads, outcome.version_table))
    return MigrateResult(
        target.masked_url,
        outcome.before,
        after,
        heads,
        outcome.before != after,
        version_table=".".join(outcome.version_table),
        elapsed_ms=_ms(start),
    )


def _truncate_locked(
    conn: psycopg.Connection[Any],
    target: database.Target,
    settings: Settings,
    *,
    version_table: tuple[str, str],
    dry_run: bool,
) -> TruncateResult:
    import psycopg

    start = time.perf_counter()
    plan = postgres.plan_truncate(
        conn, schemas=settings.schemas, exclude=settings.exclude, version_table=version_table
    )

    def result(counts: dict[int, int], work: postgres.Emptying) -> TruncateResult:
        cap = postgres.ROW_COUNT_CAP
        counts = {**counts, **work.deleted}
        deleted = {t.oid for t in work.delete}
        return TruncateResult(
            target=target.masked_url,
            emptied=tuple(
                TableRows(
                    t.qualified,
                    min(counts[t.oid], cap),
                    counts[t.oid] > cap,
                    "delete" if t.oid in deleted else "truncate",
                )
                for t in plan.tables
                if counts.get(t.oid)
            ),
            tables_checked=len(plan.tables),
            sequences_restarted=tuple(s.qualified for s in work.restart),
            matviews_refreshed=tuple(v.qualified for v in work.matviews),
            excluded=plan.excluded,
            kept_sequences=plan.kept_sequences,
            also_truncated=sum(1 for t in work.truncate if not counts.get(t.oid)),
            sequences_put_back=len(work.put_back),
            dry_run=dry_run,
            elapsed_ms=_ms(start),
        )

    def decide() -> tuple[dict[int, int], postgres.Emptying]:
        """Which tables hold rows, and what empties them.

        Tables with pages are counted, except the small ones that DELETE would
        empty (their DELETE tells how many rows it removed). A dry run counts
        them all.
        """
        pages = postgres.file_pages(conn, plan.tables)
        small = {
            t.oid
            for t in plan.tables
            if 0 < pages.get(t.oid, 0) <= postgres.DELETE_MAX_PAGES and plan.deletable(t)
        }
        presumed = set() if dry_run else small
        counted = [t for t in plan.tables if t.oid in pages and t.oid not in presumed]
        counts = postgres.row_counts(conn, counted)
        dirty = [
            t
            for t in plan.tables
            if t.oid in presumed or counts.get(t.oid) or t.has_truncate_trigger
        ]
        truncated, deleted = plan.split(dirty, small)
        # small tables that end up truncated after all: count them for the report
        counts.update(postgres.row_counts(conn, [t for t in truncated if t.oid in presumed]))
        put_back: list[postgres.Sequence_] = []
        if dry_run or postgres.reads_sequence_state(conn):
            restart = postgres.dirty_sequences(conn, plan.sequences)
        else:
            restart = postgres.called_sequences(conn, plan.sequences)
            put_back = [s for s in plan.sequences if s.oid not in restart]
        work = postgres.Emptying(
            truncate=truncated,
            delete=deleted,
            restart=[s for s in plan.sequences if s.oid in restart],
            put_back=put_back,
        )
        # Emptying a table with rows makes every materialized view stale; else
        # only those that are not empty are.
        if any(t.oid not in presumed or counts.get(t.oid) for t in dirty):
            work.matviews = list(plan.matviews)
        elif dirty:
            work.matviews_unless_clean = plan.matviews
        else:
            stale = postgres.nonempty_matviews(conn, plan.matviews)
            work.matviews = [v for v in plan.matviews if v.oid in stale]
        return counts, work

    if dry_run:
        counts, work = decide()
        # what the DELETEs would report: the rows counted
        work.deleted.update({t.oid: counts.get(t.oid, 0) for t in work.delete})
        return result(counts, work)

    try:
        try:
            conn.execute(postgres.begin_statement(plan.tables, wait=settings.wait))
            counts, work = decide()
            work.run(conn)  # commits
        except BaseException:
            postgres.rollback(conn)
            raise
    except psycopg.errors.LockNotAvailable:
        holders = postgres.blockers(conn, plan.tables)
        named = "; ".join(h.describe() for h in holders) or "they have gone since; try again"
        raise BusyError(
            f"could not lock the tables of {target.dbname!r} within {settings.wait:g}s, "
            f"other connections hold them: {named}. Close those sessions (an idle "
            "transaction still holds its locks) or pass --wait SECONDS"
        ) from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise TruncateError(
            f"permission denied: {exc.diag.message_primary}; run as the tables' owner or "
            "GRANT TRUNCATE (and UPDATE on their sequences) to this role"
        ) from None
    except psycopg.errors.FeatureNotSupported as exc:
        raise TruncateError(
            f"cannot empty {target.dbname!r}: {exc.diag.message_primary} "
            f"({exc.diag.message_detail or ''}); nothing was changed"
        ) from None
    except psycopg.DatabaseError as exc:
        raise TruncateError(
            f"cannot empty {target.dbname!r}: {exc.diag.message_primary or exc}; "
            "nothing was changed"
        ) from None
    return result(counts, work)


# --------------------------------------------------------------------------- verbs


def migrate(settings: Settings) -> MigrateResult:
    """Upgrade the database to the scripts' heads (skipped when already there)."""
    target = _target(settings)
    project = _project(settings, required=True)
    assert project is not None
    with (
        database.connect(target, settings, role="migrate") as conn,
        database.exclusive_lock(conn, wait=settings.wait, target=target),
    ):
        return _migrate_locked(conn, project, target, settings, dry_run=False)


def truncate(settings: Settings, *, dry_run: bool = False) -> TruncateResult:
    """Empty every table of the chosen schemas and restart their sequences."""
    target = _target(settings)
    project = _project(settings, required=False)
    with database.connect(target, settings, role="truncate") as conn:
        cached = None
        if project is not None:
            cached = migrations.read_cache(project, migrations.fingerprint(project))
        version_table = _version_table(project, cached)
        if dry_run:
            return _truncate_locked(
                conn, target, settings, version_table=version_table, dry_run=True
            )
        with database.exclusive_lock(conn, wait=settings.wait, target=target):
            return _truncate_locked(
                conn, target, settings, version_table=version_table, dry_run=False
            )


def _reset_on(
    conn: psycopg.Connection[Any],
    target: database.Target,
    settings: Settings,
    project: migrations.Project,
    *,
    dry_run: bool,
    created: bool,
    start: float,
) -> ResetResult:
    migrated = _migrate_locked(conn, project, target, settings, dry_run=dry_run)
    schema, _, table = migrated.version_table.rpartition(".")
    emptied = _truncate_locked(
        conn, target, settings, version_table=(schema, table), dry_run=dry_run
    )
    return ResetResult(
        target.masked_url,
        migrated,
        emptied,
        created=created,
        dry_run=dry_run,
        elapsed_ms=_ms(start),
    )


def reset(settings: Settings, *, dry_run: bool = False, create: bool = False) -> ResetResult:
    """Migrate to head, then empty every table and restart every sequence."""
    start = time.perf_counter()
    target = _target(settings)
    project = _project(settings, required=True)
    assert project is not None
    created = ensure_database(target, settings) if create and not dry_run else False
    with database.connect(target, settings, role="reset") as conn:
        if dry_run:
            return _reset_on(
                conn, target, settings, project, dry_run=True, created=False, start=start
            )
        with database.exclusive_lock(conn, wait=settings.wait, target=target):
            return _reset_on(
                conn, target, settings, project, dry_run=False, created=created, start=start
            )


class SessionGuard:
    """A connection that holds the database for a running test session.

    While it is open, resets and migrations from elsewhere are refused (or wait).
    Closing it (or the process ending) lets go.
    """

    def __init__(self, conn: psycopg.Connection[Any], target: database.Target) -> None:
        self.conn = conn
        self.target = target

    def close(self) -> None:
        if not self.conn.closed:
            self.conn.close()


def reset_and_guard(
    settings: Settings, *, create: bool = False
) -> tuple[ResetResult, SessionGuard]:
    """Reset, then keep holding the database for a test session (shared lock)."""
    start = time.perf_counter()
    target = _target(settings)
    project = _project(settings, required=True)
    assert project is not None
    created = ensure_database(target, settings) if create else False
    conn = database.connect(target, settings, role="pytest session")
    try:
        database.acquire_exclusive(conn, wait=settings.wait, target=target)
        result = _reset_on(
            conn, target, settings, project, dry_run=False, created=created, start=start
        )
        database.hold_for_session(conn)
    except BaseException:
        conn.close()
        raise
    return result, SessionGuard(conn, target)


def status(settings: Settings) -> StatusResult:
    """Where the database stands: revision, leftover rows, who holds it, settings."""
    target = _target(settings)
    project = _project(settings, required=False)
    with database.connect(target, settings, role="status") as conn:
        row = conn.execute(postgres.SERVER_SQL).fetchone()
        assert row is not None
        version, dbname = row
        heads: tuple[str, ...] = ()
        cached = None
        if project is not None:
            key = migrations.fingerprint(project)
            cached = migrations.read_cache(project, key)
            heads = cached.heads if cached else migrations.script_heads(project)
        version_table = _version_table(project, cached)
        current = migrations.database_heads(conn, version_table)
        problem = None
        nonempty: tuple[TableRows, ...] = ()
        checked = 0
        try:
            plan = postgres.plan_truncate(
                conn,
                schemas=settings.schemas,
                exclude=settings.exclude,
                version_table=version_table,
            )
            pages = postgres.file_pages(conn, plan.tables)
            counts = postgres.row_counts(conn, [t for t in plan.tables if t.oid in pages])
            cap = postgres.ROW_COUNT_CAP
            nonempty = tuple(
                TableRows(t.qualified, min(counts[t.oid], cap), counts[t.oid] > cap)
                for t in plan.tables
                if counts.get(t.oid)
            )
            checked = len(plan.tables)
        except TruncateError as exc:
            problem = str(exc)
        holders = tuple(
            ("test session " if h.mode == "ShareLock" else "reset ") + h.describe()
            for h in database.lock_holders(conn)
        )
    shown = {
        key: (_show(key, getattr(settings, key)), settings.sources.get(key, "default"))
        for key in (
            "url",
            "url_env",
            "alembic_config",
            "schemas",
            "exclude",
            "allowed_hosts",
            "allow_remote",
            "wait",
        )
    }
    return StatusResult(
        target=target.masked_url,
        server_version=version,
        database=dbname,
        current=current,
        heads=heads,
        at_head=current == heads,
        nonempty=nonempty,
        tables_checked=checked,
        holders=holders,
        settings=shown,
        problem=problem,
    )


def _show(key: str, value: object) -> str:
    if key == "url":
        return database.mask_url(str(value)) if value else "(not set)"
    if isinstance(value, tuple):
        return ", ".join(value) or "(none)"
    return str(value)


# --------------------------------------------------------------------------- session canary
# (pytest plugin) After the reset the pytest controller takes a snapshot of the
# chosen schemas: oid and relfilenode of every table, partition, sequence and
# materialized view, and the database's oid. Each process then checks it on one
# connection of its own with one prepared query. Nothing is ever written to the
# database, so nothing can be left behind.

#: Start of every canary message.
CANARY_MESSAGE = "the database was reset/truncated/rebuilt during this session"
#: How many changed relations a message names before "and N more".
CANARY_NAMED = 8

#: What a new relfilenode means, by relkind; in the order messages list them.
_CANARY_CHANGES = {
    "r": "truncated or rewritten",
    "p": "rewritten",
    "m": "materialized views refreshed",
    "S": "sequences restarted",
}


class CanaryRelation(NamedTuple):
    oid: int
    filenode: int
    #: ``schema.name``
    name: str
    #: ``pg_class.relkind``: r, p, S or m
    kind: str


@dataclass(frozen=True)
class CanarySnapshot:
    """The state a test session expects its database to stay in."""

    url: str = field(repr=False)  # with its password: workers connect with it
    database_oid: int
    digest: str
    schemas: tuple[str, ...]
    relations: tuple[CanaryRelation, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, strings and integers: it travels to xdist workers."""
        return {
            "url": self.url,
            "database_oid": self.database_oid,
            "digest": self.digest,
            "schemas": list(self.schemas),
            "relations": [[r.oid, r.filenode, r.name, r.kind] for r in self.relations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanarySnapshot:
        return cls(
            url=str(data["url"]),
            database_oid=int(data["database_oid"]),
            digest=str(data["digest"]),
            schemas=tuple(data["schemas"]),
            relations=tuple(
                CanaryRelation(int(oid), int(filenode), str(name), str(kind))
                for oid, filenode, name, kind in data["relations"]
            ),
        )


def _oid_array(oids: list[int]) -> str:
    """An ``oid[]`` literal: one string parameter adapts faster than a list."""
    return "{" + ",".join(str(oid) for oid in oids) + "}"


def _canary_state(conn: psycopg.Connection[Any], oids: str) -> tuple[int, str]:
    row = conn.execute(postgres.CANARY_CHECK_SQL, {"oids": oids}).fetchone()
    assert row is not None
    return int(row[0] or 0), str(row[1])


def canary_snapshot(
    conn: psycopg.Connection[Any], url: str, schemas: tuple[str, ...]
) -> CanarySnapshot:
    """Snapshot the relations of *schemas* (right after a reset, on its connection)."""
    rows = conn.execute(postgres.CANARY_SNAPSHOT_SQL, {"schemas": list(schemas)}).fetchall()
    relations = tuple(
        CanaryRelation(int(oid), int(filenode), f"{schema}.{name}", str(kind))
        for oid, filenode, schema, name, kind in rows
    )
    database_oid, digest = _canary_state(conn, _oid_array([r.oid for r in relations]))
    return CanarySnapshot(url, database_oid, digest, tuple(schemas), relations)


def canary_changes(conn: psycopg.Connection[Any], snapshot: CanarySnapshot) -> dict[str, list[str]]:
    """What happened to the relations of *snapshot* that are not as they were:
    ``{"dropped": [names], "truncated or rewritten": [names], ...}``."""
    oids = _oid_array([r.oid for r in snapshot.relations])
    rows = conn.execute(postgres.CANARY_CURRENT_SQL, {"oids": oids}).fetchall()
    now = {int(oid): int(filenode) for oid, filenode in rows}
    changes: dict[str, list[str]] = {}
    for what in ("dropped", *_CANARY_CHANGES.values()):
        changes[what] = []
    for rel in snapshot.relations:
        if rel.oid not in now:
            changes["dropped"].append(rel.name)
        elif now[rel.oid] != rel.filenode:
            changes[_CANARY_CHANGES.get(rel.kind, "rewritten")].append(rel.name)
    return {what: names for what, names in changes.items() if names}


def _canary_message(changes: dict[str, list[str]]) -> str:
    parts = []
    for what, names in changes.items():
        more = len(names) - CANARY_NAMED
        parts.append(
            f"{what}: {', '.join(names[:CANARY_NAMED])}" + (f" and {more} more" if more > 0 else "")
        )
    return f"{CANARY_MESSAGE}: {'; '.join(parts) or 'a relation changed'}"


class Canary:
    """Checks a :class:`CanarySnapshot`, on one connection per process.

    The connection is opened on the first check (or *conn* is used, e.g. the
    session guard's own) and reused: the check is one prepared statement.
    """

    def __init__(
        self, snapshot: CanarySnapshot, *, conn: psycopg.Connection[Any] | None = None
    ) -> None:
        self.snapshot = snapshot
        self._conn = conn
        self._owned = conn is None
        self._oids = _oid_array([r.oid for r in snapshot.relations])
        self._expected = (snapshot.database_oid, snapshot.digest)
        self._lost: str | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            from dbreset.settings import Settings

            target = database.make_target(self.snapshot.url)
            # The controller vetted this very URL before it reset the database.
            self._conn = database.connect(target, Settings(), role="pytest canary", check=False)
        return self._conn

    def verify(self) -> str | None:
        """None while the database is as the snapshot says; else what changed."""
        import psycopg

        if self._lost is not None:
            return self._lost
        try:
            conn = self._connection()
            state = _canary_state(conn, self._oids)
            if state == self._expected:
                return None
            if state[0] != self.snapshot.database_oid:
                return f"{CANARY_MESSAGE}: the database was dropped and created again"
            return _canary_message(canary_changes(conn, self.snapshot))
        except (psycopg.OperationalError, DbResetError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._lost = (
                f"{CANARY_MESSAGE}: the database was dropped or its connections "
                f"terminated ({database.scrub(detail, self.snapshot.url)})"
            )
            self.close()
            return self._lost

    def close(self) -> None:
        if self._owned and self._conn is not None and not self._conn.closed:
            self._conn.close()
