"""How long we keep what (UK GDPR Art. 5(1)(e)), and the purge that enforces it.

What goes, when, and through which store's own function (each period a setting):

    unconfirmed sign-ups   retention_unconfirmed_days   store.delete_unconfirmed: deleted whole
    people who left        retention_left_months        privacy.erase: the keyed hash stays
    delivery replies       retention_replies_months     outbox.forget_replies: rows stay
    bounce raw messages    bounce_raw_retention_days    bounce_policy.purge (its own periods,
    bounce records         bounce_record_retention_days   as `mailer bounces purge` applies)
    readers' replies       reader_reply_retention_days  replies.purge: deleted whole
    audit entries          retention_audit_years        audit.delete_before

The scheduler's leader runs `run_due` on its periodic pass; it purges once a day (the last
run is the newest `retention.purge` entry in the audit log, so a restart does not repeat it).
Each category goes in batches, each batch its own transaction, so a big first purge never
holds a long lock; every step is a guarded statement, so a run that stops half-way (or a
second one) only does what is left. Each run writes one audit entry with its counts.

`report` is the other half: per category, how many records are held, the oldest, and the
next purge date under the current settings (what a DPIA asks for). Both read the same
predicates from the stores, so the report's dates are the purge's.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mailer import audit, bounce_policy, outbox, privacy, replies
from mailer.audit import AuditEntry
from mailer.bounce_policy import BouncePolicy, InboundRecord
from mailer.config import Settings
from mailer.labels import STATES
from mailer.models import Delivery
from mailer.replies import ReaderReply
from subscribers import store
from subscribers.db import session_scope, utcnow
from subscribers.models import (
    Channel,
    ConsentEvent,
    Subscriber,
    SubscriberStatus,
    Suppression,
)

ACTION = "retention.purge"  # the audit action of a run, and how the next run finds the last
ACTOR = "scheduler"
RUN_EVERY = timedelta(days=1)
BATCH = 500  # rows a transaction: small enough that a purge never blocks a send for long


# ---------------------------------------------------------------- periods

def months_before(moment: datetime, months: int) -> datetime:
    """The same time `months` calendar months earlier (31 March less one month: 28 or 29
    February), so "12 months" is a year whatever the month's length."""
    return _add_months(moment, -months)


def months_after(moment: datetime, months: int) -> datetime:
    return _add_months(moment, months)


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


@dataclass(frozen=True)
class Periods:
    """The retention periods in force (`Settings.retention_*` and the bounce policy's)."""

    unconfirmed_days: int = 30
    left_months: int = 12
    replies_months: int = 3
    audit_years: int = 6
    bounces: BouncePolicy = field(default_factory=BouncePolicy)
    reader_replies_days: int = 90

    @classmethod
    def from_settings(cls, settings: Settings) -> Periods:
        return cls(unconfirmed_days=settings.retention_unconfirmed_days,
                   left_months=settings.retention_left_months,
                   replies_months=settings.retention_replies_months,
                   audit_years=settings.retention_audit_years,
                   bounces=BouncePolicy.from_settings(settings),
                   reader_replies_days=settings.reader_reply_retention_days)

    # A record whose clock started at `t` goes once `t < cutoff(now)`, i.e. at `due(t)`.
    def unconfirmed_cutoff(self, now: datetime) -> datetime:
        return now - timedelta(days=self.unconfirmed_days)

    def unconfirmed_due(self, t: datetime) -> datetime:
        return t + timedelta(days=self.unconfirmed_days)

    def left_cutoff(self, now: datetime) -> datetime:
        return months_before(now, self.left_months)

    def left_due(self, t: datetime) -> datetime:
        return months_after(t, self.left_months)

    def replies_cutoff(self, now: datetime) -> datetime:
        return months_before(now, self.replies_months)

    def replies_due(self, t: datetime) -> datetime:
        return months_after(t, self.replies_months)

    def reader_replies_due(self, t: datetime) -> datetime:
        return t + timedelta(days=self.reader_replies_days)

    def audit_cutoff(self, now: datetime) -> datetime:
        return months_before(now, 12 * self.audit_years)

    def audit_due(self, t: datetime) -> datetime:
        return months_after(t, 12 * self.audit_years)


# ---------------------------------------------------------------- the purge

@dataclass
class Purged:
    """What one run removed (the counts its audit entry records)."""

    unconfirmed_deleted: int = 0
    left_erased: int = 0
    replies_cleared: int = 0
    bounce_raw_cleared: int = 0
    bounce_records_deleted: int = 0
    bounce_alerts_deleted: int = 0
    reader_replies_deleted: int = 0
    audit_deleted: int = 0
    complete: bool = True  # False: stopped early (the leader lock went); the next run goes on

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "complete"}


