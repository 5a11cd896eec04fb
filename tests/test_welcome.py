"""The welcome mail and the declined notice, end to end on SQLite and PostgreSQL: the reader
confirms on the web page (or a co-ordinator approves or turns down the sign-up), the outbox
holds exactly one mail per sign-up, and the worker delivers it to a real SMTP server on
loopback, with the List-Unsubscribe headers and the dates as `.ics` files."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from email.message import EmailMessage
from pathlib import Path

import icalendar
import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from mailer import events, outbox, welcome
from mailer.cli import run
from mailer.config import Settings
from mailer.events import Event, EventSpec
from mailer.links import tokens_for
from mailer.models import Delivery, DeliveryReason, DeliveryStatus, Edition, EditionKind
from mailer.operations import command_line_caller, readers
from mailer.operations import subscribers as subscriber_ops
from mailer.web.app import create_app
from mailer.worker import Summary, Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel, Subscriber, SubscriberStatus
from subscribers.store import Context
from subscribers.tokens import Purpose
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    BASE,
    csrf_of,
    fault_server,
    links_in,
    mails_to,
    make_fault_server,
    make_settings,
    sink,
    subscribe,
    subscriber_by_email,
    text_of,
)

POLICE = "sam.tester@kent.police.uk"
CHARITY = "helper@charity.example.org"
# A Thursday in October, late evening in London (BST, UTC+1): the reader's "today" is still
# the 15th, so a date on the 16th is upcoming and one on the 15th is today.
AT = dt.datetime(2026, 10, 15, 22, 30, tzinfo=dt.UTC)
WEB = Context(channel=Channel.WEB)
HTTPS = "https://bulletin.example.org"


@pytest.fixture
def web_settings(settings: Settings, sink: FaultServer, tmp_path: Path) -> Settings:
    # The archive holds the sample (summer 2020) issue, as the web tests' archive does.
    return make_settings(sink, tmp_path)


@pytest.fixture
def sessions(engine) -> sessionmaker[Session]:  # type: ignore[no-untyped-def]
    factory = session_factory(engine)
    with factory() as s:  # the migration's default dates: replaced by the test's own
        s.execute(delete(Event))
        for spec in (
            EventSpec(name="Anti-Slavery Day", starts_on=dt.date(2010, 10, 18), yearly=True,
                      description="Talks & <b>stalls</b> in every county",
                      link="https://www.antislaverycommissioner.co.uk/"),
            EventSpec(name="Operation Aidant week", starts_on=dt.date(2026, 11, 16),
                      ends_on=dt.date(2026, 11, 20)),
            EventSpec(name="International Day for the Abolition of Slavery",
                      starts_on=dt.date(2000, 12, 2), yearly=True),
            EventSpec(name="Gone already", starts_on=dt.date(2026, 10, 14)),
            EventSpec(name="Next spring", starts_on=dt.date(2027, 3, 1)),
        ):
            events.add_event(s, spec)
        s.commit()
    return factory


def _drain(settings: Settings, sessions: sessionmaker[Session]) -> Summary:
    # The worker refuses a plain-http unsubscribe link (RFC 8058), so its links are the
    # deployment's https ones; the test client's pages stay on http://testserver.
    sending = settings.model_copy(update={"base_url": HTTPS})
    return asyncio.run(Worker(sending, sessions, poll=0.05,
                              clock=lambda: AT + dt.timedelta(minutes=1)).run(drain=True))


def _confirm(client: TestClient, sink: FaultServer, email: str, times: int = 1) -> None:
    subscribe(client, email, topics=["newsletter", "reminders"])
    (mail,) = mails_to(sink, email)
    link = next(u for u in links_in(mail) if "/confirm/" in u)
    token = csrf_of(client.get(link).text)
    for _ in range(times):
        page = client.post(link, data={"csrf_token": token})
        assert page.status_code == 200
        assert "welcome email" in page.text or "co-ordinator will check" in page.text


def _personal(sessions: sessionmaker[Session], kind: EditionKind) -> list[tuple[int, str]]:
    with sessions() as s:
        return [tuple(r) for r in s.execute(  # type: ignore[misc]
            select(Delivery.subscriber_id, Delivery.status).join(Edition)
            .where(Edition.kind == kind).order_by(Delivery.id))]


def _parts(msg: EmailMessage) -> tuple[str, str, list[EmailMessage]]:
    html = msg.get_body(("html",))
    assert html is not None
    return text_of(msg), html.get_content(), [p for p in msg.iter_attachments()]


def _mails(sink: FaultServer, rcpt: str) -> list[EmailMessage]:
    return mails_to(sink, rcpt)


def test_a_double_click_on_confirm_queues_one_welcome_and_the_worker_delivers_it(
        web_settings: Settings, sessions: sessionmaker[Session], sink: FaultServer) -> None:
    with time_machine.travel(AT), TestClient(create_app(web_settings), base_url=BASE) as client:
        _confirm(client, sink, POLICE, times=2)
    sub = subscriber_by_email(sessions.kw["bind"], POLICE)
    assert sub is not None and sub.status == SubscriberStatus.ACTIVE
    assert _personal(sessions, EditionKind.WELCOME) == [(sub.id, DeliveryStatus.QUEUED)]

    summary = _drain(web_settings, sessions)
    assert summary.sent == 1
    _confirmation, mail = _mails(sink, POLICE)
    assert mail["Subject"] == "Welcome: you are now subscribed"
    assert _personal(sessions, EditionKind.WELCOME) == [(sub.id, DeliveryStatus.SENT)]

    # How to leave: the headers every list mail carries, and a link that leaves everything.
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["List-Id"] is not None
    unsubscribe = next(u for u in links_in(mail) if "/u/" in u)
    assert unsubscribe in mail["List-Unsubscribe"]
    claims = tokens_for(web_settings).read(Purpose.UNSUBSCRIBE, unsubscribe.rsplit("/", 1)[1])
    assert (claims.subscriber_id, claims.topic_id) == (sub.id, None)

    text, html, attachments = _parts(mail)
    for part in (" ".join(text.split()), " ".join(html.split())):  # lines wrapped anywhere
        assert "Quarterly newsletter" in part and "sent each quarter" in part
        assert "Event reminders" in part and "two weeks" in part
        # The latest issue in the public archive: the sample 2020 issue placed there.
        assert f"{BASE}/archive/2020-q3-kent-essex" in part
        # The next three dates from the reader's today in London, soonest first.
        days = [part.index(d) for d in ("Sunday 18 October 2026",
                                        "Monday 16 November 2026 to Friday 20 November 2026",
                                        "Wednesday 2 December 2026")]
        assert days == sorted(days)
        assert "Gone already" not in part and "Next spring" not in part
    assert "Talks &amp; &lt;b&gt;stalls&lt;/b&gt;" in html and "<b>stalls" not in html
    assert "Talks & <b>stalls</b>" in text
    assert "<img" not in html  # nothing to count opens with
    assert "Thank you for confirming" in text

    names = [a.get_filename() for a in attachments]
    assert names == ["anti-slavery-day-2026-10-18.ics", "operation-aidant-week-2026-11-16.ics",
                     "international-day-for-the-abolition-of-slavery-2026-12-02.ics"]
    cal = icalendar.Calendar.from_ical(attachments[1].get_payload(decode=True))
    (vevent,) = cal.walk("VEVENT")
    assert str(vevent["summary"]) == "Operation Aidant week"
    assert vevent.decoded("dtstart") == dt.date(2026, 11, 16)
    assert vevent.decoded("dtend") == dt.date(2026, 11, 21)  # exclusive
    assert attachments[1].get_content_type() == "text/calendar"

    # Confirming again later, and the worker running again, send nothing more.
    assert _drain(web_settings, sessions).sent == 0
    assert len(_mails(sink, POLICE)) == 2


def test_approval_run_twice_welcomes_once_and_a_refusal_is_told_kindly(
        web_settings: Settings, sessions: sessionmaker[Session], sink: FaultServer) -> None:
    other = "volunteer@ngo.example.org"
    with time_machine.travel(AT), TestClient(create_app(web_settings), base_url=BASE) as client:
        _confirm(client, sink, CHARITY)
        _confirm(client, sink, other)
        assert _personal(sessions, EditionKind.WELCOME) == []  # waiting for a co-ordinator
        caller = command_line_caller()
        with sessions() as s:
            helper = store.find_by_email(s, web_settings.rules(), CHARITY)
            volunteer = store.find_by_email(s, web_settings.rules(), other)
            assert helper is not None and volunteer is not None
            ids = helper.id, volunteer.id
        for _ in range(2):
            with sessions() as s:
                subscriber_ops.decide(s, caller, web_settings, ids[0], approve=True)
                subscriber_ops.decide(s, caller, web_settings, ids[1], approve=False)
                s.commit()
    assert _personal(sessions, EditionKind.WELCOME) == [(ids[0], DeliveryStatus.QUEUED)]
    assert _personal(sessions, EditionKind.DECLINED) == [(ids[1], DeliveryStatus.QUEUED)]

    assert _drain(web_settings, sessions).sent == 2
    _confirmation, welcomed = _mails(sink, CHARITY)
    text, _html, attachments = _parts(welcomed)
    assert "A co-ordinator has approved your sign-up" in text and len(attachments) == 3
    _confirmation, told = _mails(sink, other)
    assert told["Subject"] == "About your sign-up"
    text, html, attachments = _parts(told)
    for part in (text, html):
        assert "has not been able to approve it" in " ".join(part.split())
    assert web_settings.contact_address in text and attachments == []
    assert told["List-Unsubscribe"] is not None
    # The co-ordinators' lists of sends are not filled with one-person mails.
    with sessions() as s:
        assert outbox.list_editions(s) == [] and outbox.recent_sends(s) == []


def test_no_welcome_for_someone_who_left_before_it_was_sent(
        web_settings: Settings, sessions: sessionmaker[Session], sink: FaultServer) -> None:
    with time_machine.travel(AT), TestClient(create_app(web_settings), base_url=BASE) as client:
        _confirm(client, sink, POLICE)
        with sessions() as s:
            sub = store.find_by_email(s, web_settings.rules(), POLICE)
            assert sub is not None
            readers.unsubscribe(s, sub.id, None, WEB)
            s.commit()
    assert _drain(web_settings, sessions).sent == 0
    assert len(_mails(sink, POLICE)) == 1  # the confirmation only
    with sessions() as s:
        row = s.scalar(select(Delivery).join(Edition).where(Edition.kind == EditionKind.WELCOME))
        assert row is not None and row.status == DeliveryStatus.SKIPPED
        assert row.reason == DeliveryReason.SUPPRESSED


def test_a_declined_notice_is_not_sent_to_someone_who_signed_up_again(
        web_settings: Settings, sessions: sessionmaker[Session], sink: FaultServer) -> None:
    with time_machine.travel(AT), TestClient(create_app(web_settings), base_url=BASE) as client:
        _confirm(client, sink, CHARITY)
        with sessions() as s:
            sub = store.find_by_email(s, web_settings.rules(), CHARITY)
            assert sub is not None
            subscriber_ops.decide(s, command_line_caller(), web_settings, sub.id, approve=False)
            s.commit()
        subscribe(client, CHARITY)  # pending again before the worker came round
    assert _drain(web_settings, sessions).sent == 0
    assert _personal(sessions, EditionKind.DECLINED) == [(sub.id, DeliveryStatus.SKIPPED)]


def test_a_reader_who_leaves_and_signs_up_again_is_welcomed_again(
        web_settings: Settings, sessions: sessionmaker[Session], sink: FaultServer) -> None:
    rules = web_settings.rules()
    with time_machine.travel(AT), sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        sub, _ = store.subscribe(s, rules, store.profile_from(rules, email=POLICE), topics, WEB)
        readers.confirm(s, web_settings, rules, sub.id, WEB)
        readers.confirm(s, web_settings, rules, sub.id, WEB)
        store.unsubscribe(s, sub, WEB)
        store.subscribe(s, rules, store.profile_from(rules, email=POLICE), topics, WEB)
        readers.confirm(s, web_settings, rules, sub.id, WEB)
        s.commit()
    with sessions() as s:
        slugs = s.scalars(select(Edition.slug).where(Edition.kind == EditionKind.WELCOME)
                          .order_by(Edition.id)).all()
    assert len(slugs) == 2 and len(set(slugs)) == 2  # one for each sign-up


def test_no_dates_and_no_issue_yet_still_make_a_welcome(
        settings: Settings, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    quiet = settings.model_copy(update={"archive_dir": tmp_path / "empty-archive"})
    rules = quiet.rules()
    with time_machine.travel(AT), sessions() as s:
        s.execute(delete(Event))
        sub, _ = store.subscribe(s, rules, store.profile_from(rules, email=POLICE),
                                 store.topics_by_slug(s, ["newsletter"]), WEB)
        readers.confirm(s, quiet, rules, sub.id, WEB)
        edition = s.scalar(select(Edition).where(Edition.kind == EditionKind.WELCOME))
        assert edition is not None
        text = edition.compiled["text"]
        assert "The first issue is still to come" in text
        assert "No dates are in the calendar yet." in text
        assert "Event reminders" not in text and edition.compiled["attachments"] == []


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_confirmations_racing_make_one_welcome(
        web_settings: Settings, sessions: sessionmaker[Session]) -> None:
    rules = web_settings.rules()
    with sessions() as s:
        sub, _ = store.subscribe(s, rules, store.profile_from(rules, email=POLICE),
                                 store.topics_by_slug(s, ["newsletter"]), WEB)
        s.commit()
        sid = sub.id
    ready = threading.Barrier(2)
    errors: list[BaseException] = []

    def press() -> None:
        try:
            with sessions() as s:
                s.get(Subscriber, sid)  # both read it as pending before either writes
                ready.wait(timeout=30)
                readers.confirm(s, web_settings, rules, sid, WEB)
                s.commit()
        except BaseException as exc:
            errors.append(exc)

    with time_machine.travel(AT):
        threads = [threading.Thread(target=press) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    assert len(_personal(sessions, EditionKind.WELCOME)) == 1


def test_queueing_again_for_the_same_sign_up_adds_nothing(
        settings: Settings, sessions: sessionmaker[Session]) -> None:
    rules = settings.rules()
    with time_machine.travel(AT), sessions() as s:
        sub, _ = store.subscribe(s, rules, store.profile_from(rules, email=POLICE),
                                 store.topics_by_slug(s, ["newsletter"]), WEB)
        store.confirm(s, rules, sub, WEB)
        assert welcome.queue_welcome(s, settings, sub) is not None
        assert welcome.queue_welcome(s, settings, sub) is None
        assert s.scalar(select(func.count()).select_from(Delivery)) == 1


def test_the_command_line_approves_and_turns_down_with_one_mail_each(
        settings: Settings, sessions: sessionmaker[Session]) -> None:
    rules = settings.rules()
    with time_machine.travel(AT), sessions() as s:
        for email in (CHARITY, "volunteer@ngo.example.org"):
            sub, _ = store.subscribe(s, rules, store.profile_from(rules, email=email),
                                     store.topics_by_slug(s, ["newsletter"]), WEB)
            readers.confirm(s, settings, rules, sub.id, WEB)
        s.commit()
    with time_machine.travel(AT):
        assert run(["subscribers", "approve", CHARITY]) == 0
        assert run(["subscribers", "approve", CHARITY]) == 1  # nothing to do
        assert run(["subscribers", "approve", "--reject", "volunteer@ngo.example.org"]) == 0
        assert run(["subscribers", "approve", "--reject", "volunteer@ngo.example.org"]) == 1
    assert len(_personal(sessions, EditionKind.WELCOME)) == 1
    assert len(_personal(sessions, EditionKind.DECLINED)) == 1
