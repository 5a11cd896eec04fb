"""Alembic environment: the URL comes from `mailer.migrations.alembic_config`, never a file."""

from alembic import context
from sqlalchemy import pool

from mailer.migrations import metadata
from subscribers.db import make_engine

config = context.config
target_metadata = metadata()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = make_engine(config.attributes["url"], poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `mailer db upgrade`")
run_migrations_online()
