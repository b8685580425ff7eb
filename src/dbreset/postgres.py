"""All SQL text: catalog queries, the truncation plan and its statements.

Every identifier is quoted with ``psycopg.sql.Identifier``, once per relation,
when the plan is made (see :func:`quote`); statements are joined from those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple

from psycopg import sql

from dbreset.database import Holder
from dbreset.errors import TruncateError

if TYPE_CHECKING:
    import psycopg

#: Rows are counted up to this many per table; more is shown as "100000+".
ROW_COUNT_CAP = 100_000


#: Tables whose files hold at most this many pages (8 kB each) are emptied with
#: DELETE, without counting their rows first, when that is equivalent (no DELETE
#: triggers or rules, no row security): a TRUNCATE costs about a millisecond per
#: table, empty or not, and must take every table that references it along.
DELETE_MAX_PAGES = 8


class Table(NamedTuple):
    oid: int
    schema: str
    name: str
    partitioned: bool = False
    #: an ON TRUNCATE trigger: always TRUNCATE, so that it fires as it would
    has_truncate_trigger: bool = False
    #: DELETE triggers or rules, or no DELETE privilege: never emptied with DELETE
    delete_differs: bool = False
    #: row-level security: a count may not see every row, so it is never trusted
    row_security: bool = False
    #: ``"schema"."name"``, quoted by :func:`quote`
    quoted: str = ""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class Sequence_(NamedTuple):
    oid: int
    schema: str
    name: str
    start: int
    owner: bool
    can_update: bool
    can_select: bool
    quoted: str = ""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def quote(conn: psycopg.Connection[Any], schema: str, name: str) -> str:
    """``"schema"."name"``, escaped by libpq for the connection's encoding."""
    return sql.Identifier(schema, name).as_string(conn)


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
    #: tables that reference themselves ON DELETE RESTRICT: kept out of the DELETE
    #: path to be safe, though PostgreSQL 15 and 18 delete all rows of one fine
    awkward_self_refs: frozenset[int] = frozenset()

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

    def deletable(self, table: Table) -> bool:
        """Whether DELETE ends where TRUNCATE would: no DELETE trigger or rule, no
        row security, no ON TRUNCATE trigger, not a self-reference that restricts."""
        return not (
            table.delete_differs
            or table.has_truncate_trigger
            or table.row_security
            or table.oid in self.awkward_self_refs
        )

    def split(self, dirty: Sequence[Table], small: set[int]) -> tuple[list[Table], list[Table]]:
        """Which dirty tables to TRUNCATE and which to DELETE from, in order.

        DELETE is used for the *small* tables (few pages) that are
        :meth:`deletable`, unless a cycle of foreign keys runs among them. Tables
        referencing a truncated table are truncated with it. Deletes run
        referencing tables first, so every foreign-key check finds nothing left
        pointing at a deleted row.
        """
        deletable = {t.oid for t in dirty if t.oid in small and self.deletable(t)}
        truncate = {t.oid for t in dirty} - deletable
        while True:
            truncate = {t.oid for t in self.closure(t for t in self.tables if t.oid in truncate)}
            deletable -= truncate
            order = self._delete_order(deletable)
            if order is not None:
                break
            # a cycle among the tables to delete from: truncate those instead
            truncate |= self._in_cycles(deletable)
        by_oid = {t.oid: t for t in self.tables}
        return [t for t in self.tables if t.oid in truncate], [by_oid[o] for o in order]

    def _edges(self, within: set[int]) -> dict[int, set[int]]:
        """referenced → referencing, both in *within*, self-references left out."""
        return {
            dst: {src for src in srcs if src in within and src != dst}
            for dst, srcs in self.referenced_by.items()
            if dst in within
        }

    def _delete_order(self, oids: set[int]) -> list[int] | None:
        """Referencing tables before the tables they reference; None on a cycle."""
        edges = self._edges(oids)
        # number of not-yet-deleted tables that reference each table
        waiting = {oid: len(edges.get(oid, ())) for oid in oids}
        references: dict[int, set[int]] = {}
        for dst, srcs in edges.items():
            for src in srcs:
                references.setdefault(src, set()).add(dst)
        ready = sorted(oid for oid, n in waiting.items() if n == 0)
        order: list[int] = []
        while ready:
            oid = ready.pop()
            order.append(oid)
            for dst in references.get(oid, ()):
                waiting[dst] -= 1
                if waiting[dst] == 0:
                    ready.append(dst)
        return order if len(order) == len(oids) else None

    def _in_cycles(self, oids: set[int]) -> set[int]:
        """Tables of *oids* that cannot be ordered (on or behind a cycle)."""
        edges = self._edges(oids)
        left = set(oids)
        changed = True
        while changed:  # peel off tables nothing left references, then the reverse
            changed = False
            for oid in list(left):
                referencing = {s for s in edges.get(oid, ()) if s in left}
                referenced = {d for d, srcs in edges.items() if oid in srcs and d in left}
                if not referencing or not referenced:
                    left.discard(oid)
                    changed = True
        return left or set(oids)


