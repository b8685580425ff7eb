"""Helpers for tests that run the dbreset command line: in process (Typer's
CliRunner) and as real processes, on a terminal of their own when asked."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import subprocess
import sys
import termios
import time
from pathlib import Path

from typer.testing import CliRunner

from dbreset.cli import app


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The command line in process (Typer's CliRunner): exit code, stdout, stderr."""
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def proc_env(work: Path, **extra: str) -> dict[str, str]:
    """dbreset's environment in *work*: no DBRESET_* nor DATABASE_URL, its own cache; *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBRESET_")}
    env.pop("DATABASE_URL", None)
    env["XDG_CACHE_HOME"] = str(work.parent / "cache")
    env.update(extra)
    return env


def pty_prompt(work: Path, args: list[str], answer: bytes) -> tuple[int, str]:
    """dbreset on its own controlling terminal (^C is a SIGINT), the prompt answered *answer*."""
    leader, follower = pty.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "dbreset", *args],
        cwd=work,
        env=proc_env(work),
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=follower,
        preexec_fn=own_terminal,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in seen and time.monotonic() < deadline:
        try:
            seen += os.read(leader, 1024)
        except OSError:
            break
    # Let it reach its read of the terminal: a SIGINT that lands between the
    # prompt and the read is lost by Python's readline loop (a person's ^C
    # always comes later).
    time.sleep(0.5)
    os.write(leader, answer)
    out, _ = proc.communicate(timeout=60)
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 1024):
            seen += chunk
    os.close(leader)
    return proc.returncode, seen.decode(errors="replace") + out.decode()
