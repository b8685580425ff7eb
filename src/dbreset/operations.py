"""The library verbs: ``migrate``, ``truncate``, ``reset``, ``status``, ``list``,
``drop``, ``mark``.

Each takes :class:`~dbreset.settings.Settings` and returns a frozen result; none
prints or exits. Errors are :class:`~dbreset.errors.DbResetError` subclasses.
A verb that is interrupted (Ctrl-C) raises :class:`~dbreset.errors.Interrupted`
saying what had committed by then.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from dbreset import database, migrations, postgres, pristine
from dbreset.errors import (
    JSON_SCHEMA,
    BusyError,
    ConfigError,
    ConnectError,
    DbResetError,
    Interrupted,
    MigrationError,
    SafetyError,
    TruncateError,
)
from dbreset.redact import first_line, printable

if TYPE_CHECKING:
    import psycopg

    from dbreset.reports import (
        DropResult,
        ListResult,
        MarkResult,
        Setting,
        StatusResult,
    )
    from dbreset.settings import Settings


#: ``progress("what is being done")`` is a context manager around a step that
#: may take long; the command line shows it after about a second, on a terminal.
Progress = Callable[[str], AbstractContextManager[object]]


def _no_progress(label: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    def to_dict(self) -> dict[str, Any]:
        return {"schema": JSON_SCHEMA, **asdict(self)}


@dataclass(frozen=True)
class TableRows:
    table: str
    rows: int
    #: True when there were more rows than were counted
    more: bool = False
    #: "truncate" or "delete" (few rows, no triggers or rules: same end state,
    #: faster); None where nothing is being emptied (status)
    how: str | None = "truncate"


@dataclass(frozen=True)
class Restored:
    """A table whose rows were put back as a fresh migration leaves them."""

    table: str
    rows: int


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
    #: sequences not called (PostgreSQL before 18 cannot tell cheaply whether
    #: ``setval(..., false)`` moved one) set to their baseline without being read
    sequences_put_back: int = 0
    #: seeded tables put back as a fresh migration leaves them (reset)
    restored: tuple[Restored, ...] = ()
    #: where the freshly migrated state came from; None: every table emptied
    baseline: str | None = None
    warnings: tuple[str, ...] = ()
    dry_run: bool = False
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class ResetResult(Result):
    target: str
    migrate: MigrateResult
    truncate: TruncateResult
    created: bool = False
    #: dropped and cloned again from the pristine database (``--recreate``)
    recreated: bool = False
    #: the pristine database used, and whether this reset built it
    pristine: str | None = None
    pristine_built: bool = False
    warnings: tuple[str, ...] = ()
    dry_run: bool = False
    elapsed_ms: float = 0.0


#: Results of the housekeeping verbs (status, list, drop, mark), defined in
#: :mod:`dbreset.reports` and loaded when first used: a reset has no need of them,
#: and each dataclass costs about half a millisecond to define.
_REPORTS = ("Setting", "StatusResult", "MadeDatabase", "ListResult", "DropResult", "MarkResult")


def __getattr__(name: str) -> Any:
    if name in _REPORTS:
        from dbreset import reports

        return getattr(reports, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


# --------------------------------------------------------------------------- journal


class Journal:
    """What has committed so far, to say the truth when interrupted."""

    def __init__(self) -> None:
        self.committed: list[str] = []

    def done(self, what: str) -> None:
        self.committed.append(what)

    def interrupted(self) -> Interrupted:
        if not self.committed:
            return Interrupted("interrupted; nothing was changed")
        return Interrupted(
            f"interrupted after {'; '.join(self.committed)} had committed; nothing else was "
            "changed: run the command again to finish"
        )


@contextlib.contextmanager
def _journal() -> Iterator[Journal]:
    journal = Journal()
    try:
        yield journal
    except KeyboardInterrupt:
        raise journal.interrupted() from None


# --------------------------------------------------------------------------- plumbing


def _target(settings: Settings) -> database.Target:
    target = database.make_target(settings.require_url())
    database.check_safety(target, settings)
    return target


def _project(settings: Settings, *, required: bool) -> migrations.Project | None:
    default = settings.sources.get("alembic_config", "default") == "default"
    if not required and default and not settings.alembic_config.exists():
        return None
    return migrations.load_project(settings.alembic_config)


def _excludes(settings: Settings) -> list[postgres.Exclude]:
    source = settings.sources.get("exclude", "--exclude")
    return [postgres.Exclude(pattern, source) for pattern in settings.exclude]


def _version_table(
    project: migrations.Project | None, cached: migrations.CachedHeads | None
) -> tuple[str, str]:
    if project is None:
        return migrations.DEFAULT_VERSION_TABLE
    if cached is not None and not project.version_table_from_ini:
        return cached.version_table
    return project.version_table_key


def _branch_template(settings: Settings) -> tuple[str, str, str]:
    """(database name as written, branch, worktree) when the URL has placeholders."""
    if not settings.url_template:
        return ("", "", "")
    from urllib.parse import unquote, urlsplit

    written = unquote(urlsplit(settings.url_template).path.lstrip("/"))
    return (written, settings.branch or "", settings.worktree or "")


class _Context:
    """One operation on one target: what it learns once, in its first query."""

    def __init__(
        self,
        settings: Settings,
        target: database.Target,
        project: migrations.Project | None,
        progress: Progress | None,
        journal: Journal,
    ) -> None:
        self.settings = settings
        self.target = target
        self.project = project
        self.progress = progress or _no_progress
        self.journal = journal
        self.fingerprint: str | None = None
        self.cached: migrations.CachedHeads | None = None
        if project is not None:
            self.fingerprint = migrations.fingerprint(project)
            self.cached = migrations.read_cache(project, self.fingerprint)
        self.version_table = _version_table(project, self.cached)
        self.probe: postgres.Probe | None = None
        #: the freshly migrated state a reset used
        self.baseline: pristine.Baseline | None = None

    def full_fingerprint(self) -> str:
        """The migrations' fingerprint, asking Alembic where the scripts are when
        only it knows (computed once: it reads every migration file)."""
        assert self.project is not None
        if self.fingerprint is None:
            self.fingerprint = migrations.fingerprint_of(self.project)
        return self.fingerprint

    def pristine_name(self) -> str:
        fingerprint = self.fingerprint or "none"
        return pristine.pristine_name(self.target.dbname, fingerprint)

    def first_query(self, conn: psycopg.Connection[Any]) -> postgres.Probe:
        self.probe = postgres.probe(
            conn, version_table=self.version_table, pristine=self.pristine_name()
        )
        return self.probe

    def guard(self, action: str = "empty") -> None:
        """The test-database guard, on what the first query found."""
        assert self.probe is not None
        database.check_test_database(
            self.probe.dbname, self.settings, database.parse_mark(self.probe.comment), action=action
        )


def _connect(ctx: _Context, role: str, *, create: bool = False) -> psycopg.Connection[Any]:
    """Connect to the target, creating it first (from the pristine database)
    when *create* and it does not exist; the context's first query is made."""
    try:
        conn = database.connect(ctx.target, ctx.settings, role=role)
    except ConnectError as exc:
        if not create or "does not exist" not in str(exc):
            raise
        _create_target(ctx)
        conn = database.connect(ctx.target, ctx.settings, role=role)
    try:
        ctx.first_query(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _create_target(ctx: _Context) -> None:
    """Create the missing target as a clone of its pristine database (so that
    it starts freshly migrated), or empty when there are no migrations to
    clone from. Two processes creating it at once take turns."""
    import psycopg
    from psycopg import sql

    target, settings = ctx.target, ctx.settings
    database.check_test_database(target.dbname, settings, None, action="create")
    with (
        database.connect_maintenance(target, settings, role="create") as conn,
        pristine.creating(conn, target.dbname, wait=settings.wait),
    ):
        if pristine.exists(conn, target.dbname) is not None:
            return  # created by someone else meanwhile
        template, branch, worktree = _branch_template(settings)
        mark = database.Mark(
            "created",
            template=template,
            branch=branch,
            worktree=worktree,
            made=database.now_iso(),
        )
        try:
            made = _ensure_pristine_for_create(ctx)
            if made is not None:
                ctx.fingerprint = made.baseline.fingerprint
                pristine.clone(
                    conn,
                    source=made.name,
                    name=target.dbname,
                    mark=mark._replace(fingerprint=made.baseline.fingerprint),
                )
            else:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
                pristine.set_mark(conn, target.dbname, mark)
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            return  # created by someone else meanwhile
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"cannot create database {printable(target.dbname)!r}: "
                f"{exc.diag.message_primary}; grant CREATEDB to this role or create it once by hand"
            ) from None
        except psycopg.errors.ReadOnlySqlTransaction:
            raise ConnectError(
                f"cannot create database {printable(target.dbname)!r}: {target.display} is a "
                "read-only server (a hot standby?); point the URL at the primary"
            ) from None
    ctx.journal.done(f"creating {printable(target.dbname)!r}")


