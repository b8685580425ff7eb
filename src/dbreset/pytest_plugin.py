"""The pytest plugin: put the test database into its freshly migrated state once
per run, then guard the run.

Enabled with ``--dbreset`` or ``dbreset = true`` in the ini file; ``--no-dbreset``
and ``-p no:dbreset`` turn it off. When enabled, the controller process (the
only process of a plain run, the pytest-xdist controller with ``-n``) resets the
database in ``pytest_configure``: before xdist starts a worker (it does so in
its own ``trylast`` ``pytest_sessionstart``), and after the
``pytest_configure`` of the initial ``conftest.py`` files, which may still set
``DATABASE_URL``. Workers never reset the target.

With ``dbreset_isolation = worker`` each xdist worker gets its own database
(``<db>_gw0``, ...), prepared by the controller before any worker starts; each
worker's URL variables are pointed at it in ``pytest_load_initial_conftests``,
before the worker imports a conftest. With ``dbreset_clean = test`` every test
starts from the freshly migrated state, put back in the test's own process.

The reset's connection then holds the database for the session (a shared
advisory lock): another reset, CLI or pytest, is refused or waits. The session
canary fails the run when anything else has reset, truncated or rebuilt the
database since: checked at the end of the session in every process, and by the
``dbreset_canary`` fixture (before every test with ``dbreset_canary = test``).

Hooks and fixtures only; the work is done by :mod:`dbreset.session` and
:mod:`dbreset.operations`, imported when the plugin is enabled, never for
``--help`` and friends.
"""

from __future__ import annotations

import contextlib
import json
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
    from dbreset.operations import ResetResult
    from dbreset.pristine import Baseline
    from dbreset.session import Canary, CanarySnapshot, Cleaner, SessionGuard, WorkersResult
    from dbreset.settings import Settings

__all__ = ["DbresetCanary", "DbresetClean"]

CANARY_MODES = ("off", "session", "test")
ISOLATION_MODES = ("shared", "worker")
CLEAN_MODES = ("off", "test")
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
_WORKERINPUT_KEY = "dbreset"
#: Environment variable through which the controller tells its workers (and only
#: them: the parent process must be the controller) which database is whose.
_WORKERS_VAR = "DBRESET_WORKERS"


@dataclass
class _State:
    """What the plugin holds in one process between configure and unconfigure."""

    header: list[str] = field(default_factory=list)
    mode: str = "session"
    clean: str = "off"
    guards: list[SessionGuard] = field(default_factory=list)
    server: EmbeddedServer | None = None
    snapshot: CanarySnapshot | None = None
    canary: Canary | None = None
    #: what each worker gets (worker isolation), by worker id
    handed: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: what every worker gets (one shared database), made for the first
    handed_shared: dict[str, Any] | None = None
    #: what a plain run's cleaner needs
    settings: Settings | None = None
    baseline: Baseline | None = None
    #: a worker's baseline as it was handed over, read when a cleaner needs it
    baseline_json: str | None = None
    version_table: tuple[str, str] = ("public", "alembic_version")
    cleaner: Cleaner | None = None
    clean_url: str | None = None
    #: variables the plugin set, with their previous values
    exported: dict[str, str | None] = field(default_factory=dict)
    #: the URL of the embedded server's database, when the plugin started one
    embedded_url: str | None = None
    #: the settings read before the conftests (a URL with ``{branch}`` is
    #: exported resolved: what it was written as is kept here)
    early: Settings | None = None
    #: canary problems found at the end (this process's and the workers')
    problems: list[str] = field(default_factory=list)
    canary_fired: bool = False
    #: the canary checks at the end of the session in this process (a worker:
    #: only when it has a database of its own; the controller checks a shared one)
    check_at_end: bool = True
    #: the worker whose database the next replacement worker takes over
    spare: str | None = None


