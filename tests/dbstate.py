"""The state of a database, relation by relation, and a readable diff of two.

"Reset" means: the database equals what ``alembic upgrade heads`` makes of an
empty one.  This module is how the tests prove it::

    expected = fresh_state(make_db, ini)          # a real migration, in a subprocess
    dirty_everything(url)                         # rows, seeded rows, sequences, matviews
    ...                                           # the reset under test
    assert_same_state(url, expected)              # AssertionError naming what differs

A :class:`DbState` holds, for the user schemas (never ``pg_catalog``,
``information_schema``, ``pg_toast`` or temporary schemas):

* the *shape* of every table, partitioned table, materialized view, view,
  foreign table and sequence: its kind, columns (name, type, NOT NULL,
  identity, generated, default) in order, constraints, indexes, the parent of
  a partition and the column owning a sequence;
* the *rows* of every relation that stores them, as a sorted multiset of their
  text form: ordinary and unlogged tables, each leaf partition under its own
  name (a partitioned parent has no rows of its own: ``FROM ONLY`` everywhere,
  so a row is counted exactly once, where it lives) and every populated
  materialized view.  The Alembic version table is an ordinary table here;
* every sequence's ``last_value`` and ``is_called`` (read from the sequence
  relation itself) with its type, start, increment, bounds and cycle flag;
* whether each materialized view is populated.

Rows are compared by their text form, read in a pinned session
(:data:`SESSION_SETTINGS`), so a database's own ``TimeZone`` or ``DateStyle``
cannot make equal rows differ, and sorted with ``COLLATE "C"``.  Relations are
named ``quote_ident(schema).quote_ident(name)``, as PostgreSQL prints them:
``public.role``, ``public."order"``, ``"refData"."Rate Quote"``.

:func:`dirty_everything` changes a migrated database everywhere a reset has
to undo, discovering tables and sequences from the catalogs.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

#: Settings of the session that reads a state: every value's text form
#: depends on them, so both sides of a comparison read with the same ones.
#: ``search_path`` is only ``pg_catalog`` so that type names, defaults and
#: index definitions come out schema-qualified, whatever the database's own.
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("search_path", "pg_catalog"),
)

#: How many missing and how many unexpected rows a diff shows per relation.
DEFAULT_LIMIT = 5

_KINDS = {
    ("r", "p"): "table",
    ("r", "u"): "unlogged table",
    ("p", "p"): "partitioned table",
    ("m", "p"): "materialized view",
    ("v", "p"): "view",
    ("f", "p"): "foreign table",
    ("S", "p"): "sequence",
    ("S", "u"): "unlogged sequence",
}

_USER_SCHEMAS = """
    n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
    AND n.nspname !~ '^pg_(toast_)?temp_'
    AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY (%(schemas)s::text[]))
"""

_CATALOG_QUERY = f"""
SELECT
    quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS display,
    n.nspname,
    c.relname,
    c.relkind::text,
    c.relpersistence::text,
    c.relispopulated,
    (SELECT string_agg(quote_ident(pn.nspname) || '.' || quote_ident(pc.relname), ', '
                       ORDER BY i.inhseqno)
       FROM pg_inherits i
       JOIN pg_class pc ON pc.oid = i.inhparent
       JOIN pg_namespace pn ON pn.oid = pc.relnamespace
      WHERE i.inhrelid = c.oid) AS parent,
    (SELECT coalesce(json_agg(json_build_array(
                a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                a.attidentity::text, a.attgenerated::text, pg_get_expr(d.adbin, d.adrelid))
              ORDER BY a.attnum), '[]'::json)
       FROM pg_attribute a
       LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        AND c.relkind <> 'S') AS columns,
    (SELECT coalesce(array_agg(k.def ORDER BY k.def COLLATE "C"), '{{}}')
       FROM (SELECT conname || ': ' || pg_get_constraintdef(oid) AS def
               FROM pg_constraint WHERE conrelid = c.oid) AS k) AS constraints,
    (SELECT coalesce(array_agg(pg_get_indexdef(x.indexrelid)
                               ORDER BY pg_get_indexdef(x.indexrelid) COLLATE "C"), '{{}}')
       FROM pg_index x WHERE x.indrelid = c.oid) AS indexes,
    (SELECT quote_ident(on_.nspname) || '.' || quote_ident(oc.relname)
            || '.' || quote_ident(oa.attname)
       FROM pg_depend dep
       JOIN pg_class oc ON oc.oid = dep.refobjid
       JOIN pg_namespace on_ ON on_.oid = oc.relnamespace
       JOIN pg_attribute oa ON oa.attrelid = dep.refobjid AND oa.attnum = dep.refobjsubid
      WHERE dep.classid = 'pg_class'::regclass AND dep.objid = c.oid
        AND dep.refclassid = 'pg_class'::regclass AND dep.refobjsubid > 0
        AND dep.deptype IN ('a', 'i')
      LIMIT 1) AS owned_by,
    format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_sequence s ON s.seqrelid = c.oid
