"""The words of every page a reader meets, in every state, compared with reviewed copies.

What a reader is told (the link expired, the sign-up waits for approval, they are already
unsubscribed) is behaviour as much as a status code: a page that lost its title or a sentence
is a bug. Each page's visible text (title, paragraphs, links with their targets, tokens masked)
is kept under tests/reader_page_words/; a change of wording is made there on purpose, and
reviewed like any other change. `UPDATE_PAGE_WORDS=1` writes the files afresh.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
from pathlib import Path
from typing import Any

import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from subscribers.models import Subscriber, SubscriberStatus
from tests.smtp_servers import FaultServer
from tests.test_web_public import POLICE, _confirm_link, _unsub_token
from tests.web_fixtures import (  # noqa: F401
    BASE,
    client,
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    subscribe,
    subscriber_by_email,
    web_settings,
)

WORDS = Path(__file__).resolve().parent / "reader_page_words"
TOKEN = re.compile(r"/(u|preferences|confirm|still-working)/[A-Za-z0-9_\-.]+")


def words_of(response: Any) -> str:
    """The status, then what <main> shows: one line per block, links as [text](target)."""
    body = response.text
    main = body[body.find("<main"):body.find("</main>")] if "<main" in body else body
    main = re.sub(r"<(script|style)\b.*?</\1>", "", main, flags=re.S)
    main = re.sub(r'<input type="hidden"[^>]*>', "", main)
    main = re.sub(r'<a [^>]*href="([^"]*)"[^>]*>(.*?)</a>', r"[\2](\1)", main, flags=re.S)
    main = re.sub(r"<(button)[^>]*>(.*?)</\1>", r"[button: \2]", main, flags=re.S)
    main = re.sub(r"</?(p|h1|h2|li|ul|div|form|fieldset|legend|label|main)\b[^>]*>", "\n", main)
    text = html.unescape(re.sub(r"<[^>]+>", " ", main)).replace(BASE, "")
    text = TOKEN.sub(lambda m: f"/{m[1]}/<token>", text)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return f"{response.status_code}\n" + "\n".join(line for line in lines if line) + "\n"


def _preferences(client: TestClient, subscriber_id: int) -> str:
    return client.app.state.web.links.preferences(subscriber_id)  # type: ignore[no-any-return]


def _with_status(engine: Engine, subscriber_id: int, status: SubscriberStatus) -> None:
    with Session(engine) as session:
        session.execute(update(Subscriber).where(Subscriber.id == subscriber_id)
                        .values(status=status))
        session.commit()


def _pages(client: TestClient, sink: FaultServer, engine: Engine) -> dict[str, Any]:
    pages: dict[str, Any] = {}
    pages["subscribe-check-inbox"] = subscribe(client, POLICE)
    link = _confirm_link(sink, POLICE)
    pending = subscriber_by_email(engine, POLICE)
    assert pending is not None
    pages["preferences-pending"] = client.get(_preferences(client, pending.id))
    pages["confirm-page"] = client.get(link)
    pages["confirmed"] = client.post(link, data={"csrf_token": csrf_of(pages["confirm-page"].text)})
    sid = pending.id
    topic_link = f"/u/{_unsub_token(client, sid)}"
    every_link = f"/u/{_unsub_token(client, sid, topic=None)}"
    pages["unsubscribe-form-topic"] = client.get(topic_link)
    pages["unsubscribe-form-everything"] = client.get(every_link)
    pages["unsubscribed-topic"] = client.post(topic_link, data={"scope": "topic"})
    pages["unsubscribe-already-topic"] = client.get(topic_link)
    pages["subscribed-again"] = client.post(
        f"{topic_link}/undo", data={"csrf_token": csrf_of(pages["unsubscribed-topic"].text)})
    pages["one-click-done"] = client.post(every_link, content="List-Unsubscribe=One-Click",
                                          headers={"Content-Type": "application/x-www-form-"
                                                   "urlencoded"})
    pages["unsubscribe-already-everything"] = client.get(every_link)
    pages["preferences-unsubscribed"] = client.get(_preferences(client, sid))
    for status in (SubscriberStatus.AWAITING_APPROVAL, SubscriberStatus.LAPSED):
        _with_status(engine, sid, status)
        pages[f"preferences-{status.value.replace('_', '-')}"] = client.get(
            _preferences(client, sid))
    _with_status(engine, sid, SubscriberStatus.ACTIVE)
    pages["preferences-active"] = client.get(_preferences(client, sid))

    nobody = client.app.state.web.tokens.unsubscribe(999_999, None)
    pages["unsubscribe-nobody"] = client.get(f"/u/{nobody}")
    pages["unsubscribed-nobody"] = client.post(f"/u/{nobody}", data={"scope": "all"})
    pages["one-click-nobody"] = client.post(
        f"/u/{nobody}", content="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    pages["link-not-valid"] = client.get(f"/preferences/{nobody[:-3]}abc")
    with time_machine.travel(dt.datetime.now(dt.UTC) - dt.timedelta(days=400)):
        old = _preferences(client, sid)
    pages["link-expired"] = client.get(old)
    pages["manage-sent"] = client.post("/manage", data={
        "csrf_token": csrf_of(client.get("/manage").text), "email": POLICE})
    return pages


CASES = ["subscribe-check-inbox", "preferences-pending", "confirm-page", "confirmed",
         "unsubscribe-form-topic", "unsubscribe-form-everything", "unsubscribed-topic",
         "unsubscribe-already-topic", "subscribed-again", "one-click-done",
         "unsubscribe-already-everything", "preferences-unsubscribed",
         "preferences-awaiting-approval", "preferences-lapsed", "preferences-active",
         "unsubscribe-nobody", "unsubscribed-nobody", "one-click-nobody", "link-not-valid",
         "link-expired", "manage-sent"]


def test_every_reader_page_says_what_was_reviewed(
        client: TestClient, sink: FaultServer, engine: Engine) -> None:
    pages = _pages(client, sink, engine)
    assert sorted(pages) == sorted(CASES)
    update_files = os.environ.get("UPDATE_PAGE_WORDS") == "1"
    differ: list[str] = []
    for name in CASES:
        said, kept = words_of(pages[name]), WORDS / f"{name}.txt"
        if update_files:
            WORDS.mkdir(exist_ok=True)
            kept.write_text(said, encoding="utf-8")
        elif not kept.exists() or kept.read_text(encoding="utf-8") != said:
            differ.append(f"--- {name} (kept)\n"
                          f"{kept.read_text(encoding='utf-8') if kept.exists() else ''}"
                          f"+++ {name} (now)\n{said}")
    assert not differ, "\n".join(differ)