# --------------------------------------------------------------------------- catalog

#: Tables, partitions and populated materialized views of the chosen schemas.
#: tgtype bits: 8 = DELETE, 32 = TRUNCATE. Triggers of partitions count for the root.
#: A superuser is not asked about privileges (it has them all), which spares a
#: catalog lookup per table in a new session.
TABLES_SQL = """
WITH trig AS (
    SELECT coalesce(pg_partition_root(t.tgrelid), t.tgrelid) AS rel,
           bool_or((t.tgtype & 32) <> 0) AS on_truncate, bool_or((t.tgtype & 8) <> 0) AS on_delete
    FROM pg_trigger t WHERE NOT t.tgisinternal GROUP BY 1
), delete_rules AS (
    SELECT DISTINCT ev_class AS rel FROM pg_rewrite WHERE ev_type = '4'
)
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relispartition,
       CASE WHEN c.relispartition THEN pg_partition_root(c.oid) ELSE c.oid END,
       coalesce(trig.on_truncate, false),
       coalesce(trig.on_delete, false) OR delete_rules.rel IS NOT NULL
         OR NOT ((SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 OR has_table_privilege(c.oid, 'DELETE')),
       c.relrowsecurity
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN trig ON trig.rel = c.oid
LEFT JOIN delete_rules ON delete_rules.rel = c.oid
WHERE (c.relkind IN ('r', 'p') OR c.relkind = 'm' AND c.relispopulated)
  AND c.relpersistence <> 't' AND n.nspname = ANY(%(schemas)s)
ORDER BY n.nspname, c.relname
"""

#: Foreign keys that point at one of the given relations (or their partitions),
#: partitions mapped to their roots.
REFERENCES_SQL = """
WITH fk AS (
    SELECT CASE WHEN r.relispartition THEN pg_partition_root(r.oid) ELSE r.oid END AS src,
           CASE WHEN t.relispartition THEN pg_partition_root(t.oid) ELSE t.oid END AS dst,
           k.confdeltype AS action
    FROM pg_constraint k
    JOIN pg_class r ON r.oid = k.conrelid
    JOIN pg_class t ON t.oid = k.confrelid
    WHERE k.contype = 'f'
)
SELECT DISTINCT fk.src::oid, fk.dst::oid, fk.action FROM fk WHERE fk.dst = ANY(%(oids)s)
"""

