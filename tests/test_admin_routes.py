"""Every console and API route, taken from the app's own route table (so a new route is covered
the day it is added): anonymous requests and roles without the permission are refused, every
console POST needs the CSRF token, and a co-ordinator's region scope holds for lists, exports,
single records and sends.

Helpers here (`make_user`, `login`, `people`) are shared by the other console tests.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.routing import Mount

from mailer import accounts, audit, outbox
from mailer.config import Settings
from mailer.models import Edition, EditionStatus
from mailer.web.app import create_app
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel
from tests.web_fixtures import (  # noqa: F401
    BASE,
    SAMPLE,
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

PASSWORD = "correct horse battery staple"
# Console pages a viewer may open. Any other route (a new one too) must refuse a viewer
# until it is added here on purpose.
VIEWER_MAY = {("GET", "/admin"), ("GET", "/admin/"), ("GET", "/admin/subscribers"),
              ("GET", "/admin/subscribers/{sid}"), ("GET", "/admin/editions"),
              ("GET", "/admin/editions/{eid}"), ("GET", "/admin/editions/{eid}/preview.html"),
              ("GET", "/admin/editions/{eid}/progress"), ("GET", "/admin/events"),
              ("POST", "/admin/logout")}
API_VIEWER_MAY = {("GET", "/me"), ("GET", "/counts"), ("GET", "/subscribers"),
                  ("GET", "/subscribers/{sid}"), ("GET", "/editions"),
                  ("GET", "/editions/{eid}"), ("GET", "/editions/{eid}/progress")}
OPEN = {"/admin/login", "/admin/static/admin.css"}


def make_user(engine: Engine, login: str, role: str = "coordinator",
              regions: tuple[str, ...] = ("kent", "essex"), name: str | None = None,
              email: str | None = None) -> None:
    with session_factory(engine)() as session:
        accounts.add_user(session, login=login, display_name=name or login.title(), role=role,
                          password=PASSWORD, regions=list(regions),
                          known_regions=["kent", "essex", "medway", "southend", "thurrock",
                                         "other"], email=email)
        session.commit()


def login(client: TestClient, who: str, password: str = PASSWORD, code: str = "") -> Any:
    token = csrf_of(client.get("/admin/login").text)
    return client.post("/admin/login", data={"csrf_token": token, "login": who,
                                             "password": password, "code": code,
                                             "next": "/admin"}, follow_redirects=False)


def people(engine: Engine, settings: Settings, spec: list[tuple[str, str]]) -> list[int]:
    rules = settings.rules()
    ids = []
    with session_factory(engine)() as session:
        topics = store.topics_by_slug(session, ["newsletter"])
        for email, region in spec:
            profile = store.profile_from(rules, email=email, name=email.split("@")[0],
                                         region=region)
            ids.append(store.add_active(session, rules, profile, topics, store.Context(
                channel=Channel.IMPORT, lawful_basis="public_task")).id)
        session.commit()
    return ids


def sample_edition(engine: Engine, settings: Settings, author: str = "someone") -> int:
    with session_factory(engine)() as session:
        edition, _ = outbox.store_edition_file(session, settings, SAMPLE, author)
        session.commit()
        return edition.id


@pytest.fixture
def app_client(web_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(web_settings), base_url=BASE) as c:
        yield c


def _flat(routes: list[Any]) -> list[Any]:
    # FastAPI 0.16x keeps an included router as one lazy entry; its routes are underneath.
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _flat(list(inner.routes)) if inner is not None else [route]
    return out


def _routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for route in _flat(list(app.routes)):
        if isinstance(route, Mount):
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD" and route.path.startswith("/admin"):
                out.append((method, route.path))
    return out


def _api_routes(app: Any) -> list[tuple[str, str]]:
    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == "/api/v1")
    return [(m, r.path) for r in _flat(list(mount.app.routes))
            for m in sorted(getattr(r, "methods", ())) if m != "HEAD" and r.path != "/openapi.json"]


def _concrete(path: str) -> str:
    return path.replace("{sid}", "1").replace("{eid}", "1")


def test_the_route_table_is_not_empty(app_client: TestClient) -> None:
    # Guards the tests below against passing vacuously on an app without the console.
    assert len(_routes(app_client.app)) > 30
    assert len(_api_routes(app_client.app)) > 15


def test_every_console_route_refuses_anonymous_requests(app_client: TestClient,
                                                        engine: Engine, web_settings: Settings
                                                        ) -> None:
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    checked = 0
    for method, path in _routes(app_client.app):
        if path in OPEN:
            continue
        response = app_client.request(method, _concrete(path), follow_redirects=False)
        assert response.status_code in (303, 401, 403), (method, path, response.status_code)
        if response.status_code == 303:
            assert response.headers["location"].startswith(f"{BASE}/admin/login")
        checked += 1
    assert checked > 30


def test_every_api_route_refuses_requests_without_a_valid_token(app_client: TestClient,
                                                                engine: Engine) -> None:
    make_user(engine, "tok", role="admin", regions=())
    with session_factory(engine)() as session:
        user = accounts.get_user(session, "tok")
        _row, real = accounts.create_token(session, user, name="t")
        row2, revoked = accounts.create_token(session, user, name="gone")
        accounts.revoke_token(session, row2.prefix)
        session.commit()
    for method, path in _api_routes(app_client.app):
        url = "/api/v1" + _concrete(path)
        for header in ({}, {"Authorization": "Bearer msht_nope_nope"},
                       {"Authorization": f"Bearer {revoked}"},
                       {"Authorization": f"Basic {real}"}):
            response = app_client.request(method, url, headers=header, json={})
            assert response.status_code == 401, (method, path, header, response.text)


def test_a_viewer_is_refused_every_route_outside_its_permission(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "vic", role="viewer", regions=("kent",))
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    assert login(app_client, "vic").status_code == 303
    refused = allowed = 0
    for method, path in _routes(app_client.app):
        if path in OPEN or (method, path) in VIEWER_MAY:
            continue
        response = app_client.request(method, _concrete(path), follow_redirects=False)
        assert response.status_code == 403, (method, path, response.status_code)
        refused += 1
    for method, path in sorted(VIEWER_MAY - {("POST", "/admin/logout")}):
        response = app_client.request(method, _concrete(path), follow_redirects=False)
        assert response.status_code == 200, (method, path, response.status_code)
        allowed += 1
    assert refused > 20 and allowed > 5


def test_a_viewer_token_is_refused_every_api_route_outside_its_permission(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "vic", role="coordinator", regions=("kent",))
    with session_factory(engine)() as session:
        # A co-ordinator's token made with the viewer role: the token's role is what counts.
        _row, token = accounts.create_token(session, accounts.get_user(session, "vic"),
                                            name="read only", role="viewer")
        session.commit()
    sample_edition(engine, web_settings)
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    headers = {"Authorization": f"Bearer {token}"}
    for method, path in _api_routes(app_client.app):
        response = app_client.request(method, "/api/v1" + _concrete(path), headers=headers,
                                      json={"at": "2099-01-01T09:00:00+00:00"})
        expected = 200 if (method, path) in API_VIEWER_MAY else 403
        assert response.status_code == expected, (method, path, response.text)


def test_every_console_form_refuses_a_post_without_the_csrf_token(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "root", role="admin", regions=())
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    assert login(app_client, "root").status_code == 303
    with Session(engine) as session:
        before = session.scalar(select(func.count()).select_from(audit.AuditEntry))
    posts = [p for m, p in _routes(app_client.app) if m == "POST"]
    for path in posts:
        for data in ({}, {"csrf_token": "forged"}):
            response = app_client.post(_concrete(path), data={**data, "confirm": "erase"},
                                       follow_redirects=False)
            assert response.status_code == 403, (path, data, response.status_code)
    # A cross-site post with a valid token pair is refused on Fetch Metadata alone.
    token = csrf_of(app_client.get("/admin").text)
    response = app_client.post("/admin/subscribers/1/unsubscribe", data={"csrf_token": token},
                               headers={"Sec-Fetch-Site": "cross-site"},
                               follow_redirects=False)
    assert response.status_code == 403
    with Session(engine) as session:
        after = session.scalar(select(func.count()).select_from(audit.AuditEntry))
        assert store.get(session, 1).status == "active"
    assert after == before  # nothing was done, so nothing was logged
    assert len(posts) > 15


def test_a_kent_coordinator_sees_lists_exports_and_sends_for_kent_only(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    kent_id, essex_id = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                       ("e@essex.police.uk", "essex")])
    eid = sample_edition(engine, web_settings, author="someone-else")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "someone-else")
        session.commit()
    assert login(app_client, "kent").status_code == 303

    page = app_client.get("/admin/subscribers").text
    assert "k@kent.police.uk" in page and "e@essex.police.uk" not in page
    assert app_client.get("/admin/subscribers?region=essex").status_code == 403
    assert app_client.get(f"/admin/subscribers/{essex_id}").status_code == 404
    assert app_client.get(f"/admin/subscribers/{kent_id}").status_code == 200

    export = app_client.get("/admin/subscribers/export.csv")
    assert export.status_code == 200
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["email"] for r in rows] == ["k@kent.police.uk"]
    assert app_client.get("/admin/subscribers/export.csv?region=essex").status_code == 403

    token = csrf_of(app_client.get(f"/admin/subscribers/{kent_id}").text)
    for path in (f"/admin/subscribers/{essex_id}/unsubscribe",
                 f"/admin/subscribers/{essex_id}/erase"):
        response = app_client.post(path, data={"csrf_token": token, "confirm": "erase"},
                                   follow_redirects=False)
        assert response.status_code == 404
    # The sample edition goes to Kent and Essex: a Kent co-ordinator may not approve or send.
    for step in ("approve", "send", "cancel"):
        response = app_client.post(f"/admin/editions/{eid}/{step}",
                                   data={"csrf_token": token, "confirm": "yes"},
                                   follow_redirects=False)
        assert response.status_code == 403, step
    with Session(engine) as session:
        assert session.get(Edition, eid).status == EditionStatus.DRAFT
        assert store.get(session, essex_id).status == "active"
    # Figures on the dashboard are Kent's only.
    dashboard = app_client.get("/admin").text
    assert re.search(r"Essex</th><td class=\"num\">1", dashboard) is None


def test_the_api_keeps_the_region_scope(app_client: TestClient, engine: Engine,
                                        web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    _kent_id, essex_id = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                        ("e@essex.police.uk", "essex")])
    with session_factory(engine)() as session:
        _row, token = accounts.create_token(session, accounts.get_user(session, "kent"),
                                            name="t")
        session.commit()
    headers = {"Authorization": f"Bearer {token}"}
    listed = app_client.get("/api/v1/subscribers", headers=headers).json()
    assert [s["email"] for s in listed["items"]] == ["k@kent.police.uk"]
    assert app_client.get("/api/v1/subscribers?region=essex", headers=headers).status_code == 403
    assert app_client.get(f"/api/v1/subscribers/{essex_id}", headers=headers).status_code == 404
    assert app_client.post(f"/api/v1/subscribers/{essex_id}/unsubscribe",
                           headers=headers).status_code == 404