WHERE c.relkind IN ('r', 'p', 'm', 'v', 'f', 'S') AND {_USER_SCHEMAS}
ORDER BY n.nspname COLLATE "C", c.relname COLLATE "C"
"""


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Column:
    """One column of a relation, as the catalogs describe it."""

    name: str
    type: str
    not_null: bool
    identity: str  # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    generated: str  # '' | 's' (STORED) | 'v' (VIRTUAL, PostgreSQL 18)
    default: str | None  # the default, or the generation expression

    def __str__(self) -> str:
        text = f"{self.name} {self.type}"
        if self.not_null:
            text += " NOT NULL"
        if self.identity:
            text += " GENERATED " + ("ALWAYS" if self.identity == "a" else "BY DEFAULT")
            text += " AS IDENTITY"
        if self.generated:
            kind = "STORED" if self.generated == "s" else "VIRTUAL"
            text += f" GENERATED ALWAYS AS ({self.default}) {kind}"
        elif self.default is not None:
            text += f" DEFAULT {self.default}"
        return text


@dataclass(frozen=True)
class Relation:
    """The shape of one relation: what a reset must never change."""

    name: str  # quote_ident(schema).quote_ident(relname)
    schema: str
    relname: str
    kind: str  # 'table', 'unlogged table', 'partitioned table', 'materialized view', ...
    columns: tuple[Column, ...] = ()
    constraints: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()
    parent: str | None = None  # partition of / inherits from
    owned_by: str | None = None  # sequences: schema.table.column
    populated: bool | None = None  # materialized views only

    @property
    def has_rows(self) -> bool:
        """Whether rows are read from it (tables and leaf partitions, populated matviews)."""
        if self.kind in ("table", "unlogged table"):
            return True
        return self.kind == "materialized view" and bool(self.populated)


@dataclass(frozen=True)
class SequenceState:
    """A sequence's definition and where it stands."""

    data_type: str
    start: int
    increment: int
    minvalue: int
    maxvalue: int
    cycle: bool
    last_value: int
    is_called: bool

    @property
    def next_value(self) -> int:
        """What ``nextval`` returns next (ignoring cycling at the bounds)."""
        return self.last_value + self.increment if self.is_called else self.last_value

    def __str__(self) -> str:
        return (
            f"last_value={self.last_value} is_called={str(self.is_called).lower()}"
            f" (nextval gives {self.next_value})"
        )


@dataclass(frozen=True)
class DbState:
    """Everything a reset must restore, keyed by relation name (see the module doc)."""

    relations: Mapping[str, Relation]
    rows: Mapping[str, tuple[str, ...]]  # sorted text forms; one entry per relation with rows
    sequences: Mapping[str, SequenceState]

    def diff(
        self,
        expected: DbState,
        *,
        schemas: Iterable[str] | None = None,
        ignore: Iterable[str] = (),
        limit: int = DEFAULT_LIMIT,
    ) -> StateDiff:
        """How this (actual) state differs from ``expected``; see :func:`diff_states`."""
        return diff_states(self, expected, schemas=schemas, ignore=ignore, limit=limit)

    def row_count(self, name: str) -> int:
        """The number of rows of a relation with rows (``KeyError`` for others)."""
        return len(self.rows[name])

    def populated(self, name: str) -> bool:
        """Whether a materialized view is populated."""
        return bool(self.relations[name].populated)


