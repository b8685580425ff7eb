"""Connections, URLs, the safety guard and advisory locks.

dbreset's own connection always uses psycopg 3 directly, without a pool:
``postgresql+asyncpg://``, ``postgres://`` and bare ``postgresql://`` URLs are
turned into libpq parameters here. Alembic still gets the user's URL.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from dbreset.errors import BusyError, ConfigError, ConnectError, SafetyError

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.engine import URL

    from dbreset.settings import Settings

#: The advisory lock key of dbreset, the same in every database (locks are per
#: database). As a bigint it is split into classid (high) and objid (low).
LOCK_CLASSID = 0x64627273  # "dbrs"
LOCK_OBJID = 1
LOCK_KEY = (LOCK_CLASSID << 32) | LOCK_OBJID

_BACKENDS = {"postgresql", "postgres"}
#: asyncpg-only connect arguments with no libpq meaning.
_ASYNCPG_ONLY = {
    "prepared_statement_cache_size",
    "statement_cache_size",
    "max_cached_statement_lifetime",
    "max_cacheable_statement_size",
    "server_settings",
    "command_timeout",
    "prepared_statement_name_func",
}
_ASYNCPG_RENAMES = {"ssl": "sslmode", "timeout": "connect_timeout"}
_SSL_VALUES = {"true": "require", "false": "disable"}
DEFAULT_CONNECT_TIMEOUT = 5


def _map_query(driver: str, items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Translate one driver's URL query parameters into libpq's."""
    mapped: list[tuple[str, str]] = []
    for key, value in items:
        if driver == "asyncpg":
            if key in _ASYNCPG_ONLY:
                continue
            if key in _ASYNCPG_RENAMES:
                key = _ASYNCPG_RENAMES[key]
                if key == "sslmode":
                    value = _SSL_VALUES.get(value.lower(), value)
                elif key == "connect_timeout":
                    value = str(max(1, round(float(value))))
        mapped.append((key, value))
    return mapped


def _check_userinfo(netloc: str, url: str) -> None:
    """libpq ends the user part at the first '@', most URL parsers at the last:
    with two, they would read different passwords and hosts."""
    if netloc.count("@") > 1:
        raise ConfigError(
            f"malformed database URL {mask_url(url)}: more than one '@' before the host; "
            "write an '@' in the user name or password as %40"
        )


def _check_scheme(scheme: str, url: str) -> str:
    backend, _, driver = scheme.partition("+")
    if backend not in _BACKENDS:
        kind = backend or "no scheme"
        raise ConfigError(
            f"not a PostgreSQL URL ({kind}): {mask_url(url)}; "
            "dbreset works with postgresql:// URLs only"
        )
    return driver


def conninfo_params(url: str) -> dict[str, str]:
    """libpq parameters for *url*, without SQLAlchemy (the fast path)."""
    from psycopg import conninfo

    try:
        parts = urlsplit(url.strip())
        if not parts.netloc and not parts.path and not parts.query:
            raise ValueError("empty")
        driver = _check_scheme(parts.scheme.lower(), url)
        _check_userinfo(parts.netloc, url)
        query = _map_query(driver, parse_qsl(parts.query, keep_blank_values=True))
        # urlunsplit would drop the "//" of a URL without a host
        plain = f"postgresql://{parts.netloc}{parts.path}"
        if query:
            plain += "?" + urlencode(query)
        params: dict[str, str] = conninfo.conninfo_to_dict(plain)  # type: ignore[assignment]
        ports = str(params.get("port", "")).split(",")
        if not all(port.strip().isdigit() for port in ports if port.strip()):
            raise ValueError(f"invalid port {params['port']!r}")
        return params
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"malformed database URL {mask_url(url)}: {_first_line(exc)}") from None


