"""Every console and API route, taken from the app's own route table (so a new route is covered
the day it is added): anonymous requests and roles without the permission are refused, every
console POST needs the CSRF token and every form carries it, and a co-ordinator's region scope
holds for lists, exports, single records, changes and sends, in the console and the API.

The refusals are told apart by their text: a POST carries a valid CSRF token where the test
means to reach the permission check, so a route that forgot its permission check could not pass
on the CSRF refusal instead (and a sweep that does nothing is caught by the counts asserted).

Helpers here (`make_user`, `login`, `people`) are shared by the other console tests.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session
from starlette.routing import Mount

from mailer import accounts, audit, bounce_policy, outbox
from mailer.bounce_policy import BouncePolicy
from mailer.config import Settings
from mailer.inbound import InboundMessage
from mailer.models import Delivery, DeliveryStatus, Edition, EditionStatus
from mailer.reference import return_path
from mailer.web.app import create_app
from subscribers import store
from subscribers.db import session_factory, utcnow
from subscribers.models import Channel
from tests.test_bounce_policy import BOUNCE_ADDRESS, dsn
from tests.web_fixtures import (  # noqa: F401
    BASE,
    SAMPLE,
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    snapshot,
    web_settings,
)

PASSWORD = "correct horse battery staple"
# Console pages a viewer may open. Any other route (a new one too) must refuse a viewer
# until it is added here on purpose.
VIEWER_MAY = {("GET", "/admin"), ("GET", "/admin/"), ("GET", "/admin/subscribers"),
              ("GET", "/admin/subscribers/{sid}"), ("GET", "/admin/editions"),
              ("GET", "/admin/editions/{eid}"), ("GET", "/admin/editions/{eid}/preview.html"),
              ("GET", "/admin/editions/{eid}/progress"),
              ("GET", "/admin/editions/{eid}/progress.json"), ("GET", "/admin/events"),
              ("GET", "/admin/bounces"), ("POST", "/admin/logout"),
              ("GET", "/admin/charts/{chart}.svg"), ("GET", "/admin/charts/{chart}.csv"),
              ("GET", "/admin/editions/{eid}/chart.svg"),
              ("GET", "/admin/editions/{eid}/chart.csv"), ("GET", "/admin/segments")}
# Console routes only an administrator may use; a co-ordinator is refused these and no others.
ADMIN_ONLY = {("GET", "/admin/users"), ("GET", "/admin/privacy"), ("GET", "/admin/users/new"),
              ("POST", "/admin/users/new"), ("GET", "/admin/users/{login}"),
              *(("POST", f"/admin/users/{{login}}/{step}") for step in (
                  "edit", "disable", "enable", "password", "second-factor-off"))}
API_VIEWER_MAY = {("GET", "/me"), ("GET", "/counts"), ("GET", "/subscribers"),
                  ("GET", "/subscribers/{sid}"), ("GET", "/subscribers/{sid}/history"),
                  ("GET", "/editions"), ("GET", "/editions/{eid}"),
                  ("GET", "/editions/{eid}/preview"), ("GET", "/editions/{eid}/progress"),
                  ("GET", "/events"), ("GET", "/bounce-alerts"), ("GET", "/alerts"),
                  ("GET", "/segments"), ("GET", "/segments/{slug}"),
                  ("GET", "/editions/{eid}/audience")}
API_ADMIN_ONLY: set[tuple[str, str]] = set()
OPEN = {"/admin/login", "/admin/static/admin.css", "/admin/static/progress.js",
        "/admin/static/editor.js",
        # sign-in with the force's directory (tests/test_oidc.py): the way to a session
        "/admin/login/directory", "/admin/login/directory/callback"}
REFUSED = "You do not have permission to do this"  # the console's permission refusal
BAD_FORM = "This form could not be accepted"  # its CSRF refusal


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


def sample_edition(engine: Engine, settings: Settings, author: str = "someone",
                   regions: str | None = None, slug: str | None = None) -> int:
    """The sample edition (Kent and Essex), or with `regions` (e.g. "[kent]") another audience."""
    with session_factory(engine)() as session:
        if regions is None:
            edition, _ = outbox.store_edition_file(session, settings, SAMPLE, author)
        else:
            source = SAMPLE.read_text().replace("regions: [kent, essex]", f"regions: {regions}")
            edition, _ = outbox.store_edition_source(session, settings, slug or SAMPLE.stem,
                                                     source, author)
        session.commit()
        return edition.id


def kent_segment(engine: Engine, settings: Settings) -> None:
    """The saved segment `_concrete` names for `{slug}`."""
    from mailer.operations import command_line_caller
    from mailer.operations import segments as segment_ops
    from mailer.segments import AudienceFields
    with session_factory(engine)() as session:
        segment_ops.add(session, command_line_caller(), settings, slug="kent-all",
                        name="Kent", description="", fields=AudienceFields(regions=["kent"]))
        session.commit()


def sent_edition(engine: Engine, settings: Settings, regions: str, slug: str) -> int:
    """The sample edition with this audience, queued and every delivery accepted by the relay
    three hours ago (what a finished send leaves)."""
    eid = sample_edition(engine, settings, author="alice", regions=regions, slug=slug)
    with session_factory(engine)() as session:
        outbox.enqueue(session, outbox.get_edition(session, eid))
        session.execute(update(Delivery).where(Delivery.edition_id == eid).values(
            status=DeliveryStatus.SENT, last_code=250, last_reply="250 2.0.0 queued",
            sent_at=utcnow() - timedelta(hours=3)))
        session.commit()
    return eid


def bounce(engine: Engine, settings: Settings, eid: int | None,
           who: list[tuple[int | None, str]], status: str = "5.1.1") -> None:
    """Real DSNs through the bounce policy, as the LMTP receiver hands them over: each to the
    VERP address of (edition, subscriber), or with no subscriber to the plain bounce address
    (a bounce we cannot tie to a delivery). Received two hours ago, then settled now, past
    the hold, so a burst from one domain is judged whole."""
    policy = BouncePolicy.from_settings(settings)
    earlier = utcnow() - timedelta(hours=2)
    with session_factory(engine)() as session:
        for sid, email in who:
            to = (return_path(settings.secret(), eid, sid, BOUNCE_ADDRESS)
                  if sid is not None and eid is not None else BOUNCE_ADDRESS)
            bounce_policy.receive(session, policy, InboundMessage(
                raw=dsn(email, status, to=to), origin="lmtp from 127.0.0.1", mail_from="",
                rcpt_tos=(to,)), settings.secret(), rules=settings.rules(), now=earlier,
                token_keys=settings.token_keys())
        bounce_policy.settle(session, policy)
        session.commit()


def domain_alert(engine: Engine, settings: Settings, region: str = "essex", n: int = 6,
                 bounced: int = 4) -> tuple[int, int, list[int]]:
    """A real domain alert: a send to `n` people at <region>.police.uk, `bounced` of whom
    bounced, so their bounces are held. Returns the alert's id, the edition's and the people's.
    """
    ids = people(engine, settings, [(f"officer{i}@{region}.police.uk", region)
                                    for i in range(n)])
    eid = sent_edition(engine, settings, f"[{region}]", f"2020-q3-{region}")
    bounce(engine, settings, eid, [(ids[i], f"officer{i}@{region}.police.uk")
                                   for i in range(bounced)])
    with Session(engine) as session:
        alert_ids = [a.id for a in bounce_policy.open_alerts(session)
                     if a.edition_id == eid and a.domain == f"{region}.police.uk"]
    assert len(alert_ids) == 1, alert_ids
    return alert_ids[0], eid, ids


def audit_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(audit.AuditEntry)) or 0


def _world(engine: Engine) -> tuple[Any, ...]:
    """What any console or API action could change: subscribers, editions and deliveries."""
    with Session(engine) as session:
        editions = session.execute(select(Edition.id, Edition.status, Edition.approved_by,
                                          Edition.scheduled_for, Edition.source_sha256)
                                   .order_by(Edition.id)).all()
        deliveries = session.scalar(select(func.count()).select_from(outbox.Delivery))
    return snapshot(engine), tuple(editions), deliveries


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
    return (path.replace("{sid}", "1").replace("{eid}", "1").replace("{aid}", "1")
            .replace("{event_id}", "1").replace("{key}", "unknown")
            .replace("{login}", "root").replace("{chart}", "sends")
            .replace("{slug}", "kent-all"))


def test_the_route_table_is_not_empty(app_client: TestClient) -> None:
    # Guards the tests below against passing vacuously on an app without the console.
    assert len(_routes(app_client.app)) > 30
    assert len(_api_routes(app_client.app)) > 25
    known = set(_routes(app_client.app))
    assert not (VIEWER_MAY | ADMIN_ONLY) - known  # no stale names in the tables
    assert not API_VIEWER_MAY - set(_api_routes(app_client.app))


def test_every_console_route_refuses_anonymous_requests(app_client: TestClient,
                                                        engine: Engine, web_settings: Settings
                                                        ) -> None:
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    # A valid CSRF pair (the sign-in page sets the cookie): the refusal must come from the
    # missing session, not from the form check.
    token = csrf_of(app_client.get("/admin/login").text)
    before, logged = _world(engine), audit_count(engine)
    checked = 0
    for method, path in _routes(app_client.app):
        if path in OPEN:
            continue
        response = app_client.request(
            method, _concrete(path), follow_redirects=False,
            data={"csrf_token": token, "confirm": "erase"} if method == "POST" else None)
        assert response.status_code == 303, (method, path, response.status_code)
        assert response.headers["location"].startswith(f"{BASE}/admin/login"), (method, path)
        checked += 1
    assert checked > 30
    assert _world(engine) == before and audit_count(engine) == logged


def test_every_api_route_refuses_requests_without_a_valid_token(app_client: TestClient,
                                                                engine: Engine,
                                                                web_settings: Settings) -> None:
    make_user(engine, "tok", role="admin", regions=())
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    with session_factory(engine)() as session:
        user = accounts.get_user(session, "tok")
        _row, real = accounts.create_token(session, user, name="t")
        row2, revoked = accounts.create_token(session, user, name="gone")
        accounts.revoke_token(session, row2.prefix)
        _row3, expired = accounts.create_token(session, user, name="old", days=1)
        session.execute(update(accounts.ApiToken).where(accounts.ApiToken.name == "old")
                        .values(expires_at=accounts.utcnow() - timedelta(seconds=1)))
        session.commit()
    prefix, _, secret = real.rpartition("_")
    # A real prefix with a wrong secret (one character off, never the same by chance).
    forged = f"{prefix}_{secret[:-1]}{'B' if secret.endswith('A') else 'A'}"
    before = _world(engine)
    checked = 0
    for method, path in _api_routes(app_client.app):
        url = "/api/v1" + _concrete(path)
        for header in ({}, {"Authorization": "Bearer msht_nope_nope"},
                       {"Authorization": f"Bearer {revoked}"},
                       {"Authorization": f"Bearer {expired}"},
                       {"Authorization": f"Bearer {forged}"},
                       {"Authorization": f"Basic {real}"}, {"Authorization": real}):
            response = app_client.request(method, url, headers=header, json={})
            assert response.status_code == 401, (method, path, header, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            checked += 1
        # Cookies are never credentials here: a signed-in console session is not enough.
    assert checked > 25 * 7
    assert _world(engine) == before


def test_the_api_ignores_a_console_session(app_client: TestClient, engine: Engine) -> None:
    make_user(engine, "root", role="admin", regions=())
    assert login(app_client, "root").status_code == 303
    assert app_client.get("/admin").status_code == 200  # the session works in the console
    assert app_client.get("/api/v1/me").status_code == 401


def test_a_viewer_is_refused_every_route_outside_its_permission(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "vic", role="viewer", regions=("kent",))
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    assert login(app_client, "vic").status_code == 303
    token = csrf_of(app_client.get("/admin").text)
    before, logged = _world(engine), audit_count(engine)
    refused = allowed = 0
    for method, path in _routes(app_client.app):
        if path in OPEN or (method, path) in VIEWER_MAY:
            continue
        response = app_client.request(
            method, _concrete(path), follow_redirects=False,
            data={"csrf_token": token, "confirm": "erase"} if method == "POST" else None)
        assert response.status_code == 403, (method, path, response.status_code)
        assert REFUSED in response.text, (method, path)  # the permission, not the form check
        refused += 1
    assert _world(engine) == before and audit_count(engine) == logged
    for method, path in sorted(VIEWER_MAY - {("POST", "/admin/logout")}):
        response = app_client.request(method, _concrete(path), follow_redirects=False)
        assert response.status_code == 200, (method, path, response.status_code)
        allowed += 1
    assert refused > 20 and allowed > 5


def test_a_coordinator_is_refused_the_administrator_routes_and_only_those(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "kent", role="coordinator", regions=("kent",))
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    assert login(app_client, "kent").status_code == 303
    before = _world(engine)
    for method, path in _routes(app_client.app):
        if path in OPEN or (method, path) == ("POST", "/admin/logout"):
            continue
        # POSTs without the CSRF token: past the permission check they stop at the form check,
        # so nothing changes while the test still sees which check answered.
        response = app_client.request(method, _concrete(path), follow_redirects=False)
        assert response.status_code < 500, (method, path, response.status_code)
        if (method, path) in ADMIN_ONLY:
            assert response.status_code == 403 and REFUSED in response.text, (method, path)
        else:
            assert REFUSED not in response.text, (method, path)
            if method == "POST":  # the form check, or (importing) the region rule first
                assert response.status_code == 403, path
                assert BAD_FORM in response.text or "Importing needs every region" in \
                    response.text, path
    assert _world(engine) == before


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
    kent_segment(engine, web_settings)
    headers = {"Authorization": f"Bearer {token}"}
    before = _world(engine)
    for method, path in _api_routes(app_client.app):
        response = app_client.request(method, "/api/v1" + _concrete(path), headers=headers,
                                      json={"at": "2099-01-01T09:00:00+00:00"})
        if (method, path) in API_VIEWER_MAY:
            assert response.status_code == 200, (method, path, response.text)
        else:
            assert response.status_code == 403, (method, path, response.text)
            assert response.json() == {"detail": "role viewer may not do this"}, (method, path)
    assert _world(engine) == before


def test_a_coordinator_token_is_refused_the_administrator_operations_and_only_those(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "kent", role="coordinator", regions=("kent",))
    with session_factory(engine)() as session:
        _row, token = accounts.create_token(session, accounts.get_user(session, "kent"),
                                            name="script")
        session.commit()
    sample_edition(engine, web_settings)
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    kent_segment(engine, web_settings)
    headers = {"Authorization": f"Bearer {token}"}
    for method, path in _api_routes(app_client.app):
        # An empty body: past the permission check, operations with a body stop at validation.
        response = app_client.request(method, "/api/v1" + _concrete(path), headers=headers,
                                      json={})
        assert response.status_code < 500, (method, path, response.text)
        denied = response.status_code == 403 and "may not do this" in response.text
        assert denied == ((method, path) in API_ADMIN_ONLY), (method, path, response.text)


def test_an_account_left_without_regions_is_refused_everywhere(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    # Accounts are made with a region; one whose regions were emptied in the database must
    # not fall through to the unscoped, every-region queries.
    make_user(engine, "kent", regions=("kent",))
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    with session_factory(engine)() as session:
        user = accounts.get_user(session, "kent")
        _row, token = accounts.create_token(session, user, name="t")
        session.commit()
    assert login(app_client, "kent").status_code == 303
    with session_factory(engine)() as session:
        accounts.get_user(session, "kent").regions = []
        session.commit()
    for path in ("/admin", "/admin/subscribers", "/admin/subscribers/export.csv"):
        response = app_client.get(path)
        assert response.status_code == 403 and "You have no regions" in response.text, path
    for path in ("/counts", "/subscribers", "/subscribers/export"):
        response = app_client.get("/api/v1" + path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 403, path


class _Forms(HTMLParser):
    """Each <form>: its method, action and the names and values of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"method": (a.get("method") or "get").lower(),
                               "action": a.get("action") or "", "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value")


