"""Unit tests: no database."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbreset import database, migrations
from dbreset.errors import ConfigError, SafetyError
from dbreset.settings import Settings, parse_bool, resolve_settings

URLS = [
    "postgresql://u:p@localhost:5433/app",
    "postgres://u@127.0.0.1/app",
    "postgresql+psycopg://u:p%40ss%3Aw%2Fo%25rd@localhost/app?connect_timeout=3",
    "postgresql+psycopg2://u@/app?host=/var/run/postgresql",
    "postgresql+asyncpg://u:secret@db.internal:6543/app?ssl=require&prepared_statement_cache_size=0",
    "postgresql+asyncpg://u@localhost/app?ssl=true&timeout=7",
    "postgresql://u@[::1]:5432/app?application_name=mine&sslmode=disable",
]


@pytest.mark.parametrize("url", URLS)
def test_fast_and_sqlalchemy_paths_agree(url: str) -> None:
    fast = database.conninfo_params(url)
    slow = database.params_from_sqlalchemy(database.sqlalchemy_sync_url(url))
    assert fast == slow
    assert database.sqlalchemy_sync_url(url).drivername == "postgresql+psycopg"


def test_asyncpg_parameters_are_mapped() -> None:
    params = database.conninfo_params(URLS[4])
    assert params["sslmode"] == "require"
    assert "ssl" not in params and "prepared_statement_cache_size" not in params
    assert database.conninfo_params(URLS[5])["connect_timeout"] == "7"
    assert database.conninfo_params(URLS[5])["sslmode"] == "require"


def test_percent_encoded_password_is_decoded() -> None:
    assert database.conninfo_params(URLS[2])["password"] == "p@ss:w/o%rd"


@pytest.mark.parametrize(
    "url", ["mysql://root@localhost/app", "sqlite:///app.db", "mssql+pyodbc://x/y"]
)
def test_other_databases_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        database.conninfo_params(url)
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        database.sqlalchemy_sync_url(url)


@pytest.mark.parametrize("url", ["", "postgresql://u:pw@host:notaport/db", "not a url at all"])
def test_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        database.conninfo_params(url)
    assert "pw" not in str(info.value).replace("postgresql", "")


def test_mask_url_hides_passwords_everywhere() -> None:
    assert database.mask_url("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    masked = database.mask_url("postgresql://u@h/db?password=s3cret&sslmode=require")
    assert "s3cret" not in masked and "sslmode=require" in masked
    assert database.mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert "p%40ss" not in database.mask_url(URLS[2])


@pytest.mark.parametrize(
    ("text", "password"),
    [
        ("host=localhost password=s3cret dbname=app", "s3cret"),
        ("dbname=app password = 'two words\\' quoted' host=localhost", "two words' quoted"),
    ],
)
def test_a_key_value_string_given_as_url_never_shows_its_password(text: str, password: str) -> None:
    assert database.password_of(text) == password
    assert "s3cret" not in database.mask_url(text) and "words" not in database.mask_url(text)
    assert database.mask_url(text).count("***") == 1
    for parse in (database.conninfo_params, database.sqlalchemy_sync_url):
        with pytest.raises(ConfigError, match="not a PostgreSQL URL|malformed") as info:
            parse(text)
        assert "s3cret" not in str(info.value) and "words" not in str(info.value)


def test_a_second_at_before_the_host_is_refused_on_both_paths() -> None:
    # libpq would read password "pa" and host "ss": another server
    url = "postgresql://u:pa@ss:hunter2@localhost/app"
    for parse in (database.conninfo_params, database.sqlalchemy_sync_url):
        with pytest.raises(ConfigError, match="more than one '@'.*%40") as info:
            parse(url)
        assert "hunter2" not in str(info.value) and "pa@ss" not in str(info.value)
    encoded = database.conninfo_params("postgresql://u:pa%40ss%3Ahunter2@localhost/app")
    assert encoded["password"] == "pa@ss:hunter2" and encoded["host"] == "localhost"


def test_reprs_never_show_the_password() -> None:
    url = "postgresql://u:s3cret@localhost/app?password=s3cret"
    from dbreset.session import CanarySnapshot

    for value in (
        Settings(url=url),
        database.make_target(url),
        CanarySnapshot(url, 1, "digest", ("public",), ()),
    ):
        assert "s3cret" not in repr(value)
    assert "localhost" in repr(Settings(url=url)) and "url=None" in repr(Settings())


def test_scrub_removes_raw_and_decoded_password() -> None:
    url = "postgresql://u:p%40ss@h/db"
    assert database.scrub("failed for p@ss and p%40ss", url) == "failed for *** and ***"


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("/var/run/postgresql", True),
        ("@abstract", True),
        ("::ffff:127.0.0.1", True),
        ("db", False),
        ("10.0.0.5", False),
        ("postgres.example.com", False),
        ("localhost.evil.com", False),
    ],
)
def test_is_local_host(host: str, local: bool) -> None:
    assert database.is_local_host(host) is local


def test_url_without_host_follows_pghost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example.com")
    target = database.make_target("postgresql:///app_test")
    assert target.hosts == ["db.example.com"]
    with pytest.raises(SafetyError, match="db.example.com"):
        database.check_safety(target, Settings())
    database.check_safety(target, Settings(allow_remote=True))
    database.check_safety(target, Settings(allowed_hosts=("*.example.com",)))


def test_hostaddr_is_what_counts() -> None:
    target = database.make_target("postgresql://u@localhost/app?hostaddr=10.1.2.3")
    with pytest.raises(SafetyError, match="10.1.2.3"):
        database.check_safety(target, Settings())


def test_every_host_of_a_multi_host_url_is_judged() -> None:
    target = database.make_target("postgresql://u@localhost,db.example.com/app")
    with pytest.raises(SafetyError):
        database.check_safety(target, Settings())


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_parse_bool_true(value: str) -> None:
    assert parse_bool(value, name="X") is True


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_parse_bool_false(value: str) -> None:
    assert parse_bool(value, name="X") is False


@pytest.mark.parametrize("value", ["ture", "2", "y e s", "please"])
def test_parse_bool_is_strict(value: str) -> None:
    with pytest.raises(ConfigError, match="not a boolean"):
        parse_bool(value, name="DBRESET_ALLOW_REMOTE")


def test_settings_precedence_and_sources(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.dbreset]\nschemas = ["public", "audit"]\nwait = 9\nurl_env = "APP_DB"\n'
        'exclude = ["country_*"]\n'
    )
    env = {"DBRESET_WAIT": "3", "APP_DB": "postgresql://localhost/from_app_db"}
    s = resolve_settings({"exclude": ["keep_me"]}, env=env, cwd=tmp_path)
    assert s.url == "postgresql://localhost/from_app_db"
    assert s.sources["url"] == "APP_DB"
    assert s.wait == 3.0 and s.sources["wait"] == "DBRESET_WAIT"
    assert s.schemas == ("public", "audit")
    assert s.sources["schemas"].startswith("pyproject.toml")
    assert s.exclude == ("keep_me",) and s.sources["exclude"] == "--exclude"
    assert s.alembic_config == tmp_path / "alembic.ini"
    assert s.allow_remote is False and s.sources["allow_remote"] == "default"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[tool.black]\nline-length = 100\n", None),
        ("[tool.other\nbroken = \n", None),  # not ours to judge
        ('[tool.dbreset]\nschemas = ["a"]\n', None),
        ('tool.dbreset.schemas = ["a"]\n', None),
        ('[tool]\ndbreset = { schemas = ["a"] }\n', None),
        ('[tool.dbreset]\nschemas = ["a"\n', "not valid TOML"),
        ('[tool.dbreset]\nshemas = ["a"]\n', "unknown key"),
        ("[tool]\ndbreset = 1\n", "must be a table"),
    ],
)
def test_pyproject_is_read_only_for_dbreset(tmp_path: Path, text: str, error: str | None) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    if error:
        with pytest.raises(ConfigError, match=error):
            resolve_settings({}, env={}, cwd=tmp_path)
        return
    s = resolve_settings({}, env={}, cwd=tmp_path)
    assert s.schemas == (("a",) if "dbreset" in text else ("public",))


def test_flag_url_wins_over_environment(tmp_path: Path) -> None:
    env = {"DBRESET_URL": "postgresql://localhost/b", "DATABASE_URL": "postgresql://localhost/c"}
    s = resolve_settings({"url": "postgresql://localhost/a"}, env=env, cwd=tmp_path)
    assert (s.url, s.sources["url"]) == ("postgresql://localhost/a", "--url")
    s = resolve_settings({}, env=env, cwd=tmp_path)
    assert (s.url, s.sources["url"]) == ("postgresql://localhost/b", "DBRESET_URL")


def test_ini_sits_between_environment_and_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.dbreset]\nschemas = ["a"]\n')
    s = resolve_settings({}, env={}, cwd=tmp_path, ini={"schemas": ["b"]})
    assert s.schemas == ("b",) and s.sources["schemas"] == "pytest ini dbreset_schemas"
    s = resolve_settings({}, env={"DBRESET_SCHEMAS": "c,d"}, cwd=tmp_path, ini={"schemas": ["b"]})
    assert s.schemas == ("c", "d")


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.dbreset]\nexclude = []\nexlcude = ["x"]\n')
    with pytest.raises(ConfigError, match="exlcude"):
        resolve_settings({}, env={}, cwd=tmp_path)


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a number"):
        resolve_settings({}, env={"DBRESET_WAIT": "soon"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="not a boolean"):
        resolve_settings({}, env={"DBRESET_ALLOW_REMOTE": "ture"}, cwd=tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.dbreset]\nschemas = 'a'\nwait = [1]\n")
    with pytest.raises(ConfigError):
        resolve_settings({}, env={}, cwd=tmp_path)


def test_no_url_names_the_fixes(tmp_path: Path) -> None:
    s = resolve_settings({}, env={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="--url.*DBRESET_URL.*DATABASE_URL"):
        s.require_url()


def test_fingerprint_follows_migration_files(tmp_path: Path) -> None:
    from conftest import copy_project

    ini = copy_project("branches", tmp_path)
    project = migrations.load_project(ini)
    first = migrations.fingerprint(project)
    assert first is not None and first == migrations.fingerprint(project)
    version = next((tmp_path / "migrations" / "versions").glob("*.py"))
    version.write_text(version.read_text() + "\n# touched\n")
    assert migrations.fingerprint(project) != first


def test_missing_alembic_ini_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="-c/--config"):
        migrations.load_project(tmp_path / "alembic.ini")


def test_version_table_from_alembic_ini() -> None:
    from conftest import PROJECTS

    project = migrations.load_project(PROJECTS / "custom_version_table" / "alembic.ini")
    assert project.version_table_key == ("meta", "schema_history")
    assert project.version_table_from_ini
