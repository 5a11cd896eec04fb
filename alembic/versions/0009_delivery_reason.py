"""why a delivery ended unsent, as a value (too_late, date_passed, ...) instead of reply words

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REASONS = ("too_late", "date_passed", "gave_up", "suppressed", "cancelled", "not_built")

# Rows that ended before this revision said why only in `last_reply`; the texts written then
# (mailer.outbox and mailer.worker), most particular first. Each UPDATE takes rows still
# without a reason, so an earlier match wins.
_FROM_REPLIES = (
    ("too_late", ("failed",), "%too late, past the edition's 'not after' time%"),
    ("date_passed", ("failed", "unknown"), "%(the date has passed)"),
    ("gave_up", ("failed", "unknown"), "%(gave up after % tries)"),
    ("suppressed", ("skipped",), "not sent: unsubscribed or suppressed before its turn"),
    ("cancelled", ("skipped",), "cancelled"),
    ("not_built", ("failed",), "not sent: %"),
)


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.String(length=20), nullable=True))
        batch_op.create_check_constraint(
            op.f("ck_delivery_reason"), "reason IN (" + ", ".join(f"'{r}'" for r in REASONS) + ")")
    delivery = sa.table("delivery", sa.column("status", sa.String), sa.column("reason", sa.String),
                        sa.column("last_reply", sa.String), sa.column("last_code", sa.Integer))
    for reason, statuses, pattern in _FROM_REPLIES:
        condition = sa.and_(delivery.c.reason.is_(None), delivery.c.status.in_(statuses),
                            delivery.c.last_reply.like(pattern))
        if reason == "not_built":  # refused before the relay: no reply code of its own
            condition = sa.and_(condition, delivery.c.last_code.is_(None))
        op.execute(delivery.update().where(condition).values(reason=reason))


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_delivery_reason"), type_="check")
        batch_op.drop_column("reason")