def _ensure_pristine_for_create(ctx: _Context) -> pristine.Pristine | None:
    if ctx.project is None:
        return None
    try:
        return pristine.ensure(
            ctx.target,
            ctx.settings,
            ctx.project,
            fingerprint=ctx.full_fingerprint(),
            template=_branch_template(ctx.settings),
            progress=ctx.progress,
        )
    except pristine.NoPristine:
        return None


# --------------------------------------------------------------------------- migrate


def _migrate_locked(
    conn: psycopg.Connection[Any], ctx: _Context, *, dry_run: bool
) -> MigrateResult:
    start = time.perf_counter()
    project, target = ctx.project, ctx.target
    assert project is not None and ctx.probe is not None
    cached = ctx.cached
    version_table = ctx.version_table
    current = migrations.database_heads(conn, version_table, exists=ctx.probe.version_table_exists)
    label = printable(".".join(version_table))

    def result(heads: tuple[str, ...], **kw: Any) -> MigrateResult:
        return MigrateResult(
            target.masked_url,
            current,
            kw.pop("after", current),
            heads,
            kw.pop("upgraded", False),
            version_table=kw.pop("version_table", label),
            dry_run=dry_run,
            elapsed_ms=_ms(start),
            **kw,
        )

    if cached is not None and current == cached.heads:
        return result(current)
    heads = migrations.script_heads(project)
    if current == heads:
        migrations.write_cache(
            project, ctx.fingerprint, migrations.CachedHeads(heads, version_table)
        )
        return result(heads)
    unknown = migrations.unknown_revisions(project, current)
    if unknown:
        raise MigrationError(
            f"{printable(target.dbname)!r} is at revision {', '.join(unknown)}, which these "
            "migrations do not know (made on another branch?); rebuild it from the migrations "
            "with: dbreset reset --recreate"
        )
    if dry_run:
        return result(heads, pending=migrations.pending_revisions(project, current))
    try:
        with ctx.progress(f"migrating {printable(target.dbname)}"):
            outcome = migrations.upgrade_checked(
                project, target.url, ctx.settings, expect=ctx.probe.dbname, watch=conn
            )
    except BaseException:
        _note_migrated(conn, ctx, current)
        raise
    after = migrations.database_heads(conn, outcome.version_table)
    if after != heads:
        raise MigrationError(
            f"after the upgrade {target.display} is at {', '.join(after) or 'no revision'} "
            f"but the scripts' heads are {', '.join(heads)}: does env.py use another URL?"
        )
    ctx.journal.done(f"the migration to {', '.join(after)}")
    ctx.version_table = outcome.version_table
    migrations.write_cache(
        project, ctx.fingerprint, migrations.CachedHeads(heads, outcome.version_table)
    )
    return result(
        heads,
        after=after,
        upgraded=outcome.before != after,
        version_table=printable(".".join(outcome.version_table)),
    )


