"""gitinfo: {branch} and {worktree} in database names, on real git repositories.

Every repository here is made in ``tmp_path`` by the real ``git`` binary, and
the answers are checked against what git itself says. No database.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbreset import gitinfo
from dbreset.errors import ConfigError
from dbreset.gitinfo import (
    find_checkout,
    has_placeholders,
    local_branches,
    resolve_database_name,
    sanitise,
)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")

# Variables that would point git (and gitinfo) somewhere else than the test says.
_GIT_LOCATION_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DISCOVERY_ACROSS_FILESYSTEM",
)


@pytest.fixture(autouse=True)
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """git that ignores the machine's configuration and never looks above tmp_path.

    The ceiling makes "outside a checkout" true even when the temporary folder
    itself lies inside some repository.
    """
    for name in _GIT_LOCATION_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.resolve()))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "dbreset tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@dbreset.invalid")


def git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd``; return its output without the final newline."""
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def make_repo(parent: Path, name: str = "repo", branch: str = "main", commit: bool = True) -> Path:
    """A fresh repository ``parent/name`` on ``branch``, with one commit unless told not to."""
    path = parent / name
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", branch)
    if commit:
        git(path, "commit", "-q", "--allow-empty", "-m", "first")
    return path.resolve()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path)


def git_branches(path: Path) -> set[str]:
    """The local branches as git lists them."""
    out = git(path, "for-each-ref", "--format=%(refname)", "refs/heads/")
    return {line.removeprefix("refs/heads/") for line in out.splitlines()}


class ProcessSpawned(Exception):
    """Raised by the guard instead of starting a process."""


