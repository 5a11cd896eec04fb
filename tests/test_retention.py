"""Retention (issue 17): the scheduler's purge, moved past each period with time-machine, and
`mailer privacy report`'s figures, on SQLite and PostgreSQL.

The timeline starts in 2016: the database refuses to delete audit entries less than a year old
by its own clock (migration 0012), which time-machine does not move, so the story is told
years before any wall clock this suite will run under.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from mailer import audit, retention, schedule
from mailer.audit import AuditEntry
from mailer.bounce_policy import Decision, InboundRecord
from mailer.config import Settings, load_settings
from mailer.errors import ConfigError
from mailer.models import Delivery, DeliveryStatus
from mailer.outbox import store_edition_file
from mailer.retention import Periods, months_after
from subscribers import store
from subscribers.db import session_factory, session_scope
from subscribers.errors import AddressSuppressed
from subscribers.models import (
    Channel,
    ConsentEvent,
    Subscriber,
    SubscriberStatus,
    Subscription,
    Suppression,
)
from subscribers.rules import Rules
from tests.web_fixtures import (  # noqa: F401
    SAMPLE,
    client,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

T0 = datetime(2016, 1, 4, 10, 0, tzinfo=UTC)
WEB = store.Context(channel=Channel.WEB, consent_version="2016-01")
IMPORT = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def clock() -> Iterator[Any]:
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


def _profile(rules: Rules, email: str) -> store.Profile:
    return store.profile_from(rules, email=email, name=email.split("@")[0], region="kent")


def _signup(session: Session, rules: Rules, email: str) -> int:
    topics = store.topics_by_slug(session, ["newsletter"])
    subscriber, _ = store.subscribe(session, rules, _profile(rules, email), topics, WEB)
    return subscriber.id


def _active(session: Session, rules: Rules, email: str) -> int:
    topics = store.topics_by_slug(session, ["newsletter"])
    return store.add_active(session, rules, _profile(rules, email), topics, IMPORT).id


def _inbound(session: Session, body: bytes) -> int:
    record = InboundRecord(origin="test", size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                           raw=body, kind="hard", reason="5.1.1", detector="test",
                           decision=Decision.SUPPRESSED.value, rcpt_tos=[])
    session.add(record)
    session.flush()
    return record.id


def _rows(sessions: sessionmaker[Session]) -> dict[int, tuple[str, str | None]]:
    with sessions() as session:
        return {r.id: (r.status, r.email) for r in session.scalars(select(Subscriber))}


def _purge(sessions: sessionmaker[Session], settings: Settings) -> retention.Purged:
    # batch=2: the tests' handfuls of rows still go through several batches
    return retention.purge(sessions, Periods.from_settings(settings), batch=2)


def test_each_period_removes_what_it_names_and_nothing_else(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, clock: Any) -> None:
    with session_scope(sessions) as s:
        never = _signup(s, rules, "never@kent.police.uk")
        active = _active(s, rules, "stays@kent.police.uk")
        left = _active(s, rules, "left@kent.police.uk")
        bounced = _active(s, rules, "bounced@kent.police.uk")
        store.unsubscribe(s, s.get(Subscriber, left), WEB)  # type: ignore[arg-type]
        edition, _ = store_edition_file(s, settings, SAMPLE, "author")
        for sid, reply in ((active, "250 2.0.0 queued as stays@kent.police.uk"),
                           (left, "250 2.0.0 ok")):
            s.add(Delivery(edition_id=edition.id, subscriber_id=sid, status=DeliveryStatus.SENT,
                           attempts=1, last_attempt_at=T0, sent_at=T0, last_code=250,
                           last_reply=reply))
        raw_id = _inbound(s, b"From: mailer-daemon\r\n\r\n<bounced@kent.police.uk>: 5.1.1")
        audit.record(s, actor="root", action="login.ok")
    clock.move_to(T0 + timedelta(days=20))
    with session_scope(sessions) as s:
        recent = _signup(s, rules, "recent@kent.police.uk")

    # ---- 31 days on: the first unconfirmed sign-up is deleted whole, nothing else moves
    clock.move_to(T0 + timedelta(days=31))
    first = _purge(sessions, settings)
    assert first.counts() == {"unconfirmed_deleted": 1, "left_erased": 0, "replies_cleared": 0,
                              "bounce_raw_cleared": 0, "bounce_records_deleted": 0,
                              "bounce_alerts_deleted": 0, "reader_replies_deleted": 0,
                              "audit_deleted": 0}
    assert _rows(sessions) == {
        active: ("active", "stays@kent.police.uk"), left: ("unsubscribed", "left@kent.police.uk"),
        bounced: ("active", "bounced@kent.police.uk"),
        recent: ("pending", "recent@kent.police.uk")}
    with sessions() as s:
        for table in (ConsentEvent, Subscription):
            assert not s.scalar(select(func.count()).select_from(table)
                                .where(table.subscriber_id == never))
        # it never joined: no hash kept, so a co-ordinator may still add it on a lawful basis
        assert not store.is_suppressed(s, rules, "never@kent.police.uk")
    # the same run again finds nothing; and the scheduler's daily run is not due yet
    assert sum(_purge(sessions, settings).counts().values()) == 0
    assert retention.run_due(sessions, Periods.from_settings(settings)) is None
    clock.move_to(T0 + timedelta(days=60))
    with session_scope(sessions) as s:
        store.mark_bounced(s, s.get(Subscriber, bounced), WEB)  # type: ignore[arg-type]

    # ---- three months and a day: relay replies and raw bounce bodies go, the rows stay
    clock.move_to(months_after(T0, 3) + timedelta(days=1))
    done = _purge(sessions, settings)
    assert (done.unconfirmed_deleted, done.replies_cleared, done.bounce_raw_cleared) == (1, 2, 1)
    with sessions() as s:
        deliveries = s.execute(select(Delivery.subscriber_id, Delivery.status,
                                      Delivery.last_code, Delivery.last_reply)
                               .order_by(Delivery.subscriber_id)).all()
        assert [tuple(d) for d in deliveries] == [(active, "sent", 250, None),
                                                  (left, "sent", 250, None)]
        record = s.get(InboundRecord, raw_id)
        assert record is not None and record.raw is None and record.decision == "suppressed"
    assert recent not in _rows(sessions)

    # ---- a year and a day: who unsubscribed at T0 is erased to the keyed hash
    clock.move_to(months_after(T0, 12) + timedelta(days=1))
    done = _purge(sessions, settings)
    assert done.left_erased == 1
    assert _rows(sessions) == {active: ("active", "stays@kent.police.uk"),
                               left: ("erased", None),
                               bounced: ("bounced", "bounced@kent.police.uk")}
    with session_scope(sessions) as s:
        assert store.is_suppressed(s, rules, "left@kent.police.uk")
        with pytest.raises(AddressSuppressed):
            _active(s, rules, "left@kent.police.uk")
        assert s.scalar(select(func.count()).select_from(Delivery)) == 2  # the counts stay

    # ---- 14 months: the bounced address (it left at T0 + 60 days) goes; bounce records too
    clock.move_to(months_after(T0, 14) + timedelta(days=1))
    done = _purge(sessions, settings)
    assert (done.left_erased, done.bounce_records_deleted) == (1, 1)
    assert _rows(sessions) == {active: ("active", "stays@kent.police.uk"),
                               left: ("erased", None), bounced: ("erased", None)}
    with sessions() as s:
        assert store.is_suppressed(s, rules, "bounced@kent.police.uk")
        assert s.scalar(select(func.count()).select_from(Suppression)) == 2

    # ---- six years and a day: the audit entries of the first day go, later ones stay
    with sessions() as s:
        before = [(e.id, e.action) for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert before[0][1] == "login.ok" and len(before) == 6  # with five purge runs'
    clock.move_to(months_after(T0, 72) + timedelta(days=1))
    done = _purge(sessions, settings)
    assert done.audit_deleted == 1
    with sessions() as s:
        after = [(e.id, e.action) for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
        last = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
    assert after == [*before[1:], (after[-1][0], "retention.purge")]
    assert last is not None and last.actor == "scheduler" and last.detail is not None
    assert last.detail["audit_deleted"] == 1 and last.detail["left_erased"] == 0


def test_a_returning_sign_up_never_confirmed_is_erased_not_deleted(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, clock: Any) -> None:
    with session_scope(sessions) as s:
        sid = _active(s, rules, "back@kent.police.uk")
        store.unsubscribe(s, s.get(Subscriber, sid), WEB)  # type: ignore[arg-type]
        _signup(s, rules, "back@kent.police.uk")  # asks to come back, never confirms
    clock.move_to(T0 + timedelta(days=40))
    assert _purge(sessions, settings).unconfirmed_deleted == 0
    assert _rows(sessions) == {sid: ("pending", "back@kent.police.uk")}
    clock.move_to(months_after(T0, 12) + timedelta(days=1))
    assert _purge(sessions, settings).left_erased == 1
    assert _rows(sessions) == {sid: ("erased", None)}
    with sessions() as s:
        assert store.is_suppressed(s, rules, "back@kent.police.uk")


def test_asking_again_restarts_an_unconfirmed_sign_up_s_wait(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, clock: Any) -> None:
    with session_scope(sessions) as s:
        sid = _signup(s, rules, "slow@kent.police.uk")
    clock.move_to(T0 + timedelta(days=25))
    with session_scope(sessions) as s:
        _signup(s, rules, "slow@kent.police.uk")  # a new link, the same details
    clock.move_to(T0 + timedelta(days=40))
    assert _purge(sessions, settings).unconfirmed_deleted == 0
    clock.move_to(T0 + timedelta(days=56))
    assert _purge(sessions, settings).unconfirmed_deleted == 1
    assert sid not in _rows(sessions)


class HeldLock:
    """A leader lock the test takes away (`held = False`) to end the scheduler's leadership."""

    def __init__(self) -> None:
        self.held = True

    def acquire(self) -> bool:
        return True

    def check(self) -> bool:
        return self.held

    def release(self) -> None:
        pass


