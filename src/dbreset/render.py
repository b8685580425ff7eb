"""Output: rich text for people (results on stdout, progress, warnings and
errors on stderr) and ``--json`` for scripts. The only module that prints.

Every name that came from the database (tables, sequences, databases,
application names) reaches here with its control characters escaped
(:func:`dbreset.redact.printable`), and is escaped again for rich markup.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

from dbreset.errors import JSON_SCHEMA
from dbreset.redact import printable

if TYPE_CHECKING:
    from rich.console import Console

    from dbreset.operations import (
        MigrateResult,
        ResetResult,
        Result,
        TableRows,
        TruncateResult,
    )
    from dbreset.reports import DropResult, ListResult, MarkResult, StatusResult


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

    return rich_escape(printable(text))


def _plain_stdout() -> bool:
    """Where rich would print no style at all: not a terminal, colour not forced."""
    forced = os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE")
    return not forced and not sys.stdout.isatty()


#: How many tables are named before "… and N more".
SHOWN_TABLES = 12


def as_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- progress


@contextmanager
def progress(label: str) -> Iterator[None]:
    """Say on stderr what is being done, once it has taken about a second, and
    only on a terminal (never in a log or a pipe)."""
    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    start = time.monotonic()
    shown = threading.Event()

    def tick() -> None:
        if done.wait(1.0):
            return
        while not done.is_set():
            shown.set()
            sys.stderr.write(
                f"\r\x1b[Kdbreset: {printable(label)} … {time.monotonic() - start:.0f} s"
            )
            sys.stderr.flush()
            done.wait(0.5)

    thread = threading.Thread(target=tick, name="dbreset-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if shown.is_set():
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# --------------------------------------------------------------------------- results


def result(res: Result, *, as_json_output: bool, quiet: bool) -> None:
    from dbreset.operations import MigrateResult, ResetResult, TruncateResult

    if as_json_output:
        as_json({"ok": True, **res.to_dict()})
        return
    if isinstance(res, ResetResult):
        _reset(res, quiet)
        _warnings(res.warnings)
        return
    if isinstance(res, TruncateResult):
        _header("truncate", res.target, res.elapsed_ms, res.dry_run)
        if not quiet:
            _truncate(res)
        _warnings(res.warnings)
        return
    if isinstance(res, MigrateResult):
        _header("migrate", res.target, res.elapsed_ms, res.dry_run)
        if not quiet:
            _migrate(res)
        return
    from dbreset.reports import DropResult, ListResult, MarkResult, StatusResult

    if isinstance(res, StatusResult):
        _status(res, quiet)
    elif isinstance(res, ListResult):
        _list(res, quiet)
    elif isinstance(res, DropResult):
        _drop(res, quiet)
    elif isinstance(res, MarkResult):
        _mark(res)


def _warnings(warnings: tuple[str, ...]) -> None:
    for warning in warnings:
        _err().print(f"[bold yellow]dbreset: warning:[/] {escape(warning)}")


def _header(verb: str, target: str, ms: float, dry_run: bool) -> None:
    """The summary line; written without importing rich where rich would print
    no style anyway, so that ``-q`` in a Makefile or CI stays cheap."""
    if dry_run:
        name, rest = f"dbreset {verb} --dry-run", f"{target}: nothing was changed"
    else:
        name, rest = f"dbreset {verb}", f"{target} in {ms:.0f} ms"
    if _plain_stdout():
        sys.stdout.write(f"{name} {printable(rest)}\n")
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


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _rows(item: TableRows) -> str:
    more = "+" if item.more else ""
    return f"{escape(item.table)} ({item.rows}{more} row{'s' if item.rows != 1 else ''})"


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_TABLES])
    if len(items) > SHOWN_TABLES:
        shown += f", … and {len(items) - SHOWN_TABLES} more"
    return shown


def _truncate(res: TruncateResult) -> None:
    verb = "would empty" if res.dry_run else "emptied"
    if res.emptied:
        rows = _some([_rows(t) for t in res.emptied])
        _line(verb, f"{len(res.emptied)} of {res.tables_checked} tables: {rows}")
    else:
        _line(verb, f"0 of {res.tables_checked} tables: all were as freshly migrated")
    if res.restored:
        verb = "would restore" if res.dry_run else "restored"
        shown = _some([f"{escape(r.table)} ({_plural(r.rows, 'row')})" for r in res.restored])
        _line(verb, f"{_plural(len(res.restored), 'seeded table')}: {shown}")
    restart = "would restart" if res.dry_run else "restarted"
    if res.sequences_restarted:
        names = _some([escape(s) for s in res.sequences_restarted])
        _line(restart, f"{_plural(len(res.sequences_restarted), 'sequence')}: {names}")
    else:
        _line(restart, "0 sequences: all were where a fresh migration leaves them")
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
    if res.recreated:
        _line("recreated", f"dropped and cloned from {escape(res.pristine or '?')}")
    elif res.created:
        _line("created", "the database did not exist and was created")
    if res.pristine_built:
        _line("pristine", f"built {escape(res.pristine or '?')} (freshly migrated, a template)")
    _migrate(res.migrate)
    if not res.recreated:
        _truncate(res.truncate)


def _setting_value(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _status(res: StatusResult, quiet: bool) -> None:
    state = "[green]at head[/]" if res.at_head else "[yellow]behind[/]"
    if res.unknown_revisions:
        state = "[red]unknown revision (another branch?)[/]"
    if quiet:
        _out().print(
            f"[bold]dbreset status[/] {escape(res.target)}: {_revs(res.current)} {state}, "
            f"{_plural(len(res.nonempty), 'table')} with rows"
        )
        return
    _out().print(f"[bold]dbreset status[/] {escape(res.target)}")
    _line("server", f"PostgreSQL {escape(res.server_version)}, database {escape(res.database)}")
    _line("revision", f"{_revs(res.current)} (scripts: {_revs(res.heads)}) {state}")
    _line("test db", escape(res.test_database) if res.test_database else "[red]no[/]")
    if res.problem:
        _line("problem", escape(res.problem))
    if res.nonempty:
        rows = _some([_rows(t) for t in res.nonempty])
        _line("rows", f"{len(res.nonempty)} of {res.tables_checked} tables hold rows: {rows}")
    elif res.tables_checked or not res.problem:
        seeded = " but for the seeded rows" if res.baseline else ""
        _line("rows", f"all {res.tables_checked} tables are empty{seeded}")
    if res.seeded_changed:
        changed = _some([escape(t) for t in res.seeded_changed])
        _line("seeded", f"not as freshly migrated: {changed}")
    if not res.baseline and res.heads:
        _line("baseline", "not known yet (the next reset builds the pristine database)")
    _line("held by", escape("; ".join(res.holders)) if res.holders else "nobody")
    _out().print("  [cyan]settings[/]")
    for key, setting in res.settings.items():
        value = _setting_value(setting.value)
        _out().print(f"    {key:<18}{escape(value)}  [dim]({escape(setting.source)})[/]")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _list(res: ListResult, quiet: bool) -> None:
    _out().print(f"[bold]dbreset list[/] {escape(res.target)}")
    if not res.databases:
        _line("none", "dbreset has made no database for this target")
        return
    rows = [("database", "kind", "size", "migrations", "current", "last used", "stale")]
    for db in res.databases:
        current = "" if db.current is None else ("yes" if db.current else "no")
        migrations = ", ".join(db.revision) or (db.fingerprint or "")[:12]
        kind = db.kind + (f" ({db.branch})" if db.branch else "")
        used = (db.last_used or "")[:16].replace("T", " ")
        rows.append(
            (db.name, kind, _size(db.size_bytes), migrations, current, used, db.stale or "")
        )
    widths = [max(len(printable(row[i])) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [printable(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        text = escape("  ".join(cells).rstrip())
        _out().print(f"  [cyan]{text}[/]" if n == 0 else f"  {text}", crop=False)


def _drop(res: DropResult, quiet: bool) -> None:
    verb = "would drop" if res.dry_run else "dropped"
    _out().print(f"[bold]dbreset drop[/] {escape(res.target)}")
    if res.dropped:
        _line(verb, f"{_plural(len(res.dropped), 'database')}: {escape(', '.join(res.dropped))}")
    else:
        _line(verb, "nothing")
    if res.kept and not quiet:
        _line("kept", escape("; ".join(res.kept)))


def _mark(res: MarkResult) -> None:
    if res.already:
        _out().print(f"[bold]dbreset mark[/] {escape(res.database)} was marked already")
    else:
        _out().print(
            f"[bold green]dbreset mark[/] {escape(res.database)} is now a test database "
            "(dbreset's mark is in its comment)"
        )


def error(exc: BaseException, *, verbose: bool, as_json_output: bool, code: int) -> None:
    if verbose:
        _err().print(escape("".join(traceback.format_exception(exc))), end="")
    message = printable(str(exc) or type(exc).__name__)
    _err().print(f"[bold red]dbreset: error:[/] {escape(message)}")
    if as_json_output:
        as_json({"ok": False, "schema": JSON_SCHEMA, "error": message, "exit_code": code})
