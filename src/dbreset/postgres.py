"""All SQL text: catalog queries, plans, checks, and the statements that empty
a database and put its baseline back.

Every identifier is quoted with ``psycopg.sql.Identifier``, once per relation,
when the plan is made (see :func:`quote`); statements are joined from those.
Every ordinary table is named ``ONLY``, so that inheritance children (chosen or
kept on their own) and foreign tables are never reached through a parent; a
partitioned table is emptied through its local leaf partitions, and named as a
whole only when every leaf is emptied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from psycopg import sql

from dbreset.database import Holder
from dbreset.errors import ConfigError, TruncateError
from dbreset.redact import printable

if TYPE_CHECKING:
    import psycopg

#: Rows are counted up to this many per table; more is shown as "100000+".
ROW_COUNT_CAP = 100_000


#: Tables whose files hold at most this many pages (8 kB each) are emptied with
#: DELETE, without counting their rows first, when that is equivalent (no DELETE
#: triggers or rules, no row security): a TRUNCATE costs about a millisecond per
#: table, empty or not, and must take every table that references it along.
DELETE_MAX_PAGES = 8

#: Above this many relations to lock, the server's lock table is checked first.
LOCKS_CHECKED_ABOVE = 300


def _key(schema: str, name: str) -> str:
    """How a relation is named in results and baselines: ``schema.name``."""
    return f"{schema}.{name}"


class Leaf(NamedTuple):
    """A relation that holds rows: an ordinary table, or a leaf partition."""

    oid: int
    schema: str
    name: str
    quoted: str

    @property
    def key(self) -> str:
        return _key(self.schema, self.name)

    @property
    def qualified(self) -> str:
        return printable(self.key)


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
    #: the relations whose rows are emptied: the table itself (ordinary), or its
    #: local leaf partitions that are not kept (partitioned)
    leaves: tuple[Leaf, ...] = ()
    #: every leaf partition is emptied: statements may name the table itself
    whole: bool = True

    @property
    def qualified(self) -> str:
        return printable(_key(self.schema, self.name))

    @property
    def key(self) -> str:
        return _key(self.schema, self.name)

    def names(self) -> list[str]:
        """How TRUNCATE and LOCK TABLE name it."""
        if self.partitioned:
            if self.whole:
                return [self.quoted]
            return [f"ONLY {leaf.quoted}" for leaf in self.leaves]
        return [f"ONLY {self.quoted}"]


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
        return printable(_key(self.schema, self.name))

    @property
    def key(self) -> str:
        return _key(self.schema, self.name)


class Matview(NamedTuple):
    oid: int
    schema: str
    name: str
    quoted: str
    populated: bool

    @property
    def qualified(self) -> str:
        return printable(_key(self.schema, self.name))

    @property
    def key(self) -> str:
        return _key(self.schema, self.name)


def quote(conn: psycopg.Connection[Any], schema: str, name: str) -> str:
    """``"schema"."name"``, escaped as libpq's ``PQescapeIdentifier`` does: in
    UTF-8 (psycopg's default) that is doubling every '"' and quoting, done
    here without a call into libpq per name (hundreds per reset); in another
    client encoding, by libpq itself."""
    if conn.info.encoding == "utf-8":
        return '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
    return sql.Identifier(schema, name).as_string(conn)


def oid_array(values: Iterable[int]) -> str:
    """An array literal for ``::oid[]`` (or ``::bigint[]``): one string parameter
    adapts far faster than a list of hundreds of numbers."""
    return "{" + ",".join(str(int(v)) for v in values) + "}"


class Plan(NamedTuple):
    """What a truncation or a reset may touch, decided from the catalogs."""

    tables: tuple[Table, ...]
    sequences: tuple[Sequence_, ...]
    matviews: tuple[Matview, ...]
    excluded: tuple[str, ...]
    #: sequences left alone because a table that is kept also draws from them
    kept_sequences: tuple[str, ...] = ()
    #: table oid → oids of the chosen tables that reference it
    referenced_by: Mapping[int, frozenset[int]] = MappingProxyType({})
    #: tables that reference themselves ON DELETE RESTRICT: kept out of the DELETE
    #: path to be safe, though PostgreSQL 15 and 18 delete all rows of one fine
    awkward_self_refs: frozenset[int] = frozenset()
    #: exclude patterns that matched no table
    unmatched_excludes: tuple[str, ...] = ()

    def closure(self, tables: Iterable[Table]) -> list[Table]:
        """*tables* plus every table that references one of them, transitively:
        TRUNCATE without CASCADE needs them in the same statement."""
        return self._by_oid(self._grow({t.oid for t in tables}, lambda oid: True))

    def _grow(self, wanted: set[int], keep: Any) -> set[int]:
        todo = list(wanted)
        while todo:
            for src in self.referenced_by.get(todo.pop(), ()):
                if src not in wanted and keep(src):
                    wanted.add(src)
                    todo.append(src)
        return wanted

    def _by_oid(self, oids: set[int]) -> list[Table]:
        return [t for t in self.tables if t.oid in oids]

    def deletable(self, table: Table) -> bool:
        """Whether DELETE ends where TRUNCATE would: no DELETE trigger or rule, no
        row security, no ON TRUNCATE trigger, not a self-reference that restricts."""
        return not (
            table.delete_differs
            or table.has_truncate_trigger
            or table.row_security
            or table.oid in self.awkward_self_refs
        )

    def split(
        self,
        dirty: Sequence[Table],
        small: set[int],
        *,
        holding: frozenset[int] = frozenset(),
        checked_keys: bool = False,
    ) -> tuple[list[Table], list[Table]]:
        """Which tables to TRUNCATE and which to DELETE from, in order.

        DELETE is used for the *small* tables (few pages) that are
        :meth:`deletable`, unless a cycle of foreign keys runs among them. Tables
        referencing a truncated table are truncated with it. Deletes run
        referencing tables first. *holding* are tables that keep rows (seeded
        tables at their baseline): when the foreign keys are *checked_keys*, a
        DELETE from a table they reference takes them along too (they are put
        back afterwards), or its foreign keys would refuse (or cascade).
        """
        deletable = {t.oid for t in dirty if t.oid in small and self.deletable(t)}
        truncate = {t.oid for t in dirty} - deletable
        while True:
            truncate = self._grow(truncate, lambda oid: True)
            deletable -= truncate
            if checked_keys:
                grown = self._grow(set(deletable), lambda oid: oid in holding)
                added = grown - deletable - truncate
                if added:
                    by_oid = {t.oid: t for t in self.tables}
                    for oid in added:
                        if oid in small and self.deletable(by_oid[oid]):
                            deletable.add(oid)
                        else:
                            truncate.add(oid)
                    continue
            order = self._delete_order(deletable)
            if order is not None:
                break
            # a cycle among the tables to delete from: truncate those instead
            truncate |= self._in_cycles(deletable)
        by_oid = {t.oid: t for t in self.tables}
        return self._by_oid(truncate), [by_oid[o] for o in order]

    def holding(self, seeded: Container[str]) -> frozenset[int]:
        """The tables with a leaf whose rows a reset keeps (*seeded*: leaf keys)."""
        return frozenset(t.oid for t in self.tables if any(leaf.key in seeded for leaf in t.leaves))

    def refill_order(self, emptied: set[int], seeded: Container[str]) -> list[Leaf]:
        """The seeded leaves of the *emptied* tables, in the order their rows go
        back: referenced tables first (see :meth:`insert_order`)."""
        by_oid = {t.oid: t for t in self.tables}
        return [
            leaf
            for oid in self.insert_order(emptied & self.holding(seeded))
            for leaf in by_oid[oid].leaves
            if leaf.key in seeded
        ]

    def insert_order(self, oids: set[int]) -> list[int]:
        """Referenced tables before the tables that reference them (the reverse of
        :meth:`_delete_order`); tables on a cycle last, in any order."""
        order = self._delete_order(oids)
        if order is not None:
            return order[::-1]
        cyclic = self._in_cycles(oids)
        rest = self._delete_order(oids - cyclic) or sorted(oids - cyclic)
        return [*rest[::-1], *sorted(cyclic)]

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


# --------------------------------------------------------------------------- the first query

#: What every command learns in its first round trip: where it is, dbreset's
#: mark, the pristine database it may need, and whether the version table exists.
PROBE_SQL = """
SELECT current_database(), d.oid, shobj_description(d.oid, 'pg_database'),
       to_regclass(%(version_table)s) IS NOT NULL,
       p.oid, shobj_description(p.oid, 'pg_database')
FROM pg_database d LEFT JOIN pg_database p ON p.datname = %(pristine)s
WHERE d.datname = current_database()
"""


class Probe(NamedTuple):
    dbname: str
    database_oid: int
    comment: str | None
    version_table_exists: bool
    pristine_oid: int | None
    pristine_comment: str | None


def probe(conn: psycopg.Connection[Any], *, version_table: tuple[str, str], pristine: str) -> Probe:
    row = conn.execute(
        PROBE_SQL, {"version_table": quote(conn, *version_table), "pristine": pristine}
    ).fetchone()
    assert row is not None
    return Probe(*row)


# --------------------------------------------------------------------------- catalog

#: Tables and partitioned tables (not partitions: they follow their table), and
#: materialized views, of the chosen schemas; never a relation that belongs to
#: an extension. tgtype bits: 8 = DELETE, 32 = TRUNCATE. Triggers of partitions
#: count for the root. A superuser is not asked about privileges (it has them
#: all), which spares a catalog lookup per table in a new session. A partitioned
#: table lists its leaf partitions, wherever they are and whatever their kind,
#: each with the partitioned tables between it and the root.
TABLES_SQL = """
WITH trig AS (
    SELECT coalesce(pg_partition_root(t.tgrelid), t.tgrelid) AS rel,
           bool_or((t.tgtype & 32) <> 0) AS on_truncate, bool_or((t.tgtype & 8) <> 0) AS on_delete
    FROM pg_trigger t WHERE NOT t.tgisinternal GROUP BY 1
), delete_rules AS (
    SELECT DISTINCT ev_class AS rel FROM pg_rewrite WHERE ev_type = '4'
)
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relispartition,
       coalesce(trig.on_truncate, false),
       coalesce(trig.on_delete, false) OR delete_rules.rel IS NOT NULL
         OR NOT ((SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 OR has_table_privilege(c.oid, 'DELETE')),
       c.relrowsecurity, c.relispopulated,
       CASE WHEN c.relkind = 'p' THEN (
           SELECT coalesce(json_agg(json_build_array(l.oid, ln.nspname, l.relname, l.relkind, (
                      SELECT coalesce(json_agg(json_build_array(an.nspname, a.relname)), '[]')
                      FROM pg_partition_ancestors(l.oid) pa
                      JOIN pg_class a ON a.oid = pa.relid
                      JOIN pg_namespace an ON an.oid = a.relnamespace
                      WHERE pa.relid NOT IN (l.oid, c.oid))) ORDER BY l.oid), '[]')
           FROM pg_partition_tree(c.oid) pt
           JOIN pg_class l ON l.oid = pt.relid
           JOIN pg_namespace ln ON ln.oid = l.relnamespace
           WHERE pt.isleaf) END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN trig ON trig.rel = c.oid
LEFT JOIN delete_rules ON delete_rules.rel = c.oid
WHERE c.relkind IN ('r', 'p', 'm') AND c.relpersistence <> 't' AND n.nspname = ANY(%(schemas)s)
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
                  AND e.objid = c.oid AND e.deptype = 'e')
ORDER BY n.nspname, c.relname
"""

#: Which of the chosen schemas exist.
SCHEMAS_SQL = "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%(schemas)s)"

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
SELECT DISTINCT fk.src::oid, fk.dst::oid, fk.action FROM fk WHERE fk.dst = ANY(%(oids)s::oid[])
"""

#: Sequences of the chosen schemas, and sequences owned by (serial, identity) or
#: used in column defaults of one of the given relations, with every relation
#: that uses them; never a sequence that belongs to an extension.
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
), agg AS MATERIALIZED (
    SELECT seq, array_agg(DISTINCT rel) AS rels, bool_or(rel = ANY(%(oids)s::oid[])) AS ours
    FROM uses GROUP BY seq
), su AS (
    SELECT rolsuper FROM pg_roles WHERE rolname = current_user
)
SELECT s.oid, n.nspname, s.relname, ps.seqstart,
       (SELECT rolsuper FROM su) OR pg_has_role(s.relowner, 'USAGE'),
       (SELECT rolsuper FROM su) OR has_sequence_privilege(s.oid, 'UPDATE'),
       (SELECT rolsuper FROM su) OR has_sequence_privilege(s.oid, 'SELECT'),
       coalesce(agg.rels, '{}')