def test_the_scheduler_s_pass_purges_once_a_day_and_only_while_it_leads(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, clock: Any) -> None:
    with session_scope(sessions) as s:
        _signup(s, rules, "gone@kent.police.uk")
    lock = HeldLock()
    reports: list[schedule.CatchUp] = []
    scheduler = schedule.Scheduler(settings, sessions, lock=lock, on_pass=reports.append)
    clock.move_to(T0 + timedelta(days=31))
    scheduler._pass()
    scheduler._pass()  # five minutes later: not due again
    assert [r.purged and r.purged.unconfirmed_deleted for r in reports] == [1, None]
    with session_scope(sessions) as s:
        _signup(s, rules, "later@kent.police.uk")
    clock.move_to(T0 + timedelta(days=70))
    lock.held = False  # no longer the leader: the pass does nothing
    scheduler._pass()
    assert len(reports) == 2
    lock.held = True
    scheduler._pass()
    assert reports[-1].purged is not None and reports[-1].purged.unconfirmed_deleted == 1
    with sessions() as s:
        runs = s.scalar(select(func.count()).select_from(AuditEntry)
                        .where(AuditEntry.action == retention.ACTION))
    assert runs == 2


def test_a_purge_stops_between_batches_when_the_lock_goes(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, clock: Any) -> None:
    with session_scope(sessions) as s:
        for n in range(5):
            _signup(s, rules, f"p{n}@kent.police.uk")
    clock.move_to(T0 + timedelta(days=31))
    answers = iter([True, False])
    done = retention.purge(sessions, Periods.from_settings(settings), batch=2,
                           keep_going=lambda: next(answers, False))
    assert (done.unconfirmed_deleted, done.complete) == (2, False)
    assert len(_rows(sessions)) == 3
    assert _purge(sessions, settings).unconfirmed_deleted == 3


