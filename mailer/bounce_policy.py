"""Inbound bounces and complaints: their records and the suppression policy applied to them.

Every inbound message (`mailer.inbound`) comes through `receive`: it is classified
(`mailer.bounces.classify_inbound`), kept raw with what was decided about it, and, when it is
about one of our deliveries, turned into a `BounceEvent` on that delivery. The policy
(`BouncePolicy`, from the settings) then acts on the event:

* a hard bounce (the address is dead: 5.1.x, 5.2.1, 5.4.4, and Microsoft's 5.4.1 "Recipient
  address rejected") suppresses after one; one that names another address than the
  subscriber's (a forward, a list the address expands to) counts as soft, since the message
  may have reached the subscriber;
* a soft bounce counts once a day; three across at least two sends within 90 days disable the
  address (it is marked bounced and suppressed; a fresh double opt-in brings it back);
* a complaint unsubscribes and suppresses at once;
* a 5.7.x policy rejection changes nobody and raises a `policy` alert: standards §4.1, it
  usually means our own authentication (SPF/DKIM/DMARC) is broken;
* auto-replies and unknown messages are kept and logged, and change nothing;
* a reader's reply (a person wrote back) is not filed here: `mailer.replies` keeps it and
  forwards it to the contact address, when the caller passes our own addresses;
* when more than half of one send's recipients at a domain bounce, the bounces are held and a
  `domain` alert is raised instead: a force's mail system being down is not a reason to drop
  the force. A co-ordinator looks (`mailer bounces list`) and resolves it (`mailer bounces
  resolve`), applying the held bounces or dismissing them.

Bounces arrive one at a time, so the domain rule can only see a burst whole if acting waits a
little: events stay `pending` for `hold` (60 minutes by default) and `settle` acts on those
that are due. `mailer bounces serve` settles every minute, `fetch` after reading.

The subscriber's side goes through `subscribers.store` (`mark_bounced`, `mark_complained`:
consent events and suppression); the delivery's through `mailer.outbox`. Functions take the
session first and never commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    distinct,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from mailer import alerts, outbox, replies
from mailer.bounces import DeliveryRef, Failure, Kind, Verdict, classify_inbound
from mailer.config import Settings
from mailer.errors import ConfigError, MailerError
from mailer.inbound import InboundMessage
from mailer.models import Delivery, Edition
from subscribers import store
from subscribers.db import Base, UTCDateTime, changed_rows, utcnow
from subscribers.models import Channel, Subscriber, SubscriberStatus, Topic, _check_in
from subscribers.regions import Scope, within
from subscribers.rules import Rules
from subscribers.validation import normalise_address

log = logging.getLogger(__name__)


class Decision(StrEnum):
    """What was done about an inbound message, or about one bounce event."""

    PENDING = "pending"  # waiting for the hold period, so a domain-wide burst is seen whole
    SUPPRESSED = "suppressed"  # hard bounce: marked bounced and suppressed
    COUNTED = "counted"  # soft (or hard below the threshold): counted, nothing changed yet
    DISABLED = "disabled"  # soft bounces reached the threshold: marked bounced and suppressed
    COMPLAINT = "complaint"  # unsubscribed and suppressed
    HELD = "held"  # part of a domain alert: nobody changed until a co-ordinator resolves it
    NOT_COUNTED = "not_counted"  # a delay notice, a policy rejection, a second one that day...
    IGNORED = "ignored"  # an auto-reply
    # A reader's reply, kept and forwarded by `mailer.replies`; an Outcome only, never an
    # inbound_message row (the reply has its own table).
    REPLY = "reply"
    UNKNOWN = "unknown"  # not a bounce, complaint or auto-reply we can read: kept for review
    UNMATCHED = "unmatched"  # a bounce we cannot tie to one of our deliveries
    ERROR = "error"  # could not be processed; kept with the reason


class EventKind(StrEnum):
    HARD = "hard"  # the address is dead
    SOFT = "soft"  # this message failed; the address may still work
    DELAY = "delay"  # the relay is still trying
    POLICY = "policy"  # rejected by the receiver's policy (5.7.x): usually our fault
    COMPLAINT = "complaint"


class AlertKind(StrEnum):
    DOMAIN = "domain"  # most of a send's recipients at one domain bounced
    POLICY = "policy"  # a receiver rejected us by policy


class InboundRecord(Base):
    """One inbound message as received, and what was decided about it."""

    __tablename__ = "inbound_message"
    __table_args__ = (
        CheckConstraint(_check_in("kind", Kind), name="kind"),
        CheckConstraint(_check_in("decision", Decision), name="decision"),
        UniqueConstraint("sha256"),
        Index("ix_inbound_message_received_at", "received_at"),
        Index("ix_inbound_message_subscriber_id", "subscriber_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    origin: Mapped[str] = mapped_column(String(300))
    mail_from: Mapped[str | None] = mapped_column(String(320))
    rcpt_tos: Mapped[list[str]] = mapped_column(JSON, default=list)
    size: Mapped[int] = mapped_column(Integer)
    # Of the raw bytes: the same message read twice (a mailbox fetched again, an MTA retrying
    # after a lost reply) is recognised and not counted twice.
    sha256: Mapped[str] = mapped_column(String(64))
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)  # NULL once the retention is over
    raw_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    detector: Mapped[str] = mapped_column(String(20))
    status: Mapped[str | None] = mapped_column(String(20))
    # From our signed reference; plain integers, so a record outlives what it names.
    edition_id: Mapped[int | None] = mapped_column(Integer)
    subscriber_id: Mapped[int | None] = mapped_column(Integer)
    reference_source: Mapped[str | None] = mapped_column(String(60))
    decision: Mapped[str] = mapped_column(String(20))
    decision_detail: Mapped[str | None] = mapped_column(Text)


class BounceEvent(Base):
    """One bounce or complaint about one delivery: what the policy counts."""

    __tablename__ = "bounce_event"
    __table_args__ = (
        CheckConstraint(_check_in("kind", EventKind), name="kind"),
        CheckConstraint(_check_in("action", Decision), name="action"),
        Index("ix_bounce_event_subscriber", "subscriber_id", "occurred_at"),
        Index("ix_bounce_event_edition_domain", "edition_id", "domain"),
        Index("ix_bounce_event_action", "action", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inbound_id: Mapped[int] = mapped_column(
        ForeignKey("inbound_message.id", ondelete="CASCADE"))
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("delivery.id", ondelete="CASCADE"))
    edition_id: Mapped[int | None] = mapped_column(Integer)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscriber.id", ondelete="CASCADE"))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str | None] = mapped_column(String(20))
    diagnostic: Mapped[str | None] = mapped_column(String(500))
    domain: Mapped[str | None] = mapped_column(String(254))  # of the subscriber's address
    counted: Mapped[bool] = mapped_column(Boolean, default=False)  # towards the soft threshold
    action: Mapped[str] = mapped_column(String(20), default=Decision.PENDING)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BounceAlert(Base):
    """Something for the co-ordinators to look at, instead of an automatic change."""

    __tablename__ = "bounce_alert"
    __table_args__ = (
        CheckConstraint(_check_in("kind", AlertKind), name="kind"),
        UniqueConstraint("kind", "edition_id", "domain"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    edition_id: Mapped[int | None] = mapped_column(Integer)
    domain: Mapped[str] = mapped_column(String(254))
    recipients: Mapped[int] = mapped_column(Integer, default=0)
    bounced: Mapped[int] = mapped_column(Integer, default=0)
    share: Mapped[float] = mapped_column(Float, default=0.0)
    detail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resolved_by: Mapped[str | None] = mapped_column(String(100))
    resolution: Mapped[str | None] = mapped_column(String(20))  # applied | dismissed


# ---------------------------------------------------------------- the policy

#: Codes that mean the address itself is dead, so one bounce is enough: bad mailbox (X.1.x),
#: mailbox disabled (X.2.1), no such domain (X.4.4). Other permanent codes (5.4.7 expired,
#: 5.3.x, 5.0.0...) say this message failed, which a force's outage also produces: they count
#: as soft.
_DEAD_ADDRESS = re.compile(r"^5\.(1\.\d+|2\.1|4\.4)$")
#: Exchange Online's directory-based edge blocking answers `550 5.4.1 Recipient address
#: rejected: Access denied` for an address that no mailbox, group or contact in the tenant
#: has: a dead address, whatever RFC 3463 says 5.4.1 means. A tenant whose directory is broken
#: refuses everyone at once, which the domain alert catches.
_MICROSOFT_NO_SUCH_RECIPIENT = re.compile(r"\b5\.4\.1\b.*recipient address rejected", re.I)


@dataclass(frozen=True)
class BouncePolicy:
    hard_threshold: int = 1
    soft_threshold: int = 3
    soft_min_sends: int = 2
    soft_window: timedelta = timedelta(days=90)
    count_delays: bool = False
    policy_rejections_suppress: bool = False
    domain_alert_ratio: float = 0.5
    domain_alert_min_recipients: int = 5
    hold: timedelta = timedelta(minutes=60)
    match_by_address: bool = False
    raw_retention: timedelta = timedelta(days=90)
    record_retention: timedelta = timedelta(days=400)

    @classmethod
    def from_settings(cls, settings: Settings) -> BouncePolicy:
        s = settings
        if s.bounce_record_retention_days < s.bounce_soft_window_days:
            raise ConfigError(
                "bounce_record_retention_days is shorter than bounce_soft_window_days",
                hint="the soft-bounce count needs the events of the whole window")
        return cls(hard_threshold=s.bounce_hard_threshold,
                   soft_threshold=s.bounce_soft_threshold,
                   soft_min_sends=s.bounce_soft_min_sends,
                   soft_window=timedelta(days=s.bounce_soft_window_days),
                   count_delays=s.bounce_count_delays,
                   policy_rejections_suppress=s.bounce_policy_rejections_suppress,
                   domain_alert_ratio=s.bounce_domain_alert_ratio,
                   domain_alert_min_recipients=s.bounce_domain_alert_min_recipients,
                   hold=timedelta(minutes=s.bounce_hold_minutes),
                   match_by_address=s.bounce_match_by_address,
                   raw_retention=timedelta(days=s.bounce_raw_retention_days),
                   record_retention=timedelta(days=s.bounce_record_retention_days))

    def event_kind(self, verdict: Verdict, failure: Failure | None, *,
                   names_subscriber: bool = True) -> EventKind:
        """What one report means for one delivery, in the policy's terms.

        `names_subscriber` is False when the failing address is not the subscriber's own: the
        report is about a forward or a list member, so at most a soft bounce for them."""
        if verdict.kind is Kind.COMPLAINT:
            return EventKind.COMPLAINT
        if failure is None:  # a bounce naming no recipient: judge by the whole message
            return EventKind.HARD if verdict.kind is Kind.HARD else EventKind.SOFT
        if failure.kind is Kind.SOFT:
            return EventKind.DELAY if failure.action == "delayed" else EventKind.SOFT
        if failure.status_subject == "policy" and not self.policy_rejections_suppress:
            return EventKind.POLICY
        dead = (failure.status is None or _DEAD_ADDRESS.match(failure.status)
                or failure.status_subject == "policy"
                or (failure.status == "5.4.1" and _MICROSOFT_NO_SUCH_RECIPIENT.search(
                    failure.diagnostic or "")))
        # No code at all: the detectors matched "user unknown"-style wording or an
        # X-Failed-Recipients header, which is as sure as a 5.1.1.
        return EventKind.HARD if dead and names_subscriber else EventKind.SOFT


# ---------------------------------------------------------------- receiving

@dataclass(frozen=True)
class Outcome:
    """What `receive` did with one message."""

    inbound_id: int
    verdict: Verdict
    decision: Decision
    detail: str
    duplicate: bool = False

    def summary(self) -> str:
        return f"{self.decision}: {self.detail}" + (" (already received)" if self.duplicate
                                                     else "")


def receive(session: Session, policy: BouncePolicy, message: InboundMessage, secret: bytes, *,
            rules: Rules | None = None, now: datetime | None = None,
            token_keys: Sequence[bytes] = (),
            own_addresses: frozenset[str] | None = None) -> Outcome:
    """Classify, keep and act on one inbound message. Never raises for bad input: a message that
    cannot be processed is kept with decision `error` and the reason. Database failures do
    raise, so the receiver answers 451 and the MTA keeps the bounce.

    `token_keys` (the settings' `token_keys()`) read the unsubscribe token of a returned
    original when no delivery reference survived; `secret` alone is tried without them.

    `own_addresses` (`replies.own_addresses`) turns on keeping readers' replies for
    forwarding (`mailer.replies`); without it, or for a reply that would loop, a reply is
    filed as unknown, as everything else that is not a bounce.
    """
    now = now or utcnow()
    raw = bytes(message.raw or b"")
    digest = hashlib.sha256(raw).hexdigest()
    existing = session.scalar(select(InboundRecord).where(InboundRecord.sha256 == digest))
    if existing is not None and existing.decision != Decision.ERROR:
        # Seen before (a mailbox read again, an MTA retrying after a lost reply): what was
        # decided then stands, and the message is not parsed again.
        kept = Verdict(Kind(existing.kind), existing.reason, detector=existing.detector)
        return Outcome(existing.id, kept, Decision(existing.decision),
                       existing.decision_detail or "", duplicate=True)
    verdict = classify_inbound(raw, secret, message.rcpt_tos, token_keys=token_keys,
                               envelope_sender=message.mail_from)
    if verdict.kind is Kind.REPLY:
        loop = (replies.loop_reason(raw, own_addresses) if own_addresses is not None
                else "replies are not forwarded here")
        if loop is None:
            reply, new = replies.keep(session, message, verdict, rules=rules, now=now)
            detail = f"a reader's reply from {reply.from_address}: kept, to be forwarded"
            log.info("inbound from %s: reply %s%s", message.origin, reply.id,
                     "" if new else " (already received)")
            return Outcome(reply.id, verdict, Decision.REPLY, detail, duplicate=not new)
        verdict = dataclasses.replace(verdict, kind=Kind.UNKNOWN,
                                      reason=f"a reply, not forwarded: {loop}")
    ref = verdict.reference
    # A message that failed before is processed again when it comes again (the MTA's retry,
    # the next fetch), in its old row: once the fault is fixed it is acted on.
    record = existing or InboundRecord(received_at=now, sha256=digest, raw=raw)
    record.origin = message.origin[:300]
    record.mail_from = None if message.mail_from is None else message.mail_from[:320]
    record.rcpt_tos = [r[:320] for r in message.rcpt_tos]
    record.size = len(raw)
    record.kind, record.reason = verdict.kind.value, verdict.reason
    record.detector, record.status = verdict.detector[:20], verdict.status
    record.edition_id = ref.edition_id if ref else None
    record.subscriber_id = ref.subscriber_id if ref else None
    record.reference_source = ref.source[:60] if ref else None
    record.decision, record.decision_detail = Decision.UNKNOWN, None
    session.add(record)
    session.flush()
    try:
        with session.begin_nested():  # a bug in the policy must not lose the message
            decision, detail = _decide(session, policy, record, verdict, rules, now)
            record.decision, record.decision_detail = decision, detail
            session.flush()
    except Exception as exc:
        log.exception("inbound message %s could not be processed", record.id)
        decision, detail = Decision.ERROR, f"could not be processed ({type(exc).__name__}: {exc})"
        record.decision, record.decision_detail = decision, detail[:2000]
        session.flush()
    if decision is Decision.PENDING:
        # Acting on what is due is the periodic settle's job too: if it fails here, the
        # message is recorded all the same and its events wait for the next settle.
        settle(session, policy, now=now)
        session.refresh(record)
        decision, detail = Decision(record.decision), record.decision_detail or detail
    _log(record, verdict, decision, detail)
    return Outcome(record.id, verdict, decision, detail)


def _log(record: InboundRecord, verdict: Verdict, decision: Decision, detail: str) -> None:
    level = {Decision.IGNORED: logging.INFO, Decision.UNKNOWN: logging.WARNING,
             Decision.UNMATCHED: logging.WARNING, Decision.ERROR: logging.ERROR}.get(
        decision, logging.INFO)
    log.log(level, "inbound %s from %s: %s -> %s (%s)", record.id, record.origin, verdict.kind,
            decision, detail)


def _decide(session: Session, policy: BouncePolicy, record: InboundRecord, verdict: Verdict,
            rules: Rules | None, now: datetime) -> tuple[Decision, str]:
    if verdict.kind is Kind.AUTO_REPLY:
        return Decision.IGNORED, verdict.reason
    if not verdict.actionable:
        return Decision.UNKNOWN, f"kept for review: {verdict.reason}"
    targets = _targets(session, policy, verdict, rules)
    if isinstance(targets, str):
        return Decision.UNMATCHED, targets
    notes: list[str] = []
    for subscriber, delivery_id, edition_id in targets:
        failure, names_subscriber = _failure_for(verdict, subscriber, rules)
        kind = policy.event_kind(verdict, failure, names_subscriber=names_subscriber)
        diagnostic = _diagnostic(verdict, failure)
        if not names_subscriber and failure is not None:
            note = (f"the report names {failure.recipient}, not the subscriber's address (a "
                    "forward or a list it expands to): at most a soft bounce")
            notes.append(note)
            diagnostic = f"{note}; {diagnostic}"[:500]
        event = BounceEvent(
            inbound_id=record.id, delivery_id=delivery_id, edition_id=edition_id,
            subscriber_id=subscriber.id, occurred_at=now, kind=kind,
            status=failure.status if failure else None,
            diagnostic=diagnostic, domain=_domain(subscriber), action=Decision.PENDING)
        session.add(event)
        session.flush()
        if delivery_id is not None:
            _note_delivery(session, delivery_id, kind, verdict, failure)
    ref = verdict.reference
    if ref is not None and ref.edition_id is None and targets:
        record.edition_id = targets[0][2]
        notes.append(f"the edition ({targets[0][2]}) was inferred: only an unsubscribe token "
                     "named the subscriber")
    return Decision.PENDING, "; ".join([_PENDING_DETAIL, *notes])


_PENDING_DETAIL = "recorded; acted on after the hold period"


def _with_notes(session: Session, inbound_id: int, detail: str) -> str:
    """The settled detail, keeping what `_decide` noted about the report (a forward, an
    inferred edition) that the pending detail carried."""
    pending = session.scalar(select(InboundRecord.decision_detail)
                             .where(InboundRecord.id == inbound_id)) or ""
    _, found, notes = pending.partition(_PENDING_DETAIL + "; ")
    return f"{detail}; {notes}" if found and notes and notes not in detail else detail


def _targets(session: Session, policy: BouncePolicy, verdict: Verdict,
             rules: Rules | None) -> list[tuple[Subscriber, int | None, int | None]] | str:
    """Whom the report is about: the delivery our signed reference names, or (only when the
    setting allows it) subscribers whose address the report names. A string says why none."""
    ref = verdict.reference
    if ref is not None:
        if ref.edition_id is None:
            delivery = _likely_delivery(session, ref, verdict.original_subject)
        else:
            delivery = outbox.delivery_of(session, ref.edition_id, ref.subscriber_id)
        subscriber = session.get(Subscriber, ref.subscriber_id)
        if delivery is None or subscriber is None:
            edition = "no edition" if ref.edition_id is None else f"edition {ref.edition_id}"
            return (f"our reference names {edition}, subscriber {ref.subscriber_id}, but there "
                    "is no such delivery")
        if subscriber.status == SubscriberStatus.ERASED:
            return "the subscriber was erased"
        return [(subscriber, delivery.id, delivery.edition_id)]
    if not policy.match_by_address or rules is None:
        return "no signed reference to one of our deliveries (the address is not trusted alone)"
    found: list[tuple[Subscriber, int | None, int | None]] = []
    for address in verdict.recipients:
        try:
            subscriber = store.find_by_email(session, rules, address)
        except Exception:  # an address our rules refuse is no subscriber of ours
            subscriber = None
        if subscriber is None or subscriber.status == SubscriberStatus.ERASED:
            continue
        delivery = outbox.latest_delivery_to(session, subscriber.id)
        found.append((subscriber, delivery.id if delivery else None,
                      delivery.edition_id if delivery else None))
    return found or "no reference, and no recipient it names is a subscriber"


def _likely_delivery(session: Session, ref: DeliveryRef,
                     original_subject: str | None) -> Delivery | None:
    """For a reference that names a subscriber but no edition (an unsubscribe token): the
    latest delivery the relay took for them, in the token's topic, preferring an edition
    whose subject is the returned original's."""
    query = (select(Delivery).join(Edition, Edition.id == Delivery.edition_id)
             .where(Delivery.subscriber_id == ref.subscriber_id, outbox.handed_to_relay())
             .order_by(Delivery.id.desc()).limit(1))
    if ref.topic_id is not None:
        query = query.join(Topic, Topic.slug == Edition.topic).where(Topic.id == ref.topic_id)
    if original_subject:
        # The subject as sent carries the protective marking (mailer.marking); the column
        # keeps the one written, and an edition compiled before marking has only that.
        found = session.scalar(query.where(or_(
            Edition.compiled["subject"].as_string() == original_subject,
            Edition.subject == original_subject)))
        if found is not None:
            return found
    return session.scalar(query)


def _failure_for(verdict: Verdict, subscriber: Subscriber,
                 rules: Rules | None) -> tuple[Failure | None, bool]:
    """The failure that is about this subscriber, and whether the report names their address.

    A report naming only other addresses is about where their mail went on to (a forward, the
    members of a list address); a complaint is theirs whoever it names (the token says so)."""
    if verdict.kind is Kind.COMPLAINT or not verdict.failures:
        return _worst(verdict.failures), True
    mine = [f for f in verdict.failures if _same_address(f.recipient, subscriber, rules)]
    if mine:
        return _worst(mine), True
    return _worst(verdict.failures), False


def _same_address(address: str, subscriber: Subscriber, rules: Rules | None) -> bool:
    known = {(subscriber.email_key or "").lower(), (subscriber.email or "").lower()} - {""}
    if address.strip().lower() in known:
        return True
    if rules is None:
        return False
    try:  # the same normalisation as sign-up: IDN domains, case
        return normalise_address(address, rules).key.lower() in known
    except Exception:  # an address our rules refuse is not theirs
        return False


def _worst(failures: Sequence[Failure]) -> Failure | None:
    for wanted in (Kind.COMPLAINT, Kind.HARD, Kind.SOFT):
        for failure in failures:
            if failure.kind is wanted:
                return failure
    return None


def _diagnostic(verdict: Verdict, failure: Failure | None) -> str:
    text = (failure.diagnostic if failure and failure.diagnostic else verdict.reason) or ""
    return text[:500]


def _domain(subscriber: Subscriber) -> str | None:
    key = subscriber.email_key or ""
    return key.rpartition("@")[2].lower() or None


_SMTP_CODE = re.compile(r"(?<!\d)([245]\d\d)(?![\d.])")


def _note_delivery(session: Session, delivery_id: int, kind: EventKind, verdict: Verdict,
                   failure: Failure | None) -> None:
    """The delivery row shows the report: a message that did not arrive becomes `bounced`."""
    if kind is EventKind.COMPLAINT:
        reply = f"complaint reported: {verdict.feedback_type or 'abuse'}"
    else:
        reply = f"later {kind}: " + (f"{failure.status} " if failure and failure.status else "")
        reply += _diagnostic(verdict, failure)
    code = None
    if failure and failure.diagnostic and (match := _SMTP_CODE.search(failure.diagnostic)):
        code = int(match[1])
    bounced = kind in (EventKind.HARD, EventKind.SOFT, EventKind.POLICY)
    outbox.note_bounce(session, delivery_id, reply, bounced=bounced, code=code)


# ---------------------------------------------------------------- acting on events

@dataclass(frozen=True)
class Settled:
    event_id: int
    subscriber_id: int
    decision: Decision
    detail: str


def settle(session: Session, policy: BouncePolicy, *, now: datetime | None = None) -> list[Settled]:
    """Act on every pending event whose hold period is over. Safe to run from several
    processes at once: each event is claimed with a guarded update before anything changes."""
    now = now or utcnow()
    due = session.scalars(select(BounceEvent).where(
        BounceEvent.action == Decision.PENDING, BounceEvent.occurred_at <= now - policy.hold)
        .order_by(BounceEvent.id)).all()
    done: list[Settled] = []
    for event in due:
        try:
            with session.begin_nested():  # one event that fails stays pending; the rest go on
                settled = _settle_one(session, policy, event, now)
        except Exception:
            log.exception("bounce event %s could not be settled; it stays pending", event.id)
            continue
        if settled is not None:
            done.append(settled)
    session.flush()
    return done


def _settle_one(session: Session, policy: BouncePolicy, event: BounceEvent,
                now: datetime) -> Settled | None:
    decision, detail = _judge(session, policy, event, now)
    claimed = changed_rows(session.execute(
        update(BounceEvent).where(BounceEvent.id == event.id,
                                  BounceEvent.action == Decision.PENDING)
        .values(action=decision, counted=event.counted, settled_at=now)
        .execution_options(synchronize_session=False)))
    if not claimed:  # another settle acted on it meanwhile
        return None
    session.refresh(event)
    detail = _with_notes(session, event.inbound_id, _act(session, event, decision, detail, now))
    if event.counted:
        _update_score(session, event.subscriber_id, now)
    session.execute(update(InboundRecord).where(InboundRecord.id == event.inbound_id)
                    .values(decision=decision, decision_detail=detail[:2000]))
    return Settled(event.id, event.subscriber_id, decision, detail)


def _judge(session: Session, policy: BouncePolicy, event: BounceEvent,
           now: datetime) -> tuple[Decision, str]:
    """The decision for one event, before anything is changed. Sets `event.counted`."""
    kind = EventKind(event.kind)
    if kind is EventKind.COMPLAINT:
        return Decision.COMPLAINT, "a complaint: unsubscribed and suppressed"
    if kind is EventKind.POLICY:
        said = f" ({event.diagnostic[:200]})" if event.diagnostic else ""
        _raise_alert(session, AlertKind.POLICY, event, now, recipients=0, bounced=0,
                     detail=f"rejected by the receiver's policy ({event.status}){said}: check "
                            "our SPF, DKIM and DMARC first; if those pass, the recipient only "
                            "takes mail from senders it allows; no subscriber changed")
        return Decision.NOT_COUNTED, (f"policy rejection {event.status}: usually our own "
                                      "authentication; alert raised, subscriber unchanged")
    if kind is EventKind.DELAY and not policy.count_delays:
        return Decision.NOT_COUNTED, "a delay notice: the relay is still trying"
    held = _domain_alert(session, policy, event, now)
    if held:
        return Decision.HELD, held
    if kind is EventKind.HARD:
        hard = 1 + (session.scalar(select(func.count()).select_from(BounceEvent).where(
            BounceEvent.subscriber_id == event.subscriber_id, BounceEvent.id != event.id,
            BounceEvent.kind == EventKind.HARD, BounceEvent.counted.is_(True),
            BounceEvent.occurred_at >= now - policy.soft_window)) or 0)
        event.counted = True
        if hard >= policy.hard_threshold:
            return Decision.SUPPRESSED, f"hard bounce {event.status or ''}".strip() + \
                ": the address is dead; marked bounced and suppressed"
        return Decision.COUNTED, f"hard bounce {hard} of {policy.hard_threshold}"
    return _judge_soft(session, policy, event, now)


def _judge_soft(session: Session, policy: BouncePolicy, event: BounceEvent,
                now: datetime) -> tuple[Decision, str]:
    # Counted once a day (Mailman's rule): a burst of reports about one bad day is one bounce.
    day_start = event.occurred_at.replace(hour=0, minute=0, second=0, microsecond=0)
    same_day = session.scalar(select(func.count()).select_from(BounceEvent).where(
        BounceEvent.subscriber_id == event.subscriber_id, BounceEvent.id != event.id,
        BounceEvent.kind.in_([EventKind.SOFT, EventKind.DELAY]),
        BounceEvent.counted.is_(True), BounceEvent.occurred_at >= day_start,
        BounceEvent.occurred_at < day_start + timedelta(days=1))) or 0
    if same_day:
        return Decision.NOT_COUNTED, "a soft bounce already counted today"
    event.counted = True
    window = (BounceEvent.subscriber_id == event.subscriber_id,
              BounceEvent.kind.in_([EventKind.SOFT, EventKind.DELAY]),
              BounceEvent.counted.is_(True), BounceEvent.occurred_at >= now - policy.soft_window,
              BounceEvent.id != event.id)
    count = 1 + (session.scalar(select(func.count()).select_from(BounceEvent)
                                .where(*window)) or 0)
    sends = set(session.scalars(select(BounceEvent.edition_id).where(*window).distinct()))
    sends.add(event.edition_id)
    sends.discard(None)
    days = policy.soft_window.days
    if count >= policy.soft_threshold and len(sends) >= policy.soft_min_sends:
        return Decision.DISABLED, (f"soft bounce {count} in {days} days across {len(sends)} "
                                   "sends: marked bounced and suppressed")
    return Decision.COUNTED, (f"soft bounce {count} of {policy.soft_threshold} in {days} days "
                              f"({len(sends)} of {policy.soft_min_sends} sends)")


def _domain_alert(session: Session, policy: BouncePolicy, event: BounceEvent,
                  now: datetime) -> str | None:
    """If most of this send's recipients at the event's domain bounced, raise (or update) the
    alert and say why the event is held; else None."""
    if event.edition_id is None or not event.domain:
        return None
    alert = session.scalar(select(BounceAlert).where(
        BounceAlert.kind == AlertKind.DOMAIN, BounceAlert.edition_id == event.edition_id,
        BounceAlert.domain == event.domain))
    if alert is not None and alert.resolved_at is not None:
        if alert.resolution == "applied":  # a co-ordinator found the bounces real
            return None
        return f"held: alert {alert.id} for {event.domain} on this send was dismissed"
    recipients = outbox.recipients_at_domain(session, event.edition_id, event.domain)
    bounced = session.scalar(select(func.count(distinct(BounceEvent.subscriber_id))).where(
        BounceEvent.edition_id == event.edition_id, BounceEvent.domain == event.domain,
        BounceEvent.kind.in_([EventKind.HARD, EventKind.SOFT, EventKind.DELAY]))) or 0
    over = (recipients >= policy.domain_alert_min_recipients
            and bounced > policy.domain_alert_ratio * recipients)
    if not (over or alert is not None):
        return None
    _raise_alert(session, AlertKind.DOMAIN, event, now, recipients=recipients, bounced=bounced,
                 detail=f"{bounced} of {recipients} recipients at {event.domain} bounced this "
                        "send: their mail system may be down or refusing us; nobody is disabled "
                        "until a co-ordinator resolves this alert")
    return (f"held: {bounced} of {recipients} recipients at {event.domain} bounced this send "
            "(domain alert)")


def _raise_alert(session: Session, kind: AlertKind, event: BounceEvent, now: datetime, *,
                 recipients: int, bounced: int, detail: str) -> BounceAlert:
    domain = event.domain or "(unknown)"
    alert = _find_alert(session, kind, event.edition_id, domain)
    if alert is None:
        try:
            with session.begin_nested():
                alert = BounceAlert(kind=kind, edition_id=event.edition_id, domain=domain,
                                    created_at=now, detail=detail)
                session.add(alert)
                session.flush()
        except IntegrityError:
            # Raised meanwhile by another receiver thread or process (a burst of bounces from
            # one domain arrives in parallel): that one is the alert.
            alert = _find_alert(session, kind, event.edition_id, domain)
            if alert is None:
                raise
        else:
            # Logged at error level once, when raised: what an operator's log watch picks up;
            # and mailed to the co-ordinators, who decide.
            log.error("bounce alert (%s) for edition %s: %s", kind, event.edition_id, detail)
            _tell(session, alert, kind, domain, detail, now)
    alert.recipients = max(alert.recipients or 0, recipients)
    alert.bounced = max(alert.bounced or 0, bounced)
    alert.share = round(alert.bounced / alert.recipients, 3) if alert.recipients else 0.0
    alert.detail, alert.updated_at = detail, now
    if alert.resolved_at is not None and kind is AlertKind.POLICY:
        alert.resolved_at = alert.resolved_by = alert.resolution = None  # it happened again
    session.flush()
    return alert


def _tell(session: Session, alert: BounceAlert, kind: AlertKind, domain: str, detail: str,
          now: datetime) -> None:
    what = (f"Bounces from {domain} are held back" if kind is AlertKind.DOMAIN
            else f"{domain} refused our mail by policy")
    edition = session.get(Edition, alert.edition_id) if alert.edition_id else None
    alerts.raise_alert(
        session, alerts.key_for("bounce-alert", alert.id), f"bounce-{kind}", what,
        f"{detail}.\n\nLook at it with `mailer bounces list` or on the console, then close "
        f"it: `mailer bounces resolve {alert.id} --apply` if the bounces are real (those "
        f"subscribers are then treated as bounced), or `--dismiss` to leave them alone.",
        regions=edition.regions if edition is not None else (), now=now)


def _find_alert(session: Session, kind: AlertKind, edition_id: int | None,
                domain: str) -> BounceAlert | None:
    return session.scalar(select(BounceAlert).where(
        BounceAlert.kind == kind, BounceAlert.edition_id == edition_id,
        BounceAlert.domain == domain))


def _act(session: Session, event: BounceEvent, decision: Decision, detail: str,
         now: datetime) -> str:
    """Change the subscriber as decided; returns the detail, noting when nothing changed."""
    if decision not in (Decision.SUPPRESSED, Decision.DISABLED, Decision.COMPLAINT):
        return detail
    subscriber = session.get(Subscriber, event.subscriber_id)
    if subscriber is None:
        return detail + " (the subscriber no longer exists)"
    facts: dict[str, Any] = {"bounce_event": event.id, "inbound_message": event.inbound_id,
                             "edition_id": event.edition_id, "kind": event.kind,
                             "status": event.status, "policy": decision.value}
    if decision is Decision.COMPLAINT:
        changed = store.mark_complained(session, subscriber,
                                        store.Context(channel=Channel.COMPLAINT, detail=facts))
    else:
        changed = store.mark_bounced(session, subscriber,
                                     store.Context(channel=Channel.BOUNCE, detail=facts))
    return detail if changed else detail + f" (already {subscriber.status})"


def _update_score(session: Session, subscriber_id: int, now: datetime) -> None:
    """`bounce_score`: counted bounces in the last 90 days, hard ones weighing double (shown
    in the console and the subject-access export; the policy itself reads the events)."""
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None:
        return
    rows = session.execute(select(BounceEvent.kind, func.count()).where(
        BounceEvent.subscriber_id == subscriber_id, BounceEvent.counted.is_(True),
        BounceEvent.occurred_at >= now - timedelta(days=90)).group_by(BounceEvent.kind)).all()
    subscriber.bounce_score = float(sum(n * (2 if k == EventKind.HARD else 1) for k, n in rows))


# ---------------------------------------------------------------- alerts

def open_alerts(session: Session) -> list[BounceAlert]:
    return list(session.scalars(select(BounceAlert).where(BounceAlert.resolved_at.is_(None))
                                .order_by(BounceAlert.id)))


def resolve_alert(session: Session, policy: BouncePolicy, alert_id: int, actor: str, *,
                  apply: bool, now: datetime | None = None) -> int:
    """Close an alert. `apply`: the bounces were real (people have left), so the held events
    are acted on as they would have been; otherwise they stay held and change nobody.
    Returns how many subscribers changed."""
    now = now or utcnow()
    alert = session.get(BounceAlert, alert_id)
    if alert is None:
        raise MailerError(f"no bounce alert {alert_id}", hint="`mailer bounces list` shows them")
    if alert.resolved_at is not None:
        raise MailerError(f"alert {alert_id} was resolved already ({alert.resolution})")
    alert.resolved_at, alert.resolved_by = now, actor[:100]
    alert.resolution = "applied" if apply else "dismissed"
    changed = 0
    if apply and alert.kind == AlertKind.DOMAIN:
        held = session.scalars(select(BounceEvent).where(
            BounceEvent.kind.in_([EventKind.HARD, EventKind.SOFT, EventKind.DELAY]),
            BounceEvent.edition_id == alert.edition_id, BounceEvent.domain == alert.domain,
            BounceEvent.action == Decision.HELD).order_by(BounceEvent.id)).all()
        for event in held:
            # Judged again as if there were no alert: `_domain_alert` lets an applied one by.
            event.action = Decision.PENDING
            session.flush()
            decision, detail = _judge(session, policy, event, now)
            event.action, event.settled_at = decision, now
            detail = _act(session, event, decision, f"{detail} (alert {alert_id} applied by "
                                                     f"{actor})", now)
            session.execute(update(InboundRecord).where(InboundRecord.id == event.inbound_id)
                            .values(decision=decision, decision_detail=detail[:2000]))
            if event.counted:
                _update_score(session, event.subscriber_id, now)
            changed += decision in (Decision.SUPPRESSED, Decision.DISABLED)
    session.flush()
    return changed


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class Row:
    """One inbound message for `mailer bounces list`."""

    id: int
    received_at: datetime
    kind: str
    status: str | None
    decision: str
    detail: str
    edition_id: int | None
    subscriber_id: int | None
    origin: str
    raw_kept: bool


def _in_scope(scope: Scope, everywhere: bool) -> Any:
    """A record is in a region scope when its subscriber is (`subscribers.regions.within`).
    One that names nobody, or someone since erased, cannot be placed in a region: only who
    covers every region (`everywhere`) sees those."""
    placed = and_(Subscriber.status != SubscriberStatus.ERASED,
                  within(scope, Subscriber.region))
    return or_(placed, Subscriber.id.is_(None) | (Subscriber.status == SubscriberStatus.ERASED)
               ) if everywhere else placed


def recent(session: Session, limit: int = 20, *, subscriber_id: int | None = None,
           kinds: tuple[str, ...] = (), scope: Scope = None, everywhere: bool = True
           ) -> list[Row]:
    """The newest inbound records, newest first, within a region scope (see `_in_scope`)."""
    query = select(InboundRecord.id, InboundRecord.received_at, InboundRecord.kind,
                   InboundRecord.status, InboundRecord.decision, InboundRecord.decision_detail,
                   InboundRecord.reason, InboundRecord.edition_id, InboundRecord.subscriber_id,
                   InboundRecord.origin, InboundRecord.raw_purged_at)
    if subscriber_id is not None:
        query = query.where(InboundRecord.subscriber_id == subscriber_id)
    if kinds:
        query = query.where(InboundRecord.kind.in_(list(kinds)))
    if scope is not None:
        query = query.outerjoin(Subscriber, Subscriber.id == InboundRecord.subscriber_id).where(
            _in_scope(scope, everywhere))
    rows = session.execute(query.order_by(InboundRecord.id.desc()).limit(limit)).all()
    return [Row(r.id, r.received_at, r.kind, r.status, r.decision,
                r.decision_detail or r.reason, r.edition_id, r.subscriber_id, r.origin,
                r.raw_purged_at is None) for r in rows]


def count_outside(session: Session, *, kinds: tuple[str, ...] = (), scope: Scope = None,
                  everywhere: bool = True) -> int:
    """How many inbound records of these kinds lie outside a region scope."""
    if scope is None:
        return 0
    every = select(func.count()).select_from(InboundRecord).outerjoin(
        Subscriber, Subscriber.id == InboundRecord.subscriber_id)
    if kinds:
        every = every.where(InboundRecord.kind.in_(list(kinds)))
    # All less those in scope, not NOT(in scope): a missing subscriber makes that NULL.
    return ((session.scalar(every) or 0)
            - (session.scalar(every.where(_in_scope(scope, everywhere))) or 0))


def event_counts(session: Session) -> dict[str, int]:
    """Bounce and complaint events recorded, by kind, for monitoring."""
    return {kind: n for kind, n in session.execute(
        select(BounceEvent.kind, func.count()).group_by(BounceEvent.kind))}


def events_for(session: Session, subscriber_id: int) -> list[BounceEvent]:
    """A person's bounce history, oldest first (the consent history has the changes)."""
    return list(session.scalars(select(BounceEvent).where(
        BounceEvent.subscriber_id == subscriber_id).order_by(BounceEvent.id)))


def raw_message(session: Session, inbound_id: int) -> bytes | None:
    return session.scalar(select(InboundRecord.raw).where(InboundRecord.id == inbound_id))


# ---------------------------------------------------------------- retention

@dataclass(frozen=True)
class Purged:
    raw_cleared: int
    records_deleted: int
    alerts_deleted: int


def purge(session: Session, policy: BouncePolicy, *, now: datetime | None = None) -> Purged:
    """Drop raw messages past `raw_retention` (the decision stays), then records and events past
    `record_retention`, and resolved alerts as old. Pending events are never deleted."""
    now = now or utcnow()
    raw_before, record_before = now - policy.raw_retention, now - policy.record_retention
    cleared = changed_rows(session.execute(
        update(InboundRecord).where(InboundRecord.received_at < raw_before,
                                    InboundRecord.raw.is_not(None))
        .values(raw=None, raw_purged_at=now)
        .execution_options(synchronize_session=False))) or 0
    old = select(InboundRecord.id).where(InboundRecord.received_at < record_before)
    # Explicitly, not through ON DELETE CASCADE: SQLite honours that only with foreign_keys on.
    session.execute(delete(BounceEvent).where(BounceEvent.inbound_id.in_(old),
                                              BounceEvent.action != Decision.PENDING)
                    .execution_options(synchronize_session=False))
    pending = select(BounceEvent.inbound_id).where(BounceEvent.action == Decision.PENDING)
    deleted = changed_rows(session.execute(
        delete(InboundRecord).where(InboundRecord.received_at < record_before,
                                    InboundRecord.id.not_in(pending))
        .execution_options(synchronize_session=False))) or 0
    alerts = changed_rows(session.execute(
        delete(BounceAlert).where(BounceAlert.resolved_at.is_not(None),
                                  BounceAlert.resolved_at < record_before)
        .execution_options(synchronize_session=False))) or 0
    return Purged(cleared, deleted, alerts)


def forget_subscriber(session: Session, subscriber_id: int) -> int:
    """For an erasure: the raw messages about a person contain their address. Returns how many
    were cleared; the decisions stay, as the consent trail does."""
    # The reason and the diagnostic can quote the address too ("550 <jo@...>: unknown").
    session.execute(update(BounceEvent).where(BounceEvent.subscriber_id == subscriber_id)
                    .values(diagnostic=None).execution_options(synchronize_session=False))
    return changed_rows(session.execute(
        update(InboundRecord).where(InboundRecord.subscriber_id == subscriber_id)
        .values(raw=None, raw_purged_at=utcnow(), reason="(erased)")
        .execution_options(synchronize_session=False))) or 0
