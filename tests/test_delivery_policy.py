"""The rules that decide what happens to each message, as the people who rely on them see it.

The worker's whole retry and give-up policy as one table; backoff and the relay's throttling;
each rate window's length; a pause that stops every worker at its next claim; and the guards
that keep a late or superseded result from overwriting the row it no longer owns. Database
tests run on SQLite and PostgreSQL; SMTP is a real server on loopback.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mailer import outbox
from mailer.config import Settings
from mailer.models import Delivery, DeliveryStatus, Edition, EditionStatus
from mailer.smtp import Outcome, SendResult
from mailer.worker import Policy, Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel
from subscribers.rules import Rules
from tests.smtp_servers import FaultServer, make_fault_server  # noqa: F401

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
# The defaults in the README: 60 s base, 30 min cap, give up after 48 h, one ambiguous resend.
POLICY = Policy(retry_base=60, retry_cap=1800, give_up=timedelta(hours=48), unknown_resends=1,
                throttle_pause=60)
QUEUED = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _claim(attempts: int = 1, ambiguous: bool = False) -> outbox.Claim:
    return outbox.Claim(delivery_id=7, edition_id=1, subscriber_id=3, email="a@kent.police.uk",
                        name=None, attempts=attempts, ambiguous=ambiguous, queued_at=QUEUED)


def _result(outcome: Outcome, code: int | None = 451, enhanced: str | None = "4.3.0",
            reply: str = "451 4.3.0 try later") -> SendResult:
    return SendResult(outcome, code, enhanced, reply, "end")


H = timedelta(hours=1)
THROTTLED = _result(Outcome.RETRY, 421, "4.7.0", "421 4.7.0 slow down")

# (case, attempts, ambiguous claim, result, time since queued, "not after" from now,
#  expected status, expected ambiguous, expected words in the reply, retry wait bounds in s)
CASES = [
    ("delivered", 1, False, _result(Outcome.SENT, 250, "2.0.0", "250 2.0.0 ok"), H, None,
     DeliveryStatus.SENT, False, "250 2.0.0 ok", None),
    ("delivered after an ambiguous resend", 2, True,
     _result(Outcome.SENT, 250, "2.0.0", "250 ok"), H, None, DeliveryStatus.SENT, True, "250 ok",
     None),
    ("the address is gone", 1, False, _result(Outcome.BOUNCED, 550, "5.1.1", "550 5.1.1 no"), H,
     None, DeliveryStatus.BOUNCED, False, "550 5.1.1 no", None),
    ("refused for this message only", 1, False,
     _result(Outcome.FAILED, 554, "5.6.0", "554 5.6.0 bad"), H, None, DeliveryStatus.FAILED,
     False, "554 5.6.0 bad", None),
    ("a temporary failure waits, with backoff", 1, False, _result(Outcome.RETRY), H, None,
     DeliveryStatus.RETRY, False, "451 4.3.0 try later", (0, 60)),
    ("the fourth try waits up to 8 x base", 4, False, _result(Outcome.RETRY), H, None,
     DeliveryStatus.RETRY, False, "451", (0, 480)),
    ("the wait never passes the cap", 12, False, _result(Outcome.RETRY), H, None,
     DeliveryStatus.RETRY, False, "451", (0, 1800)),
    ("a throttling relay is given at least its pause", 1, False, THROTTLED, H, None,
     DeliveryStatus.RETRY, False, "421 4.7.0 slow down", (60, 60)),
    ("still trying just before the give-up time", 9, False, _result(Outcome.RETRY),
     timedelta(hours=48) - timedelta(seconds=1), None, DeliveryStatus.RETRY, False, "451",
     (0, 1800)),
    ("given up at 48 hours", 9, False, _result(Outcome.RETRY), timedelta(hours=48), None,
     DeliveryStatus.FAILED, False, "451 4.3.0 try later (gave up after 9 tries)", None),
    ("past its 'not after' time", 2, False, _result(Outcome.RETRY), H, timedelta(0),
     DeliveryStatus.FAILED, False, f"({outbox.DATE_PASSED})", None),
    ("before its 'not after' time", 2, False, _result(Outcome.RETRY), H, timedelta(seconds=1),
     DeliveryStatus.RETRY, False, "451", (0, 120)),
    ("no reply after the final dot: resent, marked ambiguous", 1, False,
     _result(Outcome.UNKNOWN, None, None, "timed out after the final dot"), H, None,
     DeliveryStatus.RETRY, True, "timed out", (0, 60)),
    ("no reply again after the one resend: unknown, not resent", 2, True,
     _result(Outcome.UNKNOWN, None, None, "dropped"), H, None, DeliveryStatus.UNKNOWN, True,
     "dropped", None),
    ("an ambiguous row whose resend failed is retried", 2, True, _result(Outcome.RETRY), H, None,
     DeliveryStatus.RETRY, True, "451", (0, 120)),
    ("may have arrived, given up: unknown, never failed", 3, True, _result(Outcome.RETRY),
     timedelta(hours=49), None, DeliveryStatus.UNKNOWN, True, "(gave up after 3 tries)", None),
    ("may have arrived, date passed: unknown, never failed", 1, False,
     _result(Outcome.UNKNOWN, None, None, "dropped"), H, timedelta(0), DeliveryStatus.UNKNOWN,
     True, "dropped (the date has passed)", None),
]


@pytest.mark.parametrize(("case", "attempts", "ambiguous", "result", "age", "not_after",
                          "status", "marked", "reply", "wait"), CASES, ids=[c[0] for c in CASES])
def test_the_retry_and_give_up_policy(case: str, attempts: int, ambiguous: bool,
                                      result: SendResult, age: timedelta,
                                      not_after: timedelta | None, status: DeliveryStatus,
                                      marked: bool, reply: str,
                                      wait: tuple[int, int] | None) -> None:
    now = QUEUED + age
    decided = POLICY.decide(_claim(attempts, ambiguous), result, now,
                            None if not_after is None else now + not_after)
    assert decided.delivery_id == 7
    assert decided.status == status
    assert decided.ambiguous is marked
    assert decided.code == result.code
    assert decided.reply == reply or (reply in decided.reply and decided.reply.startswith(
        result.reply))
    if wait is None:
        assert decided.next_attempt_at is None
    else:
        assert decided.next_attempt_at is not None
        waited = (decided.next_attempt_at - now).total_seconds()
        assert wait[0] <= waited <= wait[1]


def test_ambiguous_resends_are_bounded_by_the_setting() -> None:
    # With two resends allowed, a message with no reply is sent at most three times in all.
    policy = Policy(retry_base=60, retry_cap=1800, give_up=timedelta(hours=48),
                    unknown_resends=2)
    dropped = _result(Outcome.UNKNOWN, None, None, "dropped")
    now = QUEUED + H
    assert policy.decide(_claim(1), dropped, now, None).status == DeliveryStatus.RETRY
    assert policy.decide(_claim(2, True), dropped, now, None).status == DeliveryStatus.RETRY
    assert policy.decide(_claim(3, True), dropped, now, None).status == DeliveryStatus.UNKNOWN


def test_backoff_is_exponential_with_full_jitter_up_to_the_cap() -> None:
    # uniform(0, min(cap, base x 2^(n-1))): the same draws as Python's generator, seeded.
    saved = random.getstate()
    try:
        random.seed(20261207)
        waits = [POLICY.backoff(n) for n in (0, 1, 2, 3, 5, 6, 7, 20)]
    finally:
        random.setstate(saved)
    expected = random.Random(20261207)
    assert waits == [timedelta(seconds=expected.uniform(0, ceiling))
                     for ceiling in (60, 60, 120, 240, 960, 1800, 1800, 1800)]


def test_the_policy_comes_from_the_settings(settings: Settings) -> None:
    custom = settings.model_copy(update={"retry_base_seconds": 5, "retry_cap_seconds": 70,
                                         "retry_give_up_hours": 3, "unknown_resends": 4})
    assert Policy.from_settings(custom) == Policy(retry_base=5, retry_cap=70,
                                                  give_up=timedelta(hours=3), unknown_resends=4)


# ---------------------------------------------------------------- the worker, over real SMTP

@pytest.fixture
def sessions(engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _people(sessions: sessionmaker[Session], rules: Rules, emails: list[str]) -> None:
    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    with sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [(store.profile_from(rules, email=e, region="kent"),
                                          topics) for e in emails], ctx)
        s.commit()


def _edition(sessions: sessionmaker[Session], settings: Settings) -> int:
    with sessions() as s:
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        outbox.enqueue(s, edition)
        s.commit()
        return edition.id


def _settings(settings: Settings, server: FaultServer, **kw: object) -> Settings:
    return settings.model_copy(update={"smtp_url": type(settings.smtp_url)(server.url()),
                                       "rate_per_minute": 0, "rate_per_day": 0, **kw})


def _sent_times(sessions: sessionmaker[Session], edition_id: int) -> list[datetime]:
    with sessions() as s:
        return sorted(t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in s.scalars(
            select(Delivery.sent_at).where(Delivery.edition_id == edition_id,
                                           Delivery.status == DeliveryStatus.SENT)))


def _drain_on_a_clock(settings: Settings, sessions: sessionmaker[Session], start: datetime,
                      step: timedelta, give_up_after: timedelta) -> None:
    """Drain with a clock that moves on `step` at every look; a worker still waiting once the
    clock passes `give_up_after` is stopped, so a broken limit fails the test, not the run."""
    now = [start]
    worker: list[Worker] = []

    def clock() -> datetime:
        now[0] += step
        if now[0] - start > give_up_after:
            worker[0].stopping.set()
        return now[0]

    worker.append(Worker(settings, sessions, poll=0.01, clock=clock,
                         policy=Policy(retry_base=0.01, retry_cap=0.05,
                                       give_up=timedelta(days=30), unknown_resends=1)))
    asyncio.run(worker[0].run(drain=True))


def test_the_minute_window_is_one_minute(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    # Three a minute: seven messages take three minutes, never more in any minute, and the
    # worker does not wait longer than the window asks.
    server = make_fault_server()
    _people(sessions, rules, [f"min{i}@kent.police.uk" for i in range(7)])
    edition_id = _edition(sessions, settings)
    start = datetime.now(UTC).replace(microsecond=0)
    _drain_on_a_clock(_settings(settings, server, rate_per_minute=3), sessions, start,
                      timedelta(seconds=1), timedelta(minutes=30))
    times = _sent_times(sessions, edition_id)
    assert len(times) == 7 and server.handler.accepted() == 7
    for i, t in enumerate(times):
        assert len([u for u in times[i:] if u < t + timedelta(minutes=1)]) <= 3
    assert times[-1] - times[0] < timedelta(minutes=3)  # results take a few looks to land


def test_the_daily_window_is_a_rolling_24_hours(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    # Four a day, and two of this send went out 23 h 59 min ago: two more go now, the last
    # two once those are a day old.
    server = make_fault_server()
    start = datetime.now(UTC).replace(microsecond=0)
    _people(sessions, rules, [f"day{i}@kent.police.uk" for i in range(6)])
    edition_id = _edition(sessions, settings)
    with sessions() as s:
        first_two = list(s.scalars(select(Delivery.id).where(Delivery.edition_id == edition_id)
                                   .order_by(Delivery.id).limit(2)))
        s.execute(update(Delivery).where(Delivery.id.in_(first_two)).values(
            status=DeliveryStatus.SENT, last_attempt_at=start - timedelta(hours=23, minutes=59)))
        s.commit()
    _drain_on_a_clock(_settings(settings, server, rate_per_day=4), sessions, start,
                      timedelta(seconds=2), timedelta(hours=2))
    with sessions() as s:
        times = sorted(t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in s.scalars(
            select(Delivery.last_attempt_at).where(Delivery.edition_id == edition_id,
                                                   Delivery.id.not_in(first_two))))
    assert len(times) == 4 and server.handler.accepted() == 4
    assert len([t for t in times if t < start + timedelta(minutes=1)]) == 2
    assert times[-1] < start + timedelta(minutes=3)


def test_a_throttling_relay_stops_the_whole_worker_for_its_pause(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    # The relay takes two a minute and answers 421 4.7.0 to the third: the worker, which has
    # no limit of its own here, holds every message back for the pause, not just that one.
    now = [datetime.now(UTC)]
    server = make_fault_server(throttle_per_minute=2, clock=lambda: now[0].timestamp())
    _people(sessions, rules, [f"thr{i}@kent.police.uk" for i in range(12)])
    edition_id = _edition(sessions, settings)
    start = now[0]
    worker: list[Worker] = []

    def clock() -> datetime:
        now[0] += timedelta(seconds=1)
        if now[0] - start > timedelta(hours=1):
            worker[0].stopping.set()
        return now[0]

    worker.append(Worker(_settings(settings, server, smtp_connections=1), sessions, poll=0.01,
                         batch=1, clock=clock,
                         policy=Policy(retry_base=0.01, retry_cap=0.05,
                                       give_up=timedelta(days=1), unknown_resends=1,
                                       throttle_pause=60)))
    asyncio.run(worker[0].run(drain=True))
    with sessions() as s:
        rows = s.execute(select(Delivery.status, Delivery.last_attempt_at,
                                Delivery.next_attempt_at)
                         .where(Delivery.edition_id == edition_id)).all()
    sent = [r for r in rows if r.status == DeliveryStatus.SENT]
    waiting = [r for r in rows if r.status == DeliveryStatus.RETRY]
    assert len(sent) + len(waiting) == 12 and server.handler.accepted() == len(sent) >= 2
    # After a refusal the whole worker waits the pause out: at most the messages already on
    # their way are refused with it (a worker that ignored it would meet a refusal for every
    # queued message, minute after minute).
    assert 1 <= server.handler.throttled <= len(sent)
    assert all(r.next_attempt_at - r.last_attempt_at >= timedelta(seconds=60) for r in waiting)


def _statuses(sessions: sessionmaker[Session], edition_id: int) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(Delivery.status).where(Delivery.edition_id == edition_id)))


def test_pause_stops_every_worker_at_its_next_claim(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    _people(sessions, rules, [f"pause{i}@kent.police.uk" for i in range(6)])
    edition_id = _edition(sessions, settings)
    lease = timedelta(minutes=5)
    with sessions() as s:  # one worker is mid-send with two rows when the pause comes
        held = outbox.claim_due(s, "first", 2, lease)
        s.commit()
    assert len(held) == 2
    with sessions() as s:
        outbox.set_status(s, s.get(Edition, edition_id), EditionStatus.PAUSED, "checking a link")
        s.commit()
    with sessions() as s:  # neither that worker nor another takes anything more
        assert outbox.claim_due(s, "first", 10, lease) == []
        assert outbox.claim_due(s, "second", 10, lease) == []
        # not even the rows whose holder died: a pause holds them too
        assert outbox.claim_due(s, "second", 10, lease,
                                now=datetime.now(UTC) + timedelta(hours=1)) == []
        s.commit()
    conf = _settings(settings, server)
    for name in ("a", "b"):
        asyncio.run(Worker(conf, sessions, name=name, poll=0.01).run(drain=True))
    assert server.handler.accepted() == 0
    with sessions() as s:  # the held rows' results still land; nothing else moved
        assert outbox.record(s, "first", [outbox.Result(c.delivery_id, DeliveryStatus.SENT)
                                          for c in held]) == 2
        s.commit()
    assert sorted(_statuses(sessions, edition_id)) == ["queued"] * 4 + ["sent"] * 2
    with sessions() as s:
        outbox.set_status(s, s.get(Edition, edition_id), EditionStatus.SENDING)
        s.commit()
    asyncio.run(Worker(conf, sessions, poll=0.01).run(drain=True))
    assert server.handler.accepted() == 4
    assert sorted(_statuses(sessions, edition_id)) == ["sent"] * 6


def test_a_worker_whose_lease_ran_out_cannot_overwrite_its_successors_result(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules, ["lease@kent.police.uk"])
    edition_id = _edition(sessions, settings)
    start = datetime.now(UTC)
    with sessions() as s:
        (first,) = outbox.claim_due(s, "slow", 5, timedelta(seconds=30), now=start)
        # The slow worker got as far as its final dot (D4: a takeover before the dot is
        # certainly no duplicate; test_a_takeover_before_the_final_dot_is_no_duplicate).
        outbox.mark_dotted(s, "slow", [first.delivery_id], start)
        s.commit()
    later = start + timedelta(seconds=31)
    with sessions() as s:  # the lease ran out: another worker takes the row over
        (second,) = outbox.claim_due(s, "fast", 5, timedelta(seconds=30), now=later)
        s.commit()
    assert second.delivery_id == first.delivery_id and second.ambiguous
    with sessions() as s:
        assert outbox.record(s, "fast", [outbox.Result(second.delivery_id, DeliveryStatus.SENT,
                                                       250, "250 ok", ambiguous=True)],
                             now=later) == 1
        s.commit()
    with sessions() as s:  # the first holder's late answer changes nothing
        assert outbox.record(s, "slow", [outbox.Result(first.delivery_id, DeliveryStatus.FAILED,
                                                       554, "554 late")]) == 0
        s.commit()
    with sessions() as s:
        row = s.get(Delivery, first.delivery_id)
        assert (row.status, row.worker, row.last_reply, row.ambiguous) == (
            DeliveryStatus.SENT, "fast", "250 ok", True)
        assert row.edition_id == edition_id


def test_a_takeover_before_the_final_dot_is_no_duplicate(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    """D4: a row whose worker died before committing `dot_at` reached nobody: resent, it is
    "resent after a crash" but not "may have been sent twice"; once dotted, it is both."""
    _people(sessions, rules, ["a@kent.police.uk", "b@kent.police.uk"])
    edition_id = _edition(sessions, settings)
    start = datetime.now(UTC)
    with sessions() as s:
        undotted, dotted = outbox.claim_due(s, "dead", 5, timedelta(seconds=30), now=start)
        outbox.mark_dotted(s, "dead", [dotted.delivery_id], start)
        outbox.mark_dotted(s, "someone-else", [undotted.delivery_id], start)  # not its holder
        s.commit()
    later = start + timedelta(seconds=31)
    with sessions() as s:
        claims = {c.delivery_id: c for c in
                  outbox.claim_due(s, "next", 5, timedelta(seconds=30), now=later)}
        s.commit()
    assert not claims[undotted.delivery_id].ambiguous and claims[dotted.delivery_id].ambiguous
    with sessions() as s:
        outbox.record(s, "next", [outbox.Result(c.delivery_id, DeliveryStatus.SENT, 250, "ok",
                                                ambiguous=c.ambiguous)
                                  for c in claims.values()], now=later)
        s.commit()
        rows = {d.id: d for d in s.scalars(select(Delivery))}
        figures = outbox.progress(s, s.get(Edition, edition_id))
    assert rows[undotted.delivery_id].taken_over and rows[dotted.delivery_id].taken_over
    assert rows[undotted.delivery_id].dot_at is None  # the new attempt starts without a dot
    assert (figures.once, figures.ambiguous, figures.taken_over) == (1, 1, 2)


def test_a_late_result_cannot_reopen_a_closed_row(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules, ["closed@kent.police.uk", "cancelled@kent.police.uk"])
    edition_id = _edition(sessions, settings)
    with sessions() as s:
        claims = outbox.claim_due(s, "w", 5, timedelta(minutes=5))
        s.commit()
    assert len(claims) == 2
    done, other = claims
    with sessions() as s:
        assert outbox.record(s, "w", [outbox.Result(done.delivery_id, DeliveryStatus.SENT,
                                                    250, "250 ok")]) == 1
        s.commit()
    with sessions() as s:  # the same result again, or a retry after it: the row stays sent
        assert outbox.record(s, "w", [
            outbox.Result(done.delivery_id, DeliveryStatus.RETRY, 451, "451 again",
                          next_attempt_at=datetime.now(UTC)),
            outbox.Result(done.delivery_id, DeliveryStatus.FAILED, 554, "554 no")]) == 0
        s.commit()
    with sessions() as s:  # a row someone closed (here: given back unsent) is not reopened
        s.execute(update(Delivery).where(Delivery.id == other.delivery_id)
                  .values(status=DeliveryStatus.SKIPPED, last_reply="cancelled"))
        s.commit()
    with sessions() as s:
        assert outbox.record(s, "w", [outbox.Result(other.delivery_id, DeliveryStatus.SENT,
                                                    250, "250 ok")]) == 0
        s.commit()
    with sessions() as s:
        rows = {r.id: (r.status, r.last_reply) for r in s.scalars(
            select(Delivery).where(Delivery.edition_id == edition_id))}
    assert rows == {done.delivery_id: (DeliveryStatus.SENT, "250 ok"),
                    other.delivery_id: (DeliveryStatus.SKIPPED, "cancelled")}


def test_resending_the_failures_takes_only_the_failed_unless_asked(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    # A message that may have arrived (unknown) is resent only on request: resending it with
    # the failures could deliver it twice.
    _people(sessions, rules, [f"rs{i}@kent.police.uk" for i in range(4)])
    edition_id = _edition(sessions, settings)
    with sessions() as s:
        ids = list(s.scalars(select(Delivery.id).where(Delivery.edition_id == edition_id)
                             .order_by(Delivery.id)))
        for delivery_id, status in zip(ids, ("sent", "failed", "unknown", "bounced"),
                                       strict=True):
            s.execute(update(Delivery).where(Delivery.id == delivery_id)
                      .values(status=status, attempts=3))
        edition = s.get(Edition, edition_id)
        edition.status = EditionStatus.SENT
        s.commit()
    with sessions() as s:
        edition = s.get(Edition, edition_id)
        assert outbox.requeue_failed(s, edition) == 1
        assert edition.status == EditionStatus.SENDING and edition.finished_at is None
        s.commit()
    with sessions() as s:
        rows = {r.id: (r.status, r.attempts) for r in s.scalars(
            select(Delivery).where(Delivery.edition_id == edition_id))}
        assert [rows[i] for i in ids] == [("sent", 3), ("queued", 0), ("unknown", 3),
                                          ("bounced", 3)]
        assert outbox.requeue_failed(s, s.get(Edition, edition_id)) == 0
        assert outbox.requeue_failed(s, s.get(Edition, edition_id), include_unknown=True) == 1
        s.commit()
    with sessions() as s:
        assert [s.get(Delivery, i).status for i in ids] == ["sent", "queued", "queued",
                                                            "bounced"]


def test_pause_resume_and_cancel_move_only_as_allowed(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    # Cancel closes every row still waiting ("cancelled"), leaves the finished ones and other
    # editions alone, and is final; pause and resume only toggle a send in progress.
    _people(sessions, rules, [f"cx{i}@kent.police.uk" for i in range(4)])
    edition_id = _edition(sessions, settings)
    with sessions() as s:
        first, second = outbox.claim_due(s, "w", 2, timedelta(minutes=5))
        outbox.record(s, "w", [outbox.Result(first.delivery_id, DeliveryStatus.SENT, 250, "ok")])
        s.execute(update(Edition).where(Edition.id == edition_id).values(slug="first"))
        s.commit()
    other = _edition(sessions, settings)  # another send, under way at the same time
    with sessions() as s:
        edition = s.get(Edition, edition_id)
        assert outbox.set_status(s, edition, EditionStatus.SENDING) is False  # already sending
        assert outbox.set_status(s, edition, EditionStatus.PAUSED, "a wrong date") is True
        assert edition.paused_reason == "a wrong date"
        assert outbox.set_status(s, edition, EditionStatus.PAUSED, "again") is False
        assert edition.paused_reason == "a wrong date"
        assert outbox.set_status(s, edition, EditionStatus.SENDING) is True
        assert edition.paused_reason is None
        assert edition.finished_at is None
        assert outbox.set_status(s, edition, EditionStatus.CANCELLED) is True
        assert edition.status == EditionStatus.CANCELLED and edition.finished_at is not None
        assert outbox.set_status(s, edition, EditionStatus.CANCELLED) is False
        for status in (EditionStatus.SENDING, EditionStatus.PAUSED):
            with pytest.raises(outbox.EditionConflict, match="is cancelled; cannot make it"):
                outbox.set_status(s, edition, status)
        s.commit()
    with sessions() as s:
        rows = {r.id: (r.status, r.last_reply) for r in s.scalars(
            select(Delivery).where(Delivery.edition_id == edition_id))}
    assert rows.pop(first.delivery_id) == (DeliveryStatus.SENT, "ok")
    # the row a worker holds is left to its result; every waiting row is closed
    assert rows.pop(second.delivery_id)[0] == DeliveryStatus.SENDING
    assert set(rows.values()) == {(DeliveryStatus.SKIPPED, "cancelled")} and len(rows) == 2
    assert _statuses(sessions, other) == ["queued"] * 4


def _second_edition(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Another send of the sample at the same time (the first keeps the sample's slug under
    another name, as the pause test does)."""
    with sessions() as s:
        s.execute(update(Edition).where(Edition.slug == SAMPLE.stem).values(slug="first"))
        s.commit()
    return _edition(sessions, settings)


