"""Connections, URLs, the safety guard and advisory locks.

dbreset's own connection always uses psycopg 3 directly, without a pool:
``postgresql+asyncpg://``, ``postgres://`` and bare ``postgresql://`` URLs are
turned into libpq parameters here. Alembic still gets the user's URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

from dbreset.errors import BusyError, ConfigError, ConnectError, SafetyError
from dbreset.redact import first_line as _first_line
from dbreset.redact import mask_url, password_of, printable, scrub

__all__ = ["mask_url", "password_of", "printable", "scrub"]

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
        detail = scrub(_first_line(exc), url)  # a parser quotes pieces of what it read
        raise ConfigError(f"malformed database URL {mask_url(url)}: {detail}") from None


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


def with_dbname(url: str, dbname: str) -> str:
    """*url* pointed at another database of the same server (driver kept).

    Built by hand: ``urlunsplit`` drops the ``//`` of a URL without a host part
    (``postgresql:///db?host=/socket``), which libpq and SQLAlchemy then cannot
    parse. A ``dbname`` query parameter (libpq prefers it to the path) is
    dropped, or it would keep the old name."""
    from urllib.parse import quote

    parts = urlsplit(url)
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key == "dbname" for key, _ in pairs):
        query = urlencode([(key, value) for key, value in pairs if key != "dbname"], safe="/")
    out = f"{parts.scheme}://{parts.netloc}/{quote(dbname, safe='')}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


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


# --------------------------------------------------------------------------- test databases

#: The line dbreset writes into a database's comment (``COMMENT ON DATABASE``):
#: its mark, outside the user's tables, read in a query dbreset makes anyway.
MARK_PREFIX = "dbreset:"
NAME_MAX = 63  # bytes: PostgreSQL's NAMEDATALEN - 1


class Mark(NamedTuple):
    """What dbreset knows of a database it made or was told is a test database."""

    #: "pristine" (a template, never a target), "worker" (one xdist worker's),
    #: "created" (made by ``--create``/``--recreate``), "marked" (``dbreset mark``),
    #: "building" (a pristine database being built, never used)
    kind: str
    #: the database it belongs to (pristine, worker): the target's name
    target: str = ""
    #: the migrations' fingerprint it was made from
    fingerprint: str = ""
    heads: tuple[str, ...] = ()
    #: the baseline's digest (pristine)
    digest: str = ""
    #: the database name as written in the URL, with ``{branch}``/``{worktree}``
    template: str = ""
    branch: str = ""
    worktree: str = ""
    made: str = ""
    used: str = ""

    def to_comment(self, keep: str | None = None) -> str:
        """The database comment: the user's own lines (*keep*), then ours."""
        data = {k: v for k, v in self._asdict().items() if v not in ("", ())}
        if "heads" in data:
            data["heads"] = list(self.heads)
        line = f"{MARK_PREFIX} {json.dumps(data, sort_keys=True)}"
        others = [ln for ln in (keep or "").splitlines() if not ln.startswith(MARK_PREFIX)]
        return "\n".join([*others, line])


def parse_mark(comment: str | None) -> Mark | None:
    """dbreset's mark in a database comment, if it has one."""
    if not comment or MARK_PREFIX not in comment:
        return None
    for line in comment.splitlines():
        if not line.startswith(MARK_PREFIX):
            continue
        try:
            data = json.loads(line[len(MARK_PREFIX) :])
            fields: dict[str, Any] = {
                k: str(v) for k, v in data.items() if k in Mark._fields and k != "heads"
            }
            if "heads" in data:
                fields["heads"] = tuple(str(h) for h in data["heads"])
            return Mark(**fields)
        except (ValueError, TypeError, AttributeError):
            return Mark(kind="marked")  # ours, but unreadable: still a mark
    return None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def looks_like_test_name(dbname: str) -> bool:
    return "test" in dbname.lower()


def check_test_database(
    dbname: str, settings: Settings, mark: Mark | None, *, action: str = "empty"
) -> None:
    """Refuse a database that is not recognisably a test database: its name holds
    ``test``, dbreset marked it, or it is listed in ``allowed_databases``."""
    if looks_like_test_name(dbname) or mark is not None:
        return
    if any(fnmatchcase(dbname, pattern) for pattern in settings.allowed_databases):
        return
    raise SafetyError(
        f"refusing to {action} {printable(dbname)!r}: it does not look like a test database "
        "(its name does not contain 'test', dbreset did not make or mark it, and it is not "
        "in allowed_databases); if it is one, run `dbreset mark`, add it to "
        "allowed_databases in [tool.dbreset] (DBRESET_ALLOWED_DATABASES), or rename it"
    )


def derived_name(base: str, suffix: str) -> str:
    """``<base>_<suffix>`` within PostgreSQL's 63 bytes: a long *base* is cut and
    followed by a short hash of the whole, so two long names never collide."""
    name = f"{base}_{suffix}"
    if len(name.encode()) <= NAME_MAX:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    room = NAME_MAX - len(f"_{digest}_{suffix}".encode())
    cut = base.encode()[:room].decode("utf-8", "ignore")
    return f"{cut}_{digest}_{suffix}"


# --------------------------------------------------------------------------- connections

#: Session settings of every dbreset connection, sent at connect time (no round
#: trip): a role's statement_timeout must not cancel a reset, and rows are
#: compared and copied as text, which these settings make exact and stable.
SESSION_OPTIONS = (
    "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0 "
    "-c idle_session_timeout=0 -c jit=off -c TimeZone=UTC -c DateStyle=ISO,MDY "
    "-c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex"
)


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
    params["options"] = " ".join(filter(None, [params.get("options"), SESSION_OPTIONS]))
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


#: Databases to connect to for CREATE and DROP DATABASE, in order.
MAINTENANCE_DATABASES = ("postgres", "template1")


def connect_maintenance(
    target: Target, settings: Settings, *, role: str
) -> psycopg.Connection[Any]:
    """A connection to a maintenance database of the target's server."""
    import psycopg

    last: Exception | None = None
    for name in MAINTENANCE_DATABASES:
        try:
            return connect(target, settings, role=role, dbname=name)
        except ConnectError as exc:
            last = exc
            if "does not exist" not in str(exc):
                raise
    raise connect_error(
        psycopg.OperationalError("no maintenance database (postgres, template1) to connect to"),
        target,
        target.dbname,
    ) from last


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


#: Who the given backends are (for pg_blocking_pids).
HOLDERS_OF_PIDS_SQL = """
SELECT pid, coalesce(application_name, ''),
       coalesce(client_hostname, host(client_addr), 'local socket'),
       coalesce(state, ''), coalesce(xact_start, backend_start), '', coalesce(left(query, 80), '')
FROM pg_stat_activity WHERE pid = ANY(%(pids)s::int[]) ORDER BY pid
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
        release(conn)


def release(conn: psycopg.Connection[Any]) -> None:
    """Let go of the exclusive lock; a connection that is gone let go already."""
    import psycopg

    if conn.closed:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
