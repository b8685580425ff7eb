"""All SQL text: catalog queries, the truncation plan and its statements.

Every identifier is quoted with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from psycopg import sql

from dbreset.database import Holder
from dbreset.errors import TruncateError

if TYPE_CHECKING:
    import psycopg

#: Rows are counted up to this many per table; more is shown as "100000+".
ROW_COUNT_CAP = 100_000


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    partitioned: bool = False
    has_truncate_trigger: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class Sequence_:
    oid: int
    schema: str
    name: str
    start: int
    owner: bool
    can_update: bool
    can_select: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class Plan:
    """What a truncation will touch, decided from the catalogs."""

    tables: tuple[Table, ...]
    sequences: tuple[Sequence_, ...]
    matviews: tuple[Table, ...]
    excluded: tuple[str, ...]
    #: sequences left alone because a table that is kept also draws from them
    kept_sequences: tuple[str, ...] = ()
    #: table oid → oids of the emptied tables that reference it
    referenced_by: dict[int, frozenset[int]] = field(default_factory=dict)

    def closure(self, tables: Iterable[Table]) -> list[Table]:
        """*tables* plus every table that references one of them, transitively:
        TRUNCATE without CASCADE needs them in the same statement."""
        wanted = {t.oid for t in tables}
        todo = list(wanted)
        while todo:
            for src in self.referenced_by.get(todo.pop(), ()):
                if src not in wanted:
                    wanted.add(src)
                    todo.append(src)
        return [t for t in self.tables if t.oid in wanted]


# --------------------------------------------------------------------------- catalog

TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind = 'p', c.relispartition,
       coalesce(pg_partition_root(c.oid), c.oid)::oid,
       EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid
               AND (t.tgtype & 32) <> 0 AND NOT t.tgisinternal)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
  AND n.nspname = ANY(%(schemas)s)
ORDER BY n.nspname, c.relname
"""

MATVIEWS_SQL = """
SELECT c.oid, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND c.relispopulated AND n.nspname = ANY(%(schemas)s)
ORDER BY n.nspname, c.relname
"""

#: Foreign keys that point at one of the given relations (or their partitions).
REFERENCES_SQL = """
WITH fk AS (
    SELECT coalesce(pg_partition_root(conrelid), conrelid) AS src,
           coalesce(pg_partition_root(confrelid), confrelid) AS dst
    FROM pg_constraint WHERE contype = 'f'
)
SELECT DISTINCT fk.src::oid, fk.dst::oid, rn.nspname, r.relname, tn.nspname, t.relname
FROM fk
JOIN pg_class r ON r.oid = fk.src
JOIN pg_namespace rn ON rn.oid = r.relnamespace
JOIN pg_class t ON t.oid = fk.dst
JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE fk.dst = ANY(%(oids)s)
"""

#: Sequences owned by (serial, identity) or used in column defaults of a relation.
SEQUENCES_SQL = """
WITH uses AS (
    SELECT d.objid AS seq, d.refobjid AS rel
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
  UNION
    SELECT d.refobjid, ad.adrelid
    FROM pg_depend d JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass
                                       AND d.objid = ad.oid
    WHERE d.refclassid = 'pg_class'::regclass
)
SELECT s.oid, n.nspname, s.relname, ps.seqstart,
       pg_has_role(s.relowner, 'USAGE'),
       has_sequence_privilege(s.oid, 'UPDATE'),
       has_sequence_privilege(s.oid, 'SELECT'),
       array_agg(DISTINCT coalesce(pg_partition_root(u.rel), u.rel)::oid),
       array_agg(DISTINCT format('%%I.%%I', rn.nspname, r.relname))
FROM uses u
JOIN pg_class s ON s.oid = u.seq AND s.relkind = 'S'
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_sequence ps ON ps.seqrelid = s.oid
JOIN pg_class r ON r.oid = u.rel
JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE s.oid IN (SELECT seq FROM uses WHERE coalesce(pg_partition_root(rel), rel) = ANY(%(oids)s))
GROUP BY s.oid, n.nspname, s.relname, ps.seqstart
ORDER BY n.nspname, s.relname
"""