def _note_migrated(conn: psycopg.Connection[Any], ctx: _Context, before: tuple[str, ...]) -> None:
    """After a migration that failed or was interrupted: the revisions that had
    committed by then (env.py may commit each revision on its own, and Ctrl-C
    may come just after the last commit) go into the journal, so that the
    message says what is true."""
    import psycopg

    with contextlib.suppress(psycopg.Error, DbResetError):
        now = migrations.database_heads(conn, ctx.version_table)
        if now != before:
            ctx.journal.done(f"the migration to {', '.join(now) or 'no revision'}")


def migrate(settings: Settings, *, progress: Progress | None = None) -> MigrateResult:
    """Upgrade the database to the scripts' heads (skipped when already there)."""
    with _journal() as journal:
        target = _target(settings)
        project = _project(settings, required=True)
        ctx = _Context(settings, target, project, progress, journal)
        with (
            _connect(ctx, "migrate") as conn,
            database.exclusive_lock(conn, wait=settings.wait, target=target),
        ):
            return _migrate_locked(conn, ctx, dry_run=False)


# --------------------------------------------------------------------------- restore


class _Decision:
    """What a reset or truncate found, and the transaction that puts it right."""

    def __init__(self, plan: postgres.Plan) -> None:
        self.plan = plan
        self.counts: dict[int, int] = {}
        self.work = postgres.Emptying()
        self.restored: list[Restored] = []
        #: tables with seeded rows: reported as restored, not as emptied
        self.holding: frozenset[int] = frozenset()
        #: row versions of the seeded tables found as the baseline has them
        self.versions: dict[str, postgres.RowVersions] = {}


def _decide(
    conn: psycopg.Connection[Any],
    plan: postgres.Plan,
    baseline: pristine.Baseline | None,
    *,
    dry_run: bool,
    read_sequences: bool = True,
    recorded: Mapping[str, postgres.RowVersions] | None = None,
) -> _Decision:
    """Which tables are not as the baseline has them (every table empty, without
    one), and what puts them back. Without *read_sequences* every sequence is
    set to its baseline unread (the same end state, one query less; which ones
    had moved is not known then).

    Tables with pages are counted, except the small ones that DELETE would
    empty (their DELETE tells how many rows it removed); seeded tables are
    compared with their baseline's digest. A dry run counts them all.
    """
    decision = _Decision(plan)
    seeded = dict(baseline.tables) if baseline is not None else {}
    expected = dict(baseline.sequences) if baseline is not None else None
    pages = postgres.file_pages(conn, plan.tables)
    seeded_leaves = [leaf for t in plan.tables for leaf in t.leaves if leaf.key in seeded]
    recorded = recorded or {}
    trusted = postgres.unchanged(
        conn, [(leaf, recorded[leaf.key]) for leaf in seeded_leaves if leaf.key in recorded]
    )
    found = postgres.contents(conn, [leaf for leaf in seeded_leaves if leaf.oid not in trusted])
    changed_leaves: set[int] = set()
    for leaf in seeded_leaves:
        if leaf.oid in trusted:
            decision.versions[leaf.key] = recorded[leaf.key]
            continue
        base = seeded[leaf.key]
        now = found[leaf.oid]
        if now.columns != base.columns:
            raise TruncateError(
                f"{printable(leaf.key)} does not have the columns a fresh migration gives it "
                f"({printable(now.columns)} instead of {printable(base.columns)}), so its "
                "seeded rows cannot be put back; rebuild the database with: "
                "dbreset reset --recreate"
            )
        if (now.rows, now.digest) != (base.row_count, base.digest):
            changed_leaves.add(leaf.oid)
        elif now.versions is not None:
            decision.versions[leaf.key] = now.versions
    holding = plan.holding(seeded)
    small = {
        t.oid
        for t in plan.tables
        if 0 < pages.get(t.oid, 0) <= postgres.DELETE_MAX_PAGES and plan.deletable(t)
    }
    presumed = set() if dry_run else {t.oid for t in plan.tables if t.oid in small} - holding
    # the rows of tables (or, of a seeded partitioned table, leaves) with no baseline
    counted = [
        t._replace(leaves=tuple(leaf for leaf in t.leaves if leaf.key not in seeded))
        for t in plan.tables
        if t.oid in pages and t.oid not in presumed
    ]
    counts = postgres.row_counts(conn, [t for t in counted if t.leaves])
    dirty = [
        t
        for t in plan.tables
        if t.oid in presumed
        or counts.get(t.oid)
        or (t.has_truncate_trigger and baseline is None)  # as the usual hook would
        or any(leaf.oid in changed_leaves for leaf in t.leaves)
    ]
    replica = postgres.superuser(conn)
    truncated, deleted = plan.split(
        dirty,
        small,
        holding=frozenset(holding - {t.oid for t in dirty}),
        checked_keys=not replica,
    )
    emptied = {t.oid for t in (*truncated, *deleted)}
    # small tables that end up truncated after all: count them for the report
    counts.update(postgres.row_counts(conn, [t for t in truncated if t.oid in presumed]))
    restores: list[postgres.Restore] = []
    for leaf in plan.refill_order(emptied, seeded):
        base = seeded[leaf.key]
        restores.append(postgres.Restore(leaf, base.writable, base.rows, base.row_count))
        decision.restored.append(Restored(leaf.qualified, base.row_count))
    put_back: list[postgres.Sequence_] = []
    if not read_sequences and not dry_run:
        restart, put_back = set(), list(plan.sequences)
    elif dry_run or postgres.reads_sequence_state(conn):
        restart = postgres.dirty_sequences(conn, plan.sequences, expected)
    else:
        restart = postgres.called_sequences(conn, plan.sequences, expected)
        put_back = postgres.unsure_sequences(plan.sequences, restart, expected)
    work = postgres.Emptying(
        truncate=truncated,
        delete=deleted,
        restore=restores,
        replica=replica,
        restart=[s for s in plan.sequences if s.oid in restart],
        put_back=put_back,
        expected=expected,
    )
    if baseline is not None:
        work.matviews = _stale_matviews(conn, plan, baseline)
    elif any(t.oid not in presumed or counts.get(t.oid) for t in dirty):
        # Emptying a table with rows makes every populated materialized view
        # stale; else only those that are not empty are.
        work.matviews = [(v, True) for v in plan.matviews if v.populated]
    elif dirty:
        work.matviews_unless_clean = [v for v in plan.matviews if v.populated]
    else:
        stale = postgres.nonempty_matviews(conn, plan.matviews)
        work.matviews = [(v, True) for v in plan.matviews if v.oid in stale]
    if restores and not dry_run:
        work.quiet = postgres.quiet_inserts(conn, restores, replica=replica)
    decision.counts = counts
    decision.work = work
    decision.holding = holding
    return decision


