"""A reader's own data from their preferences link: a copy of it (UK GDPR Art. 15 and 20) and
erasure (Art. 17), over HTTP on SQLite and PostgreSQL, with mail to a real SMTP sink."""

from __future__ import annotations

import datetime as dt
from typing import Any

import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from mailer import audit, migrations, outbox
from mailer.models import Delivery, DeliveryStatus
from subscribers import store
from subscribers.db import session_factory, session_scope
from subscribers.models import Channel, ConsentEvent, SubscriberStatus
from subscribers.store import Context
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    BASE,
    client,
    csrf_of,
    fault_server,
    links_in,
    mails_to,
    make_fault_server,
    sink,
    snapshot,
    subscribe,
    subscriber_by_email,
    web_settings,
)

READER = "Rowan.Reader@kent.police.uk"
OTHER = "other.person@essex.police.uk"
SENT_AT = dt.datetime(2026, 9, 30, 8, 15, tzinfo=dt.UTC)


def _engine(client: TestClient) -> Engine:
    return client.app.state.web.sessions.kw["bind"]  # type: ignore[attr-defined,no-any-return]


def _world(client: TestClient, sink: FaultServer) -> tuple[int, int]:
    """The reader, signed up and confirmed on the pages; someone else added by a co-ordinator;
    an edition sent to both, and one sent to the other alone."""
    subscribe(client, READER, name="Rowan Reader", organisation="Kent Police",
              role="spoc", topics=["newsletter", "reminders"])
    (mail,) = mails_to(sink, READER)
    link = next(u for u in links_in(mail) if "/confirm/" in u)
    assert client.post(link, data={"csrf_token": csrf_of(client.get(link).text)}
                       ).status_code == 200
    rules = client.app.state.web.rules  # type: ignore[attr-defined]
    engine = _engine(client)
    with session_scope(session_factory(engine)) as session:
        other = store.add_active(session, rules, store.profile_from(
            rules, email=OTHER, name="Olive Other", organisation="Essex Police",
            region="essex"), store.topics_by_slug(session, ["newsletter"]),
            Context(channel=Channel.ADMIN, actor="coord.essex", ip="192.0.2.77",
                    user_agent="Console browser/1.0", lawful_basis="public_task"))
        for slug, title, regions in (("2026-q3-bulletin", "Autumn 2026 bulletin", []),
                                     ("essex-only-notice", "Essex only", ["essex"])):
            edition, _ = outbox.store_edition(
                session, slug=slug, title=title, subject=f"{title}: the subject",
                topic="newsletter", regions=regions, roles=[], source=slug, compiled={},
                actor="tester")
            outbox.enqueue(session, edition)
        session.execute(update(Delivery).values(status=DeliveryStatus.SENT, sent_at=SENT_AT,
                                                last_code=250, last_reply="250 2.0.0 queued"))
        other_id = other.id
    reader = subscriber_by_email(engine, READER)
    assert reader is not None and reader.status == SubscriberStatus.ACTIVE
    with session_scope(session_factory(engine)) as session:
        # A relay's reply can quote the address: erasure has to reach the outbox too.
        session.execute(update(Delivery).where(Delivery.subscriber_id == reader.id).values(
            last_reply=f"250 2.0.0 <{READER}> queued as 4F2"))
    return reader.id, other_id


def _preferences(client: TestClient, subscriber_id: int) -> str:
    tokens = client.app.state.web.tokens  # type: ignore[attr-defined]
    return f"{BASE}/preferences/{tokens.manage(subscriber_id)}"


def _nobody_page(client: TestClient, reader: int, other: int) -> Any:
    return client.get(_preferences(client, reader + other + 1000))


