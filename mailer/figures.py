"""The figures behind the console's charts, counted in SQL: readers at each month end (by
region, by organisation type), what became of each send in the week after it, and the
reminders sent and missed each quarter.

No tracking: every figure is a count of rows the system keeps anyway (readers' join and leave
times, deliveries, consent events, planned reminders). Months and quarters are the UK's
(Europe/London) calendar; their bounds are turned into UTC here and bound into the query, so
the same GROUP BY counts alike on SQLite and PostgreSQL.

Scope: readers and deliveries count within the caller's regions (`subscribers.regions.within`
on the reader's region); the sends listed are those whose audience reaches those regions.
Reminders belong to calendar events, which have no region, so everyone sees the same
reminder figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select
from sqlalchemy.orm import Session

from mailer.charts import Chart
from mailer.events import Reminder, ReminderStatus
from mailer.models import PERSONAL, Delivery, DeliveryStatus, Edition, EditionKind
from subscribers.models import ConsentAction, ConsentEvent, Subscriber, SubscriberStatus
from subscribers.regions import Scope, within

LONDON = ZoneInfo("Europe/London")
MONTHS = 12
QUARTERS = 8
SENDS = 8
AFTER_SEND = timedelta(days=7)
NOT_RECORDED = "Not recorded"
# Readers who have not (yet, or again) become readers: a pending or awaiting sign-up, and one
# who left and asked to come back (pending again, `left_at` cleared), are left out of every
# month rather than counted from a confirmation that no longer stands.
NOT_READERS = (SubscriberStatus.PENDING, SubscriberStatus.AWAITING_APPROVAL)


def month_starts(now: datetime, months: int = MONTHS, zone: ZoneInfo = LONDON
                 ) -> list[datetime]:
    """The UK-time first instants of the last `months` months (this one last), then of the
    next month: each month's bounds, as aware datetimes."""
    local = now.astimezone(zone)
    year, month = local.year, local.month - (months - 1)
    out = []
    for _ in range(months + 1):
        while month < 1:
            year, month = year - 1, month + 12
        while month > 12:
            year, month = year + 1, month - 12
        out.append(datetime(year, month, 1, tzinfo=zone))
        month += 1
    return out


def quarter_starts(now: datetime, quarters: int = QUARTERS, zone: ZoneInfo = LONDON
                   ) -> list[datetime]:
    """The UK-time first instants of the last `quarters` calendar quarters, then the next."""
    local = now.astimezone(zone)
    index = local.year * 4 + (local.month - 1) // 3 - (quarters - 1)
    return [datetime(i // 4, (i % 4) * 3 + 1, 1, tzinfo=zone)
            for i in range(index, index + quarters + 1)]


def _left_at() -> ColumnElement[Any]:
    # A lapsed reader has no `left_at` (they may answer and come back): they stopped being a
    # reader when their lapse was recorded.
    lapsed_at = (select(func.max(ConsentEvent.occurred_at))
                 .where(ConsentEvent.subscriber_id == Subscriber.id,
                        ConsentEvent.action == ConsentAction.LAPSE.value)
                 .scalar_subquery())
    return case((Subscriber.status == SubscriberStatus.LAPSED.value, lapsed_at),
                else_=Subscriber.left_at)


def readers(session: Session, scope: Scope, now: datetime, by: str,
            words: Callable[[object], str], months: int = MONTHS) -> Chart:
    """Readers at the end of each of the last `months` UK months (the current one up to
    `now`), by `by` ("region" or "organisation_type"): those who had joined (`confirmed_at`,
    set by a confirmation, an import or a co-ordinator's add) and not yet left."""
    column = {"region": Subscriber.region, "organisation_type": Subscriber.organisation_type}[by]
    starts = month_starts(now, months)
    # Bound as UTC, as the rows hold it: a UK-time value is never compared as its wall clock.
    ends = [min(end, now).astimezone(UTC) for end in starts[1:]]
    # Each reader's join and leave times once (the lapse time is a subquery), then a column
    # per month counted over them.
    spans = (select(column.label("grouped"), Subscriber.confirmed_at.label("joined"),
                    _left_at().label("left"))
             .where(within(scope, Subscriber.region), Subscriber.confirmed_at.is_not(None),
                    Subscriber.status.not_in([s.value for s in NOT_READERS]))
             .subquery())
    counted = [func.sum(case((and_(spans.c.joined < end,
                                   or_(spans.c.left.is_(None), spans.c.left >= end)), 1),
                             else_=0))
               for end in ends]
    rows = session.execute(select(spans.c.grouped, *counted).group_by(spans.c.grouped)).all()
    series = sorted(((words(row[0]) if row[0] else NOT_RECORDED,
                      [int(v or 0) for v in row[1:]]) for row in rows),
                    key=lambda item: (item[0] == NOT_RECORDED, item[0]))
    heading = "region" if by == "region" else "type of organisation"
    return Chart(key=f"readers-by-{by.replace('_', '-')}",
                 title=f"Readers at each month end, by {heading}", category="Month",
                 categories=[start.strftime("%b %Y") for start in starts[:-1]],
                 series=[s for s in series if any(s[1])], kind="line",
                 note="The current month is counted up to today.")


@dataclass(frozen=True)
class Outcome:
    """What became of one send, within the caller's regions."""

    edition_id: int
    title: str
    started_at: datetime
    delivered: int
    bounced: int
    unsubscribed: int  # readers of this send who unsubscribed within 7 days of its start


def outcome(session: Session, edition: Edition, scope: Scope) -> Outcome:
    """Delivered and bounced copies of a send, and how many of its readers unsubscribed
    within `AFTER_SEND` of its start (from the list or from a topic)."""
    started = edition.started_at
    unsubscribed: ColumnElement[Any]
    if started is None:
        unsubscribed = func.sum(0)
    else:
        left = exists().where(ConsentEvent.subscriber_id == Delivery.subscriber_id,
                              ConsentEvent.action == ConsentAction.UNSUBSCRIBE.value,
                              ConsentEvent.occurred_at >= started,
                              ConsentEvent.occurred_at < started + AFTER_SEND)
        unsubscribed = func.sum(case((left, 1), else_=0))
    row = session.execute(
        select(func.sum(case((Delivery.status == DeliveryStatus.SENT.value, 1), else_=0)),
               func.sum(case((Delivery.status == DeliveryStatus.BOUNCED.value, 1), else_=0)),
               unsubscribed)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.edition_id == edition.id, within(scope, Subscriber.region))).one()
    return Outcome(edition.id, edition.title, started or edition.created_at,
                   *(int(v or 0) for v in row))


