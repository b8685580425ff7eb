"""Git facts for database names: which checkout, which branch, which branches exist.

A dbreset database name may hold ``{branch}`` and ``{worktree}``, e.g.
``postgresql://localhost/app_test_{branch}``, so that every branch or linked
worktree gets a test database of its own and two checkouts never wipe each
other's data or fight over the schema.

This module answers the questions that needs, by reading git's files rather
than by running git: dbreset runs at the start of every test session, and a
``git`` process costs more than the rest of a reset with nothing to migrate.
It understands ordinary checkouts (``.git`` is a folder), linked worktrees and
submodules (``.git`` is a file ``gitdir: <path>``; a worktree's ``commondir``
file names the shared repository), ``$GIT_DIR``, ``$GIT_WORK_TREE``,
``$GIT_COMMON_DIR``, ``$GIT_CEILING_DIRECTORIES`` and git's stop at a
filesystem boundary (``$GIT_DISCOVERY_ACROSS_FILESYSTEM``). Only when the files
do not tell -- the reftable ref format, or a ``HEAD`` it does not understand --
does a function run git, at most once per call.

It is a leaf: it imports the standard library and :mod:`dbreset.errors` only,
and imports :mod:`subprocess` and :mod:`hashlib` only when it needs them.
Every mistake a user can make raises :class:`~dbreset.errors.ConfigError`.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from dbreset.errors import ConfigError

__all__ = [
    "DETACHED_PREFIX",
    "MAX_NAME_BYTES",
    "PLACEHOLDERS",
    "Checkout",
    "ResolvedName",
    "current_branch",
    "find_checkout",
    "has_placeholders",
    "local_branches",
    "resolve_database_name",
    "sanitise",
]

#: The placeholders a database name may hold.
PLACEHOLDERS = ("branch", "worktree")

#: PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated by the server.
MAX_NAME_BYTES = 63

#: :func:`current_branch` of a detached HEAD is this plus the commit's first 12 hex digits.
DETACHED_PREFIX = "detached-"

#: Hex digits of a hash appended to shortened names and to names left empty by sanitising.
_HASH_HEX = 8

#: Hex digits of the commit named by a detached HEAD.
_DETACHED_HEX = 12

# One token of a template: an escaped brace, a placeholder, or a stray brace.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 object names
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")
# Characters git forbids in a ref name (git help check-ref-format).
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


@dataclass(frozen=True, slots=True)
class Checkout:
    """Where a git working tree and its repository live.

    ``worktree`` is the top folder of the working tree (its name is what
    ``{worktree}`` means), ``git_dir`` holds this working tree's own state
    (``HEAD``), ``common_dir`` the state every worktree shares (``refs/heads``,
    ``packed-refs``). The three are absolute, with symbolic links resolved, as
    ``git rev-parse --show-toplevel --git-dir --git-common-dir`` reports them.
    In an ordinary checkout ``git_dir == common_dir == worktree / ".git"``.
    """

    worktree: Path
    git_dir: Path
    common_dir: Path

    @property
    def name(self) -> str:
        """The name of the top folder: the raw value of ``{worktree}``."""
        return self.worktree.name


@dataclass(frozen=True, slots=True)
class ResolvedName:
    """A database name with its placeholders replaced, and what replaced them.

    ``branch`` and ``worktree`` are the raw values used (before sanitising),
    or ``None`` when the template does not use that placeholder, so a caller
    can record which branch or worktree a database belongs to. ``shortened``
    says that the name was cut to 63 bytes and given a hash suffix.
    """

    name: str
    template: str
    branch: str | None
    worktree: str | None
    shortened: bool


# ---------------------------------------------------------------- finding the checkout


def find_checkout(start: Path) -> Checkout | None:
    """Return the git checkout that contains ``start``, or ``None`` outside one.

    Walks up from ``start`` to the first folder holding a ``.git`` folder or
    ``.git`` file, the way git does: it stops below a folder listed in
    ``$GIT_CEILING_DIRECTORIES`` and at a filesystem boundary unless
    ``$GIT_DISCOVERY_ACROSS_FILESYSTEM`` is true, and skips a ``.git`` folder
    with no ``HEAD``. When ``$GIT_DIR`` is set there is no walk: that is the
    repository, and the working tree is ``$GIT_WORK_TREE`` when set, else the
    one the repository's layout names (the parent of a ``.git`` folder, the
    folder a linked worktree's ``gitdir`` file points into), else ``start``.
    (git itself takes the current folder in that case; a subfolder would give
    a different ``{worktree}``, which is never what is meant.)

    Spawns no process. Raises ConfigError when ``$GIT_DIR`` or a ``.git`` file
    points at something that is not a git directory.
    """
    env_git_dir = os.environ.get("GIT_DIR")
    if env_git_dir:
        return _checkout_from_env(env_git_dir, start)

    current = Path(start).resolve()
    ceilings = _ceiling_dirs()
    across = _env_true("GIT_DISCOVERY_ACROSS_FILESYSTEM")
    device = _device(current)
    while True:
        found = _checkout_at(current)
        if found is not None:
            return found
        parent = current.parent
        if parent == current or parent in ceilings:
            return None
        parent_device = _device(parent)
        if not across and None not in (device, parent_device) and parent_device != device:
            return None
        device = device if device is not None else parent_device
        current = parent


def _checkout_at(folder: Path) -> Checkout | None:
    """The checkout whose top folder is ``folder``, if it has a usable ``.git``."""
    dotgit = folder / ".git"
    try:
        mode = dotgit.stat().st_mode
    except OSError:  # missing, or not reachable: not a checkout here
        return None
    if stat.S_ISDIR(mode):
        if not (dotgit / "HEAD").is_file():
            return None  # git, too, keeps looking above a .git folder without HEAD
        git_dir = dotgit.resolve()
    elif stat.S_ISREG(mode):
        git_dir = _read_gitfile(dotgit)
    else:
        return None
    return Checkout(worktree=folder, git_dir=git_dir, common_dir=_common_dir(git_dir))


def _read_gitfile(path: Path) -> Path:
    """The git dir a ``.git`` file points to (linked worktrees and submodules)."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    first = text.splitlines()[0] if text else ""
    if not first.startswith("gitdir:"):
        raise ConfigError(
            f"{path} is not a git file (expected a line 'gitdir: <path>'): "
            "repair or remove it, or run dbreset outside this folder"
        )
    target = Path(first[len("gitdir:") :].strip())
    git_dir = (path.parent / target).resolve()  # a relative path is relative to the file
    if not (git_dir / "HEAD").is_file():
        raise ConfigError(
            f"{path} points to {git_dir}, which is not a git directory: if the worktree "
            "was moved, run `git worktree repair` in the main checkout"
        )
    return git_dir