_STATE = pytest.StashKey[_State]()


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "dbreset", "dbreset: a freshly migrated test database, reset once before any xdist worker"
    )
    group.addoption(
        "--dbreset",
        action="store_true",
        dest="dbreset",
        default=None,
        help="reset the test database to its freshly migrated state before the tests "
        "(ini: dbreset = true)",
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
        help="schema whose tables are reset, repeatable (ini: dbreset_schemas; default public)",
    )
    group.addoption(
        "--dbreset-exclude",
        dest="dbreset_exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="table (or schema.table) glob never touched, repeatable (ini: dbreset_exclude)",
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
        help="allow a database on any remote host (environment: DBRESET_ALLOW_REMOTE=1; "
        "ini dbreset_allowed_hosts lists hosts instead)",
    )
    group.addoption(
        "--dbreset-create",
        dest="dbreset_create",
        action="store_true",
        default=None,
        help="create the database when it is missing, freshly migrated (ini: dbreset_create)",
    )
    group.addoption(
        "--dbreset-recreate",
        dest="dbreset_recreate",
        action="store_true",
        default=False,
        help="drop the database and create it again from the migrations, for a database "
        "at a revision these migrations do not know (another branch's)",
    )
    group.addoption(
        "--dbreset-isolation",
        dest="dbreset_isolation",
        choices=ISOLATION_MODES,
        metavar="{shared,worker}",
        help="worker: one database per xdist worker (<db>_gw0, ...) (ini: dbreset_isolation; "
        "default shared)",
    )
    group.addoption(
        "--dbreset-clean",
        dest="dbreset_clean",
        choices=CLEAN_MODES,
        metavar="{off,test}",
        help="test: every test starts from the freshly migrated state (ini: dbreset_clean; "
        "default off)",
    )
    group.addoption(
        "--dbreset-canary",
        dest="dbreset_canary",
        choices=CANARY_MODES,
        metavar="{off,session,test}",
        help="check that nothing else reset the database: at the end of the session (session), "
        "also before every test (test), or never (ini: dbreset_canary; default session)",
    )
    group.addoption(
        "--dbreset-embedded",
        dest="dbreset_embedded",
        action="store_true",
        default=None,
        help="no URL? start a throwaway PostgreSQL for the run (ini: dbreset_embedded; "
        'needs pip install "dbreset[embedded]")',
    )
    parser.addini("dbreset", "reset the test database once per run", type="bool", default=False)
    parser.addini(
        "dbreset_url_env", "environment variable with the database URL (default DATABASE_URL)"
    )
    parser.addini("dbreset_alembic_config", "Alembic config file (default alembic.ini)")
    parser.addini("dbreset_schemas", "schemas whose tables are reset", type="linelist")
    parser.addini("dbreset_exclude", "table globs never touched", type="linelist")
    parser.addini("dbreset_allowed_hosts", "remote hosts dbreset may reset", type="linelist")
    parser.addini(
        "dbreset_allowed_databases",
        "database names (globs) that count as test databases whatever their name",
        type="linelist",
    )
    parser.addini(
        "dbreset_export_env",
        "more variables pointed at the test database (env.py, workers, the application)",
        type="linelist",
    )
    parser.addini("dbreset_wait", "seconds to wait for another run or reset (default 5)")
    parser.addini(
        "dbreset_canary",
        "off, session (checked at the end of the session) or test (also before every test)",
        default="session",
    )
    parser.addini(
        "dbreset_isolation", "shared (one database) or worker (one per xdist worker)", "string"
    )
    parser.addini("dbreset_clean", "off, or test (put back before every test)", "string")
    parser.addini(
        "dbreset_create", "create the database when it is missing", type="bool", default=False
    )
    parser.addini(
        "dbreset_embedded",
        "start a throwaway PostgreSQL for the run when no URL is set (dbreset[embedded])",
        type="bool",
        default=False,
    )


def _enabled(config: pytest.Config, option: Any = None) -> bool:
    option = option if option is not None else config.option
    flag = getattr(option, "dbreset", None)
    if flag is not None:
        return bool(flag)
    return bool(config.getini("dbreset"))


def _informational(config: pytest.Config, option: Any = None) -> bool:
    option = option if option is not None else config.option
    return any(getattr(option, name, False) for name in _INFORMATIONAL)


def _settings(config: pytest.Config, option: Any = None) -> Settings:
    from dbreset.settings import CONFIG_KEYS, resolve_settings

    option = option if option is not None else config.option
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
    ini = {key: config.getini(f"dbreset_{key}") or None for key in CONFIG_KEYS}
    label = config.inipath.name if config.inipath else "pytest ini"
    return resolve_settings(flags, cwd=config.rootpath, ini=ini, ini_label=label)


