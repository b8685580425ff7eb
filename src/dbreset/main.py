"""The ``dbreset`` console script (and ``python -m dbreset``): read the command
line with the plain-line reader or, for anything else, the Typer app; run it
with :func:`dbreset.execute.execute`; exit."""

from __future__ import annotations

import gc
import sys


def main() -> None:
    """The console script. Exits.

    The objects that imports make live until the process ends, and the garbage
    collector finds nothing to free among them; yet on a plain reset it scans
    them some 70 times while psycopg and the library are imported (~10 ms), and
    once more at exit (~25 ms), of a ~200 ms process. ``gc.freeze()`` puts them
    out of its reach. Nothing of ours waits for the collector: connections are
    closed and files written explicitly, and atexit handlers and the flush of
    stdout/stderr still run.
    """
    from dbreset.console import parse_plain

    try:
        call = parse_plain(sys.argv[1:])
        if call is None:
            from dbreset.cli import app

            app()
            return
        _import_library()
        from dbreset.execute import execute

        sys.exit(execute(call))
    finally:
        gc.freeze()


def _import_library() -> None:
    """Import psycopg and the library with the collector paused, then freeze what
    the imports made. An import that fails is left for ``execute`` to report."""
    gc.disable()
    try:
        from dbreset import operations, render  # noqa: F401
    except ImportError:
        pass
    finally:
        gc.freeze()
        gc.enable()