def _matches(table_schema: str, table_name: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if fnmatchcase(table_name, pattern) or fnmatchcase(f"{table_schema}.{table_name}", pattern):
            return pattern
    return None


def plan_truncate(
    conn: psycopg.Connection[Any],
    *,
    schemas: Sequence[str],
    exclude: Sequence[str],
    version_table: tuple[str, str],
) -> Plan:
    """Decide what to empty; refuse (TruncateError) when CASCADE would reach a table
    that is excluded or outside *schemas*."""
    rows = conn.execute(TABLES_SQL, {"schemas": list(schemas)}).fetchall()
    by_oid = {row[0]: row for row in rows}
    chosen: dict[int, Table] = {}
    excluded: dict[int, str] = {}
    problems: list[str] = []
    for oid, schema, name, _, _, _, _ in rows:
        if (schema, name) == version_table:
            excluded[oid] = f"{schema}.{name} (Alembic version table)"
        elif pattern := _matches(schema, name, exclude):
            excluded[oid] = f"{schema}.{name} (--exclude {pattern!r})"
    for oid, schema, name, partitioned, is_partition, _, trig in rows:
        if oid not in excluded and not is_partition:
            chosen[oid] = Table(oid, schema, name, partitioned, trig)
    # Partitions follow their root: emptied with it, kept with it. An excluded
    # partition of a root that is emptied would be emptied anyway.
    for oid, label in excluded.items():
        root = by_oid[oid][5]
        if root != oid and root in chosen:
            problems.append(f"{label} is a partition of {chosen[root].qualified}, which is emptied")

    referenced_by: dict[int, set[int]] = {}
    if chosen:
        refs = conn.execute(REFERENCES_SQL, {"oids": list(chosen)}).fetchall()
        for src, dst, src_schema, src_name, _, _ in refs:
            if src == dst:
                continue
            if src in chosen:
                referenced_by.setdefault(dst, set()).add(src)
                continue
            why = excluded.get(src) or f"{src_schema}.{src_name} (outside --schema)"
            problems.append(
                f"{why} references {chosen[dst].qualified}: emptying it would empty them too"
            )
    if problems:
        raise TruncateError(
            "refusing to truncate, CASCADE would reach tables that are kept: "
            + "; ".join(sorted(set(problems)))
            + ". Exclude the referenced tables too, or stop excluding these"
        )

    sequences: list[Sequence_] = []
    kept: list[str] = []
    if chosen:
        seq_rows = conn.execute(SEQUENCES_SQL, {"oids": list(chosen)}).fetchall()
        for oid, schema, name, start, owner, upd, sel, roots, users in seq_rows:
            if not set(roots) <= set(chosen):
                others = [u for u, r in zip(users, roots, strict=False) if r not in chosen]
                kept.append(
                    f"{schema}.{name} (also used by {', '.join(sorted(others)) or 'a kept table'})"
                )
                continue
            sequences.append(Sequence_(oid, schema, name, start, owner, upd, sel))
        for seq in sequences:
            if not seq.owner and not seq.can_update:
                raise TruncateError(
                    f"cannot restart sequence {seq.qualified}: permission denied; "
                    "run as its owner or GRANT UPDATE ON SEQUENCE to this role"
                )
    matviews = tuple(
        Table(oid, schema, name)
        for oid, schema, name in conn.execute(MATVIEWS_SQL, {"schemas": list(schemas)})
    )
    return Plan(
        tables=tuple(chosen.values()),
        sequences=tuple(sequences),
        matviews=matviews,
        excluded=tuple(excluded.values()),
        kept_sequences=tuple(kept),
        referenced_by={dst: frozenset(srcs) for dst, srcs in referenced_by.items()},
    )


# --------------------------------------------------------------------------- state


def row_counts(conn: psycopg.Connection[Any], tables: Sequence[Table]) -> dict[int, int]:
    """Rows per table, counted up to ROW_COUNT_CAP + 1, in one round trip."""
    if not tables:
        return {}
    parts = [
        sql.SQL("SELECT {oid}::oid, (SELECT count(*) FROM (SELECT FROM {t} LIMIT {cap}) s)").format(
            oid=sql.Literal(t.oid), t=t.ident, cap=sql.Literal(ROW_COUNT_CAP + 1)
        )
        for t in tables
    ]
    query = sql.SQL(" UNION ALL ").join(parts)
    return {oid: count for oid, count in conn.execute(query)}


def dirty_sequences(conn: psycopg.Connection[Any], sequences: Sequence[Sequence_]) -> set[int]:
    """Sequences whose next value is not their start value (unknown counts as dirty)."""
    readable = [s for s in sequences if s.can_select]
    dirty = {s.oid for s in sequences if not s.can_select}
    if readable:
        parts = [
            sql.SQL(
                "SELECT {oid}::oid WHERE EXISTS (SELECT FROM {s} "
                "WHERE is_called OR last_value <> {start})"
            ).format(oid=sql.Literal(s.oid), s=s.ident, start=sql.Literal(s.start))
            for s in readable
        ]
        dirty.update(oid for (oid,) in conn.execute(sql.SQL(" UNION ALL ").join(parts)))
    return dirty


def nonempty_matviews(conn: psycopg.Connection[Any], matviews: Sequence[Table]) -> set[int]:
    if not matviews:
        return set()
    parts = [
        sql.SQL("SELECT {oid}::oid WHERE EXISTS (SELECT FROM {m})").format(
            oid=sql.Literal(m.oid), m=m.ident
        )
        for m in matviews
    ]
    return {oid for (oid,) in conn.execute(sql.SQL(" UNION ALL ").join(parts))}


# --------------------------------------------------------------------------- statements


def lock_statement(tables: Sequence[Table]) -> sql.Composed:
    return sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
        sql.SQL(", ").join(t.ident for t in tables)
    )