def _stale_matviews(
    conn: psycopg.Connection[Any], plan: postgres.Plan, baseline: pristine.Baseline
) -> list[tuple[postgres.Matview, bool]]:
    """Materialized views that do not show what a fresh migration shows: only a
    refresh changes one, so one refreshed since is refreshed again (after the
    tables are put back), and one never refreshed still shows the baseline."""
    views = [v for v in plan.matviews if v.key in baseline.matviews]
    shown = postgres.contents(conn, [v for v in views if v.populated], only=False)
    stale: list[tuple[postgres.Matview, bool]] = []
    for view in views:
        want = baseline.matviews[view.key]
        if not want.populated:
            if view.populated:
                stale.append((view, False))
        elif not view.populated or (shown[view.oid].rows, shown[view.oid].digest) != (
            want.row_count,
            want.digest,
        ):
            stale.append((view, True))
    return stale


def _plan(
    conn: psycopg.Connection[Any], ctx: _Context, *, missing_ok: bool = False
) -> postgres.Plan:
    """What a reset of this target may touch, from the catalogs."""
    return postgres.plan_truncate(
        conn,
        schemas=ctx.settings.schemas,
        exclude=_excludes(ctx.settings),
        version_table=ctx.version_table,
        missing_ok=missing_ok,
    )


