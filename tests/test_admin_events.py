"""Dates of interest from the console and the API: listed, added, changed and removed with the
command line's validation, each change in the audit log, and what the console adds is what
`mailer events list` and `mailer schedule list` show."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer import audit
from mailer.cli import run
from mailer.cli.runtime import console
from mailer.config import Settings
from mailer.events import Event, Reminder
from mailer.web.app import create_app
from tests.test_admin_routes import login, make_user
from tests.test_api import _token
from tests.web_fixtures import (  # noqa: F401
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

# A fixed moment (10:00 UK time on a Monday in March 2027): the reminders' days are known.
NOW = dt.datetime(2027, 3, 1, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def frozen() -> Iterator[None]:
    with time_machine.travel(NOW, tick=True):
        yield


@pytest.fixture
def app_client(web_settings: Settings, frozen: None) -> Iterator[TestClient]:
    with TestClient(create_app(web_settings)) as client:
        yield client


def _changes(engine: Engine) -> list[tuple[str, str, str | None]]:
    with Session(engine) as session:
        return [(e.actor, e.action, e.target) for e in session.scalars(
            select(audit.AuditEntry).where(audit.AuditEntry.action.startswith("event"))
            .order_by(audit.AuditEntry.id))]


def _count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Event)) or 0


def _form(token: str, **fields: str) -> dict[str, str]:
    base = {"csrf_token": token, "name": "", "date": "", "until": "", "offsets": "14, 1",
            "at": "09:00", "text": "", "description": "", "link": "", "topic": "reminders",
            "weekend": "friday"}
    return {**base, **fields}


def test_a_coordinator_adds_changes_and_removes_an_event_in_the_console(
        app_client: TestClient, engine: Engine, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_user(engine, "cora", regions=("kent",))
    assert login(app_client, "cora").status_code == 303
    token = csrf_of(app_client.get("/admin/events").text)
    # Monday 14 June 2027: 14 days before is Monday 31 May; 1 day before a Sunday, so Friday.
    added = app_client.post("/admin/events/new", data=_form(
        token, name="Operation Aidant week", date="2027-06-14", until="2027-06-20",
        offsets="14, 1", at="08:30", text="Book the training."))
    assert added.status_code == 200
    assert "Event &#39;Operation Aidant week&#39; added" in added.text
    assert "<td>Operation Aidant week</td><td>2027-06-14</td><td>once</td><td>14, 1</td>" \
        "<td>08:30</td>" in added.text
    with Session(engine) as session:
        event = session.scalar(select(Event).where(Event.slug == "operation-aidant-week"))
        assert event is not None and event.ends_on == dt.date(2027, 6, 20)
        eid = event.id
        sends = sorted(r.send_at for r in session.scalars(
            select(Reminder).where(Reminder.event_id == eid)))
    assert sends == [dt.datetime(2027, 5, 31, 7, 30, tzinfo=dt.UTC),
                     dt.datetime(2027, 6, 11, 7, 30, tzinfo=dt.UTC)]

    # The command line and the schedule see it.
    monkeypatch.setattr(console, "width", 200)
    assert run(["events", "list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"operation-aidant-week\s+│\s+Operation Aidant week\s+│\s+2027-06-14 to "
                     r"2027-06-20\s+│\s+once\s+│\s+2027-06-14\s+│\s+14, 1\s+│\s+08:30", listed)
    assert run(["schedule", "list", "--days", "120"]) == 0
    agenda = capsys.readouterr().out
    assert "Operation Aidant week" in agenda
    assert "Mon 31 May 2027 08:30 BST" in agenda and "Fri 11 Jun 2027 08:30 BST" in agenda

    # Changed: its offsets and time; the unsent reminders are planned again.
    form = app_client.get(f"/admin/events/{eid}/edit").text
    assert 'value="Operation Aidant week"' in form and 'value="2027-06-20"' in form
    changed = app_client.post(f"/admin/events/{eid}/edit", data=_form(
        token, name="Operation Aidant week", date="2027-06-14", offsets="7", at="09:15"))
    assert "Event &#39;Operation Aidant week&#39; changed" in changed.text
    with Session(engine) as session:
        event = session.get(Event, eid)
        assert event is not None and (event.offsets, event.send_time, event.ends_on) == \
            ([7], "09:15", None)
        sends = [r.send_at for r in session.scalars(
            select(Reminder).where(Reminder.event_id == eid))]
    assert sends == [dt.datetime(2027, 6, 7, 8, 15, tzinfo=dt.UTC)]

    removed = app_client.post(f"/admin/events/{eid}/remove", data={"csrf_token": token})
    assert "Event &#39;Operation Aidant week&#39; removed, with 1 planned reminder(s)." \
        in removed.text
    assert "Operation Aidant week</td>" not in removed.text
    assert _changes(engine) == [("cora", "event.add", f"event:{eid}"),
                                ("cora", "event.update", f"event:{eid}"),
                                ("cora", "event.remove", f"event:{eid}")]


@pytest.mark.parametrize(("fields", "problem"), [
    ({"name": "Night", "date": "2027-06-14", "at": "01:30"}, "between 01:00 and 02:59"),
    ({"name": "Soon", "date": "next week"}, "date &#34;next week&#34;: not a date like"),
    ({"name": "Odd", "date": "2027-06-14", "offsets": "14, soon"},
     "reminders &#34;14, soon&#34;: give days before as numbers"),
    ({"name": "Long", "date": "2027-06-14", "offsets": "400"},
     "400 is not a whole number of days from 0 to 366"),
    ({"name": "Back", "date": "2027-06-14", "until": "2027-06-01"}, "it ends (2027-06-01) before"),
    ({"name": "Linked", "date": "2027-06-14", "link": "javascript:alert(1)"},
     "is not an http(s) URL"),
    ({"name": "Topic", "date": "2027-06-14", "topic": "gossip"}, "gossip"),
])
def test_a_bad_event_is_shown_again_with_its_problem_and_nothing_is_stored(
        app_client: TestClient, engine: Engine, fields: dict[str, str], problem: str) -> None:
    make_user(engine, "cora", regions=("kent",))
    assert login(app_client, "cora").status_code == 303
    token = csrf_of(app_client.get("/admin/events").text)
    before = _count(engine)
    page = app_client.post("/admin/events/new", data=_form(token, **fields))
    assert page.status_code == 400
    assert "There is a problem" in page.text and problem in page.text
    assert f'value="{fields["name"]}"' in page.text  # what was typed is kept
    assert _count(engine) == before
    assert _changes(engine) == []


def test_a_viewer_sees_the_calendar_but_no_form_and_cannot_add(
        app_client: TestClient, engine: Engine) -> None:
    make_user(engine, "vic", role="viewer", regions=("kent",))
    assert login(app_client, "vic").status_code == 303
    page = app_client.get("/admin/events").text
    assert "<h2>Calendar</h2>" in page and "Add a date of interest" not in page
    refused = app_client.post("/admin/events/new", data=_form(
        csrf_of(app_client.get("/admin").text), name="X", date="2027-06-14"))
    assert refused.status_code == 403
    make_user(engine, "cora", regions=("kent",))
    assert login(app_client, "cora").status_code == 303
    assert app_client.get("/admin/events/999/edit").status_code == 404


def test_events_through_the_api(app_client: TestClient, engine: Engine) -> None:
    make_user(engine, "cora", regions=("kent",))
    make_user(engine, "vic", role="viewer", regions=("kent",))
    cora, vic = _token(engine, "cora"), _token(engine, "vic", role="viewer")
    body = {"name": "Harbour watch day", "starts_on": "2020-10-20", "yearly": True,
            "offsets": [14, 1], "link": "https://example.org/harbour-watch"}
    assert app_client.post("/api/v1/events", json=body, headers=vic).status_code == 403
    made = app_client.post("/api/v1/events", json=body, headers=cora)
    assert made.status_code == 201, made.text
    event = made.json()
    assert (event["slug"], event["next_date"], event["offsets"]) == \
        ("harbour-watch-day", "2027-10-20", [14, 1])
    again = app_client.post("/api/v1/events", json=body, headers=cora)
    assert again.status_code == 422 and "already an event 'harbour-watch-day'" in again.text
    night = app_client.put(f"/api/v1/events/{event['id']}", headers=cora,
                           json={**body, "send_time": "02:00"})
    assert night.status_code == 422 and "between 01:00 and 02:59" in night.text
    moved = app_client.put(f"/api/v1/events/{event['id']}", headers=cora,
                           json={**body, "offsets": [7]})
    assert moved.status_code == 200 and moved.json()["offsets"] == [7]
    calendar = app_client.get("/api/v1/events", headers=vic).json()
    (ours,) = [e for e in calendar["events"] if e["id"] == event["id"]]
    assert (ours["name"], ours["offsets"]) == ("Harbour watch day", [7])
    assert [r["offset_days"] for r in calendar["reminders"]
            if r["event"] == "harbour-watch-day"] == [7]
    gone = app_client.delete(f"/api/v1/events/{event['id']}", headers=cora)
    assert gone.status_code == 200 and "1 planned reminder(s)" in gone.json()["detail"]
    assert app_client.delete(f"/api/v1/events/{event['id']}", headers=cora).status_code == 404
    assert [a for _w, a, _t in _changes(engine)] == ["event.add", "event.update",
                                                     "event.remove"]
