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
    # Batch mode copies a table and drops the original. With SQLite's foreign keys on (as
    # every connection of ours has them) that drop would cascade: rebuilding `edition` would
    # delete every delivery. So they are off while migrating, as Alembic's batch documentation
    # says, and the result is checked before they come back on. The PRAGMA must come before
    # the migration's transaction: inside one SQLite ignores it.
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()  # else the migration joins this transaction and is never committed
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies a table
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration left rows without their parent: {broken}")
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `mailer db upgrade`")
run_migrations_online()
