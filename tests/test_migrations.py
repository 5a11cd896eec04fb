"""The schema: migrations build it from nothing, undo it, and agree with the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from mailer import migrations
from mailer.errors import SchemaMismatch
from subscribers.db import make_engine, session_factory
from subscribers.models import Topic


def test_upgrade_from_empty_then_downgrade_to_base_and_up_again(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        migrations.upgrade(empty_db_url)
        assert migrations.schema_state(engine).up_to_date
        assert {"subscriber", "topic", "subscription", "consent_event", "suppression"} <= set(
            inspect(engine).get_table_names())

        migrations.downgrade(empty_db_url, "base")
        assert migrations.schema_state(engine).current is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        migrations.upgrade(empty_db_url)
        with session_factory(engine)() as session:
            slugs = set(session.scalars(select(Topic.slug)))
        assert slugs == {"newsletter", "reminders"}
    finally:
        engine.dispose()


def test_models_and_migrations_agree(engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), migrations.metadata())
    assert diff == []


def test_commands_refuse_a_database_without_schema(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(SchemaMismatch, match="no schema") as info:
            migrations.require_current(engine)
        assert info.value.hint == "run `mailer db upgrade`"
    finally:
        engine.dispose()


def test_commands_refuse_a_database_behind_or_ahead(engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaMismatch, match="newer version"):
        migrations.require_current(engine)


def test_0014_keeps_every_subscriber_of_an_older_database_working(empty_db_url: str) -> None:
    """Readers of every status written under 0013 come through the reconfirmation's revision
    unchanged and sendable as before; a lapsed one goes back to active on the way down."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from subscribers import store

    migrations.upgrade(empty_db_url, "0013")
    engine = make_engine(empty_db_url)
    confirmed = datetime(2020, 5, 1, tzinfo=UTC)
    statuses = ["pending", "awaiting_approval", "active", "unsubscribed", "bounced",
                "complained", "erased"]
    try:
        with engine.begin() as conn:
            topic = conn.execute(text("SELECT id FROM topic WHERE slug = 'newsletter'")).scalar()
            for n, status in enumerate(statuses, start=1):
                conn.execute(text(
                    "INSERT INTO subscriber (id, email, email_key, status, bounce_score, "
                    "created_at, updated_at, confirmed_at) VALUES (:id, :e, :e, :s, 0, :t, :t, "
                    ":t)"), {"id": n, "e": f"p{n}@kent.police.uk", "s": status, "t": confirmed})
                conn.execute(text(
                    "INSERT INTO subscription (subscriber_id, topic_id, status, created_at, "
                    "updated_at) VALUES (:id, :topic, 'active', :t, :t)"),
                    {"id": n, "topic": topic, "t": confirmed})
                conn.execute(text(
                    "INSERT INTO consent_event (subscriber_id, action, channel, occurred_at) "
                    "VALUES (:id, 'import', 'import', :t)"), {"id": n, "t": confirmed})
        migrations.upgrade(empty_db_url)
        assert migrations.schema_state(engine).up_to_date
        with session_factory(engine)() as session:
            rows = session.execute(text(
                "SELECT id, status, reconfirmed_at, reconfirm_asked_at FROM subscriber "
                "ORDER BY id")).all()
            assert [(r.status, r.reconfirmed_at, r.reconfirm_asked_at) for r in rows] == [
                (s, None, None) for s in statuses]
            # Nothing that hangs off a reader was lost (a copied and dropped table would cascade).
            for count in ("SELECT count(*) FROM subscription",
                          "SELECT count(*) FROM consent_event"):
                assert session.execute(text(count)).scalar() == 7
            assert set(session.scalars(store.segment(["newsletter"]))) == {3}
            # Confirmed years ago, the active reader is simply due to be asked.
            assert store.reconfirm_due_ids(session, datetime.now(UTC), timedelta(days=365),
                                           10) == [3]
            session.execute(text("UPDATE subscriber SET status = 'lapsed' WHERE id = 3"))
            session.commit()
            with pytest.raises(IntegrityError):  # the CHECK still refuses what is not a status
                session.execute(text("UPDATE subscriber SET status = 'bogus' WHERE id = 3"))
            session.rollback()
        migrations.downgrade(empty_db_url, "0013")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT status FROM subscriber WHERE id = 3")
                                ).scalar() == "active"
            assert conn.execute(text("SELECT count(*) FROM subscription")).scalar() == 7
    finally:
        engine.dispose()


def test_migrating_down_and_up_again_loses_no_delivery_subscription_or_consent_record(
        empty_db_url: str, tmp_path: object) -> None:
    """SQLite rebuilds a table to change it (batch mode copies it and drops the original);
    with foreign keys on, dropping `edition` would take every delivery with it, and dropping
    `subscriber` every subscription and consent record. Migrations run with them off."""
    from pathlib import Path

    from sqlalchemy import text

    from mailer import outbox
    from mailer.config import Settings
    from subscribers import store
    from subscribers.models import Channel

    migrations.upgrade(empty_db_url)
    settings = Settings(secret_key="s" * 40, suppression_key="k" * 40,
                        database_url=empty_db_url, var_dir=Path(str(tmp_path)) / "var")
    rules = settings.rules()
    engine = make_engine(empty_db_url)
    counted = [text(f"SELECT count(*) FROM {table}")  # noqa: S608 (fixed names)
               for table in ("delivery", "edition", "subscription", "consent_event")]

    def counts() -> list[int]:
        with engine.connect() as conn:
            return [conn.execute(query).scalar_one() for query in counted]

    try:
        with session_factory(engine)() as session:
            topics = store.topics_by_slug(session, ["newsletter"])
            store.bulk_add_active(session, rules, [
                (store.profile_from(rules, email=f"r{i}@kent.police.uk", region="kent"), topics)
                for i in range(5)],
                store.Context(channel=Channel.IMPORT, lawful_basis="public_task"))
            edition, _ = outbox.store_edition_file(
                session, settings, Path(__file__).parent.parent / "editions" /
                "2020-q3-kent-essex.md", "tester")
            outbox.enqueue(session, edition)
            session.commit()
        assert counts() == [5, 1, 5, 5]
        migrations.downgrade(empty_db_url, "0007")  # through every rebuild of edition and delivery
        assert counts() == [5, 1, 5, 5]
        migrations.upgrade(empty_db_url)
        assert counts() == [5, 1, 5, 5]
    finally:
        engine.dispose()
