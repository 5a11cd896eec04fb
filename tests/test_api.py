"""The JSON API: the OpenAPI document, the four-eyes flow over tokens, and a route fuzz that
drives every operation in the document with hostile parameters and bodies and requires that
none of them ever answers 5xx, with hostile values the schema would not generate
(tests/test_api_schemathesis.py runs schemathesis itself over the same document)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from mailer import accounts
from mailer.config import Settings
from subscribers.db import session_factory
from tests.test_admin_routes import app_client, make_user, people, sample_edition  # noqa: F401
from tests.web_fixtures import fault_server, make_fault_server, sink, web_settings  # noqa: F401

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
