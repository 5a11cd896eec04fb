"""The schema's version: upgrade, downgrade, status, and the guard every command runs first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData

from mailer.errors import SchemaMismatch
from subscribers.db import normalise_url

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


def metadata() -> MetaData:
    """Every table of the system; importing the model modules registers them on `Base`."""
    import mailer.accounts
    import mailer.alerts
    import mailer.audit
    import mailer.bounce_policy
    import mailer.events
    import mailer.models
    import mailer.replies
    import mailer.revisions
    import mailer.segments  # noqa: F401
    import subscribers.models  # noqa: F401
    from subscribers.db import Base

    return Base.metadata


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.attributes["url"] = normalise_url(url)
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory(str(ALEMBIC_DIR)).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def schema_state(engine: Engine) -> SchemaState:
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return SchemaState(current=current, head=head_revision())


def known_revisions() -> set[str]:
    return {rev.revision for rev in ScriptDirectory(str(ALEMBIC_DIR)).walk_revisions()}


def require_current(engine: Engine) -> None:
    """Refuse to work on a database whose schema is not the code's; say what to run."""
    state = schema_state(engine)
    if state.up_to_date:
        return
    if state.current is None:
        raise SchemaMismatch("the database has no schema yet", hint="run `mailer db upgrade`")
    if state.current in known_revisions():
        raise SchemaMismatch(
            f"the database schema is at {state.current}, behind the code's {state.head}",
            hint="back it up, then run `mailer db upgrade`")
    raise SchemaMismatch(
        f"the database schema is at {state.current}, which this code does not know "
        f"(it expects {state.head}): it was migrated by a newer version",
        hint="run the newer version of mailer, or restore a backup made before it")


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
