"""The yearly reconfirmation (issue 17): a `lapsed` status, the last "yes" and this cycle's
request on each subscriber.

Every existing row keeps its status; both new columns start empty, so a reader confirmed over
a year ago is simply due to be asked (the scheduler spreads those requests over weeks).

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ("pending", "awaiting_approval", "active", "unsubscribed", "bounced", "complained",
           "erased")
_AFTER = (*_BEFORE, "lapsed")


def _check(statuses: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


def upgrade() -> None:
    with op.batch_alter_table("subscriber", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reconfirmed_at", subscribers.db.UTCDateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("reconfirm_asked_at",
                                      subscribers.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.drop_constraint(op.f("ck_subscriber_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_subscriber_status"), _check(_AFTER))


def downgrade() -> None:
    # A lapsed reader was active and stopped answering: active again is the nearest state the
    # older schema has (they keep getting mail, as they did before this revision existed).
    op.execute("UPDATE subscriber SET status = 'active' WHERE status = 'lapsed'")
    with op.batch_alter_table("subscriber", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_subscriber_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_subscriber_status"), _check(_BEFORE))
        batch_op.drop_column("reconfirm_asked_at")
        batch_op.drop_column("reconfirmed_at")
