"""The pytest plugin: reset the test database once per run, then guard the run.

Enabled with ``--dbreset`` or ``dbreset = true`` in the ini file; ``--no-dbreset``
and ``-p no:dbreset`` turn it off. When enabled, the controller process (the
only process of a plain run, the pytest-xdist controller with ``-n``) migrates
and empties the database in ``pytest_configure``: before xdist starts a worker
(it does so in its own ``trylast`` ``pytest_sessionstart``), and after the
``pytest_configure`` of the initial ``conftest.py`` files, which may still set
``DATABASE_URL``. Workers never reset.

The reset's connection then holds the database for the session (a shared
advisory lock): another reset, CLI or pytest, is refused or waits. The session
canary (fixture ``dbreset_canary``, or before every test with
``dbreset_canary = test``) fails when anything else has reset, truncated or
rebuilt the database since.

Hooks and fixtures only; the work is done by :mod:`dbreset.operations`, which is
imported when the plugin is enabled, never for ``--help`` and friends.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from dbreset.embedded import EmbeddedServer
    from dbreset.operations import Canary, CanarySnapshot, ResetResult, SessionGuard
    from dbreset.settings import Settings

__all__ = ["DbresetCanary"]

CANARY_MODES = ("off", "session", "test")
#: ``config.option`` names of the invocations that must never touch a database.
_INFORMATIONAL = (
    "help",
    "version",
    "markers",
    "showfixtures",
    "show_fixtures_per_test",
    "collectonly",
    "setupplan",
)
#: The key of what the controller hands to each xdist worker.
_WORKERINPUT_KEY = "dbreset_canary"


@dataclass
class _State:
    """What the plugin holds in one process between configure and unconfigure."""

    header: list[str] = field(default_factory=list)
    mode: str = "session"
    guard: SessionGuard | None = None
    server: EmbeddedServer | None = None
    snapshot: CanarySnapshot | None = None
    canary: Canary | None = None
    #: (variable, previous value) of an environment variable the plugin set
    exported: tuple[str, str | None] | None = None


_STATE = pytest.StashKey[_State]()


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "dbreset", "dbreset: reset the test database once per run, before any xdist worker"
    )
    group.addoption(
        "--dbreset",
        action="store_true",
        dest="dbreset",
        default=None,
        help="migrate and empty the test database once, before the tests (ini: dbreset = true)",
    )
    group.addoption(
        "--no-dbreset",
        action="store_false",
        dest="dbreset",
        help="do not reset the database, even when the ini file says dbreset = true",
    )
    group.addoption(
        "--dbreset-url",
        dest="dbreset_url",
        metavar="URL",
        help="database URL (default: $DBRESET_URL, then the variable named by "
        "dbreset_url_env, DATABASE_URL by default)",
    )
    group.addoption(
        "--dbreset-config",
        dest="dbreset_config",
        metavar="PATH",
        help="Alembic config file (ini: dbreset_alembic_config; default alembic.ini)",
    )
    group.addoption(
        "--dbreset-schema",
        dest="dbreset_schemas",
        action="append",
        default=[],
        metavar="SCHEMA",
        help="schema whose tables are emptied, repeatable (ini: dbreset_schemas; default public)",
    )
    group.addoption(
        "--dbreset-exclude",
        dest="dbreset_exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="table (or schema.table) glob to keep, repeatable (ini: dbreset_exclude)",
    )
    group.addoption(
        "--dbreset-wait",
        dest="dbreset_wait",
        metavar="SECONDS",
        help="wait this long for another test run or reset to finish (ini: dbreset_wait)",
    )
    group.addoption(
        "--dbreset-allow-remote",
        dest="dbreset_allow_remote",
        action="store_true",
        default=None,
        help="allow a database on a remote host (ini: dbreset_allowed_hosts)",
    )
    parser.addini("dbreset", "reset the test database once per run", type="bool", default=False)
    parser.addini(
        "dbreset_url_env", "environment variable with the database URL (default DATABASE_URL)"
    )
    parser.addini("dbreset_alembic_config", "Alembic config file (default alembic.ini)")
    parser.addini("dbreset_schemas", "schemas whose tables are emptied", type="linelist")
    parser.addini("dbreset_exclude", "table globs to keep", type="linelist")
    parser.addini("dbreset_allowed_hosts", "remote hosts dbreset may reset", type="linelist")
    parser.addini("dbreset_wait", "seconds to wait for another run or reset (default 5)")
    parser.addini(
        "dbreset_canary",
        "off, session (the dbreset_canary fixture) or test (also before every test)",
        default="session",
    )
    parser.addini(
        "dbreset_embedded",
        "start a throwaway PostgreSQL for the run when no URL is set (dbreset[embedded])",
        type="bool",
        default=False,
    )


def _enabled(config: pytest.Config) -> bool:
    flag = config.getoption("dbreset", None)
    if flag is not None:
        return bool(flag)
    return bool(config.getini("dbreset"))


def _informational(config: pytest.Config) -> bool:
    return any(getattr(config.option, name, False) for name in _INFORMATIONAL)


def _settings(config: pytest.Config) -> Settings:
    from dbreset.settings import resolve_settings

    option = config.option
    alembic_config = option.dbreset_config
    if alembic_config:  # relative to where pytest was started, like any path argument
        alembic_config = str(config.invocation_params.dir / alembic_config)
    flags = {
        "url": option.dbreset_url,
        "alembic_config": alembic_config,
        "schemas": option.dbreset_schemas,
        "exclude": option.dbreset_exclude,
        "wait": option.dbreset_wait,
        "allow_remote": option.dbreset_allow_remote,
    }
    ini = {
        key: config.getini(f"dbreset_{key}") or None
        for key in ("url_env", "alembic_config", "schemas", "exclude", "allowed_hosts", "wait")
    }
    label = config.inipath.name if config.inipath else "pytest ini"
    return resolve_settings(flags, cwd=config.rootpath, ini=ini, ini_label=label)


def _canary_mode(config: pytest.Config) -> str:
    from dbreset.errors import ConfigError

    mode = str(config.getini("dbreset_canary") or "session").strip().lower()
    if mode not in CANARY_MODES:
        raise ConfigError(f"dbreset_canary = {mode!r} in the ini file: use off, session or test")
    return mode


# --------------------------------------------------------------------------- reset


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config) or _informational(config):
        return
    state = _State()
    config.stash[_STATE] = state
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        _configure_worker(config, state, workerinput)
    else:
        _configure_controller(config, state)


def _configure_worker(config: pytest.Config, state: _State, workerinput: dict[str, Any]) -> None:
    """A worker never resets: it only checks the controller's snapshot."""
    handed = workerinput.get(_WORKERINPUT_KEY)
    if not handed:
        return
    from dbreset.operations import Canary, CanarySnapshot

    state.mode = str(handed["mode"])
    state.canary = Canary(CanarySnapshot.from_dict(handed["snapshot"]))
    if state.mode == "test":
        config.pluginmanager.register(_CanaryEachTest(), "dbreset-canary-each-test")


