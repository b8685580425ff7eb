"""The ``dbreset`` command line: resolve settings → one library call → render.

This is the one place where errors become exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dbreset import __version__

if TYPE_CHECKING:
    from dbreset.operations import Result
    from dbreset.settings import Settings

EPILOG = """\
\b
Examples:
  dbreset reset                     # migrate to head, empty every table, restart sequences
  dbreset reset --yes               # the same, without asking (Makefile, CI)
  dbreset reset --dry-run           # show the plan, change nothing
  dbreset reset --create --yes      # create the database first if it is missing
  dbreset truncate --exclude 'country_*' --schema public --schema audit --yes
  dbreset status --json

\b
The URL comes from --url, DBRESET_URL or DATABASE_URL (see url_env).
Exit codes: 0 done, 2 usage/config, 3 refused by the safety guard, 4 cannot
connect, 5 migration failed, 6 busy, 7 could not empty the database.
"""

app = typer.Typer(
    name="dbreset",
    help="Put a PostgreSQL test database into a known state: migrated to head, "
    "every table empty, every sequence restarted.",
    epilog=EPILOG,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Database URL (default: $DBRESET_URL, then $DATABASE_URL).",
        show_default=False,
    ),
]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Alembic configuration file.  [default: alembic.ini]",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Wait = Annotated[
    float | None,
    typer.Option(
        "--wait", help="Seconds to wait for locks held by others.  [default: 5]", show_default=False
    ),
]
AllowRemote = Annotated[
    bool, typer.Option("--allow-remote", help="Allow a host other than this machine.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
Schema = Annotated[
    list[str] | None,
    typer.Option(
        "--schema",
        help="Schema to empty; repeat for several.  [default: public]",
        show_default=False,
    ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Glob of tables to keep (name or schema.name); repeatable.",
        show_default=False,
    ),
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")]
Create = Annotated[bool, typer.Option("--create", help="Create the database if it is missing.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dbreset {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Put a PostgreSQL test database into a known state."""


def _flags(**values: Any) -> dict[str, Any]:
    # `is`, not `in`: --wait 0 is a value (0.0 == False)
    return {k: v for k, v in values.items() if v is not None and v is not False and v != []}


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
    question = f"Empty every table of database {target.dbname!r} ({target.display})?"
    if not typer.confirm(question, default=False, err=True):
        raise SafetyError("not confirmed; nothing was changed")


def _run(
    flags: dict[str, Any],
    action: Callable[[Settings], Result],
    *,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    destructive: bool = False,
    yes: bool = False,
) -> None:
    from dbreset import render
    from dbreset.errors import DbResetError

    url = flags.get("url")
    try:
        from dbreset.settings import resolve_settings

        settings = resolve_settings(flags)
        url = settings.url
        settings.require_url()
        if destructive:
            _confirm(settings, yes=yes)
        res = action(settings)
    except DbResetError as exc:
        render.error(exc, verbose=verbose, as_json_output=as_json, code=exc.exit_code)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        render.error(
            RuntimeError("interrupted; every change was rolled back"),
            verbose=False,
            as_json_output=as_json,
            code=130,
        )
        raise typer.Exit(130) from None
    except Exception as exc:
        from dbreset.database import scrub

        text = scrub(f"internal error: {type(exc).__name__}: {exc}", url)
        hint = "" if verbose else " (run with --verbose for the traceback)"
        render.error(RuntimeError(text + hint), verbose=verbose, as_json_output=as_json, code=1)
        raise typer.Exit(1) from None
    render.result(res, as_json_output=as_json, quiet=quiet)


@app.command(epilog="Example: dbreset migrate --url postgresql://localhost/app_test")
def migrate(
    url: Url = None,
    config: Config = None,
    json: Json = False,
    wait: Wait = None,
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Upgrade the database to the newest Alembic revision (skipped when at head)."""
    from dbreset import operations

    flags = _flags(url=url, alembic_config=config, wait=wait, allow_remote=allow_remote)
    _run(flags, operations.migrate, as_json=json, quiet=quiet, verbose=verbose)


@app.command(epilog="Example: dbreset truncate --exclude 'country_*' --yes")
def truncate(
    url: Url = None,
    config: Config = None,
    schema: Schema = None,
    exclude: Exclude = None,
    yes: Yes = False,
    dry_run: DryRun = False,
    json: Json = False,
    wait: Wait = None,
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Empty every table (except the Alembic version table) and restart sequences."""
    from dbreset import operations

    flags = _flags(
        url=url,
        alembic_config=config,
        schemas=schema,
        exclude=exclude,
        wait=wait,
        allow_remote=allow_remote,
    )
    _run(
        flags,
        lambda s: operations.truncate(s, dry_run=dry_run),
        as_json=json,
        quiet=quiet,
        verbose=verbose,
        destructive=not dry_run,
        yes=yes,
    )


@app.command(epilog="Example: dbreset reset --create --yes")
def reset(
    url: Url = None,
    config: Config = None,
    schema: Schema = None,
    exclude: Exclude = None,
    yes: Yes = False,
    dry_run: DryRun = False,
    create: Create = False,
    json: Json = False,
    wait: Wait = None,
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Migrate to head, then empty every table and restart every sequence."""
    from dbreset import operations

    flags = _flags(
        url=url,
        alembic_config=config,
        schemas=schema,
        exclude=exclude,
        wait=wait,
        allow_remote=allow_remote,
    )
    _run(
        flags,
        lambda s: operations.reset(s, dry_run=dry_run, create=create),
        as_json=json,
        quiet=quiet,
        verbose=verbose,
        destructive=not dry_run,
        yes=yes,
    )


@app.command(epilog="Example: dbreset status --json")
def status(
    url: Url = None,
    config: Config = None,
    json: Json = False,
    allow_remote: AllowRemote = False,
    verbose: Verbose = False,
) -> None:
    """Show the target, its revision, leftover rows, who holds it, and the settings."""
    from dbreset import operations

    flags = _flags(url=url, alembic_config=config, allow_remote=allow_remote)
    _run(flags, operations.status, as_json=json, quiet=False, verbose=verbose)


def main() -> None:
    app()