def test_a_send_paused_before_it_started_resumes_as_scheduled_and_cancel_says_why(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    """A restore pauses sends that were only scheduled: resuming one puts it back on the
    schedule, not out at once. A cancelled row says so in its reason; a reason is kept only
    on a pause."""
    _people(sessions, rules, ["pr1@kent.police.uk"])
    edition_id = _edition(sessions, settings)
    later = datetime(2030, 1, 7, 9, 0, tzinfo=UTC)
    with sessions() as s:
        edition = s.get(Edition, edition_id)
        assert edition is not None
        edition.started_at, edition.scheduled_for = None, later
        edition.status = EditionStatus.PAUSED
        assert outbox.set_status(s, edition, EditionStatus.SENDING) is True
        assert (edition.status, edition.paused_reason) == (EditionStatus.SCHEDULED, None)
        edition.status, edition.started_at = EditionStatus.PAUSED, later  # had started
        assert outbox.set_status(s, edition, EditionStatus.SENDING) is True
        assert edition.status == EditionStatus.SENDING
        assert outbox.set_status(s, edition, EditionStatus.CANCELLED, "a wrong date") is True
        assert edition.paused_reason is None
        s.commit()
    with sessions() as s:
        assert {(r.status, r.reason) for r in s.scalars(
            select(Delivery).where(Delivery.edition_id == edition_id))} == {
            (DeliveryStatus.SKIPPED, "cancelled")}


def test_a_halt_pauses_only_that_send_only_while_it_is_sending_once(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules, ["ht1@kent.police.uk"])
    halted, other = _edition(sessions, settings), _second_edition(sessions, settings)
    reason = "halted: the relay refused us (535 5.7.8 authentication failed) " + "x" * 600
    with sessions() as s:
        assert outbox.halt(s, halted, reason) is True
        assert outbox.halt(s, halted, reason) is False  # a second session saw it too
        s.commit()
    with sessions() as s:
        first, second = s.get(Edition, halted), s.get(Edition, other)
        assert first is not None and second is not None
        assert (first.status, first.paused_reason) == (EditionStatus.PAUSED, reason[:500])
        assert second.status == EditionStatus.SENDING  # another send goes on
        second.status = EditionStatus.CANCELLED
        s.commit()
        assert outbox.halt(s, other, "late") is False  # not sending: left as it is
        assert s.get(Edition, other).status == EditionStatus.CANCELLED


def test_resending_the_failures_starts_them_afresh_and_leaves_other_sends_alone(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules, ["rf1@kent.police.uk"])
    first, other = _edition(sessions, settings), _second_edition(sessions, settings)
    later = datetime(2031, 1, 1, tzinfo=UTC)
    with sessions() as s:
        s.execute(update(Delivery).values(status=DeliveryStatus.FAILED, attempts=5,
                                          next_attempt_at=later, reason="gave_up"))
        s.execute(update(Edition).values(status=EditionStatus.SENT))
        s.commit()
    now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    with sessions() as s, time_machine.travel(now, tick=False):
        assert outbox.requeue_failed(s, s.get(Edition, first)) == 1
        s.commit()
    with sessions() as s:
        row = s.scalar(select(Delivery).where(Delivery.edition_id == first))
        assert (row.status, row.attempts, row.next_attempt_at, row.reason) == (
            DeliveryStatus.QUEUED, 0, now, None)
        untouched = s.scalar(select(Delivery).where(Delivery.edition_id == other))
        assert (untouched.status, untouched.next_attempt_at) == (DeliveryStatus.FAILED, later)
        edition = s.get(Edition, other)
        assert outbox.requeue_failed(s, edition, include_unknown=True) == 1
        assert edition.status == EditionStatus.SENDING
        edition.status = EditionStatus.SENT
        assert outbox.requeue_failed(s, edition) == 0  # nothing to resend: the send stays sent
        assert edition.status == EditionStatus.SENT
