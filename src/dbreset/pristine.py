"""The freshly migrated state, and every database dbreset makes.

For a target and a migration fingerprint, dbreset keeps on the same server a
*pristine database*: migrated from empty to the heads by the user's own
``env.py``, marked as a template that nobody may connect to, never a target.
Its *baseline* -- the rows of every relation that holds any after migrating,
every sequence's state, every materialized view's -- is read once, when it is
built, and kept in the user's cache directory under its own digest (content
addressed: the same migrations give the same file, wherever they run). The
pristine database's comment holds the digest, so a reset finds both in the
query it makes anyway, and a cache that lost the file reads it again from the
pristine database. Worker databases are clones of it.

Why the cache directory and not the database: a reset must not open a second
connection (the pristine database cannot be cloned while anyone is connected),
nor store anything in the user's databases; and the rows would swell the
server's catalog of database comments, which ``\\l+`` prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from dbreset import database, postgres
from dbreset.database import Mark, derived_name, parse_mark
from dbreset.errors import BusyError, ConnectError, DbResetError
from dbreset.redact import printable

if TYPE_CHECKING:
    import psycopg

    from dbreset.migrations import Project
    from dbreset.settings import Settings

BASELINE_VERSION = 1
#: Advisory lock key, in the maintenance database, of "creating this database":
#: classid is dbreset's, objid a hash of the database name.
FAMILY_CLASSID = database.LOCK_CLASSID + 1
#: A database that has been "building" this long was left by a process that died.
STALE_BUILD = timedelta(minutes=30)


class SeededRows(NamedTuple):
    """The rows of one relation after migrating from empty."""

    #: columns: names, types, generated or not (see postgres.COLUMNS_SQL)
    columns: str
    #: the columns written back (generated columns are computed again)
    writable: tuple[str, ...]
    row_count: int
    digest: str
    #: the text of an array of the relation's row type
    rows: str


class MatviewState(NamedTuple):
    populated: bool
    row_count: int = 0
    digest: str = ""


class Baseline(NamedTuple):
    """What a fresh migration leaves, relation by relation (keys ``schema.name``)."""

    fingerprint: str
    heads: tuple[str, ...]
    tables: Mapping[str, SeededRows] = MappingProxyType({})
    sequences: Mapping[str, postgres.Expected] = MappingProxyType({})
    matviews: Mapping[str, MatviewState] = MappingProxyType({})
    #: where it was read: a pristine database, or the target migrated from empty
    source: str = ""
    #: its digest, when already known (:func:`load` checked it): hashing every
    #: seeded row again costs milliseconds on a large baseline
    known_digest: str = ""

    def body(self) -> dict[str, Any]:
        return {
            "tables": {k: list(v) for k, v in sorted(self.tables.items())},
            "sequences": {k: list(v) for k, v in sorted(self.sequences.items())},
            "matviews": {k: list(v) for k, v in sorted(self.matviews.items())},
        }

    @property
    def digest(self) -> str:
        if self.known_digest:
            return self.known_digest
        text = json.dumps([self.fingerprint, self.body()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": BASELINE_VERSION,
                "fingerprint": self.fingerprint,
                "heads": list(self.heads),
                "source": self.source,
                **self.body(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Baseline:
        data = json.loads(text)
        if data.get("v") != BASELINE_VERSION:
            raise ValueError("another baseline version")
        return cls(
            fingerprint=data["fingerprint"],
            heads=tuple(data["heads"]),
            tables={
                k: SeededRows(v[0], tuple(v[1]), int(v[2]), v[3], v[4])
                for k, v in data["tables"].items()
            },
            sequences={
                k: postgres.Expected(int(v[0]), bool(v[1])) for k, v in data["sequences"].items()
            },
            matviews={
                k: MatviewState(bool(v[0]), int(v[1]), str(v[2]))
                for k, v in data["matviews"].items()
            },
            source=data.get("source", ""),
        )

    @property
    def seeded(self) -> list[str]:
        return sorted(self.tables)


def capture(
    conn: psycopg.Connection[Any],
    *,
    fingerprint: str,
    heads: tuple[str, ...],
    version_table: tuple[str, str],
    source: str,
) -> Baseline:
    """Read the baseline of a database that was just migrated from empty."""
    rows = conn.execute(postgres.BASELINE_RELATIONS_SQL).fetchall()
    leaves = [
        postgres.Leaf(oid, schema, name, postgres.quote(conn, schema, name))
        for oid, schema, name, kind, _ in rows
        if kind == "r" and (schema, name) != version_table
    ]
    views = [
        postgres.Matview(oid, schema, name, postgres.quote(conn, schema, name), populated)
        for oid, schema, name, kind, populated in rows
        if kind == "m"
    ]
    found = postgres.contents(conn, leaves)
    seeded = [leaf for leaf in leaves if found[leaf.oid].rows]
    texts = postgres.rows_text(conn, seeded)
    writable = _writable_columns(conn, [leaf.oid for leaf in seeded])
    tables = {
        leaf.key: SeededRows(
            found[leaf.oid].columns,
            writable.get(leaf.oid, ()),
            found[leaf.oid].rows,
            found[leaf.oid].digest,
            texts[leaf.oid],
        )
        for leaf in seeded
    }
    shown = postgres.contents(conn, [v for v in views if v.populated], only=False)
    matviews = {
        v.key: MatviewState(True, shown[v.oid].rows, shown[v.oid].digest)
        if v.populated
        else MatviewState(False)
        for v in views
    }
    seqs = conn.execute(postgres.BASELINE_SEQUENCES_SQL).fetchall()
    quoted = [(oid, postgres.quote(conn, schema, name)) for oid, schema, name in seqs]
    states = postgres.sequence_states(conn, quoted)
    sequences = {postgres._key(schema, name): states[oid] for oid, schema, name in seqs}
    return Baseline(fingerprint, heads, tables, sequences, matviews, source)


def _writable_columns(conn: psycopg.Connection[Any], oids: list[int]) -> dict[int, tuple[str, ...]]:
    if not oids:
        return {}
    rows = conn.execute(
        "SELECT attrelid, array_agg(attname::text ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = ANY(%s::oid[]) AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = '' GROUP BY attrelid",
        (oids,),
    ).fetchall()
    return {oid: tuple(cols) for oid, cols in rows}


# --------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    from dbreset.migrations import _cache_dir

    return _cache_dir()


def _baseline_file(digest: str) -> Path:
    return cache_dir() / f"baseline-{digest[:40]}.json"


def save(baseline: Baseline) -> str:
    """Keep *baseline* in the cache directory; its digest."""
    digest = baseline.digest
    path = _baseline_file(digest)
    if path.is_file():
        return digest
    with contextlib.suppress(OSError):  # a cache we cannot write only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(baseline.to_json())
        tmp.replace(path)
    return digest


def load(digest: str) -> Baseline | None:
    """The cached baseline with this digest, if it is there and intact."""
    try:
        baseline = Baseline.from_json(_baseline_file(digest).read_text())
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return baseline._replace(known_digest=digest) if baseline.digest == digest else None


def _target_file(target: database.Target, database_oid: int) -> Path:
    where = f"{target.display}@{database_oid}"
    return cache_dir() / f"target-{hashlib.sha256(where.encode()).hexdigest()[:24]}.json"


def remember_for_target(target: database.Target, database_oid: int, baseline: Baseline) -> None:
    """A baseline read from the target itself (migrated from empty by dbreset,
    without a pristine database): found again by target and fingerprint."""
    digest = save(baseline)
    path = _target_file(target, database_oid)
    with contextlib.suppress(OSError):
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known[baseline.fingerprint] = digest
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(path)


def recall_for_target(
    target: database.Target, database_oid: int, fingerprint: str
) -> Baseline | None:
    try:
        known = json.loads(_target_file(target, database_oid).read_text())
        digest = known[fingerprint]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return load(str(digest))


def _versions_file(target: database.Target, database_oid: int) -> Path:
    where = f"{target.display}@{database_oid}"
    return cache_dir() / f"versions-{hashlib.sha256(where.encode()).hexdigest()[:24]}.json"


def recall_versions(
    target: database.Target, database_oid: int, digest: str
) -> dict[str, postgres.RowVersions]:
    """The row versions of the target's seeded tables when a reset last found
    them as the baseline *digest* has them."""
    try:
        data = json.loads(_versions_file(target, database_oid).read_text())
        if data.get("baseline") != digest:
            return {}
        return {
            key: postgres.RowVersions(int(v[0]), int(v[1]), tuple(str(x) for x in v[2]))
            for key, v in data["tables"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def remember_versions(
    target: database.Target,
    database_oid: int,
    digest: str,
    versions: Mapping[str, postgres.RowVersions],
) -> None:
    path = _versions_file(target, database_oid)
    payload = {"baseline": digest, "tables": {k: list(v) for k, v in sorted(versions.items())}}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)


# --------------------------------------------------------------------------- names


def pristine_name(target_db: str, fingerprint: str) -> str:
    return derived_name(target_db, f"pristine_{fingerprint[:10]}")


def worker_name(target_db: str, worker: str) -> str:
    return derived_name(target_db, worker)


def family_key(name: str) -> int:
    """A 31-bit advisory lock key for creating database *name*."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# --------------------------------------------------------------------------- databases


