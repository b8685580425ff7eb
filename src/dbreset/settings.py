"""Settings: one frozen object, one resolver for the CLI and the pytest plugin.

Where a value comes from, first wins: flag → environment → pytest ini (plugin
only) → ``[tool.dbreset]`` in ``pyproject.toml`` → default. The resolver
remembers the source of every value so ``dbreset status`` can show it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dbreset.errors import ConfigError
from dbreset.redact import mask_url

#: Keys of ``[tool.dbreset]``; the pytest ini twin of each is ``dbreset_<key>``.
CONFIG_KEYS = (
    "url_env",
    "alembic_config",
    "schemas",
    "exclude",
    "allowed_hosts",
    "wait",
    "export_env",
    "allowed_databases",
)
#: Settings that hold lists (comma-separated in the environment).
LIST_KEYS = ("schemas", "exclude", "allowed_hosts", "export_env", "allowed_databases")

#: Environment variables, by setting.
ENV_VARS = {
    "url": "DBRESET_URL",
    "url_env": "DBRESET_URL_ENV",
    "alembic_config": "DBRESET_ALEMBIC_CONFIG",
    "schemas": "DBRESET_SCHEMAS",
    "exclude": "DBRESET_EXCLUDE",
    "allowed_hosts": "DBRESET_ALLOWED_HOSTS",
    "allow_remote": "DBRESET_ALLOW_REMOTE",
    "wait": "DBRESET_WAIT",
    "export_env": "DBRESET_EXPORT_ENV",
    "allowed_databases": "DBRESET_ALLOWED_DATABASES",
}

FLAGS = {
    "url": "--url",
    "url_env": "--url-env",
    "alembic_config": "--config",
    "schemas": "--schema",
    "exclude": "--exclude",
    "allowed_hosts": "--allowed-host",
    "allow_remote": "--allow-remote",
    "wait": "--wait",
    "export_env": "--export-env",
    "allowed_databases": "--allowed-database",
}

DEFAULT_WAIT = 5.0
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Everything an operation needs to know; build it with :func:`resolve_settings`."""

    url: str | None = None
    url_env: str = "DATABASE_URL"
    alembic_config: Path = Path("alembic.ini")
    schemas: tuple[str, ...] = ("public",)
    exclude: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    allow_remote: bool = False
    wait: float = DEFAULT_WAIT
    #: more variables pointed at the target while env.py runs, and exported to
    #: xdist workers and the application (the plugin)
    export_env: tuple[str, ...] = ()
    #: database names (globs) that count as test databases whatever their name
    allowed_databases: tuple[str, ...] = ()
    #: the URL as written, when its database name holds ``{branch}``/``{worktree}``
    url_template: str | None = None
    #: the git branch and worktree folder the placeholders were resolved from
    branch: str | None = None
    worktree: str | None = None
    #: setting name → where its value came from (``"--url"``, ``"DBRESET_WAIT"``, …)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # a traceback's locals must not show the password
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("url", "url_template"):
            if shown[key]:
                shown[key] = mask_url(shown[key])
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def url_variables(self) -> tuple[str, ...]:
        """Every variable pointed at the target: ``url_env``, then ``export_env``."""
        return tuple(dict.fromkeys((self.url_env, *self.export_env)))

    def require_url(self) -> str:
        if not self.url:
            raise ConfigError(f"no database URL: pass --url, or set DBRESET_URL or {self.url_env}")
        return self.url