def purge(sessions: sessionmaker[Session], periods: Periods, now: datetime | None = None, *,
          batch: int = BATCH, keep_going: Callable[[], bool] = lambda: True) -> Purged:
    """Apply every retention period once, in batches of `batch` rows, each committed on its
    own; `keep_going` is asked before each batch (the scheduler's fencing check). Writes one
    audit entry with the counts. Running it again at once finds nothing more to do."""
    now = now or utcnow()
    done = Purged()

    def batches(step: Callable[[Session], int]) -> int:
        total = 0
        while True:
            if not keep_going():
                done.complete = False
                return total
            with session_scope(sessions) as session:
                n = step(session)
            total += n
            if n < batch:
                return total

    done.unconfirmed_deleted = batches(lambda s: store.delete_unconfirmed(
        s, periods.unconfirmed_cutoff(now), batch))
    done.left_erased = batches(lambda s: _erase_departed(s, periods.left_cutoff(now), batch))
    done.replies_cleared = batches(lambda s: outbox.forget_replies(
        s, periods.replies_cutoff(now), batch))
    if keep_going():
        # Its own statements, set-based: the bounce tables are small beside the outbox.
        with session_scope(sessions) as session:
            bounced = bounce_policy.purge(session, periods.bounces, now=now)
        done.bounce_raw_cleared = bounced.raw_cleared
        done.bounce_records_deleted = bounced.records_deleted
        done.bounce_alerts_deleted = bounced.alerts_deleted
    else:
        done.complete = False
    done.reader_replies_deleted = batches(lambda s: replies.purge(
        s, timedelta(days=periods.reader_replies_days), now=now, limit=batch))
    done.audit_deleted = batches(lambda s: audit.delete_before(
        s, periods.audit_cutoff(now), batch))
    with session_scope(sessions) as session:
        audit.record(session, actor=ACTOR, via="scheduler", action=ACTION,
                     detail={**done.counts(), **({} if done.complete else {"stopped": True})})
    return done


def _erase_departed(session: Session, cutoff: datetime, limit: int) -> int:
    ids = store.departed_ids(session, cutoff, limit)
    ctx = store.Context(channel=Channel.SYSTEM, actor=ACTOR)
    for subscriber_id in ids:
        subscriber = session.get(Subscriber, subscriber_id)
        assert subscriber is not None
        privacy.erase(session, subscriber, ctx)
    return len(ids)


