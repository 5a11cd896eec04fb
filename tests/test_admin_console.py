"""What the console does, page by page, on both databases: the dashboard's figures, subscribers
(search, view with consent history and deliveries, add, edit, unsubscribe, erase behind its
confirmation, pending sign-ups approved or turned down), the CSV import's report before it is
applied, the export, the edition controls (pause, resume, cancel, progress, an edit withdrawing
approval), the calendar, and the audit log's filters (and that nothing in the app can change
it). Permissions and region scope are in test_admin_routes.py; the browser flow in
test_admin_e2e.py.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import re
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.routing import Mount

from mailer import audit, events, outbox
from mailer.config import Settings
from mailer.models import Delivery, Edition, EditionStatus
from mailer.web.app import create_app
from mailer.worker import Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Subscriber
from tests.smtp_servers import FaultServer
from tests.test_admin_routes import (  # noqa: F401
    _flat,
    _routes,
    app_client,
    login,
    make_user,
    people,
    sample_edition,
)
from tests.web_fixtures import (  # noqa: F401
    BASE,
    csrf_of,
    events_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)


def _signed_in(client: TestClient, engine: Engine, who: str = "root", role: str = "admin",
               regions: tuple[str, ...] = (), **kw: Any) -> str:
    """Sign in a new user; returns a CSRF token for the forms."""
    make_user(engine, who, role=role, regions=regions, **kw)
    assert login(client, who).status_code == 303
    return csrf_of(client.get("/admin").text)


def _count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _audit(engine: Engine) -> list[tuple[str, str, str | None]]:
    with Session(engine) as session:
        return [(e.actor, e.action, e.target) for e in session.scalars(
            select(audit.AuditEntry).where(~audit.AuditEntry.action.startswith("login"))
            .order_by(audit.AuditEntry.id))]


def _drain(settings: Settings, engine: Engine) -> None:
    fast = settings.model_copy(update={"rate_per_minute": 0, "rate_per_day": 0})
    asyncio.run(Worker(fast, session_factory(engine), poll=0.05).run(drain=True))


def test_the_dashboard_shows_figures_waiting_work_reminders_and_recent_sends(
        engine: Engine, web_settings: Settings, sink: FaultServer) -> None:
    # A loopback base URL: the messages' List-Unsubscribe takes http only there.
    local = web_settings.model_copy(update={"base_url": "http://127.0.0.1:8000"})
    with TestClient(create_app(local), base_url="http://127.0.0.1:8000") as client:
        _dashboard(client, engine, local, sink)


def _dashboard(app_client: TestClient, engine: Engine, web_settings: Settings,
               sink: FaultServer) -> None:
    ids = people(engine, web_settings, [("k1@kent.police.uk", "kent"),
                                        ("k2@kent.police.uk", "kent"),
                                        ("e1@essex.police.uk", "essex")])
    first = sample_edition(engine, web_settings, "alice")
    second = sample_edition(engine, web_settings, "alice", regions="[kent]", slug="2020-q4-kent")
    with session_factory(engine)() as session:
        store.get(session, ids[2]).status = "awaiting_approval"
        sent, waiting = outbox.get_edition(session, first), outbox.get_edition(session, second)
        for edition in (sent, waiting):
            outbox.request_approval(session, edition, "alice")
            outbox.approve(session, edition, "bob")
        outbox.schedule(session, waiting, "bob", dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
        outbox.send_approved(session, sent, "bob")
        today = dt.datetime.now(dt.UTC).date()
        events.add_event(session, events.EventSpec(name="Harbour watch day", yearly=False,
                                                   starts_on=today + dt.timedelta(days=30),
                                                   offsets=[7]))
        events.plan_reminders(session)
        session.commit()
    _drain(web_settings, engine)
    _signed_in(app_client, engine)
    page = app_client.get("/admin").text
    assert "1 sign-up(s) waiting for approval" in page
    assert re.search(r'Kent</th><td class="num">2<', page)  # active, by region
    assert re.search(r'awaiting_approval</th><td class="num">1<', page)
    assert re.search(r'2020-q4-kent</a></td><td>scheduled</td>', page)
    assert "Harbour watch day (7 days before)" in page
    # Recent sends with their figures: two sent (the pending sign-up is not in the audience).
    assert re.search(r'2020-q3-kent-essex</a></td><td>sent</td><td class="num">2</td>'
                     r'<td class="num">0</td><td class="num">0</td><td class="num">0</td>', page)
    assert sink.handler.copies("k1@kent.police.uk") == 1
    assert sink.handler.copies("e1@essex.police.uk") == 0


def test_a_subscriber_is_found_viewed_added_changed_unsubscribed_and_erased(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    people(engine, web_settings, [("other@kent.police.uk", "kent")])
    token = _signed_in(app_client, engine)
    missing = app_client.post("/admin/subscribers/new", data={
        "csrf_token": token, "email": "jo@kent.police.uk", "region": "kent",
        "topics": ["newsletter"], "lawful_basis": ""})
    assert missing.status_code == 400 and "lawful basis" in missing.text
    bad = app_client.post("/admin/subscribers/new", data={
        "csrf_token": token, "email": "not an address", "region": "kent",
        "topics": ["newsletter"], "lawful_basis": "public_task"})
    assert bad.status_code == 400 and 'aria-invalid="true"' in bad.text
    added = app_client.post("/admin/subscribers/new", data={
        "csrf_token": token, "email": "Jo.Bloggs@kent.police.uk", "name": "Jo Bloggs",
        "region": "kent", "role": "first_responder", "topics": ["newsletter"],
        "lawful_basis": "legitimate_interests"}, follow_redirects=False)
    assert added.status_code == 303
    sid = int(added.headers["location"].split("?")[0].rsplit("/", 1)[1])

    found = app_client.get("/admin/subscribers?q=bloggs").text
    assert "Jo.Bloggs@kent.police.uk" in found and "other@kent.police.uk" not in found
    by_role = app_client.get("/admin/subscribers?role=first_responder").text
    assert "1 subscriber(s)" in by_role
    assert app_client.get("/admin/subscribers?status=nonsense").status_code == 400
    view = app_client.get(f"/admin/subscribers/{sid}").text
    assert "Legitimate interests" in view or "legitimate_interests" in view
    assert re.search(r"<td>add</td><td>admin</td><td></td><td>root</td>", view)
    assert re.search(r"\d\d \w{3} \d{4} \d\d:\d\d (GMT|BST)", view)  # UK time, not UTC ISO

    edited = app_client.post(f"/admin/subscribers/{sid}/edit", data={
        "csrf_token": token, "name": "Jo Smith", "region": "kent",
        "role": "first_responder"}, follow_redirects=False)
    assert "The+changes+were+saved" in edited.headers["location"]
    unchanged = app_client.post(f"/admin/subscribers/{sid}/edit", data={
        "csrf_token": token, "name": "Jo Smith", "region": "kent",
        "role": "first_responder"}, follow_redirects=False)
    assert "Nothing+had+changed" in unchanged.headers["location"]
    out = app_client.post(f"/admin/subscribers/{sid}/unsubscribe", data={"csrf_token": token})
    assert "Unsubscribed from everything." in out.text
    with Session(engine) as session:
        assert store.get(session, sid).name == "Jo Smith"
        assert store.get(session, sid).status == "unsubscribed"

    confirm = app_client.get(f"/admin/subscribers/{sid}/erase")
    assert "Jo.Bloggs@kent.police.uk" in confirm.text and "cannot be undone" in confirm.text
    refused = app_client.post(f"/admin/subscribers/{sid}/erase",
                              data={"csrf_token": token, "confirm": "yes"})
    assert refused.status_code == 400 and "type the word erase" in refused.text.lower()
    assert _count(engine, Subscriber) == 2
    erased = app_client.post(f"/admin/subscribers/{sid}/erase",
                             data={"csrf_token": token, "confirm": "erase"})
    assert f"Subscriber {sid} was erased." in erased.text
    assert app_client.get(f"/admin/subscribers/{sid}").status_code == 404
    with Session(engine) as session:
        row = session.get(Subscriber, sid)
        assert (row.status, row.email, row.name) == ("erased", None, None)
    trail = _audit(engine)
    assert trail == [("root", action, f"subscriber:{sid}") for action in
                     ("subscriber.add", "subscriber.edit", "subscriber.unsubscribe",
                      "subscriber.erase")]
    audit_page = app_client.get("/admin/audit").text
    assert "Bloggs" not in audit_page and "Jo Smith" not in audit_page


def test_pending_sign_ups_are_approved_or_turned_down(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    one, two = people(engine, web_settings, [("a@gmail.com", "kent"), ("b@gmail.com", "kent")])
    with session_factory(engine)() as session:
        for sid in (one, two):
            store.get(session, sid).status = "awaiting_approval"
        session.commit()
    token = _signed_in(app_client, engine)
    listed = app_client.get("/admin/subscribers?status=awaiting_approval").text
    assert "2 subscriber(s)" in listed
    assert "Approve sign-up" in app_client.get(f"/admin/subscribers/{one}").text
    ok = app_client.post(f"/admin/subscribers/{one}/approve", data={"csrf_token": token})
    assert "Approved: they will receive the next send." in ok.text
    no = app_client.post(f"/admin/subscribers/{two}/reject", data={"csrf_token": token})
    assert "The sign-up was turned down." in no.text
    again = app_client.post(f"/admin/subscribers/{one}/approve", data={"csrf_token": token})
    assert "Nothing to approve" in again.text
    with Session(engine) as session:
        assert [store.get(session, s).status for s in (one, two)] == ["active", "unsubscribed"]
    assert [a for _w, a, _t in _audit(engine)] == ["subscriber.approve", "subscriber.reject"]
    assert [e[0] for e in events_of(engine, one)][-1] == "approve"


def test_a_csv_import_shows_its_report_and_writes_nothing_until_confirmed(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    token = _signed_in(app_client, engine)
    good = b"email,name,region\na@kent.police.uk,A,kent\nb@essex.police.uk,B,essex\n"
    bad = good + b"not-an-address,C,kent\n"
    answer = app_client.post("/admin/import", data={"csrf_token": token,
                                                    "lawful_basis": "public_task"},
                             files={"file": ("people.csv", bad, "text/csv")})
    assert answer.status_code == 400
    assert "The file has problems: nothing was imported" in answer.text
    assert "<td>4</td><td>email</td>" in answer.text and "Import 2 new" not in answer.text
    checked = app_client.post("/admin/import", data={"csrf_token": token,
                                                     "lawful_basis": "public_task"},
                              files={"file": ("people.csv", good, "text/csv")})
    assert checked.status_code == 200
    assert "Checked: nothing has been imported yet" in checked.text
    assert _count(engine, Subscriber) == 0  # the report comes first
    sha = re.search(r'name="sha" value="([0-9a-f]{64})"', checked.text)
    assert sha and "Import 2 new subscriber(s)" in checked.text
    applied = app_client.post("/admin/import", data={
        "csrf_token": token, "lawful_basis": "public_task", "sha": sha[1],
        "name": "people.csv"})
    assert applied.status_code == 200 and "Imported" in applied.text
    assert _count(engine, Subscriber) == 2
    replay = app_client.post("/admin/import", data={
        "csrf_token": token, "lawful_basis": "public_task", "sha": sha[1]})
    assert replay.status_code == 400 and "Upload the file again" in replay.text
    assert [(a, t) for _w, a, t in _audit(engine)] == [("subscribers.import", None)]


def test_the_export_is_the_filtered_list_with_formulas_defused(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    (sid, _essex) = people(engine, web_settings, [("x@kent.police.uk", "kent"),
                                                   ("e@essex.police.uk", "essex")])
    with session_factory(engine)() as session:
        # Input refuses a leading '=' already; a row from before that rule (or a restore)
        # must still leave as text, never as a formula.
        session.get(Subscriber, sid).organisation = '=HYPERLINK("http://evil")'
        session.commit()
    _signed_in(app_client, engine)
    export = app_client.get("/admin/subscribers/export.csv?region=kent")
    assert export.headers["content-disposition"].startswith(
        'attachment; filename="subscribers-kent-')
    (row,) = csv.DictReader(io.StringIO(export.text))
    assert row["email"] == "x@kent.police.uk" and row["organisation"].startswith("'=")
    assert _audit(engine) == [("root", "subscribers.export", None)]


def test_a_send_is_paused_resumed_cancelled_and_watched(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    people(engine, web_settings, [("k@kent.police.uk", "kent"), ("e@essex.police.uk", "essex")])
    eid = sample_edition(engine, web_settings, author="alice")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "alice")
        outbox.approve(session, edition, "bob")
        session.commit()
    token = _signed_in(app_client, engine)
    page = app_client.get(f"/admin/editions/{eid}").text
    assert "Send now" in page and "Schedule" in page
    unconfirmed = app_client.post(f"/admin/editions/{eid}/send", data={"csrf_token": token})
    assert unconfirmed.status_code == 409 and "tick the box" in unconfirmed.text.lower()
    sent = app_client.post(f"/admin/editions/{eid}/send",
                           data={"csrf_token": token, "confirm": "yes"})
    assert "Sending: 2 message(s) queued." in sent.text
    live = app_client.get(f"/admin/editions/{eid}/progress")
    assert '<td class="num" id="count-queued">2</td>' in live.text
    # A live send updates itself by script (its own file only), never by a timed reload.
    assert "/admin/static/progress.js" in live.text and 'http-equiv="refresh"' not in live.text
    assert "script-src 'self'" in live.headers["content-security-policy"]
    figures = app_client.get(f"/admin/editions/{eid}/progress.json").json()
    assert (figures["status"], figures["counts"]["queued"], figures["total"],
            figures["live"]) == ("sending", 2, 2, True)
    for step, expect in (("pause", "paused"), ("resume", "sending"), ("cancel", "cancelled")):
        answer = app_client.post(f"/admin/editions/{eid}/{step}", data={"csrf_token": token})
        assert answer.status_code == 200, (step, answer.text)
        with Session(engine) as session:
            assert session.get(Edition, eid).status == expect, step
    late = app_client.post(f"/admin/editions/{eid}/resume", data={"csrf_token": token})
    assert late.status_code == 409 and "That cannot be done now" in late.text
    done = app_client.get(f"/admin/editions/{eid}/progress")
    assert '<td class="num" id="count-skipped">2</td>' in done.text
    assert "/admin/static/progress.js" not in done.text
    assert "script-src" not in done.headers["content-security-policy"]
    assert app_client.get(f"/admin/editions/{eid}/progress.json").json()["live"] is False
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)
                              .where(Delivery.status == "queued")) == 0
    assert [a for _w, a, _t in _audit(engine)] == [
        "edition.send", "edition.pause", "edition.resume", "edition.cancel"]


def test_an_edit_in_the_console_withdraws_the_approval(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    eid = sample_edition(engine, web_settings, author="alice")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "alice")
        outbox.approve(session, edition, "bob")
        outbox.schedule(session, edition, "bob", dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        source = edition.source
        session.commit()
    token = _signed_in(app_client, engine)
    form = app_client.get(f"/admin/editions/{eid}/edit").text
    assert "Feedback and suggestions" in form
    broken = app_client.post(f"/admin/editions/{eid}/edit",
                             data={"csrf_token": token, "source": "---\ntitle: x\n---\n"})
    assert broken.status_code == 400 and "There is a problem" in broken.text
    with Session(engine) as session:
        assert session.get(Edition, eid).status == EditionStatus.SCHEDULED  # untouched
    saved = app_client.post(f"/admin/editions/{eid}/edit", data={
        "csrf_token": token,
        "source": source.replace("Feedback and suggestions", "Feedback or suggestions")})
    assert "Saved. Check the preview below." in saved.text
    with Session(engine) as session:
        edition = session.get(Edition, eid)
        assert (edition.status, edition.approved_by, edition.scheduled_for) == \
            ("draft", None, None)
    assert [a for _w, a, _t in _audit(engine)] == ["edition.save"]


def test_the_calendar_shows_the_next_reminders_and_their_not_after_times(
        app_client: TestClient, engine: Engine) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with session_factory(engine)() as session:
        events.add_event(session, events.EventSpec(name="Harbour watch day",
                                                   starts_on=today + dt.timedelta(days=20),
                                                   yearly=True, offsets=[7, 1]))
        events.plan_reminders(session)
        session.commit()
        rows = [(r.send_at, r.not_after) for r in events.reminders_for(session, session.scalar(
            select(events.Event.id).where(events.Event.name == "Harbour watch day")))]
    _signed_in(app_client, engine, who="vic", role="viewer", regions=("kent",))
    page = app_client.get("/admin/events").text
    assert "<td>Harbour watch day</td><td>" + (today + dt.timedelta(days=20)).isoformat() in page
    shown = re.findall(r"<td>Harbour watch day</td><td>[\d-]+</td><td>([^<]+)</td>"
                       r"<td>([^<]+)</td><td>planned</td>", page)
    assert len(shown) >= 2
    zone = "Europe/London"
    from zoneinfo import ZoneInfo

    first_send, first_not_after = rows[0]
    assert shown[0] == (first_send.astimezone(ZoneInfo(zone)).strftime("%d %b %Y %H:%M %Z"),
                        first_not_after.astimezone(ZoneInfo(zone)).strftime(
                            "%d %b %Y %H:%M %Z"))


def test_the_audit_log_is_filtered_and_nothing_in_the_app_can_change_it(
        app_client: TestClient, engine: Engine) -> None:
    with session_factory(engine)() as session:
        for actor, action, target in (("alice", "edition.save", "edition:1"),
                                      ("alice", "edition.request_approval", "edition:1"),
                                      ("bob", "edition.approve", "edition:1"),
                                      ("bob", "subscriber.erase", "subscriber:9")):
            audit.record(session, actor=actor, action=action, target=target, ip="10.0.0.1")
        session.commit()
    _signed_in(app_client, engine)

    def rows(query: str) -> int:
        page = app_client.get(f"/admin/audit?{query}")
        assert page.status_code == 200, query
        return len(re.findall(r"<tr><td>\d\d \w{3}", page.text))

    assert rows("actor=alice") == 2
    assert rows("action=edition.") == 3  # a prefix ending in '.'
    assert rows("action=edition.approve") == 1
    assert rows("target=subscriber:9") == 1
    today = dt.datetime.now(dt.UTC).date()
    assert rows(f"since={today}&until={today}") == 5  # and the sign-in
    assert rows(f"until={today - dt.timedelta(days=1)}") == 0
    assert app_client.get("/admin/audit?since=yesterday").status_code == 400
    # No route of the console or the API writes to the log: only GETs reach it.
    app = app_client.app
    console = {(m, r.path) for r in _flat(list(app.routes)) if not isinstance(r, Mount)
               for m in (getattr(r, "methods", None) or ()) if r.path.startswith("/admin/audit")}
    assert console == {("GET", "/admin/audit")}
    api = next(r for r in app.routes if isinstance(r, Mount) and r.path == "/api/v1").app
    assert {m for r in api.routes if r.path == "/audit" for m in r.methods} == {"GET"}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert app_client.request(method, "/admin/audit").status_code == 405
    assert _count(engine, audit.AuditEntry) == 5
