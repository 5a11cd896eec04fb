"""The yearly reconfirmation (issue 17): "are you still working with MSHT?" mailed to a real SMTP
sink over loopback, answered on the recipient pages, lapsed with the clock moved by
time-machine, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from mailer import outbox, reconfirm, schedule
from mailer.config import Settings
from mailer.models import Delivery
from mailer.outbox import LONDON
from subscribers import store
from subscribers.db import session_factory, session_scope
from subscribers.models import Channel, ConsentEvent, Subscriber, SubscriberStatus
from subscribers.rules import Rules
from tests.smtp_servers import FaultServer
from tests.test_retention import HeldLock
from tests.web_fixtures import (  # noqa: F401
    HEADLESS_UA,
    client,
    csrf_of,
    fault_server,
    links_in,
    mails_to,
    make_fault_server,
    sink,
    snapshot,
    text_of,
    web_settings,
)

# A Monday morning, UK winter time; far from any clock change or the wall clock.
T0 = datetime(2024, 1, 8, 10, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
READER = "rowan.reader@kent.police.uk"
OTHER = "olive.other@essex.police.uk"
IMPORT = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")


@pytest.fixture
def clock() -> Iterator[Any]:
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _unspread(settings: Settings) -> Settings:
    # With a handful of readers the spread asks one a day; these tests want them all at once.
    return settings.model_copy(update={"reconfirm_spread_days": 1})


def _add(sessions: sessionmaker[Session], rules: Rules, email: str, region: str = "kent",
         organisation: str | None = "Kent Police") -> int:
    with session_scope(sessions) as s:
        profile = store.profile_from(rules, email=email, name="Rowan Reader",
                                     organisation=organisation, region=region)
        return store.add_active(s, rules, profile, store.topics_by_slug(s, ["newsletter"]),
                                IMPORT).id


def _status(sessions: sessionmaker[Session], sid: int) -> str:
    with sessions() as s:
        row = s.get(Subscriber, sid)
        assert row is not None
        return row.status


def _actions(sessions: sessionmaker[Session], sid: int) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(ConsentEvent.action).where(
            ConsentEvent.subscriber_id == sid).order_by(ConsentEvent.id)))


def _yes_link(sink: FaultServer, email: str, index: int = -1) -> str:
    mail = mails_to(sink, email)[index]
    return next(u for u in links_in(mail) if "/still-working/" in u)


def _edition_reaches(sessions: sessionmaker[Session], slug: str) -> set[int]:
    """Enqueue an edition to everyone on the newsletter; the readers it has a delivery for."""
    with session_scope(sessions) as s:
        edition, _ = outbox.store_edition(
            s, slug=slug, title=slug, subject=f"{slug}: the subject", topic="newsletter",
            regions=[], roles=[], source=slug, compiled={}, actor="tester")
        outbox.enqueue(s, edition)
        return set(s.scalars(select(Delivery.subscriber_id).where(
            Delivery.edition_id == edition.id)))


def test_the_request_is_mailed_once_a_cycle_and_a_scanner_s_get_changes_nothing(
        client: TestClient, web_settings: Settings, sessions: sessionmaker[Session],
        rules: Rules, sink: FaultServer, engine: Engine, clock: Any) -> None:
    sid = _add(sessions, rules, READER)
    clock.move_to(T0 + YEAR - timedelta(hours=1))
    assert reconfirm.run(web_settings, sessions).asked == 0  # not a year yet
    clock.move_to(T0 + YEAR + timedelta(hours=1))
    ran = reconfirm.run(web_settings, sessions)
    assert (ran.asked, ran.lapsed, ran.failed) == (1, 0, 0)
    clock.move_to(T0 + YEAR + timedelta(days=3))
    assert reconfirm.run(web_settings, sessions).asked == 0  # the same cycle: never twice
    assert sink.handler.copies(READER) == 1

    (mail,) = mails_to(sink, READER)
    assert mail["Subject"] == "Are you still working with MSHT at Kent Police?"
    assert mail["Auto-Submitted"] == "auto-generated"
    body = text_of(mail)
    answer_by = (T0 + YEAR + timedelta(hours=1, days=30)).astimezone(LONDON)
    assert f"by {answer_by.day} {answer_by:%B %Y}" in body.replace("\n", " ")
    assert any("/preferences/" in u for u in links_in(mail))
    html = mail.get_body(("html",))
    assert html is not None and "<img" not in html.get_content()  # no tracking pixel
    yes = _yes_link(sink, READER)

    before = snapshot(engine)
    page = client.get(yes, headers={"User-Agent": HEADLESS_UA})
    assert page.status_code == 200 and "Yes, keep sending" in page.text
    client.head(yes)
    assert snapshot(engine) == before  # link scanners open every URL: nothing happens
    refused = client.post(yes, data={})  # no CSRF token: refused, nothing changes
    assert refused.status_code == 403 and snapshot(engine) == before

    answered = client.post(yes, data={"csrf_token": csrf_of(page.text)})
    assert answered.status_code == 200 and "Thank you" in answered.text
    assert _status(sessions, sid) == SubscriberStatus.ACTIVE
    client.post(yes, data={"csrf_token": csrf_of(page.text)})  # pressed twice: one event
    assert _actions(sessions, sid) == ["import", "reconfirm_ask", "reconfirm"]

    clock.move_to(T0 + YEAR + timedelta(days=40))  # past the window: answered, so kept
    assert reconfirm.run(web_settings, sessions).lapsed == 0
    assert _status(sessions, sid) == SubscriberStatus.ACTIVE
    # The next cycle counts from the answer, and is asked once more.
    clock.move_to(T0 + YEAR + timedelta(days=3) + YEAR + timedelta(hours=1))
    assert reconfirm.run(web_settings, sessions).asked == 1
    assert reconfirm.run(web_settings, sessions).asked == 0
    assert sink.handler.copies(READER) == 2


def test_no_answer_lapses_on_the_day_after_the_window_and_a_later_yes_brings_them_back(
        client: TestClient, web_settings: Settings, sessions: sessionmaker[Session],
        rules: Rules, sink: FaultServer, clock: Any) -> None:
    web_settings = _unspread(web_settings)
    sid = _add(sessions, rules, READER)
    other = _add(sessions, rules, OTHER, region="essex", organisation="Essex Police")
    asked_at = T0 + YEAR + timedelta(hours=2)
    clock.move_to(asked_at)
    assert reconfirm.run(web_settings, sessions).asked == 2
    yes = _yes_link(sink, OTHER)
    page = client.get(yes)
    client.post(yes, data={"csrf_token": csrf_of(page.text)})  # the other reader answers

    clock.move_to(asked_at + timedelta(days=30) - timedelta(minutes=1))  # the window's end
    assert reconfirm.run(web_settings, sessions).lapsed == 0
    assert _status(sessions, sid) == SubscriberStatus.ACTIVE
    clock.move_to(asked_at + timedelta(days=31))  # the day after
    assert reconfirm.run(web_settings, sessions).lapsed == 1
    assert reconfirm.run(web_settings, sessions).lapsed == 0
    assert _status(sessions, sid) == SubscriberStatus.LAPSED
    assert _actions(sessions, sid) == ["import", "reconfirm_ask", "lapse"]
    with sessions() as s:
        counts = store.reconfirm_counts(s, asked_at + timedelta(days=31), YEAR)
    assert (counts.due, counts.asked, counts.answered, counts.lapsed) == (0, 0, 1, 1)

    assert _edition_reaches(sessions, "winter-bulletin") == {other}  # no edition for them
    with sessions() as s:
        assert not store.is_sendable(s, sid, "newsletter")
    assert sink.handler.copies(READER) == 1  # and no second request either

    clock.move_to(asked_at + timedelta(days=75))  # they answer late, with the same link
    page = client.get(_yes_link(sink, READER))
    answered = client.post(_yes_link(sink, READER), data={"csrf_token": csrf_of(page.text)})
    assert answered.status_code == 200 and "Thank you" in answered.text
    assert _status(sessions, sid) == SubscriberStatus.ACTIVE
    assert _actions(sessions, sid) == ["import", "reconfirm_ask", "lapse", "reconfirm"]
    assert _edition_reaches(sessions, "spring-bulletin") == {sid, other}
    clock.move_to(asked_at + timedelta(days=200))
    assert reconfirm.run(web_settings, sessions).lapsed == 0  # a new cycle from the answer


def test_three_hundred_due_readers_are_asked_over_two_weeks_never_more_a_day_than_the_cap(
        web_settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        sink: FaultServer, clock: Any) -> None:
    with session_scope(sessions) as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [
            (store.profile_from(rules, email=f"reader{n:03}@kent.police.uk", region="kent",
                                organisation="Kent Police"), topics) for n in range(300)],
            IMPORT)
    cap = math.ceil(300 / web_settings.reconfirm_spread_days)
    per_day: Counter[int] = Counter()
    for day in range(20):
        for hour in (7, 13, 22):  # several passes a day (UK time) ask no more between them
            clock.move_to(T0 + YEAR + timedelta(days=day, hours=hour - 10))
            per_day[day] += reconfirm.run(web_settings, sessions).asked
    assert max(per_day.values()) == cap == 22
    assert sum(per_day.values()) == 300 and sorted(per_day)[-1] == 19
    assert max(d for d, n in per_day.items() if n) == 13  # all asked within the fortnight
    copies = Counter(rcpt for _, rcpt in sink.handler.envelopes())
    assert len(copies) == 300 and set(copies.values()) == {1}
    with sessions() as s:
        asks = s.scalar(select(func.count()).select_from(ConsentEvent).where(
            ConsentEvent.action == "reconfirm_ask"))
    assert asks == 300


def test_a_request_the_relay_defers_is_not_recorded_and_goes_out_on_a_later_pass(
        web_settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        sink: FaultServer, clock: Any) -> None:
    sid = _add(sessions, rules, "mailbox-busy@kent.police.uk")
    clock.move_to(T0 + YEAR + timedelta(hours=1))
    ran = reconfirm.run(web_settings, sessions)
    assert (ran.asked, ran.failed) == (0, 1)
    assert _actions(sessions, sid) == ["import"]  # not asked: it cannot lapse
    sink.handler.keywords = False  # the mailbox has room again
    clock.move_to(T0 + YEAR + timedelta(hours=2))
    assert reconfirm.run(web_settings, sessions).asked == 1
    assert _actions(sessions, sid) == ["import", "reconfirm_ask"]


def test_a_dead_address_is_asked_once_with_the_refusal_and_lapses(
        web_settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        sink: FaultServer, clock: Any) -> None:
    web_settings = _unspread(web_settings)
    dead = _add(sessions, rules, "gone@kent.police.uk")
    live = _add(sessions, rules, READER)
    clock.move_to(T0 + YEAR + timedelta(hours=1))
    ran = reconfirm.run(web_settings, sessions)
    assert (ran.asked, ran.refused, ran.failed) == (2, 1, 0)  # the refusal stops nobody else
    assert reconfirm.run(web_settings, sessions).asked == 0
    assert sink.handler.attempts("gone@kent.police.uk") == 1
    with sessions() as s:
        detail = s.scalar(select(ConsentEvent.detail).where(
            ConsentEvent.subscriber_id == dead, ConsentEvent.action == "reconfirm_ask"))
    assert detail == {"refused": 550, "outcome": "bounced"}
    clock.move_to(T0 + YEAR + timedelta(days=32))
    assert reconfirm.run(web_settings, sessions).lapsed == 2
    assert _status(sessions, live) == SubscriberStatus.LAPSED


def test_a_paused_reader_is_asked_once_the_pause_ends(
        web_settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        sink: FaultServer, clock: Any) -> None:
    sid = _add(sessions, rules, READER)
    with session_scope(sessions) as s:
        reader = s.get(Subscriber, sid)
        assert reader is not None
        store.pause(s, reader, store.Context(channel=Channel.WEB), T0 + YEAR + timedelta(days=20))
    clock.move_to(T0 + YEAR + timedelta(days=1))
    assert reconfirm.run(web_settings, sessions).asked == 0
    clock.move_to(T0 + YEAR + timedelta(days=21))
    assert reconfirm.run(web_settings, sessions).asked == 1


def test_the_scheduler_s_pass_asks_only_while_it_leads(
        web_settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        sink: FaultServer, clock: Any) -> None:
    _add(sessions, rules, READER)
    lock = HeldLock()
    reports: list[schedule.CatchUp] = []
    scheduler = schedule.Scheduler(web_settings, sessions, lock=lock, on_pass=reports.append)
    clock.move_to(T0 + YEAR + timedelta(hours=1))
    lock.held = False
    scheduler._pass()
    assert reports == [] and sink.handler.copies(READER) == 0
    lock.held = True
    scheduler._pass()
    scheduler._pass()
    assert [r.reconfirm and r.reconfirm.asked for r in reports] == [1, 0]
    assert sink.handler.copies(READER) == 1


def test_the_dashboard_shows_the_figures_in_the_caller_s_regions(
        client: TestClient, web_settings: Settings, sessions: sessionmaker[Session],
        rules: Rules, engine: Engine, clock: Any) -> None:
    from tests.test_admin_routes import login, make_user

    make_user(engine, "kentco", regions=("kent",))
    make_user(engine, "root", role="admin")
    make_user(engine, "looker", role="viewer")
    for n in range(3):
        _add(sessions, rules, f"k{n}@kent.police.uk")
    _add(sessions, rules, OTHER, region="essex")
    clock.move_to(T0 + YEAR + timedelta(hours=1))

    def figures(who: str) -> dict[str, str]:
        client.cookies.clear()
        login(client, who)
        page = client.get("/admin").text
        return dict(re.findall(r'<th scope="row">([^<]+)</th><td class="num">(\d+)</td>', page))

    assert figures("kentco")["Due to be asked (spread over the coming days)"] == "3"
    assert figures("root")["Due to be asked (spread over the coming days)"] == "4"
    assert "Asked, no answer yet" not in figures("looker")


def test_a_lapsed_reader_s_preferences_link_says_why_and_signing_up_again_brings_them_back(
        client: TestClient, web_settings: Settings, sessions: sessionmaker[Session],
        rules: Rules, sink: FaultServer, clock: Any) -> None:
    from tests.web_fixtures import subscribe

    sid = _add(sessions, rules, READER)
    clock.move_to(T0 + YEAR + timedelta(hours=1))
    reconfirm.run(web_settings, sessions)
    clock.move_to(T0 + YEAR + timedelta(days=32))
    assert reconfirm.run(web_settings, sessions).lapsed == 1
    preferences = next(u for u in links_in(mails_to(sink, READER)[0]) if "/preferences/" in u)
    page = client.get(preferences)
    assert "Your mail is stopped" in page.text and "did not hear back" in page.text

    subscribe(client, READER)
    confirm = next(u for u in links_in(mails_to(sink, READER)[-1]) if "/confirm/" in u)
    client.post(confirm, data={"csrf_token": csrf_of(client.get(confirm).text)})
    assert _status(sessions, sid) == SubscriberStatus.ACTIVE
    clock.move_to(T0 + YEAR + timedelta(days=100))  # a new cycle from the confirmation
    assert reconfirm.run(web_settings, sessions).asked == 0
    assert _edition_reaches(sessions, "after-coming-back") == {sid}


def test_a_yes_link_shorter_than_the_answer_window_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer.config import load_settings
    from mailer.errors import ConfigError

    monkeypatch.setenv("MAILER_RECONFIRM_ANSWER_DAYS", "30")
    monkeypatch.setenv("MAILER_RECONFIRM_LINK_DAYS", "20")
    with pytest.raises(ConfigError, match="at least as long as the answer window"):
        load_settings()
    monkeypatch.setenv("MAILER_RECONFIRM_LINK_DAYS", "30")
    assert load_settings().reconfirm_link_days == 30
    monkeypatch.setenv("MAILER_RECONFIRM_SPREAD_DAYS", "0")
    with pytest.raises(ConfigError, match="reconfirm_spread_days"):
        load_settings()
