"""Replies reach a person (issue 15, item 6): readers' replies to the bounce receiver, kept
until forwarded to the contact address and for `reader_reply_retention_days`.

Revision ID: 0017
Revises: 0016
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from subscribers.db import UTCDateTime

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reader_reply",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("origin", sa.String(300), nullable=False),
        sa.Column("from_address", sa.String(320), nullable=False),
        sa.Column("from_name", sa.String(200), nullable=True),
        sa.Column("subject", sa.String(300), nullable=True),
        sa.Column("edition_id", sa.Integer(), nullable=True),
        sa.Column("subscriber_id", sa.Integer(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("forwarded_to", sa.String(320), nullable=True),
        sa.Column("forwarded_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("claimed_until", UTCDateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reader_reply")),
        sa.UniqueConstraint("sha256", name=op.f("uq_reader_reply_sha256")),
    )
    op.create_index("ix_reader_reply_received_at", "reader_reply", ["received_at"])
    op.create_index("ix_reader_reply_pending", "reader_reply", ["forwarded_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_reader_reply_pending", table_name="reader_reply")
    op.drop_index("ix_reader_reply_received_at", table_name="reader_reply")
    op.drop_table("reader_reply")
