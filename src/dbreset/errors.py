"""One exception tree; each class carries the process exit code it maps to."""

from __future__ import annotations

#: Version of every ``--json`` document (see the README's "JSON output").
JSON_SCHEMA = 1


class DbResetError(Exception):
    """Base of every error dbreset reports to a user.

    The message is one or two lines: what happened and what to do. It never
    contains a password.
    """

    exit_code = 1


class ConfigError(DbResetError):
    """Usage or configuration: bad flag, no URL, no alembic.ini, unknown key."""

    exit_code = 2


class SafetyError(DbResetError):
    """Refused by the safety guard: remote host, not confirmed."""

    exit_code = 3


class ConnectError(DbResetError):
    """Cannot connect: unreachable, authentication, database missing."""

    exit_code = 4


class MigrationError(DbResetError):
    """Alembic failed to upgrade the database."""

    exit_code = 5


class BusyError(DbResetError):
    """A lock was not obtained in time; the message names the holders."""

    exit_code = 6


class TruncateError(DbResetError):
    """The database could not be emptied (permission, CASCADE into excluded tables)."""

    exit_code = 7


class Interrupted(DbResetError):
    """Ctrl-C: the message says what had committed by then."""

    exit_code = 130