def _choice(config: pytest.Config, name: str, choices: tuple[str, ...], default: str) -> str:
    from dbreset.errors import ConfigError

    given = getattr(config.option, f"dbreset_{name}", None)
    if given:
        return str(given)
    value = str(config.getini(f"dbreset_{name}") or default).strip().lower()
    if value not in choices:
        raise ConfigError(f"dbreset_{name} = {value!r} in the ini file: use {', '.join(choices)}")
    return value


def _flag(config: pytest.Config, name: str) -> bool:
    given = getattr(config.option, f"dbreset_{name}", None)
    if given is not None:
        return bool(given)
    return bool(config.getini(f"dbreset_{name}"))


# --------------------------------------------------------------------------- before any conftest


@pytest.hookimpl
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest is imported, so that import-time code finds the URL:
    a worker points its URL variables at its own database; a controller points
    every ``export_env`` variable at the target, and with ``dbreset_embedded``
    and no URL starts the throwaway server and exports its URL."""
    option = early_config.known_args_namespace
    if not _enabled(early_config, option) or _informational(early_config, option):
        return
    if _point_worker_at_its_database() or hasattr(early_config, "workerinput"):
        return
    with contextlib.suppress(Exception):  # any problem is reported in pytest_configure
        state = early_config.stash.setdefault(_STATE, _State())
        settings = _settings(early_config, option)
        state.early = settings
        if settings.url is not None:
            _export_all(state, settings)
            return
        embedded = getattr(option, "dbreset_embedded", None)
        if embedded is None:
            embedded = bool(early_config.getini("dbreset_embedded"))
        if embedded:
            _start_embedded(early_config, state, settings)


def _point_worker_at_its_database() -> bool:
    """In a worker of a controller that prepared one database per worker: point
    the URL variables at this worker's. The parent process must be that
    controller (``PYTEST_XDIST_WORKER`` leaks into any child process)."""
    raw = os.environ.get(_WORKERS_VAR)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not raw or not worker:
        return False
    try:
        data = json.loads(raw)
        if int(data["pid"]) != os.getppid():
            return False
        # a replacement for a crashed worker takes over the crashed one's database
        url = data["urls"].get(worker) or data["urls"][data["next"]]
        for name in data["vars"]:
            os.environ[str(name)] = str(url)
    except (ValueError, KeyError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- reset


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config) or _informational(config):
        return
    state = config.stash.setdefault(_STATE, _State())
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        _configure_worker(config, state, workerinput)
    else:
        _configure_controller(config, state)


def _configure_worker(config: pytest.Config, state: _State, workerinput: dict[str, Any]) -> None:
    """A worker never resets the target: it checks (and cleans) its database."""
    handed = workerinput.get(_WORKERINPUT_KEY)
    if not handed:
        return
    from dbreset.session import Canary, CanarySnapshot

    state.mode = str(handed["mode"])
    state.clean = str(handed["clean"])
    state.check_at_end = bool(handed.get("own"))
    url = str(handed["url"])
    for name in handed["vars"]:  # as the early hook did, unless it could not
        if os.environ.get(name) != url:
            state.exported.setdefault(name, os.environ.get(name))
            os.environ[name] = url
    if handed.get("snapshot"):
        state.snapshot = CanarySnapshot.from_dict(handed["snapshot"])
        state.canary = Canary(state.snapshot)
    state.clean_url = url
    state.settings = _worker_settings(handed)
    state.baseline_json = handed.get("baseline")
    state.version_table = (handed["version_table"][0], handed["version_table"][1])
    _register_per_test(config, state)


def _worker_settings(handed: dict[str, Any]) -> Settings:
    from dbreset.settings import Settings

    return Settings(
        url=str(handed["url"]),
        schemas=tuple(handed["schemas"]),
        exclude=tuple(handed["exclude"]),
        wait=float(handed["wait"]),
        allow_remote=True,  # the controller vetted this very server
        sources={"exclude": str(handed.get("exclude_source", "--exclude"))},
    )


def _configure_controller(config: pytest.Config, state: _State) -> None:
    from dbreset.errors import DbResetError
    from dbreset.redact import scrub

    settings = None
    try:
        settings = _settings(config)
        early = state.early
        if early is not None and early.url_template and settings.url == early.url:
            # exported resolved before the conftests: still the same {branch} URL
            settings = replace(
                settings,
                url_template=early.url_template,
                branch=early.branch,
                worktree=early.worktree,
            )
        state.mode = _choice(config, "canary", CANARY_MODES, "session")
        state.clean = _choice(config, "clean", CLEAN_MODES, "off")
        isolation = _choice(config, "isolation", ISOLATION_MODES, "shared")
        create = _flag(config, "create")
        recreate = bool(config.option.dbreset_recreate)
        if state.server is not None:  # started before the conftests
            settings = _with_embedded_url(state, settings)
            create = True
        elif settings.url is None and _flag(config, "embedded"):
            settings = _start_embedded(config, state, settings)
            create = True
        if settings.url is None:
            state.header.append(
                f"dbreset: skipped, no database URL (set {settings.url_env} or DBRESET_URL, "
                "pass --dbreset-url, or set dbreset_embedded = true in the ini file)"
            )
            return
        workers = _worker_ids(config)
        if state.clean == "test" and isolation == "shared" and len(workers) > 1:
            from dbreset.errors import ConfigError

            raise ConfigError(
                f"dbreset_clean = test with dbreset_isolation = shared under -n {len(workers)} "
                "would wipe the other workers' rows between tests: set dbreset_isolation = "
                "worker (or pass --dbreset-isolation worker)"
            )
        _export_all(state, settings)  # for the application, and workers started later
        state.settings = settings
        if isolation == "worker" and workers:
            _prepare_workers(config, state, settings, workers, create=create)
        else:
            _reset_shared(state, settings, create=create, recreate=recreate)
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
    _register_per_test(config, state)


def _reset_shared(state: _State, settings: Settings, *, create: bool, recreate: bool) -> None:
    from dbreset import session

    done = session.reset_and_guard(settings, create=create, recreate=recreate)
    result, guard = done.result, done.guard
    state.guards.append(guard)
    state.header.append(_describe(result))
    state.header.extend(f"dbreset: warning: {w}" for w in result.warnings)
    state.baseline = done.baseline
    state.version_table = done.version_table
    state.clean_url = settings.require_url()
    if state.mode != "off":
        state.snapshot = session.canary_snapshot(
            guard.conn, settings.require_url(), settings.schemas
        )
        state.canary = session.Canary(state.snapshot, conn=guard.conn)


def _prepare_workers(
    config: pytest.Config, state: _State, settings: Settings, workers: list[str], *, create: bool
) -> None:
    from dbreset import session

    schemas = settings.schemas if state.mode != "off" else None
    result, guards = session.prepare_workers(
        settings, workers, create=create, canary_schemas=schemas
    )
    state.guards.extend(guards)
    state.header.append(_describe_workers(result))
    state.baseline, state.version_table = result.baseline, result.version_table
    baseline_json = result.baseline.to_json()  # once for every worker
    for db in result.workers:
        state.handed[db.worker] = _handed(
            state, settings, db.url, db.snapshot, baseline_json, own=True
        )
    data = {
        "pid": os.getpid(),
        "vars": list(settings.url_variables),
        "urls": {db.worker: db.url for db in result.workers},
    }
    _export(state, _WORKERS_VAR, json.dumps(data))


def _handed(
    state: _State,
    settings: Settings,
    url: str,
    snapshot: CanarySnapshot | None,
    baseline_json: str | None,
    *,
    own: bool,
) -> dict[str, Any]:
    """What the controller hands a worker: plain values (they travel through
    execnet). *own*: the database at *url* is that worker's alone."""
    return {
        "own": own,
        "mode": state.mode,
        "clean": state.clean,
        "url": url,
        "vars": list(settings.url_variables),
        "snapshot": snapshot.to_dict() if snapshot is not None else None,
        "baseline": baseline_json,
        "version_table": list(state.version_table),
        "schemas": list(settings.schemas),
        "exclude": list(settings.exclude),
        "exclude_source": settings.sources.get("exclude", "--exclude"),
        "wait": settings.wait,
    }


