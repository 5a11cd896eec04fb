"""Saved segments and audiences for editions and events: the count shown when choosing and
approving is the number of rows a send enqueues; a Kent-scoped reminder reaches no Essex
reader; a co-ordinator cannot make or use a segment beyond their regions."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mailer import events, schedule
from mailer.accounts import Actor, Role
from mailer.cli import run
from mailer.config import Settings
from mailer.devsink import DevSink
from mailer.errors import EditionError, NotFound, OutOfScope
from mailer.events import Event, EventError, EventSpec
from mailer.models import Delivery, Edition
from mailer.operations import Caller, command_line_caller
from mailer.operations import editions as edition_ops
from mailer.operations import events as event_ops
from mailer.operations import segments as segment_ops
from mailer.segments import AudienceFields
from mailer.worker import Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel
from subscribers.rules import Rules
from tests.test_admin_routes import app_client, login, make_user  # noqa: F401
from tests.test_schedule import sessions  # noqa: F401  (no default dates due)
from tests.web_fixtures import (  # noqa: F401
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

KENT = Caller(Actor(9, "ken", "Ken", Role.COORDINATOR, ("kent",)), via="console")
ADMIN = command_line_caller()

# (email, region, role, organisation type, topics)
READERS = [
    ("a@kent.police.uk", "kent", "investigator", "police", ["newsletter", "reminders"]),
    ("b@kent.police.uk", "kent", "analyst", "police", ["newsletter"]),
    ("c@kent.gov.uk", "kent", "safeguarding", "local_authority", ["newsletter", "reminders"]),
    ("d@essex.police.uk", "essex", "analyst", "police", ["newsletter", "reminders"]),
    ("e@essex.police.uk", "essex", "investigator", "police", ["reminders"]),
    ("f@essex.gov.uk", "essex", "analyst", "local_authority", ["newsletter"]),
    ("g@nhs.net", "medway", "first_responder", "health", ["newsletter", "reminders"]),
]

# slug -> fields; each a different shape: region and organisation type, region and role,
# topic only, everyone.
SEGMENTS = {
    "kent-police": AudienceFields(regions=["kent"], organisation_types=["police"]),
    "essex-analysts": AudienceFields(regions=["essex"], roles=["analyst"]),
    "reminder-readers": AudienceFields(topics=["reminders"]),
    "everyone": AudienceFields(),
}
# On the newsletter topic, who each reaches.
EXPECTED = {
    "kent-police": {"a@kent.police.uk", "b@kent.police.uk"},
    "essex-analysts": {"d@essex.police.uk", "f@essex.gov.uk"},
    "reminder-readers": {"a@kent.police.uk", "c@kent.gov.uk", "d@essex.police.uk", "g@nhs.net"},
    "everyone": {r[0] for r in READERS if "newsletter" in r[4]},
}


def _readers(sessions: sessionmaker[Session], rules: Rules) -> None:
    with sessions() as s:
        for email, region, role, org, topics in READERS:
            store.bulk_add_active(s, rules, [(store.profile_from(
                rules, email=email, name=email.split("@")[0], region=region, role=role,
                organisation_type=org), store.topics_by_slug(s, topics))],
                store.Context(channel=Channel.IMPORT))
        s.commit()


def _segments(sessions: sessionmaker[Session], settings: Settings) -> None:
    with sessions() as s:
        for slug, fields in SEGMENTS.items():
            segment_ops.add(s, ADMIN, settings, slug=slug, name=slug.replace("-", " "),
                            description="", fields=fields)
        s.commit()


def _edition(tmp_path: Path, slug: str, audience: str) -> Path:
    path = tmp_path / f"{slug}.md"
    path.write_text(f"""---
title: Test
issue: 1
date: 2027-01-01
subject: Test {slug}
topic: newsletter
{audience}
---

