"""Reset with seeded rows: what putting changed seeded tables back costs.

A project whose last migration seeds reference tables (genproject's
``seeded``): some small (``SMALL_ROWS`` rows each), some large
(``LARGE_ROWS``). Whole ``dbreset reset --yes -q`` processes, alternating
within every round, after one untimed warm-up each (``--json``, which also
says what the reset did):

- ``untouched``: nothing changed since the last reset; the reset restores
  nothing (it still compares every seeded table with its baseline);
- ``small changed``: one row UPDATEd in each small seeded table before the
  run (outside the timing): the reset puts all of them back;
- ``large changed``: likewise in each large seeded table;
- ``no seeded tables``: the same number of ordinary tables without seeded
  ones, clean at head (the existing ``clean`` case), for reference;
- ``floor``: bench/floor.py.

From the paired per-round differences against ``untouched`` (two cases, two
unknowns): the cost of one restored table and of 1,000 restored rows,
solved from ``Δsmall = Ks·t + Rs·r`` and ``Δlarge = Kl·t + Rl·r``. Both
from whole processes and from the time each reset reports for itself
(``in N ms``, without interpreter start-up, so steadier). After every run
the database is checked to be as freshly migrated, seeded rows included.
"""

from __future__ import annotations

import json
from typing import Any

from common import (
    BENCH,
    PYTHON,
    BenchError,
    Database,
    count,
    dbreset_argv,
    inside_ms,
    log,
    median_ms,
    paired_difference,
    paired_ratio,
    sqlalchemy_url,
    timed,
    timed_output,
)

SMALL_ROWS = 100
LARGE_ROWS = 5000
#: (small tables, large tables) in the full run and in --quick
LAYOUT = {False: (20, 4), True: (4, 1)}
QUICK_ROWS = (50, 1000)
CASES = ("floor", "no seeded tables", "untouched", "small changed", "large changed")


def layout(quick: bool) -> list[int]:
    """Rows of each seeded table: the small ones first."""
    small, large = LAYOUT[quick]
    small_rows, large_rows = QUICK_ROWS if quick else (SMALL_ROWS, LARGE_ROWS)
    return [small_rows] * small + [large_rows] * large


def _groups(db: Database) -> dict[str, list[Any]]:
    refs = db.schema.reference
    small_rows = min(r.rows for r in refs)
    return {
        "untouched": [],
        "small changed": [r for r in refs if r.rows == small_rows],
        "large changed": [r for r in refs if r.rows != small_rows],
    }


def bench_seeded(
    db: Database, plain: Database | None, rounds: int, env: dict[str, str]
) -> dict[str, Any]:
    """Time the cases; *plain*: the unseeded database of as many tables, if any."""
    env_seeded = {**env, "DATABASE_URL": sqlalchemy_url(db.url)}
    groups = _groups(db)
    cases = [c for c in CASES if c != "no seeded tables" or plain is not None]
    did: dict[str, dict[str, Any]] = {}

    def once(case: str, *, warm_up: bool = False) -> tuple[float, float | None]:
        if case == "floor":
            return timed([[PYTHON, str(BENCH / "floor.py"), db.url]], cwd=db.project, env=env), None
        if case == "no seeded tables":
            assert plain is not None
            argv = dbreset_argv(plain, "--json" if warm_up else "-q")
            envp = {**env, "DATABASE_URL": sqlalchemy_url(plain.url)}
            seconds, out = timed_output(argv, cwd=plain.project, env=envp)
            plain.verify(f"dbreset reset ({case})")
        else:
            if groups[case]:
                db.execute(db.schema.touch_sql(groups[case]))
            argv = dbreset_argv(db, "--json" if warm_up else "-q")
            seconds, out = timed_output(argv, cwd=db.project, env=env_seeded)
            db.verify(f"dbreset reset ({case})")
        if warm_up:
            result = json.loads(out)
            did[case] = _what_it_did(result)
            return seconds, float(result["elapsed_ms"])
        return seconds, inside_ms(out)

    if plain is not None:
        plain.verify("the benchmark")  # clean and at head: the existing 'clean' case
    for case in cases:
        once(case, warm_up=True)
    for case, refs in groups.items():
        want = (len(refs), sum(r.rows for r in refs))
        got = (did[case]["restored_tables"], did[case]["restored_rows"])
        if got != want:
            raise BenchError(
                f"seeded reset, {case}: restored {got[0]} tables ({got[1]} rows), "
                f"expected {want[0]} ({want[1]} rows)"
            )
    times: dict[str, list[float]] = {c: [] for c in cases}
    inside: dict[str, list[float]] = {c: [] for c in cases if c != "floor"}
    for _ in range(rounds):
        for case in cases:
            seconds, ms = once(case)
            times[case].append(seconds)
            if ms is not None:
                inside[case].append(ms / 1000)
    result = _summary(db, cases, groups, did, times, inside)
    log(
        "  seeded: "
        + ", ".join(f"{c} {median_ms(times[c]):.0f} ms" for c in cases)
        + f"; per restored table {result['per_table_ms']['process']:.2f} ms, per 1,000 "
        f"restored rows {result['per_1000_rows_ms']['process']:.2f} ms (inside: "
        f"{result['per_table_ms']['inside']:.2f}, {result['per_1000_rows_ms']['inside']:.2f})"
    )
    return result