def snapshot(url: str, schemas: Iterable[str] | None = None) -> DbState:
    """Read the state of the database at ``url``: one connection, three round trips.

    ``schemas`` limits it to those schemas; by default every user schema.
    Read in one REPEATABLE READ, READ ONLY transaction, so rows and catalogs
    agree (sequences are not transactional: they are read in the same query).
    """
    wanted = sorted(set(schemas)) if schemas is not None else None
    with psycopg.connect(_libpq_url(url)) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.cursor() as cur:
            _pin_session(cur)
            cur.execute(_CATALOG_QUERY, {"schemas": wanted})
            relations: dict[str, Relation] = {}
            seq_params: dict[str, tuple[Any, ...]] = {}
            for row in cur.fetchall():
                rel = _relation(row)
                relations[rel.name] = rel
                if rel.kind.endswith("sequence"):
                    seq_params[rel.name] = tuple(row[11:17])
            rows, positions = _read_rows_and_sequences(cur, relations)
        conn.rollback()

    sequences = {name: _sequence(seq_params[name], positions[name]) for name in sorted(positions)}
    return DbState(relations=relations, rows=rows, sequences=sequences)


def _sequence(params: tuple[Any, ...], position: tuple[int, bool]) -> SequenceState:
    data_type, start, increment, minvalue, maxvalue, cycle = params
    return SequenceState(
        data_type, start, increment, minvalue, maxvalue, cycle, position[0], position[1]
    )


def _pin_session(cur: psycopg.Cursor[Any]) -> None:
    sets = sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, false)").format(sql.Literal(k), sql.Literal(v))
        for k, v in SESSION_SETTINGS
    )
    cur.execute(sql.SQL("SELECT {}").format(sets))


def _relation(row: Sequence[Any]) -> Relation:
    display, schema, relname, relkind, persistence, populated, parent = row[:7]
    columns, constraints, indexes, owned_by = row[7:11]
    kind = _KINDS.get((relkind, persistence), _KINDS.get((relkind, "p"), relkind))
    return Relation(
        name=display,
        schema=schema,
        relname=relname,
        kind=kind,
        columns=tuple(Column(*c) for c in columns),
        constraints=tuple(constraints),
        indexes=tuple(indexes),
        parent=parent,
        owned_by=owned_by,
        populated=populated if relkind == "m" else None,
    )


def _read_rows_and_sequences(
    cur: psycopg.Cursor[Any], relations: Mapping[str, Relation]
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[int, bool]]]:
    """Every relation's rows and every sequence's position in one UNION ALL query."""
    names = list(relations)
    parts: list[sql.Composable] = []
    for i, name in enumerate(names):
        rel = relations[name]
        ident = sql.Identifier(rel.schema, rel.relname)
        if rel.has_rows:
            only = sql.SQL("ONLY ") if rel.kind != "materialized view" else sql.SQL("")
            parts.append(
                sql.SQL(
                    "SELECT {i}::int, array_agg(ROW(r.*)::text ORDER BY ROW(r.*)::text"
                    ' COLLATE "C"), NULL::bigint, NULL::boolean FROM {only}{rel} AS r'
                ).format(i=sql.Literal(i), only=only, rel=ident)
            )
        elif rel.kind.endswith("sequence"):
            parts.append(
                sql.SQL("SELECT {i}::int, NULL::text[], last_value, is_called FROM {rel}").format(
                    i=sql.Literal(i), rel=ident
                )
            )
    rows: dict[str, tuple[str, ...]] = {}
    positions: dict[str, tuple[int, bool]] = {}
    if not parts:
        return rows, positions
    cur.execute(sql.SQL("\nUNION ALL\n").join(parts))
    for i, texts, last_value, is_called in cur.fetchall():
        name = names[i]
        if relations[name].has_rows:
            rows[name] = tuple(texts or ())
        else:
            positions[name] = (last_value, is_called)
    return rows, positions


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class Difference:
    """One way in which one relation differs: its shape, rows, sequence or presence."""

    relation: str
    kind: str
    aspect: str  # 'missing', 'unexpected', 'shape', 'rows', 'sequence', 'populated'
    summary: str
    details: tuple[str, ...] = ()

    def __str__(self) -> str:
        head = f"{self.relation} ({self.kind}): {self.summary}"
        return "\n".join([head, *(f"    {line}" for line in self.details)])


