"""The console end to end in headless Chromium under uvicorn, mail to a real SMTP sink, the real
scheduler pass and worker: upload, preview at phone width, test send, request approval, refused
self-approval, a second co-ordinator approves and schedules it, the clock reaches the send time
(time-machine, not a sleep), the send completes, and the audit log shows every step with both
names. A second test runs axe-core over every console page, in each of its states.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import time_machine
from playwright.sync_api import expect
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer import accounts, alerts, audit, events, outbox, replies, schedule
from mailer.bounces import classify_inbound
from mailer.config import Settings
from mailer.inbound import InboundMessage
from mailer.models import Delivery, Edition, EditionStatus
from mailer.outbox import LONDON
from mailer.worker import Worker
from subscribers import store
from subscribers.db import session_factory
from tests.smtp_servers import FaultServer
from tests.test_admin_routes import (
    PASSWORD,
    _routes,
    bounce,
    domain_alert,
    kent_segment,
    make_user,
    people,
    sample_edition,
)
from tests.test_web_e2e import AXE, _axe, served  # noqa: F401
from tests.web_fixtures import SAMPLE, fault_server, make_fault_server, sink  # noqa: F401

pytestmark = pytest.mark.browser
READERS = [("r1@kent.police.uk", "kent"), ("r2@essex.police.uk", "essex"),
           ("r3@kent.police.uk", "kent")]


def _sign_in(page: Any, base: str, login: str) -> None:
    page.goto(f"{base}/admin")
    expect(page.get_by_role("heading", name="Sign in to the console")).to_be_visible()
    page.get_by_label("Login").fill(login)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def test_upload_approve_by_another_schedule_and_send_in_chromium(
        browser: Any, served: Settings, sink: FaultServer, engine: Engine,
        artifacts: Path) -> None:
    base = served.base_url
    make_user(engine, "alice", name="Alice Author", email="alice@kent.police.uk")
    make_user(engine, "bob", name="Bob Approver", email="bob@essex.police.uk")
    people(engine, served, READERS)

    first = browser.new_context(user_agent="e2e alice")
    page = first.new_page()
    try:
        _sign_in(page, base, "alice")
        page.get_by_role("link", name="Editions").click()
        page.get_by_role("link", name="Upload an edition").click()
        page.get_by_label("Edition file (.md)").set_input_files(str(SAMPLE))
        page.get_by_role("button", name="Save and preview").click()
        expect(page.get_by_text("Saved. Check the preview below.")).to_be_visible()
        edition_url = page.url.split("?")[0]
        eid = int(edition_url.rsplit("/", 1)[1])
        expect(page.locator("pre.plain")).to_contain_text("Modern Slavery")

        # The phone frame is 375 px wide and the email fits it without sideways scrolling.
        phone = page.locator("iframe.phone")
        expect(page.frame_locator("iframe.phone").locator("body")).to_contain_text(
            "Modern Slavery")
        box = phone.bounding_box()
        assert box is not None and 370 <= box["width"] <= 385
        frame = phone.element_handle().content_frame()
        assert frame is not None
        widths = frame.evaluate("() => [document.documentElement.scrollWidth, "
                                "window.innerWidth]")
        assert 360 <= widths[1] <= 385 and widths[0] <= widths[1] + 1, widths
        page.screenshot(path=str(artifacts / "admin-edition-preview.png"), full_page=True)

        page.get_by_role("button", name="Send a test to alice@kent.police.uk").click()
        expect(page.get_by_text("A test copy was sent to alice@kent.police.uk.")).to_be_visible()
        assert sink.handler.wait_until(lambda h: h.copies("alice@kent.police.uk") >= 1,
                                       timeout=15)

        page.get_by_role("button", name="Request approval").click()
        expect(page.get_by_text("Approval requested: another")).to_be_visible()
        # The author is offered no "Approve" (it would be refused): told who must approve.
        expect(page.get_by_text("another co-ordinator must approve it")).to_be_visible()
        expect(page.get_by_role("button", name="Approve")).to_have_count(0)
    finally:
        first.close()
    with Session(engine) as session:
        assert session.get(Edition, eid).status == EditionStatus.DRAFT

    # Tomorrow at 09:00 UK time, typed as a co-ordinator would.
    day = dt.datetime.now(LONDON).date() + dt.timedelta(days=1)
    when = dt.datetime.combine(day, dt.time(9, 0), tzinfo=LONDON)
    second = browser.new_context(user_agent="e2e bob")
    page = second.new_page()
    try:
        _sign_in(page, base, "bob")
        page.goto(edition_url)
        page.get_by_role("button", name="Approve").click()
        expect(page.get_by_text("Approved. It can now be scheduled or sent.")).to_be_visible()
        page.get_by_label("Date").fill(day.isoformat())
        page.get_by_label("Time").fill("09:00")
        page.get_by_role("button", name="Schedule").click()
        expect(page.get_by_text("Scheduled for ")).to_be_visible()
        with Session(engine) as session:
            edition = session.get(Edition, eid)
            assert edition.status == EditionStatus.SCHEDULED
            assert edition.scheduled_for == when.astimezone(dt.UTC)
            assert session.scalar(select(func.count()).select_from(Delivery)) == 0

        # Nothing of Bob's may reach the server while the clock is moved (a request then would
        # find his session idle for a day and end it): the page and its preview frames load
        # in full, then he leaves it.
        page.wait_for_load_state("load")
        page.goto("about:blank")
        # The clock reaches the send time: the scheduler's pass starts the send and the
        # worker delivers it. Playwright's sync API owns this thread's event loop, so the
        # worker gets a thread of its own.
        sessions = session_factory(engine)
        fast = served.model_copy(update={"rate_per_minute": 0, "rate_per_day": 0})
        with time_machine.travel(when + dt.timedelta(seconds=30), tick=True):
            with sessions() as session:
                started = schedule.catch_up(session, fast)
                session.commit()
            assert started.editions == [SAMPLE.stem] and started.queued == 3
            worker = threading.Thread(target=lambda: asyncio.run(
                Worker(fast, sessions, poll=0.05).run(drain=True)))
            worker.start()
            worker.join(60)
        assert not worker.is_alive()

        page.goto(f"{edition_url}/progress")
        expect(page.locator("#count-sent")).to_have_text("3")
        for state in ("queued", "retry", "failed", "bounced"):
            expect(page.locator(f"#count-{state}")).to_have_text("0")
        expect(page.get_by_text("Time left: done.")).to_be_visible()
        page.get_by_role("link", name="Audit log").click()
        rows = page.locator("table.audit tbody tr")
        # all_inner_texts() does not wait: wait for the audit page's eight rows first.
        expect(rows).to_have_count(8)  # no refused approval: not offered
        text = rows.all_inner_texts()
        page.screenshot(path=str(artifacts / "admin-audit.png"), full_page=True)
        page.get_by_label("Who (login)").fill("bob")
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(3)
        assert all("(bob)" in row for row in rows.all_inner_texts())
    finally:
        second.close()

    for email, _region in READERS:
        assert sink.handler.copies(email) == 1
    with Session(engine) as session:
        edition = session.get(Edition, eid)
        assert edition.status == EditionStatus.SENT
        assert (edition.created_by, edition.approval_requested_by, edition.approved_by,
                edition.scheduled_by) == ("alice", "alice", "bob", "bob")
        trail = [(e.actor, e.action, e.ip) for e in session.scalars(
            select(audit.AuditEntry).order_by(audit.AuditEntry.id))]
    assert [(who, action) for who, action, _ip in trail] == [
        ("alice", "login.ok"), ("alice", "edition.save"), ("alice", "edition.test_send"),
        ("alice", "edition.request_approval"),
        ("bob", "login.ok"), ("bob", "edition.approve"), ("bob", "edition.schedule"),
        ("scheduler", "edition.start")]  # and the send started when it was due
    assert {ip for who, _action, ip in trail if who != "scheduler"} == {"127.0.0.1"}
    # The page shows each step with the person's name, the login and the face; the address it
    # came from only to an administrator (issue 17, D3: Bob is a co-ordinator).
    # Actions read as words there ("Edition: request approval"), not as their codes.
    for name, action in (("Alice Author", "Edition: save"), ("Alice Author", "Edition: test send"),
                         ("Alice Author", "Edition: request approval"),
                         ("Bob Approver", "Edition: approve"),
                         ("Bob Approver", "Edition: schedule")):
        assert any(name in row and action in row and "console" in row
                   for row in text), (name, action)
    assert not any("127.0.0.1" in row for row in text)
    assert any("scheduler" in row and "Edition: start" in row for row in text)


# A stored code of a vocabulary or a state (they are the ones with an underscore).
STORED_CODE = re.compile(r"\b(?:awaiting_approval|first_responder|local_authority|"
                         r"support_worker|as_scheduled)\b")


# The elements reaching past a phone's width, to say where a page overflows.
WIDER_THAN_375 = """[...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > 375)
    .map(e => `${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}`).slice(-4).join(', ')"""


# What a page shows does not depend on the database behind it, and this walk is the suite's
# longest test: it runs on the embedded default only.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_every_console_page_passes_axe(browser: Any, served: Settings, sink: FaultServer,
                                       engine: Engine) -> None:
    """Each GET page of the console's route table, in the states that change what it shows
    (empty, with problems, with each edition state's forms, live and finished sends), and the
    refusals; the test fails if a console page in the route table was not checked."""
    if not AXE.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"axe-core missing at {AXE}")
        pytest.skip("axe-core not installed (npm install --prefix var/axe axe-core@4)")
    base = served.base_url
    make_user(engine, "root", role="admin", regions=(), name="Ada Admin",
              email="ada@kent.police.uk")
    make_user(engine, "vic", role="viewer", regions=("kent",), name="Vic Viewer")
    make_user(engine, "two", name="Tom Twofactor")
    with session_factory(engine)() as session:
        accounts.enable_totp(session, accounts.get_user(session, "two"))
        session.commit()
    (sid, pending, *_rest) = people(engine, served, READERS)
    states = {name: sample_edition(engine, served, author="alice", regions="[kent]",
                                   slug=f"axe-{name}")
              for name in ("forward", "approved", "sending", "sent")}
    today = dt.datetime.now(dt.UTC).date()
    with session_factory(engine)() as session:
        store.get(session, pending).status = "awaiting_approval"
        editions = {k: outbox.get_edition(session, v) for k, v in states.items()}
        for edition in editions.values():
            outbox.request_approval(session, edition, "alice")
        for name in ("approved", "sending", "sent"):
            outbox.approve(session, editions[name], "bob")
        outbox.send_approved(session, editions["sending"], "bob")
        event_id = events.add_event(session, events.EventSpec(
            name="Harbour watch day", yearly=True, starts_on=today + dt.timedelta(days=20)))[0].id
        events.plan_reminders(session)
        session.commit()
    with session_factory(engine)() as session:  # one finished send, with its figures
        outbox.send_approved(session, outbox.get_edition(session, states["sent"]), "bob")
        session.commit()
    fast = served.model_copy(update={"rate_per_minute": 0, "rate_per_day": 0})
    sessions = session_factory(engine)
    # Only the "sent" edition's rows are due: pause the other one while the worker drains.
    with sessions() as session:
        outbox.set_status(session, outbox.get_edition(session, states["sending"]),
                          EditionStatus.PAUSED)
        session.commit()
    worker = threading.Thread(target=lambda: asyncio.run(
        Worker(fast, sessions, poll=0.05).run(drain=True)))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    with sessions() as session:
        outbox.set_status(session, outbox.get_edition(session, states["sending"]),
                          EditionStatus.SENDING)
        session.commit()
    with Session(engine) as session:
        edition = session.get(Edition, states["sent"])
        assert edition is not None and edition.status == EditionStatus.SENT
    # Bounces: one suppressed (shown on its subscriber's page), one tied to nobody, and a
    # domain alert with its resolve forms; the alert mailed to the co-ordinators (a row with
    # its mailing state on the dashboard).
    bounce(engine, served, states["sent"], [(sid, READERS[0][0])])
    bounce(engine, served, None, [(None, "stranger@example.org")])
    aid, _essex_edition, _officers = domain_alert(engine, served)
    assert alerts.mail_pending(sessions, served) == 1
    kent_segment(engine, served)
    # Readers' replies: one forwarded, one the relay has refused so far (its error shown).
    with sessions() as session:
        for n, raw in enumerate([
                f"From: Jo Bloggs <{READERS[0][0]}>\r\nSubject: Re: training\r\n\r\nYes\r\n",
                "From: stranger@example.org\r\nSubject: Question\r\n\r\nHello\r\n"]):
            message = InboundMessage(raw.encode(), "axe")
            kept, _ = replies.keep(session, message,
                                   classify_inbound(message.raw, served.secret()))
            if n == 0:
                kept.forwarded_at, kept.forwarded_to = kept.received_at, served.contact_address
            else:
                kept.attempts, kept.last_error = 2, "421 4.3.2 try again later"
        session.commit()

    context = browser.new_context(bypass_csp=True)  # only so axe itself can be injected
    page = context.new_page()
    problems: list[str] = []
    visited: set[str] = set()

    def check(path: str | None = None, route: str | None = None) -> None:
        if path is not None:
            page.goto(base + path)
        problems.extend(_axe(page))
        where = path or page.url
        if "/preview.html" not in where and "/draft/" not in where:  # an email, not a page
            # Labels, not the codes stored: no awaiting_approval or first_responder shown.
            shown = page.evaluate("document.body.innerText")
            problems.extend(f"{where}: shows the code {code!r}"
                            for code in set(STORED_CODE.findall(shown)))
            # No horizontal scroll on a phone: a wide table scrolls in its own box.
            page.set_viewport_size({"width": 375, "height": 720})
            width = page.evaluate("document.documentElement.scrollWidth")
            if width > 375:
                wide = page.evaluate(WIDER_THAN_375)
                problems.append(f"{where}: {width} px wide at 375 px ({wide})")
            page.set_viewport_size({"width": 1280, "height": 720})
        if route:
            visited.add(route)

    try:
        check("/admin/login", "/admin/login")
        page.get_by_role("button", name="Sign in").click()  # empty: the error state
        check()
        page.get_by_label("Login").fill("two")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()  # the second factor is asked for
        expect(page.get_by_text("this one does")).to_be_visible()
        check()
        _sign_in(page, base, "vic")  # a viewer's pages, and a refusal
        check("/admin")  # the alert without its forms
        check("/admin/bounces")  # Kent's only
        check(f"/admin/editions/{states['approved']}")  # no forms for a viewer
        check("/admin/users")
        expect(page.get_by_role("heading", name="You do not have permission to do this")
               ).to_be_visible()
        page.goto(f"{base}/admin")
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in to the console")).to_be_visible()

        _sign_in(page, base, "root")
        # At 1280 px an administrator's header (every page's link) keeps to its two rows: the
        # name with who is signed in, then the links on one line.
        rows = page.evaluate("""() => {
            const top = e => e.getBoundingClientRect().top;
            const brand = top(document.querySelector('header .brand'));
            const signout = top(document.querySelector('header .signout'));
            const links = [...document.querySelectorAll('header nav a')];
            return [Math.abs(brand - signout) < 16,
                    new Set(links.map(a => Math.round(top(a)))).size];
        }""")
        assert rows == [True, 1], rows
        page.goto(f"{base}/admin/editions/new")
        page.get_by_label("Edition file (.md)").set_input_files(str(SAMPLE))
        page.get_by_role("button", name="Save and preview").click()
        eid = int(page.url.split("?")[0].rsplit("/", 1)[1])
        check(None, "/admin/editions/{eid}")  # a draft, with the notice
        for path, route in (
                ("/admin", "/admin"), ("/admin/", "/admin/"),
                ("/admin/subscribers", "/admin/subscribers"),
                ("/admin/subscribers?status=awaiting_approval&region=kent", None),
                (f"/admin/subscribers/{sid}", "/admin/subscribers/{sid}"),
                (f"/admin/subscribers/{pending}", None),  # approve and turn down
                ("/admin/subscribers/new", "/admin/subscribers/new"),
                (f"/admin/subscribers/{sid}/erase", "/admin/subscribers/{sid}/erase"),
                ("/admin/import", "/admin/import"), ("/admin/editions", "/admin/editions"),
                ("/admin/editions/new", "/admin/editions/new"),
                (f"/admin/editions/{eid}/edit", "/admin/editions/{eid}/edit"),
                (f"/admin/editions/{eid}/progress", "/admin/editions/{eid}/progress"),
                (f"/admin/editions/{eid}/preview.html", "/admin/editions/{eid}/preview.html"),
                (f"/admin/editions/{states['forward']}", None),  # the approve button
                (f"/admin/editions/{states['approved']}", None),  # schedule and send
                (f"/admin/editions/{states['sending']}", None),  # pause and cancel
                (f"/admin/editions/{states['sent']}", None),  # send again, to colleagues
                (f"/admin/editions/{states['sending']}/progress", None),  # live
                (f"/admin/editions/{states['sent']}/progress", None),  # finished
                ("/admin/bounces", "/admin/bounces"), ("/admin/replies", "/admin/replies"),
                ("/admin/events", "/admin/events"), ("/admin/audit", "/admin/audit"),
                ("/admin/audit?actor=root&action=login.ok", None),
                ("/admin/users", "/admin/users"), ("/admin/privacy", "/admin/privacy"),
                ("/admin/users/new", "/admin/users/new"),
                ("/admin/users/two", "/admin/users/{login}"),  # with a second factor
                ("/admin/users/root", None),  # one's own: no role, regions or disable
                ("/admin/subscribers/999999", None),
                ("/admin/audit?since=yesterday", None),  # 404 and 400 pages
                ("/admin/editions/compose", "/admin/editions/compose"),
                ("/admin/editions/compose?start=last", None),
                (f"/admin/editions/{eid}/compose", "/admin/editions/{eid}/compose"),
                (f"/admin/events/{event_id}/edit", "/admin/events/{event_id}/edit"),
                ("/admin/segments", "/admin/segments"),
                ("/admin/segments/kent-all", "/admin/segments/{slug}")):
            check(path, route)
        page.get_by_role("button", name="Count readers").click()  # the live count shown
        expect(page.locator("#live-count")).to_be_visible()
        check()
        page.goto(f"{base}/admin/segments")
        page.get_by_role("button", name="Add the segment").click()  # empty: what is wrong
        expect(page.get_by_role("heading", name="There is a problem")).to_be_visible()
        check()
        page.goto(f"{base}/admin/editions/{eid}/compose")  # the editor's preview, no save
        page.get_by_role("button", name="Preview without saving").click()
        draft = page.locator("#preview-phone").get_attribute("src")
        check()
        assert draft is not None and "/admin/editions/draft/" in draft
        check(draft.removeprefix(base), "/admin/editions/draft/{key}.html")

        page.goto(f"{base}/admin/editions/{states['approved']}")
        page.get_by_role("button", name="Send now").click()  # not ticked: said on the page
        expect(page.get_by_role("heading", name="There is a problem")).to_be_visible()
        check()
        page.goto(f"{base}/admin/users/new")
        page.get_by_role("button", name="Add user").click()  # empty: what is wrong
        expect(page.get_by_role("heading", name="There is a problem")).to_be_visible()
        check()
        page.goto(f"{base}/admin/subscribers/new")
        page.get_by_role("button", name="Add subscriber").click()  # empty: the errors
        expect(page.get_by_role("heading", name="There is a problem")).to_be_visible()
        check()
        page.goto(f"{base}/admin/subscribers/{sid}/erase")
        page.get_by_role("button", name="Erase for good").click()  # not confirmed: refused
        check()
        page.goto(f"{base}/admin/editions/new")
        page.get_by_label("Or paste the source").fill("---\ntitle: x\n---\n")
        page.get_by_role("button", name="Save and preview").click()
        expect(page.get_by_role("heading", name="There is a problem")).to_be_visible()
        check()
        for name, body in (("bad.csv", "email,name,region\nnot-an-address,X,kent\n"),
                           ("good.csv", "email,name,region\nnew@kent.police.uk,N,kent\n")):
            page.goto(f"{base}/admin/import")
            page.get_by_label("CSV file").set_input_files(files=[{
                "name": name, "mimeType": "text/csv", "buffer": body.encode()}])
            page.get_by_role("button", name="Check the file").click()
            check()  # the report: problems, or ready to import
        page.get_by_role("button", name="Import 1 new subscriber(s)").click()
        expect(page.get_by_role("heading", name="Imported")).to_be_visible()
        check()
        page.goto(f"{base}/admin/bounces")
        page.get_by_role("button", name=f"Dismiss alert {aid}").click()  # the notice after
        expect(page.get_by_text(f"Alert {aid} dismissed")).to_be_visible()
        check()
    finally:
        context.close()
    assert problems == []
    pages = {path for method, path in _console_routes(served) if method == "GET"}
    pages -= {"/admin/static/admin.css", "/admin/static/progress.js",  # not pages
              "/admin/static/editor.js",
              "/admin/subscribers/export.csv", "/admin/editions/{eid}/progress.json",
              # a chart's picture and figures: shown and linked on the dashboard and a sent
              # edition's page, which are checked
              "/admin/charts/{chart}.svg", "/admin/charts/{chart}.csv",
              "/admin/editions/{eid}/chart.svg", "/admin/editions/{eid}/chart.csv",
              # sign-in with a directory, not set up here: tests/test_oidc.py walks its pages
              # with a real provider in Chromium and axe-core
              "/admin/login/directory", "/admin/login/directory/callback"}
    assert pages - visited == set()


def test_the_progress_page_updates_itself_without_reloading_and_can_be_paused(
        browser: Any, served: Settings, sink: FaultServer, engine: Engine) -> None:
    base = served.base_url
    make_user(engine, "root", role="admin", regions=(), name="Ada Admin")
    people(engine, served, READERS)
    eid = sample_edition(engine, served, author="alice")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "alice")
        outbox.approve(session, edition, "bob")
        outbox.send_approved(session, edition, "bob")
        session.commit()
    context = browser.new_context()  # the page's own CSP, which must let its script run
    page = context.new_page()
    try:
        _sign_in(page, base, "root")
        page.goto(f"{base}/admin/editions/{eid}/progress")
        expect(page.locator("#count-queued")).to_have_text("3")
        expect(page.locator("#live-note")).to_have_text("The figures update every 10 seconds.")
        assert page.locator("meta[http-equiv=refresh]").count() == 0
        pause = page.get_by_role("button", name="Pause updates")
        pause.click()
        resume = page.get_by_role("button", name="Resume updates")
        expect(resume).to_have_attribute("aria-pressed", "true")
        resume.click()
        expect(page.get_by_role("button", name="Pause updates")).to_have_attribute(
            "aria-pressed", "false")
        page.evaluate("() => { window.loadedOnce = true; }")  # lost if the page reloads

        fast = served.model_copy(update={"rate_per_minute": 0, "rate_per_day": 0})
        sessions = session_factory(engine)
        worker = threading.Thread(target=lambda: asyncio.run(
            Worker(fast, sessions, poll=0.05).run(drain=True)))
        worker.start()
        worker.join(60)
        assert not worker.is_alive()
        # The next fetch (within 10 s) writes the final figures into the same page.
        expect(page.locator("#count-sent")).to_have_text("3", timeout=20_000)
        expect(page.locator("#count-queued")).to_have_text("0")
        expect(page.locator("#progress-status")).to_have_text("sent")
        expect(page.locator("#live-note")).to_have_text(
            "Finished: these are the final figures.")
        expect(page.get_by_role("button", name="Pause updates")).to_be_hidden()
        assert page.evaluate("() => window.loadedOnce === true")
    finally:
        context.close()


def _console_routes(settings: Settings) -> list[tuple[str, str]]:
    from fastapi.testclient import TestClient

    from mailer.web.app import create_app

    with TestClient(create_app(settings)) as client:  # closes its database threads after
        return _routes(client.app)