FROM pg_sequence ps
JOIN pg_class s ON s.oid = ps.seqrelid
JOIN pg_namespace n ON n.oid = s.relnamespace
LEFT JOIN agg ON agg.seq = ps.seqrelid
WHERE (coalesce(agg.ours, false) OR n.nspname = ANY(%(schemas)s))
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
                  AND e.objid = s.oid AND e.deptype = 'e')
ORDER BY n.nspname, s.relname
"""


def _names(conn: psycopg.Connection[Any], known: dict[int, str], oids: list[int]) -> list[str]:
    """``schema.name`` of relations, from *known* or the server."""
    names = [known[o] for o in oids if o in known]
    unknown = [o for o in oids if o not in known]
    if unknown:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(%s::oid[])",
            (unknown,),
        )
        names.extend(printable(name) for (name,) in rows)
    return sorted(names)


class Exclude(NamedTuple):
    """An exclude pattern and where it came from (``--exclude``, pyproject.toml ...)."""

    pattern: str
    source: str = "--exclude"

    def label(self) -> str:
        if self.source == "--exclude":
            return f"--exclude {self.pattern!r}"
        return f"exclude {self.pattern!r} from {self.source}"


def _matches(schema: str, name: str, patterns: Iterable[Exclude]) -> Exclude | None:
    for exclude in patterns:
        pattern = exclude.pattern
        if fnmatchcase(name, pattern) or fnmatchcase(_key(schema, name), pattern):
            return exclude
    return None


def plan_truncate(
    conn: psycopg.Connection[Any],
    *,
    schemas: Sequence[str],
    exclude: Sequence[Exclude | str],
    version_table: tuple[str, str],
    missing_ok: bool = False,
) -> Plan:
    """Decide what may be emptied; refuse (TruncateError) when emptying a table
    would reach a table that is excluded or outside *schemas*, and (ConfigError)
    when a chosen schema does not exist."""
    excludes = [e if isinstance(e, Exclude) else Exclude(e) for e in exclude]
    relations = conn.execute(TABLES_SQL, {"schemas": list(schemas)}).fetchall()
    seen = {row[1] for row in relations}
    if not missing_ok and any(s not in seen for s in schemas):
        found = {name for (name,) in conn.execute(SCHEMAS_SQL, {"schemas": list(schemas)})}
        missing = [s for s in schemas if s not in found]
        if missing:
            raise ConfigError(
                f"no schema {', '.join(repr(printable(s)) for s in missing)} in this database; "
                "check --schema (schemas in [tool.dbreset], DBRESET_SCHEMAS)"
            )
    rows = [row for row in relations if row[3] != "m"]
    names = {row[0]: printable(_key(row[1], row[2])) for row in rows}
    chosen: dict[int, Table] = {}
    excluded: dict[int, str] = {}
    used: set[Exclude] = set()
    problems: list[str] = []

    def kept_label(schema: str, name: str) -> str | None:
        if (schema, name) == version_table:
            return f"{printable(_key(schema, name))} (Alembic version table)"
        if found := _matches(schema, name, excludes):
            used.add(found)
            return f"{printable(_key(schema, name))} ({found.label()})"
        return None

    for oid, schema, name, *_ in rows:
        if label := kept_label(schema, name):
            excluded[oid] = label
    for oid, schema, name, kind, is_partition, on_trunc, on_del, rls, _, parts in rows:
        if oid in excluded or is_partition:
            continue
        quoted = quote(conn, schema, name)
        if kind == "p":
            leaves, whole = _leaves(conn, parts, schemas, kept_label, excluded)
        else:
            leaves, whole = (Leaf(oid, schema, name, quoted),), True
        chosen[oid] = Table(
            oid, schema, name, kind == "p", on_trunc, on_del, rls, quoted, leaves, whole
        )

    referenced_by: dict[int, set[int]] = {}
    awkward_self_refs: set[int] = set()
    if chosen:
        refs = conn.execute(REFERENCES_SQL, {"oids": oid_array(chosen)}).fetchall()
        for src, dst, action in refs:
            if src == dst:
                if action == "r":
                    awkward_self_refs.add(src)
                continue
            if src in chosen:
                referenced_by.setdefault(dst, set()).add(src)
                continue
            why = excluded.get(src) or f"{_names(conn, names, [src])[0]} (outside --schema)"
            problems.append(
                f"{why} references {chosen[dst].qualified}: emptying it would empty them too"
            )
    if problems:
        raise TruncateError(
            "refusing to empty tables, it would reach tables that are kept: "
            + "; ".join(sorted(set(problems)))
            + ". Exclude the referenced tables too, or stop excluding these"
        )

    sequences: list[Sequence_] = []
    kept: list[str] = []
    seq_rows = conn.execute(
        SEQUENCES_SQL, {"oids": oid_array(names), "schemas": list(schemas)}
    ).fetchall()
    roots = {row[0]: row[0] for row in rows}
    # partitions count as their table, for sequences (a partition's column
    # defaults are its root's)
    for table in chosen.values():
        for leaf in table.leaves:
            roots[leaf.oid] = table.oid
    chosen_oids = set(chosen)
    for oid, schema, name, start, owner, upd, sel, rels in seq_rows:
        users = {roots.get(rel, rel) for rel in rels}
        if users and not users & chosen_oids:
            continue  # used by kept tables only
        if not users <= chosen_oids:
            kept_users = ", ".join(_names(conn, names, sorted(users - chosen_oids)))
            kept.append(
                f"{printable(_key(schema, name))} (also used by a kept table: {kept_users})"
            )
            continue
        if not users and schema not in schemas:
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
        Matview(oid, schema, name, quote(conn, schema, name), populated)
        for oid, schema, name, kind, _, _, _, _, populated, _ in relations
        if kind == "m" and not kept_label(schema, name)
    )
    return Plan(
        tables=tuple(chosen.values()),
        sequences=tuple(sequences),
        matviews=matviews,
        excluded=tuple(excluded.values()),
        kept_sequences=tuple(kept),
        referenced_by={dst: frozenset(srcs) for dst, srcs in referenced_by.items()},
        awkward_self_refs=frozenset(awkward_self_refs),
        unmatched_excludes=tuple(e.label() for e in excludes if e not in used),
    )


def _leaves(
    conn: psycopg.Connection[Any],
    parts: list[list[Any]],
    schemas: Sequence[str],
    kept_label: Any,
    excluded: dict[int, str],
) -> tuple[tuple[Leaf, ...], bool]:
    """The leaf partitions of a partitioned table that are emptied with it: not a
    foreign table, not excluded, in a chosen schema, and not inside a partition
    that is excluded or outside the chosen schemas; *excluded* gets the others."""
    leaves: list[Leaf] = []
    whole = True
    for oid, schema, name, kind, ancestors in parts:
        label = kept_label(schema, name)
        if kind == "f":
            label = f"{printable(_key(schema, name))} (foreign partition: rows are remote)"
        elif label is None and schema not in schemas:
            label = f"{printable(_key(schema, name))} (partition outside --schema)"
        for outer_schema, outer in ancestors if label is None else ():
            why = kept_label(outer_schema, outer)
            if why is None and outer_schema not in schemas:
                why = f"{printable(_key(outer_schema, outer))} (partition outside --schema)"
            if why is not None:
                label = f"{printable(_key(schema, name))} (a partition of {why})"
                break
        if label is not None:
            excluded[int(oid)] = label
            whole = False
            continue
        leaves.append(Leaf(int(oid), schema, name, quote(conn, schema, name)))
    return tuple(leaves), whole


# --------------------------------------------------------------------------- state


#: Pages in the files of the given relations, per table, for the tables whose
#: files hold any. A table whose files are empty has no rows, committed or not.
FILE_PAGES_SQL = """
SELECT t.tab, sum(s.bytes) / current_setting('block_size')::int
FROM unnest(%(tabs)s::oid[], %(rels)s::oid[]) AS t(tab, rel),
     LATERAL (SELECT {bytes} AS bytes) AS s