def _worker_ids(config: pytest.Config) -> list[str]:
    """The ids xdist will give its workers (gw0, gw1, ...), before it starts them."""
    if not config.pluginmanager.hasplugin("xdist"):
        return []
    if config.getoption("dist", "no") == "no" or not config.getoption("tx", None):
        return []
    try:
        import execnet
        from xdist.workermanage import parse_tx_spec_config

        specs = [execnet.XSpec(spec) for spec in parse_tx_spec_config(config)]
    except Exception:
        return [f"gw{i}" for i in range(len(config.getoption("tx")))]
    ids, auto = [], 0
    for spec in specs:
        if spec.id:
            ids.append(str(spec.id))
        else:
            ids.append(f"gw{auto}")
            auto += 1
    return ids


_PYTEST_SPELLINGS = [
    ("dbreset reset --recreate", "pytest --dbreset-recreate"),
    ("-c/--config PATH", "--dbreset-config PATH"),
    (
        "allowed_databases in [tool.dbreset] (DBRESET_ALLOWED_DATABASES)",
        "dbreset_allowed_databases in the ini file",
    ),
    ("(dbreset reset --create)", "(--dbreset-create, or dbreset_create = true in the ini file)"),
    ("or pass --wait SECONDS", "or pass --dbreset-wait SECONDS (dbreset_wait in the ini file)"),
]


