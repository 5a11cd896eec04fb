"""inbound bounce and complaint records (issue 8)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DECISIONS = ("'pending', 'suppressed', 'counted', 'disabled', 'complaint', 'held', "
              "'not_counted', 'ignored', 'unknown', 'unmatched', 'error'")


def upgrade() -> None:
    op.create_table(
        "inbound_message",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("origin", sa.String(length=300), nullable=False),
        sa.Column("mail_from", sa.String(length=320), nullable=True),
        sa.Column("rcpt_tos", sa.JSON(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("raw_purged_at", subscribers.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detector", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=True),
        sa.Column("edition_id", sa.Integer(), nullable=True),
        sa.Column("subscriber_id", sa.Integer(), nullable=True),
        sa.Column("reference_source", sa.String(length=60), nullable=True),
        sa.Column("decision", sa.String(length=20), nullable=False),
        sa.Column("decision_detail", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('hard', 'soft', 'complaint', 'auto_reply', 'unknown')",
                           name=op.f("ck_inbound_message_kind")),
        sa.CheckConstraint(f"decision IN ({_DECISIONS})",
                           name=op.f("ck_inbound_message_decision")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_message")),
        sa.UniqueConstraint("sha256", name=op.f("uq_inbound_message_sha256")),
    )
    with op.batch_alter_table("inbound_message", schema=None) as batch_op:
        batch_op.create_index("ix_inbound_message_received_at", ["received_at"], unique=False)
        batch_op.create_index("ix_inbound_message_subscriber_id", ["subscriber_id"],
                              unique=False)

    op.create_table(
        "bounce_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("inbound_id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=True),
        sa.Column("edition_id", sa.Integer(), nullable=True),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("occurred_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=True),
        sa.Column("diagnostic", sa.String(length=500), nullable=True),
        sa.Column("domain", sa.String(length=254), nullable=True),
        sa.Column("counted", sa.Boolean(), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("settled_at", subscribers.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('hard', 'soft', 'delay', 'policy', 'complaint')",
                           name=op.f("ck_bounce_event_kind")),
        sa.CheckConstraint(f"action IN ({_DECISIONS})", name=op.f("ck_bounce_event_action")),
        sa.ForeignKeyConstraint(["inbound_id"], ["inbound_message.id"],
                                name=op.f("fk_bounce_event_inbound_id_inbound_message"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["delivery_id"], ["delivery.id"],
                                name=op.f("fk_bounce_event_delivery_id_delivery"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["subscriber_id"], ["subscriber.id"],
                                name=op.f("fk_bounce_event_subscriber_id_subscriber"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bounce_event")),
    )
    with op.batch_alter_table("bounce_event", schema=None) as batch_op:
        batch_op.create_index("ix_bounce_event_action", ["action", "occurred_at"], unique=False)
        batch_op.create_index("ix_bounce_event_edition_domain", ["edition_id", "domain"],
                              unique=False)
        batch_op.create_index("ix_bounce_event_subscriber", ["subscriber_id", "occurred_at"],
                              unique=False)

    op.create_table(
        "bounce_alert",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("edition_id", sa.Integer(), nullable=True),
        sa.Column("domain", sa.String(length=254), nullable=False),
        sa.Column("recipients", sa.Integer(), nullable=False),
        sa.Column("bounced", sa.Integer(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", subscribers.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=100), nullable=True),
        sa.Column("resolution", sa.String(length=20), nullable=True),
        sa.CheckConstraint("kind IN ('domain', 'policy')", name=op.f("ck_bounce_alert_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bounce_alert")),
        sa.UniqueConstraint("kind", "edition_id", "domain", name=op.f("uq_bounce_alert_kind")),
    )


def downgrade() -> None:
    op.drop_table("bounce_alert")
    with op.batch_alter_table("bounce_event", schema=None) as batch_op:
        batch_op.drop_index("ix_bounce_event_subscriber")
        batch_op.drop_index("ix_bounce_event_edition_domain")
        batch_op.drop_index("ix_bounce_event_action")
    op.drop_table("bounce_event")
    with op.batch_alter_table("inbound_message", schema=None) as batch_op:
        batch_op.drop_index("ix_inbound_message_subscriber_id")
        batch_op.drop_index("ix_inbound_message_received_at")
    op.drop_table("inbound_message")
