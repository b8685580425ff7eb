"""The demo behind ``make demo``: a throwaway PostgreSQL, the example
migrations, some rows and some changed reference rows, then ``dbreset status``
→ ``dbreset reset`` → ``dbreset status``: the rows the migrations seed come back;
then the pytest plugin on a small test suite (one shared database, then one
database per worker and a clean database for every test), and its canary
catching a ``TRUNCATE`` run from another terminal while the tests run.

With ``DBRESET_DEMO_URL`` set it uses that database instead of starting a
server (the database must exist; the demo never drops it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEMO_DB = "dbreset_demo_test"
BIN = Path(sys.executable).parent

# The throwaway test suite: the example project, with the plugin switched on.
PYPROJECT = """\
[tool.pytest.ini_options]
dbreset = true
dbreset_schemas = ["public", "audit"]
"""

TEST_SHOP = """\
import os

import psycopg


def scalar(query):
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        return conn.execute(query).fetchone()[0]


def test_no_order_is_left_over():
    assert scalar('SELECT count(*) FROM "order"') == 0


def test_reference_rows_from_the_migrations_are_kept():
    assert scalar("SELECT count(*) FROM country_codes") > 0


def test_the_first_user_gets_id_1():
    new_user = "INSERT INTO \\"UserProfile\\" (email, \\"displayName\\") VALUES ('a@b.c', 'A')"
    assert scalar(new_user + " RETURNING id") == 1
"""

TEST_WAIT = """\
import time
from pathlib import Path

HERE = Path(__file__).parent


def test_waits_for_the_other_terminal():
    (HERE / "waiting").touch()
    deadline = time.monotonic() + 60
    while not (HERE / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""

TRUNCATE = 'TRUNCATE "order", audit.event RESTART IDENTITY CASCADE'
CANARY = "dbreset: the database was reset/truncated/rebuilt during this session"


def fail(message: str) -> None:
    sys.exit(f"demo: {message}")


def show(*args: str, env: dict[str, str], cwd: Path = ROOT) -> None:
    print(f"\n$ {shlex.join([Path(args[0]).name, *args[1:]])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env)
    if done.returncode:
        fail(f"`{shlex.join(args)}` failed with exit code {done.returncode}")
    print(f"[{(time.perf_counter() - started) * 1000:.0f} ms]", flush=True)


def psql() -> str:
    try:
        from dbreset.embedded import binaries_dir

        return str(binaries_dir() / "psql")
    except Exception:
        return shutil.which("psql") or fail("no psql: install dbreset[embedded]") or ""


#: What a test run might leave: the migrations' reference rows changed.
CHANGE_SEEDED = (
    "DELETE FROM country_codes WHERE code = 'KE'; "
    "UPDATE country_regions SET name = 'Oceania' WHERE code = 'AP'"
)
COUNT_SEEDED = "SELECT count(*) AS countries FROM country_codes"


def run_cli(env: dict[str, str]) -> None:
    dbreset = str(BIN / "dbreset")
    print("The example project (alembic.ini + migrations/) is configured in")
    print('pyproject.toml: [tool.dbreset] schemas = ["public", "audit"]. Its first migration')
    print("seeds 12 countries in 4 regions: those rows are part of the freshly migrated state.")
    print("\nThe first reset builds the pristine database (migrated from empty, a template)")
    print("and migrates the target:")
    show(dbreset, "reset", "--yes", env=env)
    show(sys.executable, "examples/seed.py", env=env)
    show(psql(), "-q", env["DATABASE_URL"], "-c", CHANGE_SEEDED, env=env)
    show(dbreset, "status", env=env)
    show(dbreset, "reset", "--yes", env=env)
    show(psql(), env["DATABASE_URL"], "-c", COUNT_SEEDED, env=env)
    show(dbreset, "status", env=env)
    show(dbreset, "list", env=env)


def run_pytest(env: dict[str, str], suite: Path) -> None:
    pytest = str(BIN / "pytest")
    shutil.copy(ROOT / "alembic.ini", suite)
    shutil.copytree(
        ROOT / "migrations", suite / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    (suite / "pyproject.toml").write_text(PYPROJECT)
    (suite / "test_shop.py").write_text(TEST_SHOP)
    print("\n\nThe pytest plugin. A test suite in a new directory: the example project,")
    print("test_shop.py (three tests) and this pyproject.toml:\n")
    print("    " + PYPROJECT.rstrip().replace("\n", "\n    "))
    seed = [sys.executable, str(ROOT / "examples" / "seed.py")]
    subprocess.run(seed, env=env, check=True, stdout=subprocess.DEVNULL)
    print("\nThe database holds rows again (examples/seed.py), as a previous run would leave it.")
    show(pytest, "-n", "2", env=env, cwd=suite)
    print("\nOne database per worker (<db>_gw0, <db>_gw1: cloned the first time, reset in")
    print("place after), and the freshly migrated state before every test:")
    isolated = ["-n", "2", "--dbreset-isolation", "worker", "--dbreset-clean", "test"]
    show(pytest, *isolated, env=env, cwd=suite)
    show(pytest, *isolated, env=env, cwd=suite)

    print("\n\nThe canary. test_wait.py waits for a file named go; while it waits,")
    print("another terminal empties two tables behind the test run's back.")
    (suite / "test_wait.py").write_text(TEST_WAIT)
    print("\n[terminal 1]\n$ pytest -n 2", flush=True)
    with tempfile.TemporaryFile("w+") as out:
        run = subprocess.Popen([pytest, "-n", "2"], cwd=suite, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while not (suite / "waiting").exists():
                if run.poll() is not None or time.monotonic() > deadline:
                    out.seek(0)
                    fail(f"the test that waits never started:\n{out.read()}")
                time.sleep(0.05)
            print('\n[terminal 2]\n$ psql "$DATABASE_URL" -c ' + shlex.quote(TRUNCATE), flush=True)
            subprocess.run([psql(), env["DATABASE_URL"], "-c", TRUNCATE], env=env, check=True)
            print("$ touch go", flush=True)
            (suite / "go").touch()
            code = run.wait(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        out.seek(0)
        output = out.read()
    print("\n[terminal 1]")
    print(output, end="", flush=True)
    if code == 0 or CANARY not in output:
        fail(f"the canary did not fail the run (pytest exit code {code})")
    print(f"[pytest exit code {code}: the run failed, as it should]")


def run_demo(url: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("DBRESET_URL", None)
    run_cli(env)
    with tempfile.TemporaryDirectory(prefix="dbreset-demo-") as suite:
        run_pytest(env, Path(suite))


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