def _what_it_did(result: dict[str, Any]) -> dict[str, Any]:
    truncate = result["truncate"]
    return {
        "restored_tables": len(truncate["restored"]),
        "restored_rows": sum(int(r["rows"]) for r in truncate["restored"]),
        "emptied_tables": len(truncate["emptied"]),
        "also_truncated": int(truncate["also_truncated"]),
        "sequences_restarted": len(truncate["sequences_restarted"]),
    }


def _solve(
    small: tuple[int, int], large: tuple[int, int], d_small: float, d_large: float
) -> tuple[float, float]:
    """(ms per table, ms per 1,000 rows) from two (tables, rows) cases and their costs."""
    ks, rs = small[0], small[1] / 1000
    kl, rl = large[0], large[1] / 1000
    det = ks * rl - kl * rs
    if det == 0:
        raise BenchError("the seeded cases do not separate tables from rows")
    return (d_small * rl - d_large * rs) / det, (ks * d_large - kl * d_small) / det


def _summary(
    db: Database,
    cases: list[str],
    groups: dict[str, list[Any]],
    did: dict[str, dict[str, Any]],
    times: dict[str, list[float]],
    inside: dict[str, list[float]],
) -> dict[str, Any]:
    base = times["untouched"]
    base_in = inside["untouched"]
    rows = []
    for case in cases:
        values = times[case]
        row: dict[str, Any] = {
            "case": case,
            "restored_tables": did.get(case, {}).get("restored_tables", 0),
            "restored_rows": did.get(case, {}).get("restored_rows", 0),
            "did": did.get(case),
            "median_ms": round(median_ms(values), 1),
            "min_ms": round(min(values) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
            "vs_untouched_ms": round(paired_difference(values, base), 1),
            "x_floor": round(paired_ratio(values, times["floor"]), 3),
            "runs_ms": [round(v * 1000, 1) for v in values],
        }
        if case in inside:
            row["inside_median_ms"] = round(median_ms(inside[case]), 1)
            row["inside_vs_untouched_ms"] = round(paired_difference(inside[case], base_in), 1)
        rows.append(row)
    by = {r["case"]: r for r in rows}
    small = (by["small changed"]["restored_tables"], by["small changed"]["restored_rows"])
    large = (by["large changed"]["restored_tables"], by["large changed"]["restored_rows"])
    per_table, per_rows = _solve(
        small, large, by["small changed"]["vs_untouched_ms"], by["large changed"]["vs_untouched_ms"]
    )
    per_table_in, per_rows_in = _solve(
        small,
        large,
        by["small changed"]["inside_vs_untouched_ms"],
        by["large changed"]["inside_vs_untouched_ms"],
    )
    seeded_rows = db.schema.seeded_rows
    check = None
    if "no seeded tables" in by:
        check = {
            "process_ms": round(paired_difference(base, times["no seeded tables"]), 1),
            "inside_ms": round(paired_difference(base_in, inside["no seeded tables"]), 1),
        }
    return {
        "measured": True,
        "label": db.label,
        "tables": db.schema.n_tables,
        "seeded_tables": len(db.schema.reference),
        "seeded_rows": seeded_rows,
        "small": {"tables": small[0], "rows_each": small[1] // max(1, small[0])},
        "large": {"tables": large[0], "rows_each": large[1] // max(1, large[0])},
        "referenced": sum(1 for r in db.schema.reference if r.referenced_by),
        "rounds": len(base),
        "rows": rows,
        "per_table_ms": {"process": round(per_table, 2), "inside": round(per_table_in, 2)},
        "per_1000_rows_ms": {"process": round(per_rows, 2), "inside": round(per_rows_in, 2)},
        "untouched_vs_unseeded_ms": check,
        "first_reset": db.first,
    }


def markdown(s: dict[str, Any]) -> list[str]:
    if not s.get("measured"):
        return [f"Not measured: {s.get('why', 'not run')}."]
    lines = [
        f"{s['label']} ({s['seeded_rows']:,} seeded rows: {s['small']['tables']} tables of "
        f"{s['small']['rows_each']:,} rows, {s['large']['tables']} of "
        f"{s['large']['rows_each']:,}; {s['referenced']} of them referenced by two other "
        "tables each). Whole `dbreset reset --yes -q` processes, median of "
        f"{count(s['rounds'], 'round')}, cases alternating within each round; before the 'changed' "
        "cases one row of each of those tables was UPDATEd (outside the timing). "
        "Δ: median of the per-round differences against `untouched`; inside: the time the "
        "reset reports for itself (no interpreter start-up).",
        "",
        "| case | restored tables | restored rows | median ms | min ms | max ms | Δ ms "
        "| inside ms | Δ inside ms | x floor |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in s["rows"]:
        inside = f"{r['inside_median_ms']:.0f}" if "inside_median_ms" in r else ""
        d_in = f"{r['inside_vs_untouched_ms']:+.1f}" if "inside_vs_untouched_ms" in r else ""
        lines.append(
            f"| {r['case']} | {r['restored_tables']} | {r['restored_rows']:,} | "
            f"{r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} | "
            f"{r['vs_untouched_ms']:+.1f} | {inside} | {d_in} | {r['x_floor']:.2f} |"
        )
    t, k = s["per_table_ms"], s["per_1000_rows_ms"]
    lines += [
        "",
        f"Restoring seeded tables: **{t['inside']:.1f} ms per restored table** and "
        f"**{k['inside']:.1f} ms per 1,000 restored rows** (from the times inside the "
        f"process; from whole processes {t['process']:.1f} ms and {k['process']:.1f} ms), "
        "solved from the two 'changed' cases: Δ = tables * per table + rows/1000 * per "
        "1,000 rows.",
    ]
    check = s.get("untouched_vs_unseeded_ms")
    if check:
        per = check["inside_ms"] / (s["seeded_rows"] / 1000) if s["seeded_rows"] else 0.0
        lines.append(
            f"A reset that restores nothing, seeded schema against the same tables without "
            f"seeded ones: {check['process_ms']:+.0f} ms whole process, "
            f"{check['inside_ms']:+.1f} ms inside ({per:.2f} ms per 1,000 seeded rows: "
            "every reset scans each seeded table: its row versions, or, when they changed, "
            "its rows, against the baseline)."
        )
    first = s.get("first_reset") or {}
    if first:
        lines.append(
            f"The first reset of this database, which built its pristine database: "
            f"{first['process_ms']:.0f} ms ({first['inside_ms']:.0f} ms inside); not in "
            "any round."
        )
    return lines