GROUP BY t.tab HAVING sum(s.bytes) > 0
"""
#: pg_relation_size opens each table, which in a new session reads its columns
#: from the catalogs first; the size of its file (which grows as soon as the
#: table does) needs only its pg_class row: a third of the time. Only a
#: superuser may read it.
_BYTES = "pg_relation_size(t.rel)"
_BYTES_SUPERUSER = "(SELECT size FROM pg_stat_file(pg_relation_filepath(t.rel), true))"


def superuser(conn: psycopg.Connection[Any]) -> bool:
    """The server reports it, at connecting and after SET ROLE: no query."""
    return conn.info.parameter_status("is_superuser") == "on"


def file_pages(conn: psycopg.Connection[Any], tables: Sequence[Table]) -> dict[int, int]:
    """Pages per table (its leaves' files), for the tables that have any (one
    round trip). A TRUNCATE leaves empty files; a DELETE leaves pages until
    VACUUM, so a table with pages may still have no rows."""
    pairs = [(t.oid, leaf.oid) for t in tables for leaf in t.leaves]
    if not pairs:
        return {}
    query = FILE_PAGES_SQL.format(bytes=_BYTES_SUPERUSER if superuser(conn) else _BYTES)
    rows = conn.execute(
        sql.SQL(query),
        {"tabs": oid_array(p[0] for p in pairs), "rels": oid_array(p[1] for p in pairs)},
    ).fetchall()
    return {oid: int(pages) for oid, pages in rows}


def row_counts(conn: psycopg.Connection[Any], tables: Sequence[Table]) -> dict[int, int]:
    """Rows per table, each leaf counted up to ROW_COUNT_CAP + 1, in one round trip.

    Pass only tables whose files hold pages (:func:`file_pages`); the others
    have no rows."""
    parts = [(t, leaf) for t in tables for leaf in t.leaves]
    if not parts:
        return {}
    cap = ROW_COUNT_CAP + 1
    query = " UNION ALL ".join(
        f"SELECT {t.oid}::oid, count(*) FROM (SELECT FROM ONLY {leaf.quoted} LIMIT {cap}) s"
        for t, leaf in parts
    )
    counts: dict[int, int] = {t.oid: 0 for t in tables}
    for oid, n in conn.execute(sql.SQL(query)):
        counts[oid] += n
    for t in tables:
        if t.row_security and not counts[t.oid]:
            counts[t.oid] = 1  # rows we may not see: treat as dirty, TRUNCATE sees all
    return counts


#: A relation's rows as one canonical text: what a baseline stores and compares
#: (text output is stable under dbreset's session settings; "C" collation does
#: not depend on the database's locale).
ROWS_DIGEST = "md5(coalesce(string_agg(r::text, E'\\n' ORDER BY r::text COLLATE \"C\"), ''))"
#: A relation's columns: names, types, and whether they are generated.
COLUMNS_SQL = """(SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid,
    a.atttypmod) || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END, ', '
    ORDER BY a.attnum) FROM pg_attribute a
    WHERE a.attrelid = {oid} AND a.attnum > 0 AND NOT a.attisdropped)"""


class Content(NamedTuple):
    """What a relation holds, in short: enough to tell it from its baseline."""

    columns: str
    rows: int
    digest: str
    #: its file, and the transactions that wrote its rows (see :class:`RowVersions`)
    versions: RowVersions | None = None


class RowVersions(NamedTuple):
    """A table's file, row count and the ids of the transactions that wrote its
    rows. Any insert, update or delete since changes the count or writes a row
    version with a new id, so while these match, the rows are the same: a
    cheaper proof than reading and hashing them all."""

    filenode: int
    rows: int
    xmins: tuple[str, ...]


def contents(
    conn: psycopg.Connection[Any], relations: Sequence[Leaf | Matview], *, only: bool = True
) -> dict[int, Content]:
    """Columns, row count, digest and row versions of each relation (one round trip)."""
    if not relations:
        return {}
    query = " UNION ALL ".join(
        f"SELECT {rel.oid}::oid, {COLUMNS_SQL.format(oid=rel.oid)}, s.n, s.d, s.x, "
        f"(SELECT relfilenode FROM pg_class WHERE oid = {rel.oid}) FROM "
        f"(SELECT count(*) AS n, {ROWS_DIGEST} AS d, array_agg(DISTINCT r.xmin::text) AS x "
        f"FROM {'ONLY ' if only else ''}{rel.quoted} r) s"
        for rel in relations
    )
    return {
        oid: Content(cols or "", n, d, RowVersions(int(node), n, tuple(sorted(x or ()))))
        for oid, cols, n, d, x, node in conn.execute(sql.SQL(query))
    }


def filenodes(conn: psycopg.Connection[Any], oids: Sequence[int]) -> dict[int, int]:
    rows = conn.execute("SELECT oid, relfilenode FROM pg_class WHERE oid = ANY(%s)", (list(oids),))
    return {int(oid): int(node) for oid, node in rows}


def unchanged(
    conn: psycopg.Connection[Any], recorded: Sequence[tuple[Leaf, RowVersions]]
) -> set[int]:
    """The leaves whose file, row count and row versions are as *recorded*."""
    if not recorded:
        return set()
    query = " UNION ALL ".join(
        f"SELECT {leaf.oid}::oid WHERE (SELECT relfilenode FROM pg_class WHERE oid = "
        f"{leaf.oid}) = {v.filenode} AND (SELECT count(*) = {v.rows} AND NOT coalesce("
        f"bool_or(NOT r.xmin = ANY('{{{','.join(v.xmins)}}}'::xid[])), false) "
        f"FROM ONLY {leaf.quoted} r)"
        for leaf, v in recorded
    )
    return {oid for (oid,) in conn.execute(sql.SQL(query))}


class Expected(NamedTuple):
    """A sequence's state in the baseline: where ``setval`` puts it back."""

    last_value: int
    is_called: bool