#: Sequences owned by (serial, identity) or used in column defaults of one of the
#: given relations, with every relation that uses them.
SEQUENCES_SQL = """
WITH uses AS (
    SELECT d.objid AS seq, d.refobjid AS rel
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
  UNION ALL
    SELECT d.refobjid, ad.adrelid
    FROM pg_attrdef ad JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass
                                       AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass
), agg AS (
    SELECT seq, array_agg(DISTINCT rel) AS rels, bool_or(rel = ANY(%(oids)s::oid[])) AS ours
    FROM uses GROUP BY seq
), su AS (
    SELECT rolsuper FROM pg_roles WHERE rolname = current_user
)
SELECT s.oid, n.nspname, s.relname, ps.seqstart,
       (SELECT rolsuper FROM su) OR pg_has_role(s.relowner, 'USAGE'),
       (SELECT rolsuper FROM su) OR has_sequence_privilege(s.oid, 'UPDATE'),
       (SELECT rolsuper FROM su) OR has_sequence_privilege(s.oid, 'SELECT'),
       agg.rels
FROM agg
JOIN pg_class s ON s.oid = agg.seq AND s.relkind = 'S'
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_sequence ps ON ps.seqrelid = s.oid
WHERE agg.ours
ORDER BY n.nspname, s.relname
"""


def _names(conn: psycopg.Connection[Any], known: dict[int, Any], oids: list[int]) -> list[str]:
    """``schema.name`` of relations, from *known* catalog rows or the server."""
    names = [f"{known[o][1]}.{known[o][2]}" for o in oids if o in known]
    unknown = [o for o in oids if o not in known]
    if unknown:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(%s::oid[])",
            (unknown,),
        )
        names.extend(name for (name,) in rows)
    return sorted(names)


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
    relations = conn.execute(TABLES_SQL, {"schemas": list(schemas)}).fetchall()
    rows = [row for row in relations if row[3] != "m"]
    by_oid = {row[0]: row for row in rows}
    chosen: dict[int, Table] = {}
    excluded: dict[int, str] = {}
    problems: list[str] = []
    for oid, schema, name, *_ in rows:
        if (schema, name) == version_table:
            excluded[oid] = f"{schema}.{name} (Alembic version table)"
        elif pattern := _matches(schema, name, exclude):
            excluded[oid] = f"{schema}.{name} (--exclude {pattern!r})"
    for oid, schema, name, kind, is_partition, _, on_trunc, on_del, rls in rows:
        if oid not in excluded and not is_partition:
            quoted = quote(conn, schema, name)
            chosen[oid] = Table(oid, schema, name, kind == "p", on_trunc, on_del, rls, quoted)
    # Partitions follow their root: emptied with it, kept with it. An excluded
    # partition of a root that is emptied would be emptied anyway.
    for oid, label in excluded.items():
        root = by_oid[oid][5]
        if root != oid and root in chosen:
            problems.append(f"{label} is a partition of {chosen[root].qualified}, which is emptied")

    referenced_by: dict[int, set[int]] = {}
    awkward_self_refs: set[int] = set()
    if chosen:
        refs = conn.execute(REFERENCES_SQL, {"oids": list(chosen)}).fetchall()
        for src, dst, action in refs:
            if src == dst:
                if action == "r":
                    awkward_self_refs.add(src)
                continue
            if src in chosen:
                referenced_by.setdefault(dst, set()).add(src)
                continue
            why = excluded.get(src) or f"{_names(conn, by_oid, [src])[0]} (outside --schema)"
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
        seq_rows = conn.execute(SEQUENCES_SQL, {"oids": list(by_oid)}).fetchall()
        chosen_oids = set(chosen)
        for oid, schema, name, start, owner, upd, sel, rels in seq_rows:
            roots = {by_oid[rel][5] if rel in by_oid else rel for rel in rels}
            if not roots & chosen_oids:
                continue  # used by excluded tables only
            if not roots <= chosen_oids:
                users = ", ".join(_names(conn, by_oid, sorted(roots - chosen_oids)))
                kept.append(f"{schema}.{name} (also used by a kept table: {users})")
                continue
            quoted = quote(conn, schema, name)
            sequences.append(Sequence_(oid, schema, name, start, owner, upd, sel, quoted))
        for seq in sequences:
            if not seq.owner and not seq.can_update:
                raise TruncateError(
                    f"cannot restart sequence {seq.qualified}: permission denied; "
                    "run as its owner or GRANT UPDATE ON SEQUENCE to this role"
                )
    matviews = tuple(
        Table(oid, schema, name, quoted=quote(conn, schema, name))
        for oid, schema, name, kind, *_ in relations
        if kind == "m"
    )
    return Plan(
        tables=tuple(chosen.values()),
        sequences=tuple(sequences),
        matviews=matviews,
        excluded=tuple(excluded.values()),
        kept_sequences=tuple(kept),
        referenced_by={dst: frozenset(srcs) for dst, srcs in referenced_by.items()},
        awkward_self_refs=frozenset(awkward_self_refs),
    )