def forbid_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, every way the standard library starts a process raises ProcessSpawned."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise ProcessSpawned(args)

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    for name in ("system", "fork", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The argument lists of the processes started while the test runs."""
    calls: list[list[str]] = []
    real = subprocess.Popen

    class Counting(real):  # type: ignore[misc,valid-type]
        def __init__(self, args: list[str], *rest: object, **kwargs: object) -> None:
            calls.append([str(arg) for arg in args])
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Counting)
    yield calls


# ---------------------------------------------------------------- sanitise


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("main", "main"),
        ("feature/x-42", "feature_x_42"),
        ("Feature/UPPER-Case", "feature_upper_case"),
        ("release-1.2.3", "release_1_2_3"),
        ("--a--b--", "a_b"),
        ("__a__b__", "a_b"),
        ("a_-_.b", "a_b"),
        ("fix/ünïcode-é", "fix_n_code"),
        ("My Worktree.v2", "my_worktree_v2"),
        # Non-ASCII letters whose lower case is ASCII (Kelvin sign, dotted I) are dropped too.
        ("\u212aelvin", "elvin"),
        ("\u0130stanbul", "stanbul"),
    ],
)
def test_sanitise(raw: str, expected: str) -> None:
    assert sanitise(raw) == expected
    assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", sanitise(raw))


def test_sanitise_falls_back_to_a_hash_of_the_name_when_nothing_is_left() -> None:
    japanese, chinese = sanitise("日本語"), sanitise("中文")
    assert japanese == "x" + hashlib.sha256("日本語".encode()).hexdigest()[:8]
    assert re.fullmatch(r"x[0-9a-f]{8}", chinese)
    assert japanese != chinese
    assert sanitise("---") != sanitise("...")


def test_sanitise_rejects_an_empty_name() -> None:
    with pytest.raises(ConfigError, match="empty name"):
        sanitise("")


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app_test", False),
        ("app_test_{branch}", True),
        ("{worktree}_test", True),
        ("app_{brnach}", True),  # unknown, but a gate must not let it through as a name
        ("app_{}", True),
        ("app_{{branch}}", False),  # escaped: the literal text {branch}
        ("app_{{{branch}}}", True),
        ("app_{", False),
    ],
)
def test_has_placeholders(text: str, expected: bool) -> None:
    assert has_placeholders(text) is expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("app_{brnach}", r"unknown placeholder \{brnach\}.*\{branch\} and \{worktree\}"),
        ("app_{Branch}", r"unknown placeholder \{Branch\}"),
        ("app_{branch!r}", r"unknown placeholder \{branch!r\}"),
        ("app_{branch:>9}", r"unknown placeholder \{branch:>9\}"),
        ("app_{}", r"unknown placeholder \{\}"),
        ("app_{branch", r"lone '\{'.*'\{\{'"),
        ("app_}", r"lone '\}'"),
        ("app_{{branch}", r"lone '\}'"),  # {{ is a literal brace, so the } is alone
    ],
)
def test_bad_templates_are_config_errors(repo: Path, template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_database_name(template, cwd=repo)
    assert caught.value.exit_code == 2


def test_unknown_placeholder_is_reported_before_looking_for_git(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown placeholder"):
        resolve_database_name("app_{brnach}", cwd=tmp_path)


def test_doubled_braces_are_literal_and_need_no_checkout(tmp_path: Path) -> None:
    resolved = resolve_database_name("app_{{branch}}_}}", cwd=tmp_path)
    assert resolved.name == "app_{branch}_}"
    assert (resolved.branch, resolved.worktree) == (None, None)


def test_a_name_without_placeholders_is_kept_as_written(tmp_path: Path) -> None:
    long = "App-Test_" + "é" * 40  # 89 bytes: not ours to shorten, PostgreSQL decides
    resolved = resolve_database_name(long, cwd=tmp_path / "missing")
    assert resolved.name == long
    assert not resolved.shortened


def test_placeholders_outside_a_checkout_are_a_config_error(tmp_path: Path) -> None:
    outside = tmp_path / "plain"
    outside.mkdir()
    assert find_checkout(outside) is None
    with pytest.raises(ConfigError) as caught:
        resolve_database_name("app_test_{branch}", cwd=outside)
    message = str(caught.value)
    assert "not inside a git checkout" in message
    assert "without {branch}" in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


# ---------------------------------------------------------------- branches


@pytest.mark.parametrize(
    ("branch", "expected"),
    [
        ("feature/x-42", "app_test_feature_x_42"),
        ("Feature/UPPER-Case", "app_test_feature_upper_case"),
        ("release-1.2.3", "app_test_release_1_2_3"),
        ("team/anna/fix.login", "app_test_team_anna_fix_login"),
        ("fix/ünïcode-é", "app_test_fix_n_code"),
    ],
)
def test_branch_placeholder(repo: Path, branch: str, expected: str) -> None:
    git(repo, "switch", "-q", "-c", branch)
    (repo / "sub" / "deeper").mkdir(parents=True)

    resolved = resolve_database_name("app_test_{branch}", cwd=repo / "sub" / "deeper")

    assert git(repo, "branch", "--show-current") == branch
    assert resolved.name == expected
    assert resolved.branch == branch
    assert resolved.worktree is None
    assert not resolved.shortened


def test_branch_with_no_letter_left_gets_a_hash(repo: Path) -> None:
    names = set()
    for branch in ("日本", "中文"):
        git(repo, "switch", "-q", "-c", branch)
        names.add(resolve_database_name("app_test_{branch}", cwd=repo).name)
    assert len(names) == 2
    assert all(re.fullmatch(r"app_test_x[0-9a-f]{8}", name) for name in names)


def test_branch_without_a_commit_yet(tmp_path: Path) -> None:
    fresh = make_repo(tmp_path, branch="trunk", commit=False)
    checkout = find_checkout(fresh)
    assert checkout is not None
    assert gitinfo.current_branch(checkout) == "trunk"


def test_detached_head_is_named_after_the_commit(repo: Path) -> None:
    git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    commit = git(repo, "rev-parse", "HEAD~1")
    git(repo, "switch", "-q", "--detach", "HEAD~1")
    checkout = find_checkout(repo)
    assert checkout is not None

    assert gitinfo.current_branch(checkout) == f"detached-{commit[:12]}"
    resolved = resolve_database_name("app_test_{branch}", cwd=repo)
    assert resolved.name == f"app_test_detached_{commit[:12]}"
    assert resolved.branch == f"detached-{commit[:12]}"


# ---------------------------------------------------------------- 63 bytes


def test_long_branch_names_are_cut_to_63_bytes_and_never_meet(repo: Path) -> None:
    common = "feature/" + "very-long-description-of-the-work-" * 3
    results = {}
    for branch in (common + "part-one", common + "part-two"):
        git(repo, "switch", "-q", "-c", branch)
        results[branch] = resolve_database_name("app_test_{branch}", cwd=repo)

    names = [resolved.name for resolved in results.values()]
    assert names[0] != names[1]
    for branch, resolved in results.items():
        full = "app_test_" + sanitise(branch)
        assert len(resolved.name.encode()) <= 63
        assert resolved.shortened
        assert resolved.branch == branch
        assert resolved.name.startswith("app_test_feature_very_long")
        assert resolved.name.endswith("_" + hashlib.sha256(full.encode()).hexdigest()[:8])
        # The same branch gives the same name every time.
        git(repo, "switch", "-q", branch)
        assert resolve_database_name("app_test_{branch}", cwd=repo) == resolved


def test_shortening_keeps_the_written_text(repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "x" * 100)
    resolved = resolve_database_name("{branch}_test_{worktree}_é", cwd=repo)
    assert len(resolved.name.encode()) <= 63
    # Both values were cut to share the room; every written piece survived, "test" included.
    assert re.fullmatch(r"x+_test_repo_é_[0-9a-f]{8}", resolved.name)


def test_the_limit_is_63_utf8_bytes(repo: Path) -> None:
    template = "tëst_{branch}"  # 6 bytes, 5 characters
    git(repo, "switch", "-q", "-c", "b" * 57)
    fits = resolve_database_name(template, cwd=repo)
    git(repo, "switch", "-q", "-c", "b" * 58)
    over = resolve_database_name(template, cwd=repo)

    assert fits.name == "tëst_" + "b" * 57
    assert len(fits.name.encode()) == 63
    assert not fits.shortened
    assert over.shortened
    assert len(over.name.encode()) == 63
    assert over.name != fits.name


def test_a_template_too_long_for_any_value_is_a_config_error(repo: Path) -> None:
    with pytest.raises(ConfigError, match="too long"):
        resolve_database_name("t" * 60 + "_{branch}", cwd=repo)


# ---------------------------------------------------------------- worktrees and submodules


def test_linked_worktree_has_its_own_worktree_and_branch(repo: Path) -> None:
    git(repo, "worktree", "add", "-q", "-b", "Other/Work", "../Linked Copy.2")
    linked = (repo.parent / "Linked Copy.2").resolve()
    (linked / "src").mkdir()

    checkout = find_checkout(linked / "src")
    assert checkout is not None
    assert checkout.worktree == linked
    assert checkout.git_dir == Path(git(linked, "rev-parse", "--absolute-git-dir")).resolve()
    assert checkout.common_dir == repo / ".git"
    assert checkout.git_dir.parent == repo / ".git" / "worktrees"

    here = resolve_database_name("{branch}_{worktree}", cwd=linked / "src")
    main = resolve_database_name("{branch}_{worktree}", cwd=repo)
    assert (here.name, here.branch, here.worktree) == (
        "other_work_linked_copy_2",
        "Other/Work",
        "Linked Copy.2",
    )
    assert (main.name, main.branch, main.worktree) == ("main_repo", "main", "repo")
    main_checkout = find_checkout(repo)
    assert main_checkout is not None
    assert local_branches(checkout) == local_branches(main_checkout) == {"main", "Other/Work"}


def test_submodule_is_a_checkout_of_its_own(tmp_path: Path) -> None:
    library = make_repo(tmp_path, "library", branch="lib-main")
    app = make_repo(tmp_path, "app")
    git(
        app,
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "-q",
        str(library),
        "vendor/lib",
    )
    inner = app / "vendor" / "lib"

    checkout = find_checkout(inner)
    assert checkout is not None
    assert checkout.worktree == inner
    assert checkout.git_dir == app / ".git" / "modules" / "vendor" / "lib"
    assert checkout.common_dir == checkout.git_dir
    resolved = resolve_database_name("{worktree}_{branch}", cwd=inner)
    assert resolved.name == "lib_lib_main"


def test_a_git_folder_without_head_is_skipped(repo: Path) -> None:
    inner = repo / "inner"
    (inner / ".git").mkdir(parents=True)
    checkout = find_checkout(inner)
    assert checkout is not None
    assert checkout.worktree == repo


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("gitdir: ../nowhere\n", "not a git directory.*git worktree repair"),
        ("nonsense\n", "not a git file"),
        ("", "not a git file"),
    ],
)
def test_a_broken_git_file_is_a_config_error(tmp_path: Path, content: str, message: str) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / ".git").write_text(content)
    with pytest.raises(ConfigError, match=message):
        find_checkout(folder)


def test_ceiling_directories_stop_the_walk(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (repo / "sub" / "deeper").mkdir(parents=True)
    assert find_checkout(repo / "sub" / "deeper") is not None
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(repo))
    assert find_checkout(repo / "sub" / "deeper") is None
    assert find_checkout(repo) is not None  # the ceiling itself is still looked at


def test_git_dir_from_the_environment(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(repo, "worktree", "add", "-q", "-b", "side", "../side")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    found = find_checkout(elsewhere)
    assert found is not None
    assert (found.worktree, found.git_dir) == (repo, repo / ".git")

    monkeypatch.setenv("GIT_DIR", str(repo / ".git" / "worktrees" / "side"))
    found = find_checkout(elsewhere)
    assert found is not None
    assert found.worktree == (tmp_path / "side").resolve()
    assert found.common_dir == repo / ".git"
    assert resolve_database_name("{branch}", cwd=elsewhere).name == "side"

    monkeypatch.setenv("GIT_WORK_TREE", str(elsewhere))
    found = find_checkout(repo)
    assert found is not None
    assert found.worktree == elsewhere.resolve()

    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-such-dir"))
    with pytest.raises(ConfigError, match="GIT_DIR="):
        find_checkout(repo)


# ---------------------------------------------------------------- local branches


def test_local_branches_reads_loose_and_packed_refs(repo: Path) -> None:
    for branch in ("packed-one", "Team/packed-two"):
        git(repo, "branch", branch)
    git(repo, "pack-refs", "--all")
    git(repo, "branch", "loose/three")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves: loose again, still packed")
    checkout = find_checkout(repo)
    assert checkout is not None

    loose = {
        path.relative_to(repo / ".git/refs/heads").as_posix()
        for path in (repo / ".git/refs/heads").rglob("*")
        if path.is_file()
    }
    packed = (repo / ".git" / "packed-refs").read_text()
    assert loose == {"main", "loose/three"}  # both sources are really in use
    assert "refs/heads/packed-one" in packed
    assert "refs/heads/main" in packed

    expected = {"main", "packed-one", "Team/packed-two", "loose/three"}
    assert git_branches(repo) == expected
    assert local_branches(checkout) == expected


def test_a_deleted_branch_disappears(repo: Path) -> None:
    for branch in ("gone-packed", "kept", "gone-loose"):
        git(repo, "branch", branch)
        if branch == "kept":
            git(repo, "pack-refs", "--all")
    checkout = find_checkout(repo)
    assert checkout is not None
    assert local_branches(checkout) == {"main", "gone-packed", "kept", "gone-loose"}

    git(repo, "branch", "-D", "gone-packed", "gone-loose")

    assert local_branches(checkout) == git_branches(repo) == {"main", "kept"}


def test_lock_files_and_invalid_names_are_not_branches(repo: Path) -> None:
    heads = repo / ".git" / "refs" / "heads"
    sha = git(repo, "rev-parse", "HEAD")
    for junk in ("wip.lock", "main~", ".hidden"):
        (heads / junk).write_text(sha + "\n")
    checkout = find_checkout(repo)
    assert checkout is not None
    assert local_branches(checkout) == {"main"}


# ---------------------------------------------------------------- processes


def test_the_ordinary_cases_spawn_no_process(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(repo, "branch", "packed")
    git(repo, "pack-refs", "--all")
    git(repo, "switch", "-q", "-c", "feature/x-42")
    git(repo, "worktree", "add", "-q", "-b", "linked", "../linked")
    git(repo, "worktree", "add", "-q", "--detach", "../detached")
    commit = git(repo, "rev-parse", "HEAD")
    forbid_processes(monkeypatch)

    template = "app_test_{branch}_{worktree}"
    assert resolve_database_name(template, cwd=repo).name == "app_test_feature_x_42_repo"
    assert resolve_database_name(template, cwd=tmp_path / "linked").name == "app_test_linked_linked"
    assert (
        resolve_database_name(template, cwd=tmp_path / "detached").name
        == f"app_test_detached_{commit[:12]}_detached"
    )
    checkout = find_checkout(tmp_path / "linked")
    assert checkout is not None
    assert local_branches(checkout) == {"main", "packed", "feature/x-42", "linked"}


def test_the_guard_catches_the_git_fallback(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without this, the test above could pass with a guard that guards nothing."""
    (repo / ".git" / "reftable").mkdir()
    checkout = find_checkout(repo)
    assert checkout is not None
    forbid_processes(monkeypatch)
    with pytest.raises(ProcessSpawned):
        gitinfo.current_branch(checkout)
    with pytest.raises(ProcessSpawned):
        local_branches(checkout)


@pytest.mark.parametrize("state", ["branch", "no commit yet", "detached"])
def test_reftable_asks_git_exactly_once(
    tmp_path: Path, state: str, spawned: list[list[str]]
) -> None:
    """git 2.45+ can keep refs in binary reftable files; the files are then no guide.

    A ``reftable`` folder is what gitinfo looks for; this git still keeps its
    refs in files, so it answers correctly while gitinfo must ask it.
    """
    path = make_repo(tmp_path, branch="Trunk/1", commit=state != "no commit yet")
    branch = "Trunk/1"
    if state != "no commit yet":
        git(path, "branch", "other")
    if state == "detached":
        git(path, "switch", "-q", "--detach")
        branch = "detached-" + git(path, "rev-parse", "HEAD")[:12]
    branches = git_branches(path)
    (path / ".git" / "reftable").mkdir()
    (path / "dirty.txt").write_text("untracked, and irrelevant\n")
    checkout = find_checkout(path)
    assert checkout is not None
    spawned.clear()

    assert gitinfo.current_branch(checkout) == branch
    assert len(spawned) == 1
    assert spawned[0][0] == "git"
    assert local_branches(checkout) == branches
    assert len(spawned) == 2


def test_reftable_without_git_on_path_is_a_config_error(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (repo / ".git" / "reftable").mkdir()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ConfigError, match="install git, or write the database name without"):
        resolve_database_name("app_test_{branch}", cwd=repo)