class MadeDatabase(NamedTuple):
    """A database that carries dbreset's mark, as ``dbreset list`` shows it."""

    name: str
    oid: int
    mark: Mark
    size: int | None
    connections: int
    is_template: bool


def marked_databases(conn: psycopg.Connection[Any]) -> list[MadeDatabase]:
    out: list[MadeDatabase] = []
    for name, oid, comment, size, connections, is_template in conn.execute(
        postgres.MARKED_DATABASES_SQL
    ):
        mark = parse_mark(comment)
        if mark is not None:
            out.append(MadeDatabase(name, oid, mark, size, connections, is_template))
    return out


def set_mark(conn: psycopg.Connection[Any], name: str, mark: Mark, keep: str | None = None) -> None:
    from psycopg import sql

    conn.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name), sql.Literal(mark.to_comment(keep))
        )
    )


def _ident(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(name)


def drop_database(conn: psycopg.Connection[Any], name: str, *, template: bool = False) -> None:
    """DROP DATABASE (never FORCE: a connected session is named, not killed)."""
    import psycopg
    from psycopg import sql

    try:
        if template:
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(_ident(name)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(_ident(name)))
    except psycopg.errors.ObjectInUse:
        raise BusyError(
            f"cannot drop {printable(name)!r}: {_sessions(conn, name)}; close them and try again"
        ) from None


def _sessions(conn: psycopg.Connection[Any], name: str) -> str:
    rows = conn.execute(
        "SELECT pid, coalesce(application_name, ''), "
        "coalesce(client_hostname, host(client_addr), 'local socket'), coalesce(state, ''), "
        "backend_start, '', '' FROM pg_stat_activity WHERE datname = %s",
        (name,),
    ).fetchall()
    held = [database.Holder(*row).describe() for row in rows]
    return "other sessions are connected to it: " + ("; ".join(held) or "(gone since)")


def clone(
    conn: psycopg.Connection[Any], *, source: str, name: str, mark: Mark, retries: int = 20
) -> None:
    """CREATE DATABASE *name* TEMPLATE *source*, and mark it. A template in use
    (someone reading it) is waited for, briefly."""
    import psycopg
    from psycopg import sql

    statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(_ident(name), _ident(source))
    for attempt in range(retries):
        try:
            conn.execute(statement)
            break
        except psycopg.errors.ObjectInUse:
            if attempt == retries - 1:
                raise BusyError(
                    f"cannot clone {printable(source)!r}: {_sessions(conn, source)}"
                ) from None
            time.sleep(0.05 * (attempt + 1))
    set_mark(conn, name, mark)


@contextlib.contextmanager
def creating(conn: psycopg.Connection[Any], name: str, *, wait: float) -> Iterator[None]:
    """Hold "creating *name*" (an advisory lock in the maintenance database), so
    that two processes creating one database take turns."""
    import psycopg

    key = family_key(name)
    got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (FAMILY_CLASSID, key)).fetchone() == (
        True,
    )
    if not got:
        try:
            conn.execute(f"SET lock_timeout = {max(1, int(wait * 1000))}")
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (FAMILY_CLASSID, key))
        except psycopg.errors.LockNotAvailable:
            raise BusyError(
                f"another process has been creating {printable(name)!r} for over {wait:g}s; "
                "wait for it, or pass --wait SECONDS"
            ) from None
        finally:
            conn.execute("RESET lock_timeout")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (FAMILY_CLASSID, key))


