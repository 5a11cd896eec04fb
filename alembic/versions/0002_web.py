"""web: subscriber pause, rate events for the web's caps and limits

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("subscriber", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("paused_until", subscribers.db.UTCDateTime(timezone=True), nullable=True))

    op.create_table(
        "rate_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.String(length=80), nullable=False),
        sa.Column("occurred_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_event")),
    )
    with op.batch_alter_table("rate_event", schema=None) as batch_op:
        batch_op.create_index("ix_rate_event_bucket_at", ["bucket", "occurred_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_rate_event_occurred_at"), ["occurred_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rate_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rate_event_occurred_at"))
        batch_op.drop_index("ix_rate_event_bucket_at")
    op.drop_table("rate_event")

    with op.batch_alter_table("subscriber", schema=None) as batch_op:
        batch_op.drop_column("paused_until")
