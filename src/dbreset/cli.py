"""The ``dbreset`` Typer app: every command, option, help text and prompt.

Each command turns its options into an :class:`~dbreset.execute.Invocation`
and hands it to :func:`dbreset.execute.execute`, the one place where errors
become exit codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dbreset import __version__
from dbreset.execute import Invocation, execute, setting_flags

EPILOG = """\
[bold]Examples[/bold]

  dbreset reset                   [dim]# migrate, back to freshly migrated[/dim]
  dbreset reset --yes             [dim]# without asking (Makefile, CI)[/dim]
  dbreset reset --dry-run         [dim]# show the plan, change nothing[/dim]
  dbreset reset --create --yes    [dim]# create the database if missing[/dim]
  dbreset reset --recreate --yes  [dim]# drop it, clone it again[/dim]
  dbreset truncate --schema public --exclude 'country_*' --yes
  dbreset status --json
  dbreset list                    [dim]# pristine and worker databases[/dim]
  dbreset drop --stale --yes

The URL comes from --url, DBRESET_URL or DATABASE_URL (see url_env); its
database name may hold {branch} and {worktree}. Exit codes: 0 done,
2 usage/config, 3 refused by the safety guard, 4 cannot connect, 5 migration
failed, 6 busy, 7 could not empty the database, 130 interrupted.
"""

TARGET = "Target"
CHOICE = "What is reset"
SAFETY = "Safety"
OUTPUT = "Output"

app = typer.Typer(
    name="dbreset",
    help="Put a PostgreSQL test database into a known state: migrated to head, exactly as a "
    "fresh migration leaves it (seeded rows kept, every other row gone, every sequence back).",
    epilog=EPILOG,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        metavar="URL",
        help="Database URL. [dim]\\[default: $DBRESET_URL, then $DATABASE_URL][/dim]",
        show_default=False,
        rich_help_panel=TARGET,
    ),
]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="PATH",
        help="Alembic configuration file. [dim]\\[default: alembic.ini][/dim]",
        show_default=False,
        rich_help_panel=TARGET,
    ),
]
AllowRemote = Annotated[
    bool,
    typer.Option(
        "--allow-remote", help="Allow a host other than this machine.", rich_help_panel=TARGET
    ),
]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON.", rich_help_panel=OUTPUT)
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print only the summary line.", rich_help_panel=OUTPUT),
]
Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Show tracebacks on errors.", rich_help_panel=OUTPUT),
]
Wait = Annotated[
    float | None,
    typer.Option(
        "--wait",
        metavar="SECONDS",
        help="Seconds to wait for locks held by others. [dim]\\[default: 5][/dim]",
        show_default=False,
        rich_help_panel=SAFETY,
    ),
]
Yes = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Do not ask for confirmation.", rich_help_panel=SAFETY),
]
DryRun = Annotated[
    bool,
    typer.Option("--dry-run", help="Print the plan; change nothing.", rich_help_panel=SAFETY),
]
Schema = Annotated[
    list[str] | None,
    typer.Option(
        "--schema",
        metavar="SCHEMA",
        help="Schema to reset; repeat for several. [dim]\\[default: public][/dim]",
        show_default=False,
        rich_help_panel=CHOICE,
    ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="GLOB",
        help="Tables never touched (name or schema.name glob); repeatable.",
        show_default=False,
        rich_help_panel=CHOICE,
    ),
]
Create = Annotated[
    bool,
    typer.Option(
        "--create",
        help="Create the database if it is missing (cloned freshly migrated).",
        rich_help_panel=TARGET,
    ),
]
Recreate = Annotated[
    bool,
    typer.Option(
        "--recreate",
        help="Drop the database and clone it again from the pristine database "
        "(for a database left at another branch's revision).",
        rich_help_panel=TARGET,
    ),
]


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


@app.command(
    short_help="Upgrade the database to the newest revision (skipped when at head).",
    epilog="Example: dbreset migrate --url postgresql://localhost/app_test",
)
def migrate(
    url: Url = None,
    config: Config = None,
    allow_remote: AllowRemote = False,
    wait: Wait = None,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Upgrade the database to the newest Alembic revision, with your own env.py
    (skipped when it is at head already)."""
    flags = setting_flags(url=url, alembic_config=config, wait=wait, allow_remote=allow_remote)
    _run(Invocation("migrate", flags, as_json=json, quiet=quiet, verbose=verbose))