def recent_sends(session: Session, scope: Scope, limit: int = SENDS) -> list[Edition]:
    """The latest newsletters and reminders that have started, oldest first (as a chart
    reads), whose audience reaches the scope."""
    rows = session.scalars(
        select(Edition).where(Edition.started_at.is_not(None),
                              Edition.kind.not_in([k.value for k in PERSONAL]),
                              within(scope, Edition.regions))
        .order_by(Edition.started_at.desc(), Edition.id.desc()).limit(limit)).all()
    return list(reversed(rows))


def outcomes_chart(outcomes: Sequence[Outcome], key: str = "sends",
                   title: str = "What became of each send") -> Chart:
    return Chart(key=key, title=title, category="Send",
                 categories=[f"{o.title} ({o.started_at.astimezone(LONDON):%d %b %Y})"
                             for o in outcomes],
                 ticks=[f"{o.started_at.astimezone(LONDON):%d %b}" for o in outcomes],
                 series=[("Delivered", [o.delivered for o in outcomes]),
                         ("Bounced", [o.bounced for o in outcomes]),
                         ("Unsubscribed within 7 days", [o.unsubscribed for o in outcomes])],
                 note="Unsubscribed: readers of the send who left the list or one of its "
                      "topics within 7 days of its start.")


def sends(session: Session, scope: Scope, limit: int = SENDS) -> Chart:
    return outcomes_chart([outcome(session, e, scope) for e in recent_sends(session, scope,
                                                                             limit)])


def edition_chart(session: Session, edition: Edition, scope: Scope) -> Chart:
    kind = "reminder" if edition.kind == EditionKind.REMINDER else "send"
    return outcomes_chart([outcome(session, edition, scope)], key=f"edition-{edition.id}",
                          title=f"What became of this {kind}")


def reminders(session: Session, now: datetime, quarters: int = QUARTERS) -> Chart:
    """Reminders sent (queued to their readers) and missed (their time passed first), by the
    UK quarter of the time they were due."""
    starts = quarter_starts(now, quarters)
    bounds = [start.astimezone(UTC) for start in starts]
    counted = [func.sum(case((and_(Reminder.send_at >= start, Reminder.send_at < end), 1),
                             else_=0))
               for start, end in pairwise(bounds)]
    wanted = (ReminderStatus.ENQUEUED.value, ReminderStatus.MISSED.value)
    found = {row[0]: [int(v or 0) for v in row[1:]] for row in session.execute(
        select(Reminder.status, *counted).where(Reminder.status.in_(wanted))
        .group_by(Reminder.status))}
    return Chart(key="reminders", title="Reminders sent and missed, by quarter",
                 category="Quarter",
                 categories=[f"{s:%b} to {e - timedelta(days=1):%b %Y}"
                             for s, e in pairwise(starts)],
                 series=[("Sent", found.get(wanted[0], [0] * quarters)),
                         ("Missed", found.get(wanted[1], [0] * quarters))],
                 note="Quarters of the calendar year, in UK time. Reminders are for every "
                      "region.")