def _restore_locked(
    conn: psycopg.Connection[Any],
    ctx: _Context,
    baseline: pristine.Baseline | None,
    *,
    dry_run: bool,
    warnings: Sequence[str] = (),
    pending: bool = False,
    read_sequences: bool = True,
    plan: postgres.Plan | None = None,
) -> TruncateResult:
    """Put every chosen table and sequence where *baseline* has it (without one:
    empty, at its start), in one transaction, locking only what changes. The
    *plan* is made here unless the caller has made it."""
    import psycopg

    start = time.perf_counter()
    settings, target = ctx.settings, ctx.target
    if plan is None:
        plan = _plan(conn, ctx, missing_ok=pending)  # a dry run before the schema exists
    all_warnings = [*warnings]
    all_warnings += [f"{label} matched no table" for label in plan.unmatched_excludes]
    keep_versions = baseline is not None and ctx.probe is not None and ctx.probe.database_oid
    recorded = (
        pristine.recall_versions(target, ctx.probe.database_oid, baseline.digest)
        if keep_versions and baseline is not None and ctx.probe is not None
        else None
    )
    decision = _decide(
        conn, plan, baseline, dry_run=dry_run, read_sequences=read_sequences, recorded=recorded
    )
    work = decision.work

    def remember(xid: str | None = None) -> None:
        """What the next reset may trust without reading every seeded row: the
        tables found as the baseline has them, and those just put back (their
        rows all written by this reset's transaction, *xid*)."""
        if not keep_versions or baseline is None or ctx.probe is None:
            return
        restored = {r.leaf.key: r for r in work.restore}
        versions = {k: v for k, v in decision.versions.items() if k not in restored}
        if restored and xid is not None:
            with contextlib.suppress(psycopg.Error):
                nodes = postgres.filenodes(conn, [r.leaf.oid for r in restored.values()])
                for key, r in restored.items():
                    if r.leaf.oid in nodes:
                        versions[key] = postgres.RowVersions(
                            nodes[r.leaf.oid], r.row_count, (str(int(xid) % 2**32),)
                        )
        if versions != (recorded or {}):
            pristine.remember_versions(target, ctx.probe.database_oid, baseline.digest, versions)

    def result() -> TruncateResult:
        cap = postgres.ROW_COUNT_CAP
        counts = {**decision.counts, **work.deleted}
        for oid in decision.holding:
            counts[oid] = decision.counts.get(oid, 0)
        deleted = {t.oid for t in work.delete}
        restored_oids = {r.leaf.oid for r in work.restore}
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
            matviews_refreshed=tuple(v.qualified for v, _ in work.matviews),
            excluded=plan.excluded,
            kept_sequences=plan.kept_sequences,
            also_truncated=sum(
                1
                for t in work.truncate
                if not counts.get(t.oid) and not any(leaf.oid in restored_oids for leaf in t.leaves)
            ),
            sequences_put_back=len(work.put_back),
            restored=tuple(decision.restored),
            baseline=baseline.source if baseline is not None else None,
            warnings=tuple(all_warnings),
            dry_run=dry_run,
            elapsed_ms=_ms(start),
        )

    if dry_run:
        # what the DELETEs would report: the rows counted
        work.deleted.update({t.oid: decision.counts.get(t.oid, 0) for t in work.delete})
        return result()
    units = [*work.truncate, *work.delete]
    changes = units or work.restart or work.put_back or work.matviews
    if not changes and not work.matviews_unless_clean:
        remember()
        return result()
    postgres.check_lock_table(conn, work.truncate, work.delete)
    xid: str | None = None
    label = f"the reset of {printable(target.dbname)!r}"
    try:
        try:
            with ctx.progress(f"emptying {len(units)} tables of {printable(target.dbname)}"):
                xid = postgres.begin(conn, units, wait=settings.wait)
                work.run(conn)  # commits
        except BaseException as exc:
            if work.committing and xid is not None:
                outcome = _commit_outcome(conn, ctx, xid)
                if outcome == "committed":
                    ctx.journal.done(label)
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    return result()
                if outcome is None:
                    raise ConnectError(
                        f"the connection to {target.display} was lost while {label} was "
                        "committing: whether it committed is unknown; check with dbreset status"
                    ) from None
            postgres.rollback(conn)
            raise
    except psycopg.errors.LockNotAvailable:
        holders = postgres.blockers(conn, units)
        named = "; ".join(h.describe() for h in holders) or "they have gone since; try again"
        raise BusyError(
            f"could not lock the tables of {printable(target.dbname)!r} within {settings.wait:g}s, "
            f"other connections hold them: {named}. Close those sessions (an idle "
            "transaction still holds its locks) or pass --wait SECONDS"
        ) from None
    except psycopg.errors.InsufficientPrivilege as exc:
        primary = exc.diag.message_primary or ""
        fix = (
            "only its owner may refresh a materialized view: run as the owner"
            if "materialized view" in primary
            else "run as the tables' owner or GRANT TRUNCATE, DELETE, INSERT (and UPDATE on "
            "their sequences) to this role"
        )
        raise TruncateError(f"permission denied: {primary}; {fix}; nothing was changed") from None
    except psycopg.errors.OutOfMemory as exc:
        raise TruncateError(
            f"cannot empty {printable(target.dbname)!r}: {exc.diag.message_primary} "
            f"({exc.diag.message_hint or 'raise max_locks_per_transaction'}); nothing was changed"
        ) from None
    except psycopg.errors.ReadOnlySqlTransaction:
        raise TruncateError(
            f"cannot empty {printable(target.dbname)!r}: {target.display} is a read-only server "
            "(a hot standby?); point the URL at the primary. Nothing was changed"
        ) from None
    except psycopg.errors.QueryCanceled as exc:
        raise TruncateError(
            f"cannot empty {printable(target.dbname)!r}: {exc.diag.message_primary}; "
            "nothing was changed"
        ) from None
    except psycopg.OperationalError as exc:
        raise ConnectError(
            f"lost the connection to {target.display} before {label} committed: "
            f"{database.scrub(first_line(exc), target.url)}; nothing was changed"
        ) from None
    except psycopg.DatabaseError as exc:
        raise TruncateError(
            f"cannot empty {printable(target.dbname)!r}: {exc.diag.message_primary or exc}"
            + (f" ({exc.diag.message_detail})" if exc.diag.message_detail else "")
            + "; nothing was changed"
        ) from None
    ctx.journal.done(label)
    remember(xid)
    return result()


def _commit_outcome(conn: psycopg.Connection[Any], ctx: _Context, xid: str) -> str | None:
    """'committed', 'aborted', or None when nobody can tell (the server is gone)."""
    import psycopg

    def ask(c: psycopg.Connection[Any]) -> str | None:
        row = c.execute(postgres.XACT_STATUS_SQL, (xid,)).fetchone()
        return str(row[0]) if row and row[0] else None

    with contextlib.suppress(psycopg.Error, DbResetError):
        if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return ask(conn)
    with (
        contextlib.suppress(psycopg.Error, DbResetError),
        database.connect(ctx.target, ctx.settings, role="status") as fresh,
    ):
        status = ask(fresh)
        return "aborted" if status == "in progress" else status
    return None


# --------------------------------------------------------------------------- truncate & reset


def truncate(
    settings: Settings, *, dry_run: bool = False, progress: Progress | None = None
) -> TruncateResult:
    """Empty every table of the chosen schemas and restart their sequences."""
    with _journal() as journal:
        target = _target(settings)
        project = _project(settings, required=False)
        ctx = _Context(settings, target, project, progress, journal)
        with _connect(ctx, "truncate") as conn:
            ctx.guard()
            if dry_run:
                return _restore_locked(conn, ctx, None, dry_run=True)
            with database.exclusive_lock(conn, wait=settings.wait, target=target):
                return _restore_locked(conn, ctx, None, dry_run=False)


class _Baseline:
    def __init__(
        self,
        baseline: pristine.Baseline | None,
        pristine_db: pristine.Pristine | None = None,
        warning: str | None = None,
    ) -> None:
        self.baseline = baseline
        self.pristine = pristine_db
        self.warning = warning