def test_a_reader_downloads_everything_held_on_them_and_nothing_of_anyone_else(
        client: TestClient, sink: FaultServer) -> None:
    reader, other = _world(client, sink)
    url = _preferences(client, reader)
    page = client.get(url)
    assert page.status_code == 200 and "Download my data" in page.text
    assert f'action="{url}/download"' in page.text
    before = snapshot(_engine(client))

    response = client.post(f"{url}/download", data={"csrf_token": csrf_of(page.text)})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"] == (
        'attachment; filename="msht-bulletin-my-data.json"')
    assert response.headers["cache-control"] == "no-store"
    data = response.json()
    assert {k: data["profile"][k] for k in ("id", "email", "name", "organisation", "role",
                                            "region", "status")} == {
        "id": reader, "email": READER, "name": "Rowan Reader", "organisation": "Kent Police",
        "role": "spoc", "region": "kent", "status": "active"}
    assert [(s["topic"], s["status"]) for s in data["subscriptions"]] == [
        ("newsletter", "active"), ("reminders", "active")]
    with Session(_engine(client)) as session:
        history = store.consent_history(session, reader)
        held = [(e.action, e.channel) for e in history]
        held_ids = [e.id for e in history]
    assert held == [("subscribe", "web"), ("confirm", "web")]
    assert [(e["action"], e["channel"]) for e in data["consent_history"]] == held
    delivered = sorted((d["title"], d["edition"], d["status"], d["sent_at"])
                       for d in data["deliveries"])
    # The welcome their confirmation queued was sent to them too, and is theirs to see.
    assert [d[0] for d in delivered] == ["Autumn 2026 bulletin", "Welcome: you are now subscribed"]
    assert delivered[0] == ("Autumn 2026 bulletin", "2026-q3-bulletin", "sent",
                            "2026-09-30T08:15:00+00:00")
    assert delivered[1][1] == f"welcome-{reader}-{held_ids[0]}"
    exported = dt.datetime.fromisoformat(data["exported_at"])
    assert exported.utcoffset() == dt.timedelta(0)
    for theirs in (OTHER, "Olive Other", "Essex Police", "essex-only-notice", "coord.essex"):
        assert theirs.lower() not in response.text.lower()
    assert snapshot(_engine(client)) == before  # a copy changes nothing

    # The other person's own link gives them theirs, not the reader's.
    theirs = client.post(f"{_preferences(client, other)}/download",
                         data={"csrf_token": csrf_of(page.text)}).json()
    assert theirs["profile"]["email"] == OTHER
    # Added by a co-ordinator: the step is theirs to see, the co-ordinator's login, address and
    # browser are not.
    assert [(e["action"], e["by"], e["ip"], e["user_agent"]) for e in theirs["consent_history"]
            ] == [("add", "a co-ordinator", None, None)]
    assert [d["edition"] for d in theirs["deliveries"]] == ["2026-q3-bulletin",
                                                            "essex-only-notice"]


def test_the_download_is_served_only_to_a_post_with_the_pages_csrf_token(
        client: TestClient, sink: FaultServer) -> None:
    reader, _ = _world(client, sink)
    url = _preferences(client, reader)
    token = csrf_of(client.get(url).text)
    refused = [
        client.get(f"{url}/download"),  # what a link scanner does
        client.post(f"{url}/download", data={}),
        client.post(f"{url}/download", data={"csrf_token": "0" * 64}),
        client.post(f"{url}/download", data={"csrf_token": token},
                    headers={"Sec-Fetch-Site": "cross-site"}),
        client.post(f"{url}/download", data={"csrf_token": token},
                    headers={"Origin": "https://evil.example"}),
        TestClient(client.app, base_url=BASE).post(f"{url}/download",  # no cookie
                                                   data={"csrf_token": token}),
    ]
    for response in refused:
        assert response.status_code in (403, 405), response.status_code
        assert response.headers["content-type"].startswith("text/html")
        assert "content-disposition" not in response.headers
        assert "rowan" not in response.text.lower()
    assert [r.status_code for r in refused] == [405, 403, 403, 403, 403, 403]


