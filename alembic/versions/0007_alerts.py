"""alerts mailed to the co-ordinators (halts, missed reminders, nudges, bounce alerts)

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "coordinator_alert",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("created_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("mailed_to", sa.JSON(), nullable=False),
        sa.Column("mailed_at", subscribers.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coordinator_alert")),
        sa.UniqueConstraint("key", name=op.f("uq_coordinator_alert_key")),
    )


def downgrade() -> None:
    op.drop_table("coordinator_alert")
