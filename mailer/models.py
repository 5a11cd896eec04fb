"""The tables of editions and deliveries (the outbox). Queries on them live in `mailer.outbox`."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from subscribers.db import Base, UTCDateTime, utcnow
from subscribers.models import _check_in


class EditionKind(StrEnum):
    NEWSLETTER = "newsletter"
    REMINDER = "reminder"
    WELCOME = "welcome"  # to one reader whose sign-up has just become active
    DECLINED = "declined"  # to one reader whose sign-up a co-ordinator turned down


# Mail to one person about their own sign-up: an edition of one delivery, so it is recorded,
# retried and never doubled like the rest, but it is no send a co-ordinator runs or lists.
PERSONAL = frozenset({EditionKind.WELCOME, EditionKind.DECLINED})


class EditionStatus(StrEnum):
    DRAFT = "draft"
    APPROVED = "approved"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"  # by a co-ordinator, or halted by the relay (see paused_reason)
    SENT = "sent"  # every delivery has reached a final state
    CANCELLED = "cancelled"


# A send may start (enqueue) from these; anything else has either gone or been stopped.
STARTABLE = frozenset({EditionStatus.DRAFT, EditionStatus.APPROVED, EditionStatus.SCHEDULED})


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"  # claimed by a worker, under a lease
    RETRY = "retry"  # waiting for next_attempt_at
    SENT = "sent"
    BOUNCED = "bounced"
    FAILED = "failed"
    UNKNOWN = "unknown"  # the relay may or may not have it: no reply after the final dot
    SKIPPED = "skipped"  # not sent: unsubscribed, suppressed or cancelled before its turn


class DeliveryReason(StrEnum):
    """Why a delivery ended without a message reaching the relay (None: it did, or it is not
    over). The row's `last_reply` says it in words for people; code reads this."""

    TOO_LATE = "too_late"  # came due after its edition's "not after" time (the claim)
    DATE_PASSED = "date_passed"  # a retry the "not after" time cut short (the worker)
    GAVE_UP = "gave_up"  # temporary failures for longer than the retry limit
    SUPPRESSED = "suppressed"  # unsubscribed or suppressed before its turn
    CANCELLED = "cancelled"  # its send was cancelled
    NOT_BUILT = "not_built"  # the message could not be built for this person
    NOT_SECURE = "not_secure"  # OFFICIAL-SENSITIVE, and the address is not on a secure domain


DUE = frozenset({DeliveryStatus.QUEUED, DeliveryStatus.RETRY})
FINAL = frozenset({DeliveryStatus.SENT, DeliveryStatus.BOUNCED, DeliveryStatus.FAILED,
                   DeliveryStatus.UNKNOWN, DeliveryStatus.SKIPPED})


class Edition(Base):
    __tablename__ = "edition"
    __table_args__ = (
        CheckConstraint(_check_in("status", EditionStatus), name="status"),
        CheckConstraint(_check_in("kind", EditionKind), name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[str] = mapped_column(String(20), default=EditionKind.NEWSLETTER)
    title: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(300))
    topic: Mapped[str] = mapped_column(String(40))
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    organisation_types: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty: all
    # Readers must also be on one of these topics (a saved segment's); empty: no such rule.
    audience_topics: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The saved segment the audience above was resolved from when stored (mailer.segments).
    segment: Mapped[str | None] = mapped_column(String(60))
    source: Mapped[str] = mapped_column(Text)  # the edition file as written
    source_sha256: Mapped[str] = mapped_column(String(64))
    compiled: Mapped[dict[str, Any]] = mapped_column(JSON)  # CompiledEdition.to_dict()
    status: Mapped[str] = mapped_column(String(20), default=EditionStatus.DRAFT)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime | None] = mapped_column(UTCDateTime())  # too late to be useful
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    public: Mapped[bool] = mapped_column(Boolean, default=True)  # shown in /archive
    # Four eyes (the console): who asked for approval, and who (someone else) gave it.
    approval_requested_by: Mapped[str | None] = mapped_column(String(100))
    approval_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    approved_by: Mapped[str | None] = mapped_column(String(100))
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    scheduled_by: Mapped[str | None] = mapped_column(String(100))
    # A reminder is for one occurrence of one calendar event.
    event_id: Mapped[int | None] = mapped_column(Integer, index=True)
    occurrence: Mapped[date | None] = mapped_column(Date)


class Delivery(Base):
    """One row per (edition, subscriber): the outbox, and the record of who got what."""

    __tablename__ = "delivery"
    __table_args__ = (
        CheckConstraint(_check_in("status", DeliveryStatus), name="status"),
        CheckConstraint(_check_in("reason", DeliveryReason), name="reason"),
        Index("uq_delivery_edition_subscriber", "edition_id", "subscriber_id", unique=True),
        Index("ix_delivery_due", "edition_id", "status", "next_attempt_at"),
        Index("ix_delivery_lease", "edition_id", "status", "lease_until"),
        Index("ix_delivery_attempted", "last_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    edition_id: Mapped[int] = mapped_column(ForeignKey("edition.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscriber.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default=DeliveryStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # True once a copy may already have reached the person and we sent again: a reply never
    # came after the final dot, or a worker died after writing it (`dot_at`). The count a
    # co-ordinator sees as "may have been sent twice".
    ambiguous: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set, and committed, just before an attempt's final dot is written: a row its worker left
    # `sending` without it reached nobody, so resending it cannot make a duplicate.
    dot_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The claim was taken over from a worker that died, and the message sent again.
    taken_over: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker: Mapped[str | None] = mapped_column(String(80))
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_reply: Mapped[str | None] = mapped_column(String(500))
    reason: Mapped[str | None] = mapped_column(String(20))  # a DeliveryReason