def test_every_form_on_every_console_page_carries_the_csrf_token(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "root", role="admin", regions=())
    (pending,) = people(engine, web_settings, [("a@kent.police.uk", "kent")])
    with session_factory(engine)() as session:  # so the approve and reject forms show
        store.get(session, pending).status = "awaiting_approval"
        session.commit()
    eid = sample_edition(engine, web_settings, author="alice")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        outbox.request_approval(session, edition, "alice")
        session.commit()
    domain_alert(engine, web_settings)  # so the resolve forms show
    kent_segment(engine, web_settings)  # so its edit and remove forms show
    assert login(app_client, "root").status_code == 303
    cookie = app_client.cookies["csrf"]
    expected = app_client.app.state.web.csrf.form_token(cookie)
    posts = {path for method, path in _routes(app_client.app) if method == "POST"}
    pattern = [re.compile("^" + re.sub(r"\{\w+\}", r"[^/]+", p) + "$") for p in posts]
    seen: set[str] = set()
    for method, path in _routes(app_client.app):
        if method != "GET" or path in OPEN or path.endswith((".csv", ".html", ".json")):
            continue
        page = app_client.get(_concrete(path).replace("/1", f"/{eid}")
                              if "{eid}" in path else _concrete(path))
        assert page.status_code == 200, path
        parser = _Forms()
        parser.feed(page.text)
        for form in parser.forms:
            if form["method"] != "post":
                continue
            action = form["action"].removeprefix(BASE)
            assert form["fields"].get("csrf_token") == expected, (path, action)
            assert any(p.match(action) for p in pattern), (path, action)  # a real route
            seen.add(re.sub(r"/\d+", "/{id}", action))
    # The pages between them show the forms of most POST routes (the rest are per-state).
    assert len(seen) >= 13, sorted(seen)
    assert "/admin/bounces/alerts/{id}/resolve" in seen