def exists(conn: psycopg.Connection[Any], name: str) -> tuple[int, Mark | None] | None:
    row = conn.execute(
        "SELECT oid, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None
    return int(row[0]), parse_mark(row[1])


# --------------------------------------------------------------------------- the pristine database


class Pristine(NamedTuple):
    name: str
    baseline: Baseline
    #: True when this call built it
    built: bool = False


class NoPristine(DbResetError):
    """No pristine database can be made here (no CREATEDB): the caller decides."""

    exit_code = 2


def ensure(
    target: database.Target,
    settings: Settings,
    project: Project,
    *,
    fingerprint: str,
    known: tuple[int | None, str | None] = (None, None),
    template: tuple[str, str, str] = ("", "", ""),
    progress: Any = None,
) -> Pristine:
    """The pristine database of *target* for *fingerprint* and its baseline:
    found (its oid and comment are *known* from the target's first query), read
    again from it when the cache lost the baseline, or built. Building drops the
    pristine databases of older fingerprints."""
    name = pristine_name(target.dbname, fingerprint)
    oid, comment = known
    mark = parse_mark(comment)
    if oid is not None and mark is not None and mark.kind == "pristine" and mark.digest:
        baseline = load(mark.digest)
        if baseline is not None:
            return Pristine(name, baseline)
    with database.connect_maintenance(target, settings, role="pristine") as conn:
        found = exists(conn, name)
        if found is not None and found[1] is not None and found[1].kind == "pristine":
            baseline = load(found[1].digest) if found[1].digest else None
            if baseline is None:
                baseline = _read_back(conn, target, settings, name, fingerprint, found[1])
            return Pristine(name, baseline)
        step = progress("building the pristine database") if progress else contextlib.nullcontext()
        with step:
            baseline = _build(conn, target, settings, project, name, fingerprint, template)
        _drop_older(conn, target.dbname, fingerprint)
        return Pristine(name, baseline, built=True)


def _read_back(
    conn: psycopg.Connection[Any],
    target: database.Target,
    settings: Settings,
    name: str,
    fingerprint: str,
    mark: Mark,
) -> Baseline:
    """The baseline of an existing pristine database whose cache file is gone."""
    from psycopg import sql

    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(_ident(name)))
    try:
        with database.connect(target, settings, role="pristine", dbname=name) as source:
            baseline = capture(
                source,
                fingerprint=fingerprint,
                heads=mark.heads,
                version_table=_version_table_of(source),
                source=f"pristine database {name}",
            )
    finally:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(_ident(name)))
    save(baseline)
    return baseline


