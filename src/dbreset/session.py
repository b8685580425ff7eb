"""What a running test session holds: the database (a shared advisory lock),
one database per pytest-xdist worker, the canary, and the per-test cleaner.

Used by the pytest plugin; no pytest here. A session is prepared in the
controller (the only process of a plain run) before any worker starts:
:func:`reset_and_guard` for a shared database, :func:`prepare_workers` for one
database per worker. Each process then checks its own database with a
:class:`Canary`, and with ``dbreset_clean = test`` puts it back before every
test with a :class:`Cleaner`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from dbreset import database, operations, postgres, pristine
from dbreset.errors import BusyError, ConfigError, DbResetError, SafetyError, TruncateError
from dbreset.redact import printable, scrub

if TYPE_CHECKING:
    import psycopg

    from dbreset.settings import Settings


class SessionGuard:
    """A connection that holds a database for a running test session.

    While it is open, resets and migrations from elsewhere are refused (or wait).
    Closing it (or the process ending) lets go.
    """

    def __init__(self, conn: psycopg.Connection[Any], target: database.Target) -> None:
        self.conn = conn
        self.target = target

    def close(self) -> None:
        if not self.conn.closed:
            self.conn.close()


class SessionReset(NamedTuple):
    result: operations.ResetResult
    guard: SessionGuard
    #: the freshly migrated state the reset restored (None: every table emptied)
    baseline: pristine.Baseline | None
    version_table: tuple[str, str]


def reset_and_guard(
    settings: Settings,
    *,
    create: bool = False,
    recreate: bool = False,
    progress: operations.Progress | None = None,
) -> SessionReset:
    """Reset, then keep holding the database for a test session (shared lock)."""
    start = time.perf_counter()
    if recreate:
        operations.reset(settings, recreate=True, progress=progress)
    with operations._journal() as journal:
        target = operations._target(settings)
        project = operations._project(settings, required=True)
        ctx = operations._Context(settings, target, project, progress, journal)
        before = len(journal.committed)
        conn = operations._connect(ctx, "pytest session", create=create)
        created = recreate or len(journal.committed) > before
        try:
            ctx.guard()
            database.acquire_exclusive(conn, wait=settings.wait, target=target)
            result = operations._reset_on(conn, ctx, dry_run=False, created=created, start=start)
            database.hold_for_session(conn)
        except BaseException:
            conn.close()
            raise
    return SessionReset(result, SessionGuard(conn, target), ctx.baseline, ctx.version_table)


# --------------------------------------------------------------------------- worker databases


class WorkerDatabase(NamedTuple):
    worker: str
    database: str
    #: with the password: the worker connects with it
    url: str
    #: "reset" (in place), "cloned" (new, or made from other migrations)
    how: str
    #: what the reset found (None for a clone)
    reset: operations.TruncateResult | None
    elapsed_ms: float
    snapshot: CanarySnapshot | None = None

    def __repr__(self) -> str:  # never the password
        return f"WorkerDatabase({self.worker!r}, {self.database!r}, how={self.how!r})"


class WorkersResult(NamedTuple):
    target: str
    workers: tuple[WorkerDatabase, ...]
    pristine_db: str
    pristine_built: bool
    baseline: pristine.Baseline
    version_table: tuple[str, str] = ("public", "alembic_version")
    elapsed_ms: float = 0.0

    def __repr__(self) -> str:
        return f"WorkersResult({self.target!r}, {self.workers!r}, {self.pristine_db!r})"


def prepare_workers(
    settings: Settings,
    workers: Sequence[str],
    *,
    create: bool = False,
    canary_schemas: tuple[str, ...] | None = None,
    progress: operations.Progress | None = None,
) -> tuple[WorkersResult, list[SessionGuard]]:
    """One database per worker, each freshly migrated: reset in place when it
    exists and matches the migrations, cloned from the pristine database when it
    is missing or stale; all before any worker starts, in parallel. The target
    is held for the session (it is the family's lock), and so is every worker
    database. With *canary_schemas*, each worker database's canary snapshot is
    taken on its guard's connection."""
    start = time.perf_counter()
    guards: list[SessionGuard] = []
    try:
        with operations._journal() as journal:
            target = operations._target(settings)
            project = operations._project(settings, required=True)
            ctx = operations._Context(settings, target, project, progress, journal)
            conn = operations._connect(ctx, "pytest session", create=create)
            guards.append(SessionGuard(conn, target))
            ctx.guard()
            database.acquire_exclusive(conn, wait=settings.wait, target=target)
            found = operations._find_baseline(ctx, dry_run=False)
            if found.pristine is None:
                raise ConfigError(
                    "dbreset_isolation = worker needs a pristine database to clone worker "
                    f"databases from: {found.warning or 'none could be made'}"
                )
            made = found.pristine
            assert ctx.fingerprint is not None
            fingerprint = ctx.fingerprint
            names = {w: pristine.worker_name(target.dbname, w) for w in workers}
            existing = _existing(conn, list(names.values()))
            in_place: list[str] = []
            to_clone: list[str] = []
            for worker, name in names.items():
                if name == target.dbname:
                    raise ConfigError(f"worker {worker!r} would use the target itself")
                if name not in existing:
                    to_clone.append(worker)
                    continue
                mark = existing[name]
                if mark is None or mark.kind != "worker" or mark.target != target.dbname:
                    raise SafetyError(
                        f"database {printable(name)!r} exists and dbreset did not make it as "
                        f"{printable(target.dbname)!r}'s {worker} database, so it is not "
                        "touched; drop or rename it"
                    )
                if mark.fingerprint == fingerprint:
                    in_place.append(worker)
                else:
                    to_clone.append(worker)
            prepared: dict[str, WorkerDatabase] = {}
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=max(1, min(4, len(workers)))) as pool:
                jobs = {
                    worker: pool.submit(
                        _reset_worker,
                        settings,
                        target,
                        worker,
                        names[worker],
                        made.baseline,
                        ctx.version_table,
                        canary_schemas,
                        existing[names[worker]],
                    )
                    for worker in in_place
                }
                if to_clone:
                    with ctx.progress(f"cloning {len(to_clone)} worker databases"):
                        cloned = _clone_workers(
                            settings, target, made, to_clone, names, existing, fingerprint
                        )
                    for worker in to_clone:
                        jobs[worker] = pool.submit(
                            _hold_worker,
                            settings,
                            target,
                            worker,
                            names[worker],
                            cloned[worker],
                            canary_schemas,
                        )
                for worker, job in jobs.items():
                    try:
                        prepared[worker], guard = job.result()
                    except DbResetError as exc:
                        raise type(exc)(
                            f"preparing {printable(names[worker])!r} for worker {worker}: {exc}"
                        ) from None
                    guards.append(guard)
            database.hold_for_session(conn)
    except BaseException:
        for guard in guards:
            guard.close()
        raise
    result = WorkersResult(
        target.masked_url,
        tuple(prepared[w] for w in workers),
        made.name,
        made.built,
        made.baseline,
        ctx.version_table,
        elapsed_ms=operations._ms(start),
    )
    return result, guards


