"""Output: rich text for people (results on stdout, progress and errors on
stderr) and ``--json`` for scripts. The only module that prints."""

from __future__ import annotations

import json
import os
import sys
import traceback
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from dbreset.operations import (
        MigrateResult,
        ResetResult,
        Result,
        StatusResult,
        TableRows,
        TruncateResult,
    )


# rich takes ~25 ms to import: it is imported when something is printed through it.
@cache
def _out() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@cache
def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _plain_stdout() -> bool:
    """Where rich would print no style at all: not a terminal, colour not forced."""
    forced = os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE")
    return not forced and not sys.stdout.isatty()


#: How many emptied tables are named before "… and N more".
SHOWN_TABLES = 12


def as_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def result(res: Result, *, as_json_output: bool, quiet: bool) -> None:
    from dbreset.operations import MigrateResult, ResetResult, StatusResult, TruncateResult

    if as_json_output:
        as_json({"ok": True, **res.to_dict()})
        return
    if isinstance(res, ResetResult):
        _reset(res, quiet)
    elif isinstance(res, TruncateResult):
        _header("truncate", res.target, res.elapsed_ms, res.dry_run)
        if not quiet:
            _truncate(res)
    elif isinstance(res, MigrateResult):
        _header("migrate", res.target, res.elapsed_ms, res.dry_run)
        if not quiet:
            _migrate(res)
    elif isinstance(res, StatusResult):
        _status(res)


def _header(verb: str, target: str, ms: float, dry_run: bool) -> None:
    """The summary line; written without importing rich where rich would print
    no style anyway, so that ``-q`` in a Makefile or CI stays cheap."""
    if dry_run:
        name, rest = f"dbreset {verb} --dry-run", f"{target}: nothing was changed"
    else:
        name, rest = f"dbreset {verb}", f"{target} in {ms:.0f} ms"
    if _plain_stdout():
        sys.stdout.write(f"{name} {rest}\n")
    else:
        style = "bold" if dry_run else "bold green"
        _out().print(f"[{style}]{name}[/] {escape(rest)}")


def _line(label: str, text: str) -> None:
    _out().print(f"  [cyan]{label:<13}[/] {text}")


def _revs(revs: tuple[str, ...]) -> str:
    return escape(", ".join(revs)) if revs else "(empty database)"


def _migrate(res: MigrateResult) -> None:
    if res.dry_run and res.pending:
        _line("migrations", f"{_revs(res.before)} → {_revs(res.heads)}, would apply:")
        for rev in res.pending:
            _out().print(f"    {escape(rev)}")
    elif res.upgraded:
        _line("migrations", f"{_revs(res.before)} → {_revs(res.after)}")
    else:
        _line("migrations", f"at head {_revs(res.after)}, nothing to migrate")


def _rows(item: TableRows) -> str:
    more = "+" if item.more else ""
    return f"{escape(item.table)} ({item.rows}{more} row{'s' if item.rows != 1 else ''})"


def _some_rows(items: tuple[TableRows, ...]) -> str:
    shown = ", ".join(_rows(t) for t in items[:SHOWN_TABLES])
    if len(items) > SHOWN_TABLES:
        shown += f", … and {len(items) - SHOWN_TABLES} more"
    return shown


def _truncate(res: TruncateResult) -> None:
    verb = "would empty" if res.dry_run else "emptied"
    if res.emptied:
        _line(verb, f"{len(res.emptied)} of {res.tables_checked} tables: {_some_rows(res.emptied)}")
    else:
        _line(verb, f"0 of {res.tables_checked} tables: all were empty already")
    restart = "would restart" if res.dry_run else "restarted"
    if res.sequences_restarted:
        names = escape(", ".join(res.sequences_restarted))
        n = len(res.sequences_restarted)
        _line(restart, f"{n} sequence{'' if n == 1 else 's'}: {names}")
    else:
        _line(restart, "0 sequences: all were at their start already")
    if res.matviews_refreshed:
        _line("refreshed", escape(", ".join(res.matviews_refreshed)))
    if res.excluded:
        _line("kept", escape(", ".join(res.excluded)))
    if res.kept_sequences:
        _line("kept", escape(", ".join(res.kept_sequences)))


def _reset(res: ResetResult, quiet: bool) -> None:
    _header("reset", res.target, res.elapsed_ms, res.dry_run)
    if quiet:
        return
    if res.created:
        _line("created", "the database did not exist and was created")
    _migrate(res.migrate)
    _truncate(res.truncate)


def _status(res: StatusResult) -> None:
    _out().print(f"[bold]dbreset status[/] {escape(res.target)}")
    _line("server", f"PostgreSQL {escape(res.server_version)}, database {escape(res.database)}")
    state = "[green]at head[/]" if res.at_head else "[yellow]behind[/]"
    _line("revision", f"{_revs(res.current)} (scripts: {_revs(res.heads)}) {state}")
    if res.problem:
        _line("problem", escape(res.problem))
    elif res.nonempty:
        rows = _some_rows(res.nonempty)
        _line("rows", f"{len(res.nonempty)} of {res.tables_checked} tables hold rows: {rows}")
    else:
        _line("rows", f"all {res.tables_checked} tables are empty")
    _line("held by", escape("; ".join(res.holders)) if res.holders else "nobody")
    _out().print("  [cyan]settings[/]")
    for key, (value, source) in res.settings.items():
        _out().print(f"    {key:<15}{escape(value)}  [dim]({escape(source)})[/]")


def error(exc: BaseException, *, verbose: bool, as_json_output: bool, code: int) -> None:
    if verbose:
        _err().print(escape("".join(traceback.format_exception(exc))), end="")
    message = str(exc) or type(exc).__name__
    _err().print(f"[bold red]dbreset: error:[/] {escape(message)}")
    if as_json_output:
        as_json({"ok": False, "error": message, "exit_code": code})