def _find_baseline(ctx: _Context, *, dry_run: bool) -> _Baseline:
    """The freshly migrated state of the target's migrations: from its pristine
    database (built when missing, except in a dry run), else remembered from
    when dbreset migrated the target itself from empty."""
    assert ctx.project is not None and ctx.probe is not None
    fingerprint = ctx.full_fingerprint()
    known: tuple[int | None, str | None] = (ctx.probe.pristine_oid, ctx.probe.pristine_comment)
    owner = ctx.target
    own = database.parse_mark(ctx.probe.comment)
    if own is not None and own.kind == "worker" and own.target:
        # a worker database reset on its own: its target's pristine database
        owner = database.make_target(database.with_dbname(ctx.target.url, own.target))
        known = (None, None)
    mark = database.parse_mark(known[1])
    if dry_run:
        found = pristine.load(mark.digest) if mark is not None and mark.digest else None
        if found is None:
            found = pristine.recall_for_target(ctx.target, ctx.probe.database_oid, fingerprint)
        note = None if found else "the pristine database would be built first"
        return _Baseline(found, None, note)
    try:
        made = pristine.ensure(
            owner,
            ctx.settings,
            ctx.project,
            fingerprint=fingerprint,
            known=known,
            template=_branch_template(ctx.settings),
            progress=ctx.progress,
        )
        return _Baseline(made.baseline, made)
    except pristine.NoPristine as exc:
        remembered = pristine.recall_for_target(ctx.target, ctx.probe.database_oid, fingerprint)
        if remembered is not None:
            return _Baseline(remembered)
        return _Baseline(None, None, pristine.no_pristine_note(ctx.target, str(exc)))


#: Whether a database holds any relation of its own (before a first migration).
HAS_RELATIONS_SQL = """
SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f')
                 AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%')
"""


def _reset_on(
    conn: psycopg.Connection[Any],
    ctx: _Context,
    *,
    dry_run: bool,
    created: bool,
    start: float,
) -> ResetResult:
    found = _find_baseline(ctx, dry_run=dry_run)
    was_empty = False
    if found.baseline is None and not dry_run:
        has = conn.execute(HAS_RELATIONS_SQL).fetchone()
        was_empty = has is not None and not has[0]
    migrated = _migrate_locked(conn, ctx, dry_run=dry_run)
    warnings = [found.warning] if found.warning else []
    baseline = found.baseline
    if baseline is None and was_empty and migrated.upgraded:
        # Migrated from empty by dbreset itself: this is the freshly migrated state.
        assert ctx.probe is not None and ctx.fingerprint is not None
        baseline = pristine.capture(
            conn,
            fingerprint=ctx.fingerprint,
            heads=migrated.after,
            version_table=ctx.version_table,
            source=f"{ctx.target.dbname} when dbreset migrated it from empty",
        )
        pristine.remember_for_target(ctx.target, ctx.probe.database_oid, baseline)
        warnings = []
    ctx.baseline = baseline
    emptied = _restore_locked(
        conn, ctx, baseline, dry_run=dry_run, warnings=warnings, pending=bool(migrated.pending)
    )
    return ResetResult(
        ctx.target.masked_url,
        migrated,
        emptied,
        created=created,
        pristine=found.pristine.name if found.pristine else None,
        pristine_built=bool(found.pristine and found.pristine.built),
        warnings=emptied.warnings,
        dry_run=dry_run,
        elapsed_ms=_ms(start),
    )


def reset(
    settings: Settings,
    *,
    dry_run: bool = False,
    create: bool = False,
    recreate: bool = False,
    progress: Progress | None = None,
) -> ResetResult:
    """Migrate to head and put the database back as a fresh migration leaves it:
    seeded rows as the migrations leave them, every other row gone, every
    sequence where a fresh migration leaves it. ``recreate`` drops the database
    and clones it again from the pristine database."""
    start = time.perf_counter()
    with _journal() as journal:
        target = _target(settings)
        project = _project(settings, required=True)
        ctx = _Context(settings, target, project, progress, journal)
        if recreate and not dry_run:
            return _recreate(ctx, start)
        created_before = len(journal.committed)
        conn = _connect(ctx, "reset", create=create and not dry_run)
        created = len(journal.committed) > created_before
        with conn:
            ctx.guard()
            if dry_run:
                return _reset_on(conn, ctx, dry_run=True, created=False, start=start)
            with database.exclusive_lock(conn, wait=settings.wait, target=target):
                return _reset_on(conn, ctx, dry_run=False, created=created, start=start)


def _recreate(ctx: _Context, start: float) -> ResetResult:
    """Drop the target and clone it from the pristine database: for a database
    at a revision these migrations do not know (another branch's)."""
    import psycopg

    target, settings = ctx.target, ctx.settings
    assert ctx.project is not None
    fingerprint = ctx.full_fingerprint()
    try:
        conn = database.connect(target, settings, role="reset")
    except ConnectError as exc:
        if "does not exist" not in str(exc):
            raise
        conn = None
    mark = database.Mark("created", made=database.now_iso())
    keep: str | None = None
    if conn is not None:
        with conn:
            probe = ctx.first_query(conn)
            ctx.guard(action="recreate")
            old = database.parse_mark(probe.comment)
            if old is not None:
                mark = old._replace(kind="created" if old.kind != "marked" else "marked")
            keep = probe.comment
            with database.exclusive_lock(conn, wait=settings.wait, target=target):
                made = pristine.ensure(
                    target,
                    settings,
                    ctx.project,
                    fingerprint=fingerprint,
                    known=(probe.pristine_oid, probe.pristine_comment),
                    template=_branch_template(settings),
                    progress=ctx.progress,
                )
    else:
        database.check_test_database(target.dbname, settings, None, action="create")
        made = pristine.ensure(
            target,
            settings,
            ctx.project,
            fingerprint=fingerprint,
            template=_branch_template(settings),
            progress=ctx.progress,
        )
    template, branch, worktree = _branch_template(settings)
    mark = mark._replace(
        fingerprint=fingerprint,
        made=database.now_iso(),
        template=template or mark.template,
        branch=branch or mark.branch,
        worktree=worktree or mark.worktree,
    )
    with (
        database.connect_maintenance(target, settings, role="reset") as admin,
        pristine.creating(admin, target.dbname, wait=settings.wait),
    ):
        if conn is not None:
            pristine.drop_database(admin, target.dbname)
            ctx.journal.done(f"dropping {printable(target.dbname)!r}")
        try:
            pristine.clone(admin, source=made.name, name=target.dbname, mark=mark, retries=20)
            if keep and mark.kind == "marked":
                pristine.set_mark(admin, target.dbname, mark, keep)
        except psycopg.Error as exc:
            raise TruncateError(
                f"{printable(target.dbname)!r} was dropped but could not be cloned from "
                f"{printable(made.name)!r}: {exc}; run dbreset reset --create"
            ) from None
    ctx.journal.done(f"cloning {printable(target.dbname)!r}")
    label = printable(".".join(ctx.version_table))
    heads = made.baseline.heads
    migrated = MigrateResult(target.masked_url, (), heads, heads, False, version_table=label)
    emptied = TruncateResult(target.masked_url, (), 0, (), (), (), baseline=made.baseline.source)
    return ResetResult(
        target.masked_url,
        migrated,
        emptied,
        created=True,
        recreated=True,
        pristine=made.name,
        pristine_built=made.built,
        elapsed_ms=_ms(start),
    )


