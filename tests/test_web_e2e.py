"""End to end in headless Chromium against the app under uvicorn, with mail to a real SMTP sink.

The main journey runs with JavaScript disabled (every page must work without it). axe-core
checks every page in a second context; it needs `npm install --prefix var/axe axe-core@4`.
The outbox (issue 4) does not exist yet, so the "test send of the sample edition" is built with
mailer.render and sent with mailer.smtp.deliver_once directly.
"""


from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import expect
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from mailer import reference
from mailer.config import Settings
from mailer.edition import load_edition
from mailer.render import Recipient, RecipientUrls, build_message, compile_edition
from mailer.smtp import Outcome, deliver_once
from mailer.web.app import create_app
from subscribers import store
from subscribers.models import SubscriberStatus
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    HEADLESS_UA,
    SAMPLE,
    events_of,
    fault_server,
    links_in,
    mails_to,
    make_fault_server,
    make_settings,
    sink,
    snapshot,
    subscriber_by_email,
    topic_statuses,
)

pytestmark = pytest.mark.browser
AXE = Path(__file__).resolve().parent.parent / "var" / "axe" / "node_modules" / "axe-core" / \
    "axe.min.js"
EMAIL = "e2e.tester@essex.police.uk"


@pytest.fixture
def served(settings: Settings, sink: FaultServer, tmp_path: Path) -> Iterator[Settings]:
    """The app under a real uvicorn on a loopback port; base_url is that port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # listening before the thread starts: no wait-until-ready loop needed
    port = sock.getsockname()[1]
    web_settings = make_settings(sink, tmp_path, base_url=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(create_app(web_settings), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield web_settings
    server.should_exit = True
    thread.join(10)
    sock.close()


def _axe(page: Any) -> list[str]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']} ({v['impact']}): {v['help']} on {page.url}" for v in result["violations"]
            if v["impact"] in ("serious", "critical")]


def _scan(urls: list[str], base: str) -> None:
    """What Safe Links does: a cookieless headless GET of each of our links."""
    for url in urls:
        if url.startswith(base):
            response = httpx.get(url, headers={"User-Agent": HEADLESS_UA}, follow_redirects=True)
            assert response.status_code < 500, url


def _wait_for_mail(sink: FaultServer, rcpt: str, count: int) -> None:
    assert sink.handler.wait_until(lambda h: h.copies(rcpt) >= count, timeout=15), \
        f"no mail #{count} for {rcpt}"


def _test_send(settings: Settings, engine: Engine, rcpt: str) -> None:
    """One edition to one subscriber, as the worker will build it."""
    with Session(engine) as session:
        sub = store.find_by_email(session, settings.rules(), rcpt)
        assert sub is not None
        topic = store.get_topic(session, "newsletter")
        sid, topic_id, name = sub.id, topic.id, sub.name
    from subscribers.tokens import Lifetimes, Tokens

    tokens = Tokens(settings.token_keys(), Lifetimes())
    base = settings.base_url
    urls = RecipientUrls(unsubscribe=f"{base}/u/{tokens.unsubscribe(sid, topic_id)}",
                         preferences=f"{base}/preferences/{tokens.manage(sid)}",
                         view_online=f"{base}/archive/{SAMPLE.stem}")
    compiled = compile_edition(load_edition(SAMPLE), settings)
    raw = build_message(compiled, Recipient(email=rcpt, name=name), urls,
                        message_id=reference.message_id(settings.secret(), 1, sid, "example.org"))
    result = deliver_once(settings.smtp_url.get_secret_value(), settings.from_address, rcpt, raw)
    assert result.outcome == Outcome.SENT


def test_subscribe_confirm_receive_and_unsubscribe_in_chromium(
        browser: Any, served: Settings, sink: FaultServer, engine: Engine,
        artifacts: Path) -> None:
    base = served.base_url
    context = browser.new_context(java_script_enabled=False, user_agent="e2e person")
    page = context.new_page()
    try:
        page.goto(f"{base}/subscribe")
        page.get_by_label("Work email address").fill(EMAIL)
        page.get_by_label("Your name").fill("Erin Tester")
        page.get_by_label("Organisation", exact=True).fill("Essex Police")
        page.get_by_label("Type of organisation").select_option("police")
        page.get_by_label("Your role").select_option("spoc")
        page.get_by_label("Where you work").select_option("essex")
        page.get_by_label("Event reminders").check()
        page.locator("#consent-box").check()
        page.get_by_role("button", name="Subscribe").click()
        expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()

        _wait_for_mail(sink, EMAIL, 1)
        (confirm_mail,) = mails_to(sink, EMAIL)
        assert confirm_mail["Auto-Submitted"] == "auto-generated"
        assert confirm_mail["List-Unsubscribe"] is None
        confirm_link = next(u for u in links_in(confirm_mail) if "/confirm/" in u)

        before = snapshot(engine)
        _scan(links_in(confirm_mail), base)
        assert snapshot(engine) == before
        assert subscriber_by_email(engine, EMAIL).status == SubscriberStatus.PENDING

        page.goto(confirm_link)
        page.get_by_role("button", name="Confirm subscription").click()
        expect(page.get_by_role("heading", name="You are subscribed")).to_be_visible()
        assert subscriber_by_email(engine, EMAIL).status == SubscriberStatus.ACTIVE

        _test_send(served, engine, EMAIL)
        _wait_for_mail(sink, EMAIL, 2)
        edition = mails_to(sink, EMAIL)[1]
        assert edition["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        header_link = edition["List-Unsubscribe"].strip("<>")
        body_links = [u for u in links_in(edition) if u.startswith(base)]
        assert header_link in body_links

        before = snapshot(engine)
        _scan(links_in(confirm_mail) + links_in(edition), base)
        assert snapshot(engine) == before

        page.goto(header_link)
        page.get_by_role("button", name="Unsubscribe").click()
        expect(page.get_by_role("heading", name="You are unsubscribed")).to_be_visible()
        page.screenshot(path=str(artifacts / "web-e2e-unsubscribed.png"), full_page=True)
        # The page's last button stands clear of the footer's rule, not on it.
        gap = page.evaluate("""() => document.querySelector('footer').getBoundingClientRect().top
            - document.querySelector('main button:last-of-type').getBoundingClientRect().bottom""")
        assert gap >= 24, gap
        page.goto(header_link)  # the link opened again: it says it was used
        expect(page.get_by_text("You have already unsubscribed from")).to_be_visible()
    finally:
        context.close()

    sub = subscriber_by_email(engine, EMAIL)
    with Session(engine) as session:
        newsletter = store.get_topic(session, "newsletter").id
        reminders = store.get_topic(session, "reminders").id
    statuses = topic_statuses(engine, sub.id)
    assert statuses[newsletter] == "unsubscribed"  # the list the message came from
    assert statuses[reminders] == "active"
    assert [(a, c) for a, c, _ in events_of(engine, sub.id)] == [
        ("subscribe", "web"), ("confirm", "web"), ("unsubscribe", "web")]
    assert all(v == served.consent_version for _, _, v in events_of(engine, sub.id))


def test_every_page_passes_axe(browser: Any, served: Settings, sink: FaultServer,
                               engine: Engine) -> None:
    if not AXE.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"axe-core missing at {AXE}")
        pytest.skip("axe-core not installed (npm install --prefix var/axe axe-core@4)")
    base = served.base_url
    context = browser.new_context(bypass_csp=True)  # only so axe itself can be injected
    page = context.new_page()
    problems: list[str] = []
    try:
        for path in ("/subscribe", "/manage", "/archive", f"/archive/{SAMPLE.stem}",
                     "/nowhere", "/confirm/bad-token", "/u/bad-token"):
            page.goto(base + path)
            problems += _axe(page)
        page.goto(f"{base}/subscribe")
        page.get_by_role("button", name="Subscribe").click()  # empty: the error page
        expect(page.get_by_role("heading", name="There is a problem")).to_be_visible()
        problems += _axe(page)
        page.get_by_label("Work email address").fill("axe@kent.police.uk")
        page.locator("#consent-box").check()
        page.get_by_role("button", name="Subscribe").click()
        problems += _axe(page)  # check your inbox
        _wait_for_mail(sink, "axe@kent.police.uk", 1)
        link = next(u for u in links_in(mails_to(sink, "axe@kent.police.uk")[0])
                    if "/confirm/" in u)
        page.goto(link)
        problems += _axe(page)
        page.get_by_role("button", name="Confirm subscription").click()
        problems += _axe(page)
        web_tokens = _tokens(served)
        sid = subscriber_by_email(engine, "axe@kent.police.uk").id
        page.goto(f"{base}/preferences/{web_tokens.manage(sid)}")
        problems += _axe(page)
        page.get_by_role("button", name="Save preferences").click()
        problems += _axe(page)
        page.goto(f"{base}/still-working/{web_tokens.reconfirm(sid)}")  # the yearly question
        problems += _axe(page)
        page.get_by_role("button", name="Yes, keep sending").click()
        problems += _axe(page)
        page.goto(f"{base}/u/{web_tokens.unsubscribe(sid, 1)}")
        problems += _axe(page)
        page.get_by_role("button", name="Unsubscribe").click()
        problems += _axe(page)
    finally:
        context.close()
    assert problems == []


def _tokens(settings: Settings) -> Any:
    from subscribers.tokens import Lifetimes, Tokens

    return Tokens(settings.token_keys(), Lifetimes())