def _configure_controller(config: pytest.Config, state: _State) -> None:
    from dbreset.database import scrub
    from dbreset.errors import DbResetError

    settings = None
    try:
        settings = _settings(config)
        state.mode = _canary_mode(config)
        if settings.url is None and not config.getini("dbreset_embedded"):
            state.header.append(
                f"dbreset: skipped, no database URL (set {settings.url_env} or DBRESET_URL, "
                "pass --dbreset-url, or set dbreset_embedded = true in the ini file)"
            )
            return
        from dbreset import operations  # psycopg: only when there is work to do

        embedded = settings.url is None
        if embedded:
            settings = _start_embedded(config, state, settings)
        elif not os.environ.get(settings.url_env):
            _export(state, settings.url_env, settings.require_url())  # for the application
        result, state.guard = operations.reset_and_guard(settings, create=embedded)
        state.header.append(_describe(result))
        if state.mode != "off":
            state.snapshot = operations.canary_snapshot(
                state.guard.conn, settings.require_url(), settings.schemas
            )
            state.canary = operations.Canary(state.snapshot, conn=state.guard.conn)
    except DbResetError as exc:
        _teardown(state)
        pytest.exit(f"dbreset: {_pytest_flags(str(exc))}", returncode=exc.exit_code or 1)
    except Exception as exc:  # never an INTERNALERROR dump: one line, non-zero status
        _teardown(state)
        if type(exc).__name__ == "EmbeddedError":
            pytest.exit(f"dbreset: embedded PostgreSQL: {exc}", returncode=4)
        if config.getoption("verbose", 0) > 1:
            import traceback

            traceback.print_exc()
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = scrub(text, settings.url if settings is not None else None)
        pytest.exit(
            f"dbreset: unexpected {type(exc).__name__}: {text} (-vv shows the traceback)",
            returncode=1,
        )
    if state.mode == "test":
        config.pluginmanager.register(_CanaryEachTest(), "dbreset-canary-each-test")


def _pytest_flags(message: str) -> str:
    """The library's messages name the CLI's flags; name the plugin's instead."""
    message = message.replace("-c/--config PATH", "--dbreset-config PATH")
    return re.sub(r"(?<![\w-])--(url|wait|schema|exclude|allow-remote)\b", r"--dbreset-\1", message)


def _describe(result: ResetResult) -> str:
    def revs(revisions: tuple[str, ...]) -> str:
        return ", ".join(revisions) or "base"

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    migrated = result.migrate
    if migrated.upgraded:
        what = f"migrated {revs(migrated.before)} → {revs(migrated.after)}"
    else:
        what = f"at head {revs(migrated.after)}"
    emptied = result.truncate
    tables = count(len(emptied.emptied), "table")
    if emptied.emptied:
        rows = sum(t.rows for t in emptied.emptied)
        more = "+" if any(t.more for t in emptied.emptied) else ""
        tables += f" ({rows}{more} row{'' if rows == 1 and not more else 's'})"
    restarted = count(len(emptied.sequences_restarted), "sequence")
    parts = [what, f"emptied {tables}, restarted {restarted}"]
    if result.created:
        parts.insert(0, "created the database")
    return f"dbreset: reset {result.target} in {result.elapsed_ms:.0f} ms ({'; '.join(parts)})"