@dataclass(frozen=True)
class StateDiff:
    """All differences between an actual and an expected state; empty when equal."""

    differences: tuple[Difference, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.differences)

    def __len__(self) -> int:
        return len(self.differences)

    @property
    def relations(self) -> set[str]:
        """The names of the relations that differ."""
        return {d.relation for d in self.differences}

    def aspects(self, relation: str) -> set[str]:
        """How one relation differs: a subset of ``Difference.aspect`` values."""
        return {d.aspect for d in self.differences if d.relation == relation}

    def __str__(self) -> str:
        if not self.differences:
            return "the database states are equal"
        count = len(self.relations)
        lines = [
            f"the database state differs from the expected one in {count} relation"
            f"{'' if count == 1 else 's'} ('-' expected but missing, '+' present but not expected):"
        ]
        lines += [f"  {d}".replace("\n", "\n  ") for d in self.differences]
        return "\n".join(lines)


def _matches(rel: Relation, patterns: Sequence[str]) -> bool:
    plain = f"{rel.schema}.{rel.relname}"
    return any(
        fnmatch.fnmatchcase(candidate, pattern)
        for pattern in patterns
        for candidate in (rel.name, plain, rel.relname)
    )


def diff_states(
    actual: DbState,
    expected: DbState,
    *,
    schemas: Iterable[str] | None = None,
    ignore: Iterable[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> StateDiff:
    """Compare two states relation by relation.

    ``ignore`` holds globs matched against ``schema.name`` (plain or quoted as
    displayed) and the bare name: matching relations are left out entirely.
    ``schemas`` restricts the comparison to those schemas.  ``limit`` is how
    many missing and unexpected rows are shown per relation.
    """
    patterns = list(ignore)
    wanted = set(schemas) if schemas is not None else None
    out: list[Difference] = []
    for name in sorted(set(actual.relations) | set(expected.relations)):
        act = actual.relations.get(name)
        exp = expected.relations.get(name)
        rel = exp or act
        assert rel is not None
        if (wanted is not None and rel.schema not in wanted) or _matches(rel, patterns):
            continue
        if act is None:
            out.append(Difference(name, rel.kind, "missing", "expected but missing"))
            continue
        if exp is None:
            out.append(Difference(name, rel.kind, "unexpected", "present but not expected"))
            continue
        out += _shape_differences(act, exp)
        if name in actual.rows and name in expected.rows:
            rows = _row_difference(rel, actual.rows[name], expected.rows[name], limit)
            if rows is not None:
                out.append(rows)
        if name in actual.sequences and name in expected.sequences:
            seq = _sequence_difference(rel, actual.sequences[name], expected.sequences[name])
            if seq is not None:
                out.append(seq)
    return StateDiff(tuple(out))


def _shape_differences(act: Relation, exp: Relation) -> list[Difference]:
    out: list[Difference] = []
    if act.populated != exp.populated:
        out.append(
            Difference(
                exp.name,
                exp.kind,
                "populated",
                f"populated={str(act.populated).lower()}, "
                f"expected populated={str(exp.populated).lower()}",
            )
        )
    details: list[str] = []
    if act.kind != exp.kind:
        details.append(f"kind: {act.kind}, expected {exp.kind}")
    for label in ("parent", "owned_by"):
        a, e = getattr(act, label), getattr(exp, label)
        if a != e:
            details.append(f"{label}: {a}, expected {e}")
    for label, a_items, e_items in (
        ("column", [str(c) for c in act.columns], [str(c) for c in exp.columns]),
        ("constraint", list(act.constraints), list(exp.constraints)),
        ("index", list(act.indexes), list(exp.indexes)),
    ):
        if a_items == e_items:
            continue
        missing = [x for x in e_items if x not in a_items]
        extra = [x for x in a_items if x not in e_items]
        details += [f"- {label} {x}" for x in missing] + [f"+ {label} {x}" for x in extra]
        if not missing and not extra:
            details.append(f"{label} order: {a_items}, expected {e_items}")
    if details:
        out.append(Difference(exp.name, exp.kind, "shape", "shape differs", tuple(details)))
    return out


def _row_difference(
    rel: Relation, actual: tuple[str, ...], expected: tuple[str, ...], limit: int
) -> Difference | None:
    if actual == expected:
        return None
    have, want = Counter(actual), Counter(expected)
    missing = sorted((want - have).elements())
    extra = sorted((have - want).elements())
    summary = (
        f"{len(actual)} row{'' if len(actual) == 1 else 's'}, expected {len(expected)}: "
        f"{len(missing)} missing, {len(extra)} unexpected"
    )
    details: list[str] = []
    for sign, items in (("-", missing), ("+", extra)):
        details += [f"{sign} {text}" for text in items[:limit]]
        if len(items) > limit:
            details.append(f"{sign} ... and {len(items) - limit} more")
    return Difference(rel.name, rel.kind, "rows", summary, tuple(details))


def _sequence_difference(
    rel: Relation, actual: SequenceState, expected: SequenceState
) -> Difference | None:
    if actual == expected:
        return None
    details = [f"actual:   {actual}", f"expected: {expected}"]
    for label in ("data_type", "start", "increment", "minvalue", "maxvalue", "cycle"):
        a, e = getattr(actual, label), getattr(expected, label)
        if a != e:
            details.append(f"{label}: {a}, expected {e}")
    summary = (
        f"last_value={actual.last_value} is_called={str(actual.is_called).lower()}, "
        f"expected last_value={expected.last_value} "
        f"is_called={str(expected.is_called).lower()}"
    )
    return Difference(rel.name, rel.kind, "sequence", summary, tuple(details))


def assert_same_state(
    actual: str | DbState,
    expected: str | DbState,
    *,
    schemas: Iterable[str] | None = None,
    ignore: Iterable[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> None:
    """Fail with a readable diff unless the two states are equal.

    Either side is a URL (snapshotted here, limited to ``schemas``) or a
    :class:`DbState` taken before.
    """
    wanted = list(schemas) if schemas is not None else None
    act = actual if isinstance(actual, DbState) else snapshot(actual, schemas=wanted)
    exp = expected if isinstance(expected, DbState) else snapshot(expected, schemas=wanted)
    diff = diff_states(act, exp, schemas=wanted, ignore=ignore, limit=limit)
    if diff:
        raise AssertionError(str(diff))


# --------------------------------------------------------------------------- expected state


def alembic_upgrade(url: str, alembic_ini: str | Path, *, revision: str = "heads") -> None:
    """Run ``alembic upgrade <revision>`` in a subprocess, ``DATABASE_URL`` pointed at ``url``.

    The project's own ``env.py`` runs, as in real use; it must read
    ``DATABASE_URL`` (the example and the test projects do).  A failure
    raises ``AssertionError`` with Alembic's output, the password masked.
    """
    ini = Path(alembic_ini).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBRESET_")}
    env["DATABASE_URL"] = url
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", revision],
        cwd=ini.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        output = _mask(f"{done.stdout}\n{done.stderr}".strip(), url)
        raise AssertionError(
            f"alembic upgrade {revision} failed (exit {done.returncode}):\n{output}"
        )


def fresh_database(make_db: Callable[[], str], alembic_ini: str | Path) -> str:
    """A new database (from ``make_db``, e.g. the fixture), migrated to heads; its URL."""
    url = make_db()
    alembic_upgrade(url, alembic_ini)
    return url


def fresh_state(
    make_db: Callable[[], str],
    alembic_ini: str | Path,
    *,
    schemas: Iterable[str] | None = None,
) -> DbState:
    """The expected state: what ``alembic upgrade heads`` makes of an empty database."""
    return snapshot(fresh_database(make_db, alembic_ini), schemas=schemas)


def unique_database_name() -> str:
    """A name in the ``dbreset_test_*`` namespace the test suite may create and drop."""
    return f"dbreset_test_{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- dirty


@dataclass
class Dirtied:
    """What :func:`dirty_everything` changed, by relation name."""

    deleted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    inserted: list[str] = field(default_factory=list)
    advanced: list[str] = field(default_factory=list)  # sequences moved with nextval
    set_back: list[str] = field(default_factory=list)  # sequences moved with setval(.., false)
    refreshed: list[str] = field(default_factory=list)  # populated materialized views
    skipped: dict[str, str] = field(default_factory=dict)  # relation -> why not inserted

    @property
    def relations(self) -> set[str]:
        """Every relation changed directly (cascades and triggers may change more)."""
        return {
            *self.deleted,
            *self.updated,
            *self.inserted,
            *self.advanced,
            *self.set_back,
            *self.refreshed,
        }


_DIRTY_CATALOG = f"""
SELECT
    quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS display,
    n.nspname, c.relname, c.relkind::text, c.relispartition, c.relispopulated,
    (SELECT coalesce(json_agg(json_build_array(
                a.attname,
                format_type(a.atttypid, a.atttypmod),
                bt.typcategory::text,
                bt.typname::text,
                CASE WHEN bt.typtype = 'e' THEN
                    (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
                       FROM pg_enum e WHERE e.enumtypid = bt.oid) END,
                CASE WHEN bt.typname IN ('bpchar', 'varchar')
                     AND (CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END) > 4
                     THEN (CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END) - 4
                END,
                a.attnotnull,
                a.atthasdef,
                a.attidentity::text,
                a.attgenerated::text,
                EXISTS (SELECT FROM pg_constraint k
                         WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u', 'f')
                           AND a.attnum = ANY (k.conkey)))
              ORDER BY a.attnum), '[]'::json)
       FROM pg_attribute a
       JOIN pg_type t ON t.oid = a.atttypid
       JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
    (SELECT coalesce(json_agg(json_build_array(
                (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(f.conkey)
                        WITH ORDINALITY AS k(num, ord)
                        JOIN pg_attribute a ON a.attrelid = f.conrelid AND a.attnum = k.num),
                rn.nspname, rc.relname, rc.relkind::text,
                (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(f.confkey)
                        WITH ORDINALITY AS k(num, ord)
                        JOIN pg_attribute a ON a.attrelid = f.confrelid AND a.attnum = k.num))
              ORDER BY f.conname), '[]'::json)
       FROM pg_constraint f
       JOIN pg_class rc ON rc.oid = f.confrelid
       JOIN pg_namespace rn ON rn.oid = rc.relnamespace
      WHERE f.conrelid = c.oid AND f.contype = 'f' AND f.conparentid = 0) AS fks,
    s.seqincrement, s.seqmin, s.seqmax
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_sequence s ON s.seqrelid = c.oid
WHERE c.relkind IN ('r', 'p', 'm', 'S') AND {_USER_SCHEMAS}
ORDER BY n.nspname COLLATE "C", c.relname COLLATE "C"
"""


@dataclass(frozen=True)
class _Col:
    name: str
    type: str
    category: str
    typname: str
    labels: list[str] | None
    maxlen: int | None
    not_null: bool
    has_default: bool
    identity: str
    generated: str
    is_key: bool


class _Values:
    """Values of any common type, distinct on every call, as SQL expressions."""

    def __init__(self) -> None:
        self.k = 0

    def _text(self, col: _Col, k: int, *, alt: bool = False) -> str | None:
        cat, name = col.category, col.typname
        if col.labels is not None:
            if alt:
                return col.labels[1] if len(col.labels) > 1 else None
            return col.labels[0]
        if cat == "S":
            text = f"{chr(ord('a') + k % 26)}{k} dirty" if alt else f"{k} dirty"
            return text[: col.maxlen] if col.maxlen else text
        if cat == "N":
            return str(7000 + k + (1 if alt else 0))
        if cat == "B":
            return "false" if alt else "true"
        if cat == "D":
            return "2001-02-03 04:05:06+00" if alt else "2026-05-06 07:08:09+00"
        if cat == "T":
            return f"{k + (1 if alt else 0)} seconds"
        if cat == "I":
            return f"10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256 + (1 if alt else 0)}"
        if name in ("json", "jsonb"):
            return f'{{"dirty": {k + (1 if alt else 0)}}}'
        if name == "uuid":
            return f"00000000-0000-4000-8000-{k + (1 if alt else 0):012d}"
        if name == "bytea":
            return f"\\x{(k + (1 if alt else 0)) % 256:02x}"
        if cat == "A" and not alt:
            return "{}"
        if cat == "R" and not alt:
            return "empty"
        return None

    def value(self, col: _Col, *, alt: bool = False) -> sql.Composable | None:
        self.k += 1
        text = self._text(col, self.k, alt=alt)
        if text is None:
            return None
        return sql.SQL("CAST({} AS {})").format(sql.Literal(text), sql.SQL(col.type))


def dirty_everything(
    url: str,
    *,
    schemas: Iterable[str] | None = None,
    exclude: Iterable[str] = ("alembic_version",),
) -> Dirtied:
    """Change a migrated database everywhere a reset has to undo, in one transaction.

    Discovered from the catalogs, in the chosen schemas (default: all user
    schemas), leaving out relations matching ``exclude`` (globs, as for
    ``ignore``; by default the Alembic version table):

    * every table that holds rows (seeded by migrations) loses one row (the
      last, or the next that foreign keys allow) and has one row updated
      (the first column that accepts a changed value, non-key columns first);
    * every table gets one new row: partitioned tables through the parent
      (``inserted`` names the partition it lands in), foreign keys pointing
      at an existing row, NOT NULL columns without a default made up by
      type, the others left to their default or NULL.  Tables are retried
      until a round fills no more; the rest are in ``skipped`` with
      PostgreSQL's reason;
    * every sequence moves: alternately ``nextval`` and ``setval(seq, v,
      false)`` with a ``v`` away from where it stands;
    * every populated materialized view is refreshed.

    Deferrable constraints are checked immediately, so nothing fails at COMMIT.
    """
    patterns = list(exclude)
    wanted = sorted(set(schemas)) if schemas is not None else None
    done = Dirtied()
    values = _Values()
    with psycopg.connect(_libpq_url(url)) as conn, conn.transaction():
        cur = conn.cursor()
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute(_DIRTY_CATALOG, {"schemas": wanted})
        catalog = [r for r in cur.fetchall() if not _excluded(r[0], r[1], r[2], patterns)]
        tables = [r for r in catalog if r[3] in ("r", "p")]

        for row in tables:
            if row[3] == "r":
                _delete_and_update(conn, row, values, done)

        # Parents before children is not known in advance: retry what failed
        # (a foreign key to a table still empty) until a round fills nothing.
        pending = [r for r in tables if not r[4]]  # partitions: through the top parent
        errors: dict[str, str] = {}
        progress = True
        while pending and progress:
            failed = []
            for row in pending:
                landed, error = _insert(conn, row, values)
                if landed is not None:
                    done.inserted.append(landed)
                else:
                    errors[row[0]] = error or "?"
                    failed.append(row)
            progress = len(failed) < len(pending)
            pending = failed
        done.skipped = {r[0]: errors[r[0]] for r in pending}

        for i, row in enumerate(r for r in catalog if r[3] == "S"):
            _move_sequence(conn, row, advance=i % 2 == 0, done=done)

        for row in catalog:
            if row[3] == "m" and row[5]:
                ident = sql.Identifier(row[1], row[2])
                cur.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(ident))
                done.refreshed.append(row[0])
    return done


def _excluded(display: str, schema: str, relname: str, patterns: Sequence[str]) -> bool:
    rel = Relation(name=display, schema=schema, relname=relname, kind="")
    return _matches(rel, patterns)


def _columns(row: Sequence[Any]) -> list[_Col]:
    return [_Col(*c) for c in row[6]]


def _delete_and_update(
    conn: psycopg.Connection[Any], row: Sequence[Any], values: _Values, done: Dirtied
) -> None:
    display, schema, relname = row[0], row[1], row[2]
    ident = sql.Identifier(schema, relname)
    cur = conn.cursor()
    cur.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(ident))
    count = _first(cur)
    if count == 0:
        return
    if count >= 2:
        for offset in range(min(count - 1, 5)):
            stmt = sql.SQL(
                "DELETE FROM ONLY {t} WHERE ctid = "
                "(SELECT ctid FROM ONLY {t} ORDER BY ctid DESC LIMIT 1 OFFSET {n})"
            ).format(t=ident, n=sql.Literal(offset))
            if _try(conn, stmt) == 1:
                done.deleted.append(display)
                break
    columns = [c for c in _columns(row) if not c.generated and not c.identity]
    columns.sort(key=lambda c: c.is_key)
    for col in columns:
        first, second = values.value(col), values.value(col, alt=True)
        if first is None or second is None:
            continue
        name = sql.Identifier(col.name)
        stmt = sql.SQL(
            "UPDATE ONLY {t} SET {c} = CASE WHEN {c} IS NOT DISTINCT FROM {x} THEN {y} ELSE {x} END"
            " WHERE ctid = (SELECT ctid FROM ONLY {t} ORDER BY ctid LIMIT 1)"
        ).format(t=ident, c=name, x=first, y=second)
        if _try(conn, stmt) == 1:
            done.updated.append(display)
            return


_RETURNING_WHERE = sql.SQL(
    "RETURNING (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = _target.tableoid)"
)


def _insert(
    conn: psycopg.Connection[Any], row: Sequence[Any], values: _Values
) -> tuple[str | None, str | None]:
    """Insert one row: (the relation it landed in, a partition maybe; PostgreSQL's error)."""
    ident = sql.Identifier(row[1], row[2])
    from_fk: dict[str, sql.Composable] = {}
    joins: list[sql.Composable] = []
    for j, (cols, ref_schema, ref_name, ref_kind, ref_cols) in enumerate(row[7]):
        alias = sql.Identifier(f"_fk{j}")
        picked = [(c, r) for c, r in zip(cols, ref_cols, strict=True) if c not in from_fk]
        if not picked:
            continue
        only = sql.SQL("") if ref_kind == "p" else sql.SQL("ONLY ")
        joins.append(
            sql.SQL(
                "LEFT JOIN LATERAL (SELECT {cols} FROM {only}{ref} LIMIT 1) AS {a} ON true"
            ).format(
                cols=sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(sql.Identifier(r), sql.Identifier(f"c{n}"))
                    for n, (_, r) in enumerate(picked)
                ),
                only=only,
                ref=sql.Identifier(ref_schema, ref_name),
                a=alias,
            )
        )
        for n, (c, _) in enumerate(picked):
            from_fk[c] = sql.SQL("{}.{}").format(alias, sql.Identifier(f"c{n}"))
    names: list[sql.Composable] = []
    exprs: list[sql.Composable] = []
    for col in _columns(row):
        if col.generated or col.identity:
            continue
        if col.name in from_fk:
            expr: sql.Composable | None = from_fk[col.name]
        elif col.has_default or not col.not_null:
            continue
        else:
            expr = values.value(col)
        if expr is None:
            return None, f"cannot make up a value of type {col.type} for column {col.name}"
        names.append(sql.Identifier(col.name))
        exprs.append(expr)
    stmt: sql.Composed
    if names:
        stmt = sql.SQL(
            "INSERT INTO {t} AS _target ({names})"
            " SELECT {exprs} FROM (SELECT) AS _base {joins} {ret}"
        ).format(
            t=ident,
            names=sql.SQL(", ").join(names),
            exprs=sql.SQL(", ").join(exprs),
            joins=sql.SQL(" ").join(joins),
            ret=_RETURNING_WHERE,
        )
    else:
        stmt = sql.SQL("INSERT INTO {t} AS _target DEFAULT VALUES {ret}").format(
            t=ident, ret=_RETURNING_WHERE
        )
    try:
        with conn.transaction():
            landed = conn.execute(stmt).fetchone()
    except psycopg.Error as exc:
        return None, str(exc).splitlines()[0]
    if landed is None:  # a BEFORE trigger or a rule swallowed it
        return None, "the INSERT inserted no row"
    return str(landed[0]), None


def _move_sequence(
    conn: psycopg.Connection[Any], row: Sequence[Any], *, advance: bool, done: Dirtied
) -> None:
    display = row[0]
    ident = sql.Identifier(row[1], row[2])
    increment, low, high = row[8], row[9], row[10]
    if advance and _try(conn, sql.SQL("SELECT nextval({})").format(sql.Literal(display))):
        done.advanced.append(display)
        return
    cur = conn.cursor()
    cur.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(ident))
    last_value, is_called = cur.fetchone() or (0, False)
    for candidate in (
        last_value + 37 * increment,
        last_value - 37 * increment,
        low,
        high,
    ):
        if low <= candidate <= high and (candidate, False) != (last_value, is_called):
            stmt = sql.SQL("SELECT setval({}, {}, false)").format(
                sql.Literal(display), sql.Literal(candidate)
            )
            if _try(conn, stmt):
                done.set_back.append(display)
                return


def _try(conn: psycopg.Connection[Any], stmt: sql.Composed) -> int:
    """Run a statement in a savepoint; its row count, or 0 when it failed."""
    try:
        with conn.transaction():
            cur = conn.execute(stmt)
    except psycopg.Error:
        return 0
    return int(cur.rowcount)


def _first(cur: psycopg.Cursor[Any]) -> Any:
    row = cur.fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------- URLs


def _libpq_url(url: str) -> str:
    """A SQLAlchemy-style URL (``postgresql+psycopg://``) as libpq reads it."""
    parts = urlsplit(url)
    if "+" in parts.scheme:
        parts = parts._replace(scheme="postgresql")
    return urlunsplit(parts)


def _mask(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (raw and percent-decoded) replaced by ***."""
    password = urlsplit(url).password
    if not password:
        return text
    for secret in {password, unquote(password)}:
        text = text.replace(secret, "***")
    return text
