"""The outbox and the worker over real SMTP on loopback, on SQLite and PostgreSQL.

Every recipient of every edition gets one row and ends in exactly one known state; nobody
gets two copies unless their row says it may have happened.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from mailer import outbox
from mailer.config import Settings
from mailer.models import FINAL, Delivery, DeliveryStatus, Edition, EditionStatus
from mailer.smtp import SmtpPool
from mailer.worker import Policy, Worker, WorkerBusy, sqlite_lock_path
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel, Subscriber, SubscriberStatus
from subscribers.rules import Rules
from tests.smtp_servers import FaultServer, RandomFaults, make_fault_server  # noqa: F401

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
FAST = Policy(retry_base=0.01, retry_cap=0.05, give_up=timedelta(hours=1), unknown_resends=1,
              throttle_pause=0.05)


@pytest.fixture
def sessions(engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _people(sessions: sessionmaker[Session], rules: Rules, emails: list[str]) -> None:
    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    with sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        profiles = [(store.profile_from(rules, email=e, name=f"Reader {i}", region="kent"),
                     topics) for i, e in enumerate(emails)]
        store.bulk_add_active(s, rules, profiles, ctx)
        s.commit()


def _edition(sessions: sessionmaker[Session], settings: Settings, enqueue: bool = True) -> int:
    with sessions() as s:
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        if enqueue:
            outbox.enqueue(s, edition)
        s.commit()
        return edition.id


def _settings(settings: Settings, server: FaultServer, **kw: object) -> Settings:
    return settings.model_copy(update={"smtp_url": type(settings.smtp_url)(server.url()),
                                       "rate_per_minute": 0, "rate_per_day": 0, **kw})


def _drain(settings: Settings, sessions: sessionmaker[Session], **kw: object) -> Worker:
    worker = Worker(settings, sessions, policy=kw.pop("policy", FAST), poll=0.05, **kw)
    asyncio.run(worker.run(drain=True))
    return worker


def _statuses(sessions: sessionmaker[Session], edition_id: int) -> dict[str, int]:
    with sessions() as s:
        return dict(s.execute(select(Delivery.status, func.count())
                              .where(Delivery.edition_id == edition_id)
                              .group_by(Delivery.status)).all())


def test_enqueue_is_one_set_and_a_second_enqueue_adds_nobody(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules, [f"r{i}@kent.police.uk" for i in range(40)])
    with sessions() as s:
        edition, created = outbox.store_edition_file(s, settings, SAMPLE, "a")
        again, created_again = outbox.store_edition_file(s, settings, SAMPLE, "b")
        assert created and not created_again and again.id == edition.id
        assert outbox.enqueue(s, edition) == 40
        assert edition.status == EditionStatus.SENDING
        assert outbox.enqueue(s, edition) == 0
        s.commit()
    _people(sessions, rules, ["late@kent.police.uk"])
    with sessions() as s:
        assert outbox.enqueue(s, outbox.get_edition(s, "2020-q3-kent-essex")) == 1
        assert s.scalar(select(func.count()).select_from(Delivery)) == 41


def test_every_recipient_gets_one_personal_copy(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    emails = [f"reader{i}@kent.police.uk" for i in range(60)]
    _people(sessions, rules, emails)
    edition_id = _edition(sessions, settings)
    worker = _drain(_settings(settings, server, smtp_connections=3), sessions)

    assert worker.summary.sent == 60
    assert _statuses(sessions, edition_id) == {"sent": 60}
    assert all(server.handler.copies(e) == 1 for e in emails)
    message = email.message_from_bytes(server.handler.messages(emails[7])[0],
                                        policy=email.policy.default)
    assert message["To"].endswith("<reader7@kent.police.uk>")
    assert message["List-Unsubscribe"].startswith(f"<{settings.base_url}/u/")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Reader 7" in message.get_body(("plain",)).get_content()
    with sessions() as s:
        assert s.get(Edition, edition_id).status == EditionStatus.SENT


def test_results_share_commits_and_the_rows_held_never_exceed_the_capacity(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer], monkeypatch: pytest.MonkeyPatch) -> None:
    # A commit costs far more than a row: 600 results must not take 600 commits. Every
    # commit is also a moment to count what this worker holds as `sending`.
    server = make_fault_server()
    emails = [f"batch{i}@kent.police.uk" for i in range(600)]
    _people(sessions, rules, emails)
    edition_id = _edition(sessions, settings)
    written: list[int] = []
    held: list[int] = []
    real_record = outbox.record

    def counting(session: Session, worker: str, results: object, now: object = None) -> int:
        held.append(session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.status == DeliveryStatus.SENDING)) or 0)
        written.append(len(results))  # type: ignore[arg-type]
        return real_record(session, worker, results, now)  # type: ignore[arg-type]

    monkeypatch.setattr(outbox, "record", counting)
    # A long linger: commits come from the count (a quarter of the capacity), whatever the speed.
    worker = _drain(_settings(settings, server, smtp_connections=4), sessions, batch=80,
                    linger=30.0)
    assert worker.summary.sent == 600 and sum(written) == 600
    assert len(written) <= 600 // 15, written  # 20 results a commit, not one
    assert max(held) <= 80  # capacity = max(2 x 4 connections, batch)
    assert _statuses(sessions, edition_id) == {"sent": 600}


def test_a_row_whose_lease_ran_out_while_it_waited_is_handed_back_not_sent(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    # Another worker may hold it by now (two workers on PostgreSQL each sent one such row
    # when a loaded machine kept claimed rows waiting past a 5 s lease).
    server = make_fault_server()
    emails = [f"lapse{i}@kent.police.uk" for i in range(3)]
    _people(sessions, rules, emails)
    edition_id = _edition(sessions, settings)
    conf = _settings(settings, server, lease_seconds=60)
    late = [datetime.now(UTC)]
    worker = Worker(conf, sessions, name="slow", clock=lambda: late[0])
    with sessions() as s:
        claims = worker._claim(s, 10)
        s.commit()
    assert len(claims) == 3
    late[0] += timedelta(seconds=59)  # a second of lease left, less than a transaction needs

    async def send_all() -> list[tuple[outbox.Claim, object]]:
        async with SmtpPool(server.url(), size=1) as pool:
            return [await worker._send(pool, claim) for claim in claims]
    done = asyncio.run(send_all())
    asyncio.run(worker._record(done))  # type: ignore[arg-type]
    worker._db.shutdown()
    assert server.handler.accepted() == 0
    with sessions() as s:
        rows = s.execute(select(Delivery.status, Delivery.worker, Delivery.lease_until)
                         .where(Delivery.edition_id == edition_id)).all()
    assert {r.status for r in rows} == {DeliveryStatus.QUEUED} and {r.lease_until for r in rows} \
        == {None}


def test_a_thousand_recipients_through_faults_each_end_in_one_final_state(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    schedule = RandomFaults(seed=20261201)
    server = make_fault_server(schedule=schedule, stall_seconds=0.6, keywords=False)
    emails = [f"responder{i}@kent.police.uk" for i in range(1000)]
    _people(sessions, rules, emails)
    edition_id = _edition(sessions, settings)
    _drain(_settings(settings, server, smtp_connections=8), sessions, data_timeout=0.3)

    with sessions() as s:
        rows = s.execute(select(Delivery.status, Delivery.ambiguous, Delivery.subscriber_id)
                         .where(Delivery.edition_id == edition_id)).all()
        addresses = dict(s.execute(select(store.Subscriber.id, store.Subscriber.email)).all())
    assert len(rows) == 1000
    assert {r.status for r in rows} <= {s.value for s in FINAL}
    counts = _statuses(sessions, edition_id)
    assert sum(counts.get(k, 0) for k in ("sent", "bounced", "failed", "unknown")) == 1000
    planned = {e: schedule.planned(e) for e in emails}
    assert counts.get("bounced", 0) == sum(
        1 for p in planned.values() if p in ("gone", "no-such-user", "relay-denied"))
    duplicates = [r for r in rows if server.handler.copies(addresses[r.subscriber_id]) > 1]
    assert duplicates, "the schedule includes drops after the final dot: expect resends"
    assert all(r.ambiguous for r in duplicates)  # every second copy is on the record
    never = [r for r in rows if r.status == "sent"
             and server.handler.copies(addresses[r.subscriber_id]) == 0]
    assert never == []
    with sessions() as s:  # bounced at SMTP time: the subscriber is marked and suppressed
        bounced = [addresses[r.subscriber_id] for r in rows if r.status == "bounced"]
        assert all(store.get_by_email(s, rules, e).status == SubscriberStatus.BOUNCED
                   for e in bounced[:5])


def test_unsubscribing_between_enqueue_and_send_means_no_message(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    _people(sessions, rules, ["stay@kent.police.uk", "leave@kent.police.uk"])
    edition_id = _edition(sessions, settings)
    with sessions() as s:
        store.unsubscribe(s, store.get_by_email(s, rules, "leave@kent.police.uk"),
                          store.Context(channel=Channel.ONE_CLICK))
        s.commit()
    _drain(_settings(settings, server), sessions)
    assert server.handler.copies("leave@kent.police.uk") == 0
    assert server.handler.copies("stay@kent.police.uk") == 1
    assert _statuses(sessions, edition_id) == {"sent": 1, "skipped": 1}


def test_a_policy_refusal_halts_the_send_and_leaves_subscribers_alone(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server(mail_reply="550 5.7.515 Access denied, sending domain fails DMARC")
    _people(sessions, rules, [f"p{i}@kent.police.uk" for i in range(20)])
    edition_id = _edition(sessions, settings)
    worker = _drain(_settings(settings, server, smtp_connections=2), sessions)
    assert worker.summary.halted and "5.7.515" in worker.summary.halted[0]
    with sessions() as s:
        edition = s.get(Edition, edition_id)
        assert edition.status == EditionStatus.PAUSED and "5.7.515" in edition.paused_reason
        assert store.counts(s).by_status == {"active": 20}
    assert set(_statuses(sessions, edition_id)) == {"queued"}
    assert server.handler.accepted() == 0
    with sessions() as s:  # the relay's reply as it gave it, not with its code doubled
        assert set(s.scalars(select(Delivery.last_reply).where(
            Delivery.edition_id == edition_id))) == {
            "550 5.7.515 Access denied, sending domain fails DMARC"}


def test_the_rate_limit_holds_in_every_minute(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    _people(sessions, rules, [f"rl{i}@kent.police.uk" for i in range(25)])
    edition_id = _edition(sessions, settings)
    start = datetime.now(UTC)
    ticks = iter(range(1_000_000))

    def clock() -> datetime:  # every look at the clock moves it on two seconds
        return start + timedelta(seconds=2 * next(ticks))

    _drain(_settings(settings, server, rate_per_minute=7), sessions, clock=clock)
    with sessions() as s:
        times = sorted(s.scalars(select(Delivery.last_attempt_at)
                                 .where(Delivery.edition_id == edition_id)))
    assert len(times) == 25 and server.handler.accepted() == 25
    for i, t in enumerate(times):
        in_window = [u for u in times[i:] if u < t + timedelta(minutes=1)]
        assert len(in_window) <= 7


def test_a_drain_waits_for_a_row_another_worker_holds_and_takes_it_over_when_it_dies(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    # A worker killed just after its claim committed holds rows under a lease: a drain that
    # left them `sending` once nothing else was queued lost them (seen under kill -9).
    server = make_fault_server()
    _people(sessions, rules, ["held@kent.police.uk", "free@kent.police.uk"])
    edition_id = _edition(sessions, settings)
    with sessions() as s:
        s.execute(update(Delivery).where(
            Delivery.edition_id == edition_id,
            Delivery.subscriber_id == select(Subscriber.id).where(
                Subscriber.email == "held@kent.police.uk").scalar_subquery())
            .values(status=DeliveryStatus.SENDING, worker="ghost", attempts=1,
                    lease_until=datetime.now(UTC) + timedelta(seconds=1)))
        s.commit()
    _drain(_settings(settings, server), sessions)
    assert _statuses(sessions, edition_id) == {"sent": 2}
    assert server.handler.copies("held@kent.police.uk") == 1


def test_a_throttling_relay_never_has_to_throttle_a_worker_held_to_its_rate(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    # The relay counts 7 a minute on the worker's own clock, which moves on two seconds at
    # every look, sends included: a rate counted from each claim alone ran a batch into the
    # previous one's minute here, as it would into Microsoft 365's.
    now = [datetime.now(UTC)]

    def clock() -> datetime:
        now[0] += timedelta(seconds=2)
        return now[0]

    server = make_fault_server(throttle_per_minute=7, clock=lambda: now[0].timestamp())
    _people(sessions, rules, [f"tr{i}@kent.police.uk" for i in range(25)])
    edition_id = _edition(sessions, settings)
    _drain(_settings(settings, server, rate_per_minute=7), sessions, clock=clock)
    assert server.handler.accepted() == 25 and server.handler.throttled == 0
    assert _statuses(sessions, edition_id) == {"sent": 25}


@pytest.mark.parametrize("backend", ["sqlite"])  # PostgreSQL workers share the outbox
def test_one_worker_per_sqlite_file(settings: Settings, sessions: sessionmaker[Session],
                                    backend: str) -> None:
    lock = sqlite_lock_path(settings.database)
    assert lock is not None
    from filelock import FileLock

    with FileLock(str(lock)), pytest.raises(WorkerBusy, match="another worker"):
        asyncio.run(Worker(settings, sessions).run(drain=True))
