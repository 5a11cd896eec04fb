"""The schema: migrations build it from nothing, undo it, and agree with the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

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
