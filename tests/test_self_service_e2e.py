"""A reader's own data end to end in headless Chromium under uvicorn, with mail to a real SMTP
sink: they ask for their preferences link by email, download their data (the file Chromium
saves is read back), then erase themself through the confirmation page. axe-core checks each
new page, as it does the other recipient pages."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from mailer import audit, outbox
from mailer.config import Settings
from mailer.links import Links
from mailer.models import Delivery, DeliveryStatus
from subscribers import store
from subscribers.db import session_factory, session_scope
from subscribers.models import Channel
from tests.smtp_servers import FaultServer
from tests.test_web_e2e import AXE, _axe, served  # noqa: F401
from tests.web_fixtures import (  # noqa: F401
    fault_server,
    links_in,
    mails_to,
    make_fault_server,
    sink,
    subscriber_by_email,
)

pytestmark = pytest.mark.browser
EMAIL = "erin.reader@essex.police.uk"
SENT_AT = dt.datetime(2026, 9, 30, 8, 15, tzinfo=dt.UTC)


def _reader(settings: Settings, engine: Engine, email: str = EMAIL) -> int:
    """Someone a co-ordinator added, who has had one newsletter."""
    rules = settings.rules()
    with session_scope(session_factory(engine)) as session:
        subscriber = store.add_active(
            session, rules, store.profile_from(rules, email=email, name="Erin Reader",
                                               organisation="Essex Police", region="essex",
                                               role="spoc"),
            store.topics_by_slug(session, ["newsletter"]),
            store.Context(channel=Channel.ADMIN, actor="coord.essex",
                          lawful_basis="public_task"))
        edition, _ = outbox.store_edition(
            session, slug="2026-q3-bulletin", title="Autumn 2026 bulletin", subject="Autumn",
            topic="newsletter", regions=[], roles=[], source="autumn", compiled={},
            actor="tester")
        outbox.enqueue(session, edition)
        session.execute(update(Delivery).values(status=DeliveryStatus.SENT, sent_at=SENT_AT))
        return subscriber.id


def test_a_reader_downloads_their_data_then_erases_themself_in_chromium(
        browser: Any, served: Settings, sink: FaultServer, engine: Engine,
        artifacts: Path) -> None:
    base = served.base_url
    sid = _reader(served, engine)
    context = browser.new_context(java_script_enabled=False, user_agent="e2e reader",
                                  accept_downloads=True)
    page = context.new_page()
    try:
        page.goto(f"{base}/manage")
        page.get_by_label("Email address").fill(EMAIL)
        page.get_by_role("button", name="Send me a link").click()
        expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
        assert sink.handler.wait_until(lambda h: h.copies(EMAIL) >= 1, timeout=15)
        link = next(u for u in links_in(mails_to(sink, EMAIL)[0]) if "/preferences/" in u)

        page.goto(link)
        expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()
        with page.expect_download() as saved:
            page.get_by_role("button", name="Download my data").click()
        download = saved.value
        assert download.suggested_filename == "msht-bulletin-my-data.json"
        data = json.loads(Path(download.path()).read_text(encoding="utf-8"))
        assert data["profile"]["id"] == sid and data["profile"]["email"] == EMAIL
        assert (data["profile"]["name"], data["profile"]["region"]) == ("Erin Reader", "essex")
        assert [(s["topic"], s["status"]) for s in data["subscriptions"]] == [
            ("newsletter", "active")]
        assert [(e["action"], e["lawful_basis"]) for e in data["consent_history"]] == [
            ("add", "public_task")]
        assert [(d["edition"], d["title"], d["sent_at"]) for d in data["deliveries"]] == [
            ("2026-q3-bulletin", "Autumn 2026 bulletin", "2026-09-30T08:15:00+00:00")]
        expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()
        page.screenshot(path=str(artifacts / "self-service-preferences.png"), full_page=True)

        page.get_by_role("button", name="Erase me").click()
        expect(page.get_by_role("heading", name="Erase your data")).to_be_visible()
        expect(page.locator(".warning-text")).to_contain_text("cannot be undone")
        page.screenshot(path=str(artifacts / "self-service-erase.png"), full_page=True)
        assert subscriber_by_email(engine, EMAIL) is not None  # the page only asks
        page.get_by_role("button", name="Erase my data").click()
        expect(page.get_by_role("heading", name="Your data has been erased")).to_be_visible()
        page.screenshot(path=str(artifacts / "self-service-erased.png"), full_page=True)
        page.get_by_role("link", name="Subscribe again").click()
        expect(page.get_by_role("heading", name="Subscribe")).to_be_visible()
    finally:
        context.close()

    assert subscriber_by_email(engine, EMAIL) is None
    with Session(engine) as session:
        assert store.is_suppressed(session, served.rules(), EMAIL)
        _, entries = audit.entries(session, audit.AuditFilter(action="subscriber.erase"))
        assert [(e.actor, e.target) for e in entries] == [
            (f"subscriber:{sid}", f"subscriber:{sid}")]


def test_the_self_service_pages_pass_axe(browser: Any, served: Settings,
                                         engine: Engine) -> None:
    if not AXE.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"axe-core missing at {AXE}")
        pytest.skip("axe-core not installed (npm install --prefix var/axe axe-core@4)")
    preferences = Links(served).preferences(_reader(served, engine))
    context = browser.new_context(bypass_csp=True)  # only so axe itself can be injected
    page = context.new_page()
    problems: list[str] = []
    try:
        page.goto(preferences)  # with its new "Your data" section
        problems += _axe(page)
        page.get_by_role("button", name="Erase me").click()
        expect(page.get_by_role("heading", name="Erase your data")).to_be_visible()
        problems += _axe(page)
        page.get_by_role("button", name="Erase my data").click()
        expect(page.get_by_role("heading", name="Your data has been erased")).to_be_visible()
        problems += _axe(page)
    finally:
        context.close()
    assert problems == []
