"""Worker databases: what preparing one database per xdist worker costs.

The ``write`` suite (bench/suites.py: every test commits a row to three
tables) run by real ``pytest -n N`` processes on the 200-table database, for
N in ``counts``, three ways, alternating within every round:

- ``shared``: ``pytest -n N --dbreset``: one reset of the target, the
  workers share it;
- ``worker, first run``: ``... --dbreset-isolation worker`` after the worker
  databases were dropped (outside the timing, by SQL on ``<target>_gw*``; the
  pristine database stays): the controller clones them from it;
- ``worker, warm``: the same again: it resets them in place (each holds the
  rows the previous run's tests committed, as it would).

Two figures per run: the whole pytest process (wall clock), and the
preparation as the plugin's header line reports it, measured inside the
controller (``dbreset: reset ... in X ms`` / ``dbreset: N worker databases
for ... in X ms (...)``). The issue's target: the warm run's preparation
costs at most 1.5 x the shared run's reset, as the median of the per-round
ratios. The worker figure also includes taking each worker database's canary
snapshot (the default ``dbreset_canary = session``), which the shared
figure does not (that snapshot is taken after its reset is timed).

After every run: the tests passed, each worker was on its own database
(the conftest checks ``current_database()``), and every database the run
used holds exactly the rows its tests committed, with ids 1..rows, every
other table and sequence as freshly migrated: the preparation left the
freshly migrated state.
"""

from __future__ import annotations

import re
from typing import Any

import suites
from common import (
    BIN,
    BenchError,
    Database,
    Server,
    count,
    derived_databases,
    drop_database,
    log,
    median_ms,
    paired_difference,
    paired_ratio,
    shown,
    sqlalchemy_url,
    timed_output,
    with_dbname,
)

TARGET_WARM_RATIO = 1.5
KINDS = ("shared", "worker, first run", "worker, warm")
SHARED_LINE = re.compile(r"^dbreset: reset \S+ in (\d+) ms", re.M)
WORKERS_LINE = re.compile(r"^dbreset: (\d+) worker databases? for \S+ in (\d+) ms \((.*)\)$", re.M)


def drop_workers(server: Server, db: Database) -> list[str]:
    """Drop the target's worker databases (``<target>_gw*``), keep the pristine one."""
    with server.admin() as conn:
        names = [
            n for n in derived_databases(conn, db.name, "gw") if n[len(db.name) + 3 :].isdigit()
        ]
        for name in names:
            drop_database(conn, name)
    return names


