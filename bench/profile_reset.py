"""Where the time of one ``dbreset reset`` goes, measured inside the process.

    python bench/profile_reset.py --json OUT -- reset --yes -q --url URL -c alembic.ini

Run it with the working directory and environment of the command being
profiled. It imports, in the order the console script does for a plain
``reset``, ``dbreset.console``, ``dbreset.render`` (rich stays unimported
unless stdout is a terminal), ``psycopg`` and the library modules, timing each;
then it wraps ``psycopg.connect`` and every ``Connection.execute`` to time each
round trip, and runs the command under cProfile. The figures go to ``OUT`` as
JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _timed_import(name: str) -> float:
    start = time.perf_counter()
    __import__(name)
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.command if a != "--"]

    imports: dict[str, float] = {}
    before = set(sys.modules)
    imports["dbreset.console"] = _timed_import("dbreset.console")
    imports["dbreset.render"] = _timed_import("dbreset.render")
    imports["psycopg"] = _timed_import("psycopg")
    imports["dbreset library (settings, database, postgres, migrations, operations)"] = (
        _timed_import("dbreset.operations")
    )

    import psycopg

    calls: list[dict[str, Any]] = []

    def record(kind: str, text: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            calls.append({"kind": kind, "sql": text, "ms": (time.perf_counter() - start) * 1000})

    def query_text(query: Any, conn: Any) -> str:
        if isinstance(query, (str, bytes)):
            text = query if isinstance(query, str) else query.decode()
        else:
            try:
                text = query.as_string(conn)
            except Exception:
                text = repr(query)
        text = " ".join(text.split())
        return text if len(text) <= 90 else text[:87] + "..."

    real_connect = psycopg.connect
    real_execute = psycopg.Connection.execute
    real_close = psycopg.Connection.close

    def connect(*a: Any, **kw: Any) -> Any:
        return record("connect", "connect", real_connect, *a, **kw)

    def execute(self: Any, query: Any, *a: Any, **kw: Any) -> Any:
        return record("query", query_text(query, self), real_execute, self, query, *a, **kw)

    def close(self: Any) -> Any:
        return record("close", "close", real_close, self)

    psycopg.connect = connect
    psycopg.Connection.execute = execute  # type: ignore[method-assign]
    psycopg.Connection.close = close  # type: ignore[method-assign]

    from dbreset.main import main as console_main

    sys.argv = ["dbreset", *argv]
    profile = cProfile.Profile()
    code: Any = 0
    start = time.perf_counter()
    profile.enable()
    try:
        console_main()
    except SystemExit as exc:
        code = exc.code
    finally:
        profile.disable()
    total = (time.perf_counter() - start) * 1000
    late = sorted(m for m in set(sys.modules) - before if "." not in m)

    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    stats.sort_stats("cumulative").print_stats(25)
    result = {
        "exit_code": code,
        "imports_ms": imports,
        "run_ms": total,
        "calls": calls,
        "top_level_modules_loaded": late,
        "typer_loaded": "typer" in sys.modules,
        "sqlalchemy_loaded": "sqlalchemy" in sys.modules,
        "alembic_loaded": "alembic" in sys.modules,
        "cprofile": stream.getvalue(),
    }
    args.json.write_text(json.dumps(result, indent=1))
    return 0 if code in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