def sqlalchemy_sync_url(url: str) -> URL:
    """The user's URL with the psycopg 3 driver, for SQLAlchemy (the slow path)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        _check_userinfo(urlsplit(url.strip()).netloc, url)
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"malformed database URL: {mask_url(url)}") from None
    driver = _check_scheme(parsed.drivername.lower(), url)
    pairs: list[tuple[str, str]] = []
    for key, value in parsed.query.items():
        for item in (value,) if isinstance(value, str) else value:
            pairs.append((key, item))
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in _map_query(driver, pairs):
        previous = query.get(key)
        if previous is None:
            query[key] = value
        else:
            query[key] = (*((previous,) if isinstance(previous, str) else previous), value)
    return parsed.set(drivername="postgresql+psycopg", query=query)


def params_from_sqlalchemy(url: URL) -> dict[str, str]:
    """libpq parameters of a SQLAlchemy URL: proves both paths agree."""
    from psycopg import conninfo

    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return conninfo.conninfo_to_dict(plain)  # type: ignore[return-value]


# --------------------------------------------------------------------------- masking


#: ``password=value`` in a libpq key/value string: a value is quoted with ``'``
#: (and backslash escapes) or runs to the next space
_KEYVALUE_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']\S*)")


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or the query) replaced by ``***``.

    Text that is no URL, such as a libpq key/value string given where a URL
    belongs, has its ``password=...`` masked."""
    if "://" not in url:
        return _KEYVALUE_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def password_of(url: str) -> str | None:
    if "://" not in url:
        found = _KEYVALUE_PASSWORD.search(url)
        if not found:
            return None
        value = found.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        return value or None
    try:
        parts = urlsplit(url)
        if parts.password:
            return parts.password
        for key, value in parse_qsl(parts.query):
            if key == "password":
                return value
    except ValueError:
        return None
    return None


def scrub(text: str, url: str | None) -> str:
    """Remove the password of *url* from *text* (a driver message can hold the DSN)."""
    secret = password_of(url) if url else None
    if secret:
        for form in {secret, unquote(secret)}:
            if form:
                text = text.replace(form, "***")
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- target & safety


class Target(NamedTuple):
    """Where a URL points, for messages and for the safety guard."""

    url: str
    params: Mapping[str, str]

    @property
    def dbname(self) -> str:
        return self.params.get("dbname") or self.params.get("user") or _default("dbname") or "?"

    @property
    def user(self) -> str:
        return self.params.get("user") or _default("user") or "?"

    @property
    def hosts(self) -> list[str]:
        """The hosts libpq will really try, environment defaults included."""
        raw = self.params.get("hostaddr") or _default("hostaddr")
        if not raw:
            raw = self.params.get("host") or _default("host") or ""
        hosts = [h.strip() for h in raw.split(",") if h.strip()]
        return hosts or ["(default socket)"]

    @property
    def display(self) -> str:
        """``user@host:port/db``, never with a password."""
        host = ",".join(self.hosts)
        port = self.params.get("port") or _default("port") or "5432"
        return f"{self.user}@{host}:{port}/{self.dbname}"

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def __repr__(self) -> str:  # a traceback's locals must not show the password
        params = {k: "***" if k == "password" else v for k, v in self.params.items()}
        return f"Target(url={self.masked_url!r}, params={params!r})"


def _default(keyword: str) -> str | None:
    """libpq's own default for *keyword* (it reads PGHOST, PGUSER, …)."""
    from psycopg import pq

    for option in pq.Conninfo.get_defaults():
        if option.keyword.decode() == keyword:
            value = option.val
            return value.decode() if value else None
    return None


def make_target(url: str) -> Target:
    return Target(url=url, params=conninfo_params(url))


def is_local_host(host: str) -> bool:
    if host == "(default socket)" or host.startswith(("/", "@")):
        return True  # a Unix socket (directory or abstract namespace)
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def _allowed(host: str, allowed: Iterable[str]) -> bool:
    name = host.strip("[]").lower()
    return any(fnmatchcase(name, pattern.lower()) for pattern in allowed)


def check_safety(target: Target, settings: Settings, *, connected_to: Iterable[str] = ()) -> None:
    """Refuse remote hosts unless allowed. Judged on the hosts libpq will use, and
    after connecting on where the connection really went (*connected_to*)."""
    if settings.allow_remote:
        return
    for host in (*target.hosts, *connected_to):
        if is_local_host(host) or _allowed(host, settings.allowed_hosts):
            continue
        raise SafetyError(
            f"refusing to touch {target.dbname!r} on remote host {host!r}; if this really is "
            "a test database, pass --allow-remote, set DBRESET_ALLOW_REMOTE=1, or add the "
            "host to allowed_hosts in [tool.dbreset]"
        )


# --------------------------------------------------------------------------- connections


def application_name(role: str) -> str:
    """Who we are, as other sessions see us in pg_stat_activity (63 bytes max)."""
    return f"dbreset {role} pid {os.getpid()} on {socket.gethostname()}"[:63]


