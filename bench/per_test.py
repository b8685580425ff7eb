"""Per-test cleaning: what ``dbreset_clean = test`` costs each test, next to
the usual ways of giving every test a clean database.

On the 200-table database, plain ``pytest -p no:cacheprovider --dbreset``
processes (no xdist) of two suites of ``tests`` tests (bench/suites.py):
``write`` (each test commits a row to three tables) and ``read`` (each test
only reads), each with and without ``--dbreset-clean test``, alternating
within every round. Two ways to the per-test cost:

- **inside** (the figure the targets use): the conftest times the setup of
  the ``dbreset_clean`` fixture, which is the whole per-test clean (one
  prepared check, then only the changed tables put back) in the test's own
  process; the first test's, which also plans and prepares the check once
  per session, is reported apart. Chosen because it measures exactly the
  per-test work, test by test, free of pytest's and Python's start-up noise,
  which on this machine swings by more than a whole suite's cleaning costs.
- **whole process**: (pytest with - pytest without) / tests, the median of
  the per-round differences: what a user's run pays in all, the once-per-
  session preparation included.

Next to them, timed directly with psycopg in a loop, one iteration per test:

- **template clone**: ``CREATE DATABASE <clone> TEMPLATE <pristine>`` then
  ``DROP DATABASE <clone>``, as pgtestdb and pytest-postgresql give each test
  its own database (the pristine database is the migrated template, nobody
  connected to it); the first clone is checked to be freshly migrated;
- **TRUNCATE**: one ``TRUNCATE <every table> RESTART IDENTITY CASCADE``, after
  committing a row to the same three tables (outside the timing).

Correctness: with ``--dbreset-clean test`` every ``write`` test asserts its
new ids are 1 (its tables were empty, their sequences restarted); every
``read`` test that the tables are empty; after each run the database holds
exactly what the last test(s) committed and is otherwise freshly migrated;
after the TRUNCATE loop it is freshly migrated.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import suites
from common import (
    BIN,
    BenchError,
    Database,
    Server,
    count,
    drop_database,
    log,
    median_ms,
    paired_difference,
    shown,
    sqlalchemy_url,
    timed_output,
    with_dbname,
)
from psycopg import sql

TARGET_CHANGED_MS = 5.0
TARGET_UNCHANGED_MS = 1.0
SUITES = ("write", "read")
AS_SHIPPED = "dbreset_clean = test"


class Variant(NamedTuple):
    suite: str
    clean: bool

    @property
    def changed(self) -> int:
        return len(suites.WRITTEN) if self.suite == "write" else 0

    @property
    def label(self) -> str:
        if not self.clean:
            return f"{self.suite} suite, dbreset_clean = off"
        return AS_SHIPPED


#: Alternating in every round.
VARIANTS = (
    Variant("write", False),
    Variant("write", True),
    Variant("read", False),
    Variant("read", True),
)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def bench_per_test(
    server: Server,
    db: Database,
    rounds: int,
    env: dict[str, str],
    workdir: Path,
    *,
    tests: int = 50,
    loops: tuple[int, int] = (10, 20),
    warm_up: bool = True,
) -> dict[str, Any]:
    env = {**env, "DATABASE_URL": sqlalchemy_url(db.url)}
    alembic_ini = db.project / "alembic.ini"
    dirs = {kind: suites.write_suite(db.project, kind, tests, alembic_ini) for kind in SUITES}
    base = [str(BIN / "pytest"), "-p", "no:cacheprovider", "--dbreset"]
    times_file = workdir / "per_test_times.json"

    def once(variant: Variant) -> tuple[float, list[list[Any]]]:
        argv = [*base, "--dbreset-clean", "test"] if variant.clean else base
        run_env = {**env, "BENCH_TIMES": str(times_file)}
        times_file.unlink(missing_ok=True)
        seconds, out = timed_output(argv, cwd=dirs[variant.suite], env=run_env)
        if not re.search(rf"\b{tests} passed\b", out):
            raise BenchError(f"{variant.label}: the suite did not pass:\n{out[-2000:]}")
        inside = json.loads(times_file.read_text()) if variant.clean else []
        if variant.clean and len(inside) != tests:
            raise BenchError(f"{variant.label}: {len(inside)} cleans timed, {tests} tests")
        _check_end(db, variant, tests, inside)
        return seconds, inside

    variants = list(VARIANTS)
    if warm_up:
        for variant in variants:
            once(variant)
    process: dict[Variant, list[float]] = {v: [] for v in variants}
    inside: dict[Variant, list[float]] = {v: [] for v in variants}
    reported: dict[Variant, list[float]] = {v: [] for v in variants}
    first: dict[Variant, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            seconds, per_test = once(variant)
            process[variant].append(seconds)
            if variant.clean:
                first[variant].append(per_test[0][0])
                inside[variant] += [t[0] for t in per_test[1:]]
                reported[variant] += [t[1] for t in per_test[1:] if t[1] is not None]
    db.verify("the per-test suites")  # the next --dbreset run has to reset the write suite's rows
    rows = []
    for variant in variants:
        if not variant.clean:
            continue
        without = next(v for v in variants if v.suite == variant.suite and not v.clean)
        per_process = paired_difference(process[variant], process[without]) / tests
        rows.append(
            {
                "method": variant.label,
                "tables_changed": variant.changed,
                "median_ms": round(statistics.median(inside[variant]), 3),
                "p90_ms": round(_p90(inside[variant]), 3),
                "reported_median_ms": round(statistics.median(reported[variant]), 3)
                if reported[variant]
                else None,
                "first_test_ms": round(statistics.median(first[variant]), 1),
                "per_test_whole_process_ms": round(per_process, 2),
                "samples": len(inside[variant]),
                "suite_without_ms": round(median_ms(process[without]), 0),
                "suite_with_ms": round(median_ms(process[variant]), 0),
            }
        )
    rows.append(_template_clone(server, db, loops[0]))
    rows.append(_truncate_loop(db, loops[1]))
    by = {(r["method"], r["tables_changed"]): r for r in rows}
    targets = [
        {
            "target": f"dbreset_clean = test: ≤ {TARGET_CHANGED_MS:.0f} ms per test that "
            "changes 3 tables (200 tables)",
            "value": by[(AS_SHIPPED, 3)]["median_ms"],
            "limit": TARGET_CHANGED_MS,
        },
        {
            "target": f"dbreset_clean = test: ≤ {TARGET_UNCHANGED_MS:.0f} ms per test that "
            "changes nothing (200 tables)",
            "value": by[(AS_SHIPPED, 0)]["median_ms"],
            "limit": TARGET_UNCHANGED_MS,
        },
    ]
    log(
        "  per-test: "
        + ", ".join(
            f"{r['method']} ({r['tables_changed']} changed) {r['median_ms']:.2f} ms" for r in rows
        )
    )
    return {
        "measured": True,
        "tables": db.n,
        "tests": tests,
        "rounds": rounds,
        "rows": rows,
        "targets": targets,
    }


def _check_end(db: Database, variant: Variant, tests: int, inside: list[list[Any]]) -> None:
    kind, clean = variant.suite, variant.clean
    state = suites.suite_state(db.url)
    bad = suites.state_problems(state, db.fresh)
    bad += db.leftovers(ignore=suites.ignored(state))
    want = 0 if kind == "read" else (1 if clean else tests)
    bad += [
        f"{t}: {s['rows']} rows, expected {want}" for t, s in state.items() if s["rows"] != want
    ]
    if clean and kind == "write":
        # every clean after the first found the last test's three tables
        bad += [
            f"a clean put back {t[2]} tables" for t in inside[1:] if t[2] != len(suites.WRITTEN)
        ]
    if clean and kind == "read":
        bad += [f"a clean put back {t[2]} tables" for t in inside[1:] if t[2]]
    if bad:
        raise BenchError(f"after the {variant.label} run on {db.label}: {shown(bad)}")


def _template_clone(server: Server, db: Database, loops: int) -> dict[str, Any]:
    """CREATE DATABASE ... TEMPLATE <pristine> + DROP DATABASE, per test."""
    template = str(db.first["pristine"])
    clone = f"{db.name}_tplclone"
    create = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(clone), sql.Identifier(template)
    )
    drop = sql.SQL("DROP DATABASE {}").format(sql.Identifier(clone))
    creates: list[float] = []
    drops: list[float] = []
    with server.admin() as conn:
        drop_database(conn, clone)
        try:
            for i in range(loops):
                start = time.perf_counter()
                conn.execute(create)
                creates.append(time.perf_counter() - start)
                if i == 0:  # outside the timing: the clone is freshly migrated
                    bad = db.leftovers(url=with_dbname(db.url, clone))
                    if bad:
                        raise BenchError(f"a clone of {template} is not fresh: {shown(bad)}")
                start = time.perf_counter()
                conn.execute(drop)
                drops.append(time.perf_counter() - start)
        finally:
            drop_database(conn, clone)
    per_test = [c + d for c, d in zip(creates, drops, strict=True)]
    return {
        "method": "template clone (CREATE DATABASE ... TEMPLATE + DROP DATABASE)",
        "tables_changed": None,
        "median_ms": round(median_ms(per_test), 1),
        "p90_ms": round(_p90(per_test) * 1000, 1),
        "create_median_ms": round(median_ms(creates), 1),
        "drop_median_ms": round(median_ms(drops), 1),
        "samples": loops,
    }


def _truncate_loop(db: Database, loops: int) -> dict[str, Any]:
    """One TRUNCATE of every table RESTART IDENTITY CASCADE per test."""
    write = (
        "INSERT INTO \"user\" (name) VALUES ('t'); INSERT INTO \"order\" (name) VALUES ('t'); "
        "INSERT INTO \"group\" (name) VALUES ('t')"
    )
    per_test: list[float] = []
    with psycopg.connect(db.url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        ).fetchall()
        names = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in tables)
        truncate = sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(names)
        for _ in range(loops):
            with conn.transaction():
                conn.execute(write)  # type: ignore[arg-type]
            start = time.perf_counter()
            conn.execute(truncate)
            per_test.append(time.perf_counter() - start)
    db.verify("the per-test TRUNCATE loop")
    return {
        "method": "TRUNCATE every table RESTART IDENTITY CASCADE",
        "tables_changed": 3,
        "median_ms": round(median_ms(per_test), 1),
        "p90_ms": round(_p90(per_test) * 1000, 1),
        "samples": loops,
    }


def markdown(p: dict[str, Any]) -> list[str]:
    if not p.get("measured"):
        return [f"Not measured: {p.get('why', 'not run')}."]
    lines = [
        f"{p['tables']}-table database. dbreset_clean = test: suites of {p['tests']} tests, "
        f"plain `pytest -p no:cacheprovider --dbreset` with and without "
        f"`--dbreset-clean test`, {count(p['rounds'], 'round')} alternating. Per test, inside: the "
        "setup of the `dbreset_clean` fixture timed by the suite's conftest (every test "
        "but the first of each run, all rounds pooled; the first test's, which plans and "
        "prepares the check once per session, is shown apart). Whole process: median of "
        "the per-round differences (with - without) / tests, that preparation included. "
        "Template clone and TRUNCATE: timed with psycopg in a loop, one iteration per test.",
        "",
        "| per-test method | tables the test changed | median ms per test | p90 ms "
        "| whole process ms per test | first test ms | samples |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in p["rows"]:
        changed = "-" if r["tables_changed"] is None else str(r["tables_changed"])
        whole = r.get("per_test_whole_process_ms")
        first = r.get("first_test_ms")
        method = r["method"]
        if "create_median_ms" in r:
            method += f" (create {r['create_median_ms']:.0f} + drop {r['drop_median_ms']:.0f})"
        lines.append(
            f"| {method} | {changed} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{'' if whole is None else f'{whole:.2f}'} | "
            f"{'' if first is None else f'{first:.0f}'} | {r['samples']} |"
        )
    return lines