def _existing(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, database.Mark | None]:
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname = ANY(%s)",
        (names,),
    ).fetchall()
    return {name: database.parse_mark(comment) for name, comment in rows}


def _clone_workers(
    settings: Settings,
    target: database.Target,
    made: pristine.Pristine,
    workers: list[str],
    names: dict[str, str],
    existing: dict[str, database.Mark | None],
    fingerprint: str,
) -> dict[str, float]:
    """Drop the stale worker databases and clone the missing ones, in parallel
    (one maintenance connection each); the milliseconds each took."""

    def one(worker: str) -> float:
        start = time.perf_counter()
        name = names[worker]
        with database.connect_maintenance(target, settings, role="pytest clone") as admin:
            if name in existing:
                pristine.drop_database(admin, name)
            mark = database.Mark(
                "worker",
                target=target.dbname,
                fingerprint=fingerprint,
                heads=made.baseline.heads,
                made=database.now_iso(),
                used=database.now_iso(),
            )
            pristine.clone(admin, source=made.name, name=name, mark=mark)
        return operations._ms(start)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(4, len(workers)))) as pool:
        return dict(zip(workers, pool.map(one, workers), strict=True))


def _hold_worker(
    settings: Settings,
    target: database.Target,
    worker: str,
    name: str,
    elapsed: float,
    canary_schemas: tuple[str, ...] | None,
) -> tuple[WorkerDatabase, SessionGuard]:
    url = database.with_dbname(target.url, name)
    worker_target = database.make_target(url)
    conn = database.connect(worker_target, settings, role="pytest session")
    try:
        database.acquire_exclusive(conn, wait=settings.wait, target=worker_target)
        database.hold_for_session(conn)
        snapshot = canary_snapshot(conn, url, canary_schemas) if canary_schemas else None
    except BaseException:
        conn.close()
        raise
    found = WorkerDatabase(worker, name, url, "cloned", None, elapsed, snapshot)
    return found, SessionGuard(conn, worker_target)


