"""The JSON API: the OpenAPI document, the four-eyes flow over tokens, subscribers, imports,
editions and the calendar over the API, and a route fuzz that
drives every operation in the document with hostile parameters and bodies and requires that
none of them ever answers 5xx, with hostile values the schema would not generate
(tests/test_api_schemathesis.py runs schemathesis itself over the same document)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer import accounts, alerts, audit, bounce_policy, events
from mailer.config import Settings
from mailer.web.app import create_app
from subscribers.db import session_factory
from subscribers.models import Subscriber
from tests.test_admin_routes import (  # noqa: F401
    app_client,
    domain_alert,
    login,
    make_user,
    people,
    sample_edition,
)
from tests.web_fixtures import (  # noqa: F401
    SAMPLE,
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

NASTY = st.one_of(st.integers(min_value=-2**63, max_value=2**63), st.text(max_size=40),
                  st.sampled_from(["0", "-1", "1", "99999999999999999999", "%00", "../..",
                                   "kent", "essex", "active", "1e9", "' OR 1=1 --"]))


def _token(engine: Engine, login: str, role: str = "coordinator") -> dict[str, str]:
    with session_factory(engine)() as session:
        _row, token = accounts.create_token(session, accounts.get_user(session, login),
                                            name="test", role=role)
        session.commit()
    return {"Authorization": f"Bearer {token}"}


def test_the_openapi_document_lists_every_operation(app_client: TestClient) -> None:
    doc = app_client.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    assert {"/me", "/subscribers", "/editions/{eid}/approve", "/editions/{eid}/schedule",
            "/audit"} <= paths


def test_four_eyes_over_the_api(app_client: TestClient, engine: Engine,
                                web_settings: Settings) -> None:
    make_user(engine, "alice")
    make_user(engine, "bob")
    people(engine, web_settings, [("r@kent.police.uk", "kent")])
    eid = sample_edition(engine, web_settings, author="alice")
    alice, bob = _token(engine, "alice"), _token(engine, "bob")
    assert app_client.post(f"/api/v1/editions/{eid}/send", headers=bob).status_code == 409
    assert app_client.post(f"/api/v1/editions/{eid}/request-approval",
                           headers=alice).json() == {"changed": True, "detail": ""}
    assert app_client.post(f"/api/v1/editions/{eid}/approve", headers=alice).status_code == 403
    assert app_client.post(f"/api/v1/editions/{eid}/approve", headers=bob).json()["changed"]
    bad = app_client.post(f"/api/v1/editions/{eid}/schedule", headers=bob,
                          json={"at": "2001-01-01T09:00:00"})  # no offset
    assert bad.status_code == 422
    ok = app_client.post(f"/api/v1/editions/{eid}/schedule", headers=bob,
                         json={"at": "2099-01-01T09:00:00+00:00"})
    assert ok.status_code == 200
    edition = app_client.get(f"/api/v1/editions/{eid}", headers=alice).json()
    assert (edition["status"], edition["approved_by"], edition["scheduled_by"]) == \
        ("scheduled", "bob", "bob")
    log = app_client.get("/api/v1/audit?action=edition.approve", headers=alice).json()
    assert [(e["actor"], e["via"]) for e in log["items"]] == [("bob", "api")]


def test_no_operation_in_the_document_answers_with_a_server_error(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "root", role="admin", regions=())
    people(engine, web_settings, [("r@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    headers = _token(engine, "root", role="admin")
    doc = app_client.get("/api/v1/openapi.json").json()
    operations = [(path, method, op) for path, item in doc["paths"].items()
                  for method, op in item.items()]
    assert len(operations) > 15

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data: Any) -> None:
        path, method, op = data.draw(st.sampled_from(operations))
        url = path
        query = {}
        for param in op.get("parameters", []):
            value = data.draw(NASTY)
            if param["in"] == "path":
                url = url.replace("{" + param["name"] + "}", quote(str(value), safe="") or "x")
            elif data.draw(st.booleans()):
                query[param["name"]] = str(value)
        body = data.draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(["at", "x"]),
                                                              NASTY, max_size=2)))
        response = app_client.request(method.upper(), "/api/v1" + url, params=query,
                                      json=body, headers=headers)
        assert response.status_code < 500, (method, url, query, body, response.text[:300])

    fuzz()


def test_the_document_declares_bearer_tokens_and_the_error_bodies(app_client: TestClient
                                                                  ) -> None:
    doc = app_client.get("/api/v1/openapi.json").json()
    assert doc["components"]["securitySchemes"]["token"] == {
        "type": "http", "scheme": "bearer",
        "description": "An API token made with `mailer users token`"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op.get("security") == [{"token": []}], (method, path)
            assert {"401", "403", "422"} <= set(op["responses"]), (method, path)
    invalid = doc["paths"]["/subscribers"]["post"]["responses"]["422"]
    assert invalid["content"]["application/json"]["schema"]["$ref"].endswith("/Invalid")


def test_subscribers_are_added_changed_exported_and_erased_over_the_api(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    headers = _token(engine, "kent")
    new = {"email": "Jo.Bloggs@Kent.Police.uk", "name": "Jo Bloggs", "region": "kent",
           "role": "first_responder", "lawful_basis": "public_task"}
    added = app_client.post("/api/v1/subscribers", headers=headers, json=new)
    assert added.status_code == 201, added.text
    sid = added.json()["id"]
    assert added.json()["status"] == "active" and added.json()["topics"] == ["newsletter"]
    again = app_client.post("/api/v1/subscribers", headers=headers, json=new)
    assert again.status_code == 409, again.text
    bad = app_client.post("/api/v1/subscribers", headers=headers,
                          json={**new, "email": "not an address"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("email:")
    unknown = app_client.post("/api/v1/subscribers", headers=headers,
                              json={**new, "email": "x@kent.police.uk", "topics": ["nope"]})
    assert unknown.status_code == 404, unknown.text

    changed = app_client.patch(f"/api/v1/subscribers/{sid}", headers=headers,
                               json={"name": "Jo Smith"})
    assert changed.status_code == 200 and changed.json()["name"] == "Jo Smith"
    assert changed.json()["role"] == "first_responder"  # fields not given are left alone
    history = app_client.get(f"/api/v1/subscribers/{sid}/history", headers=headers).json()
    assert [e["action"] for e in history["consent_history"]][:1] == ["add"]
    assert history["deliveries"] == [] and history["subscriptions"][0]["topic"] == "newsletter"

    export = app_client.get("/api/v1/subscribers/export", headers=headers)
    assert export.headers["content-type"].startswith("text/csv")
    (row,) = csv.DictReader(io.StringIO(export.text))
    assert (row["email"], row["name"]) == ("Jo.Bloggs@kent.police.uk", "Jo Smith")

    erased = app_client.delete(f"/api/v1/subscribers/{sid}", headers=headers)
    assert erased.status_code == 200, erased.text
    assert erased.json() == {"changed": True, "detail": ""}
    # An erased person is gone for everyone, an administrator too.
    make_user(engine, "root", role="admin", regions=())
    root = _token(engine, "root", role="admin")
    for who in (headers, root):
        assert app_client.get(f"/api/v1/subscribers/{sid}", headers=who).status_code == 404
        assert app_client.delete(f"/api/v1/subscribers/{sid}", headers=who).status_code == 404
    with Session(engine) as session:
        row = session.get(Subscriber, sid)
        assert (row.status, row.email, row.name) == ("erased", None, None)
    log = app_client.get("/api/v1/audit?actor=kent", headers=headers).json()["items"]
    assert [(e["action"], e["target"], e["via"]) for e in reversed(log)] == [
        ("subscriber.add", f"subscriber:{sid}", "api"),
        ("subscriber.edit", f"subscriber:{sid}", "api"),
        ("subscribers.export", None, "api"), ("subscriber.erase", f"subscriber:{sid}", "api")]
    assert all("Bloggs" not in str(e) for e in log)  # the log names people by id only


def test_an_import_over_the_api_reports_first_and_applies_on_request(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "root", role="admin", regions=())
    make_user(engine, "kent", regions=("kent",))
    headers = {**_token(engine, "root", role="admin"), "Content-Type": "text/csv"}
    body = "email,name,region\na@kent.police.uk,A,kent\nb@essex.police.uk,B,essex\n"
    url = "/api/v1/subscribers/import?lawful_basis=public_task"
    dry = app_client.post(url, headers=headers, content=body).json()
    assert (dry["applied"], dry["rows"], dry["new"], dry["errors"]) == (False, 2, 2, [])
    assert app_client.get("/api/v1/subscribers", headers=headers).json()["total"] == 0
    bad = app_client.post(url, headers=headers, content=body + "nonsense,C,kent\n").json()
    assert bad["applied"] is False and [e["line"] for e in bad["errors"]] == [4]
    done = app_client.post(url + "&apply=true", headers=headers, content=body).json()
    assert (done["applied"], done["new"]) == (True, 2)
    assert app_client.get("/api/v1/subscribers", headers=headers).json()["total"] == 2
    kent = {**_token(engine, "kent"), "Content-Type": "text/csv"}
    assert app_client.post(url, headers=kent, content=body).status_code == 403
    empty = app_client.post(url, headers=headers, content=b"")
    assert empty.status_code == 422, empty.text


def test_an_edition_is_uploaded_previewed_and_test_sent_over_the_api(
        engine: Engine, web_settings: Settings, sink: Any) -> None:
    # Test copies carry the unsubscribe header, which takes http only for a loopback host.
    local = web_settings.model_copy(update={"base_url": "http://127.0.0.1:8000"})
    with TestClient(create_app(local)) as client:
        _edition_over_the_api(client, engine, local, sink)


def _edition_over_the_api(app_client: TestClient, engine: Engine, web_settings: Settings,
                          sink: Any) -> None:
    make_user(engine, "alice", email="alice@kent.police.uk")
    make_user(engine, "bob")
    people(engine, web_settings, [("r@kent.police.uk", "kent"), ("s@essex.police.uk", "essex")])
    alice, bob = _token(engine, "alice"), _token(engine, "bob")
    source = SAMPLE.read_text()
    up = app_client.post("/api/v1/editions", headers=alice,
                         json={"slug": "2020-q3", "source": source})
    assert up.status_code == 201, up.text
    eid = up.json()["id"]
    assert (up.json()["created_by"], up.json()["status"]) == ("alice", "draft")
    broken = app_client.post("/api/v1/editions", headers=alice,
                             json={"slug": "broken", "source": "---\ntitle: x\n---\n"})
    assert broken.status_code == 422 and broken.json()["detail"]

    preview = app_client.get(f"/api/v1/editions/{eid}/preview", headers=bob).json()
    assert "Modern Slavery" in preview["html"] and "Modern Slavery" in preview["text"]
    assert preview["audience"]["region"] == {"kent": 1, "essex": 1}
    assert "/unsubscribe/preview" in preview["html"]  # never a real subscriber's link

    sent = app_client.post(f"/api/v1/editions/{eid}/test-send", headers=alice)
    assert sent.json() == {"changed": True, "detail": "sent to alice@kent.police.uk"}
    assert sink.handler.copies("alice@kent.police.uk") == 1
    no_address = app_client.post(f"/api/v1/editions/{eid}/test-send", headers=bob)
    assert no_address.status_code == 409
    to_colleague = app_client.post(f"/api/v1/editions/{eid}/test-send", headers=bob,
                                   json={"colleagues": ["alice"]})
    assert to_colleague.json() == {"changed": True, "detail": "sent to alice@kent.police.uk"}
    assert sink.handler.copies("alice@kent.police.uk") == 2
    stranger = app_client.post(f"/api/v1/editions/{eid}/test-send", headers=bob,
                               json={"colleagues": ["someone.else"]})
    assert stranger.status_code == 409
    assert "no colleague with an address for test sends: someone.else" in \
        stranger.json()["detail"]

    assert app_client.post(f"/api/v1/editions/{eid}/request-approval", headers=alice
                           ).json()["changed"]
    refused = app_client.post(f"/api/v1/editions/{eid}/approve", headers=alice)
    assert refused.status_code == 403
    assert app_client.post(f"/api/v1/editions/{eid}/approve", headers=bob).json()["changed"]
    edited = app_client.put(f"/api/v1/editions/{eid}/source", headers=alice, json={
        "source": source.replace("Feedback and suggestions", "Feedback or suggestions")})
    assert edited.status_code == 200
    # What was approved is exactly what goes: an edit withdraws the approval.
    assert (edited.json()["status"], edited.json()["approved_by"]) == ("draft", None)
    log = app_client.get(f"/api/v1/audit?target=edition:{eid}", headers=bob).json()["items"]
    assert [(e["actor"], e["action"]) for e in reversed(log)] == [
        ("alice", "edition.save"), ("alice", "edition.test_send"), ("bob", "edition.test_send"),
        ("alice", "edition.request_approval"), ("alice", "edition.approve_refused"),
        ("bob", "edition.approve"), ("alice", "edition.save")]


def test_the_calendar_over_the_api(app_client: TestClient, engine: Engine) -> None:
    make_user(engine, "vic", role="viewer", regions=("kent",))
    today = dt.datetime.now(dt.UTC).date()
    with session_factory(engine)() as session:
        events.add_event(session, events.EventSpec(name="Harbour watch day",
                                                   starts_on=today + dt.timedelta(days=40),
                                                   yearly=True, offsets=[14, 7]))
        events.plan_reminders(session, dt.datetime.now(dt.UTC))
        session.commit()
    calendar = app_client.get("/api/v1/events?days=60",
                              headers=_token(engine, "vic", role="viewer"))
    body = calendar.json()
    (ours,) = [e for e in body["events"] if e["name"] == "Harbour watch day"]
    assert (ours["next_date"], ours["yearly"], ours["offsets"]) == (
        (today + dt.timedelta(days=40)).isoformat(), True, [14, 7])
    mine = [r for r in body["reminders"] if r["event"] == ours["slug"]]
    assert [r["offset_days"] for r in mine] == [14, 7]
    assert all(r["not_after"] > r["send_at"] for r in mine)


def test_a_test_send_that_cannot_be_built_is_a_clear_refusal_in_both_faces(
        app_client: TestClient, engine: Engine, web_settings: Settings, sink: Any) -> None:
    # http://testserver is not loopback, so the List-Unsubscribe header refuses its http URL:
    # the person is told why, and it is logged, rather than shown a server error.
    make_user(engine, "alice", email="alice@kent.police.uk")
    eid = sample_edition(engine, web_settings, author="alice")
    api = app_client.post(f"/api/v1/editions/{eid}/test-send", headers=_token(engine, "alice"))
    assert api.status_code == 409 and "unsubscribe URL" in api.json()["detail"]
    assert login(app_client, "alice").status_code == 303
    token = csrf_of(app_client.get(f"/admin/editions/{eid}").text)
    page = app_client.post(f"/admin/editions/{eid}/test-send", data={"csrf_token": token})
    assert page.status_code == 409 and "The test message could not be sent" in page.text
    assert sink.handler.copies("alice@kent.police.uk") == 0
    with Session(engine) as session:
        _total, rows = audit.entries(session, audit.AuditFilter(action="edition.test_send"))
        assert [(r.via, r.detail["outcome"]) for r in rows] == [("console", "refused"),
                                                               ("api", "refused")]


def _open_alert_ids(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return [a.id for a in bounce_policy.open_alerts(session)]


def _alert_audit(engine: Engine) -> list[tuple[Any, ...]]:
    with Session(engine) as session:
        return [(e.actor, e.via, e.action, e.target, e.detail) for e in session.scalars(
            select(audit.AuditEntry).where(audit.AuditEntry.action.startswith("bounce_alert"))
            .order_by(audit.AuditEntry.id))]


def _statuses(engine: Engine, ids: list[int]) -> list[str]:
    with Session(engine) as session:
        return [session.get(Subscriber, sid).status for sid in ids]  # type: ignore[union-attr]


def test_bounce_alerts_are_listed_and_applied_over_the_api_within_their_regions(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    aid, eid, ids = domain_alert(engine, web_settings)  # 4 of 6 at essex.police.uk bounced
    make_user(engine, "ess", regions=("essex",))
    make_user(engine, "ken", regions=("kent",))
    ess, ken = _token(engine, "ess"), _token(engine, "ken")
    viewer = _token(engine, "ess", role="viewer")
    url = f"/api/v1/bounce-alerts/{aid}/resolve"

    # Everyone sees the alert (a domain and counts); only Essex's co-ordinator may close it.
    listed = app_client.get("/api/v1/bounce-alerts", headers=ken)
    assert listed.status_code == 200
    (alert,) = listed.json()
    assert {k: alert[k] for k in ("id", "kind", "domain", "edition_id", "edition", "regions",
                                  "recipients", "bounced", "can_resolve")} == {
        "id": aid, "kind": "domain", "domain": "essex.police.uk", "edition_id": eid,
        "edition": "2020-q3-essex", "regions": ["essex"], "recipients": 6, "bounced": 4,
        "can_resolve": False}
    assert "4 of 6 recipients at essex.police.uk bounced" in alert["detail"]
    assert [a["can_resolve"] for a in app_client.get("/api/v1/bounce-alerts",
                                                     headers=viewer).json()] == [False]
    assert [a["can_resolve"] for a in app_client.get("/api/v1/bounce-alerts",
                                                     headers=ess).json()] == [True]

    refused = app_client.post(url, headers=viewer, json={"apply": True})
    assert (refused.status_code, refused.json()) == (403, {"detail": "role viewer may not do this"})
    for apply in (True, False):
        outside = app_client.post(url, headers=ken, json={"apply": apply})
        assert outside.status_code == 403, outside.text
        assert outside.json() == {"detail": "this alert is about a send to essex, outside your "
                                            "regions; you can act only for kent"}
    for body in ({}, {"apply": "yes"}, {"apply": 1}, {"resolution": "apply"}):
        bad = app_client.post(url, headers=ess, json=body)
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"][-1] == "apply", body
    missing = app_client.post("/api/v1/bounce-alerts/999999/resolve", headers=ess,
                              json={"apply": True})
    assert (missing.status_code, missing.json()) == (404, {"detail": "no bounce alert 999999"})
    assert _open_alert_ids(engine) == [aid] and _alert_audit(engine) == []
    assert _statuses(engine, ids) == ["active"] * 6  # held: nobody changed yet

    done = app_client.post(url, headers=ess, json={"apply": True})
    assert done.status_code == 200, done.text
    assert done.json() == {"id": aid, "resolution": "applied", "resolved_by": "ess",
                           "marked_bounced": 4,
                           "detail": "4 subscriber(s) at essex.police.uk marked bounced"}
    assert _open_alert_ids(engine) == []
    assert app_client.get("/api/v1/bounce-alerts", headers=ess).json() == []
    assert _statuses(engine, ids) == ["bounced"] * 4 + ["active"] * 2
    assert _alert_audit(engine) == [
        ("ess", "api", "bounce_alert.apply", f"bounce_alert:{aid}",
         {"kind": "domain", "domain": "essex.police.uk", "edition_id": eid,
          "marked_bounced": 4})]
    # Closed once: a second try (a retried request, another script) is refused, logs nothing.
    again = app_client.post(url, headers=ess, json={"apply": False})
    assert (again.status_code, again.json()) == (
        409, {"detail": f"alert {aid} was resolved already (applied)"})
    assert len(_alert_audit(engine)) == 1


def test_a_bounce_alert_is_dismissed_over_the_api_changing_nobody(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    aid, eid, ids = domain_alert(engine, web_settings, region="kent")
    make_user(engine, "ken", regions=("kent",))
    done = app_client.post(f"/api/v1/bounce-alerts/{aid}/resolve", headers=_token(engine, "ken"),
                           json={"apply": False})
    assert done.status_code == 200, done.text
    assert (done.json()["resolution"], done.json()["marked_bounced"]) == ("dismissed", 0)
    assert _open_alert_ids(engine) == [] and _statuses(engine, ids) == ["active"] * 6
    assert _alert_audit(engine) == [
        ("ken", "api", "bounce_alert.dismiss", f"bounce_alert:{aid}",
         {"kind": "domain", "domain": "kent.police.uk", "edition_id": eid,
          "marked_bounced": 0})]


def test_coordinator_alerts_are_listed_over_the_api_for_the_tokens_regions(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    domain_alert(engine, web_settings)  # tells Essex's co-ordinators of the held bounces
    with session_factory(engine)() as session:
        alerts.raise_alert(session, "test-everyone", "halt", "Sending halted", "The relay ...")
        alerts.raise_alert(session, "test-kent", "missed-reminder", "Kent reminder missed",
                           "...", regions=["kent"])
        session.commit()
    make_user(engine, "root", role="admin", regions=())
    make_user(engine, "ess", regions=("essex",))
    make_user(engine, "ken", regions=("kent",))

    def subjects(who: str, role: str = "coordinator", query: str = "") -> list[str]:
        answer = app_client.get(f"/api/v1/alerts{query}", headers=_token(engine, who, role))
        assert answer.status_code == 200, answer.text
        return [a["subject"] for a in answer.json()]

    held = "Bounces from essex.police.uk are held back"
    assert subjects("root", "admin") == ["Kent reminder missed", "Sending halted", held]
    assert subjects("root", "admin", "?limit=1") == ["Kent reminder missed"]
    assert subjects("ess") == ["Sending halted", held]
    assert subjects("ken") == ["Kent reminder missed", "Sending halted"]
    assert subjects("ken", "viewer") == ["Kent reminder missed", "Sending halted"]
    (first,) = app_client.get("/api/v1/alerts?limit=1", headers=_token(engine, "ess")).json()
    assert {k: first[k] for k in ("kind", "regions", "mailed", "mailed_to", "state",
                                  "last_error")} == {
        "kind": "halt", "regions": [], "mailed": False, "mailed_to": 0,
        "state": "Waiting to be mailed", "last_error": None}
    assert app_client.get("/api/v1/alerts?limit=0", headers=_token(engine, "ess")
                          ).status_code == 422
