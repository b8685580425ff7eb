"""The plain-line reader: ``dbreset reset --yes [--url URL] ...`` without Typer.

A reset before a test run, from a Makefile or CI, is mostly one plain line,
and importing Typer is a tenth of such a reset: :func:`parse_plain` reads just
those lines (``migrate``, ``truncate``, ``reset`` with their own long options,
``-c``, ``-y``, ``-q``, ``-v``, each at most once but ``--schema``/``--exclude``)
and returns None for anything else, which the Typer app in :mod:`dbreset.cli`
reads (help, prompts, usage errors, the other commands).
tests/test_cli.py checks that both read every such line alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dbreset.execute import Invocation, setting_flags

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