def connect(
    target: Target,
    settings: Settings,
    *,
    role: str,
    dbname: str | None = None,
    check: bool = True,
) -> psycopg.Connection[Any]:
    """An autocommit psycopg connection (never pooled), after the safety guard."""
    import psycopg

    if check:
        check_safety(target, settings)
    params: dict[str, Any] = dict(target.params)
    params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    params["application_name"] = application_name(role)
    if dbname is not None:
        params["dbname"] = dbname
    try:
        conn = psycopg.connect(**params, autocommit=True)
    except psycopg.OperationalError as exc:
        raise connect_error(exc, target, dbname or target.dbname) from None
    if check:
        try:
            check_safety(target, settings, connected_to=_real_hosts(conn))
        except SafetyError:
            conn.close()
            raise
    return conn


def _real_hosts(conn: psycopg.Connection[Any]) -> list[str]:
    host = conn.info.host
    if host.startswith("/"):
        return [host]
    address = conn.info.hostaddr
    return [address] if address else [host]


def connect_error(exc: Exception, target: Target, dbname: str) -> ConnectError:
    import psycopg

    sqlstate = getattr(exc, "sqlstate", None)
    text = scrub(_first_line(exc), target.url)
    message = scrub(str(exc), target.url)
    where = target.display
    if sqlstate == "3D000" or ("does not exist" in message and "database" in message):
        return ConnectError(
            f"database {dbname!r} does not exist on {where}; "
            "pass --create to create it (dbreset reset --create)"
        )
    if sqlstate in {"28P01", "28000"} or "authentication failed" in message:
        return ConnectError(
            f"authentication failed for {where}: check the user and password in the URL"
        )
    if isinstance(exc, psycopg.OperationalError):
        return ConnectError(
            f"cannot connect to {where}: {text}; is the server running, and is the URL right?"
        )
    return ConnectError(f"cannot connect to {where}: {text}")


# --------------------------------------------------------------------------- advisory locks


class Holder(NamedTuple):
    """A session that holds (or waits for) something we need."""

    pid: int
    application_name: str
    client: str
    state: str
    since: datetime | None
    mode: str = ""
    query: str = ""

    def describe(self) -> str:
        since = f", since {self.since:%Y-%m-%d %H:%M:%S}" if self.since else ""
        app = self.application_name or "no application_name"
        return f"pid {self.pid} ({app}, {self.client}, {self.state or 'unknown state'}{since})"


HOLDERS_SQL = """
SELECT a.pid, coalesce(a.application_name, ''),
       coalesce(a.client_hostname, host(a.client_addr), 'local socket'),
       coalesce(a.state, ''), a.backend_start, l.mode, coalesce(a.query, '')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database
                                                WHERE datname = current_database())
  AND l.classid = %(classid)s AND l.objid = %(objid)s AND l.objsubid = 1
  AND l.granted AND l.pid <> pg_backend_pid()
ORDER BY a.backend_start
"""


def lock_holders(conn: psycopg.Connection[Any]) -> list[Holder]:
    rows = conn.execute(HOLDERS_SQL, {"classid": LOCK_CLASSID, "objid": LOCK_OBJID}).fetchall()
    return [Holder(*row) for row in rows]


def _describe_holders(holders: list[Holder]) -> str:
    if not holders:
        return "the holder has already gone; try again"
    parts = []
    for holder in holders:
        what = "a test session" if holder.mode == "ShareLock" else "a reset or migration"
        parts.append(f"{what}: {holder.describe()}")
    return "; ".join(parts)


def acquire_exclusive(conn: psycopg.Connection[Any], *, wait: float, target: Target) -> None:
    """Take dbreset's lock exclusively: no other reset, migration or test session
    may hold it. Waits at most *wait* seconds, then names the holders."""
    import psycopg

    if conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone() == (True,):
        return
    if wait > 0:
        try:
            conn.execute(f"SET lock_timeout = {int(wait * 1000) or 1}")
            conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            return
        except psycopg.errors.LockNotAvailable:
            pass
        finally:
            conn.execute("RESET lock_timeout")
    holders = lock_holders(conn)
    raise BusyError(
        f"{target.dbname!r} is busy, waited {wait:g}s: {_describe_holders(holders)}. "
        "Wait for it to finish, or pass --wait SECONDS (dbreset_wait for pytest)"
    )


def hold_for_session(conn: psycopg.Connection[Any]) -> None:
    """Turn the exclusive lock into a shared one without letting go in between:
    other test sessions may not reset, but nobody waits behind us for nothing."""
    conn.execute("SELECT pg_advisory_lock_shared(%s)", (LOCK_KEY,))
    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


@contextmanager
def exclusive_lock(conn: psycopg.Connection[Any], *, wait: float, target: Target) -> Iterator[None]:
    acquire_exclusive(conn, wait=wait, target=target)
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