@app.command(
    short_help="Empty every table and restart every sequence (no migration).",
    epilog="Example: dbreset truncate --exclude 'country_*' --yes",
)
def truncate(
    url: Url = None,
    config: Config = None,
    allow_remote: AllowRemote = False,
    schema: Schema = None,
    exclude: Exclude = None,
    yes: Yes = False,
    dry_run: DryRun = False,
    wait: Wait = None,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Empty every table of the chosen schemas (never the Alembic version table,
    views or foreign tables) and restart every sequence, in one transaction.
    Seeded rows go too: reset keeps them."""
    flags = setting_flags(
        url=url,
        alembic_config=config,
        schemas=schema,
        exclude=exclude,
        wait=wait,
        allow_remote=allow_remote,
    )
    _run(Invocation("truncate", flags, yes, dry_run, False, json, quiet, verbose))


@app.command(
    short_help="Migrate, then put the database back exactly as a fresh migration leaves it.",
    epilog="Example: dbreset reset --create --yes",
)
def reset(
    url: Url = None,
    config: Config = None,
    allow_remote: AllowRemote = False,
    create: Create = False,
    recreate: Recreate = False,
    schema: Schema = None,
    exclude: Exclude = None,
    yes: Yes = False,
    dry_run: DryRun = False,
    wait: Wait = None,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Migrate to head, then put the database back as `alembic upgrade heads` leaves
    an empty database: rows the migrations seed as they leave them, every other row
    gone, every sequence where a fresh migration leaves it. Only what changed is
    touched, in one transaction."""
    flags = setting_flags(
        url=url,
        alembic_config=config,
        schemas=schema,
        exclude=exclude,
        wait=wait,
        allow_remote=allow_remote,
    )
    _run(Invocation("reset", flags, yes, dry_run, create, json, quiet, verbose, recreate=recreate))


@app.command(
    short_help="Show the target, its revision, leftover rows, who holds it, and the settings.",
    epilog="Example: dbreset status --json",
)
def status(
    url: Url = None,
    config: Config = None,
    allow_remote: AllowRemote = False,
    schema: Schema = None,
    exclude: Exclude = None,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Show the target (password masked), its revision against the scripts' heads,
    the tables that hold rows, who holds the database, and every setting with where
    it came from."""
    flags = setting_flags(
        url=url, alembic_config=config, schemas=schema, exclude=exclude, allow_remote=allow_remote
    )
    _run(Invocation("status", flags, as_json=json, quiet=quiet, verbose=verbose))


@app.command(
    "list",
    short_help="List the databases dbreset made for this target (pristine, workers).",
    epilog="Example: dbreset list --json",
)
def list_(
    url: Url = None,
    config: Config = None,
    allow_remote: AllowRemote = False,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """List every database dbreset made on the server for this target: its pristine
    databases, its xdist worker databases (and, for a URL with {branch}, the other
    branches' test databases), with size, migrations, whether current, last use."""
    flags = setting_flags(url=url, alembic_config=config, allow_remote=allow_remote)
    _run(Invocation("list", flags, as_json=json, quiet=quiet, verbose=verbose))


@app.command(
    short_help="Drop databases dbreset made for this target: --stale or --all.",
    epilog="Example: dbreset drop --stale --yes",
)
def drop(
    url: Url = None,
    config: Config = None,
    allow_remote: AllowRemote = False,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale",
            help="Only those made from other migrations, for gone branches, or left unfinished.",
            rich_help_panel=CHOICE,
        ),
    ] = False,
    every: Annotated[
        bool,
        typer.Option(
            "--all", help="Every database dbreset made for this target.", rich_help_panel=CHOICE
        ),
    ] = False,
    yes: Yes = False,
    dry_run: DryRun = False,
    wait: Wait = None,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Drop databases dbreset made for this target (pristine, worker databases):
    never the target itself, never a database without dbreset's mark."""
    flags = setting_flags(url=url, alembic_config=config, wait=wait, allow_remote=allow_remote)
    _run(
        Invocation(
            "drop",
            flags,
            yes=yes,
            dry_run=dry_run,
            as_json=json,
            quiet=quiet,
            verbose=verbose,
            stale=stale,
            every=every,
        )
    )


@app.command(
    short_help="Declare the target a test database that dbreset may empty.",
    epilog="Example: dbreset mark --url postgresql://localhost/app_ci --yes",
)
def mark(
    url: Url = None,
    allow_remote: AllowRemote = False,
    yes: Yes = False,
    json: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Declare the target a test database: dbreset's mark goes into the database's
    comment (your own comment is kept). Without it, dbreset only empties databases
    whose name contains "test" or that allowed_databases lists."""
    flags = setting_flags(url=url, allow_remote=allow_remote)
    _run(Invocation("mark", flags, yes=yes, as_json=json, quiet=quiet, verbose=verbose))


def main() -> None:
    """The full command line, always through Typer (``dbreset.main:main`` is the
    console script)."""
    app()