# --------------------------------------------------------------------------- status


def _typed_settings(settings: Settings) -> dict[str, Setting]:
    from dbreset.reports import Setting

    def value(key: str) -> Any:
        raw = getattr(settings, key)
        if key in ("url", "url_template"):
            return database.mask_url(raw) if raw else None
        if key == "alembic_config":
            return str(raw)
        if isinstance(raw, tuple):
            return list(raw)
        return raw

    keys = (
        "url",
        "url_env",
        "alembic_config",
        "schemas",
        "exclude",
        "allowed_hosts",
        "allow_remote",
        "wait",
        "export_env",
        "allowed_databases",
    )
    shown = {key: Setting(value(key), settings.sources.get(key, "default")) for key in keys}
    if settings.url_template:
        shown["url_template"] = Setting(value("url_template"), settings.sources.get("url", ""))
        shown["branch"] = Setting(settings.branch, "git")
    return shown


def status(settings: Settings) -> StatusResult:
    """Where the database stands: revision, leftover rows, who holds it, settings."""
    from dbreset.reports import StatusResult

    with _journal() as journal:
        target = _target(settings)
        project = _project(settings, required=False)
        ctx = _Context(settings, target, project, None, journal)
        with _connect(ctx, "status") as conn:
            assert ctx.probe is not None
            server = conn.execute(postgres.SERVER_SQL).fetchone()
            assert server is not None
            version, dbname = server
            heads: tuple[str, ...] = ()
            if project is not None:
                cached = ctx.cached
                heads = cached.heads if cached else migrations.script_heads(project)
            current = migrations.database_heads(
                conn, ctx.version_table, exists=ctx.probe.version_table_exists
            )
            unknown: tuple[str, ...] = ()
            if project is not None and current != heads:
                unknown = migrations.unknown_revisions(project, current)
            problem = None
            if unknown:
                problem = (
                    f"the database is at {', '.join(unknown)}, which these migrations do not "
                    "know (made on another branch?): dbreset reset --recreate rebuilds it"
                )
            nonempty: tuple[TableRows, ...] = ()
            seeded_changed: tuple[str, ...] = ()
            checked = 0
            baseline: pristine.Baseline | None = None
            if project is not None and not unknown:
                with contextlib.suppress(DbResetError):
                    baseline = _find_baseline(ctx, dry_run=True).baseline
            try:
                plan = postgres.plan_truncate(
                    conn,
                    schemas=settings.schemas,
                    exclude=_excludes(settings),
                    version_table=ctx.version_table,
                )
                decision = _decide(conn, plan, baseline, dry_run=True)
                counts = decision.counts
                cap = postgres.ROW_COUNT_CAP
                nonempty = tuple(
                    TableRows(t.qualified, min(counts[t.oid], cap), counts[t.oid] > cap, None)
                    for t in plan.tables
                    if counts.get(t.oid)
                )
                seeded_changed = tuple(r.table for r in decision.restored)
                checked = len(plan.tables)
            except (TruncateError, ConfigError) as exc:
                problem = str(exc)
            holders = tuple(
                ("test session " if h.mode == "ShareLock" else "reset ") + h.describe()
                for h in database.lock_holders(conn)
            )
            mark = database.parse_mark(ctx.probe.comment)
            why: str | None = None
            if database.looks_like_test_name(dbname):
                why = "its name contains 'test'"
            elif mark is not None:
                why = f"dbreset's mark ({mark.kind})"
            elif any(fnmatchcase(dbname, p) for p in settings.allowed_databases):
                why = "allowed_databases"
    return StatusResult(
        target=target.masked_url,
        server_version=version,
        database=printable(dbname),
        current=current,
        heads=heads,
        at_head=current == heads,
        nonempty=nonempty,
        tables_checked=checked,
        holders=tuple(printable(h) for h in holders),
        settings=_typed_settings(settings),
        problem=problem,
        unknown_revisions=unknown,
        test_database=why,
        seeded_changed=seeded_changed,
        baseline=baseline.source if baseline is not None else None,
    )


# --------------------------------------------------------------------------- list, drop, mark


