"""The recipient pages over HTTP, on SQLite and PostgreSQL, with mail to a real SMTP sink."""


from __future__ import annotations

import datetime as dt
import html
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from mailer.web.app import create_app
from mailer.web.runtime import SqliteTurns
from subscribers import store
from subscribers.db import session_factory, session_scope
from subscribers.models import Channel, ConsentEvent, Subscriber, SubscriberStatus
from subscribers.rules import Rules
from subscribers.store import Context
from subscribers.tokens import Tokens
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    BASE,
    HEADLESS_UA,
    SAMPLE,
    client,
    csrf_of,
    events_of,
    fault_server,
    links_in,
    mails_to,
    make_fault_server,
    make_settings,
    sink,
    snapshot,
    subscribe,
    subscriber_by_email,
    text_of,
    topic_statuses,
    web_settings,
)

POLICE = "sam.tester@kent.police.uk"
ONE_CLICK = "List-Unsubscribe=One-Click"
ADDED = Context(channel=Channel.ADMIN, actor="coordinator", lawful_basis="legitimate_interests")


def _confirm_link(sink: FaultServer, rcpt: str) -> str:
    (msg,) = mails_to(sink, rcpt)
    return next(u for u in links_in(msg) if "/confirm/" in u)


def _active(client: TestClient, sink: FaultServer, email: str = POLICE) -> int:
    subscribe(client, email)
    link = _confirm_link(sink, email)
    page = client.get(link)
    response = client.post(link, data={"csrf_token": csrf_of(page.text)})
    assert response.status_code == 200
    sub = subscriber_by_email(client_engine(client), email)
    assert sub is not None
    return sub.id


def client_engine(client: TestClient) -> Engine:
    return client.app.state.web.sessions.kw["bind"]


def _unsub_token(client: TestClient, subscriber_id: int, topic: str | None = "newsletter") -> str:
    web = client.app.state.web
    with Session(client_engine(client)) as session:
        topic_id = store.get_topic(session, topic).id if topic else None
    return web.tokens.unsubscribe(subscriber_id, topic_id)


# ---------------------------------------------------------------- subscribe and confirm

def test_double_opt_in_from_a_trusted_domain(client: TestClient, sink: FaultServer,
                                             engine: Engine) -> None:
    response = subscribe(client, POLICE)
    assert response.status_code == 200 and "Check your inbox" in response.text
    sub = subscriber_by_email(engine, POLICE)
    assert sub is not None and sub.status == SubscriberStatus.PENDING

    (mail,) = mails_to(sink, POLICE)
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["List-Unsubscribe"] is None and mail["List-Id"] is None
    assert mail["Subject"] == "Please confirm your subscription"
    link = _confirm_link(sink, POLICE)
    assert link.startswith(f"{BASE}/confirm/") and POLICE not in link

    page = client.get(link)
    assert page.status_code == 200 and "Confirm subscription" in page.text
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.PENDING

    done = client.post(link, data={"csrf_token": csrf_of(page.text)})
    assert done.status_code == 200 and "You are subscribed" in done.text
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.ACTIVE
    again = client.post(link, data={"csrf_token": csrf_of(page.text)})
    assert again.status_code == 200
    version = client.app.state.web.settings.consent_version
    assert events_of(engine, sub.id) == [("subscribe", "web", version),
                                         ("confirm", "web", version)]


def test_signing_up_again_the_day_one_confirmed_brings_the_mail_the_page_promises(
        client: TestClient, sink: FaultServer) -> None:
    _active(client, sink)  # its confirmation mail went today
    answer = subscribe(client, POLICE)
    assert "we will email you a link to your preferences" in answer.text
    told = [m for m in mails_to(sink, POLICE) if m["Subject"] == "You are already subscribed"]
    assert len(told) == 1 and any("/preferences/" in u for u in links_in(told[0]))
    subscribe(client, POLICE)  # a second try that day: no second mail
    assert len([m for m in mails_to(sink, POLICE)
                if m["Subject"] == "You are already subscribed"]) == 1


def test_an_untrusted_domain_is_told_it_waits_for_approval(client: TestClient, sink: FaultServer,
                                                           engine: Engine) -> None:
    subscribe(client, "helper@charity.example.org")
    (mail,) = mails_to(sink, "helper@charity.example.org")
    assert "co-ordinator will check" in text_of(mail)
    link = _confirm_link(sink, "helper@charity.example.org")
    done = client.post(link, data={"csrf_token": csrf_of(client.get(link).text)})
    assert "co-ordinator will check your sign-up" in done.text
    assert (subscriber_by_email(engine, "helper@charity.example.org").status
            == SubscriberStatus.AWAITING_APPROVAL)