def _reset_worker(
    settings: Settings,
    target: database.Target,
    worker: str,
    name: str,
    baseline: pristine.Baseline,
    version_table: tuple[str, str],
    canary_schemas: tuple[str, ...] | None,
    mark: database.Mark | None = None,
) -> tuple[WorkerDatabase, SessionGuard]:
    """Put an existing worker database back in place, then hold it (and note,
    at most once an hour, when it was last used)."""
    from dataclasses import replace

    start = time.perf_counter()
    url = database.with_dbname(target.url, name)
    worker_settings = replace(settings, url=url)
    worker_target = database.make_target(url)
    journal = operations.Journal()
    ctx = operations._Context(worker_settings, worker_target, None, None, journal)
    ctx.version_table = version_table
    conn = database.connect(worker_target, settings, role="pytest session")
    try:
        database.acquire_exclusive(conn, wait=settings.wait, target=worker_target)
        ctx.probe = postgres.Probe(name, 0, None, True, None, None)
        # which sequences a worker's tests moved is of no interest: all are set
        # to their baseline unread (cheaper than reading them in a new session)
        emptied = operations._restore_locked(
            conn, ctx, baseline, dry_run=False, read_sequences=False
        )
        now = database.now_iso()
        if mark is not None and mark.used[:13] != now[:13]:
            pristine.set_mark(conn, name, mark._replace(used=now))
        database.hold_for_session(conn)
        snapshot = canary_snapshot(conn, url, canary_schemas) if canary_schemas else None
    except BaseException:
        conn.close()
        raise
    found = WorkerDatabase(worker, name, url, "reset", emptied, operations._ms(start), snapshot)
    return found, SessionGuard(conn, worker_target)


# --------------------------------------------------------------------------- session canary
# After the reset the controller takes a snapshot of the chosen schemas: oid and
# relfilenode of every table, partition, sequence and materialized view, and the
# database's oid. Each process then checks its database on one connection of
# its own with one prepared query. Nothing is ever written to the database, so
# nothing can be left behind.

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


def _digest(relations: Sequence[CanaryRelation]) -> str:
    """What :data:`postgres.CANARY_CHECK_SQL` computes, for the same relations."""
    text = ",".join(f"{r.oid}:{r.filenode}" for r in sorted(relations))
    return hashlib.md5(text.encode()).hexdigest()


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


def _canary_state(conn: psycopg.Connection[Any], oids: str) -> tuple[int, str]:
    row = conn.execute(postgres.CANARY_CHECK_SQL, {"oids": oids}, prepare=True).fetchone()
    assert row is not None
    return int(row[0] or 0), str(row[1])


