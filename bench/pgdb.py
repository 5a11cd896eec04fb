"""A throwaway PostgreSQL database for a benchmark run, made and dropped on the server the
benchmark names."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def _admin(base: str):  # type: ignore[no-untyped-def]
    return create_engine(make_url(base).set(drivername="postgresql+psycopg"),
                         isolation_level="AUTOCOMMIT")


def create(base: str) -> tuple[str, str]:
    """A new empty database on `base`'s server: (its name, its URL)."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = _admin(base)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(base).set(database=name).render_as_string(hide_password=False)


def drop(base: str, name: str) -> None:
    admin = _admin(base)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
