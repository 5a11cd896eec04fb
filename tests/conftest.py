"""Shared fixtures: real databases (SQLite files and the PostgreSQL server), settings, browser.

Every database test runs on SQLite and on PostgreSQL. PostgreSQL runs need
MAILER_TEST_POSTGRES_URL; without it they are skipped locally and fail under CI=true, where a
missing service must never pass as green. Each test gets a database of its own: a copy of a
migrated SQLite file, or a PostgreSQL database cloned from a migrated template.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from hypothesis import settings as hypothesis_settings
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from mailer import accounts, migrations
from mailer.config import Settings
from subscribers.db import make_engine, normalise_url, session_factory
from subscribers.rules import Rules

# Command output is read by the tests: wide enough that no path or message wraps. Set before
# any test module imports the CLI, because rich reads it when its consoles are created.
os.environ["COLUMNS"] = "250"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get("MAILER_TEST_POSTGRES_URL", "")
CHROMIUM = os.environ.get("MAILER_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


# Under CI=true every property test tries the same examples each run (derandomised, no example
# database), so a red CI is reproducible and a green one is not luck; locally Hypothesis keeps
# exploring. Failures it finds belong in an @example, never in a saved database.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if IN_CI:
    hypothesis_settings.load_profile("ci")


def _require_or_skip(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}, and CI=true requires it", pytrace=False)
    pytest.skip(reason)


# argon2 at the console's cost (64 MiB, t=3, p=4: `accounts.HASHER`) takes about 140 ms a
# password on two cores, and the suite hashes and checks hundreds. Tests hash at the cheapest
# cost; the tests of the cost itself take `production_hasher`.
PRODUCTION_HASHER = accounts.HASHER
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


@pytest.fixture(autouse=True, scope="session")
def _cheap_passwords() -> Iterator[None]:
    production = accounts.HASHER
    accounts.HASHER = CHEAP_HASHER
    accounts._dummy_hash.cache_clear()
    yield
    accounts.HASHER = production


@pytest.fixture
def production_hasher() -> Iterator[PasswordHasher]:
    """The hasher the console really uses, for the tests of its cost and of rehashing."""
    accounts.HASHER = PRODUCTION_HASHER
    accounts._dummy_hash.cache_clear()
    yield PRODUCTION_HASHER
    accounts.HASHER = CHEAP_HASHER
    accounts._dummy_hash.cache_clear()


@pytest.fixture(autouse=True, scope="session")
def _no_stray_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads the developer's MAILER_* settings or writes the checkout's var/: whatever a
    test does not set itself points at a temporary directory."""
    saved = {k: v for k, v in os.environ.items()
             if k.startswith("MAILER_") and not k.startswith("MAILER_TEST_")}
    for key in saved:
        del os.environ[key]
    base = tmp_path_factory.mktemp("default-var")
    os.environ["MAILER_VAR_DIR"] = str(base / "var")
    os.environ["MAILER_CONFIG"] = str(base / "absent.toml")
    yield
    for key in ("MAILER_VAR_DIR", "MAILER_CONFIG"):
        os.environ.pop(key, None)
    os.environ.update(saved)


# ---- PostgreSQL: one migrated template per test session, one clone per test ----

def _pg_admin() -> Engine:
    return create_engine(normalise_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    if not POSTGRES_URL:
        _require_or_skip("MAILER_TEST_POSTGRES_URL is not set")
    kept = os.environ.get("MAILER_TEST_PG_TEMPLATE", "")
    if kept:
        yield _kept_template(kept)
        return
    name = f"mailer_tmpl_{os.getpid()}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalise_url(POSTGRES_URL)).set(database=name)
    migrations.upgrade(url.render_as_string(hide_password=False))
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _kept_template(name: str) -> str:
    """A migrated template that outlives the test session, for runs of many short sessions
    (bench/mutation.py runs one per mutant, and names it after the migrations it holds; it
    drops it when done). Made once, under a lock, by whichever session comes first."""
    admin = _pg_admin()
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(20261207)"))
            try:
                if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                {"n": name}).first() is None:
                    # migrated under another name first: a failed migration leaves no template
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}_new" WITH (FORCE)'))
                    conn.execute(text(f'CREATE DATABASE "{name}_new"'))
                    url = make_url(normalise_url(POSTGRES_URL)).set(database=f"{name}_new")
                    migrations.upgrade(url.render_as_string(hide_password=False))
                    conn.execute(text(f'ALTER DATABASE "{name}_new" RENAME TO "{name}"'))
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(20261207)"))
    finally:
        admin.dispose()
    return name


def _pg_clone(template: str | None) -> Iterator[str]:
    name = f"mailer_t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"' +
                          (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(normalise_url(POSTGRES_URL)).set(database=name).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ---- SQLite: one migrated file per test session, one copy per test ----

@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mailer.db"
    migrations.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of this test's own, on each backend."""
    if backend == "sqlite":
        path = tmp_path / "mailer.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
    else:
        yield from _pg_clone(request.getfixturevalue("pg_template"))


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all, on each backend (for migration tests)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        if not POSTGRES_URL:
            _require_or_skip("MAILER_TEST_POSTGRES_URL is not set")
        yield from _pg_clone(None)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as s:
        yield s


@pytest.fixture
def settings(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for a test: its own var/ and database, no mailer.toml, no stray MAILER_ vars."""
    for key in list(os.environ):
        if key.startswith("MAILER_") and not key.startswith("MAILER_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAILER_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MAILER_DATABASE_URL", db_url)
    monkeypatch.setenv("MAILER_SUPPRESSION_KEY", "k" * 40)
    monkeypatch.setenv("MAILER_SECRET_KEY", "s" * 40)
    return Settings()


@pytest.fixture
def rules(settings: Settings) -> Rules:
    return settings.rules()


# ---- Browser: Debian's chromium, never a downloaded one ----

@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium, per test module: Playwright's sync API keeps an event loop running
    in this thread while it is open, which makes every `asyncio.run()` fail (the worker, the
    SMTP client), so it must not outlive the module that asked for it. Inside such a module,
    run asyncio code on another thread."""
    if not Path(CHROMIUM).exists():
        _require_or_skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