def _version_table_of(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """The version table of a migrated database: the table holding a version_num."""
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE a.attname = 'version_num' "
        "AND c.relkind = 'r' AND n.nspname NOT LIKE 'pg\\_%' ORDER BY c.oid LIMIT 1"
    ).fetchone()
    return (str(row[0]), str(row[1])) if row else ("public", "alembic_version")


def _build(
    conn: psycopg.Connection[Any],
    target: database.Target,
    settings: Settings,
    project: Project,
    name: str,
    fingerprint: str,
    template: tuple[str, str, str],
) -> Baseline:
    """Migrate a new database from empty under a temporary name, read its
    baseline, then publish it under *name*: a build that fails is dropped, and
    one that was interrupted is never used (its mark says "building")."""
    import psycopg
    from psycopg import sql

    from dbreset import migrations

    _drop_abandoned_builds(conn, target.dbname)
    building = derived_name(target.dbname, f"building_{secrets.token_hex(3)}")
    try:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(_ident(building)))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise NoPristine(f"cannot create a pristine database: {exc.diag.message_primary}") from None
    except psycopg.errors.ReadOnlySqlTransaction:
        raise ConnectError(
            f"cannot create databases on {target.display}: it is a read-only server (a hot "
            "standby?); point the URL at the primary"
        ) from None
    try:
        set_mark(conn, building, Mark("building", target=target.dbname, made=database.now_iso()))
        url = database.with_dbname(target.url, building)
        outcome = migrations.upgrade_checked(project, url, settings, expect=building)
        with database.connect(target, settings, role="pristine", dbname=building) as source:
            heads = migrations.database_heads(source, outcome.version_table)
            baseline = capture(
                source,
                fingerprint=fingerprint,
                heads=heads,
                version_table=outcome.version_table,
                source=f"pristine database {name}",
            )
        digest = save(baseline)
        branch_template, branch, worktree = template
        mark = Mark(
            "pristine",
            target=target.dbname,
            fingerprint=fingerprint,
            heads=heads,
            digest=digest,
            template=branch_template,
            branch=branch,
            worktree=worktree,
            made=database.now_iso(),
        )
        set_mark(conn, building, mark)
        try:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(building), _ident(name))
            )
        except psycopg.errors.DuplicateDatabase:
            # another process published it first: theirs is as good as ours
            drop_database(conn, building)
            found = exists(conn, name)
            theirs = load(found[1].digest) if found and found[1] and found[1].digest else None
            return theirs or baseline
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                _ident(name)
            )
        )
        return baseline
    except BaseException:
        with contextlib.suppress(Exception):
            drop_database(conn, building)
        raise