def test_every_console_form_refuses_a_post_without_the_csrf_token(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "root", role="admin", regions=())
    people(engine, web_settings, [("a@kent.police.uk", "kent")])
    sample_edition(engine, web_settings)
    assert login(app_client, "root").status_code == 303
    before, logged = _world(engine), audit_count(engine)
    token = csrf_of(app_client.get("/admin").text)
    posts = [p for m, p in _routes(app_client.app) if m == "POST"]
    for path in posts:
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": token + "0"}):
            response = app_client.post(_concrete(path), data={**data, "confirm": "erase"},
                                       follow_redirects=False)
            assert response.status_code == 403, (path, data, response.status_code)
            assert BAD_FORM in response.text, (path, data)
        # The right token with another site's Origin, or Fetch Metadata saying cross-site.
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}):
            response = app_client.post(_concrete(path),
                                       data={"csrf_token": token, "confirm": "erase"},
                                       headers=headers, follow_redirects=False)
            assert response.status_code == 403 and BAD_FORM in response.text, (path, headers)
    # Without the cookie the form value alone is not enough either.
    cookie = app_client.cookies.pop("csrf")
    response = app_client.post("/admin/subscribers/1/unsubscribe", data={"csrf_token": token},
                               follow_redirects=False)
    assert response.status_code == 403 and BAD_FORM in response.text
    app_client.cookies.set("csrf", cookie)
    assert _world(engine) == before and audit_count(engine) == logged  # nothing done or logged
    assert len(posts) > 15
    # The control: the same post with the token and no foreign headers goes through.
    response = app_client.post("/admin/subscribers/1/unsubscribe", data={"csrf_token": token},
                               follow_redirects=False)
    assert response.status_code == 303
    with Session(engine) as session:
        assert store.get(session, 1).status == "unsubscribed"


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
    assert "e@essex.police.uk" not in app_client.get("/admin/subscribers?q=essex").text
    assert app_client.get("/admin/subscribers?region=essex").status_code == 403
    assert app_client.get(f"/admin/subscribers/{essex_id}").status_code == 404
    assert app_client.get(f"/admin/subscribers/{essex_id}/erase").status_code == 404
    assert app_client.get(f"/admin/subscribers/{kent_id}").status_code == 200

    export = app_client.get("/admin/subscribers/export.csv")
    assert export.status_code == 200
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["email"] for r in rows] == ["k@kent.police.uk"]
    assert app_client.get("/admin/subscribers/export.csv?region=essex").status_code == 403

    token = csrf_of(app_client.get(f"/admin/subscribers/{kent_id}").text)
    for path in (f"/admin/subscribers/{essex_id}/unsubscribe",
                 f"/admin/subscribers/{essex_id}/erase", f"/admin/subscribers/{essex_id}/edit"):
        response = app_client.post(path, data={"csrf_token": token, "confirm": "erase",
                                               "region": "kent"}, follow_redirects=False)
        assert response.status_code == 404
    # Nor may they move their own subscriber to Essex, or add someone there.
    response = app_client.post(f"/admin/subscribers/{kent_id}/edit",
                               data={"csrf_token": token, "region": "essex"})
    assert response.status_code == 400
    response = app_client.post("/admin/subscribers/new", data={
        "csrf_token": token, "email": "new@essex.police.uk", "region": "essex",
        "topics": ["newsletter"], "lawful_basis": "public_task"})
    assert response.status_code == 400 and "choose one of your regions" in response.text
    # The sample edition goes to Kent and Essex: a Kent co-ordinator may not approve or send.
    for step in ("approve", "send", "cancel", "schedule"):
        response = app_client.post(f"/admin/editions/{eid}/{step}",
                                   data={"csrf_token": token, "confirm": "yes",
                                         "date": "2099-01-05", "time": "09:00"},
                                   follow_redirects=False)
        assert response.status_code == 403, step
        assert "outside your regions" in response.text, step
    with Session(engine) as session:
        assert session.get(Edition, eid).status == EditionStatus.DRAFT
        assert store.get(session, essex_id).status == "active"
        assert store.get(session, essex_id).region == "essex"
        assert store.get(session, kent_id).region == "kent"
        assert store.find_by_email(session, web_settings.rules(), "new@essex.police.uk") is None
    # Figures on the dashboard are Kent's only.
    dashboard = app_client.get("/admin").text
    assert re.search(r"Essex</th><td class=\"num\">1", dashboard) is None
    assert re.search(r"Kent</th><td class=\"num\">1", dashboard) is not None