def empty_statements(
    tables: Sequence[Table], sequences: Sequence[Sequence_], matviews: Sequence[Table]
) -> list[sql.Composed]:
    """TRUNCATE (no CASCADE: the plan proved it is not needed, and PostgreSQL
    checks again), transactional sequence restarts, matview refreshes; then
    ``setval`` for sequences we do not own, last, as it cannot be rolled back."""
    statements: list[sql.Composed] = []
    if tables:
        statements.append(
            sql.SQL("TRUNCATE TABLE {}").format(sql.SQL(", ").join(t.ident for t in tables))
        )
    for seq in sequences:
        if seq.owner:
            statements.append(sql.SQL("ALTER SEQUENCE {} RESTART").format(seq.ident))
    for view in matviews:
        statements.append(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(view.ident))
    for seq in sequences:
        if not seq.owner:
            statements.append(
                sql.SQL("SELECT setval({}::oid::regclass, {}, false)").format(
                    sql.Literal(seq.oid), sql.Literal(seq.start)
                )
            )
    return statements


BLOCKERS_SQL = """
SELECT DISTINCT a.pid, coalesce(a.application_name, ''),
       coalesce(a.client_hostname, host(a.client_addr), 'local socket'),
       coalesce(a.state, ''), coalesce(a.xact_start, a.backend_start), l.mode,
       coalesce(left(a.query, 80), '')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
  AND l.relation = ANY(%(oids)s)
ORDER BY 1
"""


def blockers(conn: psycopg.Connection[Any], tables: Sequence[Table]) -> list[Holder]:
    """Sessions holding locks on any of *tables*: why our LOCK TABLE waited."""
    rows = conn.execute(BLOCKERS_SQL, {"oids": [t.oid for t in tables]}).fetchall()
    return [Holder(*row) for row in rows]


SERVER_SQL = "SELECT current_setting('server_version'), current_database()"


# --------------------------------------------------------------------------- session canary
# (pytest plugin) Nothing is created in the database: the canary compares the
# oid and relfilenode of every relation of the chosen schemas with a snapshot
# taken right after the reset. TRUNCATE, ALTER SEQUENCE ... RESTART, VACUUM
# FULL, a rewriting ALTER TABLE and DROP/CREATE all give a new relfilenode or
# oid; inserts, updates, deletes and nextval() do not.

#: Ordinary tables, partitioned tables and partitions, sequences, materialized views.
CANARY_SNAPSHOT_SQL = """
SELECT c.oid, c.relfilenode, n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S', 'm') AND c.relpersistence <> 't'
  AND n.nspname = ANY(%(schemas)s)
ORDER BY c.oid
"""

#: One round trip per check: the database's oid and a digest of the snapshot's
#: relations as they are now (a relation that is gone drops out of the digest).
CANARY_CHECK_SQL = """
SELECT (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()),
       md5(coalesce(string_agg(c.oid::text || ':' || c.relfilenode::text, ','
                               ORDER BY c.oid), ''))
FROM pg_class c
WHERE c.oid = ANY(%(oids)s::oid[])
"""

#: What became of the snapshot's relations, by oid (kept only when they still exist).
CANARY_CURRENT_SQL = """
SELECT c.oid, c.relfilenode FROM pg_class c WHERE c.oid = ANY(%(oids)s::oid[])
"""