def _pytest_flags(message: str) -> str:
    """The library's messages name the CLI's flags; name the plugin's instead."""
    for cli, plugin in _PYTEST_SPELLINGS:
        message = message.replace(cli, plugin)
    message = message.replace("(dbreset_wait for pytest)", "")
    return re.sub(
        r"(?<![\w-])--(url|wait|schema|exclude|allow-remote|create|recreate)\b",
        r"--dbreset-\1",
        message,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _describe(result: ResetResult) -> str:
    def revs(revisions: tuple[str, ...]) -> str:
        return ", ".join(revisions) or "base"

    migrated = result.migrate
    if result.recreated:
        what = f"recreated from {result.pristine} at {revs(migrated.after)}"
    elif migrated.upgraded:
        what = f"migrated {revs(migrated.before)} → {revs(migrated.after)}"
    else:
        what = f"at head {revs(migrated.after)}"
    emptied = result.truncate
    tables = _count(len(emptied.emptied), "table")
    if emptied.emptied:
        rows = sum(t.rows for t in emptied.emptied)
        more = "+" if any(t.more for t in emptied.emptied) else ""
        tables += f" ({rows}{more} row{'' if rows == 1 and not more else 's'})"
    parts = [what, f"emptied {tables}"]
    if emptied.restored:
        parts.append(f"restored {_count(len(emptied.restored), 'seeded table')}")
    parts[-1] += f", restarted {_count(len(emptied.sequences_restarted), 'sequence')}"
    if result.created and not result.recreated:
        parts.insert(0, "created the database")
    return f"dbreset: reset {result.target} in {result.elapsed_ms:.0f} ms ({'; '.join(parts)})"


def _describe_workers(result: WorkersResult) -> str:
    done = []
    for db in result.workers:
        if db.how == "cloned":
            done.append(f"{db.worker} cloned")
        else:
            changed = len(db.reset.emptied) + len(db.reset.restored) if db.reset else 0
            done.append(
                f"{db.worker} reset" + (f" ({_count(changed, 'table')})" if changed else "")
            )
    built = f"; built {result.pristine_db}" if result.pristine_built else ""
    return (
        f"dbreset: {_count(len(result.workers), 'worker database')} for {result.target} in "
        f"{result.elapsed_ms:.0f} ms ({', '.join(done)}{built})"
    )


def _export(state: _State, name: str, value: str) -> None:
    """Set a variable for the application and for workers started later."""
    state.exported.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def _export_all(state: _State, settings: Settings) -> None:
    url = settings.require_url()
    for name in settings.url_variables:
        if os.environ.get(name) != url:
            _export(state, name, url)


# --------------------------------------------------------------------------- embedded server


def _embedded_dir(config: pytest.Config) -> Path:
    """In pytest's cache directory, kept between runs, so a run after the first
    skips initdb. (As root, where 'nobody' cannot reach it,
    :class:`~dbreset.embedded.EmbeddedServer` moves it.)"""
    try:
        cache = Path(os.path.expandvars(str(config.getini("cache_dir"))))
    except ValueError:  # -p no:cacheprovider
        cache = Path(".pytest_cache")
    if not cache.is_absolute():
        cache = config.rootpath / cache
    return cache / "d" / "dbreset-embedded" / "pgdata"


def _start_embedded(config: pytest.Config, state: _State, settings: Settings) -> Settings:
    from dbreset.embedded import EmbeddedServer

    start = time.perf_counter()
    server = EmbeddedServer(_embedded_dir(config))
    url = server.start(watch_pid=os.getpid())
    if not server.reused:
        state.server = server  # stopped at the end; a server found running is not ours
    else:
        state.server = None
    how = "reused the running server" if server.reused else "started"
    ms = (time.perf_counter() - start) * 1000
    state.header.append(f"dbreset: embedded PostgreSQL on {server.data_dir}, {how} in {ms:.0f} ms")
    from dbreset.database import with_dbname

    name = re.sub(r"[^a-z0-9_]+", "_", config.rootpath.name.lower()).strip("_") or "dbreset"
    url = with_dbname(url, f"{name[:50]}_test")
    state.embedded_url = url
    embedded = replace(settings, url=url, sources={**settings.sources, "url": "embedded server"})
    _export_all(state, embedded)  # before any conftest; workers inherit it
    return embedded


def _with_embedded_url(state: _State, settings: Settings) -> Settings:
    url = state.embedded_url
    if url is None:
        return settings
    if settings.url is not None and settings.url != url:
        return settings  # a conftest pointed it elsewhere: that wins
    return replace(settings, url=url, sources={**settings.sources, "url": "embedded server"})


# --------------------------------------------------------------------------- report & teardown


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = config.stash.get(_STATE, None)
    return state.header if state is not None and state.header else None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller, just before it starts a worker."""
    state = node.config.stash.get(_STATE, None)
    if state is None or state.settings is None:
        return
    worker = node.gateway.id
    handed = state.handed.get(worker)
    if handed is None and state.spare is not None:  # a crashed worker's replacement
        handed = state.handed[worker] = _take_over(state, state.spare)
        state.spare = None
    if handed is None:  # one shared database: the same for every worker
        if state.handed_shared is None:
            settings = state.settings
            baseline_json = state.baseline.to_json() if state.baseline is not None else None
            state.handed_shared = _handed(
                state, settings, settings.require_url(), state.snapshot, baseline_json, own=False
            )
        handed = state.handed_shared
    node.workerinput[_WORKERINPUT_KEY] = handed


def _take_over(state: _State, crashed: str) -> dict[str, Any]:
    """What a crashed worker had, for its replacement: the same database, with
    the canary's snapshot taken again (the crashed worker's cleaner may have
    rewritten relations since the first)."""
    handed = dict(state.handed[crashed])
    if handed.get("snapshot"):
        from dbreset import database, session

        snapshot = session.CanarySnapshot.from_dict(handed["snapshot"])
        name = database.make_target(snapshot.url).dbname
        for guard in state.guards:
            if guard.target.dbname == name:
                again = session.canary_snapshot(guard.conn, snapshot.url, snapshot.schemas)
                handed["snapshot"] = again.to_dict()
    return handed


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist, in the controller: what a worker's canary found at its end."""
    state = node.config.stash.get(_STATE, None)
    output = getattr(node, "workeroutput", None) or {}
    problem = output.get("dbreset_canary")
    if state is not None and problem:
        state.problems.append(f"[{node.gateway.id}] {problem}")
    worker = node.gateway.id
    if state is not None and error is not None and worker in state.handed:
        # xdist starts a replacement right after this hook, with our environment
        state.spare = worker
        data = json.loads(os.environ[_WORKERS_VAR])
        os.environ[_WORKERS_VAR] = json.dumps({**data, "next": worker})


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The canary checks at the end of the session by itself, in every process."""
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    checking = state.canary is not None and state.mode != "off" and state.check_at_end
    if checking and state.canary is not None and not state.canary_fired:
        problem = state.canary.verify()
        if problem:
            state.canary_fired = True
            if hasattr(config, "workeroutput"):
                config.workeroutput["dbreset_canary"] = f"dbreset: {problem}"
            else:
                state.problems.append(f"dbreset: {problem}")
    in_controller = not hasattr(config, "workerinput")
    if state.problems and in_controller and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.problems:
        return
    terminalreporter.section("dbreset", red=True, bold=True)
    for problem in dict.fromkeys(state.problems):
        terminalreporter.write_line(problem, red=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        _teardown(state)


def _teardown(state: _State) -> None:
    """Close the cleaner, the canary and the session guards, stop our server,
    put the environment back: idempotent."""
    import sys

    canary, state.canary = state.canary, None
    guards, state.guards = state.guards, []
    cleaner, state.cleaner = state.cleaner, None
    server, state.server = state.server, None
    closing: list[Any] = [cleaner, canary, *guards]
    for item in closing:
        if item is not None:
            with contextlib.suppress(Exception):  # a broken connection is closed anyway
                item.close()
    if server is not None:
        try:
            server.stop()
        except Exception as exc:
            sys.stderr.write(f"dbreset: could not stop the embedded PostgreSQL: {exc}\n")
    exported, state.exported = state.exported, {}
    for name, previous in exported.items():
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

    def __init__(self, canary: Canary | None, state: _State | None = None) -> None:
        self._canary = canary
        self._state = state
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
        if self._state is not None:
            self._state.canary_fired = True
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
    active = state.canary if state is not None and state.mode != "off" else None
    canary = DbresetCanary(active, state)
    canary.check()
    yield canary
    if not canary.fired:  # once is enough: the tests that saw it have failed already
        canary.check()


# --------------------------------------------------------------------------- per-test cleaning


class DbresetClean:
    """The ``dbreset_clean`` fixture: the database was put back in its freshly
    migrated state before this test. ``last`` says what that took."""

    def __init__(self, result: Any) -> None:
        self.last = result


def _cleaner(config: pytest.Config) -> Cleaner | None:
    state = config.stash.get(_STATE, None)
    if state is None or state.settings is None or state.clean_url is None:
        return None
    if state.cleaner is None:
        from dbreset import database
        from dbreset.session import Cleaner

        if state.baseline is None and state.baseline_json:
            from dbreset.pristine import Baseline

            state.baseline = Baseline.from_json(state.baseline_json)
        settings = replace(state.settings, url=state.clean_url)
        owned = not (state.guards and not hasattr(config, "workerinput"))
        if not owned:
            conn = state.guards[0].conn  # a plain run: the session's own connection
        else:
            target = database.make_target(state.clean_url)
            conn = database.connect(target, settings, role="pytest clean", check=False)
        state.cleaner = Cleaner(
            conn,
            settings,
            state.baseline,
            version_table=state.version_table,
            canary=state.canary,
            owned=owned,
        )
        state.cleaner.prepare()
    return state.cleaner


@pytest.fixture
def dbreset_clean(pytestconfig: pytest.Config) -> DbresetClean:
    """Puts the database back in its freshly migrated state before the test that
    asks for it: rows committed by earlier tests gone (from any connection),
    seeded rows as the migrations leave them, sequences back. With
    ``dbreset_clean = test`` in the ini file every test gets it."""
    from dbreset.errors import DbResetError

    try:
        cleaner = _cleaner(pytestconfig)
        result = cleaner.clean() if cleaner is not None else None
    except DbResetError as exc:
        problem = f"dbreset: {_pytest_flags(str(exc))}"
    else:
        return DbresetClean(result)
    # Outside the except block: failing inside it would chain the library's
    # error, and the report would show the message twice ("During handling...").
    pytest.fail(problem, pytrace=False)


class _CanaryEachTest:
    """Registered when ``dbreset_canary = test``."""

    @pytest.fixture(autouse=True)
    def _dbreset_canary_before_each_test(self, dbreset_canary: DbresetCanary) -> None:
        dbreset_canary.check()


class _CleanEachTest:
    """Registered when ``dbreset_clean = test``."""

    @pytest.fixture(autouse=True)
    def _dbreset_clean_before_each_test(self, dbreset_clean: DbresetClean) -> None:
        pass


def _register_per_test(config: pytest.Config, state: _State) -> None:
    if state.mode == "test":
        config.pluginmanager.register(_CanaryEachTest(), "dbreset-canary-each-test")
    if state.clean == "test":
        config.pluginmanager.register(_CleanEachTest(), "dbreset-clean-each-test")