def test_a_coordinator_of_two_regions_sees_both_together_and_no_third(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "ke", regions=("kent", "essex"))
    people(engine, web_settings, [("k@kent.police.uk", "kent"), ("e@essex.police.uk", "essex"),
                                  ("m@medway.gov.uk", "medway")])
    assert login(app_client, "ke").status_code == 303
    page = app_client.get("/admin/subscribers").text
    assert "2 subscriber(s)" in page
    assert "k@kent.police.uk" in page and "e@essex.police.uk" in page
    assert "m@medway.gov.uk" not in page
    assert "All my regions" in page
    essex = app_client.get("/admin/subscribers?region=essex").text
    assert "e@essex.police.uk" in essex and "k@kent.police.uk" not in essex
    assert app_client.get("/admin/subscribers?region=medway").status_code == 403
    assert "m@medway.gov.uk" not in app_client.get("/admin/subscribers?q=medway").text
    export = app_client.get("/admin/subscribers/export.csv")
    assert sorted(r["email"] for r in csv.DictReader(io.StringIO(export.text))) == \
        ["e@essex.police.uk", "k@kent.police.uk"]
    assert 'filename="subscribers-kent-essex-' in export.headers["content-disposition"]
    with Session(engine) as session:
        _total, (entry,) = audit.entries(session, audit.AuditFilter(action="subscribers.export"))
        assert entry.actor == "ke" and entry.detail["rows"] == 2
        assert entry.detail["filter"]["scope"] == ["kent", "essex"]