# --------------------------------------------------------------------------- state


#: Pages in the files of tables that have any; a partitioned table's are its
#: leaf partitions'. A table whose files are empty has no rows, committed or not.
FILE_PAGES_SQL = """
WITH files AS (
    SELECT t.oid AS tab, t.oid AS rel FROM unnest(%(plain)s::oid[]) AS t(oid)
  UNION ALL
    SELECT t.oid, p.relid FROM unnest(%(partitioned)s::oid[]) AS t(oid),
                               pg_partition_tree(t.oid) AS p WHERE p.isleaf
)
SELECT tab, sum(bytes) / current_setting('block_size')::int
FROM files, LATERAL (SELECT {bytes} AS bytes) AS s
GROUP BY tab HAVING sum(bytes) > 0
"""
#: pg_relation_size opens each table, which in a new session reads its columns
#: from the catalogs first; the size of its file (which grows as soon as the
#: table does) needs only its pg_class row: a third of the time. Only a
#: superuser may read it.
_BYTES = "pg_relation_size(rel)"
_BYTES_SUPERUSER = "(SELECT size FROM pg_stat_file(pg_relation_filepath(rel), true))"


def _superuser(conn: psycopg.Connection[Any]) -> bool:
    """The server reports it, at connecting and after SET ROLE: no query."""
    return conn.info.parameter_status("is_superuser") == "on"


def file_pages(conn: psycopg.Connection[Any], tables: Sequence[Table]) -> dict[int, int]:
    """Pages per table, for the tables whose files hold any (one round trip).

    A TRUNCATE leaves empty files; a DELETE leaves pages until VACUUM, so a
    table with pages may still have no rows. Call it with the tables locked.
    """
    if not tables:
        return {}
    query = FILE_PAGES_SQL.format(bytes=_BYTES_SUPERUSER if _superuser(conn) else _BYTES)
    rows = conn.execute(
        sql.SQL(query),
        {
            "plain": [t.oid for t in tables if not t.partitioned],
            "partitioned": [t.oid for t in tables if t.partitioned],
        },
    ).fetchall()
    return {oid: int(pages) for oid, pages in rows}


def row_counts(conn: psycopg.Connection[Any], tables: Sequence[Table]) -> dict[int, int]:
    """Rows per table, counted up to ROW_COUNT_CAP + 1, in one round trip.

    Pass only tables whose files hold pages (:func:`file_pages`); the others
    have no rows. Call it with the tables locked, or the answer may be stale at once.
    """
    if not tables:
        return {}
    cap = ROW_COUNT_CAP + 1
    query = " UNION ALL ".join(
        f"SELECT {t.oid}::oid, count(*) FROM (SELECT FROM {t.quoted} LIMIT {cap}) s" for t in tables
    )
    counts: dict[int, int] = dict(conn.execute(sql.SQL(query)).fetchall())
    for t in tables:
        if t.row_security and not counts[t.oid]:
            counts[t.oid] = 1  # rows we may not see: treat as dirty, TRUNCATE sees all
    return counts


