"""The Alembic bridge.

"Already at head?" is answered without importing Alembic when possible: the
script heads are cached under a hash of ``alembic.ini`` and every migration
file, and the database's heads are read with one query. Only when something
is pending (or the cache is cold) is Alembic imported and the user's own
``env.py`` run, in process.
"""

from __future__ import annotations

import configparser
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from dbreset.errors import BusyError, ConfigError, MigrationError
from dbreset.redact import mask_url, printable, scrub

if TYPE_CHECKING:
    import psycopg

    from dbreset.settings import Settings

CACHE_VERSION = 1
DEFAULT_VERSION_TABLE = ("public", "alembic_version")


class Project(NamedTuple):
    """An Alembic project as far as dbreset needs it, read without Alembic."""

    config_path: Path
    #: the script directory (env.py), or None when only Alembic can tell
    script_dir: Path | None
    #: directories holding revision files, or () when only Alembic can tell
    version_dirs: tuple[Path, ...]
    version_table: str
    version_table_schema: str | None
    #: where the version table was named explicitly (ini keys) rather than guessed
    version_table_from_ini: bool

    @property
    def version_table_key(self) -> tuple[str, str]:
        return (self.version_table_schema or "public", self.version_table)


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        defaults={"here": str(path.parent)}, interpolation=configparser.BasicInterpolation()
    )
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a valid alembic.ini: {exc}") from None
    return parser


def load_project(config_path: Path) -> Project:
    if not config_path.is_file():
        raise ConfigError(
            f"no Alembic configuration at {config_path}: pass -c/--config PATH, or set "
            "alembic_config in [tool.dbreset] (DBRESET_ALEMBIC_CONFIG)"
        )
    parser = _read_ini(config_path)
    if not parser.has_section("alembic"):
        raise ConfigError(f"{config_path} has no [alembic] section")
    section = parser["alembic"]
    try:
        location = section.get("script_location", "")
        extra = section.get("version_locations", "")
        table = section.get("version_table", "") or "alembic_version"
        schema = section.get("version_table_schema", "") or None
        separator = section.get("path_separator", "")
    except configparser.Error as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    dirs: tuple[Path, ...] = ()
    script_dir: Path | None = None
    if location and ":" not in location:  # "package:resource" needs Alembic itself
        base = Path(location)
        if not base.is_absolute():
            base = config_path.parent / base
        script_dir = base
        dirs = (base / "versions",)
        if extra:
            sep = {"os": os.pathsep, "space": " ", "newline": "\n", ";": ";", ":": ":"}.get(
                separator
            )
            items = extra.split(sep) if sep else extra.replace(",", " ").split()
            dirs = tuple(
                p if p.is_absolute() else config_path.parent / p
                for p in (Path(i.strip()) for i in items if i.strip())
            )
    return Project(
        config_path=config_path.resolve(),
        script_dir=script_dir,
        version_dirs=dirs,
        version_table=table,
        version_table_schema=schema,
        version_table_from_ini="version_table" in section,
    )


# --------------------------------------------------------------------------- cache


def _cache_dir() -> Path:
    """The user's cache directory: ``$XDG_CACHE_HOME/dbreset`` (absolute paths only,
    as the XDG spec says), else ``~/.cache/dbreset`` on Linux, the platform's own elsewhere."""
    return _user_cache_dir(os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))


@functools.cache
def _user_cache_dir(xdg: str | None, home: str | None) -> Path:
    """Asked once per process (and environment): a reset reads several caches."""
    import platformdirs  # ~2.5 ms, so only when a cache is read or written

    return Path(platformdirs.user_cache_dir("dbreset", appauthor=False))


def _cache_file(project: Project) -> Path:
    name = hashlib.sha256(str(project.config_path).encode()).hexdigest()[:24]
    return _cache_dir() / f"heads-{name}.json"