@pytest.mark.parametrize("name", ["retention_unconfirmed_days", "retention_left_months",
                                  "retention_replies_months", "retention_audit_years"])
@pytest.mark.parametrize("value", [0, -1])
def test_a_retention_period_of_zero_or_less_is_refused(
        name: str, value: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"MAILER_{name.upper()}", str(value))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"{name}: Value error, a retention period must be 1 or more" in str(info.value)
    assert "zero or less would delete every record of its kind" in str(info.value)


def test_the_defaults() -> None:
    p = Periods.from_settings(load_settings())
    assert (p.unconfirmed_days, p.left_months, p.replies_months, p.audit_years) == (30, 12, 3, 6)
    assert (p.bounces.raw_retention.days, p.bounces.record_retention.days) == (90, 400)


def test_months_are_calendar_months() -> None:
    assert retention.months_before(datetime(2027, 3, 31, tzinfo=UTC), 1) == datetime(
        2027, 2, 28, tzinfo=UTC)
    assert months_after(datetime(2028, 2, 29, tzinfo=UTC), 12) == datetime(2029, 2, 28,
                                                                            tzinfo=UTC)


# ---------------------------------------------------------------- mailer privacy report

def _count(session: Session, sql: str, **params: str) -> int:
    return int(session.execute(text(sql), params).scalar() or 0)