#: PostgreSQL 18 reads every sequence's state in one query.
SEQUENCE_STATE_SQL = """
SELECT t.oid FROM unnest(%(oids)s::oid[], %(starts)s::bigint[]) AS t(oid, start),
     LATERAL pg_get_sequence_data(t.oid) AS d
WHERE d.is_called IS NOT FALSE OR d.last_value IS DISTINCT FROM t.start
"""

#: Before 18, this finds the sequences that were called (``last_value`` is NULL otherwise).
SEQUENCE_CALLED_SQL = """
SELECT s FROM unnest(%(oids)s::oid[]) AS s WHERE pg_sequence_last_value(s) IS NOT NULL
"""


def reads_sequence_state(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server tells a sequence's state in one query (PostgreSQL 18+)."""
    return conn.info.server_version >= 180000


def called_sequences(conn: psycopg.Connection[Any], sequences: Sequence[Sequence_]) -> set[int]:
    """Before PostgreSQL 18: the sequences that were called since they were
    created or restarted (one query), and those that cannot be read (unknown
    counts as dirty). Each of the others has ``is_called = false``: it is at its
    start, unless ``setval(..., false)`` put it elsewhere, which only reading
    the sequence itself tells (see :func:`dirty_sequences`)."""
    readable = [s.oid for s in sequences if s.can_select]
    dirty = {s.oid for s in sequences if not s.can_select}
    if readable:
        dirty.update(oid for (oid,) in conn.execute(SEQUENCE_CALLED_SQL, {"oids": readable}))
    return dirty


def dirty_sequences(conn: psycopg.Connection[Any], sequences: Sequence[Sequence_]) -> set[int]:
    """Sequences whose next value is not their start value (unknown counts as dirty).

    One query on PostgreSQL 18 and later. Before, :func:`called_sequences`,
    then each of the others is read, in one more query (a few hundredths of a
    millisecond per sequence), in case a ``setval(..., false)`` left it
    elsewhere than at its start.
    """
    readable = [s for s in sequences if s.can_select]
    if reads_sequence_state(conn):
        dirty = {s.oid for s in sequences if not s.can_select}
        if readable:
            params = {"oids": [s.oid for s in readable], "starts": [s.start for s in readable]}
            dirty.update(oid for (oid,) in conn.execute(SEQUENCE_STATE_SQL, params))
        return dirty
    dirty = called_sequences(conn, sequences)
    unsure = [s for s in readable if s.oid not in dirty]
    if unsure:
        query = " UNION ALL ".join(
            f"SELECT {s.oid}::oid FROM {s.quoted} WHERE is_called OR last_value <> {s.start}"
            for s in unsure
        )
        dirty.update(oid for (oid,) in conn.execute(sql.SQL(query)))
    return dirty


def nonempty_matviews(conn: psycopg.Connection[Any], matviews: Sequence[Table]) -> set[int]:
    if not matviews:
        return set()
    query = " UNION ALL ".join(
        f"SELECT {m.oid}::oid WHERE EXISTS (SELECT FROM {m.quoted})" for m in matviews
    )
    return {oid for (oid,) in conn.execute(sql.SQL(query))}


# --------------------------------------------------------------------------- statements


def begin_statement(tables: Sequence[Table], *, wait: float) -> sql.SQL:
    """Open the transaction and lock every table, waiting at most *wait* seconds
    for others to let go. :meth:`Emptying.run` ends it; :func:`rollback` on failure."""
    if not tables:
        return sql.SQL("BEGIN")
    names = ", ".join(t.quoted for t in tables)
    return sql.SQL(
        f"BEGIN;\nSET LOCAL lock_timeout = {max(1, int(wait * 1000))};\n"
        f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE"
    )


def rollback(conn: psycopg.Connection[Any]) -> None:
    """End a transaction that :func:`begin_statement` opened and that failed."""
    import psycopg

    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):  # a broken connection rolls back anyway
        conn.execute("ROLLBACK")


#: SET LOCAL session_replication_role, for a superuser only (anyone else: a no-op).
REPLICA_SQL = """SELECT set_config('session_replication_role', '{role}', true)
WHERE (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"""


