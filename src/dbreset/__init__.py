"""dbreset: put a PostgreSQL test database into a known state.

Migrated to the newest Alembic revision, every table empty, every sequence
restarted. The same verbs as the command line::

    from dbreset import resolve_settings, reset

    result = reset(resolve_settings({"url": "postgresql://localhost/app_test"}))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

#: The one place the version is written: hatchling reads it from here when building.
__version__ = "0.1.0"

__all__ = [
    "Settings",
    "__version__",
    "drop",
    "list_databases",
    "mark",
    "migrate",
    "reset",
    "resolve_settings",
    "status",
    "truncate",
]

_VERBS = {"drop", "list_databases", "mark", "migrate", "reset", "status", "truncate"}

if TYPE_CHECKING:
    from dbreset.operations import drop, list_databases, mark, migrate, reset, status, truncate
    from dbreset.settings import Settings, resolve_settings


def __getattr__(name: str) -> Any:
    # Lazy, so that `import dbreset` (and `dbreset --version`) stays cheap.
    if name in _VERBS:
        from dbreset import operations

        return getattr(operations, name)
    if name in {"Settings", "resolve_settings"}:
        from dbreset import settings

        return getattr(settings, name)
    raise AttributeError(name)