def _common_dir(git_dir: Path) -> Path:
    """The shared repository: ``$GIT_COMMON_DIR``, the ``commondir`` file, or ``git_dir``."""
    env = os.environ.get("GIT_COMMON_DIR")
    if env:
        return Path(env).resolve()
    try:
        text = (git_dir / "commondir").read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return git_dir  # an ordinary checkout or a submodule
    return (git_dir / text.strip()).resolve()


def _checkout_from_env(env_git_dir: str, start: Path) -> Checkout:
    """The checkout named by ``$GIT_DIR`` (and ``$GIT_WORK_TREE``); see find_checkout."""
    git_dir = Path(env_git_dir).resolve()
    if not (git_dir / "HEAD").is_file():
        raise ConfigError(
            f"GIT_DIR={env_git_dir} is not a git directory: unset GIT_DIR or point it at one"
        )
    env_work_tree = os.environ.get("GIT_WORK_TREE")
    if env_work_tree:
        worktree = Path(env_work_tree).resolve()
    elif git_dir.name == ".git":
        worktree = git_dir.parent
    else:
        try:  # a linked worktree's admin folder names the worktree's .git file
            back = (git_dir / "gitdir").read_bytes().decode("utf-8", "surrogateescape")
            worktree = Path(back.strip()).resolve().parent
        except OSError:
            worktree = Path(start).resolve()
    return Checkout(worktree=worktree, git_dir=git_dir, common_dir=_common_dir(git_dir))


def _ceiling_dirs() -> frozenset[Path]:
    """The absolute folders of ``$GIT_CEILING_DIRECTORIES`` (relative entries are ignored)."""
    value = os.environ.get("GIT_CEILING_DIRECTORIES", "")
    return frozenset(
        Path(entry).resolve() for entry in value.split(os.pathsep) if os.path.isabs(entry)
    )


