"""The yearly reconfirmation (issue 17): a `lapsed` status, the last "yes" and this cycle's
request on each subscriber.

Every existing row keeps its status; both new columns start empty, so a reader confirmed over
a year ago is simply due to be asked (the scheduler spreads those requests over weeks).

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ("pending", "awaiting_approval", "active", "unsubscribed", "bounced", "complained",
           "erased")
_AFTER = (*_BEFORE, "lapsed")


def _check(statuses: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


def _columns() -> list[sa.Column[object]]:
    return [sa.Column(name, subscribers.db.UTCDateTime(timezone=True), nullable=True)
            for name in ("reconfirmed_at", "reconfirm_asked_at")]


def _sqlite_recheck(old: Sequence[str], new: Sequence[str]) -> None:
    """Change the status CHECK in place, as SQLite's manual describes for changes that leave
    the stored rows as they are (section 7 of "ALTER TABLE"). Batch mode would copy the
    table and drop the original, and with foreign keys on that drop deletes every reader's
    subscriptions and consent history through their ON DELETE CASCADE."""
    bind = op.get_bind()
    sql = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'subscriber'").scalar()
    assert isinstance(sql, str) and _check(old) in sql, "unexpected subscriber table"
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar()
    assert isinstance(version, int)
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    bind.exec_driver_sql(
        "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'subscriber'",
        (sql.replace(_check(old), _check(new)),))
    bind.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
    bind.exec_driver_sql("PRAGMA writable_schema = OFF")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for column in _columns():  # ALTER TABLE ... ADD COLUMN: no copy of the table
            op.add_column("subscriber", column)
        _sqlite_recheck(_BEFORE, _AFTER)
        return
    for column in _columns():
        op.add_column("subscriber", column)
    op.drop_constraint(op.f("ck_subscriber_status"), "subscriber", type_="check")
    op.create_check_constraint(op.f("ck_subscriber_status"), "subscriber", _check(_AFTER))


def downgrade() -> None:
    # A lapsed reader was active and stopped answering: active again is the nearest state the
    # older schema has (they keep getting mail, as they did before this revision existed).
    op.execute("UPDATE subscriber SET status = 'active' WHERE status = 'lapsed'")
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_recheck(_AFTER, _BEFORE)
        for name in ("reconfirm_asked_at", "reconfirmed_at"):  # SQLite 3.35+: in place
            op.execute(f"ALTER TABLE subscriber DROP COLUMN {name}")
        return
    op.drop_constraint(op.f("ck_subscriber_status"), "subscriber", type_="check")
    op.create_check_constraint(op.f("ck_subscriber_status"), "subscriber", _check(_BEFORE))
    op.drop_column("subscriber", "reconfirm_asked_at")
    op.drop_column("subscriber", "reconfirmed_at")
