"""Backups: taken while a real worker sends, restored into a fresh database, resumed; damage and
newer schemas refused. SQLite and PostgreSQL, SMTP over loopback to a fast counting sink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.pool import NullPool

from mailer import backup, migrations, outbox
from mailer.cli import run
from mailer.config import Settings
from mailer.models import Delivery, Edition, EditionStatus
from subscribers import store
from subscribers.db import make_engine, session_factory
from subscribers.models import Channel, Subscriber
from tests.smtp_servers import FastSink, fast_sink  # noqa: F401
from tests.waiting import wait_for

AUDIENCE = 20_000
ERASED = ["gone1@kent.police.uk", "gone2@essex.police.uk", "gone3@example.org"]


@pytest.fixture
def keyed(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's settings with a backup key, in the environment too (for the CLI)."""
    key = tmp_path / "backup.key"
    backup.make_key_file(key)
    monkeypatch.setenv("MAILER_BACKUP_KEY_FILE", str(key))
    monkeypatch.setenv("MAILER_RATE_PER_MINUTE", "0")
    monkeypatch.setenv("MAILER_RATE_PER_DAY", "0")
    return Settings()


@pytest.fixture
def fresh_url(empty_db_url: str) -> str:
    """A second database with no tables at all, on the same backend: where a restore goes."""
    return empty_db_url


def _engine(url: str) -> Engine:
    return make_engine(url, poolclass=NullPool)


def _populate(settings: Settings, n: int, erased: list[str]) -> None:
    rules = settings.rules()
    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    engine = _engine(settings.database)
    with session_factory(engine)() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        for start in range(0, n, 5000):
            store.bulk_add_active(s, rules, [
                (store.profile_from(rules, email=f"r{i}@kent.police.uk", region="kent"), topics)
                for i in range(start, min(n, start + 5000))], ctx)
        store.bulk_add_active(s, rules, [(store.profile_from(rules, email=e, region="kent"),
                                          topics) for e in erased], ctx)
        for email in erased:
            person = s.scalar(select(Subscriber).where(Subscriber.email == email))
            assert person is not None
            store.erase(s, person, ctx)
        store.refresh_statistics(s)
        s.commit()
    engine.dispose()


SHORT = """---
title: MSHT newsletter
issue: 9
date: 2027-01-04
subject: "MSHT newsletter, issue 9"
preheader: A short issue, so that 20,000 copies go out quickly
topic: newsletter
audience:
  regions: [kent]
  roles: []
from_name: Kent & Essex MSHT Co-ordinators
---

Anti-Slavery Day is on 18 October; write to us at <contact:>.

## Operation Aidant

The next week of action starts in March.
"""


def _enqueue(settings: Settings, tmp_path: Path) -> str:
    """A short edition (the sample is ~63 KB a copy; the test is about the outbox, not size)."""
    source = tmp_path / "2027-q1-short.md"
    source.write_text(SHORT)
    engine = _engine(settings.database)
    with session_factory(engine)() as s:
        edition, _ = outbox.store_edition_file(s, settings, source, "tester")
        outbox.enqueue(s, edition)
        s.commit()
        slug = edition.slug
    engine.dispose()
    return slug


