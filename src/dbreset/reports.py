"""Results of the housekeeping verbs: ``status``, ``list``, ``drop``, ``mark``.

Apart from :mod:`dbreset.operations` so that a reset, which returns none of
them, does not pay for defining them; ``dbreset.operations.StatusResult`` and
the others still work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dbreset.operations import Result, TableRows


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


@dataclass(frozen=True)
class StatusResult(Result):
    target: str
    server_version: str
    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    at_head: bool
    nonempty: tuple[TableRows, ...]
    tables_checked: int
    holders: tuple[str, ...]
    settings: dict[str, Setting] = field(default_factory=dict)
    problem: str | None = None
    #: revisions recorded in the database that these migrations do not know
    unknown_revisions: tuple[str, ...] = ()
    #: why the guard accepts it as a test database (name, mark, allowed_databases)
    test_database: str | None = None
    #: seeded tables whose rows are not as a fresh migration leaves them
    seeded_changed: tuple[str, ...] = ()
    #: where the freshly migrated state is known from (None: not known yet)
    baseline: str | None = None


@dataclass(frozen=True)
class MadeDatabase:
    name: str
    #: pristine, worker, created, marked, building
    kind: str
    size_bytes: int | None
    fingerprint: str | None
    revision: tuple[str, ...]
    #: made from the current migrations (pristine, worker); None where it does not apply
    current: bool | None
    made: str | None
    last_used: str | None
    connections: int
    branch: str | None = None
    #: why ``drop --stale`` would drop it, if it would
    stale: str | None = None


@dataclass(frozen=True)
class ListResult(Result):
    target: str
    fingerprint: str | None
    databases: tuple[MadeDatabase, ...]


@dataclass(frozen=True)
class DropResult(Result):
    target: str
    dropped: tuple[str, ...]
    #: databases left, and why (in use, not stale)
    kept: tuple[str, ...] = ()
    dry_run: bool = False


@dataclass(frozen=True)
class MarkResult(Result):
    target: str
    database: str
    already: bool
