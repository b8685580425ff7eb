"""Run one command line: settings → one library call → render.

Both readers of the command line (:mod:`dbreset.console` for plain lines,
:mod:`dbreset.cli` for everything else, through Typer) turn it into an
:class:`Invocation` and hand it to :func:`execute`, the one place where errors
become exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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
    recreate: bool = False
    #: drop: which databases
    stale: bool = False
    every: bool = False


def setting_flags(**values: Any) -> dict[str, Any]:
    """The flags that were given: not None, False or empty (``--wait 0`` is given)."""
    return {k: v for k, v in values.items() if v is not None and v is not False and v != []}


#: Commands that change the target, and what the confirmation asks.
_QUESTIONS = {
    "truncate": "Empty every table of database {db} ({where})?",
    "reset": "Reset database {db} ({where}) to its freshly migrated state?",
    "drop": "Drop the databases dbreset made for {db} ({where})?",
    "mark": "Mark database {db} ({where}) as a test database that dbreset may empty?",
}


def _confirm(call: Invocation, settings: Settings) -> None:
    from dbreset.database import make_target
    from dbreset.errors import SafetyError
    from dbreset.redact import printable

    if call.yes or call.dry_run or call.command not in _QUESTIONS:
        return
    target = make_target(settings.require_url())
    name = repr(printable(target.dbname))
    if not sys.stdin.isatty():
        raise SafetyError(
            f"refusing to {call.command} {name} without confirmation: no terminal to ask "
            "on, pass --yes"
        )
    import typer

    if call.command == "reset" and call.recreate:
        question = f"Drop database {name} ({target.display}) and create it again?"
    else:
        question = _QUESTIONS[call.command].format(db=name, where=target.display)
    try:
        confirmed = typer.confirm(question, default=False, err=True)
    except (typer.Abort, EOFError, KeyboardInterrupt):
        confirmed = False
    if not confirmed:
        raise SafetyError("not confirmed; nothing was changed")


def _action(call: Invocation) -> Callable[[Settings], Result]:
    from dbreset import operations, render

    progress = render.progress
    if call.command == "migrate":
        return lambda s: operations.migrate(s, progress=progress)
    if call.command == "truncate":
        return lambda s: operations.truncate(s, dry_run=call.dry_run, progress=progress)
    if call.command == "reset":
        return lambda s: operations.reset(
            s, dry_run=call.dry_run, create=call.create, recreate=call.recreate, progress=progress
        )
    if call.command == "list":
        return operations.list_databases
    if call.command == "drop":
        return lambda s: operations.drop(
            s, stale=call.stale, every=call.every, dry_run=call.dry_run
        )
    if call.command == "mark":
        return operations.mark
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
        _confirm(call, settings)
        res = _action(call)(settings)
    except DbResetError as exc:
        render.error(exc, verbose=call.verbose, as_json_output=as_json, code=exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        render.error(
            RuntimeError("interrupted before anything was changed"),
            verbose=False,
            as_json_output=as_json,
            code=130,
        )
        return 130
    except Exception as exc:
        from dbreset.redact import scrub

        text = scrub(f"internal error: {type(exc).__name__}: {exc}", url)
        hint = "" if call.verbose else " (run with --verbose for the traceback)"
        error = RuntimeError(text + hint)
        error.__traceback__ = exc.__traceback__
        render.error(error, verbose=call.verbose, as_json_output=as_json, code=1)
        return 1
    render.result(res, as_json_output=as_json, quiet=call.quiet)
    return 0