def _worker(url: str, settings: Settings, sink: FastSink, *,
            drain: bool) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")
           or k.startswith("MAILER_TEST_")}
    env.update(MAILER_DATABASE_URL=url, MAILER_VAR_DIR=str(settings.var_dir),
               MAILER_SECRET_KEY="s" * 40, MAILER_SUPPRESSION_KEY="k" * 40,
               MAILER_SMTP_URL=sink.url(), MAILER_RATE_PER_MINUTE="0", MAILER_RATE_PER_DAY="0",
               MAILER_SMTP_CONNECTIONS="4", MAILER_SMTP_MAX_PER_CONNECTION="100000",
               MAILER_CONFIG=os.environ["MAILER_CONFIG"])
    return subprocess.Popen([sys.executable, "-m", "mailer", "worker", "--name", "w"]
                            + (["--drain"] if drain else []), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _counts(url: str) -> dict[str, int]:
    engine = _engine(url)
    with engine.connect() as conn:
        found = dict(conn.execute(select(Delivery.status, func.count())
                                  .group_by(Delivery.status)).all())
    engine.dispose()
    return found


def _cli(url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setenv("MAILER_DATABASE_URL", url)
    return run(list(args))


@pytest.fixture
def killed() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_backup_taken_during_a_send_restored_and_resumed_reaches_everyone_once(
        keyed: Settings, fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        killed: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    """Two backups of a send in progress. The first, at full speed, shows that a backup is one
    consistent state while the worker writes. The second is the one restored: the disaster is
    staged at a point where everything the relay accepted is recorded (the relay held, the
    worker then killed), because what leaves between a backup and a disaster is sent again
    after a restore, as docs/deploy.md says; what the test asks is that the restored outbox
    and the relay agree, so that both halves together reach everyone exactly once."""
    settings = keyed
    original = settings.database
    _populate(settings, AUDIENCE, ERASED)
    slug = _enqueue(settings, tmp_path)
    first, second = FastSink().start(), FastSink().start()
    try:
        worker = _worker(original, settings, first, drain=False)
        killed.append(worker)
        assert wait_for(lambda: first.total() >= AUDIENCE // 4, 120), first.total()

        # 1. At full speed: the backup is one consistent state while the worker writes.
        before = first.total()
        assert _cli(original, monkeypatch, "backup", "create", str(tmp_path / "busy.mbak")) == 0
        after = first.total()
        # 2. The relay freezes (so that on a fast machine the send is still half done when
        # the second backup is taken); the first backup is checked meanwhile.
        first.hold()
        assert before < after < AUDIENCE, "the worker sent while the backup was taken"
        busy = backup.verify(settings, tmp_path / "busy.mbak")
        assert busy.row_counts["delivery"] == AUDIENCE
        assert _cli(fresh_url, monkeypatch, "backup", "restore",
                    str(tmp_path / "busy.mbak")) == 0
        snapshot = _counts(fresh_url)
        assert sum(snapshot.values()) == AUDIENCE
        assert snapshot.get("sent", 0) <= after
        engine = _engine(fresh_url)
        with engine.connect() as conn:
            restored = backup._count_rows(conn, list(busy.row_counts))
        engine.dispose()
        assert restored["delivery"] == busy.row_counts["delivery"]
        assert restored["subscriber"] == busy.row_counts["subscriber"] == AUDIENCE + 3

        # 3. The backup that is restored: once no transaction is open, the relay's count is
        # final; once all of that is recorded, nothing sent is missing from the backup.
        assert wait_for(lambda: first.receiving() == 0
                        and _counts(original).get("sent", 0) == first.total(), 60)
        capsys.readouterr()
        assert _cli(original, monkeypatch, "backup", "create", str(tmp_path / "last.mbak")) == 0
        worker.send_signal(signal.SIGKILL)  # the disk dies: the worker with it
        worker.wait(10)
        sent_before = first.total()
        assert 0 < sent_before < AUDIENCE

        # A database with data is refused without --force; with it, replaced.
        assert _cli(fresh_url, monkeypatch, "backup", "restore", str(tmp_path / "last.mbak")) == 1
        assert "already holds data" in capsys.readouterr().err
        assert _cli(fresh_url, monkeypatch, "backup", "restore", "--force",
                    str(tmp_path / "last.mbak")) == 0
        shown = capsys.readouterr().out
        assert f"paused {slug}" in shown and "mailer edition resume" in shown
        engine = _engine(fresh_url)
        with session_factory(engine)() as s:
            edition = s.scalar(select(Edition).where(Edition.slug == slug))
            assert edition is not None and edition.status == EditionStatus.PAUSED
            assert "restored from the backup" in (edition.paused_reason or "")
            for email in ERASED:  # erased people stay suppressed
                assert store.is_suppressed(s, settings.rules(), email)
        engine.dispose()

        assert _cli(fresh_url, monkeypatch, "edition", "resume", slug) == 0
        resumed = _worker(fresh_url, settings, second, drain=True)
        killed.append(resumed)
        assert resumed.wait(180) == 0, resumed.stderr.read() if resumed.stderr else ""
    finally:
        first.stop()
        second.stop()

    together = first.counts() + second.counts()
    everyone = {f"r{i}@kent.police.uk" for i in range(AUDIENCE)}
    assert set(together) == everyone  # nobody missed, and nobody erased was mailed
    assert max(together.values()) == 1, "someone got it twice"
    assert second.total() == AUDIENCE - sent_before
    final = _counts(fresh_url)
    assert final == {"sent": AUDIENCE}


def _small_backup(settings: Settings, path: Path) -> backup.Made:
    _populate(settings, 5, ERASED[:1])
    return backup.create(settings, path)


def test_one_changed_byte_is_refused_and_nothing_is_restored(
        keyed: Settings, fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    made = _small_backup(keyed, tmp_path / "b.mbak")
    data = bytearray(made.path.read_bytes())
    for offset in (len(data) // 2, len(data) - 1, 60):  # dump, last chunk's tag, manifest
        changed = bytearray(data)
        changed[offset] ^= 0x01
        bad = tmp_path / f"bad-{offset}.mbak"
        bad.write_bytes(bytes(changed))
        capsys.readouterr()
        assert _cli(fresh_url, monkeypatch, "backup", "verify", str(bad)) == 1
        assert _cli(fresh_url, monkeypatch, "backup", "restore", str(bad)) == 1
        err = capsys.readouterr().err
        assert "damaged or was changed" in err and "Traceback" not in err
    truncated = tmp_path / "short.mbak"
    truncated.write_bytes(bytes(data[:-(backup.TAG + 5)]))
    assert _cli(fresh_url, monkeypatch, "backup", "restore", str(truncated)) == 1
    assert "damaged or was changed" in capsys.readouterr().err
    engine = _engine(fresh_url)
    assert backup.holds_data(engine) == {}  # nothing half-applied
    engine.dispose()
    assert _cli(fresh_url, monkeypatch, "backup", "restore", str(made.path)) == 0


def test_a_backup_from_a_newer_schema_is_refused(
        keyed: Settings, fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _populate(keyed, 3, [])
    engine = _engine(keyed.database)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
    engine.dispose()
    made = backup.create(keyed, tmp_path / "future.mbak")
    assert made.manifest.schema == "0099_future"
    capsys.readouterr()
    assert _cli(fresh_url, monkeypatch, "backup", "restore", str(made.path)) == 1
    err = capsys.readouterr().err
    assert "newer schema (0099_future)" in err and "nothing was restored" in err
    engine = _engine(fresh_url)
    assert backup.holds_data(engine) == {}
    engine.dispose()


def test_an_older_schema_is_restored_then_upgraded(
        keyed: Settings, fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    older = sorted(migrations.known_revisions())[-2]
    migrations.downgrade(keyed.database, older)
    made = backup.create(keyed, tmp_path / "old.mbak")
    assert made.manifest.schema == older
    capsys.readouterr()
    assert _cli(fresh_url, monkeypatch, "backup", "restore", str(made.path)) == 0
    assert f"its schema {older} was upgraded" in capsys.readouterr().out
    engine = _engine(fresh_url)
    assert migrations.schema_state(engine).up_to_date
    engine.dispose()


def test_another_key_is_named_not_called_damage(
        keyed: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    made = _small_backup(keyed, tmp_path / "b.mbak")
    other = tmp_path / "other.key"
    backup.make_key_file(other)
    assert oct(other.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("MAILER_BACKUP_KEY_FILE", str(other))
    capsys.readouterr()
    assert run(["backup", "verify", str(made.path)]) == 1
    assert "made with another key" in capsys.readouterr().err
    monkeypatch.delenv("MAILER_BACKUP_KEY_FILE")
    assert run(["backup", "create"]) == 1
    assert "MAILER_BACKUP_KEY_FILE is not set" in capsys.readouterr().err


def test_the_schedule_backs_up_when_due_and_keeps_the_last_n(keyed: Settings) -> None:
    settings = keyed.model_copy(update={"backup_keep": 2, "backup_every_hours": 24})
    start = datetime(2027, 1, 11, 2, 0, tzinfo=UTC)
    assert backup.last_backup_age(settings, start) is None
    made = []
    for hours in (0, 1, 24, 48, 72):
        taken = backup.take_scheduled(settings, start + timedelta(hours=hours))
        made.append(taken is not None)
    assert made == [True, False, True, True, True]  # not again an hour later
    kept = [p.name for _, p in backup.backups(settings)]
    assert kept == ["mailer-20270113T020000Z.mbak", "mailer-20270114T020000Z.mbak"]
    assert backup.last_backup_age(settings, start + timedelta(hours=75)) == timedelta(hours=3)
    off = settings.model_copy(update={"backup_key_file": None})
    assert backup.take_scheduled(off, start + timedelta(days=9)) is None