@dataclass
class Emptying:
    """What one transaction does to empty the tables, and what it found doing it."""

    truncate: Sequence[Table] = ()
    #: deleted from in this order (referencing tables first)
    delete: Sequence[Table] = ()
    #: sequences to restart
    restart: Sequence[Sequence_] = ()
    matviews: Sequence[Table] = ()
    #: populated materialized views, when only the DELETEs tell whether any
    #: table had rows: refreshed if one had, else those that are not empty
    matviews_unless_clean: Sequence[Table] = ()
    #: sequences never called (before PostgreSQL 18): set to their start unread
    put_back: Sequence[Sequence_] = ()
    #: after :meth:`run`: rows deleted, per table oid
    deleted: dict[int, int] = field(default_factory=dict)

    def _emptying(self) -> list[str]:
        """TRUNCATE (no CASCADE: the plan proved it is not needed, and PostgreSQL
        checks again), then DELETE in the order given."""
        out: list[str] = []
        if self.truncate:
            out.append("TRUNCATE TABLE " + ", ".join(t.quoted for t in self.truncate))
        if self.delete:
            # Every table that references a table deleted from is empty or emptied in
            # this transaction (the plan refuses otherwise), so the foreign-key
            # triggers of these DELETEs can find nothing; in a new session each of
            # them plans its query first (~1 ms per foreign key). A superuser skips
            # them (replica mode; tables with DELETE triggers or rules are never
            # deleted from).
            out.append(REPLICA_SQL.format(role="replica"))
            out.extend(f"DELETE FROM {t.quoted}" for t in self.delete)
            out.append(REPLICA_SQL.format(role="origin"))
        return out

    def _last(self) -> list[str]:
        """Matview refreshes; ``setval`` of every sequence to restart or put back;
        COMMIT, in the same message.

        ``setval(seq, start, false)`` leaves a sequence as ``ALTER SEQUENCE ...
        RESTART`` does, at a twentieth of the cost (no new file), but cannot be
        rolled back. It runs after everything that could fail, and the COMMIT
        travels with it: once the server has this message, the client going away
        cannot split them. A sequence put back that was at its start is
        unchanged, so doing that unread, and again, is safe.
        """
        out = [f"REFRESH MATERIALIZED VIEW {v.quoted}" for v in self.matviews]
        setval = [*self.restart, *self.put_back]
        if setval:
            oids = ",".join(str(s.oid) for s in setval)
            starts = ",".join(str(s.start) for s in setval)
            out.append(
                "SELECT count(setval(t.oid, t.start, false)) FROM "
                f"unnest('{{{oids}}}'::oid[], '{{{starts}}}'::bigint[]) AS t(oid, start)"
            )
        return [*out, "COMMIT"]

    def statements(self) -> list[str]:
        return self._emptying() + self._last()

    def run(self, conn: psycopg.Connection[Any]) -> None:
        """Inside :func:`begin_statement`'s transaction, in one round trip (two
        when the matviews wait for the DELETEs), committing it; reads each
        DELETE's row count."""
        if self.matviews_unless_clean:
            self._execute(conn, self._emptying())
            if any(self.deleted.values()):
                self.matviews = list(self.matviews_unless_clean)
            else:
                stale = nonempty_matviews(conn, self.matviews_unless_clean)
                self.matviews = [v for v in self.matviews_unless_clean if v.oid in stale]
            self._execute(conn, self._last())
        else:
            self._execute(conn, self.statements())

    def _execute(self, conn: psycopg.Connection[Any], statements: list[str]) -> None:
        if not statements:
            return
        cursor = conn.execute(sql.SQL(";\n".join(statements)))
        deletes = iter(self.delete)
        while True:
            status = cursor.statusmessage or ""
            if status.startswith("DELETE "):
                self.deleted[next(deletes).oid] = int(status.split()[1])
            if not cursor.nextset():
                break


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