#: PostgreSQL 18 reads every sequence's state in one query.
SEQUENCE_STATE_SQL = """
SELECT t.oid FROM unnest(%(oids)s::oid[], %(lasts)s::bigint[], %(called)s::bool[])
         AS t(oid, last, called),
     LATERAL pg_get_sequence_data(t.oid) AS d
WHERE d.is_called IS DISTINCT FROM t.called OR d.last_value IS DISTINCT FROM t.last
"""

#: Before 18, this finds the sequences that are not where the baseline says,
#: among those it can tell (``pg_sequence_last_value`` is NULL when not called).
SEQUENCE_CALLED_SQL = """
SELECT t.oid FROM unnest(%(oids)s::oid[], %(lasts)s::bigint[], %(called)s::bool[])
         AS t(oid, last, called)
WHERE CASE WHEN t.called THEN pg_sequence_last_value(t.oid) IS DISTINCT FROM t.last
           ELSE pg_sequence_last_value(t.oid) IS NOT NULL END
"""


def reads_sequence_state(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server tells a sequence's state in one query (PostgreSQL 18+)."""
    return conn.info.server_version >= 180000


def _expected(seq: Sequence_, expected: Mapping[str, Expected] | None) -> Expected:
    if expected is not None and seq.key in expected:
        return expected[seq.key]
    return Expected(seq.start, False)


def _sequence_params(
    sequences: Sequence[Sequence_], expected: Mapping[str, Expected] | None
) -> dict[str, str]:
    states = [_expected(s, expected) for s in sequences]
    return {
        "oids": oid_array(s.oid for s in sequences),
        "lasts": oid_array(e.last_value for e in states),
        "called": "{" + ",".join("t" if e.is_called else "f" for e in states) + "}",
    }


def called_sequences(
    conn: psycopg.Connection[Any],
    sequences: Sequence[Sequence_],
    expected: Mapping[str, Expected] | None = None,
) -> set[int]:
    """Before PostgreSQL 18: the sequences known to be off their baseline (one
    query), and those that cannot be read (unknown counts as dirty). Each of the
    others was not called, as in the baseline, but ``setval(..., false)`` may
    have put it elsewhere, which only reading the sequence tells."""
    readable = [s for s in sequences if s.can_select]
    dirty = {s.oid for s in sequences if not s.can_select}
    if readable:
        params = _sequence_params(readable, expected)
        dirty.update(oid for (oid,) in conn.execute(SEQUENCE_CALLED_SQL, params))
    return dirty


def unsure_sequences(
    sequences: Sequence[Sequence_],
    dirty: set[int],
    expected: Mapping[str, Expected] | None = None,
) -> list[Sequence_]:
    """Of the sequences :func:`called_sequences` did not find off their baseline,
    those it cannot vouch for: not called, as in the baseline, but maybe moved
    by ``setval(..., false)`` (only reading the sequence tells)."""
    return [s for s in sequences if s.oid not in dirty and not _expected(s, expected).is_called]


def dirty_sequences(
    conn: psycopg.Connection[Any],
    sequences: Sequence[Sequence_],
    expected: Mapping[str, Expected] | None = None,
) -> set[int]:
    """Sequences that are not where the baseline (default: their start, not
    called) has them; unknown counts as dirty. One query on PostgreSQL 18 and
    later; before, :func:`called_sequences`, then each of the others is read."""
    readable = [s for s in sequences if s.can_select]
    if reads_sequence_state(conn):
        dirty = {s.oid for s in sequences if not s.can_select}
        if readable:
            params = _sequence_params(readable, expected)
            dirty.update(oid for (oid,) in conn.execute(SEQUENCE_STATE_SQL, params))
        return dirty
    dirty = called_sequences(conn, sequences, expected)
    unsure = unsure_sequences(readable, dirty, expected)
    if unsure:
        query = " UNION ALL ".join(
            f"SELECT {s.oid}::oid FROM {s.quoted} "
            f"WHERE is_called OR last_value <> {_expected(s, expected).last_value}"
            for s in unsure
        )
        dirty.update(oid for (oid,) in conn.execute(sql.SQL(query)))
    return dirty


def nonempty_matviews(conn: psycopg.Connection[Any], matviews: Sequence[Matview]) -> set[int]:
    populated = [m for m in matviews if m.populated]
    if not populated:
        return set()
    query = " UNION ALL ".join(
        f"SELECT {m.oid}::oid WHERE EXISTS (SELECT FROM {m.quoted})" for m in populated
    )
    return {oid for (oid,) in conn.execute(sql.SQL(query))}


#: Locks a transaction takes: every relation locked (a TRUNCATE also locks its
#: indexes and TOAST table, rebuilt as new files; a DELETE, the table only),
#: the size of the server's shared lock table (max_locks_per_transaction for
#: every backend slot and prepared transaction), and the locks held there now.
LOCK_SLOTS_SQL = """
SELECT (SELECT count(*) + coalesce(sum((SELECT count(*) FROM pg_index i
                                        WHERE i.indrelid = c.oid)), 0)
               + 2 * count(*) FILTER (WHERE c.reltoastrelid <> 0)
        FROM pg_class c WHERE c.oid = ANY(%(rebuilt)s::oid[]))
       + cardinality(%(locked)s::oid[]),
       current_setting('max_locks_per_transaction')::int,
       current_setting('max_connections')::int + current_setting('autovacuum_max_workers')::int
         + 1 + current_setting('max_worker_processes')::int
         + current_setting('max_wal_senders')::int
         + current_setting('max_prepared_transactions')::int,
       (SELECT count(*) FROM pg_locks WHERE NOT fastpath)
"""


def check_lock_table(
    conn: psycopg.Connection[Any], truncate: Sequence[Table], delete: Sequence[Table]
) -> None:
    """Refuse, before changing anything, a transaction the server's lock table
    cannot hold (``out of shared memory``), naming the setting that would."""
    rebuilt = {oid for t in truncate for oid in (t.oid, *(leaf.oid for leaf in t.leaves))}
    locked = {oid for t in delete for oid in (t.oid, *(leaf.oid for leaf in t.leaves))}
    if len(rebuilt) + len(locked) <= LOCKS_CHECKED_ABOVE:
        return
    params = {"rebuilt": sorted(rebuilt), "locked": sorted(locked - rebuilt)}
    row = conn.execute(LOCK_SLOTS_SQL, params).fetchone()
    assert row is not None
    needed, per_transaction, slots, in_use = (int(v) for v in row)
    capacity = per_transaction * slots
    if needed + in_use <= capacity:
        return
    # room for what is held now and for as much again, as other sessions come and go
    wanted = -(-(needed + 2 * in_use) // slots)
    wanted = max(per_transaction * 2, -(-wanted // 64) * 64)
    raise TruncateError(
        f"emptying these {len(truncate) + len(delete)} tables in one transaction takes about "
        f"{needed} locks (tables, partitions, indexes), more than this server's lock table "
        f"has room for ({capacity}: max_locks_per_transaction {per_transaction} for each of "
        f"{slots} slots, {in_use} held now); nothing was changed. Set "
        f"max_locks_per_transaction = {wanted} in postgresql.conf and restart the server"
    )


# --------------------------------------------------------------------------- statements


def begin_statement(tables: Sequence[Table], *, wait: float) -> sql.SQL:
    """Open the transaction, lock *tables*, waiting at most *wait* seconds for
    others to let go, and learn the transaction's id (to tell later whether it
    committed). :meth:`Emptying.run` ends it; :func:`rollback` on failure."""
    names = ", ".join(name for t in tables for name in t.names())
    lock = f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE;\n" if names else ""
    return sql.SQL(
        f"BEGIN;\nSET LOCAL lock_timeout = {max(1, int(wait * 1000))};\n{lock}"
        "SELECT pg_current_xact_id()::text"
    )


def begin(conn: psycopg.Connection[Any], tables: Sequence[Table], *, wait: float) -> str:
    """Run :func:`begin_statement`; the transaction's id."""
    cursor = conn.execute(begin_statement(tables, wait=wait))
    while cursor.description is None and cursor.nextset():
        pass
    row = cursor.fetchone()
    assert row is not None
    return str(row[0])


def rollback(conn: psycopg.Connection[Any]) -> None:
    """End a transaction that :func:`begin` opened and that failed."""
    import psycopg

    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):  # a broken connection rolls back anyway
        conn.execute("ROLLBACK")


#: Whether a transaction committed: 'committed', 'aborted' or 'in progress'.
XACT_STATUS_SQL = "SELECT pg_xact_status(%s::xid8)"


class Restore(NamedTuple):
    """Baseline rows to put back into one leaf: an array of its row type."""

    leaf: Leaf
    #: the columns written (generated columns are computed again)
    columns: tuple[str, ...]
    #: the rows, as the text of an array of the relation's row type
    rows: str
    row_count: int

    def statement(self, conn: psycopg.Connection[Any]) -> str:
        cols = ", ".join(sql.Identifier(c).as_string(conn) for c in self.columns)
        picked = ", ".join(f"r.{sql.Identifier(c).as_string(conn)}" for c in self.columns)
        literal = sql.Literal(self.rows).as_string(conn)
        return (
            f"INSERT INTO {self.leaf.quoted} ({cols}) OVERRIDING SYSTEM VALUE "
            f"SELECT {picked} FROM unnest({literal}::{self.leaf.quoted}[]) AS r"
        )


#: User triggers on INSERT of the given relations, and whether insert rules exist.
INSERT_TRIGGERS_SQL = """
SELECT t.tgrelid, t.tgname, t.tgenabled FROM pg_trigger t
WHERE t.tgrelid = ANY(%(oids)s::oid[]) AND NOT t.tgisinternal AND (t.tgtype & 4) <> 0
  AND t.tgenabled <> 'D'
UNION ALL
SELECT r.ev_class, r.rulename, 'rule' FROM pg_rewrite r
WHERE r.ev_class = ANY(%(oids)s::oid[]) AND r.ev_type = '3' AND r.ev_enabled <> 'D'
"""
_ENABLE = {"O": "ENABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}


def quiet_inserts(
    conn: psycopg.Connection[Any], restores: Sequence[Restore], *, replica: bool
) -> tuple[list[str], list[str]]:
    """Statements that keep user triggers from firing while baseline rows go back
    (a fresh migration's rows are restored, not inserted again), and those that
    enable them again as they were. Insert rules cannot be silenced: refused."""
    if not restores:
        return [], []
    by_oid = {r.leaf.oid: r.leaf for r in restores}
    rows = conn.execute(INSERT_TRIGGERS_SQL, {"oids": list(by_oid)}).fetchall()
    off: list[str] = []
    on: list[str] = []
    fires = {"R", "A"} if replica else {"O", "A"}
    for oid, name, enabled in rows:
        leaf = by_oid[oid]
        if enabled == "rule":
            if replica:
                continue
            raise TruncateError(
                f"cannot put back the seeded rows of {printable(leaf.key)}: it has the insert rule "
                f"{printable(name)!r}; run dbreset as a superuser, or drop the rule"
            )
        if enabled not in fires:
            continue
        trigger = sql.Identifier(name).as_string(conn)
        off.append(f"ALTER TABLE {leaf.quoted} DISABLE TRIGGER {trigger}")
        on.append(f"ALTER TABLE {leaf.quoted} {_ENABLE[enabled]} TRIGGER {trigger}")
    return off, on


class Emptying:
    """What one transaction does to put the tables back, and what it found doing it.

    A plain class (a dataclass costs a millisecond to define at import)."""

    def __init__(
        self,
        *,
        truncate: Sequence[Table] = (),
        delete: Sequence[Table] = (),
        restore: Sequence[Restore] = (),
        replica: bool = False,
        restart: Sequence[Sequence_] = (),
        put_back: Sequence[Sequence_] = (),
        expected: Mapping[str, Expected] | None = None,
        matviews: Sequence[tuple[Matview, bool]] = (),
    ) -> None:
        self.truncate = truncate
        #: deleted from in this order (referencing tables first)
        self.delete = delete
        #: baseline rows put back, in this order (referenced tables first)
        self.restore = restore
        #: foreign keys are not checked (superuser: session_replication_role = replica)
        self.replica = replica
        #: sequences to set to their baseline
        self.restart = restart
        #: sequences not called, as in the baseline (before PostgreSQL 18): set
        #: to their baseline unread
        self.put_back = put_back
        #: the baseline of each sequence (by ``schema.name``); default: its start
        self.expected = expected
        #: materialized views to refresh: (view, WITH DATA?)
        self.matviews: Sequence[tuple[Matview, bool]] = matviews
        #: populated materialized views, when only the DELETEs tell whether any
        #: table had rows: refreshed if one had, else those that are not empty
        self.matviews_unless_clean: Sequence[Matview] = ()
        #: statements around the restore that silence user triggers, and revive them
        self.quiet: tuple[list[str], list[str]] = ([], [])
        #: after :meth:`run`: rows deleted, per table oid
        self.deleted: dict[int, int] = {}
        #: True once the message holding COMMIT has been sent
        self.committing = False

    def _deletes(self) -> list[tuple[int, str]]:
        return [(t.oid, f"DELETE FROM {name}") for t in self.delete for name in t.names()]

    def _emptying(self, conn: psycopg.Connection[Any]) -> list[str]:
        """TRUNCATE (no CASCADE: the plan proved it is not needed, and PostgreSQL
        checks again), DELETE in the order given, then the baseline rows back."""
        out: list[str] = []
        names = [name for t in self.truncate for name in t.names()]
        if names:
            out.append("TRUNCATE TABLE " + ", ".join(names))
        deletes = [statement for _, statement in self._deletes()]
        if not deletes and not self.restore:
            return out
        if self.replica:
            # Every table that references a table deleted from is emptied in this
            # transaction too, or keeps rows that the restore puts back with the
            # same keys, so foreign-key checks would find nothing; in a new
            # session each plans its query first (~1 ms per foreign key).
            # Superusers skip them, and user triggers (tables with DELETE
            # triggers or rules are never deleted from).
            out.append("SET LOCAL session_replication_role = replica")
        elif self.restore:
            out.append("SET CONSTRAINTS ALL DEFERRED")
        out.extend(deletes)
        if self.restore:
            out.extend(self.quiet[0])
            out.extend(r.statement(conn) for r in self.restore)
            out.extend(self.quiet[1])
        if self.replica:
            out.append("SET LOCAL session_replication_role = origin")
        elif self.restore:
            out.append("SET CONSTRAINTS ALL IMMEDIATE")  # checked before setval
        return out

    def _last(self) -> list[str]:
        """Matview refreshes; ``setval`` of every sequence to restart or put back;
        COMMIT, in the same message.

        ``setval`` leaves a sequence as ``ALTER SEQUENCE ... RESTART`` does, at a
        twentieth of the cost (no new file), but cannot be rolled back. It runs
        after everything that could fail, and the COMMIT travels with it: once
        the server has this message, the client going away cannot split them. A
        sequence put back that was at its baseline is unchanged, so doing that
        unread, and again, is safe.
        """
        out = [
            f"REFRESH MATERIALIZED VIEW {v.quoted}" + ("" if data else " WITH NO DATA")
            for v, data in self.matviews
        ]
        setval = [*self.restart, *self.put_back]
        if setval:
            p = _sequence_params(setval, self.expected)
            out.append(
                "SELECT count(setval(t.oid, t.last, t.called)) FROM "
                f"unnest('{p['oids']}'::oid[], '{p['lasts']}'::bigint[], '{p['called']}'::bool[]) "
                "AS t(oid, last, called)"
            )
        return [*out, "COMMIT"]

    def run(self, conn: psycopg.Connection[Any]) -> None:
        """Inside :func:`begin`'s transaction, in one round trip (two when the
        matviews wait for the DELETEs), committing it; reads each DELETE's row
        count."""
        if self.matviews_unless_clean:
            self._execute(conn, self._emptying(conn))
            if any(self.deleted.values()):
                self.matviews = [(v, True) for v in self.matviews_unless_clean]
            else:
                stale = nonempty_matviews(conn, self.matviews_unless_clean)
                self.matviews = [(v, True) for v in self.matviews_unless_clean if v.oid in stale]
            self.committing = True
            self._execute(conn, self._last())
        else:
            statements = self._emptying(conn) + self._last()
            self.committing = True
            self._execute(conn, statements)

    def _execute(self, conn: psycopg.Connection[Any], statements: list[str]) -> None:
        if not statements:
            return
        cursor = conn.execute(sql.SQL(";\n".join(statements)))
        deletes = iter(self._deletes())
        while True:
            status = cursor.statusmessage or ""
            if status.startswith("DELETE "):
                oid = next(deletes)[0]
                self.deleted[oid] = self.deleted.get(oid, 0) + int(status.split()[1])
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
    oids = [oid for t in tables for oid in (t.oid, *(leaf.oid for leaf in t.leaves))]
    rows = conn.execute(BLOCKERS_SQL, {"oids": oids}).fetchall()
    return [Holder(*row) for row in rows]


SERVER_SQL = "SELECT current_setting('server_version'), current_database()"

#: Whether the server's WAL position can tell that nothing changed: a primary,
#: and none of these relations unlogged (their changes write no WAL).
WAL_WATCH_SQL = """
SELECT NOT pg_is_in_recovery() AND NOT EXISTS (
    SELECT FROM pg_class WHERE oid = ANY(%(oids)s::oid[]) AND relpersistence = 'u')
"""
WAL_LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"


# --------------------------------------------------------------------------- baselines
# Read on a database freshly migrated from empty (the pristine database): the
# rows of every relation that holds any, every sequence's state, every
# materialized view's. Relations are leaf relations (ordinary tables, leaf
# partitions), named by schema and name: oids differ from database to database.

#: Relations of the user's schemas that hold rows after migrating, with their
#: columns, and every materialized view (populated or not).
BASELINE_RELATIONS_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relispopulated
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't'
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
                  AND e.objid = c.oid AND e.deptype = 'e')
  AND (c.relkind = 'm' OR c.relpages > 0 OR pg_relation_size(c.oid) > 0)
ORDER BY n.nspname, c.relname
"""

BASELINE_SEQUENCES_SQL = """
SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY n.nspname, c.relname
"""


def rows_text(conn: psycopg.Connection[Any], leaves: Sequence[Leaf]) -> dict[int, str]:
    """Each relation's rows as the text of an array of its row type (lossless:
    every type's own text form), in the order of :data:`ROWS_DIGEST`."""
    if not leaves:
        return {}
    query = " UNION ALL ".join(
        f'SELECT {leaf.oid}::oid, (SELECT coalesce(array_agg(r ORDER BY r::text COLLATE "C")'
        f"::text, '{{}}') FROM ONLY {leaf.quoted} r)"
        for leaf in leaves
    )
    return dict(conn.execute(sql.SQL(query)).fetchall())


def sequence_states(
    conn: psycopg.Connection[Any], sequences: Sequence[tuple[int, str]]
) -> dict[int, Expected]:
    """``last_value`` and ``is_called`` of each (oid, quoted name), read directly."""
    if not sequences:
        return {}
    query = " UNION ALL ".join(
        f"SELECT {oid}::oid, last_value, is_called FROM {quoted}" for oid, quoted in sequences
    )
    return {oid: Expected(int(last), bool(called)) for oid, last, called in conn.execute(query)}


# --------------------------------------------------------------------------- databases

#: Every database that carries dbreset's mark, with what ``dbreset list`` shows.
MARKED_DATABASES_SQL = """
SELECT d.datname, d.oid, shobj_description(d.oid, 'pg_database'),
       CASE WHEN has_database_privilege(d.oid, 'CONNECT') THEN pg_database_size(d.oid) END,
       (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid),
       d.datistemplate
FROM pg_database d
WHERE shobj_description(d.oid, 'pg_database') LIKE '%dbreset:%'
ORDER BY d.datname
"""


# --------------------------------------------------------------------------- session canary
# (pytest plugin) Nothing is created in the database: the canary compares the
# oid and relfilenode of every relation of the chosen schemas with a snapshot
# taken right after the reset. TRUNCATE, ALTER SEQUENCE ... RESTART, VACUUM
# FULL, a rewriting ALTER TABLE and DROP/CREATE all give a new relfilenode or
# oid; inserts, updates, deletes and nextval() do not.

#: Ordinary tables, partitioned tables and partitions, sequences, materialized views.
CANARY_SNAPSHOT_SQL = """
SELECT c.oid, c.relfilenode, n.nspname, c.relname, c.relkind,
       (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
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
