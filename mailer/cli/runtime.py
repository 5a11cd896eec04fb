"""What every command shares: the settings, the database (checked before use), the console."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from mailer.config import Settings, load_settings
from mailer.migrations import require_current
from mailer.operations import Caller, command_line_caller
from subscribers.db import make_engine, session_factory, session_scope

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


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
    def caller(self) -> Caller:
        """Who acts: the person at the keyboard, as the operations and the audit log see
        them (`cli:<login>`, every permission)."""
        return command_line_caller()

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