def bench_workers(
    server: Server,
    db: Database,
    rounds: int,
    env: dict[str, str],
    *,
    counts: tuple[int, ...] = (2, 4),
    tests: int = 8,
    warm_up: bool = True,
) -> dict[str, Any]:
    suite = suites.write_suite(db.project, "write", tests, db.project / "alembic.ini")
    env = {**env, "DATABASE_URL": sqlalchemy_url(db.url)}
    base = [str(BIN / "pytest"), "-p", "no:cacheprovider", "--dbreset"]
    variants = [(n, kind) for n in counts for kind in KINDS]

    def once(n: int, kind: str) -> tuple[float, float, str]:
        argv = [*base, "-n", str(n)]
        run_env = dict(env)
        if kind != "shared":
            argv += ["--dbreset-isolation", "worker"]
            run_env["BENCH_EXPECT_DB"] = "worker"
        if kind == "worker, first run":
            drop_workers(server, db)
        seconds, out = timed_output(argv, cwd=suite, env=run_env)
        if not re.search(rf"\b{tests} passed\b", out):
            raise BenchError(f"pytest -n {n} ({kind}): the suite did not pass:\n{out[-2000:]}")
        if kind == "shared":
            found = SHARED_LINE.search(out)
            if not found:
                raise BenchError(f"pytest -n {n} --dbreset: no 'dbreset: reset' line:\n{out}")
            prepared, what = float(found.group(1)), "reset"
        else:
            workers = WORKERS_LINE.search(out)
            if not workers or int(workers.group(1)) != n:
                raise BenchError(f"pytest -n {n} ({kind}): no '{n} worker databases' line:\n{out}")
            prepared, what = float(workers.group(2)), workers.group(3)
            want = "cloned" if kind == "worker, first run" else "reset"
            if any(want not in part for part in what.split(", gw")):
                raise BenchError(f"pytest -n {n} ({kind}): the workers were not {want}: {what}")
        _check(db, n, kind, tests)
        return seconds, prepared / 1000, what

    if warm_up:
        for n, kind in variants:
            once(n, kind)
    times: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
    prep: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
    said: dict[tuple[int, str], str] = {}
    for _ in range(rounds):
        for n, kind in variants:
            seconds, prepared, what = once(n, kind)
            times[(n, kind)].append(seconds)
            prep[(n, kind)].append(prepared)
            said[(n, kind)] = what
    rows = []
    for n, kind in variants:
        shared_t, shared_p = times[(n, "shared")], prep[(n, "shared")]
        rows.append(
            {
                "workers": n,
                "kind": kind,
                "prepare_median_ms": round(median_ms(prep[(n, kind)]), 1),
                "prepare_min_ms": round(min(prep[(n, kind)]) * 1000, 1),
                "prepare_max_ms": round(max(prep[(n, kind)]) * 1000, 1),
                "prepare_x_shared": round(paired_ratio(prep[(n, kind)], shared_p), 2),
                "process_median_ms": round(median_ms(times[(n, kind)]), 1),
                "process_vs_shared_ms": round(paired_difference(times[(n, kind)], shared_t), 1),
                "header": said[(n, kind)],
                "prepare_runs_ms": [round(v * 1000, 1) for v in prep[(n, kind)]],
                "process_runs_ms": [round(v * 1000, 1) for v in times[(n, kind)]],
            }
        )
    targets = [
        {
            "target": f"worker databases, warm run, -n {n}: preparation ≤ "
            f"{TARGET_WARM_RATIO} x one shared reset",
            "value": next(
                r["prepare_x_shared"]
                for r in rows
                if r["workers"] == n and r["kind"] == "worker, warm"
            ),
            "limit": TARGET_WARM_RATIO,
        }
        for n in counts
    ]
    for n in counts:
        line = ", ".join(
            f"{r['kind']} {r['prepare_median_ms']:.0f} ms ({r['prepare_x_shared']:.2f} x), "
            f"process {r['process_median_ms']:.0f} ms"
            for r in rows
            if r["workers"] == n
        )
        log(f"  workers -n {n}: preparation {line}")
    return {
        "measured": True,
        "tables": db.n,
        "tests": tests,
        "rounds": rounds,
        "rows": rows,
        "targets": targets,
    }


def _check(db: Database, n: int, kind: str, tests: int) -> None:
    """The run started from the freshly migrated state, in every database it used."""
    if kind == "shared":
        urls = [db.url]
    else:
        urls = [with_dbname(db.url, f"{db.name}_gw{i}") for i in range(n)]
    totals = dict.fromkeys(suites.WRITTEN, 0)
    for url in urls:
        state = suites.suite_state(url)
        bad = suites.state_problems(state, db.fresh)
        bad += db.leftovers(url=None if url == db.url else url, ignore=suites.ignored(state))
        if bad:
            raise BenchError(
                f"pytest -n {n} ({kind}) on {db.label}: {url.rsplit('/', 1)[-1]} was not "
                f"freshly migrated when the tests began: {shown(bad)}"
            )
        for table, s in state.items():
            totals[table] += s["rows"]
    if any(total != tests for total in totals.values()):
        raise BenchError(f"pytest -n {n} ({kind}): rows committed {totals}, expected {tests} each")


def markdown(w: dict[str, Any]) -> list[str]:
    if not w.get("measured"):
        return [f"Not measured: {w.get('why', 'not run')}."]
    lines = [
        f"The {w['tests']}-test `write` suite (each test commits a row to three tables) on the "
        f"{w['tables']}-table database, whole `pytest -p no:cacheprovider -n N --dbreset` "
        f"processes, median of {count(w['rounds'], 'round')}, variants alternating within "
        "each round. "
        "Preparation: what the plugin's header line reports, measured inside the controller "
        "(worker: includes each worker database's canary snapshot). x shared: median of the "
        "per-round ratios to the shared run's reset; Δ process: median of the per-round "
        "differences of whole pytest processes. First run: the worker databases were dropped "
        "before (outside the timing; the pristine database kept), so they are cloned from it.",
        "",
        "| -n | isolation | preparation ms | min | max | x shared | pytest process ms "
        "| Δ process ms | header says |",
        "|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in w["rows"]:
        lines.append(
            f"| {r['workers']} | {r['kind']} | {r['prepare_median_ms']:.0f} | "
            f"{r['prepare_min_ms']:.0f} | {r['prepare_max_ms']:.0f} | "
            f"{r['prepare_x_shared']:.2f} | {r['process_median_ms']:.0f} | "
            f"{r['process_vs_shared_ms']:+.0f} | {r['header']} |"
        )
    return lines