def parse_bool(value: str, *, name: str) -> bool:
    """Strict: a typo must not silently mean *yes* (or *no*)."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def parse_wait(value: object, *, name: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number of seconds") from None
    if not 0 <= seconds <= 86_400 or seconds != seconds:
        raise ConfigError(f"{name}={value!r}: use a number of seconds from 0 to 86400")
    return seconds


def find_pyproject(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_pyproject(path: Path) -> dict[str, Any]:
    """``[tool.dbreset]`` of *path*, with unknown keys rejected.

    A file that never says ``dbreset`` has no such table (short of spelling the
    key with escapes) and is not parsed: importing and running the TOML parser
    is ~1 % of a reset, and the file belongs to other tools too."""
    raw = path.read_bytes()
    if b"dbreset" not in raw:
        return {}
    known = _PARSED.get(str(path))
    if known is not None and known[0] == raw:  # the plugin resolves twice a run
        return dict(known[1])
    section = _parse_pyproject(path, raw)
    _PARSED[str(path)] = (raw, section)
    return dict(section)


_PARSED: dict[str, tuple[bytes, dict[str, Any]]] = {}


def _parse_pyproject(path: Path, raw: bytes) -> dict[str, Any]:
    import tomllib

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name} is not valid TOML: {exc}") from None
    section = data.get("tool", {}).get("dbreset", {})
    if not isinstance(section, dict):
        raise ConfigError(f"[tool.dbreset] in {path.name} must be a table")
    unknown = sorted(set(section) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in [tool.dbreset] of {path.name}: {', '.join(unknown)}; "
            f"known keys: {', '.join(CONFIG_KEYS)}"
        )
    return section


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.replace("\n", ",").split(",") if item.strip())


def _as_tuple(value: object, *, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return _split_list(value)
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"{name} must be a list of strings")


def _given(value: object) -> bool:
    if value is None:
        return False
    return not (isinstance(value, (tuple, list)) and not value)


def resolve_settings(
    flags: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ini: Mapping[str, object] | None = None,
    ini_label: str = "pytest ini",
) -> Settings:
    """Build :class:`Settings` from flags, environment, pytest ini and pyproject.

    *flags* and *ini* map setting names (``url``, ``schemas``, …) to values;
    ``None`` or an empty list means "not given".
    """
    flags = flags or {}
    ini = ini or {}
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")

    pyproject_path = find_pyproject(cwd)
    project = load_pyproject(pyproject_path) if pyproject_path else {}
    project_dir = pyproject_path.parent if pyproject_path else cwd
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    bases: dict[str, Path] = {}

    for key in (*CONFIG_KEYS, "allow_remote"):
        env_name = ENV_VARS[key]
        if _given(flags.get(key)):
            values[key], sources[key], bases[key] = flags[key], FLAGS[key], cwd
        elif env.get(env_name, "") != "":
            values[key], sources[key], bases[key] = env[env_name], env_name, cwd
        elif _given(ini.get(key)):
            values[key], sources[key], bases[key] = ini[key], f"{ini_label} dbreset_{key}", cwd
        elif key in project:
            where = f"{pyproject_path.name if pyproject_path else 'pyproject.toml'} [tool.dbreset]"
            values[key], sources[key], bases[key] = project[key], where, project_dir
        else:
            sources[key] = "default"

    kwargs: dict[str, Any] = {}
    if "url_env" in values:
        url_env = str(values["url_env"]).strip()
        if not url_env:
            raise ConfigError("url_env must name an environment variable")
        kwargs["url_env"] = url_env
    url_env = kwargs.get("url_env", "DATABASE_URL")

    if _given(flags.get("url")):
        kwargs["url"], sources["url"] = str(flags["url"]), FLAGS["url"]
    elif env.get(ENV_VARS["url"]):
        kwargs["url"], sources["url"] = env[ENV_VARS["url"]], ENV_VARS["url"]
    elif env.get(url_env):
        kwargs["url"], sources["url"] = env[url_env], url_env
    else:
        sources["url"] = "not set"

    if "alembic_config" in values:
        kwargs["alembic_config"] = bases["alembic_config"] / str(values["alembic_config"])
    else:
        kwargs["alembic_config"] = project_dir / "alembic.ini"
    for key in LIST_KEYS:
        if key in values:
            kwargs[key] = _as_tuple(values[key], name=f"{key} ({sources[key]})")
    if "allow_remote" in values:
        raw = values["allow_remote"]
        kwargs["allow_remote"] = (
            raw if isinstance(raw, bool) else parse_bool(str(raw), name=sources["allow_remote"])
        )
    if "wait" in values:
        kwargs["wait"] = parse_wait(values["wait"], name=f"wait ({sources['wait']})")
    if not kwargs.get("schemas", ("public",)):
        raise ConfigError("schemas must name at least one schema")
    for name in kwargs.get("export_env", ()):
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"export_env ({sources['export_env']}): {name!r} is not the name of an "
                "environment variable"
            )
    if "url" in kwargs and "{" in kwargs["url"]:
        kwargs.update(_resolve_placeholders(kwargs["url"], cwd=cwd, source=sources["url"]))
    return Settings(**kwargs, sources=sources)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _resolve_placeholders(url: str, *, cwd: Path, source: str) -> dict[str, Any]:
    """``{branch}``/``{worktree}`` in the URL's database name, resolved from git."""
    from urllib.parse import unquote, urlsplit

    from dbreset import database, gitinfo

    parts = urlsplit(url)
    template = unquote(parts.path.lstrip("/"))
    if not gitinfo.has_placeholders(template):
        return {}
    try:
        resolved = gitinfo.resolve_database_name(template, cwd=cwd)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the URL comes from {source})") from None
    return {
        "url": database.with_dbname(url, resolved.name),
        "url_template": url,
        "branch": resolved.branch,
        "worktree": resolved.worktree,
    }