def test_a_bad_or_expired_link_gets_the_bad_link_page_and_nothing_else(
        client: TestClient, sink: FaultServer) -> None:
    reader, _ = _world(client, sink)
    web = client.app.state.web  # type: ignore[attr-defined]
    token = csrf_of(client.get(_preferences(client, reader)).text)
    days = web.settings.manage_link_days
    with time_machine.travel(dt.datetime.now(dt.UTC) - dt.timedelta(days=days + 1)):
        expired = web.tokens.manage(reader)
    for link, first in ((web.tokens.manage(reader)[:-3], "This link is not valid"),
                        (web.tokens.unsubscribe(reader), "This link is not valid"),
                        (expired, "This link has expired")):
        for response in (client.post(f"/preferences/{link}/download", data={"csrf_token": token}),
                         client.get(f"/preferences/{link}/erase"),
                         client.post(f"/preferences/{link}/erase", data={"csrf_token": token})):
            assert response.status_code == 400
            assert "This link does not work" in response.text and first in response.text
            assert f'href="{BASE}/manage"' in response.text
            assert "rowan" not in response.text.lower()
    assert subscriber_by_email(_engine(client), READER).status == SubscriberStatus.ACTIVE


def test_a_reader_erases_themself_as_a_coordinator_would_and_can_subscribe_again(
        client: TestClient, sink: FaultServer) -> None:
    reader, other = _world(client, sink)
    engine = _engine(client)
    url = _preferences(client, reader)
    preferences = client.get(url)
    assert f'<form method="get" action="{url}/erase">' in preferences.text
    before = snapshot(engine)

    confirm = client.get(f"{url}/erase")  # only asks
    assert confirm.status_code == 200
    assert "Erase your data" in confirm.text and READER in confirm.text
    assert 'class="warning-text"' in confirm.text and "cannot be undone" in confirm.text
    assert f'<form method="post" action="{url}/erase"' in confirm.text
    assert client.post(f"{url}/erase", data={}).status_code == 403
    assert client.post(f"{url}/erase", data={"csrf_token": csrf_of(confirm.text)},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert snapshot(engine) == before

    done = client.post(f"{url}/erase", data={"csrf_token": csrf_of(confirm.text)})

    assert done.status_code == 200 and "Your data has been erased" in done.text
    assert f'href="{BASE}/subscribe"' in done.text  # no dead end
    assert READER.lower() not in done.text.lower()
    rules = client.app.state.web.rules  # type: ignore[attr-defined]
    with Session(engine) as session:
        for name, table in migrations.metadata().tables.items():
            rows = repr(session.execute(select(table)).all()).lower()
            assert "rowan" not in rows and "testclient" not in rows, name
        assert store.is_suppressed(session, rules, READER.lower())
        total, entries = audit.entries(session, audit.AuditFilter(action="subscriber.erase"))
        assert total == 1
        assert [(e.actor, e.via, e.target, e.ip) for e in entries] == [
            (f"subscriber:{reader}", "web", f"subscriber:{reader}", None)]
        last = session.scalars(select(ConsentEvent).where(ConsentEvent.subscriber_id == reader)
                               .order_by(ConsentEvent.id.desc())).first()
        assert (last.action, last.channel, last.actor) == ("erase", "web", None)
        kept = store.get(session, other)
        assert (kept.email, kept.status) == (OTHER, SubscriberStatus.ACTIVE)
        assert len(outbox.deliveries_for(session, other)) == 2

    # Pressed again (a double click, the back button): as a link for nobody, and no second entry.
    nobody = _nobody_page(client, reader, other)
    assert "This link does not work" in nobody.text and "no longer on our list" in nobody.text
    again = client.post(f"{url}/erase", data={"csrf_token": csrf_of(confirm.text)})
    assert (again.status_code, again.text) == (nobody.status_code, nobody.text)
    for gone in (client.get(url), client.get(f"{url}/erase"),
                 client.post(f"{url}/download", data={"csrf_token": csrf_of(confirm.text)})):
        assert (gone.status_code, gone.text) == (nobody.status_code, nobody.text)
    with Session(engine) as session:
        assert audit.entries(session, audit.AuditFilter(action="subscriber.erase"))[0] == 1

    # The page's way on works: the address may sign up again itself.
    assert "Check your inbox" in subscribe(client, READER).text
    assert any("/confirm/" in u for u in links_in(mails_to(sink, READER)[-1]))