def canary_snapshot(
    conn: psycopg.Connection[Any], url: str, schemas: tuple[str, ...]
) -> CanarySnapshot:
    """Snapshot the relations of *schemas* (right after a reset, on its connection)."""
    rows = conn.execute(postgres.CANARY_SNAPSHOT_SQL, {"schemas": list(schemas)}).fetchall()
    relations = tuple(
        CanaryRelation(int(oid), int(filenode), printable(f"{schema}.{name}"), str(kind))
        for oid, filenode, schema, name, kind, _ in rows
    )
    if rows:
        database_oid, digest = int(rows[0][5]), _digest(relations)
    else:
        database_oid, digest = _canary_state(conn, "{}")
    return CanarySnapshot(url, database_oid, digest, tuple(schemas), relations)


def canary_changes(conn: psycopg.Connection[Any], snapshot: CanarySnapshot) -> dict[str, list[str]]:
    """What happened to the relations of *snapshot* that are not as they were:
    ``{"dropped": [names], "truncated or rewritten": [names], ...}``."""
    oids = postgres.oid_array([r.oid for r in snapshot.relations])
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
        self._oids = postgres.oid_array([r.oid for r in snapshot.relations])
        self._expected = (snapshot.database_oid, snapshot.digest)
        self._lost: str | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            from dbreset.settings import Settings

            target = database.make_target(self.snapshot.url)
            # The controller vetted this very URL before it reset the database.
            self._conn = database.connect(target, Settings(), role="pytest canary", check=False)
        return self._conn

    def accept(self, conn: psycopg.Connection[Any], oids: set[int]) -> None:
        """This process itself rewrote these relations (the per-test cleaner's
        TRUNCATE and REFRESH): their new files are no sign of anything else."""
        if not oids:
            return
        ours = [r for r in self.snapshot.relations if r.oid in oids]
        if not ours:
            return
        rows = conn.execute(
            postgres.CANARY_CURRENT_SQL, {"oids": postgres.oid_array([r.oid for r in ours])}
        ).fetchall()
        now = {int(oid): int(node) for oid, node in rows}
        relations = tuple(
            r._replace(filenode=now.get(r.oid, r.filenode)) if r.oid in oids else r
            for r in self.snapshot.relations
        )
        digest = _digest([r for r in relations if r.oid in now or r.oid not in oids])
        self.snapshot = CanarySnapshot(
            self.snapshot.url, self.snapshot.database_oid, digest, self.snapshot.schemas, relations
        )
        self._expected = (self.snapshot.database_oid, digest)

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
                f"terminated ({scrub(detail, self.snapshot.url)})"
            )
            self.close()
            return self._lost

    def close(self) -> None:
        if self._owned and self._conn is not None and not self._conn.closed:
            self._conn.close()


# --------------------------------------------------------------------------- per-test cleaning


class CleanResult(NamedTuple):
    """What one per-test clean found and put back."""

    tables: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ()
    matviews: tuple[str, ...] = ()
    elapsed_ms: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.tables or self.sequences or self.matviews)


