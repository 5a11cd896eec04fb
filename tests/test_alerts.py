"""Alerts to the co-ordinators: recorded once where they happen, mailed once to the right people,
and tried again (only for those who did not get it) when a mail fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mailer import alerts, outbox
from mailer.accounts import add_user
from mailer.alerts import CoordinatorAlert
from mailer.config import Settings
from mailer.models import Edition
from mailer.worker import Policy, Worker
from subscribers import store
from subscribers.db import session_factory, utcnow
from subscribers.models import Channel
from subscribers.rules import Rules
from tests.smtp_servers import FaultServer, make_fault_server  # noqa: F401

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
PASSWORD = "correct horse battery staple 42"


def _sessions(engine) -> sessionmaker[Session]:  # type: ignore[no-untyped-def]
    return session_factory(engine)


def _with_sink(settings: Settings, server: FaultServer) -> Settings:
    return settings.model_copy(update={"smtp_url": type(settings.smtp_url)(server.url()),
                                       "rate_per_minute": 0, "rate_per_day": 0})


def _team(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        for login, role, regions, email in [
                ("ada", "admin", [], "ada@kent.police.uk"),
                ("ken", "coordinator", ["kent"], "ken@kent.police.uk"),
                ("ess", "coordinator", ["essex"], "ess@essex.police.uk"),
                ("vic", "viewer", ["kent"], "vic@kent.police.uk"),
                ("nomail", "admin", [], None)]:
            add_user(s, login=login, display_name=login.title(), role=role, password=PASSWORD,
                     regions=regions, known_regions=["kent", "essex"], email=email)
        add_user(s, login="gone", display_name="Gone", role="admin", password=PASSWORD,
                 email="gone@kent.police.uk").disabled = True
        s.commit()


def test_a_halt_is_alerted_once_and_mailed_to_the_admins_and_that_regions_coordinators(
        engine, settings: Settings, rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    sessions = _sessions(engine)
    _team(sessions)
    with sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [(store.profile_from(
            rules, email=f"p{i}@kent.police.uk", region="kent"), topics) for i in range(10)],
            store.Context(channel=Channel.IMPORT, lawful_basis="public_task"))
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        outbox.enqueue(s, edition)
        s.execute(update(Edition).values(regions=["kent"]))
        s.commit()
    refusing = make_fault_server(mail_reply="550 5.7.515 Access denied, sending domain fails DMARC")
    worker = Worker(_with_sink(settings, refusing), sessions, poll=0.05, policy=Policy(
        retry_base=0.01, retry_cap=0.02, give_up=timedelta(hours=1), unknown_resends=1))
    asyncio.run(worker.run(drain=True))
    assert worker.summary.halted

    with sessions() as s:
        [alert] = s.scalars(select(CoordinatorAlert)).all()
        assert alert.kind == "halt" and alert.regions == ["kent"] and alert.mailed_at is None
        assert "mailer edition resume" in alert.message
        assert "(550 5.7.515 Access denied" in alert.message  # the reply once, code first
        assert alert.message.count("5.7.515") == 1

    sink = make_fault_server()
    mailing = _with_sink(settings, sink)
    assert alerts.mail_pending(sessions, mailing) == 1
    got = {rcpt: sink.handler.messages(rcpt) for rcpt in (
        "ada@kent.police.uk", "ken@kent.police.uk", "ess@essex.police.uk",
        "vic@kent.police.uk", "gone@kent.police.uk")}
    assert {rcpt: len(m) for rcpt, m in got.items()} == {
        "ada@kent.police.uk": 1, "ken@kent.police.uk": 1, "ess@essex.police.uk": 0,
        "vic@kent.police.uk": 0, "gone@kent.police.uk": 0}
    mail = message_from_bytes(got["ken@kent.police.uk"][0], policy=policy.default)
    assert "has stopped" in mail["Subject"] and mail["Auto-Submitted"] == "auto-generated"
    assert "5.7.515" in mail.get_content() and "UK time" in mail.get_content()
    assert alerts.mail_pending(sessions, mailing) == 0  # told once
    assert sink.handler.accepted() == 2


def _admins_ada_and_busy_bea(s: Session) -> None:
    # The fault server answers "mailbox-busy" with 450: a mail that can be tried again.
    for login, email in (("ada", "ada@kent.police.uk"), ("bea", "mailbox-busy@kent.police.uk")):
        add_user(s, login=login, display_name=login, role="admin", password=PASSWORD,
                 email=email)


def test_a_mail_that_fails_is_tried_again_only_for_those_who_did_not_get_it(
        engine, settings: Settings, make_fault_server: Callable[..., FaultServer]) -> None:
    sessions = _sessions(engine)
    with sessions() as s:
        _admins_ada_and_busy_bea(s)
        assert alerts.raise_alert(s, "missed:1", "missed-reminder", "A reminder was missed",
                                  "The reminder for Anti-Slavery Day could not go out in time.")
        s.commit()
    sink = make_fault_server()  # "mailbox-busy" answers 450: a mail that can be tried again
    assert alerts.mail_pending(sessions, _with_sink(settings, sink)) == 0
    with sessions() as s:
        alert = s.scalars(select(CoordinatorAlert)).one()
        assert alert.mailed_to == ["ada@kent.police.uk"] and alert.mailed_at is None
        assert "450" in (alert.last_error or "")
        s.execute(update(alerts.User).where(alerts.User.login == "bea")
                  .values(email="bea@kent.police.uk"))
        s.commit()
    assert alerts.mail_pending(sessions, _with_sink(settings, sink)) == 1
    assert len(sink.handler.messages("ada@kent.police.uk")) == 1  # not twice
    assert len(sink.handler.messages("bea@kent.police.uk")) == 1


def test_an_alert_whose_missing_reader_left_is_done_with_those_who_had_it(
        engine, settings: Settings, make_fault_server: Callable[..., FaultServer]) -> None:
    sessions = _sessions(engine)
    with sessions() as s:
        _admins_ada_and_busy_bea(s)
        alerts.raise_alert(s, "halt:9", "halt", "Sending stopped", "The relay refused us.")
        s.commit()
    sink = make_fault_server()
    assert alerts.mail_pending(sessions, _with_sink(settings, sink)) == 0  # bea's mailbox is busy
    with sessions() as s:
        s.execute(update(alerts.User).where(alerts.User.login == "bea").values(disabled=True))
        s.commit()
    assert alerts.mail_pending(sessions, _with_sink(settings, sink)) == 1  # ada has it: done
    with sessions() as s:
        alert = s.scalars(select(CoordinatorAlert)).one()
        assert alert.mailed_at is not None and alert.last_error is None
    assert sink.handler.accepted() == 1


def test_an_alert_is_recorded_once_per_key_and_one_nobody_can_be_sent_stays_listed(
        engine, settings: Settings, make_fault_server: Callable[..., FaultServer]) -> None:
    sessions = _sessions(engine)
    with sessions() as s:
        assert alerts.raise_alert(s, "nudge:2027-01", "quarterly-nudge", "No edition approved",
                                  "No edition is approved for January.", now=utcnow())
        assert not alerts.raise_alert(s, "nudge:2027-01", "quarterly-nudge", "again", "again")
        s.commit()
    sink = make_fault_server()
    nobody = _with_sink(settings, sink).model_copy(update={"contact_address": ""})
    assert alerts.mail_pending(sessions, nobody) == 0  # no account has an address
    with sessions() as s:
        [alert] = alerts.recent(s)
        assert alert.subject == "No edition approved" and alert.attempts == 1
        assert "no admin or co-ordinator account has an email address" in (
            alert.last_error or "")
    later = utcnow() + alerts.MAIL_FOR + timedelta(minutes=1)
    assert alerts.mail_pending(sessions, _with_sink(settings, sink), now=later) == 0
    with sessions() as s:
        assert alerts.recent(s)[0].attempts == 1  # past its time: listed, no longer tried
    assert sink.handler.accepted() == 0


def test_with_no_account_to_tell_the_contact_address_is_told(
        engine, settings: Settings, make_fault_server: Callable[..., FaultServer]) -> None:
    sessions = _sessions(engine)
    with sessions() as s:
        alerts.raise_alert(s, "halt:1", "halt", "Sending stopped", "The relay refused us.")
        s.commit()
    sink = make_fault_server()
    shared = _with_sink(settings, sink).model_copy(
        update={"contact_address": "msht@kent.police.uk"})
    assert alerts.mail_pending(sessions, shared) == 1
    assert len(sink.handler.messages("msht@kent.police.uk")) == 1
