"""D3: a Kent co-ordinator or viewer reads nothing of an Essex-only draft, and the audit log
shows them only their regions' subscribers and editions, without anyone's IP address; an
administrator sees every entry and every address. Console and API alike."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from mailer.config import Settings
from subscribers.db import session_factory
from tests.test_admin_routes import (  # noqa: F401
    app_client,
    login,
    make_user,
    people,
    sample_edition,
)
from tests.test_api import _token
from tests.web_fixtures import (  # noqa: F401
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

IP = "203.0.113.77"


def _world(engine: Engine, web_settings: Settings) -> tuple[int, int, int, int]:
    """An Essex-only draft, a Kent draft, a Kent and an Essex subscriber, each edited by an
    admin from a known IP address, so the log names them all."""
    from mailer import audit

    essex_draft = sample_edition(engine, web_settings, regions="[essex]", slug="essex-only")
    kent_draft = sample_edition(engine, web_settings, regions="[kent]", slug="kent-only")
    kent_id, essex_id = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                       ("e@essex.police.uk", "essex")])
    with session_factory(engine)() as session:
        for target in (f"edition:{essex_draft}", f"edition:{kent_draft}",
                       f"subscriber:{kent_id}", f"subscriber:{essex_id}", "user:boss", None):
            audit.record(session, actor="boss", via="console", ip=IP, action="test.touch",
                         target=target)
        session.commit()
    return essex_draft, kent_draft, kent_id, essex_id


@pytest.mark.parametrize("role", ["coordinator", "viewer"])
def test_a_kent_reader_cannot_read_an_essex_only_draft(
        app_client: TestClient, engine: Engine, web_settings: Settings, role: str) -> None:
    make_user(engine, "kent", role=role, regions=("kent",))
    essex_draft, kent_draft, _, _ = _world(engine, web_settings)
    assert login(app_client, "kent").status_code == 303
    for path in ("", "/preview.html", "/progress", "/progress.json", "/edit"):
        assert app_client.get(f"/admin/editions/{essex_draft}{path}").status_code in (403, 404), \
            path
    assert app_client.get(f"/admin/editions/{kent_draft}").status_code == 200
    assert "essex-only" not in app_client.get("/admin/editions").text
    headers = _token(engine, "kent", role=role)
    for path in ("", "/preview", "/progress"):
        response = app_client.get(f"/api/v1/editions/{essex_draft}{path}", headers=headers)
        assert response.status_code == 404, path
    listed = app_client.get("/api/v1/editions", headers=headers).json()
    assert [e["id"] for e in listed] == [kent_draft]


def test_the_audit_log_is_scoped_and_ips_are_for_admins(
        app_client: TestClient, engine: Engine, web_settings: Settings) -> None:
    """(A viewer may not read the audit log at all: `Permission.AUDIT_VIEW`.)"""
    role = "coordinator"
    make_user(engine, "kent", role=role, regions=("kent",))
    make_user(engine, "boss", role="admin", regions=())
    essex_draft, kent_draft, kent_id, essex_id = _world(engine, web_settings)
    shown = {f"edition:{kent_draft}", f"subscriber:{kent_id}", "user:boss", None}
    hidden = {f"edition:{essex_draft}", f"subscriber:{essex_id}"}

    api = app_client.get("/api/v1/audit?action=test.touch",
                         headers=_token(engine, "kent", role=role)).json()
    assert {i["target"] for i in api["items"]} == shown
    assert api["total"] == len(shown)
    assert {i["ip"] for i in api["items"]} == {None}

    assert login(app_client, "kent").status_code == 303
    page = app_client.get("/admin/audit?action=test.touch").text
    for target in hidden:
        assert f"<td>{target}</td>" not in page
    for target in shown - {None}:
        assert f"<td>{target}</td>" in page
    assert IP not in page

    admin = app_client.get("/api/v1/audit?action=test.touch",
                           headers=_token(engine, "boss", role="admin")).json()
    assert {i["target"] for i in admin["items"]} == shown | hidden
    assert {i["ip"] for i in admin["items"]} == {IP}
    app_client.cookies.clear()
    assert login(app_client, "boss").status_code == 303
    page = app_client.get("/admin/audit?action=test.touch").text
    assert IP in page and f"<td>subscriber:{essex_id}</td>" in page