def test_confirm_needs_the_csrf_token_and_a_same_site_post(client: TestClient, sink: FaultServer,
                                                          engine: Engine) -> None:
    subscribe(client, POLICE)
    link = _confirm_link(sink, POLICE)
    token = csrf_of(client.get(link).text)
    assert client.post(link, data={}).status_code == 403
    assert client.post(link, data={"csrf_token": "0" * 64}).status_code == 403
    cross = client.post(link, data={"csrf_token": token}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    evil = client.post(link, data={"csrf_token": token}, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403
    bare = TestClient(client.app, base_url=BASE)  # the token without its cookie
    assert bare.post(link, data={"csrf_token": token}).status_code == 403
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.PENDING


def test_a_scanner_get_of_every_link_in_every_mail_changes_nothing(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    sid = _active(client, sink)
    subscribe(client, POLICE)  # active: an "already subscribed" mail (next day, past the cap)
    with time_machine.travel(dt.datetime.now(dt.UTC) + dt.timedelta(days=2)):
        subscribe(client, POLICE)
        client.post("/manage", data={"csrf_token": csrf_of(client.get("/manage").text),
                                     "email": POLICE})
    subscribe(client, "other@essex.police.uk")
    links = [u for m in mails_to(sink, POLICE) + mails_to(sink, "other@essex.police.uk")
             for u in links_in(m)]
    links.append(f"{BASE}/u/{_unsub_token(client, sid)}")
    assert any("/preferences/" in u for u in links) and any("/confirm/" in u for u in links)
    before = snapshot(engine)
    scanner = TestClient(client.app, base_url=BASE)
    for url in links:
        for method in ("GET", "HEAD"):
            response = scanner.request(method, url, headers={"User-Agent": HEADLESS_UA})
            assert response.status_code < 500, url
            scanner.cookies.clear()
    assert snapshot(engine) == before


# ---------------------------------------------------------------- no enumeration, caps


def test_the_answer_is_the_same_whatever_the_address_state(client: TestClient, sink: FaultServer,
                                                           engine: Engine) -> None:
    _active(client, sink, "active@kent.police.uk")
    subscribe(client, "pending@kent.police.uk")
    sid = _active(client, sink, "left@kent.police.uk")
    client.post(f"/u/{_unsub_token(client, sid, None)}", data={"List-Unsubscribe": "One-Click"})
    with Session(engine) as session:
        bounced = _active(client, sink, "bounced@kent.police.uk")
        store.mark_bounced(session, store.get(session, bounced), Context(channel=Channel.BOUNCE))
        session.commit()
    pages = {email: subscribe(client, email) for email in (
        "new@kent.police.uk", "active@kent.police.uk", "pending@kent.police.uk",
        "left@kent.police.uk", "bounced@kent.police.uk")}
    pages["honeypot"] = subscribe(client, "bot@kent.police.uk", website="http://spam")
    bodies = {r.text for r in pages.values()}
    assert len(bodies) == 1 and all(r.status_code == 200 for r in pages.values())
    assert subscriber_by_email(engine, "bot@kent.police.uk") is None
    assert mails_to(sink, "bot@kent.police.uk") == []


def test_twenty_posts_for_one_address_send_within_the_caps(client: TestClient, sink: FaultServer,
                                                           engine: Engine) -> None:
    start = dt.datetime.now(dt.UTC)
    responses = [subscribe(client, POLICE) for _ in range(20)]
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert len(mails_to(sink, POLICE)) == 1  # at most one a day
    for day, expected in ((1, 2), (2, 3), (3, 3), (10, 3)):  # at most three in 30 days
        # An hour more each day: exactly 24 hours apart, the day's first post could fall a
        # moment inside the previous day's window, depending on how fast each ran.
        with time_machine.travel(start + dt.timedelta(days=day, hours=1 + day)):
            for _ in range(5):
                subscribe(client, POLICE)
        assert len(mails_to(sink, POLICE)) == expected, f"day {day}"
    with time_machine.travel(start + dt.timedelta(days=31, hours=2)):
        subscribe(client, POLICE)
    assert len(mails_to(sink, POLICE)) == 4  # the month has rolled on


def test_per_network_caps_on_mail_and_posts(settings, sink: FaultServer, tmp_path: Path) -> None:
    app = create_app(make_settings(sink, tmp_path, mails_per_network_day=3,
                                   posts_per_network_hour=8))
    with TestClient(app, base_url=BASE) as c:
        for n in range(5):
            assert subscribe(c, f"person{n}@kent.police.uk").status_code == 200
        assert sum(len(mails_to(sink, f"person{n}@kent.police.uk")) for n in range(5)) == 3
        statuses = [subscribe(c, f"more{n}@kent.police.uk").status_code for n in range(4)]
        assert statuses == [200, 200, 200, 429]


# ---------------------------------------------------------------- one-click (RFC 8058)

@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
@pytest.mark.parametrize("cookies", [False, True])
def test_one_click_as_a_mailbox_provider_sends_it(client: TestClient, sink: FaultServer,
                                                  engine: Engine, encoding: str,
                                                  cookies: bool) -> None:
    sid = _active(client, sink)
    url = f"/u/{_unsub_token(client, sid)}"
    provider = TestClient(client.app, base_url=BASE, follow_redirects=False)
    if cookies:
        provider.cookies.set("session", "whatever")
        provider.cookies.set("csrf", "stale")
    for _ in range(10):
        if encoding == "urlencoded":
            response = provider.post(url, content=ONE_CLICK, headers={
                "Content-Type": "application/x-www-form-urlencoded"})
        else:
            response = provider.post(url, files={"List-Unsubscribe": (None, "One-Click")})
        assert response.status_code == 200
        assert "You are unsubscribed" in response.text
    assert set(topic_statuses(engine, sid).values()) == {"unsubscribed"}
    unsubscribes = [e for e in events_of(engine, sid) if e[0] == "unsubscribe"]
    assert unsubscribes == [("unsubscribe", "one_click", unsubscribes[0][2])]


def test_bad_unsubscribe_tokens_get_one_generic_page_and_change_nothing(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    sid = _active(client, sink)
    web = client.app.state.web
    good = _unsub_token(client, sid)
    with time_machine.travel(dt.datetime.now(dt.UTC) - dt.timedelta(days=11 * 365)):
        expired = web.tokens.unsubscribe(sid, 1)
    bad = [
        good[:-12] + ("A" if good[-12] != "A" else "B") + good[-11:],  # tampered
        good[:20],  # truncated
        web.tokens.confirm(sid), web.tokens.manage(sid),  # cross-purpose
        expired, Tokens([b"z" * 40]).unsubscribe(sid, 1),  # expired, foreign key
        web.tokens.unsubscribe(999_999, 1),  # nobody
        "garbage", "x" * 2000, "%00%0d%0a", "WzFd.a.b.c",
    ]
    before = snapshot(engine)
    bodies = set()
    for token in bad:
        for body in ({"content": ONE_CLICK, "headers": {
                "Content-Type": "application/x-www-form-urlencoded"}},
                {"files": {"List-Unsubscribe": (None, "One-Click")}}):
            response = client.post(f"/u/{token}", follow_redirects=False, **body)
            assert response.status_code == 200, token
            bodies.add(response.text)
    assert len(bodies) == 1 and "Unsubscribe" in bodies.pop()
    assert snapshot(engine) == before


def test_one_click_answers_are_constant_and_set_no_cookie(client: TestClient,
                                                         sink: FaultServer) -> None:
    provider = TestClient(client.app, base_url=BASE, follow_redirects=False)
    answers = [provider.post(f"/u/{_unsub_token(client, _active(client, sink, email))}",
                             content=ONE_CLICK,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
               for email in (POLICE, "alex.other@essex.police.uk")]
    first, second = answers
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and "You are unsubscribed" in first.text
    assert "set-cookie" not in first.headers and "csrf" not in first.text
    assert "/preferences/" not in first.text  # nothing in it would let anyone act as them
    assert first.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in first.headers["content-security-policy"]
    assert first.headers["referrer-policy"] == "no-referrer"


def _unsubscribed_state(engine: Engine, sid: int) -> tuple[Any, ...]:
    """What an unsubscribe leaves, without ids and times, to compare two subscribers."""
    with Session(engine) as session:
        sub = session.get(Subscriber, sid)
        assert sub is not None
        events = session.execute(select(
            ConsentEvent.action, ConsentEvent.channel, ConsentEvent.topic,
            ConsentEvent.consent_version, ConsentEvent.lawful_basis, ConsentEvent.ip,
            ConsentEvent.user_agent, ConsentEvent.actor, ConsentEvent.detail)
            .where(ConsentEvent.subscriber_id == sid, ConsentEvent.action == "unsubscribe")
            .order_by(ConsentEvent.id)).all()
        return (sub.status, sub.left_at is None, sorted(topic_statuses(engine, sid).values()),
                [tuple(e) for e in events])


@pytest.mark.parametrize("scope", ["topic", "everything"])
def test_the_one_click_write_is_the_orm_unsubscribe(engine: Engine, rules: Rules,
                                                    scope: str) -> None:
    """`store.unsubscribe_ids` (the one-click path's few statements) leaves exactly what
    `store.unsubscribe` does, consent event included, and changes nothing the second time."""
    ctx = Context(channel=Channel.ONE_CLICK, ip="192.0.2.7", user_agent="Provider/1.0 " * 40,
                  consent_version="2026-12")
    with session_scope(session_factory(engine)) as session:
        topics = list(store.list_topics(session))
        topic = store.get_topic(session, "newsletter")
        orm_id, core_id = (store.add_active(session, rules, store.profile_from(
            rules, email=f"reader{n}@kent.police.uk"), topics, ADDED).id
            for n in (1, 2))
    for _ in range(2):
        with session_scope(session_factory(engine)) as session:
            store.unsubscribe(session, store.get(session, orm_id), ctx,
                              topic=topic if scope == "topic" else None)
        with session_scope(session_factory(engine)) as session:
            done = store.unsubscribe_ids(session, core_id,
                                         topic.id if scope == "topic" else None, ctx)
        assert done is not None
        assert done.topic_name == (topic.name if scope == "topic" else None)
        assert _unsubscribed_state(engine, core_id) == _unsubscribed_state(engine, orm_id)
    assert not done.changed
    assert len(_unsubscribed_state(engine, core_id)[3]) == 1


def test_the_one_click_write_for_the_erased_the_unknown_and_a_gone_topic(
        engine: Engine, rules: Rules) -> None:
    ctx = Context(channel=Channel.ONE_CLICK)
    factory = session_factory(engine)
    with session_scope(factory) as session:
        topics = list(store.list_topics(session))
        kept, erased = (store.add_active(session, rules, store.profile_from(
            rules, email=f"reader{n}@kent.police.uk"), topics, ADDED).id
            for n in (1, 2))
        store.erase(session, store.get(session, erased), ADDED)
    before = snapshot(engine)
    with session_scope(factory) as session:
        assert store.unsubscribe_ids(session, 999_999, None, ctx) is None
        assert store.unsubscribe_ids(session, 999_999, topics[0].id, ctx) is None
        assert store.unsubscribe_ids(session, erased, None, ctx) is None
        assert store.unsubscribe_ids(session, erased, topics[0].id, ctx) is None
    assert snapshot(engine) == before
    with session_scope(factory) as session:  # a topic that no longer exists: leave everything
        assert store.unsubscribe_ids(session, kept, 999_999, ctx) == store.Unsubscribed(True, None)
    assert _unsubscribed_state(engine, kept)[:3] == (
        "unsubscribed", False, ["unsubscribed"] * len(topics))


def test_racing_one_click_posts_change_once(engine: Engine, rules: Rules) -> None:
    """The second of two simultaneous posts waits for the first's lock, then finds nothing to
    change: one change, one consent event, on SQLite and on PostgreSQL."""
    ctx = Context(channel=Channel.ONE_CLICK)
    factory = session_factory(engine)
    with session_scope(factory) as session:
        topic = store.get_topic(session, "newsletter")
        sid = store.add_active(session, rules, store.profile_from(
            rules, email="reader@kent.police.uk"), [topic], ADDED).id
    first = factory()
    done = store.unsubscribe_ids(first, sid, topic.id, ctx)
    assert done is not None and done.changed
    second: list[store.Unsubscribed | None] = []

    def post_again() -> None:
        with session_scope(factory) as session:
            second.append(store.unsubscribe_ids(session, sid, topic.id, ctx))

    thread = threading.Thread(target=post_again)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # waiting on the first's row (PostgreSQL) or write (SQLite) lock
    first.commit()
    first.close()
    thread.join(15)
    assert second == [store.Unsubscribed(False, topic.name)]
    assert len(_unsubscribed_state(engine, sid)[3]) == 1


def test_sqlite_turns_keep_web_processes_apart(tmp_path: Path) -> None:
    """Each uvicorn worker opens the lock file itself; two openings exclude each other as two
    processes would (flock locks belong to the open file, not the process)."""
    assert SqliteTurns.for_url("postgresql://postgres@127.0.0.1/test") is None
    assert SqliteTurns.for_url("sqlite://") is None
    url = f"sqlite:///{tmp_path / 'mailer.db'}"
    first, second = SqliteTurns.for_url(url), SqliteTurns.for_url(url)
    assert first is not None and second is not None
    order: list[str] = []

    def other_worker() -> None:
        with second:
            order.append("second")

    with first:
        thread = threading.Thread(target=other_worker)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


def test_unsubscribe_links_work_after_three_years_and_a_key_rotation(
        settings, sink: FaultServer, tmp_path: Path, engine: Engine) -> None:
    old_key, new_key = "o" * 40, "n" * 40
    with TestClient(create_app(make_settings(sink, tmp_path, secret_key=old_key)),
                    base_url=BASE) as old:
        sid = _active(old, sink)
        token = _unsub_token(old, sid)
    rotated = make_settings(sink, tmp_path, secret_key=new_key, previous_secret_keys=[old_key])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3 * 365 + 30)
    with time_machine.travel(later), TestClient(create_app(rotated), base_url=BASE) as new:
        page = new.get(f"/u/{token}")
        assert page.status_code == 200 and "Unsubscribe" in page.text
        assert new.post(f"/u/{token}", data={"scope": "all"}).status_code == 200
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.UNSUBSCRIBED


def test_the_unsubscribe_page_offers_topic_or_everything_and_a_way_back(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    sid = _active(client, sink)
    url = f"/u/{_unsub_token(client, sid)}"
    page = client.get(url)
    assert 'value="topic" checked' in page.text and 'value="all"' in page.text
    done = client.post(url, data={"scope": "topic"})
    assert "from Quarterly newsletter" in done.text
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.ACTIVE
    undo = client.post(f"{url}/undo", data={"csrf_token": csrf_of(done.text)})
    assert undo.status_code == 200 and "subscribed again" in undo.text
    assert set(topic_statuses(engine, sid).values()) == {"active"}

    done = client.post(url, data={"scope": "all"})
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.UNSUBSCRIBED
    assert client.post(f"{url}/undo", data={}).status_code == 403  # undo is a CSRF form
    client.post(f"{url}/undo", data={"csrf_token": csrf_of(done.text)})
    assert subscriber_by_email(engine, POLICE).status == SubscriberStatus.ACTIVE


def test_an_unsubscribe_link_opened_again_says_it_was_used_and_offers_the_way_back(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    sid = _active(client, sink)
    url = f"/u/{_unsub_token(client, sid)}"
    client.post(url, data={"scope": "topic"})
    again = client.get(url)
    assert "You have already unsubscribed from Quarterly newsletter." in again.text
    assert 'name="scope"' not in again.text and "Subscribe me again" in again.text
    everything = f"/u/{_unsub_token(client, sid, topic=None)}"
    assert 'name="scope"' in client.get(everything).text  # still subscribed to the rest
    client.post(everything, data={"scope": "all"})
    for link in (url, everything):
        page = client.get(link)
        assert "You have already unsubscribed from everything" in page.text
        assert 'name="scope"' not in page.text
    undo = client.post(f"{url}/undo", data={"csrf_token": csrf_of(client.get(url).text)})
    assert "subscribed again" in undo.text
    assert 'name="scope"' in client.get(url).text  # subscribed again: the form is back


# ---------------------------------------------------------------- preferences and manage

def test_manage_answers_the_same_and_mails_only_known_addresses(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    sid = _active(client, sink)
    token = csrf_of(client.get("/manage").text)
    known = client.post("/manage", data={"csrf_token": token, "email": POLICE.upper()})
    unknown = client.post("/manage", data={"csrf_token": token, "email": "nobody@kent.police.uk"})
    assert known.status_code == unknown.status_code == 200 and known.text == unknown.text
    assert mails_to(sink, "nobody@kent.police.uk") == []
    manage_mail = mails_to(sink, POLICE)[-1]
    assert manage_mail["Auto-Submitted"] == "auto-generated"
    prefs = next(u for u in links_in(manage_mail) if "/preferences/" in u)

    before = snapshot(engine)
    page = client.get(prefs)
    assert page.status_code == 200 and "Your preferences" in page.text
    assert snapshot(engine) == before
    saved = client.post(prefs, data={"csrf_token": csrf_of(page.text), "topics": ["reminders"],
                                     "region": "essex", "role": "analyst", "pause": "3"})
    assert saved.status_code == 200 and "preferences are saved" in saved.text
    sub = subscriber_by_email(engine, POLICE)
    assert (sub.region, sub.role) == ("essex", "analyst")
    assert sub.paused_until is not None and sub.paused_until > dt.datetime.now(dt.UTC)
    with Session(engine) as session:
        assert store.active_topics(session, sid) == ["reminders"]
    actions = [e[0] for e in events_of(engine, sid)]
    assert {"profile", "topic_add", "unsubscribe", "pause"} <= set(actions)


def test_bad_input_gets_a_clear_4xx_page_never_a_500(client: TestClient, sink: FaultServer) -> None:
    bad_email = subscribe(client, "not an address")
    assert bad_email.status_code == 400 and "There is a problem" in bad_email.text
    assert 'aria-invalid="true"' in bad_email.text
    assert subscribe(client, POLICE, topics=["nonsense"]).status_code == 400
    assert subscribe(client, POLICE, consent="").status_code == 400
    assert subscribe(client, POLICE, region="atlantis").status_code == 400
    assert subscribe(client, "x@kent.police.uk", name="<script>alert(1)</script>",
                     consent="").text.count("<script>alert") == 0
    for path in ("/confirm/garbage", "/preferences/garbage", "/u/garbage", "/nowhere",
                 "/archive/nope", "/archive/..%2f..%2fetc%2fpasswd"):
        response = client.get(path)
        assert 400 <= response.status_code < 500, path
        assert "text/html" in response.headers["content-type"]
    broken = client.post("/subscribe", content=b"--x\r\nbroken", headers={
        "Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= broken.status_code < 500
    assert client.delete("/subscribe").status_code == 405
    big = client.post("/subscribe", content=b"a=" + b"x" * 100_000,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413


def test_security_headers_and_urls_from_settings_not_host(client: TestClient,
                                                          sink: FaultServer) -> None:
    page = client.get("/subscribe", headers={"Host": "evil.example"})
    h = page.headers
    assert "frame-ancestors 'none'" in h["content-security-policy"]
    assert "unsafe-inline" not in h["content-security-policy"]
    assert "script-src" not in h["content-security-policy"]  # default-src 'none' covers it
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert h["cache-control"] == "no-store"
    assert "strict-transport-security" not in h  # served over plain http here
    assert "evil.example" not in page.text and f'action="{BASE}/subscribe"' in page.text
    assert "<script" not in page.text and "style=" not in page.text
    subscribe(client, POLICE)
    assert all(u.startswith(BASE) for u in links_in(mails_to(sink, POLICE)[0])
               if "/confirm/" in u)


def test_every_page_has_an_icon_and_the_browsers_default_request_for_one_is_answered(
        client: TestClient) -> None:
    for path in ("/subscribe", "/archive", "/admin/login"):
        page = client.get(path)
        assert f'<link rel="icon" href="{BASE}/static/favicon.svg"' in page.text, path
    for path in ("/static/favicon.svg", "/favicon.ico"):
        icon = client.get(path)
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
        assert icon.content.startswith(b"<svg")


def test_hsts_when_the_base_url_is_https(settings, sink: FaultServer, tmp_path: Path) -> None:
    app = create_app(make_settings(sink, tmp_path, base_url="https://news.example.police.uk"))
    with TestClient(app, base_url="https://news.example.police.uk") as c:
        response = c.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert "max-age=63072000" in response.headers["strict-transport-security"]


# ---------------------------------------------------------------- archive

def test_archive_index_page_and_atom_feed(client: TestClient) -> None:
    index = client.get("/archive")
    assert index.status_code == 200 and "2020-q3-kent-essex" in index.text
    page = client.get("/archive/2020-q3-kent-essex")
    assert page.status_code == 200 and "Operation Aidant" in page.text
    assert "@@" not in page.text  # no slot marker left unfilled
    assert "<script" not in page.text.lower()
    assert "script-src" not in page.headers["content-security-policy"]
    feed = client.get("/archive.xml")
    assert feed.headers["content-type"].startswith("application/atom+xml")
    root = ET.fromstring(feed.content)  # noqa: S314 - our own feed, from the test server
    ns = {"a": "http://www.w3.org/2005/Atom"}
    links = [e.find("a:link", ns).get("href") for e in root.findall("a:entry", ns)]
    assert links == [f"{BASE}/archive/2020-q3-kent-essex"]


def test_an_edition_sent_through_the_outbox_is_in_the_archive_and_its_link_works(
        client: TestClient, web_settings: Any, engine: Engine, tmp_path: Path) -> None:
    # Not a file in the archive directory: what the console or `edition send` stored.
    from mailer import outbox
    from mailer.models import Edition

    source = (tmp_path / "2027-q1-bulletin.md")
    source.write_text(SAMPLE.read_text(encoding="utf-8").replace(
        'subject: "', 'subject: "Spring 2027: ', 1), encoding="utf-8")
    with Session(engine) as s:
        sent, _ = outbox.store_edition_file(s, web_settings, source, "tester")
        outbox.enqueue(s, sent)  # it has started going out
        hidden, _ = outbox.store_edition_file(s, web_settings, SAMPLE, "tester")
        hidden.slug, hidden.public = "internal-only", False
        outbox.enqueue(s, hidden)
        draft = tmp_path / "2027-q2-draft.md"
        draft.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
        outbox.store_edition_file(s, web_settings, draft, "tester")  # not sent
        s.commit()
        view_online = s.scalar(select(Edition.compiled).where(Edition.slug == sent.slug))
    index = client.get("/archive")
    assert "2027-q1-bulletin" in index.text and "Spring 2027:" in index.text
    assert "internal-only" not in index.text and "2027-q2-draft" not in index.text
    assert index.text.index("2027-q1-bulletin") < index.text.index("2020-q3-kent-essex")
    page = client.get("/archive/2027-q1-bulletin")  # the link every copy carries
    assert page.status_code == 200 and "Operation Aidant" in page.text
    assert "@@" not in page.text and view_online["markers"]["name"] not in page.text
    assert client.get("/archive/internal-only").status_code == 404
    assert client.get("/archive/2027-q2-draft").status_code == 404
    feed = ET.fromstring(client.get("/archive.xml").content)  # noqa: S314 - our own feed
    ns = {"a": "http://www.w3.org/2005/Atom"}
    assert [e.find("a:link", ns).get("href") for e in feed.findall("a:entry", ns)] == [
        f"{BASE}/archive/2027-q1-bulletin", f"{BASE}/archive/2020-q3-kent-essex"]


def test_the_archive_lists_an_edition_under_the_date_it_carries_not_the_day_it_went_out(
        client: TestClient, web_settings: Any, engine: Engine, tmp_path: Path) -> None:
    """The 2020 issue sent through the outbox on 7 December 2026 is still the September 2020
    issue; a 2027 issue sent earlier than it is listed above it."""
    from mailer import outbox

    sample = SAMPLE.read_text(encoding="utf-8")
    later = tmp_path / "2027-q1-bulletin.md"
    later.write_text(sample.replace("date: 2020-09-01", "date: 2027-01-15", 1), encoding="utf-8")
    old = tmp_path / "sent-again.md"
    old.write_text(sample, encoding="utf-8")
    with Session(engine) as s:
        for path, went_out in ((later, dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC)),
                               (old, dt.datetime(2026, 12, 7, 9, tzinfo=dt.UTC))):
            edition, _ = outbox.store_edition_file(s, web_settings, path, "tester")
            outbox.enqueue(s, edition, now=went_out)
        s.commit()
    index = client.get("/archive").text
    entry = index[index.index("/archive/sent-again"):].split("</li>", 1)[0]
    assert "1 September 2020" in entry and "December 2026" not in entry
    assert "15 January 2027" in index
    assert index.index("/archive/2027-q1-bulletin") < index.index("/archive/sent-again")


# ---- two requests at once on PostgreSQL (SQLite's web units take turns on one thread) ----

def _at_once(client: TestClient, work: Any, waits_at: str, or_after: str = "@") -> list[Any]:
    """Run `work` as two web units at once: the first writes and holds its transaction open
    until the second is about to send a statement starting `waits_at` (which must then wait
    for, or collide with, what the first wrote) or has run one starting `or_after`."""
    import asyncio

    from sqlalchemy import event

    w = client.app.state.web  # type: ignore[attr-defined]
    engine = w.sessions.kw["bind"]
    first_wrote, second_reached = threading.Event(), threading.Event()
    second_thread: list[int] = []

    def spotter(prefix: str) -> Any:
        def spot(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if threading.get_ident() in second_thread and \
                    statement.lstrip().upper().startswith(prefix):
                second_reached.set()
        return spot

    def first(session: Session) -> Any:
        result = work(session)
        session.flush()
        first_wrote.set()
        assert second_reached.wait(20), "the second unit never got as far as its write"
        return result

    def second(session: Session) -> Any:
        assert first_wrote.wait(20)
        second_thread.append(threading.get_ident())
        return work(session)

    async def both() -> list[Any]:
        return list(await asyncio.gather(w.run(first), w.run(second)))

    spots = [("before_cursor_execute", spotter(waits_at)),
             ("after_cursor_execute", spotter(or_after))]
    for name, spot in spots:
        event.listen(engine, name, spot)
    try:
        return asyncio.run(both())
    finally:
        for name, spot in spots:
            event.remove(engine, name, spot)


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_sign_ups_for_one_new_address_at_once_make_one_subscriber_and_no_error(
        client: TestClient, web_settings: Any, engine: Engine) -> None:
    rules = web_settings.rules()
    ctx = Context(channel=Channel.WEB)

    def sign_up(session: Session) -> store.SubscribeOutcome:
        profile = store.profile_from(rules, email=POLICE, name="Sam Tester", region="kent")
        return store.subscribe(session, rules, profile,
                               store.topics_by_slug(session, ["newsletter"]), ctx)[1]

    # Both read "no such subscriber"; the second's INSERT meets the first's unique key.
    outcomes = _at_once(client, sign_up, "INSERT INTO SUBSCRIBER")
    assert outcomes == [store.SubscribeOutcome.NEW, store.SubscribeOutcome.STILL_PENDING]
    with Session(engine) as s:
        assert len(s.scalars(select(Subscriber.id).where(Subscriber.email == POLICE)).all()) == 1


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_requests_at_once_cannot_both_pass_a_mail_cap(client: TestClient) -> None:
    w = client.app.state.web  # type: ignore[attr-defined]

    def may_mail(session: Session) -> bool:
        return w.limits.may_mail(session, "signup", "someone@kent.police.uk", "192.0.2.0/24")

    # The cap is one a day: the second counts only after the first has added its mail.
    # (Without the lock the second's count runs, sees nothing yet, and it mails too.)
    assert _at_once(client, may_mail, "SELECT PG_ADVISORY_XACT_LOCK", "SELECT COUNT") == [
        True, False]


def test_a_link_for_an_erased_subscriber_answers_as_one_for_nobody_and_as_a_bad_link(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    # Erasure leaves no trace a link could reveal: whoever holds an erased person's old link
    # (a forwarded newsletter, a log) learns nothing a link for an id never used, or a link
    # that does not verify, would not tell them.
    erased = _active(client, sink)
    kept = _active(client, sink, "kept.reader@essex.police.uk")
    with session_scope(session_factory(engine)) as session:
        store.erase(session, store.get(session, erased), ADDED)
    web = client.app.state.web
    nobody = erased + kept + 1000
    for make, path in ((web.tokens.unsubscribe, "/u/"), (web.tokens.manage, "/preferences/")):
        gone, never = client.get(path + make(erased)), client.get(path + make(nobody))
        forged = client.get(path + make(erased)[:-4] + "AAAA")
        assert (gone.status_code, gone.text) == (never.status_code, never.text)
        assert (gone.status_code, gone.text) == (forged.status_code, forged.text)
        assert "kept.reader" not in gone.text and "sam.tester" not in gone.text
        live = client.get(path + make(kept))  # the one that exists is served its own page
        assert live.status_code == 200 and live.text != gone.text
    erase_page = client.get(f"/preferences/{web.tokens.manage(erased)}/erase")
    assert (erase_page.status_code, erase_page.text) == (never.status_code, never.text)
    # what they say: nothing about the person, and a way on
    assert never.status_code == 400
    assert "This link does not work" in never.text
    assert "no longer on our list" in never.text
    assert f'href="{BASE}/manage"' in never.text
    own = client.get(f"/preferences/{web.tokens.manage(kept)}")
    assert "kept.reader@essex.police.uk" in own.text


# ---------------------------------------------------------------- the words of every page
# What a reader is told (the link expired, the sign-up waits for approval, they are already
# unsubscribed) is behaviour as much as a status code: a page that lost its title or a sentence
# is a bug. Each page's visible text (title, paragraphs, links with their targets, tokens
# masked) is kept under tests/reader_page_words/; a change of wording is made there on purpose
# and reviewed like any other change. `UPDATE_PAGE_WORDS=1` writes the files afresh.

WORDS = Path(__file__).resolve().parent / "reader_page_words"
TOKEN = re.compile(r"/(u|preferences|confirm|still-working)/[A-Za-z0-9_\-.]+")


def words_of(response: Any) -> str:
    """The status, then what <main> shows: one line per block, links as [text](target)."""
    body = response.text
    main = body[body.find("<main"):body.find("</main>")] if "<main" in body else body
    main = re.sub(r"<(script|style)\b.*?</\1>", "", main, flags=re.S)
    main = re.sub(r'<input type="hidden"[^>]*>', "", main)
    main = re.sub(r'<a [^>]*href="([^"]*)"[^>]*>(.*?)</a>', r"[\2](\1)", main, flags=re.S)
    main = re.sub(r"<(button)[^>]*>(.*?)</\1>", r"[button: \2]", main, flags=re.S)
    main = re.sub(r"</?(p|h1|h2|li|ul|div|form|fieldset|legend|label|main)\b[^>]*>", "\n", main)
    text = html.unescape(re.sub(r"<[^>]+>", " ", main)).replace(BASE, "")
    text = TOKEN.sub(lambda m: f"/{m[1]}/<token>", text)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return f"{response.status_code}\n" + "\n".join(line for line in lines if line) + "\n"


def _preferences(client: TestClient, subscriber_id: int) -> str:
    return client.app.state.web.links.preferences(subscriber_id)  # type: ignore[no-any-return]


def _with_status(engine: Engine, subscriber_id: int, status: SubscriberStatus) -> None:
    with Session(engine) as session:
        session.execute(update(Subscriber).where(Subscriber.id == subscriber_id)
                        .values(status=status))
        session.commit()


def _pages(client: TestClient, sink: FaultServer, engine: Engine) -> dict[str, Any]:
    pages: dict[str, Any] = {}
    pages["subscribe-check-inbox"] = subscribe(client, POLICE)
    link = _confirm_link(sink, POLICE)
    pending = subscriber_by_email(engine, POLICE)
    assert pending is not None
    pages["preferences-pending"] = client.get(_preferences(client, pending.id))
    pages["confirm-page"] = client.get(link)
    pages["confirmed"] = client.post(link, data={"csrf_token": csrf_of(pages["confirm-page"].text)})
    sid = pending.id
    topic_link = f"/u/{_unsub_token(client, sid)}"
    every_link = f"/u/{_unsub_token(client, sid, topic=None)}"
    pages["unsubscribe-form-topic"] = client.get(topic_link)
    pages["unsubscribe-form-everything"] = client.get(every_link)
    pages["unsubscribed-topic"] = client.post(topic_link, data={"scope": "topic"})
    pages["unsubscribe-already-topic"] = client.get(topic_link)
    pages["subscribed-again"] = client.post(
        f"{topic_link}/undo", data={"csrf_token": csrf_of(pages["unsubscribed-topic"].text)})
    pages["one-click-done"] = client.post(every_link, content="List-Unsubscribe=One-Click",
                                          headers={"Content-Type": "application/x-www-form-"
                                                   "urlencoded"})
    pages["unsubscribe-already-everything"] = client.get(every_link)
    pages["preferences-unsubscribed"] = client.get(_preferences(client, sid))
    for status in (SubscriberStatus.AWAITING_APPROVAL, SubscriberStatus.LAPSED):
        _with_status(engine, sid, status)
        pages[f"preferences-{status.value.replace('_', '-')}"] = client.get(
            _preferences(client, sid))
    _with_status(engine, sid, SubscriberStatus.ACTIVE)
    pages["preferences-active"] = client.get(_preferences(client, sid))

    nobody = client.app.state.web.tokens.unsubscribe(999_999, None)
    pages["unsubscribe-nobody"] = client.get(f"/u/{nobody}")
    pages["unsubscribed-nobody"] = client.post(f"/u/{nobody}", data={"scope": "all"})
    pages["one-click-nobody"] = client.post(
        f"/u/{nobody}", content="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    pages["link-not-valid"] = client.get(f"/preferences/{nobody[:-3]}abc")
    with time_machine.travel(dt.datetime.now(dt.UTC) - dt.timedelta(days=400)):
        old = _preferences(client, sid)
    pages["link-expired"] = client.get(old)
    pages["manage-sent"] = client.post("/manage", data={
        "csrf_token": csrf_of(client.get("/manage").text), "email": POLICE})
    return pages


CASES = ["subscribe-check-inbox", "preferences-pending", "confirm-page", "confirmed",
         "unsubscribe-form-topic", "unsubscribe-form-everything", "unsubscribed-topic",
         "unsubscribe-already-topic", "subscribed-again", "one-click-done",
         "unsubscribe-already-everything", "preferences-unsubscribed",
         "preferences-awaiting-approval", "preferences-lapsed", "preferences-active",
         "unsubscribe-nobody", "unsubscribed-nobody", "one-click-nobody", "link-not-valid",
         "link-expired", "manage-sent"]


def test_every_reader_page_says_what_was_reviewed(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    pages = _pages(client, sink, engine)
    assert sorted(pages) == sorted(CASES)
    update_files = os.environ.get("UPDATE_PAGE_WORDS") == "1"
    differ: list[str] = []
    for name in CASES:
        said, kept = words_of(pages[name]), WORDS / f"{name}.txt"
        if update_files:
            WORDS.mkdir(exist_ok=True)
            kept.write_text(said, encoding="utf-8")
        elif not kept.exists() or kept.read_text(encoding="utf-8") != said:
            differ.append(f"--- {name} (kept)\n"
                          f"{kept.read_text(encoding='utf-8') if kept.exists() else ''}"
                          f"+++ {name} (now)\n{said}")
    assert not differ, "\n".join(differ)