def test_a_kent_coordinator_approves_and_sends_a_kent_edition_to_kent_only(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    people(engine, web_settings, [("k1@kent.police.uk", "kent"), ("k2@kent.police.uk", "kent"),
                                  ("e@essex.police.uk", "essex")])
    eid = sample_edition(engine, web_settings, author="alice", regions="[kent]",
                         slug="2020-q3-kent")
    with session_factory(engine)() as session:
        outbox.request_approval(session, outbox.get_edition(session, eid), "alice")
        session.commit()
    assert login(app_client, "kent").status_code == 303
    token = csrf_of(app_client.get(f"/admin/editions/{eid}").text)
    for step, data in (("approve", {}), ("send", {"confirm": "yes"})):
        response = app_client.post(f"/admin/editions/{eid}/{step}",
                                   data={"csrf_token": token, **data}, follow_redirects=False)
        assert response.status_code == 303, (step, response.text)
    with Session(engine) as session:
        queued = session.scalars(select(outbox.Delivery.subscriber_id)
                                 .where(outbox.Delivery.edition_id == eid)).all()
        regions = {store.get(session, sid).region for sid in queued}
    assert len(queued) == 2 and regions == {"kent"}


def test_the_api_keeps_the_region_scope(app_client: TestClient, engine: Engine,
                                        web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    kent_id, essex_id = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                       ("e@essex.police.uk", "essex")])
    eid = sample_edition(engine, web_settings, author="someone-else")
    with session_factory(engine)() as session:
        _row, token = accounts.create_token(session, accounts.get_user(session, "kent"),
                                            name="t")
        outbox.request_approval(session, outbox.get_edition(session, eid), "someone-else")
        session.commit()
    headers = {"Authorization": f"Bearer {token}"}
    listed = app_client.get("/api/v1/subscribers", headers=headers).json()
    assert [s["email"] for s in listed["items"]] == ["k@kent.police.uk"]
    assert listed["total"] == 1
    assert app_client.get("/api/v1/subscribers?region=essex", headers=headers).status_code == 403
    assert app_client.get("/api/v1/counts", headers=headers).json()["by_region"] == {"kent": 1}
    export = app_client.get("/api/v1/subscribers/export", headers=headers)
    assert [r["email"] for r in csv.DictReader(io.StringIO(export.text))] == \
        ["k@kent.police.uk"]
    assert app_client.get("/api/v1/subscribers/export?region=essex",
                          headers=headers).status_code == 403
    for method, path in (("GET", ""), ("GET", "/history"), ("POST", "/unsubscribe"),
                         ("PATCH", ""), ("DELETE", "")):
        response = app_client.request(method, f"/api/v1/subscribers/{essex_id}{path}",
                                      headers=headers, json={"name": "x"})
        assert response.status_code == 404, (method, path)
    moved = app_client.patch(f"/api/v1/subscribers/{kent_id}", headers=headers,
                             json={"region": "essex"})
    assert moved.status_code == 403
    added = app_client.post("/api/v1/subscribers", headers=headers, json={
        "email": "new@essex.police.uk", "region": "essex", "lawful_basis": "public_task"})
    assert added.status_code == 403
    for step in ("approve", "send", "cancel"):
        response = app_client.post(f"/api/v1/editions/{eid}/{step}", headers=headers)
        assert response.status_code == 403, step
    response = app_client.post(f"/api/v1/editions/{eid}/schedule", headers=headers,
                               json={"at": "2099-01-05T09:00:00+00:00"})
    assert response.status_code == 403
    with Session(engine) as session:
        assert session.get(Edition, eid).status == EditionStatus.DRAFT
        assert store.get(session, essex_id).status == "active"
        assert store.get(session, kent_id).region == "kent"
        assert store.find_by_email(session, web_settings.rules(), "new@essex.police.uk") is None


