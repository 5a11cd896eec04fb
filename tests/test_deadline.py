"""One "too late": a reminder at its "not after" time is late for the claim, the worker, the
scheduler and scheduling alike, and why each row ended is a value in `delivery.reason`."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from mailer import deadline, events, migrations, outbox, schedule
from mailer.config import Settings
from mailer.events import Event, EventSpec, Reminder, ReminderStatus
from mailer.models import Delivery, DeliveryReason, DeliveryStatus, EditionKind, EditionStatus
from mailer.smtp import Outcome, SendResult
from mailer.worker import Policy
from subscribers import store
from subscribers.db import make_engine, session_factory
from subscribers.models import Channel

# Noon UK time on a day without a clock change, far from any wall clock the suite runs at.
NOT_AFTER = datetime(2027, 5, 13, 11, 0, tzinfo=UTC)
POLICY = Policy(retry_base=1, retry_cap=5, give_up=timedelta(days=30), unknown_resends=1)


def _readers(session: Session, settings: Settings, n: int = 3) -> None:
    rules = settings.rules()
    topics = store.topics_by_slug(session, ["reminders"])
    store.bulk_add_active(session, rules, [
        (store.profile_from(rules, email=f"r{i}@kent.police.uk", region="kent"), topics)
        for i in range(n)], store.Context(channel=Channel.IMPORT))


def _claim_is_late(session: Session, settings: Settings, at: datetime) -> bool:
    edition, _ = outbox.store_edition(
        session, slug="claim", title="T", subject="S", topic="reminders", regions=[], roles=[],
        source="claim", compiled={}, actor="tester", kind=EditionKind.REMINDER,
        not_after=NOT_AFTER)
    outbox.enqueue(session, edition, now=NOT_AFTER - timedelta(hours=2))
    claims = outbox.claim_due(session, "w1", 10, timedelta(minutes=5), now=at)
    rows = session.execute(select(Delivery.status, Delivery.reason)
                           .where(Delivery.edition_id == edition.id)).all()
    if claims:
        assert len(claims) == 3 and {r.status for r in rows} == {DeliveryStatus.SENDING}
        return False
    assert set(rows) == {(DeliveryStatus.FAILED, DeliveryReason.TOO_LATE)}
    return True


def _worker_is_late(at: datetime) -> bool:
    claim = outbox.Claim(1, 1, 1, "r@kent.police.uk", None, 1, False,
                         NOT_AFTER - timedelta(hours=2))
    decided = POLICY.decide(claim, SendResult(Outcome.RETRY, 451, "4.3.0", "451 4.3.0 later"),
                            at, NOT_AFTER)
    if decided.status == DeliveryStatus.RETRY:
        assert decided.reason is None
        return False
    assert (decided.status, decided.reason) == (DeliveryStatus.FAILED, DeliveryReason.DATE_PASSED)
    return True


def _scheduler_is_late(session: Session, settings: Settings, at: datetime) -> bool:
    session.execute(delete(Event))  # the migration's calendar would fall due too
    event, _ = events.add_event(session, EventSpec(name="Boundary day", starts_on=date(2027, 5, 20),
                                                   offsets=[7]),
                                now=NOT_AFTER - timedelta(days=30))
    session.execute(delete(Reminder).where(Reminder.event_id == event.id))
    session.add(Reminder(event_id=event.id, occurrence=event.starts_on, offset_days=7,
                         send_at=NOT_AFTER - timedelta(hours=3), not_after=NOT_AFTER,
                         status=ReminderStatus.PLANNED, updated_at=NOT_AFTER - timedelta(days=1)))
    session.flush()
    report = schedule.catch_up(session, settings, at)
    status = session.scalar(select(Reminder.status).where(Reminder.event_id == event.id))
    if report.missed:
        assert (report.reminders, status) == ([], ReminderStatus.MISSED)
        return True
    assert len(report.reminders) == 1 and status == ReminderStatus.ENQUEUED
    return False


def _scheduling_is_refused(session: Session, at: datetime) -> bool:
    edition, _ = outbox.store_edition(
        session, slug="timed", title="T", subject="S", topic="reminders", regions=[], roles=[],
        source="timed", compiled={}, actor="tester", not_after=NOT_AFTER)
    try:
        outbox.schedule(session, edition, "tester", at, now=NOT_AFTER - timedelta(days=1),
                        require_approval=False)
    except outbox.ScheduleError as exc:
        assert "'not after' time" in str(exc)
        return True
    assert edition.status == EditionStatus.SCHEDULED
    return False


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["second-before", "exactly", "second-after"])
def test_the_claim_the_worker_the_scheduler_and_scheduling_agree_at_not_after(
        offset: int, settings: Settings, session: Session) -> None:
    at = NOT_AFTER + timedelta(seconds=offset)
    _readers(session, settings)
    verdicts = {"claim": _claim_is_late(session, settings, at), "worker": _worker_is_late(at),
                "scheduler": _scheduler_is_late(session, settings, at),
                "scheduling": _scheduling_is_refused(session, at)}
    late = offset >= 0  # at "not after" exactly is too late (mailer.deadline)
    assert verdicts == dict.fromkeys(verdicts, late)
    assert deadline.too_late(NOT_AFTER, at) is late and not deadline.too_late(None, at)


def test_the_late_reminder_report_counts_rows_by_their_reason_not_their_words(
        settings: Settings, session: Session) -> None:
    _readers(session, settings)
    edition, _ = outbox.store_edition(
        session, slug="late", title="T", subject="Late one", topic="reminders", regions=[],
        roles=[], source="late", compiled={}, actor="tester", kind=EditionKind.REMINDER,
        not_after=NOT_AFTER)
    outbox.enqueue(session, edition, now=NOT_AFTER - timedelta(hours=2))
    assert outbox.claim_due(session, "w1", 10, timedelta(minutes=5), now=NOT_AFTER) == []
    # Words alone no longer count: a row whose reply quotes them but has no reason is not late.
    first = session.scalar(select(Delivery).where(Delivery.edition_id == edition.id)
                           .order_by(Delivery.id).limit(1))
    assert first is not None
    first.reason = None
    session.flush()
    (told,) = schedule.check_late_reminders(session, NOT_AFTER + timedelta(minutes=20))
    assert "reminder 'Late one': 2 of 3 could not be delivered" in told


REPLIES = [  # (status, last_code, last_reply as an older version wrote it, reason expected)
    ("failed", None, f"not sent: {outbox.TOO_LATE}", "too_late"),
    ("failed", 451, f"451 4.3.0 try later ({outbox.DATE_PASSED})", "date_passed"),
    ("unknown", None, f"timed out after the final dot ({outbox.DATE_PASSED})", "date_passed"),
    ("failed", 421, "421 4.4.2 closing (gave up after 9 tries)", "gave_up"),
    ("skipped", None, "not sent: unsubscribed or suppressed before its turn", "suppressed"),
    ("skipped", None, "cancelled", "cancelled"),
    ("failed", None, "not sent: a header line is longer than 998 characters", "not_built"),
    ("failed", 554, "554 5.6.0 message refused", None),
    ("sent", 250, "250 2.0.0 queued", None),
    ("queued", None, None, None),
]


def test_the_migration_fills_the_reason_of_rows_that_ended_before_it(
        settings: Settings, db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            _readers(session, settings, n=len(REPLIES))
            edition, _ = outbox.store_edition(
                session, slug="old", title="T", subject="S", topic="reminders", regions=[],
                roles=[], source="old", compiled={}, actor="tester")
            outbox.enqueue(session, edition)
            rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
            for row, (status, code, reply, _reason) in zip(rows, REPLIES, strict=True):
                row.status, row.last_code, row.last_reply = status, code, reply
            session.commit()
        migrations.downgrade(db_url, "0008")  # what an older version left: words only
        migrations.upgrade(db_url)
        with session_factory(engine)() as session:
            found = session.execute(select(Delivery.last_reply, Delivery.reason)
                                    .order_by(Delivery.id)).all()
            assert [r for _, r in found] == [reason for *_, reason in REPLIES]
            assert session.scalar(select(func.count()).select_from(Delivery)) == len(REPLIES)
    finally:
        engine.dispose()
