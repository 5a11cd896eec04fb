"""the events calendar and reminders (issue 6)

Revision ID: 0004
Revises: 0003

Seeds the three default dates (Anti-Slavery Day, the International Day for the Abolition of
Slavery, and an example Operation Aidant week) once, here: a co-ordinator who removes one does
not get it back on the next start.
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_EVENTS = [
    {"slug": "anti-slavery-day", "name": "Anti-Slavery Day", "starts_on": date(2010, 10, 18),
     "ends_on": None, "yearly": True,
     "description": "The UK's national day to raise awareness of modern slavery, set by the "
                    "Anti-Slavery Day Act 2010.",
     "link": "https://www.gov.uk/government/collections/modern-slavery",
     "reminder_text": "Plan your team's awareness activity and share the Modern Slavery "
                      "Helpline number: 08000 121 700."},
    {"slug": "international-day-for-the-abolition-of-slavery",
     "name": "International Day for the Abolition of Slavery", "starts_on": date(1986, 12, 2),
     "ends_on": None, "yearly": True,
     "description": "The United Nations day marking the 1949 Convention for the Suppression "
                    "of the Traffic in Persons.",
     "link": "https://www.un.org/en/observances/slavery-abolition-day",
     "reminder_text": "A moment to review your referrals to the National Referral Mechanism "
                      "and to remind colleagues of the signs of exploitation."},
    {"slug": "operation-aidant-week-2027-03", "name": "Operation Aidant week (example)",
     "starts_on": date(2027, 3, 15), "ends_on": date(2027, 3, 21), "yearly": False,
     "description": "An example intensification week of Operation Aidant, the national "
                    "modern slavery operation co-ordinated by the NPCC. Replace it with the "
                    "real dates when they are announced.",
     "link": None,
     "reminder_text": "Partner agencies are asked to plan joint visits and share "
                      "intelligence ahead of the week."},
]


def upgrade() -> None:
    event = op.create_table(
        "event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(length=80), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("starts_on", sa.Date(), nullable=False),
        sa.Column("ends_on", sa.Date(), nullable=True),
        sa.Column("yearly", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("link", sa.String(length=500), nullable=True),
        sa.Column("offsets", sa.JSON(), nullable=False),
        sa.Column("send_time", sa.String(length=5), nullable=False),
        sa.Column("timezone", sa.String(length=40), nullable=False),
        sa.Column("reminder_text", sa.Text(), nullable=False),
        sa.Column("topic", sa.String(length=40), nullable=False),
        sa.Column("weekend", sa.String(length=20), nullable=False),
        sa.Column("created_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("weekend IN ('friday', 'as_scheduled')",
                           name=op.f("ck_event_weekend")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event")),
        sa.UniqueConstraint("slug", name=op.f("uq_event_slug")),
    )
    op.create_table(
        "reminder",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("occurrence", sa.Date(), nullable=False),
        sa.Column("offset_days", sa.Integer(), nullable=False),
        sa.Column("send_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("not_after", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("edition_id", sa.Integer(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("updated_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('planned', 'enqueued', 'missed', 'cancelled')",
                           name=op.f("ck_reminder_status")),
        sa.ForeignKeyConstraint(["event_id"], ["event.id"],
                                name=op.f("fk_reminder_event_id_event"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminder")),
    )
    with op.batch_alter_table("reminder", schema=None) as batch_op:
        batch_op.create_index("ix_reminder_due", ["status", "send_at"], unique=False)
        batch_op.create_index("uq_reminder_occurrence", ["event_id", "occurrence", "offset_days"],
                              unique=True)
    op.create_table(
        "schedule_notice",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=120), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("due_at", subscribers.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_notice")),
        sa.UniqueConstraint("key", name=op.f("uq_schedule_notice_key")),
    )
    # Planned from the moment the schema exists: reminders whose time had already passed
    # are not invented after the fact.
    now = datetime.now(UTC)
    op.bulk_insert(event, [{**row, "offsets": [14, 1], "send_time": "09:00",
                            "timezone": "Europe/London", "topic": "reminders",
                            "weekend": "friday", "created_at": now}
                           for row in DEFAULT_EVENTS])


def downgrade() -> None:
    op.drop_table("schedule_notice")
    with op.batch_alter_table("reminder", schema=None) as batch_op:
        batch_op.drop_index("uq_reminder_occurrence")
        batch_op.drop_index("ix_reminder_due")
    op.drop_table("reminder")
    op.drop_table("event")
