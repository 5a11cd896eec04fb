"""What every command shares: the settings, the database (checked before use), the console."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from mailer.config import Settings, load_settings
from mailer.errors import MailerError
from mailer.migrations import require_current
from mailer.operations import Caller, command_line_caller
from subscribers.db import make_engine, session_factory, session_scope


def _width(stream: TextIO) -> int | None:
    """A terminal's own width; piped into a file or another program, wide enough that a
    table is not cut to 80 columns (rich's guess without a terminal), unless COLUMNS says."""
    if "COLUMNS" in os.environ or stream.isatty():
        return None
    return PIPED_WIDTH


PIPED_WIDTH = 200
console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))


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
            _refuse_missing_sqlite(self.settings)
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


DEMO_DATABASE = Path("var") / "demo" / "mailer.db"


def _refuse_missing_sqlite(settings: Settings) -> None:
    """A command run where nothing has been set up says so, and where the demo's data is,
    rather than creating an empty database (and keys) in whatever directory it was run in."""
    url = make_url(settings.database)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    if Path(url.database).exists():
        return
    if DEMO_DATABASE.exists() and settings.var_dir != DEMO_DATABASE.parent:
        hint = (f"the demo's database is {DEMO_DATABASE}: add MAILER_VAR_DIR="
                f"{DEMO_DATABASE.parent} before the command to use it; to set up a database "
                "of your own here, run `mailer db upgrade`")
    else:
        hint = ("run the command in the directory you set it up in, or set MAILER_VAR_DIR or "
                "MAILER_DATABASE_URL; to set up a new database here, run `mailer db upgrade`")
    raise MailerError(f"there is no database at {url.database}", hint=hint)
