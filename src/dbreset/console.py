"""The ``dbreset`` console script: read the command line, run one verb, exit.

Every command line becomes an :class:`Invocation`, which :func:`execute` runs:
settings → one library call → render. This is the one place where errors
become exit codes.

The Typer app in :mod:`dbreset.cli` reads every command line, with help,
prompts and usage errors. A reset before a test run, from a Makefile or CI, is
mostly one plain line, ``dbreset reset --yes [--url URL] ...``, and importing
Typer is a tenth of such a reset: :func:`parse_plain` reads just those lines
(``migrate``, ``truncate``, ``reset`` with their own long options, ``-c``,
``-y``, ``-q``, ``-v``, each at most once but ``--schema``/``--exclude``) and
hands anything else to Typer. tests/test_cli.py checks that both read every
such line alike.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from dbreset.operations import Result
    from dbreset.settings import Settings


class Invocation(NamedTuple):
    """One command line, read."""

    command: str
    #: settings given as flags, by setting name (see :mod:`dbreset.settings`)
    flags: dict[str, Any]
    yes: bool = False
    dry_run: bool = False
    create: bool = False
    as_json: bool = False
    quiet: bool = False
    verbose: bool = False


def setting_flags(**values: Any) -> dict[str, Any]:
    """The flags that were given: not None, False or empty (``--wait 0`` is given)."""
    return {k: v for k, v in values.items() if v is not None and v is not False and v != []}


# --------------------------------------------------------------------------- plain lines

#: option → (setting, how its value is read); ``list`` options may repeat
_VALUES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--url": ("url", str),
    "--config": ("alembic_config", Path),
    "-c": ("alembic_config", Path),
    "--wait": ("wait", float),
    "--schema": ("schemas", list),
    "--exclude": ("exclude", list),
}
#: switch → field of :class:`Invocation` (or the setting ``allow_remote``)
_SWITCHES = {
    "--yes": "yes",
    "-y": "yes",
    "--dry-run": "dry_run",
    "--create": "create",
    "--json": "as_json",
    "--allow-remote": "allow_remote",
    "--quiet": "quiet",
    "-q": "quiet",
    "--verbose": "verbose",
    "-v": "verbose",
}
_COMMON = {"--url", "--config", "-c", "--json", "--wait", "--allow-remote"}
_COMMON |= {"--quiet", "-q", "--verbose", "-v"}
_EMPTYING = _COMMON | {"--schema", "--exclude", "--yes", "-y", "--dry-run"}
#: the commands read here, with the options each takes
_PLAIN = {"migrate": _COMMON, "truncate": _EMPTYING, "reset": _EMPTYING | {"--create"}}


def parse_plain(argv: Sequence[str]) -> Invocation | None:
    """Read a plain ``migrate``/``truncate``/``reset`` line; None for anything else."""
    if not argv or argv[0] not in _PLAIN:
        return None
    accepted = _PLAIN[argv[0]]
    values: dict[str, Any] = {}
    switches: dict[str, bool] = {}
    args = iter(argv[1:])
    for arg in args:
        name, equals, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name not in accepted:
            return None  # unknown, help, combined short options, a positional, "--"
        if name in _SWITCHES:
            field = _SWITCHES[name]
            if equals or field in switches:
                return None
            switches[field] = True
            continue
        setting, read = _VALUES[name]
        if not equals:
            value = next(args, None)  # type: ignore[assignment]
            if value is None:
                return None
        if read is list:
            values.setdefault(setting, []).append(value)
            continue
        if setting in values:
            return None
        try:
            values[setting] = read(value)
        except ValueError:
            return None
    allow_remote = switches.pop("allow_remote", False)
    return Invocation(argv[0], setting_flags(**values, allow_remote=allow_remote), **switches)


# --------------------------------------------------------------------------- running


def _confirm(settings: Settings, *, yes: bool) -> None:
    from dbreset.database import make_target
    from dbreset.errors import SafetyError

    if yes:
        return
    target = make_target(settings.require_url())
    if not sys.stdin.isatty():
        raise SafetyError(
            f"refusing to empty {target.dbname!r} without confirmation: no terminal to ask "
            "on, pass --yes"
        )
    import typer

    question = f"Empty every table of database {target.dbname!r} ({target.display})?"
    if not typer.confirm(question, default=False, err=True):
        raise SafetyError("not confirmed; nothing was changed")


def _action(call: Invocation) -> Callable[[Settings], Result]:
    from dbreset import operations

    if call.command == "migrate":
        return operations.migrate
    if call.command == "truncate":
        return lambda s: operations.truncate(s, dry_run=call.dry_run)
    if call.command == "reset":
        return lambda s: operations.reset(s, dry_run=call.dry_run, create=call.create)
    return operations.status


def execute(call: Invocation) -> int:
    """Run *call*, print its result or its error; the exit code."""
    from dbreset import render
    from dbreset.errors import DbResetError

    as_json = call.as_json
    url = call.flags.get("url")
    try:
        from dbreset.settings import resolve_settings

        settings = resolve_settings(call.flags)
        url = settings.url
        settings.require_url()
        if call.command in ("truncate", "reset") and not call.dry_run:
            _confirm(settings, yes=call.yes)
        res = _action(call)(settings)
    except DbResetError as exc:
        render.error(exc, verbose=call.verbose, as_json_output=as_json, code=exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        render.error(
            RuntimeError("interrupted; every change was rolled back"),
            verbose=False,
            as_json_output=as_json,
            code=130,
        )
        return 130
    except Exception as exc:
        from dbreset.database import scrub

        text = scrub(f"internal error: {type(exc).__name__}: {exc}", url)
        hint = "" if call.verbose else " (run with --verbose for the traceback)"
        error = RuntimeError(text + hint)
        render.error(error, verbose=call.verbose, as_json_output=as_json, code=1)
        return 1
    render.result(res, as_json_output=as_json, quiet=call.quiet)
    return 0


def main() -> None:
    """The console script: ``dbreset ...`` and ``python -m dbreset ...``. Exits.

    The objects that imports make live until the process ends, and the garbage
    collector finds nothing to free among them; yet on a plain reset it scans
    them some 70 times while psycopg and the library are imported (~10 ms), and
    once more at exit (~25 ms), of a ~200 ms process. ``gc.freeze()`` puts them
    out of its reach. Nothing of ours waits for the collector: connections are
    closed and files written explicitly, and atexit handlers and the flush of
    stdout/stderr still run.
    """
    try:
        call = parse_plain(sys.argv[1:])
        if call is None:
            from dbreset.cli import app

            app()
            return
        _import_library()
        sys.exit(execute(call))
    finally:
        gc.freeze()


def _import_library() -> None:
    """Import psycopg and the library with the collector paused, then freeze what
    the imports made. An import that fails is left for :func:`execute` to report."""
    gc.disable()
    try:
        from dbreset import operations, render  # noqa: F401
    except ImportError:
        pass
    finally:
        gc.freeze()
        gc.enable()
