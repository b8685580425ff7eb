"""The ``dbreset`` Typer app: every command, option, help text and prompt.

Each command turns its options into an :class:`~dbreset.console.Invocation`
and hands it to :func:`dbreset.console.execute`, the one place where errors
become exit codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dbreset import __version__
from dbreset.console import Invocation, execute, setting_flags

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


def _run(call: Invocation) -> None:
    code = execute(call)
    if code:
        raise typer.Exit(code)


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
    flags = setting_flags(url=url, alembic_config=config, wait=wait, allow_remote=allow_remote)
    _run(Invocation("migrate", flags, as_json=json, quiet=quiet, verbose=verbose))


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
    flags = setting_flags(
        url=url,
        alembic_config=config,
        schemas=schema,
        exclude=exclude,
        wait=wait,
        allow_remote=allow_remote,
    )
    _run(Invocation("truncate", flags, yes, dry_run, False, json, quiet, verbose))


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
    flags = setting_flags(
        url=url,
        alembic_config=config,
        schemas=schema,
        exclude=exclude,
        wait=wait,
        allow_remote=allow_remote,
    )
    _run(Invocation("reset", flags, yes, dry_run, create, json, quiet, verbose))


@app.command(epilog="Example: dbreset status --json")
def status(
    url: Url = None,
    config: Config = None,
    json: Json = False,
    allow_remote: AllowRemote = False,
    verbose: Verbose = False,
) -> None:
    """Show the target, its revision, leftover rows, who holds it, and the settings."""
    flags = setting_flags(url=url, alembic_config=config, allow_remote=allow_remote)
    _run(Invocation("status", flags, as_json=json, verbose=verbose))


def main() -> None:
    """The full command line, always through Typer (``dbreset.console:main`` is the
    console script)."""
    app()
