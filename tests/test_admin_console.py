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
import threading
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.routing import Mount

from mailer import accounts, alerts, audit, bounce_policy, events, outbox
from mailer.bounce_policy import BouncePolicy
from mailer.config import Settings
from mailer.models import Delivery, Edition, EditionStatus
from mailer.web.app import create_app
from mailer.worker import Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Subscriber
from tests.clock import uk_noon_in
from tests.smtp_servers import FaultServer
from tests.test_admin_routes import (  # noqa: F401
    PASSWORD,
    _flat,
    _routes,
    app_client,
    bounce,
    domain_alert,
    login,
    make_user,
    people,
    sample_edition,
    sent_edition,
)
from tests.waiting import a_session_waits_on_a_lock
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
        outbox.schedule(session, waiting, "bob", uk_noon_in(2))
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
    assert re.search(r'Quarterly newsletter</th><td class="num">2<', page)  # by topic, named
    # Labels, not the codes stored (awaiting_approval, scheduled, sent).
    assert re.search(r'Waiting for approval</th><td class="num">1<', page)
    assert re.search(r'2020-q4-kent</a></td><td>Scheduled</td>', page)
    assert "awaiting_approval" not in re.sub(r"<[^>]+>", " ", page)  # in a link, not shown
    assert "Harbour watch day (7 days before)" in page
    # Recent sends with their figures: two sent (the pending sign-up is not in the audience).
    assert re.search(r'2020-q3-kent-essex</a></td><td>Sent</td><td class="num">2</td>'
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


def test_the_subscriber_list_sorts_by_a_column_heading_either_way_keeping_the_filter(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    people(engine, web_settings, [("mid@kent.police.uk", "kent"), ("zed@essex.police.uk", "essex"),
                                  ("abe@kent.police.uk", "kent")])
    _signed_in(app_client, engine)

    def order(query: str) -> list[str]:
        page = app_client.get(f"/admin/subscribers?{query}").text
        return re.findall(r'>([a-z]+)@[a-z.]+</a></td>', page)
    assert order("") == ["mid", "zed", "abe"]  # as they were added
    assert order("sort=address") == ["abe", "mid", "zed"]
    assert order("sort=address&order=descending") == ["zed", "mid", "abe"]
    assert order("sort=region&region=kent") == ["mid", "abe"]  # the filter stays
    page = app_client.get("/admin/subscribers?sort=address&region=kent").text
    assert '<th scope="col" aria-sort="ascending"><a class="sort" href="http://testserver/admin/' \
           'subscribers?region=kent&amp;sort=address&amp;order=descending">Address' in page
    assert app_client.get("/admin/subscribers?sort=password").status_code == 400


def test_an_administrator_manages_users_in_the_console_and_every_change_is_audited(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    token = _signed_in(app_client, engine)  # root, an administrator
    assert 'href="http://testserver/admin/users/new"' in app_client.get("/admin/users").text
    weak = app_client.post("/admin/users/new", data={
        "csrf_token": token, "login": "dana", "name": "Dana Lee", "role": "coordinator",
        "regions": ["kent"], "password": "short"})
    assert weak.status_code == 400 and "There is a problem" in weak.text
    assert "The password is too short: use at least 12 characters." in weak.text
    assert 'value="dana"' in weak.text  # what was typed stays
    added = app_client.post("/admin/users/new", data={
        "csrf_token": token, "login": "dana", "name": "Dana Lee", "role": "coordinator",
        "regions": ["kent"], "email": "dana@kent.police.uk", "password": PASSWORD},
        follow_redirects=False)
    assert added.status_code == 303 and added.headers["location"].startswith(
        "http://testserver/admin/users/dana")
    dana = TestClient(app_client.app, base_url="http://testserver")
    assert login(dana, "dana").status_code == 303
    assert dana.get("/admin").status_code == 200
    changed = app_client.post("/admin/users/dana/edit", data={
        "csrf_token": token, "name": "Dana Lee", "email": "dana@kent.police.uk",
        "role": "viewer", "regions": ["kent", "essex"]})
    assert "They are signed out" in changed.text
    assert dana.get("/admin", follow_redirects=False).status_code == 303  # to sign in again
    assert app_client.post("/admin/users/dana/disable", data={"csrf_token": token}
                           ).status_code == 200
    assert login(dana, "dana").status_code != 303
    app_client.post("/admin/users/dana/enable", data={"csrf_token": token})
    app_client.post("/admin/users/dana/password", data={"csrf_token": token,
                                                        "password": "a new long passphrase"})
    assert login(dana, "dana", password="a new long passphrase").status_code == 303
    own = app_client.get("/admin/users/root").text  # no button that would be refused
    assert "/admin/users/root/disable" not in own and 'name="role"' not in own.split(
        'type="hidden" name="role"')[0]
    refused = app_client.post("/admin/users/root/disable", data={"csrf_token": token})
    assert refused.status_code == 400 and "You cannot disable your own account." in refused.text
    assert app_client.get("/admin/users/nobody").status_code == 404
    with Session(engine) as session:
        _total, rows = audit.entries(session, audit.AuditFilter(target="user:dana"))
    assert sorted((r.action, r.via) for r in rows) == [
        ("user.add", "console"), ("user.change", "console"), ("user.disable", "console"),
        ("user.enable", "console"), ("user.reset_password", "console")]
    change = next(r for r in rows if r.action == "user.change")
    assert change.detail == {"fields": ["role", "regions"], "role": "viewer",
                             "regions": ["kent", "essex"]}


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
    assert "Approved: a welcome mail is on its way" in ok.text
    no = app_client.post(f"/admin/subscribers/{two}/reject", data={"csrf_token": token})
    assert "The sign-up was turned down: a short, kind note" in no.text
    again = app_client.post(f"/admin/subscribers/{one}/approve", data={"csrf_token": token})
    assert "Nothing to approve" in again.text
    with Session(engine) as session:
        assert [store.get(session, s).status for s in (one, two)] == ["active", "unsubscribed"]
    assert [a for _w, a, _t in _audit(engine)] == ["subscriber.approve", "subscriber.reject"]
    assert [e[0] for e in events_of(engine, one)][-1] == "approve"
    with Session(engine) as session:  # the welcome and the note, once each, in the outbox
        assert sorted(session.execute(select(Edition.kind, Delivery.subscriber_id)
                                      .join(Delivery)).all()) == [("declined", two),
                                                                   ("welcome", one)]


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
    # Said on the edition's page, against the box, not on a dead-end page of its own.
    assert unconfirmed.status_code == 400 and "There is a problem" in unconfirmed.text
    assert '<a href="#confirm-send">Tick the box to confirm' in unconfirmed.text
    assert 'aria-describedby="confirm-send-error"' in unconfirmed.text
    assert "Send now" in unconfirmed.text and "Preview" in unconfirmed.text
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
    assert late.status_code == 409 and "There is a problem" in late.text
    assert "cancelled" in late.text.split("There is a problem", 1)[1].split("</ul>", 1)[0]
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


def test_approve_is_offered_only_to_a_second_pair_of_eyes_and_a_refusal_is_said_on_the_page(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    people(engine, web_settings, [("k@kent.police.uk", "kent")])
    eid = sample_edition(engine, web_settings, author="root")  # the signed-in account
    with session_factory(engine)() as session:
        outbox.request_approval(session, outbox.get_edition(session, eid), "root")
        session.commit()
    token = _signed_in(app_client, engine)
    own = app_client.get(f"/admin/editions/{eid}").text
    assert f'action="{BASE}/admin/editions/{eid}/approve"' not in own
    assert "another co-ordinator must approve it" in own
    forced = app_client.post(f"/admin/editions/{eid}/approve", data={"csrf_token": token})
    assert forced.status_code == 403 and "There is a problem" in forced.text
    assert "you wrote or put forward this edition" in forced.text.lower()
    assert "Preview" in forced.text  # the edition's own page, not a dead end
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        edition.created_by = edition.approval_requested_by = "someone.else"
        session.commit()
    other = app_client.get(f"/admin/editions/{eid}").text
    assert f'action="{BASE}/admin/editions/{eid}/approve"' in other


def test_the_time_left_says_where_the_send_is_not_done_before_it_started(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    people(engine, web_settings, [("k@kent.police.uk", "kent"), ("e@essex.police.uk", "essex")])
    eid = sample_edition(engine, web_settings, author="alice")
    token = _signed_in(app_client, engine)

    def time_left() -> str:
        page = app_client.get(f"/admin/editions/{eid}/progress").text
        shown = page.split('id="progress-eta">', 1)[1].split("</span>", 1)[0]
        assert app_client.get(f"/admin/editions/{eid}/progress.json").json()["eta"] == shown
        return shown
    assert time_left() == "not started yet"  # a draft
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "alice")
        outbox.approve(session, edition, "bob")
        session.commit()
    assert time_left() == "not started yet"  # approved, not sent
    app_client.post(f"/admin/editions/{eid}/send", data={"csrf_token": token, "confirm": "yes"})
    assert "min" in time_left() or "as fast as the relay" in time_left()
    app_client.post(f"/admin/editions/{eid}/pause", data={"csrf_token": token})
    assert time_left() == "paused, with 2 message(s) waiting"
    app_client.post(f"/admin/editions/{eid}/cancel", data={"csrf_token": token})
    assert time_left() == "none: the send was cancelled"


def test_a_sent_edition_goes_again_to_the_failed_and_to_people_who_joined_since_in_both_faces(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    people(engine, web_settings, [("k1@kent.police.uk", "kent"), ("k2@kent.police.uk", "kent")])
    eid = sent_edition(engine, web_settings, regions="[kent]", slug="2020-q3-again")
    with Session(engine) as session:
        first = session.scalar(select(Delivery).where(Delivery.edition_id == eid))
        first.status = "failed"
        session.get(Edition, eid).status = EditionStatus.SENT
        session.commit()
    token = _signed_in(app_client, engine)
    page = app_client.get(f"/admin/editions/{eid}").text
    assert "Send the 1 failed again" in page and "Send to people who joined since" in page
    again = app_client.post(f"/admin/editions/{eid}/resend-failed", data={"csrf_token": token})
    assert "1 message(s) queued again." in again.text
    people(engine, web_settings, [("new@kent.police.uk", "kent")])
    joined = app_client.post(f"/admin/editions/{eid}/send-to-new", data={"csrf_token": token})
    assert "1 message(s) queued for people who joined since." in joined.text
    with session_factory(engine)() as session:
        _row, plain = accounts.create_token(session, accounts.get_user(session, "root"),
                                            name="test")
        session.commit()
    api = {"Authorization": f"Bearer {plain}"}
    assert app_client.post(f"/api/v1/editions/{eid}/send-to-new", headers=api).json() == {
        "changed": False, "detail": "0 queued"}  # nobody new since
    assert app_client.post(f"/api/v1/editions/{eid}/resend-failed", headers=api,
                           json={"include_unknown": True}).json()["detail"] == "0 queued"
    with Session(engine) as session:
        actions = [(e.action, e.via) for e in session.scalars(
            select(audit.AuditEntry).where(audit.AuditEntry.action.in_(
                ["edition.resend_failed", "edition.send_to_new"]))
            .order_by(audit.AuditEntry.id))]
    assert actions == [("edition.resend_failed", "console"), ("edition.send_to_new", "console"),
                       ("edition.send_to_new", "api"), ("edition.resend_failed", "api")]


def test_an_edit_in_the_console_withdraws_the_approval(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    eid = sample_edition(engine, web_settings, author="alice")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "alice")
        outbox.approve(session, edition, "bob")
        outbox.schedule(session, edition, "bob", uk_noon_in(1))
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
                       r"<td>([^<]+)</td><td>Planned</td>", page)
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
        return len(re.findall(r'<tr><td class="when">\d\d \w{3}', page.text))

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


# ---- bounces and alerts ----

def _open_alert_ids(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return [a.id for a in bounce_policy.open_alerts(session)]


def _statuses(engine: Engine, ids: list[int]) -> list[str]:
    with Session(engine) as session:
        return [store.get(session, sid).status for sid in ids]


def test_a_held_bounce_alert_needs_attention_and_is_applied_from_the_dashboard(
        app_client: TestClient, engine: Engine, web_settings: Settings,
        sink: FaultServer) -> None:
    make_user(engine, "ken", regions=("kent",), email="ken@kent.police.uk")
    make_user(engine, "ess", regions=("essex",), email="ess@essex.police.uk")
    aid, eid, ids = domain_alert(engine, web_settings)  # 4 of 6 at essex.police.uk bounced
    assert _statuses(engine, ids) == ["active"] * 6  # held: nobody changed yet
    assert alerts.mail_pending(session_factory(engine), web_settings) == 1
    assert sink.handler.copies("ess@essex.police.uk") == 1  # Essex's co-ordinator, not Kent's
    assert sink.handler.copies("ken@kent.police.uk") == 0
    assert login(app_client, "ess").status_code == 303
    page = app_client.get("/admin").text
    token = csrf_of(page)
    assert "<h2>Needs attention</h2>" in page and "1 open bounce alert(s)" in page
    row = re.search(rf"<tr><td>{aid}: most of a domain bounced<br>raised (.+?)</td>"
                    r"<td>essex.police.uk</td><td><a href=\"[^\"]+/admin/editions/(\d+)\">"
                    r"2020-q3-essex</a></td><td class=\"num\">67% \(4 of 6\)</td>"
                    r"<td>4 of 6 recipients at essex.police.uk bounced this send", page)
    assert row and int(row[2]) == eid
    assert re.fullmatch(r"\d\d \w{3} \d{4} \d\d:\d\d (GMT|BST)", row[1])  # UK time
    assert page.count(f'action="{BASE}/admin/bounces/alerts/{aid}/resolve"') == 2
    listed = app_client.get("/admin/bounces").text  # the held bounces themselves
    assert listed.count("<td>held: 4 of 6 recipients at essex.police.uk bounced") == 4
    # The co-ordinators were told, and the console says so.
    told = re.search(r"<td>bounce-domain</td><td>Bounces from essex.police.uk are held back"
                     r"</td><td>([^<]+)</td>", page)
    assert told and told[1] == "Mailed to 1"

    answer = app_client.post(f"/admin/bounces/alerts/{aid}/resolve",
                             data={"csrf_token": token, "resolution": "apply", "back": "/admin"},
                             follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"].startswith(f"{BASE}/admin?")
    done = app_client.get(answer.headers["location"]).text
    assert f"Alert {aid} applied: 4 subscriber(s) at essex.police.uk marked bounced." in done
    assert "No open bounce alerts." in done and "/resolve" not in done
    assert _open_alert_ids(engine) == []
    assert _statuses(engine, ids) == ["bounced"] * 4 + ["active"] * 2
    with Session(engine) as session:
        (entry,) = session.scalars(select(audit.AuditEntry).where(
            audit.AuditEntry.action.startswith("bounce_alert"))).all()
        resolved = session.get(bounce_policy.BounceAlert, aid)
        assert resolved is not None
        assert (resolved.resolution, resolved.resolved_by) == ("applied", "ess")
    assert (entry.actor, entry.actor_name, entry.via, entry.ip, entry.action, entry.target) == (
        "ess", "Ess", "console", "testclient", "bounce_alert.apply", f"bounce_alert:{aid}")
    assert entry.detail == {"kind": "domain", "domain": "essex.police.uk", "edition_id": eid,
                            "marked_bounced": 4}
    assert abs((dt.datetime.now(dt.UTC) - entry.at).total_seconds()) < 600
    # Closed once: a second try (another tab, a double click) is refused and logs nothing.
    again = app_client.post(f"/admin/bounces/alerts/{aid}/resolve",
                            data={"csrf_token": token, "resolution": "dismiss"})
    assert again.status_code == 409 and "resolved already (applied)" in again.text
    assert [a for _w, a, _t in _audit(engine)] == ["bounce_alert.apply"]


def test_a_bounce_alert_is_dismissed_from_the_bounces_page_and_refused_outside_its_regions(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    aid, _eid, ids = domain_alert(engine, web_settings)
    make_user(engine, "ken", regions=("kent",))
    make_user(engine, "ess", regions=("essex",))
    token = _signed_in(app_client, engine, who="vic", role="viewer", regions=("essex",))
    # A viewer sees the alert and cannot act on it.
    page = app_client.get("/admin").text
    assert "essex.police.uk" in page and "A co-ordinator decides." in page
    assert "/resolve" not in page
    refused = app_client.post(f"/admin/bounces/alerts/{aid}/resolve",
                              data={"csrf_token": token, "resolution": "apply"})
    assert refused.status_code == 403 and "You do not have permission to do this" in refused.text
    # Nor may a co-ordinator whose regions do not cover the send.
    assert login(app_client, "ken").status_code == 303
    page = app_client.get("/admin/bounces").text
    assert "Outside your regions: its send went to Essex." in page and "/resolve" not in page
    token = csrf_of(page)
    for resolution in ("apply", "dismiss"):
        outside = app_client.post(f"/admin/bounces/alerts/{aid}/resolve",
                                  data={"csrf_token": token, "resolution": resolution})
        assert outside.status_code == 403 and "This alert is outside your regions" in outside.text
    assert _open_alert_ids(engine) == [aid] and _audit(engine) == []

    assert login(app_client, "ess").status_code == 303
    token = csrf_of(app_client.get("/admin/bounces").text)
    for data in ({"resolution": "maybe"}, {}):
        bad = app_client.post(f"/admin/bounces/alerts/{aid}/resolve",
                              data={"csrf_token": token, **data})
        assert bad.status_code == 400 and "Choose what to do" in bad.text
    missing = app_client.post("/admin/bounces/alerts/999999/resolve",
                              data={"csrf_token": token, "resolution": "apply"})
    assert missing.status_code == 404 and "No such alert" in missing.text
    assert app_client.post("/admin/bounces/alerts/nonsense/resolve",
                           data={"csrf_token": token}).status_code == 400
    answer = app_client.post(f"/admin/bounces/alerts/{aid}/resolve", data={
        "csrf_token": token, "resolution": "dismiss", "back": "/admin/bounces"},
        follow_redirects=False)
    assert answer.headers["location"].startswith(f"{BASE}/admin/bounces?")
    shown = app_client.get(answer.headers["location"]).text
    assert (f"Alert {aid} dismissed: the held bounces from essex.police.uk change nobody."
            in shown)
    assert _open_alert_ids(engine) == []
    assert _statuses(engine, ids) == ["active"] * 6
    assert _audit(engine) == [("ess", "bounce_alert.dismiss", f"bounce_alert:{aid}")]


def test_the_dashboard_lists_recent_alerts_to_coordinators_in_uk_time_and_how_far_mailed(
        app_client: TestClient, engine: Engine, web_settings: Settings,
        make_fault_server: Any) -> None:
    make_user(engine, "ess", regions=("essex",), email="ess@essex.police.uk")
    make_user(engine, "ken", regions=("kent",), email="ken@kent.police.uk")
    sessions = session_factory(engine)
    now = dt.datetime.now(dt.UTC)
    refusing = web_settings.model_copy(update={"smtp_url": type(web_settings.smtp_url)(
        make_fault_server(mail_reply="550 5.7.1 Relaying denied").url())})

    def raise_(key: str, kind: str, subject: str, regions: list[str],
               ago: dt.timedelta) -> None:
        with sessions() as session:
            assert alerts.raise_alert(session, key, kind, subject, f"{subject}.", regions,
                                      now=now - ago)
            session.commit()

    raise_("all", "quarterly-nudge", "No edition approved for the quarter", [],
           dt.timedelta(hours=3))
    assert alerts.mail_pending(sessions, web_settings) == 1  # to both co-ordinators
    raise_("k", "halt", "Kent send halted by the relay", ["kent"], dt.timedelta(hours=2))
    raise_("e", "missed-reminder", "Essex reminder not sent in time", ["essex"],
           dt.timedelta(hours=1))
    assert alerts.mail_pending(sessions, refusing) == 0  # the relay refuses: both wait
    raise_("old", "halt", "A halt nobody could be told of", [], dt.timedelta(days=8))
    raise_("new", "halt", "Just now", ["kent"], dt.timedelta(minutes=1))

    def rows() -> dict[str, tuple[str, str, str]]:
        page = app_client.get("/admin").text
        table = page.split("<h2>Recent alerts to co-ordinators</h2>")[1].split("</table>")[0]
        return {subject: (when, kind, state) for when, kind, subject, state in re.findall(
            r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>",
            table)}

    _signed_in(app_client, engine)  # an administrator sees every region's
    seen = rows()
    london = ZoneInfo("Europe/London")
    assert seen["No edition approved for the quarter"] == (
        (now - dt.timedelta(hours=3)).astimezone(london).strftime("%d %b %Y %H:%M %Z"),
        "quarterly-nudge", "Mailed to 2")
    with Session(engine) as session:
        (kent_error,) = session.scalars(select(alerts.CoordinatorAlert.last_error).where(
            alerts.CoordinatorAlert.key == "k")).all()
    assert kent_error and "5.7.1 Relaying denied" in kent_error
    assert seen["Kent send halted by the relay"][2] == (
        f"Not mailed to everyone yet (1 attempt(s)); tried again soon. Last error: {kent_error}")
    assert seen["Essex reminder not sent in time"][2].startswith("Not mailed to everyone yet")
    assert seen["A halt nobody could be told of"][2] == (
        "Not mailed to everyone: no longer tried after 7 days")
    assert seen["Just now"][2] == "Waiting to be mailed"
    assert list(seen) == ["Just now", "A halt nobody could be told of",
                          "Essex reminder not sent in time", "Kent send halted by the relay",
                          "No edition approved for the quarter"]  # newest first
    # A Kent co-ordinator sees Kent's and everyone's, not Essex's (as they are mailed).
    assert login(app_client, "ken").status_code == 303
    assert list(rows()) == ["Just now", "A halt nobody could be told of",
                            "Kent send halted by the relay",
                            "No edition approved for the quarter"]


def test_the_bounces_page_and_the_subscriber_page_show_bounces_with_their_decisions(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    kent, essex, quiet = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                       ("e@essex.police.uk", "essex"),
                                                       ("q@kent.police.uk", "kent")])
    eid = sent_edition(engine, web_settings, "[kent, essex]", "2020-q3-both")
    bounce(engine, web_settings, eid, [(kent, "k@kent.police.uk")])  # hard: suppressed
    bounce(engine, web_settings, eid, [(essex, "e@essex.police.uk")], status="4.2.2")  # soft
    bounce(engine, web_settings, None, [(None, "stranger@example.org")])  # ours? no reference
    with Session(engine) as session:
        received = {r.subscriber_id: r.received_at for r in bounce_policy.recent(session, 10)}
    _signed_in(app_client, engine)
    page = app_client.get("/admin/bounces")
    assert page.status_code == 200
    rows = re.findall(r"<tr><td>([^<]+)</td><td>(\w+)</td><td>([\d.]*)</td><td>(.*?)</td>"
                      r"<td>(.*?)</td><td>(\w+): ", page.text)
    assert [(kind, code, decision) for _at, kind, code, _who, _ed, decision in rows] == [
        ("hard", "5.1.1", "unmatched"), ("soft", "4.2.2", "counted"),
        ("hard", "5.1.1", "suppressed")]  # newest first
    london = ZoneInfo("Europe/London")
    assert rows[2][0] == received[kent].astimezone(london).strftime("%d %b %Y %H:%M %Z")
    assert "k@kent.police.uk</a>" in rows[2][3] and "2020-q3-both</a>" in rows[2][4]
    assert rows[0][3] == "not identified"
    assert "soft bounce 1 of 3" in page.text  # the decision's detail

    view = app_client.get(f"/admin/subscribers/{kent}").text
    history = view.split("<h2>Bounces and complaints</h2>")[1]
    assert re.search(r"<tr><td>\d\d \w{3} \d{4} \d\d:\d\d (GMT|BST)</td><td>hard</td>"
                     r"<td>5.1.1</td><td><a href=\"[^\"]+\">2020-q3-both</a></td>"
                     r"<td>suppressed \(counted\)</td><td>smtp; 550 5.1.1 &lt;k@kent.police.uk"
                     r"&gt;: mailbox problem</td></tr>", history)
    soft = app_client.get(f"/admin/subscribers/{essex}").text
    assert "<td>soft</td><td>4.2.2</td>" in soft and "<td>counted</td>" in soft
    assert "No bounces or complaints" in app_client.get(f"/admin/subscribers/{quiet}").text
    # Its consent history says the bounce policy changed them, not the person.
    assert re.search(r"<td>bounce</td><td>bounce</td><td></td><td>the bounce policy</td>", view)


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_people_resolving_one_alert_at_once_make_one_resolution(
        app_client: TestClient, engine: Engine, web_settings: Settings, db_url: str,
        backend: str) -> None:
    """The second waits on the first's row lock, then finds the alert closed: it neither
    overwrites the first decision nor logs a second one."""
    aid, _eid, ids = domain_alert(engine, web_settings)
    make_user(engine, "ess", regions=("essex",))
    assert login(app_client, "ess").status_code == 303
    token = csrf_of(app_client.get("/admin").text)
    answers: list[Any] = []

    def resolve() -> None:
        answers.append(app_client.post(f"/admin/bounces/alerts/{aid}/resolve",
                                       data={"csrf_token": token, "resolution": "apply"}))

    first = session_factory(engine)()  # another co-ordinator, mid-way through dismissing it
    thread = threading.Thread(target=resolve, daemon=True)
    waited = False
    try:
        bounce_policy.resolve_alert(first, BouncePolicy.from_settings(web_settings), aid,
                                    "other", apply=False)
        thread.start()
        waited = a_session_waits_on_a_lock(db_url)  # the console's request waits on that row
        first.commit()
    finally:
        first.close()
        thread.join(30)
    assert waited, "the console's resolve never waited on the other's"
    (answer,) = answers
    assert answer.status_code == 409 and "resolved already (dismissed)" in answer.text
    with Session(engine) as session:
        alert = session.get(bounce_policy.BounceAlert, aid)
        assert alert is not None and (alert.resolution, alert.resolved_by) == ("dismissed",
                                                                                "other")
    assert _statuses(engine, ids) == ["active"] * 6
    assert _audit(engine) == []
