"""The subscriber tables. Statuses are `StrEnum`s with named groups; times are UTC."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from subscribers.db import Base, UTCDateTime, utcnow


def _check_in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class SubscriberStatus(StrEnum):
    PENDING = "pending"  # signed up, not yet confirmed
    AWAITING_APPROVAL = "awaiting_approval"  # confirmed, from an untrusted domain
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    ERASED = "erased"
    # Asked yearly whether they still work with MSHT and did not answer in time: no mail, but
    # not gone either; answering "yes" later makes them active again.
    LAPSED = "lapsed"


SENDABLE = frozenset({SubscriberStatus.ACTIVE})
# An import never brings these back: the person left, or their address is dead or hostile.
LEFT = frozenset({SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.BOUNCED,
                  SubscriberStatus.COMPLAINED, SubscriberStatus.ERASED})


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"


class ConsentAction(StrEnum):
    SUBSCRIBE = "subscribe"  # asked to join (double opt-in pending)
    CONFIRM = "confirm"
    IMPORT = "import"  # added as active under a recorded lawful basis
    ADD = "add"  # added as active by a co-ordinator
    APPROVE = "approve"
    REJECT = "reject"
    TOPIC_ADD = "topic_add"
    UNSUBSCRIBE = "unsubscribe"
    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    PROFILE = "profile"
    ERASE = "erase"
    UNSUPPRESS = "unsuppress"
    PAUSE = "pause"  # no mail until a date, from the preferences page
    RECONFIRM_ASK = "reconfirm_ask"  # the yearly "still working with MSHT?" mail went out
    RECONFIRM = "reconfirm"  # they answered yes (and came back, if they had lapsed)
    LAPSE = "lapse"  # no answer within the window: no more mail until they answer


class Channel(StrEnum):
    """How a change reached us."""

    WEB = "web"
    ONE_CLICK = "one_click"
    MAILTO = "mailto"
    IMPORT = "import"
    CLI = "cli"
    ADMIN = "admin"
    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    SYSTEM = "system"


class SuppressionReason(StrEnum):
    ERASED = "erased"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    MANUAL = "manual"


class Subscriber(Base):
    __tablename__ = "subscriber"
    __table_args__ = (
        CheckConstraint(_check_in("status", SubscriberStatus), name="status"),
        Index("ix_subscriber_status_region", "status", "region"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Personal data: all of it is set to NULL by an erase.
    email: Mapped[str | None] = mapped_column(String(254))  # as typed, after normalising
    email_key: Mapped[str | None] = mapped_column(String(254), unique=True)  # for matching
    email_hmac: Mapped[str | None] = mapped_column(String(64), index=True)  # joins suppression
    name: Mapped[str | None] = mapped_column(String(100))
    organisation: Mapped[str | None] = mapped_column(String(200))
    organisation_type: Mapped[str | None] = mapped_column(String(40))
    role: Mapped[str | None] = mapped_column(String(40))
    region: Mapped[str | None] = mapped_column(String(40))

    status: Mapped[str] = mapped_column(String(20), default=SubscriberStatus.PENDING)
    lawful_basis: Mapped[str | None] = mapped_column(String(40))
    source: Mapped[str | None] = mapped_column(String(200))
    bounce_score: Mapped[float] = mapped_column(default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    left_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set from the preferences page: no mail until then; the subscription itself is unchanged.
    paused_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The yearly reconfirmation (`store.reconfirm_due`): the last "yes", and when this cycle's
    # request went out. A cycle starts at the later of `confirmed_at` and `reconfirmed_at`.
    reconfirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reconfirm_asked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    subscriptions: Mapped[list[Subscription]] = relationship(
        back_populates="subscriber", cascade="all, delete-orphan"
    )

    def __repr__(self) -> str:  # never the address: reprs end up in logs
        return f"<Subscriber {self.id} {self.status}>"


class Topic(Base):
    __tablename__ = "topic"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Subscription(Base):
    __tablename__ = "subscription"
    __table_args__ = (
        CheckConstraint(_check_in("status", SubscriptionStatus), name="status"),
        Index("ix_subscription_topic_status", "topic_id", "status"),
    )

    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscriber.id", ondelete="CASCADE"), primary_key=True
    )
    topic_id: Mapped[int] = mapped_column(ForeignKey("topic.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default=SubscriptionStatus.ACTIVE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    subscriber: Mapped[Subscriber] = relationship(back_populates="subscriptions")
    topic: Mapped[Topic] = relationship()


class ConsentEvent(Base):
    """Append-only: what changed, when, how, and under which consent wording."""

    __tablename__ = "consent_event"
    __table_args__ = (Index("ix_consent_event_subscriber", "subscriber_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscriber.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(20))
    channel: Mapped[str] = mapped_column(String(20))
    topic: Mapped[str | None] = mapped_column(String(40))
    consent_version: Mapped[str | None] = mapped_column(String(40))
    lawful_basis: Mapped[str | None] = mapped_column(String(40))
    # Personal or identifying detail; cleared by an erase, which keeps the rest of the trail.
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(300))
    actor: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Suppression(Base):
    """Addresses never to be mailed again, kept only as a keyed HMAC; survives erasure."""

    __tablename__ = "suppression"
    __table_args__ = (
        CheckConstraint(_check_in("reason", SuppressionReason), name="reason"),
        UniqueConstraint("email_hmac"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email_hmac: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RateEvent(Base):
    """One counted request or mail, for the web's rate limits and per-address mail caps.

    In the database, not in memory, so the caps hold across restarts and across workers. The
    bucket names a keyed hash of the address or network, never the address itself.
    """

    __tablename__ = "rate_event"
    __table_args__ = (Index("ix_rate_event_bucket_at", "bucket", "occurred_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[str] = mapped_column(String(80))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