Hello.
""", encoding="utf-8")
    return path


def _mailer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _emails_queued(sessions: sessionmaker[Session], edition_id: int) -> set[str]:
    from subscribers.models import Subscriber
    with sessions() as s:
        return set(s.scalars(select(Subscriber.email).join(
            Delivery, Delivery.subscriber_id == Subscriber.id)
            .where(Delivery.edition_id == edition_id)))


# ---------------------------------------------------------------- counts shown = rows queued

def test_for_every_saved_segment_the_count_shown_is_the_number_enqueued(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _readers(sessions, rules)
    _segments(sessions, settings)
    monkeypatch.setenv("MAILER_REQUIRE_APPROVAL", "false")
    for slug, expected in EXPECTED.items():
        path = _edition(tmp_path, f"ed-{slug}", f"segment: {slug}")
        # choosing: the segment's own count (any topic)
        with sessions() as s:
            chosen = segment_ops.counted(s, ADMIN, slug)
        code, out, _ = _mailer(capsys, "segments", "list")
        assert code == 0 and re.search(rf"{slug}\b.*\b{chosen.count}\s", out), out
        # the dry run: the edition's count on its topic, with the segment in words
        code, out, _ = _mailer(capsys, "edition", "send", str(path))
        shown = int(re.search(r"(\d+) reader\(s\) now", out).group(1))  # type: ignore[union-attr]
        assert code == 0 and f"segment '{slug}'" in out
        code, out, _ = _mailer(capsys, "edition", "send", str(path), "--confirm")
        assert code == 0, out
        with sessions() as s:
            edition = s.scalar(select(Edition).where(Edition.slug == f"ed-{slug}"))
            assert edition is not None and edition.segment == slug
            queued = s.scalar(select(func.count()).select_from(Delivery)
                              .where(Delivery.edition_id == edition.id))
        assert shown == queued == len(expected), (slug, shown, queued)
        assert _emails_queued(sessions, edition.id) == expected


def test_inline_fields_target_by_organisation_type_and_topic(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        tmp_path: Path) -> None:
    _readers(sessions, rules)
    path = _edition(tmp_path, "inline", "audience:\n  organisation_types: [police]\n"
                                        "  topics: [reminders]")
    with sessions() as s:
        edition, _ = edition_ops.save_file(s, ADMIN, settings, path)
        s.commit()
        queued = edition_ops.send(s, ADMIN, settings.model_copy(
            update={"require_approval": False}), edition.id)
        s.commit()
        assert queued == 2
    assert _emails_queued(sessions, edition.id) == {"a@kent.police.uk", "d@essex.police.uk"}


# ---------------------------------------------------------------- errors and scope

def test_an_unknown_segment_is_an_error_with_its_line_and_the_known_slugs(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        tmp_path: Path) -> None:
    _segments(sessions, settings)
    path = _edition(tmp_path, "typo", "segment: kent-polise")
    with sessions() as s, pytest.raises(EditionError) as caught:
        edition_ops.save_file(s, ADMIN, settings, path)
    message = str(caught.value)
    assert f"{path}:7" in message and "unknown segment 'kent-polise'" in message
    assert "essex-analysts, everyone, kent-police, reminder-readers" in message


def test_an_unknown_value_in_a_segment_is_refused_with_the_known_ones(
        sessions: sessionmaker[Session], settings: Settings) -> None:
    with sessions() as s, pytest.raises(EditionError) as caught:
        segment_ops.add(s, ADMIN, settings, slug="x", name="x", description="",
                        fields=AudienceFields(regions=["kentt"], organisation_types=["polic"]))
    message = str(caught.value)
    assert "unknown region 'kentt'; known: kent, essex" in message
    assert "unknown organisation type 'polic'" in message


def test_a_kent_coordinator_cannot_make_or_use_a_segment_reaching_essex(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        tmp_path: Path) -> None:
    _segments(sessions, settings)
    with sessions() as s:
        for fields in (AudienceFields(regions=["kent", "essex"]), AudienceFields()):
            with pytest.raises(OutOfScope):
                segment_ops.add(s, KENT, settings, slug="wide", name="Wide", description="",
                                fields=fields)
        # the Kent one is theirs to make and to use
        segment_ops.add(s, KENT, settings, slug="kent-all", name="Kent", description="",
                        fields=AudienceFields(regions=["kent"]))
        edition, _ = edition_ops.save_file(s, KENT, settings,
                                           _edition(tmp_path, "k", "segment: kent-all"))
        assert edition.regions == ["kent"]
        # an Essex segment is not theirs to see, edit or use
        assert "essex-analysts" not in [x.slug for x in segment_ops.listing(s, KENT)]
        with pytest.raises(NotFound):
            segment_ops.get(s, KENT, "essex-analysts")
        with pytest.raises(OutOfScope):  # 'everyone' is listed to them, but reaches Essex
            segment_ops.edit(s, KENT, settings, "everyone", name="x", description="",
                             fields=AudienceFields(regions=["kent"]))
        with pytest.raises(OutOfScope):
            edition_ops.save_file(s, KENT, settings,
                                  _edition(tmp_path, "e", "segment: essex-analysts"))
        with pytest.raises(OutOfScope):
            event_ops.add(s, KENT, EventSpec(name="Essex day", starts_on=date(2027, 6, 1),
                                             segment="essex-analysts"), settings)
        s.commit()
    with sessions() as s:
        actions = [a for (a,) in s.execute(select(_audit_action()).order_by(_audit_id()))]
    assert actions.count("segment.add") == len(SEGMENTS) + 1


def _audit_action():  # type: ignore[no-untyped-def]
    from mailer.audit import AuditEntry
    return AuditEntry.action


def _audit_id():  # type: ignore[no-untyped-def]
    from mailer.audit import AuditEntry
    return AuditEntry.id


def test_an_event_naming_an_unknown_segment_is_refused_with_the_known_slugs(
        sessions: sessionmaker[Session], settings: Settings, tmp_path: Path) -> None:
    _segments(sessions, settings)
    path = tmp_path / "events.yaml"
    path.write_text("- name: Aidant\n  date: 2027-06-01\n  segment: kent-polise\n")
    specs = events.load_file(path)
    with sessions() as s, pytest.raises(EventError) as caught:
        event_ops.import_file(s, ADMIN, path, specs, replace=False, settings=settings)
    assert "unknown segment 'kent-polise'" in str(caught.value)
    assert "kent-police" in str(caught.value)


# ---------------------------------------------------------------- reminders with an audience

def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("audience", ["segment: kent-police",
                                      "audience: {regions: [kent]}"])
def test_a_kent_scoped_reminder_reaches_no_essex_reader(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, tmp_path: Path,
        audience: str) -> None:
    _readers(sessions, rules)
    _segments(sessions, settings)
    path = tmp_path / "events.yaml"
    path.write_text("- name: Operation Aidant (Kent)\n  date: 2027-05-14\n  offsets: [1]\n"
                    "  weekend: as_scheduled\n  " + audience + "\n"
                    "- name: Anti-Slavery Day\n  date: 2027-05-14\n  offsets: [1]\n"
                    "  weekend: as_scheduled\n")
    due = _utc(2027, 5, 13, 8, 0)  # Thursday 09:00 BST, for Friday 14 May
    with time_machine.travel(due - timedelta(days=2), tick=False), sessions() as s:
        event_ops.import_file(s, ADMIN, path, events.load_file(path), replace=False,
                              settings=settings)
        s.commit()
    with time_machine.travel(due, tick=False), sessions() as s:
        report = schedule.catch_up(s, settings, due)
        s.commit()
    assert len(report.reminders) == 2
    with DevSink(tmp_path / "sink", port=0) as sink:
        sending = settings.model_copy(update={"smtp_url": type(settings.smtp_url)(sink.url),
                                              "rate_per_minute": 0, "rate_per_day": 0})
        asyncio.run(Worker(sending, sessions, poll=0.05,
                           clock=lambda: due + timedelta(minutes=1)).run(drain=True))
        got: dict[str, set[str]] = {}
        for m in sink.messages():
            for to in m.rcpt_to:
                got.setdefault(m.subject, set()).add(to)
    kent_subject = next(k for k in got if "Operation Aidant" in k)
    other_subject = next(k for k in got if "Anti-Slavery Day" in k)
    on_reminders = {r[0] for r in READERS if "reminders" in r[4]}
    kent = {r[0] for r in READERS if r[1] == "kent" and "reminders" in r[4]}
    if audience.startswith("segment"):  # kent-police: Kent and police
        kent = {e for e in kent if e.endswith("police.uk")}
    assert got[kent_subject] == kent and kent
    assert not any("essex" in to for to in got[kent_subject])
    # an event without an audience keeps today's behaviour: everyone on reminders
    assert got[other_subject] == on_reminders


# ---------------------------------------------------------------- the console and the API



def _shown(html: str, attribute: str, key: str = "") -> int:
    found = re.search(rf'{attribute}(?:="{re.escape(key)}")?>(\d+)<', html)
    assert found, (attribute, key)
    return int(found.group(1))


def test_the_console_and_the_api_show_the_count_that_a_send_enqueues(
        app_client: TestClient, engine, web_settings: Settings) -> None:
    sessions = session_factory(engine)
    _readers(sessions, web_settings.rules())
    _segments(sessions, web_settings)
    make_user(engine, "root", role="admin", regions=())
    from mailer import accounts
    with sessions() as s:
        _row, token = accounts.create_token(s, accounts.get_user(s, "root"), name="t",
                                            role="admin")
        s.commit()
    api = {"Authorization": f"Bearer {token}"}
    assert login(app_client, "root").status_code == 303
    listing = app_client.get("/admin/segments").text
    by_api = {g["slug"]: g for g in app_client.get("/api/v1/segments", headers=api).json()}
    for slug, expected in EXPECTED.items():
        with sessions() as s:
            chosen = segment_ops.counted(s, ADMIN, slug).count
        assert _shown(listing, "data-segment-count", slug) == chosen == by_api[slug]["count"]
        page = app_client.get(f"/admin/segments/{slug}").text  # editing: its live count
        assert _shown(page, "data-live-count") == chosen
        source = (
            f"---\ntitle: T\nissue: 1\ndate: 2027-01-01\nsubject: S {slug}\ntopic: newsletter\n"
            f"segment: {slug}\n---\n\nHello.\n")
        made = app_client.post("/api/v1/editions", headers=api,
                               json={"slug": f"api-{slug}", "source": source})
        assert made.status_code in (200, 201), made.text
        eid = made.json()["id"]
        reach = app_client.get(f"/api/v1/editions/{eid}/audience", headers=api).json()
        approval = app_client.get(f"/admin/editions/{eid}").text  # the approval screen
        assert f"segment {slug}" in approval
        with sessions() as s:
            queued = edition_ops.send(s, ADMIN, web_settings.model_copy(
                update={"require_approval": False}), eid)
            s.commit()
        assert reach["segment"] == slug
        assert _shown(approval, "data-audience-count") == reach["count"] == queued \
            == len(expected), slug
        assert _emails_queued(sessions, eid) == expected


def test_the_console_counts_before_saving_and_refuses_a_segment_beyond_ones_regions(
        app_client: TestClient, engine, web_settings: Settings) -> None:
    sessions = session_factory(engine)
    _readers(sessions, web_settings.rules())
    make_user(engine, "ken", regions=("kent",))
    assert login(app_client, "ken").status_code == 303
    token = csrf_of(app_client.get("/admin/segments").text)
    form = {"csrf_token": token, "slug": "kent-police", "name": "Kent police",
            "regions": ["kent"], "organisation_types": ["police"]}
    counted = app_client.post("/admin/segments/new", data={**form, "action": "count"})
    assert counted.status_code == 200 and _shown(counted.text, "data-live-count") == 2
    with sessions() as s:
        assert segment_ops.listing(s, ADMIN) == []  # counting stores nothing
    wide = app_client.post("/admin/segments/new", data={**form, "regions": ["kent", "essex"],
                                                        "action": "save"})
    assert wide.status_code == 400 and "outside your regions" in wide.text
    saved = app_client.post("/admin/segments/new", data={**form, "action": "save"},
                            follow_redirects=False)
    assert saved.status_code == 303
    with sessions() as s:
        assert [g.slug for g in segment_ops.listing(s, ADMIN)] == ["kent-police"]


def test_an_event_added_in_the_console_takes_a_segment_and_refuses_an_unknown_one(
        app_client: TestClient, engine, web_settings: Settings) -> None:
    sessions = session_factory(engine)
    _segments(sessions, web_settings)
    make_user(engine, "ken", regions=("kent",))
    assert login(app_client, "ken").status_code == 303
    token = csrf_of(app_client.get("/admin/events").text)
    form = {"csrf_token": token, "name": "Operation Aidant (Kent)", "date": "2027-06-01",
            "offsets": "1", "at": "09:00", "topic": "reminders", "weekend": "friday"}
    typo = app_client.post("/admin/events/new", data={**form, "segment": "kent-polise"})
    assert typo.status_code == 400 and "unknown segment" in typo.text
    assert "kent-police" in typo.text
    essex = app_client.post("/admin/events/new", data={**form, "segment": "essex-analysts"})
    assert essex.status_code == 400 and "outside your regions" in essex.text
    added = app_client.post("/admin/events/new", data={**form, "segment": "kent-police"},
                            follow_redirects=False)
    assert added.status_code == 303
    with sessions() as s:
        # the migration's own dates of interest are there too
        (event,) = s.scalars(select(Event).where(Event.segment.is_not(None))).all()
        assert event.name == "Operation Aidant (Kent)"
        assert (event.segment, event.regions, event.organisation_types) == (
            "kent-police", ["kent"], ["police"])


def test_segments_over_the_api_with_scope_audit_and_an_event_audience(
        app_client: TestClient, engine, web_settings: Settings) -> None:
    from mailer import accounts, audit
    sessions = session_factory(engine)
    _readers(sessions, web_settings.rules())
    make_user(engine, "ken", regions=("kent",))
    with sessions() as s:
        _row, token = accounts.create_token(s, accounts.get_user(s, "ken"), name="t")
        s.commit()
    api = {"Authorization": f"Bearer {token}"}
    body = {"slug": "kent-police", "name": "Kent police", "regions": ["kent"],
            "organisation_types": ["police"]}
    made = app_client.post("/api/v1/segments", headers=api, json=body)
    assert made.status_code == 201 and made.json()["count"] == 2, made.text
    wide = app_client.post("/api/v1/segments", headers=api,
                           json={**body, "slug": "wide", "regions": []})
    assert wide.status_code == 403
    typo = app_client.post("/api/v1/segments", headers=api,
                           json={**body, "slug": "typo", "roles": ["analyts"]})
    assert typo.status_code == 422 and "unknown role 'analyts'" in typo.text
    changed = app_client.put("/api/v1/segments/kent-police", headers=api,
                             json={**body, "roles": ["analyst"]})
    assert changed.status_code == 200 and changed.json()["count"] == 1
    event = app_client.post("/api/v1/events", headers=api, json={
        "name": "Operation Aidant (Kent)", "starts_on": "2027-06-01", "segment": "kent-police"})
    assert event.status_code == 201 and event.json()["regions"] == ["kent"], event.text
    essex = app_client.post("/api/v1/events", headers=api, json={
        "name": "Essex day", "starts_on": "2027-06-01", "audience": {"regions": ["essex"]}})
    assert essex.status_code == 403
    assert app_client.delete("/api/v1/segments/kent-police", headers=api).status_code == 200
    assert app_client.get("/api/v1/segments", headers=api).json() == []
    with sessions() as s:
        actions = [e.action for e in s.scalars(select(audit.AuditEntry)
                                               .order_by(audit.AuditEntry.id))]
    assert [a for a in actions if a.startswith("segment.")] == [
        "segment.add", "segment.edit", "segment.remove"]


@pytest.mark.parametrize("audience", ["segment: kent-police",
                                      "audience:\n  regions: [kent]\n  topics: [reminders]"])
def test_the_structured_editor_keeps_a_segment_or_audience_topics(audience: str) -> None:
    from mailer.edition import parse_edition
    from mailer.edition_form import from_source, to_source
    source = (f"---\ntitle: T\nissue: 1\ndate: 2027-01-01\nsubject: S\ntopic: newsletter\n"
              f"{audience}\n---\n\nHello.\n")
    again = parse_edition(to_source(from_source(source)), "x.md").meta
    before = parse_edition(source, "x.md").meta
    assert (again.segment, again.audience) == (before.segment, before.audience)


def test_events_add_on_the_command_line_takes_a_segment(
        sessions: sessionmaker[Session], settings: Settings,
        capsys: pytest.CaptureFixture[str]) -> None:
    _segments(sessions, settings)
    code, _, err = _mailer(capsys, "events", "add", "Aidant", "--date", "2027-06-01",
                           "--segment", "nope")
    assert code == 1 and "unknown segment 'nope'" in err and "kent-police" in err
    code, _, _ = _mailer(capsys, "events", "add", "Aidant", "--date", "2027-06-01",
                         "--segment", "kent-police")
    assert code == 0
    with sessions() as s:
        event = s.scalar(select(Event).where(Event.slug == "aidant"))
        assert event is not None and (event.segment, event.regions) == ("kent-police", ["kent"])


def test_segments_from_the_command_line(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _readers(sessions, rules)
    code, out, _ = _mailer(capsys, "segments", "add", "kent-police", "Kent police",
                           "--regions", "kent", "--organisation-types", "police")
    assert code == 0 and "2 reader(s) now" in out
    code, _, err = _mailer(capsys, "segments", "add", "bad", "Bad", "--regions", "kentt")
    assert code == 1 and "unknown region 'kentt'" in err
    code, out, _ = _mailer(capsys, "segments", "edit", "kent-police", "--roles", "analyst")
    assert code == 0 and "1 reader(s) now" in out and "roles: analyst" in out
    code, out, err = _mailer(capsys, "edition", "validate",
                             str(_edition(tmp_path, "v", "segment: kent-polise")))
    assert code != 0 and "unknown segment 'kent-polise'; known: kent-police" in out + err
    code, out, _ = _mailer(capsys, "segments", "remove", "kent-police")
    assert code == 0
    code, out, _ = _mailer(capsys, "segments", "list")
    assert code == 0 and "kent-police" not in out
    with sessions() as s:
        actions = [a for (a,) in s.execute(select(_audit_action()).order_by(_audit_id()))]
    assert [a for a in actions if a.startswith("segment.")] == [
        "segment.add", "segment.edit", "segment.remove"]
