"""The demo behind ``make demo``: a throwaway PostgreSQL, the example
migrations, some rows, then ``dbreset status`` → ``dbreset reset`` → ``dbreset status``.

With ``DBRESET_DEMO_URL`` set it uses that database instead of starting a
server (the database must exist; the demo never drops it).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEMO_DB = "dbreset_demo"


def show(*args: str, env: dict[str, str]) -> None:
    shown = [Path(args[0]).name, *args[1:]]
    print(f"\n$ {shlex.join(shown)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env)
    if done.returncode:
        sys.exit(f"demo: `{shlex.join(args)}` failed with exit code {done.returncode}")
    print(f"[{(time.perf_counter() - started) * 1000:.0f} ms]", flush=True)


def run_demo(url: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("DBRESET_URL", None)
    bin_dir = Path(sys.executable).parent
    dbreset = str(bin_dir / "dbreset")
    print("The example project (alembic.ini + migrations/) is configured in")
    print('pyproject.toml: [tool.dbreset] schemas = ["public", "audit"], exclude = ["country_*"]')
    show(dbreset, "migrate", env=env)
    show(sys.executable, "examples/seed.py", env=env)
    show(dbreset, "status", env=env)
    show(dbreset, "reset", "--yes", env=env)
    show(dbreset, "status", env=env)


def main() -> None:
    given = os.environ.get("DBRESET_DEMO_URL")
    if given:
        run_demo(given)
        return
    import psycopg
    from psycopg import sql

    from dbreset.embedded import EmbeddedServer

    data_dir = ROOT / ".cache" / "demo-pgdata"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with EmbeddedServer(data_dir) as server:
        print(
            f"Started a throwaway PostgreSQL in {(time.perf_counter() - started):.1f} s "
            f"(data in .cache/demo-pgdata, stopped when the demo ends)"
        )
        with psycopg.connect(server.url, autocommit=True) as conn:
            name = sql.Identifier(DEMO_DB)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
        parts = urlsplit(server.url)
        run_demo(urlunsplit(parts._replace(path=f"/{DEMO_DB}")))
    print("\nThe throwaway server has been stopped.")


if __name__ == "__main__":
    main()