def fingerprint(project: Project) -> str | None:
    """A hash of alembic.ini and every migration file; None when Alembic must decide."""
    if not project.version_dirs:
        return None
    digest = hashlib.sha256(project.config_path.read_bytes())
    env_py = project.script_dir / "env.py" if project.script_dir else None
    if env_py and env_py.is_file():
        digest.update(env_py.read_bytes() + b"\0")
    for directory in project.version_dirs:
        if not directory.is_dir():
            return None
        for path in sorted(directory.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(directory)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


class CachedHeads(NamedTuple):
    heads: tuple[str, ...]
    version_table: tuple[str, str]


def read_cache(project: Project, key: str | None) -> CachedHeads | None:
    if key is None:
        return None
    try:
        data = json.loads(_cache_file(project).read_text())
        if data.get("v") != CACHE_VERSION or data.get("key") != key:
            return None
        return CachedHeads(tuple(data["heads"]), tuple(data["version_table"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(project: Project, key: str | None, cached: CachedHeads) -> None:
    if key is None:
        return
    path = _cache_file(project)
    payload = {
        "v": CACHE_VERSION,
        "key": key,
        "config": str(project.config_path),
        "heads": list(cached.heads),
        "version_table": list(cached.version_table),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)
    except OSError:
        pass  # a cache we cannot write only costs time


# --------------------------------------------------------------------------- heads


def database_heads(
    conn: psycopg.Connection[Any], version_table: tuple[str, str], *, exists: bool | None = None
) -> tuple[str, ...]:
    """The revisions recorded in the database; () when there is no version table
    (*exists*, when the caller already asked)."""
    import psycopg
    from psycopg import sql

    schema, table = version_table
    if exists is None:
        found = conn.execute(
            "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
            (schema, table),
        ).fetchone()
        exists = bool(found and found[0])
    if not exists:
        return ()
    query = sql.SQL("SELECT version_num FROM {} ORDER BY 1").format(sql.Identifier(schema, table))
    try:
        return tuple(row[0] for row in conn.execute(query))
    except psycopg.errors.InsufficientPrivilege:
        raise MigrationError(
            f"cannot read the Alembic version table {printable(schema)}.{printable(table)}: "
            f"permission denied for {printable(conn.info.user)!r}; GRANT SELECT, INSERT, UPDATE "
            f"ON {sql.Identifier(schema, table).as_string(conn)} TO that role, or run as its owner"
        ) from None


def alembic_url(url: str) -> str:
    """*url* as SQLAlchemy reads it: ``postgres://`` is no SQLAlchemy scheme."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() == "postgres":
        return f"postgresql://{rest}"
    return url


def _alembic_config(project: Project, url: str | None) -> Any:
    from alembic.config import Config

    cfg = Config(str(project.config_path))
    if url is not None:
        # Config interpolates '%': a percent-encoded password must be doubled.
        cfg.set_main_option("sqlalchemy.url", alembic_url(url).replace("%", "%%"))
    cfg.attributes["dbreset"] = True
    return cfg


def _script(project: Project) -> Any:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(_alembic_config(project, None))
    except CommandError as exc:
        raise ConfigError(f"Alembic cannot read {project.config_path.name}: {exc}") from None
    except Exception as exc:
        raise MigrationError(
            f"Alembic cannot load the migration scripts: {_alembic_message(exc, None, project)}"
        ) from exc


def script_heads(project: Project) -> tuple[str, ...]:
    """Heads of the migration scripts, by Alembic (does not run env.py)."""
    try:
        return tuple(sorted(_script(project).get_heads()))
    except (ConfigError, MigrationError):
        raise
    except Exception as exc:
        raise MigrationError(
            f"Alembic cannot load the migration scripts: {_alembic_message(exc, None, project)}"
        ) from exc


def unknown_revisions(project: Project, current: tuple[str, ...]) -> tuple[str, ...]:
    """Revisions recorded in the database that these scripts do not know."""
    script = _script(project)
    unknown = []
    for revision in current:
        try:
            if script.get_revision(revision) is None:
                unknown.append(revision)
        except Exception:
            unknown.append(revision)
    return tuple(unknown)


def fingerprint_of(project: Project) -> str:
    """:func:`fingerprint`, asking Alembic where the scripts are when only it knows."""
    key = fingerprint(project)
    if key is not None:
        return key
    script = _script(project)
    dirs = tuple(Path(d) for d in script._version_locations)
    key = fingerprint(project._replace(script_dir=Path(script.dir), version_dirs=dirs))
    if key is None:
        raise ConfigError(f"the migration directories of {project.config_path} do not exist")
    return key


def pending_revisions(project: Project, current: tuple[str, ...]) -> tuple[str, ...]:
    """Revisions an upgrade to heads would apply, oldest first (``rev: message``)."""
    script = _script(project)
    try:
        revisions = list(script.iterate_revisions("heads", current or "base"))
    except Exception as exc:
        raise MigrationError(
            f"Alembic cannot plan the upgrade: {_alembic_message(exc, None, project)}"
        ) from exc
    revisions.reverse()
    return tuple(f"{r.revision}: {r.doc}" if r.doc else r.revision for r in revisions)


# --------------------------------------------------------------------------- upgrade


@contextmanager
def preserved_logging() -> Iterator[None]:
    """env.py's ``fileConfig`` disables existing loggers and replaces handlers:
    put the caller's logging back as it was."""
    manager = logging.Logger.manager
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers), root.disabled)
    saved = {
        name: (lg.level, list(lg.handlers), lg.disabled, lg.propagate)
        for name, lg in manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    try:
        yield
    finally:
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        root.disabled = root_state[2]
        for name, (level, handlers, disabled, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.disabled = disabled
            lg.propagate = propagate


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration, then put them back."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class UpgradeOutcome(NamedTuple):
    before: tuple[str, ...]
    version_table: tuple[str, str]


def _in_thread_if_loop_running(fn: Any) -> Any:
    """The async template calls ``asyncio.run()``, which fails inside a running loop."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="dbreset-alembic")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class WrongDatabase(Exception):
    """env.py connected to another database than the one dbreset is migrating."""


#: Where a connection really is: database, its oid, and the server (by start time).
IDENTITY_SQL = (
    "SELECT current_database(), (SELECT oid FROM pg_database "
    "WHERE datname = current_database())::bigint, "
    "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint::text"
)


def upgrade_checked(
    project: Project,
    url: str,
    settings: Settings,
    *,
    expect: str,
    watch: psycopg.Connection[Any] | None = None,
) -> UpgradeOutcome:
    """``upgrade heads`` of the database *expect* (at *url*), with the user's own
    env.py, in process. While env.py runs, every variable of ``url_env`` and
    ``export_env`` points at *url*; before the first migration runs, the
    database env.py connected to is checked to be *expect* on this very server
    (refused otherwise, with nothing touched). Lock waits are bounded by
    ``wait``: ``lock_timeout`` through ``PGOPTIONS`` for libpq drivers, and for
    any driver a watchdog on dbreset's own connection (*watch*) that cancels the
    migration's statement once it has waited longer, naming who held the lock."""
    import psycopg

    from dbreset import database

    own = watch
    if own is None:
        target = database.make_target(url)
        own = database.connect(target, settings, role="migrate", check=False)
    try:
        row = own.execute(
            "SELECT oid::bigint, (extract(epoch FROM pg_postmaster_start_time()) * 1000000)"
            "::bigint::text FROM pg_database WHERE datname = %s",
            (expect,),
        ).fetchone()
        expected = (expect, int(row[0]), str(row[1])) if row else (expect, 0, "")
        app = database.application_name("migrate")
        wait_ms = max(1, int(settings.wait * 1000))
        options = " ".join(
            filter(None, [os.environ.get("PGOPTIONS"), f"-c lock_timeout={wait_ms}"])
        )
        variables = {name: url for name in settings.url_variables}
        variables.update({"PGOPTIONS": options, "PGAPPNAME": app})
        watchdog = _LockWatch(own, app=app, dbname=expect, wait=settings.wait)
        with environ(variables), watchdog:
            try:
                return upgrade(project, url, expected=expected, settings=settings)
            except MigrationError as exc:
                if watchdog.blockers or isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
                    raise BusyError(watchdog.busy_message(expect, settings.wait)) from None
                raise
    finally:
        if watch is None:
            own.close()


class _LockWatch:
    """A thread that watches the migration's sessions from dbreset's own
    connection: one waiting for a lock longer than *wait* is cancelled
    (``pg_cancel_backend``), and whoever held the lock is remembered."""

    POLL = 0.1
    SQL = """
    SELECT a.pid, extract(epoch FROM now() - coalesce(l.waitstart, a.query_start)),
           array(SELECT unnest(pg_blocking_pids(a.pid)))
    FROM pg_stat_activity a
    JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
    WHERE a.datname = %(dbname)s AND a.pid <> pg_backend_pid()
      AND (a.application_name = %(app)s
           OR (a.backend_start >= %(since)s AND a.application_name = ''))
    """

    def __init__(self, conn: psycopg.Connection[Any], *, app: str, dbname: str, wait: float):
        self.conn, self.app, self.dbname, self.wait = conn, app, dbname, wait
        self.blockers: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _LockWatch:
        row = self.conn.execute("SELECT now()").fetchone()
        self.since = row[0] if row else None
        self._thread = threading.Thread(target=self._run, name="dbreset-lock-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        import psycopg

        from dbreset import database

        params = {"dbname": self.dbname, "app": self.app, "since": self.since}
        while not self._stop.wait(self.POLL):
            try:
                rows = self.conn.execute(self.SQL, params).fetchall()
                for pid, waited, blocking in rows:
                    if blocking and not self.blockers:
                        holders = self.conn.execute(
                            database.HOLDERS_OF_PIDS_SQL, {"pids": list(blocking)}
                        ).fetchall()
                        self.blockers = [database.Holder(*h).describe() for h in holders]
                    if waited is not None and float(waited) >= self.wait:
                        self.conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
            except psycopg.Error:
                return

    def busy_message(self, dbname: str, wait: float) -> str:
        named = "; ".join(self.blockers) or "the holder has gone since"
        return (
            f"a migration of {printable(dbname)!r} waited {wait:g}s for a lock held by another "
            f"session: {named}. Close that session (an idle transaction still holds its locks) "
            "or pass --wait SECONDS"
        )


def upgrade(
    project: Project,
    url: str,
    *,
    expected: tuple[str, int, str] | None = None,
    settings: Settings | None = None,
) -> UpgradeOutcome:
    """Run ``upgrade heads`` with the user's env.py and URL, in process."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(project, url)
    seen: dict[str, Any] = {}

    def run() -> None:
        script = ScriptDirectory.from_config(cfg)

        def do_upgrade(rev: Any, context: Any) -> Any:
            if expected is not None and context.connection is not None:
                found = context.connection.exec_driver_sql(IDENTITY_SQL).fetchone()
                if found is None or (str(found[0]), int(found[1]), str(found[2])) != expected:
                    seen["elsewhere"] = str(found[0]) if found else "?"
                    raise WrongDatabase(seen["elsewhere"])
            seen["before"] = tuple(sorted(rev or ()))
            seen["table"] = (
                context.version_table_schema or "public",
                context.version_table,
            )
            return script._upgrade_revs("heads", rev)

        with EnvironmentContext(cfg, script, fn=do_upgrade, as_sql=False, destination_rev="heads"):
            script.run_env()

    try:
        with preserved_logging():
            _in_thread_if_loop_running(run)
    except WrongDatabase:
        raise ConfigError(_elsewhere_message(seen["elsewhere"], expected, settings)) from None
    except Exception as exc:
        raise MigrationError(f"migration failed: {_alembic_message(exc, url, project)}") from exc
    if "table" not in seen:
        raise MigrationError(
            "env.py finished without running the migrations (it never called "
            "context.run_migrations()); check env.py"
        )
    return UpgradeOutcome(before=seen["before"], version_table=seen["table"])


def _elsewhere_message(
    found: str, expected: tuple[str, int, str] | None, settings: Settings | None
) -> str:
    """env.py connected elsewhere: name the variables that point there."""
    from urllib.parse import urlsplit

    want = expected[0] if expected else "?"
    pointing = []
    for name, value in sorted(os.environ.items()):
        if "://" not in value or not value.lower().startswith("postgres"):
            continue
        try:
            dbname = urlsplit(value).path.lstrip("/")
        except ValueError:
            continue
        if dbname == found and (settings is None or name not in settings.url_variables):
            pointing.append(name)
    hint = f" ({', '.join(pointing)} points there)" if pointing else ""
    same = " on another server" if found == want else ""
    return (
        f"refusing to migrate: env.py connected to {printable(found)!r}{same}, not "
        f"{printable(want)!r}{hint}, and nothing was migrated; env.py reads its URL from a "
        "variable dbreset does not point at the target: name it in export_env "
        '(export_env = ["VAR"] in [tool.dbreset], DBRESET_EXPORT_ENV, or dbreset_export_env '
        "for pytest)"
    )


def _alembic_message(exc: BaseException, url: str | None, project: Project | None = None) -> str:
    """One line: the error, and where in the user's migration scripts it happened."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    head = lines[0] if lines else type(exc).__name__
    where = _where(exc, project)
    message = f"{type(orig or exc).__name__}: {head}" + (f" (at {where})" if where else "")
    return scrub(mask_url(message) if "://" in message else message, url)


def _where(exc: BaseException, project: Project | None) -> str:
    """``migrations/versions/x.py, line 12``: the innermost frame of the traceback
    (or of the exceptions it came from) that is in the project's own scripts."""
    import traceback

    if project is None:
        return ""
    roots = [project.config_path.parent]
    if project.script_dir is not None:
        roots.append(project.script_dir)
    seen: set[int] = set()
    current: BaseException | None = exc
    best = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            path = Path(frame.filename)
            if not path.is_file():  # <string>, <frozen ...>: code made at run time
                continue
            for root in roots:
                try:
                    relative = path.resolve().relative_to(root.resolve())
                except (ValueError, OSError):
                    continue
                if "site-packages" not in relative.parts:
                    best = f"{relative}, line {frame.lineno}"
                break
        current = current.__cause__ or current.__context__
    return best