def run_due(sessions: sessionmaker[Session], periods: Periods, now: datetime | None = None,
            *, keep_going: Callable[[], bool] = lambda: True) -> Purged | None:
    """Purge when the last run is a day old or more (or there was none); None otherwise."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        last = audit.last_at(session, ACTION)
    if last is not None and now - last < RUN_EVERY:
        return None
    return purge(sessions, periods, now, keep_going=keep_going)


# ---------------------------------------------------------------- the report

@dataclass(frozen=True)
class Holding:
    """One category of record: how many we hold, the oldest, and when the next of them goes."""

    key: str  # stable, for scripts and tests: "subscribers.active", "audit", ...
    label: str
    held: int
    oldest: datetime | None  # when the oldest one's retention clock started
    next_purge: datetime | None  # None: not removed by age (the rule says why)
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "held": self.held,
                "oldest": self.oldest.isoformat() if self.oldest else None,
                "next_purge": self.next_purge.isoformat() if self.next_purge else None,
                "rule": self.rule}


def _figures(session: Session, clock: Any, *where: Any) -> tuple[int, datetime | None]:
    row = session.execute(select(func.count(), func.min(clock)).where(*where)).one()
    held: int = row[0] or 0
    oldest: datetime | None = row[1]
    return held, oldest


def _earliest(*moments: datetime | None) -> datetime | None:
    return min((m for m in moments if m is not None), default=None)


def _then(due: Callable[[datetime], datetime], oldest: datetime | None) -> datetime | None:
    return due(oldest) if oldest is not None else None


def report(session: Session, periods: Periods) -> list[Holding]:
    """Per category: records held, the oldest, and the next purge date (it may have passed:
    then the scheduler's next daily run removes it)."""
    p = periods
    # The clock start of the next subscriber rows to go, from the purge's own predicates.
    _, unconfirmed_oldest = _figures(session, Subscriber.updated_at, store.unconfirmed())
    unconfirmed_next = _then(p.unconfirmed_due, unconfirmed_oldest)
    kept = {
        SubscriberStatus.ACTIVE: "kept while subscribed",
        SubscriberStatus.AWAITING_APPROVAL: "kept until a co-ordinator approves or turns "
                                            "it down",
        SubscriberStatus.ERASED: "an anonymised row: no personal data; the keyed hash is on "
                                 "the suppression list",
    }
    out: list[Holding] = []
    for status in SubscriberStatus:
        held, oldest = _figures(session, Subscriber.created_at, Subscriber.status == status)
        if status == SubscriberStatus.PENDING:
            _, returning = _figures(session, store.left_clock(), store.departed(),
                                    Subscriber.status == status)
            next_purge = _earliest(unconfirmed_next, _then(p.left_due, returning))
            rule = (f"deleted {p.unconfirmed_days} days after the last sign-up request if "
                    f"never confirmed; one who had left is erased {p.left_months} months "
                    "after asking to come back")
        elif status in kept:
            next_purge, rule = None, kept[status]
        else:
            _, left = _figures(session, store.left_clock(), store.departed(),
                               Subscriber.status == status)
            next_purge = _then(p.left_due, left)
            rule = f"erased to the keyed hash {p.left_months} months after they left"
        out.append(Holding(f"subscribers.{status.value}",
                           f"Subscribers: {STATES[status.value].lower()}", held,
                           oldest, next_purge, rule))

    held, oldest = _figures(session, Subscriber.updated_at, store.unconfirmed())
    out.append(Holding("unconfirmed", "Unconfirmed sign-ups", held, oldest, unconfirmed_next,
                       f"deleted whole {p.unconfirmed_days} days after the last sign-up "
                       "request: no hash kept, the address never joined"))
    held, oldest = _figures(session, store.left_clock(), store.departed())
    out.append(Holding("left", "People who left", held, oldest, _then(p.left_due, oldest),
                       f"erased {p.left_months} months after they left: only the keyed hash "
                       "stays, so the address is still refused"))

    held, oldest = _figures(session, Delivery.queued_at)
    out.append(Holding("deliveries", "Delivery rows", held, oldest, None,
                       "kept without personal data beyond the subscriber's id: the sends' "
                       "figures"))
    held, oldest = _figures(session, outbox.reply_clock(), outbox.replies_before())
    out.append(Holding("replies", "Delivery replies", held, oldest,
                       _then(p.replies_due, oldest),
                       f"the relay's reply cleared {p.replies_months} months after it came; "
                       "status and counts stay"))

    raw_days = p.bounces.raw_retention
    record_days = p.bounces.record_retention
    held, oldest = _figures(session, InboundRecord.received_at)
    out.append(Holding("bounces", "Bounce records", held, oldest,
                       oldest + record_days if oldest else None,
                       f"deleted {record_days.days} days after they came, with their bounce "
                       "events (unless still waiting for a decision)"))
    held, oldest = _figures(session, InboundRecord.received_at, InboundRecord.raw.is_not(None))
    out.append(Holding("bounces.raw", "Bounce message bodies", held, oldest,
                       oldest + raw_days if oldest else None,
                       f"the raw message cleared {raw_days.days} days after it came; the "
                       "decision stays"))

    held, oldest = _figures(session, ReaderReply.received_at)
    out.append(Holding("reader_replies", "Readers' replies", held, oldest,
                       _then(p.reader_replies_due, oldest),
                       f"deleted whole {p.reader_replies_days} days after they came (each was "
                       "forwarded to the contact address when it came)"))

    held, oldest = _figures(session, ConsentEvent.occurred_at)
    of_unconfirmed = session.scalar(select(func.count()).select_from(ConsentEvent).join(
        Subscriber, Subscriber.id == ConsentEvent.subscriber_id).where(store.unconfirmed()))
    out.append(Holding("consent", "Consent events", held, oldest,
                       unconfirmed_next if of_unconfirmed else None,
                       "kept with the person's record (anonymised when erased); deleted with "
                       "an unconfirmed sign-up"))
    held, oldest = _figures(session, Suppression.created_at)
    out.append(Holding("suppression", "Suppressed addresses (keyed hashes)", held, oldest,
                       None, "kept: an erased, bounced or complaining address is never "
                             "mailed again"))
    held, oldest = _figures(session, AuditEntry.at)
    out.append(Holding("audit", "Audit entries", held, oldest, _then(p.audit_due, oldest),
                       f"deleted {p.audit_years} years after they were written"))
    return out
