"""Helpers for tests that run the pytest plugin for real: a project in
``pytester.path`` (an Alembic project, a ``pyproject.toml``), pytest in a
subprocess, ``dbreset`` as a command, and the databases on the server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

#: Printed by xdist once workers exist: none of it may appear when the plugin
#: ends a run in the controller.
WORKERS_STARTED = ("[gw0]", "[gw1]", "bringing up nodes", "created: ")

PYPROJECT = """\
[tool.pytest.ini_options]
dbreset = true
{ini}
"""

#: The example project's settings (tests/test_plugin.py uses the same).
EXAMPLE_DBRESET = """
[tool.dbreset]
schemas = ["public", "audit"]
exclude = ["country_*"]
"""


def write_project(path: Path, name: str, *, ini: str = "", dbreset: str | None = None) -> Path:
    """*path* as a project: the Alembic project *name* (``example`` or one of
    tests/projects), and a pyproject.toml with ``dbreset = true`` and *ini*."""
    from conftest import copy_project

    copy_project(name, path)
    if dbreset is None:
        dbreset = EXAMPLE_DBRESET if name == "example" else ""
    (path / "pyproject.toml").write_text(PYPROJECT.format(ini=ini) + dbreset)
    return path


def clean_environment(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """No URL and no dbreset setting from the outer run; a cache of its own."""
    for name in list(os.environ):
        if (name.startswith("DBRESET_") and name != "DBRESET_TEST_URL") or name in (
            "DATABASE_URL",
            "PYTEST_ADDOPTS",
            "PYTEST_XDIST_WORKER",
            "PYTEST_XDIST_WORKER_COUNT",
        ):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(pytester.path / ".xdg-cache"))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def dbreset_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in output(result).splitlines() if line.startswith("dbreset:")]


def exit_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in output(result).splitlines() if line.startswith("Exit:")]


def assert_ended_before_any_worker(result: pytest.RunResult, status: int) -> str:
    """The run ended in the controller with one line; that line."""
    text = output(result)
    assert result.ret == status, text
    (line,) = exit_lines(result)
    assert "INTERNALERROR" not in text and "Traceback" not in text, text
    for sign in WORKERS_STARTED:
        assert sign not in text, text
    return line


def popen_pytest(cwd: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """A pytest run in the background, in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def dbreset_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dbreset ARGS`` as a command, in *cwd*, with the current environment."""
    return subprocess.run(
        [sys.executable, "-m", "dbreset", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def databases(admin: psycopg.Connection, prefix: str) -> dict[str, int]:
    """The databases named *prefix* or ``<prefix>_...``, with their oids."""
    rows = admin.execute(
        "SELECT datname, oid FROM pg_database WHERE datname = %s OR starts_with(datname, %s)",
        (prefix, prefix + "_"),
    ).fetchall()
    return {str(name): int(oid) for name, oid in rows}