class Cleaner:
    """Puts one database back in its freshly migrated state before each test,
    over one connection kept for the session, touching only what changed.

    The check is one prepared statement: for every table, whether it holds any
    row (tables that a fresh migration leaves empty) or, for seeded tables,
    whether its row count or the transactions that wrote its rows differ from
    those known to hold the baseline (every change writes a row version with a
    new transaction id, so an UPDATE is seen as surely as an INSERT); every
    sequence against its baseline state; every materialized view likewise. Only
    the tables found changed (and those that their foreign keys tie to them)
    are locked and put back, in one transaction. Nothing is added to the
    user's schema.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        settings: Settings,
        baseline: pristine.Baseline | None,
        *,
        version_table: tuple[str, str],
        canary: Canary | None = None,
        owned: bool = False,
    ) -> None:
        self.conn = conn
        #: the connection is the cleaner's own (a worker's), closed with it
        self.owned = owned
        self.settings = settings
        self.baseline = baseline
        self.version_table = version_table
        self.canary = canary
        self.target = database.make_target(settings.require_url())
        #: the freshly migrated state, by ``schema.name`` (empty without a baseline)
        self._seeded = baseline.tables if baseline is not None else {}
        self._sequences = baseline.sequences if baseline is not None else {}
        self._views = baseline.matviews if baseline is not None else {}
        self._plan: postgres.Plan | None = None
        self._query = ""
        #: (kind, object) of each check, in the statement's order
        self._checks: list[tuple[str, Any]] = []
        #: seeded leaves and populated matviews: transaction ids of their rows
        self._xmins: dict[int, set[str]] = {}
        #: the check's parameters: :attr:`_xmins` as ``xid[]`` literals
        self._params: dict[str, str] = {}
        #: the server's WAL position when a full check last found nothing changed
        self._lsn: str | None = None
        self._wal_ok = False
        #: what :meth:`prepare` put back, until the first :meth:`clean` reports it
        self._prepared: operations.TruncateResult | None = None

    def prepare(self) -> operations.TruncateResult:
        """Plan, put the database back where needed (comparing seeded tables with
        their baseline in full), and learn what the cheap check compares with."""
        journal = operations.Journal()
        ctx = operations._Context(self.settings, self.target, None, None, journal)
        ctx.version_table = self.version_table
        ctx.probe = postgres.Probe(self.target.dbname, 0, None, True, None, None)
        wait_ms = max(1, int(self.settings.wait * 1000))
        self.conn.execute(f"SET lock_timeout = {wait_ms}")
        self.conn.execute("SET plan_cache_mode = force_generic_plan")
        self._plan = operations._plan(self.conn, ctx)
        result = operations._restore_locked(
            self.conn, ctx, self.baseline, dry_run=False, plan=self._plan
        )
        self._build()
        self._watch_wal()
        self._prepared = result
        return result

    def _watch_wal(self) -> None:
        """Whether "the server wrote no WAL since the last check" may stand for
        "nothing changed": every committed change to a logged table writes WAL,
        and so does a sequence's nextval once its cached values are used up --
        which setval empties, so every called sequence is set (to where it is)
        now. Not when the plan holds an unlogged relation (no WAL), nor on a
        standby."""
        plan = self._plan
        assert plan is not None
        oids = [leaf.oid for t in plan.tables for leaf in t.leaves]
        oids += [s.oid for s in plan.sequences] + [v.oid for v in plan.matviews]
        row = self.conn.execute(postgres.WAL_WATCH_SQL, {"oids": oids}).fetchone()
        self._wal_ok = bool(row and row[0])
        if self._wal_ok and plan.sequences:
            called = [s for s in plan.sequences if postgres._expected(s, self._sequences).is_called]
            if called:
                self.conn.execute(
                    "SELECT count(setval(s, pg_sequence_last_value(s), true)) "
                    "FROM unnest(%s::oid[]) AS s WHERE pg_sequence_last_value(s) IS NOT NULL",
                    ([s.oid for s in called],),
                )
        self._lsn = None

    def _build(self) -> None:
        plan = self._plan
        assert plan is not None
        seeded, views = self._seeded, self._views
        checks: list[tuple[str, Any]] = []
        parts: list[str] = []
        rows_known: list[int] = []
        for table in plan.tables:
            conds = []
            for leaf in table.leaves:
                if leaf.key in seeded:
                    rows_known.append(leaf.oid)
                    conds.append(
                        f"(SELECT count(*) <> {seeded[leaf.key].row_count} OR coalesce(bool_or(NOT "
                        f"r.xmin = ANY(%(x{leaf.oid})s::xid[])), false) FROM ONLY {leaf.quoted} r)"
                    )
                else:
                    conds.append(f"EXISTS (SELECT FROM ONLY {leaf.quoted})")
            if conds:
                checks.append(("table", table))
                parts.append(" OR ".join(conds))
        for seq in plan.sequences:
            want = postgres._expected(seq, self._sequences)
            checks.append(("sequence", seq))
            parts.append(
                f"(SELECT (last_value, is_called) FROM {seq.quoted}) IS DISTINCT FROM "
                f"({want.last_value}::bigint, {'true' if want.is_called else 'false'})"
            )
        for view in plan.matviews:
            want_view = views.get(view.key)
            if want_view is None:
                continue
            checks.append(("matview", view))
            state = f"(SELECT relispopulated FROM pg_class WHERE oid = {view.oid})"
            if not want_view.populated:
                parts.append(state)
                continue
            rows_known.append(view.oid)
            parts.append(
                f"CASE WHEN {state} THEN (SELECT count(*) <> {want_view.row_count} OR "
                f"coalesce(bool_or(NOT r.xmin = ANY(%(x{view.oid})s::xid[])), false) "
                f"FROM {view.quoted} r) ELSE true END"
            )
        self._checks = checks
        if not parts:
            self._query = ""
            return
        cases = ", ".join(f"CASE WHEN {p} THEN {i} END" for i, p in enumerate(parts))
        self._query = f"SELECT array_remove(ARRAY[{cases}], NULL)"
        missing = [oid for oid in rows_known if oid not in self._xmins]
        if missing:
            query = " UNION ALL ".join(
                f"SELECT {oid}::oid, (SELECT coalesce(array_agg(DISTINCT r.xmin::text), '{{}}') "
                f"FROM {'ONLY ' if kind == 'table' else ''}{name} r)"
                for oid, kind, name in self._known_relations(missing)
            )
            for oid, xmins in self.conn.execute(query):
                self._xmins[int(oid)] = set(xmins)
        self._xmins_changed()

    def _known_relations(self, oids: list[int]) -> list[tuple[int, str, str]]:
        assert self._plan is not None
        wanted = set(oids)
        out: list[tuple[int, str, str]] = []
        for table in self._plan.tables:
            out += [(leaf.oid, "table", leaf.quoted) for leaf in table.leaves if leaf.oid in wanted]
        out += [(v.oid, "matview", v.quoted) for v in self._plan.matviews if v.oid in wanted]
        return out

    def _xmins_changed(self) -> None:
        self._params = {
            f"x{oid}": "{" + ",".join(sorted(xs)) + "}" for oid, xs in self._xmins.items()
        }

    def clean(self) -> CleanResult:
        """Put back what the last test changed; one cheap query when nothing."""
        import psycopg

        start = time.perf_counter()
        if self._plan is None:
            self.prepare()
        prepared, self._prepared = self._prepared, None
        if prepared is not None:  # the first clean: prepare() put back all it found
            tables = [t.table for t in prepared.emptied] + [r.table for r in prepared.restored]
            return CleanResult(
                tables=tuple(dict.fromkeys(tables)),
                sequences=prepared.sequences_restarted,
                matviews=prepared.matviews_refreshed,
                elapsed_ms=prepared.elapsed_ms + operations._ms(start),
            )
        if not self._query:
            return CleanResult(elapsed_ms=operations._ms(start))
        lsn: str | None = None
        if self._wal_ok:
            # read before the check: whatever commits after it moves it on
            found = self.conn.execute(postgres.WAL_LSN_SQL, prepare=True).fetchone()
            lsn = str(found[0]) if found else None
            if lsn is not None and lsn == self._lsn:
                return CleanResult(elapsed_ms=operations._ms(start))
        try:
            row = self.conn.execute(self._query, self._params, prepare=True).fetchone()
        except psycopg.errors.LockNotAvailable:
            assert self._plan is not None
            raise self._busy(list(self._plan.tables)) from None
        dirty = [self._checks[i] for i in (row[0] if row else [])]
        if not dirty:
            self._lsn = lsn
            return CleanResult(elapsed_ms=operations._ms(start))
        self._lsn = None  # our own writes move it: the next clean checks in full
        return self._put_back(dirty, start)

    def _busy(self, tables: list[postgres.Table]) -> BusyError:
        holders = postgres.blockers(self.conn, tables)
        named = "; ".join(h.describe() for h in holders) or "they have gone since"
        return BusyError(
            f"could not put {printable(self.target.dbname)!r} back before this test within "
            f"{self.settings.wait:g}s, other connections hold its tables: {named}. Close "
            "the sessions a test leaves open (an idle transaction still holds its locks), "
            "or raise dbreset_wait"
        )

    def _put_back(self, dirty: list[tuple[str, Any]], start: float) -> CleanResult:
        import psycopg

        plan = self._plan
        assert plan is not None
        seeded = self._seeded
        tables = [obj for kind, obj in dirty if kind == "table"]
        sequences = [obj for kind, obj in dirty if kind == "sequence"]
        views = [obj for kind, obj in dirty if kind == "matview"]
        holding = plan.holding(seeded)
        # Never session_replication_role here: changing it throws away every
        # cached plan of the session, the prepared check's included, which
        # the next test would pay for (several ms at 200 tables). Foreign keys
        # stay checked: children are emptied first and parents filled first.
        replica = False
        # DELETE is cheaper for the few rows a test writes; a table that grew
        # (bulk rows, or dead rows piling up from earlier DELETEs) is truncated
        pages = postgres.file_pages(self.conn, tables)
        small = {
            t.oid
            for t in plan.tables
            if plan.deletable(t) and pages.get(t.oid, 0) <= postgres.DELETE_MAX_PAGES
        }
        truncated, deleted = plan.split(
            tables,
            small,
            holding=frozenset(holding - {t.oid for t in tables}),
            checked_keys=not replica,
        )
        emptied = {t.oid for t in (*truncated, *deleted)}
        restores = [
            postgres.Restore(leaf, seeded[leaf.key].writable, seeded[leaf.key].rows, 0)
            for leaf in plan.refill_order(emptied, seeded)
        ]
        work = postgres.Emptying(
            truncate=truncated,
            delete=deleted,
            restore=restores,
            replica=replica,
            restart=sequences,
            matviews=[(v, self._views[v.key].populated) for v in views],
            expected=self._sequences,
        )
        if restores:
            work.quiet = postgres.quiet_inserts(self.conn, restores, replica=replica)
        units = [*truncated, *deleted]
        try:
            try:
                xid = postgres.begin(self.conn, units, wait=self.settings.wait)
                work.run(self.conn)
            except BaseException:
                postgres.rollback(self.conn)
                raise
        except psycopg.errors.LockNotAvailable:
            raise self._busy(units) from None
        except psycopg.DatabaseError as exc:
            raise TruncateError(
                f"could not put {printable(self.target.dbname)!r} back before this test: "
                f"{exc.diag.message_primary or exc}; nothing was changed"
            ) from None
        # the rows put back, and the refreshed views, are the baseline now
        xmin = str(int(xid) % 2**32)
        for restore in restores:
            self._xmins[restore.leaf.oid] = {xmin}
        for view in views:
            self._xmins[view.oid] = {xmin}
        self._xmins_changed()
        if self.canary is not None:
            rewritten = {oid for t in truncated for oid in (t.oid, *(lf.oid for lf in t.leaves))}
            rewritten |= {v.oid for v in views}
            self.canary.accept(self.conn, rewritten)
        return CleanResult(
            tables=tuple(t.qualified for t in units),
            sequences=tuple(s.qualified for s in sequences),
            matviews=tuple(v.qualified for v in views),
            elapsed_ms=operations._ms(start),
        )

    def close(self) -> None:
        if self.owned and not self.conn.closed:
            self.conn.close()


__all__ = [
    "Canary",
    "CanarySnapshot",
    "CleanResult",
    "Cleaner",
    "SessionGuard",
    "WorkerDatabase",
    "WorkersResult",
    "prepare_workers",
    "reset_and_guard",
]