def test_a_kent_coordinator_sees_bounces_of_kent_subscribers_only(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    make_user(engine, "root", role="admin", regions=())
    kent_id, essex_id = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                       ("e@essex.police.uk", "essex")])
    eid = sent_edition(engine, web_settings, "[kent, essex]", "2020-q3-both")
    bounce(engine, web_settings, eid, [(kent_id, "k@kent.police.uk"),
                                       (essex_id, "e@essex.police.uk")])
    # Tied to no delivery: there is no region to place it in.
    bounce(engine, web_settings, None, [(None, "stranger@essex.police.uk")])
    assert login(app_client, "kent").status_code == 303
    page = app_client.get("/admin/bounces")
    assert page.status_code == 200
    assert "k@kent.police.uk" in page.text
    main = page.text.split('<main id="main"')[1]  # the site's name says Essex
    assert "essex" not in main.lower()  # neither the Essex subscriber nor the stranger
    assert "2 more outside your regions" in page.text
    assert app_client.get(f"/admin/subscribers/{essex_id}").status_code == 404
    assert "5.1.1" in app_client.get(f"/admin/subscribers/{kent_id}").text
    # The control: an administrator sees all three.
    assert login(app_client, "root").status_code == 303
    page = app_client.get("/admin/bounces")
    assert "k@kent.police.uk" in page.text and "e@essex.police.uk" in page.text
    assert "<td>not identified</td>" in page.text and "not shown" not in page.text
