"""The operations layer (`mailer.operations`): the faces are thin over it, so the same action
leaves the same audit entry whichever face it came through; and the region scope is in SQL,
so a co-ordinator of a small region sees their records however many others there are.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import alerts, bounce_policy
from mailer.audit import AuditEntry
from mailer.cli import run
from mailer.config import Settings
from mailer.web.app import create_app
from subscribers.db import make_engine, session_factory, utcnow
from tests.conftest import _pg_clone
from tests.smtp_servers import FaultServer
from tests.test_admin_routes import (  # noqa: F401
    PASSWORD,
    bounce,
    domain_alert,
    login,
    make_user,
    people,
    sent_edition,
)
from tests.web_fixtures import (  # noqa: F401
    BASE,
    SAMPLE,
    csrf_of,
    fault_server,
    make_fault_server,
    make_settings,
    sink,
)

FACES = ("cli", "console", "api")
CSV = b"email,name,region\nann@kent.police.uk,Ann,kent\nbob@essex.police.uk,Bob,essex\n"


@pytest.fixture
def face_databases(backend: str, request: pytest.FixtureRequest, tmp_path: Path
                   ) -> Iterator[dict[str, str]]:
    """A fresh migrated database for each face, so each tells the same story from scratch."""
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        urls = {}
        for face in FACES:
            path = tmp_path / f"{face}.db"
            shutil.copy(template, path)
            urls[face] = f"sqlite:///{path}"
        yield urls
        return
    template = request.getfixturevalue("pg_template")
    with contextlib.ExitStack() as stack:
        yield {face: stack.enter_context(contextlib.contextmanager(_pg_clone)(template))
               for face in FACES}


class Story:
    """The same co-ordinator's day through one face: people added, changed, unsubscribed,
    exported, imported and erased; an edition saved, scheduled, sent, paused, resumed and
    cancelled; a bounce alert dismissed."""

    def __init__(self, face: str, settings: Settings, tmp_path: Path) -> None:
        self.face, self.settings, self.tmp_path = face, settings, tmp_path
        self.client: TestClient | None = None
        self.headers: dict[str, str] = {}
        self.csrf = ""

    def __enter__(self) -> Story:
        engine = make_engine(self.settings.database)
        make_user(engine, "root", role="admin", regions=())
        engine.dispose()
        if self.face != "cli":
            self.client = TestClient(create_app(self.settings), base_url=BASE)
            self.client.__enter__()
        if self.face == "console":
            assert login(self.client, "root").status_code == 303
            self.csrf = csrf_of(self.client.get("/admin").text)
        if self.face == "api":
            from mailer import accounts

            with session_factory(make_engine(self.settings.database))() as s:
                _row, token = accounts.create_token(s, accounts.get_user(s, "root"),
                                                    name="story", role="admin")
                s.commit()
            self.headers = {"Authorization": f"Bearer {token}"}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.__exit__(None, None, None)

    # -- each step through this face; each must succeed
    def cli(self, *args: str) -> None:
        assert run(list(args)) == 0, args

    def post(self, path: str, **data: Any) -> None:
        assert self.client is not None
        answer = self.client.post(path, data={"csrf_token": self.csrf, **data},
                                  follow_redirects=False)
        assert answer.status_code in (200, 303), (path, answer.status_code, answer.text[-600:])

    def api(self, method: str, path: str, **kw: Any) -> Any:
        assert self.client is not None
        answer = self.client.request(method, f"/api/v1{path}", headers=self.headers, **kw)
        assert answer.status_code < 300, (path, answer.status_code, answer.text)
        return answer

    def add(self, email: str, region: str) -> None:
        if self.face == "cli":
            self.cli("subscribers", "add", email, "--lawful-basis", "public_task", "--region",
                     region)
        elif self.face == "console":
            self.post("/admin/subscribers/new", email=email, region=region,
                      topics=["newsletter"], lawful_basis="public_task")
        else:
            self.api("POST", "/subscribers", json={"email": email, "region": region,
                                                   "lawful_basis": "public_task"})

    def edit(self, sid: int, name: str) -> None:
        if self.face == "cli":
            self.cli("subscribers", "edit", str(sid), "--name", name)
        elif self.face == "console":
            self.post(f"/admin/subscribers/{sid}/edit", name=name, region="kent")
        else:
            self.api("PATCH", f"/subscribers/{sid}", json={"name": name})

    def subscriber_step(self, sid: int, step: str) -> None:
        if self.face == "cli":
            self.cli("subscribers", step, str(sid), *(["--yes"] if step == "erase" else []))
        elif self.face == "console":
            self.post(f"/admin/subscribers/{sid}/{step}", confirm="erase")
        elif step == "erase":
            self.api("DELETE", f"/subscribers/{sid}")
        else:
            self.api("POST", f"/subscribers/{sid}/{step}")

    def export(self) -> None:
        if self.face == "cli":
            self.cli("subscribers", "export", "--region", "kent", "-o",
                     str(self.tmp_path / "out.csv"))
        elif self.face == "console":
            assert self.client is not None
            assert self.client.get("/admin/subscribers/export.csv?region=kent").status_code \
                == 200
        else:
            self.api("GET", "/subscribers/export", params={"region": "kent"})

    def import_(self) -> None:
        path = self.tmp_path / "list.csv"
        path.write_bytes(CSV)
        if self.face == "cli":
            self.cli("subscribers", "import", str(path), "--lawful-basis", "public_task",
                     "--apply")
        elif self.face == "console":
            assert self.client is not None
            checked = self.client.post("/admin/import", data={
                "csrf_token": self.csrf, "lawful_basis": "public_task"},
                files={"file": ("list.csv", CSV, "text/csv")})
            assert checked.status_code == 200, checked.text
            sha = __import__("hashlib").sha256(CSV).hexdigest()
            self.post("/admin/import", lawful_basis="public_task", sha=sha, name="list.csv")
        else:
            self.api("POST", "/subscribers/import", content=CSV, params={
                "lawful_basis": "public_task", "apply": "true", "filename": "list.csv"})

    def save_and_schedule(self) -> None:
        source = SAMPLE.read_text(encoding="utf-8")
        if self.face == "cli":  # the command line stores an edition file when it acts on it
            self.cli("edition", "schedule", str(SAMPLE), "--at", "2099-01-05 09:00")
        elif self.face == "console":
            self.post("/admin/editions/new", slug=SAMPLE.stem, source=source)
            self.post("/admin/editions/1/schedule", date="2099-01-05", time="09:00")
        else:
            self.api("POST", "/editions", json={"slug": SAMPLE.stem, "source": source})
            self.api("POST", "/editions/1/schedule", json={"at": "2099-01-05T09:00:00+00:00"})

    def edition_step(self, step: str) -> None:
        if self.face == "cli":
            self.cli("edition", step, "1", *(["--confirm"] if step == "send" else []),
                     *(["--yes"] if step == "cancel" else []))
        elif self.face == "console":
            self.post(f"/admin/editions/1/{step}", confirm="yes")
        else:
            self.api("POST", f"/editions/1/{step}")

    def dismiss(self, aid: int) -> None:
        if self.face == "cli":
            self.cli("bounces", "resolve", str(aid), "--dismiss")
        elif self.face == "console":
            self.post(f"/admin/bounces/alerts/{aid}/resolve", resolution="dismiss")
        else:
            self.api("POST", f"/bounce-alerts/{aid}/resolve", json={"apply": False})


def _entries(url: str) -> list[AuditEntry]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(AuditEntry).where(
                ~AuditEntry.action.startswith("login.")).order_by(AuditEntry.id)))
    finally:
        engine.dispose()


def test_every_audited_operation_leaves_the_same_entry_from_the_cli_the_console_and_the_api(
        face_databases: dict[str, str], sink: FaultServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trails = {}
    for face in FACES:
        url = face_databases[face]
        monkeypatch.setenv("MAILER_DATABASE_URL", url)
        monkeypatch.setenv("MAILER_REQUIRE_APPROVAL", "false")  # one person runs it here
        monkeypatch.setenv("MAILER_BASE_URL", BASE)
        monkeypatch.setenv("MAILER_SMTP_URL", sink.url())
        folder = tmp_path / face
        folder.mkdir()
        settings = make_settings(sink, folder, require_approval=False)
        with Story(face, settings, folder) as story:
            story.add("jo@kent.police.uk", "kent")  # subscriber 1
            story.add("sam@essex.police.uk", "essex")  # subscriber 2
            story.edit(1, "Jo Bloggs")
            story.subscriber_step(2, "unsubscribe")
            story.export()
            story.import_()
            story.subscriber_step(2, "erase")
            story.save_and_schedule()
            story.edition_step("send")
            story.edition_step("pause")
            story.edition_step("resume")
            story.edition_step("cancel")
            engine = make_engine(url)
            aid, _eid, _ids = domain_alert(engine, settings, region="kent", bounced=5)
            engine.dispose()
            story.dismiss(aid)
        entries = _entries(url)
        assert {e.via for e in entries} == {face}
        assert {e.ip for e in entries} == ({None} if face == "cli" else {"testclient"})
        trails[face] = [(e.action, e.target, e.detail) for e in entries]
    assert [a for a, _, _ in trails["cli"]] == [
        "subscriber.add", "subscriber.add", "subscriber.edit", "subscriber.unsubscribe",
        "subscribers.export", "subscribers.import", "subscriber.erase", "edition.save",
        "edition.schedule", "edition.send", "edition.pause", "edition.resume",
        "edition.cancel", "bounce_alert.dismiss"]
    assert trails["console"] == trails["cli"]
    assert trails["api"] == trails["cli"]


# ---- the region scope, in SQL ----

def test_a_small_regions_records_are_listed_among_many_newer_ones_of_another_region(
        engine: Any, settings: Settings, sink: FaultServer, tmp_path: Path) -> None:
    """600 Essex records newer than a Kent co-ordinator's 3: every scoped list still shows the
    3, because the scope is applied by the query, not to the newest rows after reading them."""
    from mailer.accounts import Actor, Role
    from mailer.operations import Caller
    from mailer.operations import alerts as alert_ops
    from mailer.operations import subscribers as subscriber_ops

    web = make_settings(sink, tmp_path)
    kent_ids = people(engine, web, [(f"k{i}@kent.police.uk", "kent") for i in range(3)])
    kent = sent_edition(engine, web, "[kent]", "2020-q3-kent")
    bounce(engine, web, kent, [(sid, f"k{i}@kent.police.uk") for i, sid in enumerate(kent_ids)])
    essex_ids = people(engine, web, [(f"e{i}@essex.police.uk", "essex") for i in range(600)])
    essex = sent_edition(engine, web, "[essex]", "2020-q3-essex")
    now = utcnow()
    with session_factory(engine)() as session:
        # 600 newer Essex bounces, recorded as the policy records them (the Kent ones above
        # went through it whole; 600 more would only make the test slow).
        session.add_all([bounce_policy.InboundRecord(
            received_at=now, origin="lmtp", rcpt_tos=[], size=1, sha256=f"{i:064d}",
            kind="hard", reason="550 5.1.1", detector="test", status="5.1.1",
            edition_id=essex, subscriber_id=sid, decision="suppressed")
            for i, sid in enumerate(essex_ids)])
        # Bounce alerts as the policy leaves them, one per send and domain.
        session.add_all([bounce_policy.BounceAlert(
            kind="domain", edition_id=kent, domain=f"k{i}.kent.police.uk", recipients=6,
            bounced=4, share=0.67, detail="...", created_at=now - timedelta(days=1))
            for i in range(3)])
        session.add_all([bounce_policy.BounceAlert(
            kind="domain", edition_id=essex, domain=f"e{i}.essex.police.uk", recipients=6,
            bounced=4, share=0.67, detail="...", created_at=now) for i in range(600)])
        for i in range(3):
            alerts.raise_alert(session, f"kent-{i}", "halt", f"Kent {i}", "About Kent.",
                               ["kent"], now=now - timedelta(days=1))
        for i in range(600):
            alerts.raise_alert(session, f"essex-{i}", "halt", f"Essex {i}", "About Essex.",
                               ["essex"], now=now)
        session.commit()
    caller = Caller(Actor(9, "ken", "Ken", Role.COORDINATOR, ("kent",)), via="console")
    with session_factory(engine)() as session:
        total, rows = subscriber_ops.page(session, caller,
                                          subscriber_ops.filter_for(caller), limit=50)
        assert total == 3 and sorted(r.id for r in rows) == sorted(kent_ids)
        shown, hidden = alert_ops.recent_bounces(session, caller, ("kent", "essex"))
        assert sorted(b.row.subscriber_id for b in shown) == sorted(kent_ids)
        assert hidden == 600
        told = alert_ops.coordinator_alerts(session, caller, now, limit=10)
        assert sorted(t.subject for t in told) == ["Kent 0", "Kent 1", "Kent 2"]
        # The open bounce alerts are everyone's to see (a domain and counts): Kent's are there
        # among Essex's, and only they may be closed by a Kent co-ordinator.
        views = alert_ops.open_bounce_alerts(session, caller, ("kent", "essex"))
        assert len(views) == 603
        assert sorted(v.domain for v in views if v.can_resolve) == [
            "k0.kent.police.uk", "k1.kent.police.uk", "k2.kent.police.uk"]