def test_privacy_report_figures_are_the_tables_counts(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, clock: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    summer = datetime(2016, 7, 1, 9, 0, tzinfo=UTC)  # 10:00 BST
    clock.move_to(summer)
    with session_scope(sessions) as s:
        audit.record(s, actor="root", action="login.ok")
        for n in range(3):
            _signup(s, rules, f"p{n}@essex.police.uk")
        ids = [_active(s, rules, f"a{n}@kent.police.uk") for n in range(4)]
        store.unsubscribe(s, s.get(Subscriber, ids[0]), WEB)  # type: ignore[arg-type]
        store.mark_complained(s, s.get(Subscriber, ids[1]), WEB)  # type: ignore[arg-type]
        edition, _ = store_edition_file(s, settings, SAMPLE, "author")
        for sid in ids[2:]:
            s.add(Delivery(edition_id=edition.id, subscriber_id=sid, status=DeliveryStatus.SENT,
                           attempts=1, last_attempt_at=summer, last_reply="250 ok"))
        _inbound(s, b"a bounce")
    clock.move_to(summer + timedelta(days=10))
    assert run(["privacy", "report", "--json"]) == 0
    figures = {row["key"]: row for row in json.loads(capsys.readouterr().out)}
    with sessions() as s:
        expected = {
            f"subscribers.{status.value}": _count(
                s, "SELECT count(*) FROM subscriber WHERE status = :status", status=status.value)
            for status in SubscriberStatus}
        expected |= {
            "unconfirmed": _count(s, "SELECT count(*) FROM subscriber WHERE status = 'pending' "
                                     "AND confirmed_at IS NULL"),
            "left": _count(s, "SELECT count(*) FROM subscriber WHERE status IN "
                              "('unsubscribed', 'bounced', 'complained')"),
            "deliveries": _count(s, "SELECT count(*) FROM delivery"),
            "replies": _count(s, "SELECT count(*) FROM delivery WHERE last_reply IS NOT NULL"),
            "bounces": _count(s, "SELECT count(*) FROM inbound_message"),
            "bounces.raw": _count(s, "SELECT count(*) FROM inbound_message "
                                     "WHERE raw IS NOT NULL"),
            "consent": _count(s, "SELECT count(*) FROM consent_event"),
            "suppression": _count(s, "SELECT count(*) FROM suppression"),
            "audit": _count(s, "SELECT count(*) FROM audit_entry"),
            "reader_replies": _count(s, "SELECT count(*) FROM reader_reply"),
        }
    assert {k: v["held"] for k, v in figures.items()} == expected
    assert (expected["unconfirmed"], expected["left"], expected["subscribers.active"],
            expected["replies"], expected["consent"], expected["audit"]) == (3, 2, 2, 2, 9, 1)
    assert figures["unconfirmed"]["next_purge"] == (summer + timedelta(days=30)).isoformat()
    assert figures["left"]["next_purge"] == months_after(summer, 12).isoformat()
    assert figures["replies"]["next_purge"] == months_after(summer, 3).isoformat()
    assert figures["audit"]["next_purge"] == months_after(summer, 72).isoformat()
    assert figures["bounces.raw"]["next_purge"] == (summer + timedelta(days=90)).isoformat()
    assert figures["subscribers.active"]["next_purge"] is None

    assert run(["privacy", "report"]) == 0
    table = capsys.readouterr().out
    cells = {}
    for line in table.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) == 7 and parts[2].isdigit():
            cells[parts[1]] = parts[2:5]
    assert cells["Audit entries"] == ["1", "Fri 01 Jul 2016 10:00 BST",
                                      "Fri 01 Jul 2022 10:00 BST"]
    assert cells["Unconfirmed sign-ups"][0] == "3"
    assert cells["People who left"][:2] == ["2", "Fri 01 Jul 2016 10:00 BST"]
    assert cells["Delivery rows"] == ["2", "Fri 01 Jul 2016 10:00 BST", "-"]
    assert cells["Consent events"][0] == "9"


# ---------------------------------------------------------------- the console's page

def test_the_console_s_privacy_page_shows_the_report_to_administrators_only(
        client: Any, engine: Engine, rules: Rules) -> None:
    from tests.test_admin_routes import REFUSED, login, make_user

    make_user(engine, "root", role="admin")
    make_user(engine, "kentco", regions=("kent",))
    with session_factory(engine)() as s:
        for n in range(2):
            _signup(s, rules, f"p{n}@kent.police.uk")
        s.commit()
    login(client, "kentco")
    refused = client.get("/admin/privacy")
    assert refused.status_code == 403 and REFUSED in refused.text
    assert "/admin/privacy" not in client.get("/admin").text  # no link to it either
    client.cookies.clear()
    login(client, "root")
    assert 'href="http://testserver/admin/privacy"' in client.get("/admin").text
    page = client.get("/admin/privacy")
    assert page.status_code == 200
    with session_factory(engine)() as s:
        entries = s.scalar(select(func.count()).select_from(AuditEntry))
    rows = dict(re.findall(r'<th scope="row">([^<]+)</th><td class="num">(\d+)</td>', page.text))
    assert rows["Unconfirmed sign-ups"] == "2"
    assert rows["Subscribers: waiting for confirmation"] == "2"
    assert rows["Audit entries"] == str(entries)
    assert len(rows) == len(SubscriberStatus) + 10