def _drop_abandoned_builds(conn: psycopg.Connection[Any], target_db: str) -> None:
    """Builds of this target that a dead process left behind."""
    for made in marked_databases(conn):
        mark = made.mark
        if mark.kind != "building" or mark.target != target_db or made.connections:
            continue
        try:
            started = datetime.strptime(mark.made, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue
        if datetime.now(UTC) - started > STALE_BUILD:
            with contextlib.suppress(DbResetError):
                drop_database(conn, made.name)


def _drop_older(conn: psycopg.Connection[Any], target_db: str, fingerprint: str) -> None:
    """Pristine databases of this target for other fingerprints; one in use stays
    (``dbreset list`` shows it stale, ``dbreset drop --stale`` drops it later)."""
    for made in marked_databases(conn):
        mark = made.mark
        if mark.kind == "pristine" and mark.target == target_db and mark.fingerprint != fingerprint:
            with contextlib.suppress(DbResetError):
                drop_database(conn, made.name, template=True)


def no_pristine_note(target: database.Target, why: str) -> str:
    return (
        f"cannot know which rows the migrations seed ({why}), so every table of "
        f"{printable(target.dbname)!r} was emptied instead; grant CREATEDB to "
        f"{printable(target.user)!r} (dbreset then keeps a pristine database to restore "
        "from), or drop the database's tables so that dbreset migrates it from empty once"
    )