def _export(state: _State, name: str, value: str) -> None:
    """Set the URL variable for the application and for workers started later."""
    state.exported = (name, os.environ.get(name))
    os.environ[name] = value


# --------------------------------------------------------------------------- embedded server


def _embedded_dir(config: pytest.Config) -> Path:
    """Kept between runs, so a run after the first skips initdb. (As root, where
    'nobody' cannot reach it, :class:`~dbreset.embedded.EmbeddedServer` moves it.)"""
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("dbreset-embedded")) / "pgdata"
    return config.rootpath / ".cache" / "dbreset-embedded" / "pgdata"


def _start_embedded(config: pytest.Config, state: _State, settings: Settings) -> Settings:
    from urllib.parse import urlsplit, urlunsplit

    from dbreset.embedded import EmbeddedServer

    start = time.perf_counter()
    server = EmbeddedServer(_embedded_dir(config))
    url = server.start(watch_pid=os.getpid())
    if not server.reused:
        state.server = server  # stopped at the end; a server found running is not ours
    how = "reused the running server" if server.reused else "started"
    ms = (time.perf_counter() - start) * 1000
    state.header.append(f"dbreset: embedded PostgreSQL on {server.data_dir}, {how} in {ms:.0f} ms")
    name = re.sub(r"[^a-z0-9_]+", "_", config.rootpath.name.lower()).strip("_") or "dbreset"
    parts = urlsplit(url)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name[:50]}_test", parts.query, ""))
    _export(state, settings.url_env, url)  # workers inherit it, the application reads it
    return replace(settings, url=url, sources={**settings.sources, "url": "embedded server"})


# --------------------------------------------------------------------------- report & teardown


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = config.stash.get(_STATE, None)
    return state.header if state is not None and state.header else None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller, just before it starts a worker."""
    state = node.config.stash.get(_STATE, None)
    if state is not None and state.snapshot is not None:
        node.workerinput[_WORKERINPUT_KEY] = {
            "mode": state.mode,
            "snapshot": state.snapshot.to_dict(),
        }


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        _teardown(state)


def _teardown(state: _State) -> None:
    """Close the canary and the session guard, stop our server: idempotent."""
    import sys

    canary, state.canary = state.canary, None
    guard, state.guard = state.guard, None
    server, state.server = state.server, None
    for closing in (canary, guard):
        if closing is not None:
            with contextlib.suppress(Exception):  # a broken connection is closed anyway
                closing.close()
    if server is not None:
        try:
            server.stop()
        except Exception as exc:
            sys.stderr.write(f"dbreset: could not stop the embedded PostgreSQL: {exc}\n")
    if state.exported is not None:
        name, previous = state.exported
        state.exported = None
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# --------------------------------------------------------------------------- canary


class DbresetCanary:
    """The ``dbreset_canary`` fixture.

    ``check()`` fails the test when something other than this run's own reset
    has reset, truncated or rebuilt the database since: a raw ``TRUNCATE``, an
    old-style reset hook, ``DROP SCHEMA``, the database dropped and re-created.
    ``problem()`` returns that message instead (None while all is well). Both do
    nothing when dbreset is off, has no URL, or ``dbreset_canary = off``.
    One query on one connection per process: well under a millisecond.
    """

    def __init__(self, canary: Canary | None) -> None:
        self._canary = canary
        #: True once a check in this process has found the database changed
        self.fired = False

    @property
    def active(self) -> bool:
        return self._canary is not None

    def problem(self) -> str | None:
        if self._canary is None:
            return None
        problem = self._canary.verify()
        if problem is None:
            return None
        self.fired = True
        return f"dbreset: {problem}"

    def check(self) -> None:
        problem = self.problem()
        if problem:
            pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def dbreset_canary(pytestconfig: pytest.Config) -> Iterator[DbresetCanary]:
    """Fails when the database was reset/truncated/rebuilt by anything else during
    the session: checked when first requested, at the end of the session, and on
    every ``dbreset_canary.check()``. ``dbreset_canary = test`` in the ini file
    checks before every test."""
    state = pytestconfig.stash.get(_STATE, None)
    canary = DbresetCanary(state.canary if state is not None else None)
    canary.check()
    yield canary
    if not canary.fired:  # once is enough: the tests that saw it have failed already
        canary.check()


class _CanaryEachTest:
    """Registered when ``dbreset_canary = test``."""

    @pytest.fixture(autouse=True)
    def _dbreset_canary_before_each_test(self, dbreset_canary: DbresetCanary) -> None:
        dbreset_canary.check()