def _env_true(name: str) -> bool:
    """A git boolean from the environment."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _device(path: Path) -> int | None:
    """The filesystem ``path`` lives on, or ``None`` when it cannot be told."""
    try:
        return path.stat().st_dev
    except OSError:
        return None


# ---------------------------------------------------------------- branches


def current_branch(checkout: Checkout) -> str:
    """Return the branch checked out in ``checkout``: ``feature/x-42`` for
    ``ref: refs/heads/feature/x-42`` in ``HEAD``.

    A branch with no commit yet (just after ``git init`` or ``git switch
    --orphan``) is returned by its name like any other.

    A detached HEAD (a commit checked out directly: CI, ``git bisect``, a
    rebase in progress) gives ``detached-`` plus the commit's first 12 hex
    digits, e.g. ``detached-1a2b3c4d5e6f``: each commit gets its own database,
    as each branch does, so two worktrees detached at different commits never
    share one. (``dbreset drop --stale`` removes them later: no branch has
    such a name.)

    Reads ``HEAD`` only. Runs git once -- ``git status --porcelain=v2
    --branch`` -- when the file does not tell: the reftable ref format, a
    symbolic-link ``HEAD`` or one pointing outside ``refs/heads``. Raises
    ConfigError when that fails.
    """
    head = checkout.git_dir / "HEAD"
    if not _uses_reftable(checkout) and not head.is_symlink():
        try:
            text = head.read_bytes().decode("utf-8", "surrogateescape").strip()
        except OSError:
            text = ""
        if text.startswith("ref:"):
            ref = text[len("ref:") :].strip()
            if ref.startswith("refs/heads/") and _is_branch_name(ref[len("refs/heads/") :]):
                return ref[len("refs/heads/") :]
        elif _COMMIT.fullmatch(text):
            return DETACHED_PREFIX + text[:_DETACHED_HEX]
    return _branch_from_git(checkout)


def _branch_from_git(checkout: Checkout) -> str:
    """current_branch by asking git, in one process.

    ``git status --porcelain=v2 --branch`` is the one command that reports the
    branch name *and* the commit in all three states: on a branch, on a branch
    with no commit yet (where ``git rev-parse HEAD`` fails), and detached
    (where ``git symbolic-ref`` has no commit to give). The pathspec matches
    nothing, so git compares no file of the working tree.
    """
    out = _run_git(
        checkout,
        [
            "status",
            "--porcelain=v2",
            "--branch",
            "--untracked-files=no",
            "--ignore-submodules=all",
            "--",
            ":(top,literal).dbreset-matches-nothing",
        ],
        hint=", or write the database name without {branch}",
    )
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("# ").partition(" ")
        fields[key] = value
    head, oid = fields.get("branch.head", ""), fields.get("branch.oid", "")
    if head == "(detached)" and _COMMIT.fullmatch(oid):
        return DETACHED_PREFIX + oid[:_DETACHED_HEX]
    if head and head != "(detached)":
        return head
    raise ConfigError(
        f"cannot tell the current branch of {checkout.worktree} (git said {out.strip()!r}): "
        "write the database name without {branch}"
    )


def local_branches(checkout: Checkout) -> set[str]:
    """Return the name of every local branch of the repository, e.g. ``{"main", "feature/x"}``.

    The union of the loose refs under ``refs/heads/`` and the ``refs/heads/``
    lines of ``packed-refs``, both in the common dir, so every worktree of a
    repository gives the same answer. A deleted branch is gone from both. A
    branch with no commit yet has no ref and is not listed. Lock files and
    names git would reject (an editor's ``main~``) are skipped.

    Runs git once -- ``git for-each-ref refs/heads/`` -- only for the
    reftable ref format, which keeps refs in binary files.
    """
    if _uses_reftable(checkout):
        return _branches_from_git(checkout)
    names: set[str] = set()
    heads = checkout.common_dir / "refs" / "heads"
    for folder, _dirs, files in os.walk(heads):
        prefix = Path(folder).relative_to(heads).as_posix()
        for file in files:
            name = file if prefix == "." else f"{prefix}/{file}"
            if _is_branch_name(name):
                names.add(name)
    try:
        packed = (checkout.common_dir / "packed-refs").read_bytes()
    except OSError:
        packed = b""  # never packed
    for line in packed.decode("utf-8", "surrogateescape").splitlines():
        # "<oid> refs/heads/x"; "# pack-refs with: ..." is the header, "^<oid>" a peeled tag
        _oid, _, ref = line.partition(" ")
        if ref.startswith("refs/heads/") and not line.startswith(("#", "^")):
            names.add(ref[len("refs/heads/") :])
    return names


def _branches_from_git(checkout: Checkout) -> set[str]:
    """local_branches by asking git, in one process.

    ``%(refname)`` rather than ``%(refname:short)``: the short form turns
    branch ``x`` into ``heads/x`` when a tag ``x`` exists too.
    """
    out = _run_git(checkout, ["for-each-ref", "--format=%(refname)", "refs/heads/"], hint="")
    return {
        line[len("refs/heads/") :] for line in out.splitlines() if line.startswith("refs/heads/")
    }


def _uses_reftable(checkout: Checkout) -> bool:
    """Whether the refs are kept in reftable's binary files, which only git reads."""
    return (checkout.common_dir / "reftable").is_dir() or (checkout.git_dir / "reftable").is_dir()


def _is_branch_name(name: str) -> bool:
    """Whether git would accept ``name`` as a branch (the main check-ref-format rules).

    A ``HEAD`` naming anything else is not understood (reftable writes
    ``refs/heads/.invalid`` there), and such a file under ``refs/heads`` is
    not a branch.
    """
    if not name or name == "@" or name.endswith(("/", ".")) or _BAD_REF_CHARS.search(name):
        return False
    if ".." in name or "@{" in name:
        return False
    return all(
        part and not part.startswith(".") and not part.endswith(".lock") for part in name.split("/")
    )


def _run_git(checkout: Checkout, args: list[str], *, hint: str) -> str:
    """Run one git command on ``checkout`` and return its standard output.

    The git dir and working tree are given explicitly, so git looks at the
    checkout found here and not at one it would discover on its own; it takes
    no optional lock and starts no filesystem monitor. ``hint`` ends the
    error message (", or ..."), naming what else the user can do.
    """
    import subprocess  # only here: the ordinary case spawns nothing

    command = [
        "git",
        f"--git-dir={checkout.git_dir}",
        f"--work-tree={checkout.worktree}",
        "--no-optional-locks",
        "-c",
        "core.fsmonitor=false",
        *args,
    ]
    what = f"`git {args[0]}` in {checkout.worktree}"
    try:
        done = subprocess.run(
            command,
            cwd=checkout.worktree,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        raise ConfigError(
            f"the refs of {checkout.worktree} can only be read by git, which is not on PATH: "
            f"install git{hint}"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{what} failed ({exc}): check the repository{hint}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = said[0] if said else f"exit status {done.returncode}"
        raise ConfigError(f"{what} failed ({reason}): check the repository{hint}")
    return done.stdout.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- names


def sanitise(name: str) -> str:
    """Return ``name`` as a fragment of an unquoted PostgreSQL identifier.

    ASCII letters are lower-cased and digits kept; every run of anything else
    (``/``, ``-``, ``.``, spaces, ``_`` itself, non-ASCII letters) becomes one
    ``_``; ``_`` at either end is dropped: ``Feature/X-42`` → ``feature_x_42``.
    Non-ASCII letters are not transliterated, so ``café`` → ``caf``.

    A name with nothing left (``日本語``, ``---``) becomes ``x`` plus the first 8
    hex digits of the SHA-256 of the name, e.g. ``x1b9e5fd0``: one fixed
    fallback would give every such branch the same database, which is what
    per-branch names exist to prevent. An empty name is a ConfigError.

    Different names may sanitise alike (``feature/x`` and ``Feature-X``); such
    branches share a database.
    """
    if not name:
        raise ConfigError("an empty name cannot become part of a database name")
    fragment = _NOT_ALNUM.sub("_", name).strip("_").lower()
    return fragment or "x" + _short_hash(name)


def _short_hash(text: str) -> str:
    """The first 8 hex digits of the SHA-256 of ``text``."""
    import hashlib  # only when a name needs it

    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_HEX]


def has_placeholders(text: str) -> bool:
    """Whether ``text`` holds a ``{...}`` placeholder, known or not.

    True means :func:`resolve_database_name` will read git (or reject an
    unknown name). Cheap: false at once when there is no ``{``. An unknown
    placeholder counts
    (so a gate built on this never lets a misspelt ``{brnach}`` through as a
    literal name); an escaped ``{{`` does not. Callers need not ask first:
    :func:`resolve_database_name` touches no file when there is nothing to
    replace.
    """
    if "{" not in text:
        return False
    return any(match.group(1) is not None for match in _TOKEN.finditer(text))


def resolve_database_name(template: str, *, cwd: Path) -> ResolvedName:
    """Replace ``{branch}`` and ``{worktree}`` in a database name.

    ``template`` is the database name alone (the path of the URL, decoded),
    e.g. ``app_test_{branch}``. ``{branch}`` becomes :func:`current_branch`
    and ``{worktree}`` the name of the checkout's top folder, each passed
    through :func:`sanitise`, for the git checkout containing ``cwd``. The
    text around them is kept as written. ``{{`` and ``}}`` are a literal
    ``{`` and ``}``; any other placeholder, or a lone brace, is a ConfigError.

    If the result is longer than 63 bytes of UTF-8 (PostgreSQL would cut it
    silently, and two long branch names would then meet in one database), the
    replaced values are shortened -- the longest first, the written text never,
    so ``{branch}_test`` still contains ``test`` -- and ``_`` plus 8 hex digits
    of the SHA-256 of the full name is appended. The same full name always
    gives the same short name; different full names differ in the hash. A name
    without placeholders is returned as written, whatever its length.

    Outside a git checkout a template with placeholders is a ConfigError; one
    without placeholders needs no checkout and reads no file.
    """
    parts = _parse(template)
    used = {part.name for part in parts if isinstance(part, _Slot)}
    if not used:
        literal = "".join(part for part in parts if isinstance(part, str))
        return ResolvedName(literal, template, branch=None, worktree=None, shortened=False)

    checkout = find_checkout(cwd)
    if checkout is None:
        names = " and ".join(f"{{{name}}}" for name in PLACEHOLDERS if name in used)
        raise ConfigError(
            f"the database name {template!r} uses {names}, but {cwd} is not inside a git "
            f"checkout: run dbreset inside the checkout, or write the name without {names}"
        )
    raw = {
        "branch": current_branch(checkout) if "branch" in used else None,
        "worktree": checkout.name if "worktree" in used else None,
    }
    values: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if not value:
            raise ConfigError(
                f"{{{key}}} is empty for {checkout.worktree}: "
                f"write the database name without {{{key}}}"
            )
        values[key] = sanitise(value)

    pieces = [values[part.name] if isinstance(part, _Slot) else part for part in parts]
    full = "".join(pieces)
    shortened = len(full.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
    name = _shorten(template, parts, pieces, full) if shortened else full
    return ResolvedName(
        name, template, branch=raw["branch"], worktree=raw["worktree"], shortened=shortened
    )


class _Slot:
    """A placeholder in a parsed template (a plain class: a dataclass costs import time)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _parse(template: str) -> list[str | _Slot]:
    """Split a template into literal text and placeholders; reject unknown ones."""
    parts: list[str | _Slot] = []
    position = 0
    for match in _TOKEN.finditer(template):
        parts.append(template[position : match.start()])
        position = match.end()
        token, inner = match.group(0), match.group(1)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif inner is None:
            raise ConfigError(
                f"lone {token!r} in the database name {template!r}: "
                "write a literal brace as '{{' or '}}'"
            )
        elif inner in PLACEHOLDERS:
            parts.append(_Slot(inner))
        else:
            raise ConfigError(
                f"unknown placeholder {token} in the database name {template!r}: "
                "the known ones are {branch} and {worktree} "
                "(write a literal brace as '{{' or '}}')"
            )
    parts.append(template[position:])
    return [part for part in parts if part != ""]


def _shorten(template: str, parts: list[str | _Slot], pieces: list[str], full: str) -> str:
    """Cut the replaced values of ``full`` so that it fits 63 bytes with a hash suffix.

    The values share the room left by the written text: each is cut to the
    same largest length that fits (shorter ones stay whole), and loses a
    trailing ``_`` at the cut. Sanitised values are ASCII, so characters are
    bytes there; the written text is counted in UTF-8 bytes.
    """
    suffix = "_" + _short_hash(full)
    fixed = sum(len(p.encode("utf-8", "surrogateescape")) for p in parts if isinstance(p, str))
    room = MAX_NAME_BYTES - len(suffix) - fixed
    if room < 0:
        raise ConfigError(
            f"the database name {template!r} is too long: its written text alone takes "
            f"{fixed} of PostgreSQL's {MAX_NAME_BYTES} bytes; shorten it"
        )
    lengths = [
        len(piece) for piece, part in zip(pieces, parts, strict=True) if isinstance(part, _Slot)
    ]
    cap = room
    while sum(min(length, cap) for length in lengths) > room:
        cap -= 1
    out = [
        piece[:cap].rstrip("_") if isinstance(part, _Slot) and len(piece) > cap else piece
        for piece, part in zip(pieces, parts, strict=True)
    ]
    return "".join(out) + suffix