def _family(
    conn: psycopg.Connection[Any], ctx: _Context
) -> list[tuple[pristine.MadeDatabase, str | None]]:
    """Databases dbreset made for this target (and, for a URL with ``{branch}``,
    for the other branches), each with why it is stale, if it is."""
    settings, target = ctx.settings, ctx.target
    template, _, _ = _branch_template(settings)
    made = pristine.marked_databases(conn)
    branches: set[str] | None = None
    if template:
        from pathlib import Path

        from dbreset import gitinfo

        checkout = gitinfo.find_checkout(Path.cwd())
        branches = gitinfo.local_branches(checkout) if checkout else None
    siblings = {
        m.name
        for m in made
        if template and m.mark.template == template and m.mark.kind in ("created", "marked")
    } | {target.dbname}
    # A worker database reset on its own (dbreset reset --url <db>_gw0) gets a
    # pristine database of its own: that belongs to the family too.
    siblings |= {m.name for m in made if m.mark.kind == "worker" and m.mark.target in siblings}
    out: list[tuple[pristine.MadeDatabase, str | None]] = []
    for db in made:
        mark = db.mark
        owner = mark.target or db.name
        if owner not in siblings:
            continue
        if db.name == target.dbname:
            continue  # the target itself is never listed for dropping
        stale: str | None = None
        ours = mark.kind in ("pristine", "worker") and owner == target.dbname
        if ours and ctx.fingerprint and mark.fingerprint != ctx.fingerprint:
            stale = "made from other migrations"
        if mark.kind == "building" and not db.connections:
            stale = "a build that did not finish"
        branch = mark.branch
        if owner != target.dbname:
            owner_mark = next((m.mark for m in made if m.name == owner), None)
            branch = branch or (owner_mark.branch if owner_mark else "")
        gone = branches is not None and branch and branch not in branches
        if gone and branch != settings.branch:
            stale = f"branch {branch!r} no longer exists"
        out.append((db, stale))
    return out


def _family_context(settings: Settings, journal: Journal) -> _Context:
    """For list and drop: the target, and the migrations' fingerprint if known."""
    target = _target(settings)
    project = _project(settings, required=False)
    ctx = _Context(settings, target, project, None, journal)
    if project is not None:
        with contextlib.suppress(DbResetError):
            ctx.full_fingerprint()
    return ctx


def list_databases(settings: Settings) -> ListResult:
    """Every database dbreset made on the server for this target: pristine and
    worker databases (and other branches' when the URL has ``{branch}``)."""
    from dbreset.reports import ListResult, MadeDatabase

    with _journal() as journal:
        ctx = _family_context(settings, journal)
        target = ctx.target
        with database.connect_maintenance(target, settings, role="list") as conn:
            family = _family(conn, ctx)
    listed = []
    for db, stale in family:
        mark = db.mark
        current: bool | None = None
        if mark.kind in ("pristine", "worker") and ctx.fingerprint:
            current = mark.fingerprint == ctx.fingerprint
        listed.append(
            MadeDatabase(
                name=printable(db.name),
                kind=mark.kind,
                size_bytes=db.size,
                fingerprint=mark.fingerprint or None,
                revision=mark.heads,
                current=current,
                made=mark.made or None,
                last_used=mark.used or mark.made or None,
                connections=db.connections,
                branch=printable(mark.branch) if mark.branch else None,
                stale=stale,
            )
        )
    return ListResult(target.masked_url, ctx.fingerprint, tuple(listed))


def drop(
    settings: Settings, *, stale: bool = False, every: bool = False, dry_run: bool = False
) -> DropResult:
    """Drop databases dbreset made for this target: the ``stale`` ones (other
    migrations, gone branches, abandoned builds) or ``every`` one. Never the
    target, never a database without dbreset's mark."""
    from dbreset.reports import DropResult

    if stale == every:
        raise ConfigError("say which databases to drop: --stale or --all")
    with _journal() as journal:
        ctx = _family_context(settings, journal)
        target = ctx.target
        try:
            conn: psycopg.Connection[Any] | None = database.connect(target, settings, role="drop")
        except ConnectError as exc:
            if "does not exist" not in str(exc):
                raise
            conn = None
        lock = (
            database.exclusive_lock(conn, wait=settings.wait, target=target)
            if conn is not None
            else contextlib.nullcontext()
        )
        dropped: list[str] = []
        kept: list[str] = []
        with contextlib.ExitStack() as stack:
            if conn is not None:
                stack.enter_context(conn)
            stack.enter_context(lock)
            admin = stack.enter_context(database.connect_maintenance(target, settings, role="drop"))
            for db, why in _family(admin, ctx):
                if stale and why is None:
                    continue
                if db.connections:
                    kept.append(f"{printable(db.name)} (in use: {db.connections} connections)")
                    continue
                if dry_run:
                    dropped.append(printable(db.name))
                    continue
                try:
                    pristine.drop_database(admin, db.name, template=db.is_template)
                except BusyError as exc:
                    kept.append(f"{printable(db.name)} ({exc})")
                    continue
                dropped.append(printable(db.name))
                journal.done(f"dropping {printable(db.name)!r}")
    return DropResult(target.masked_url, tuple(dropped), tuple(kept), dry_run=dry_run)


def mark(settings: Settings) -> MarkResult:
    """Declare the target a test database: dbreset's mark in its comment (the
    user's own comment is kept)."""
    import psycopg

    from dbreset.reports import MarkResult

    with _journal() as journal:
        target = _target(settings)
        ctx = _Context(settings, target, None, None, journal)
        with _connect(ctx, "mark") as conn:
            assert ctx.probe is not None
            old = database.parse_mark(ctx.probe.comment)
            if old is not None:
                return MarkResult(target.masked_url, printable(ctx.probe.dbname), True)
            try:
                pristine.set_mark(
                    conn,
                    ctx.probe.dbname,
                    database.Mark("marked", made=database.now_iso()),
                    ctx.probe.comment,
                )
            except psycopg.errors.InsufficientPrivilege as exc:
                raise SafetyError(
                    f"cannot mark {printable(ctx.probe.dbname)!r}: {exc.diag.message_primary}; "
                    "run dbreset mark as the database's owner, or list it in allowed_databases"
                ) from None
    return MarkResult(target.masked_url, printable(ctx.probe.dbname), False)
