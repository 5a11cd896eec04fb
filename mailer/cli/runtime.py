"""What every command shares: the settings, the database (checked before use), the console."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from mailer.config import Settings, load_settings
from mailer.migrations import require_current
from subscribers.db import make_engine, session_factory, session_scope

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def operator() -> str:
    """Who is at the keyboard, for the consent and audit records of a command."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def audited(session: Session, action: str, target: str | None = None, **detail: Any) -> None:
    """The audit log's entry for a change made from the command line, in the change's own
    transaction: the same actions as the console's, by `cli:<login>`, via `cli`."""
    from mailer import audit

    audit.record(session, actor=f"cli:{operator()}", via="cli", action=action, target=target,
                 detail=detail or None)


@dataclass
class Runtime:
    """Built once per command from the settings; opens the database only when asked."""

    settings: Settings
    _engine: Engine | None = field(default=None, repr=False)
    _factory: sessionmaker[Session] | None = field(default=None, repr=False)

    @classmethod
    def load(cls) -> Runtime:
        return cls(settings=load_settings())

    @property
    def engine(self) -> Engine:
        """The engine, without the schema check: for `mailer db` itself."""
        if self._engine is None:
            if self.settings.database.startswith("sqlite:///"):
                self.settings.var_dir.mkdir(parents=True, exist_ok=True)
            self._engine = make_engine(self.settings.database)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        """Sessions on a database whose schema matches the code; refuses otherwise."""
        if self._factory is None:
            require_current(self.engine)
            self._factory = session_factory(self.engine)
        return self._factory

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessions()) as session:
            yield session

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
