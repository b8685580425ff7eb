"""The Alembic bridge.

"Already at head?" is answered without importing Alembic when possible: the
script heads are cached under a hash of ``alembic.ini`` and every migration
file, and the database's heads are read with one query. Only when something
is pending (or the cache is cold) is Alembic imported and the user's own
``env.py`` run, in process.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from dbreset.database import scrub
from dbreset.errors import ConfigError, MigrationError

if TYPE_CHECKING:
    import psycopg

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
    conn: psycopg.Connection[Any], version_table: tuple[str, str]
) -> tuple[str, ...]:
    """The revisions recorded in the database; () when there is no version table."""
    from psycopg import sql

    schema, table = version_table
    exists = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (schema, table)
    ).fetchone()
    if not exists or not exists[0]:
        return ()
    query = sql.SQL("SELECT version_num FROM {} ORDER BY 1").format(sql.Identifier(schema, table))
    return tuple(row[0] for row in conn.execute(query))


def _alembic_config(project: Project, url: str | None) -> Any:
    from alembic.config import Config

    cfg = Config(str(project.config_path))
    if url is not None:
        # Config interpolates '%': a percent-encoded password must be doubled.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["dbreset"] = True
    return cfg


def script_heads(project: Project) -> tuple[str, ...]:
    """Heads of the migration scripts, by Alembic (does not run env.py)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        script = ScriptDirectory.from_config(_alembic_config(project, None))
        return tuple(sorted(script.get_heads()))
    except CommandError as exc:
        raise ConfigError(f"Alembic cannot read {project.config_path.name}: {exc}") from None
    except Exception as exc:
        raise MigrationError(f"Alembic cannot load the migration scripts: {exc}") from exc


def pending_revisions(project: Project, current: tuple[str, ...]) -> tuple[str, ...]:
    """Revisions an upgrade to heads would apply, oldest first (``rev: message``)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(project, None))
    try:
        revisions = list(script.iterate_revisions("heads", current or "base"))
    except Exception as exc:
        raise MigrationError(f"Alembic cannot plan the upgrade: {exc}") from exc
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


def upgrade(project: Project, url: str) -> UpgradeOutcome:
    """Run ``upgrade heads`` with the user's env.py and URL, in process."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(project, url)
    seen: dict[str, Any] = {}

    def run() -> None:
        script = ScriptDirectory.from_config(cfg)

        def do_upgrade(rev: Any, context: Any) -> Any:
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
    except Exception as exc:
        raise MigrationError(f"migration failed: {_alembic_message(exc, url)}") from exc
    if "table" not in seen:
        raise MigrationError(
            "env.py finished without running the migrations (it never called "
            "context.run_migrations()); check env.py"
        )
    return UpgradeOutcome(before=seen["before"], version_table=seen["table"])


def _alembic_message(exc: BaseException, url: str) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    head = lines[0] if lines else type(exc).__name__
    return scrub(f"{type(orig or exc).__name__}: {head}", url)
