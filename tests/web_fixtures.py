"""Fixtures and helpers for the web tests: the app on a real database, mail to a real SMTP sink.

Import explicitly: `from tests.web_fixtures import web_settings, client, ...`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer.config import Settings
from mailer.web.app import create_app
from subscribers.models import ConsentEvent, RateEvent, Subscriber, Subscription
from tests.smtp_servers import FaultServer, fault_server, make_fault_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "editions" / "2020-q3-kent-essex.md"
BASE = "http://testserver"
HEADLESS_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
               "HeadlessChrome/120.0.0.0 Safari/537.36")
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
URL = re.compile(r"https?://[^\s<>\"']+")


def make_settings(sink: FaultServer, tmp_path: Path, **overrides: Any) -> Settings:
    archive = tmp_path / "archive"
    if not archive.exists():
        archive.mkdir()
        shutil.copy(SAMPLE, archive / SAMPLE.name)
    values: dict[str, Any] = {"base_url": BASE, "smtp_url": sink.url(), "archive_dir": archive}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def sink(fault_server: FaultServer) -> FaultServer:
    return fault_server


@pytest.fixture
def web_settings(settings: Settings, sink: FaultServer, tmp_path: Path) -> Settings:
    return make_settings(sink, tmp_path)


@pytest.fixture
def client(web_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(web_settings), base_url=BASE) as c:
        yield c


def csrf_of(page_html: str) -> str:
    match = CSRF.search(page_html)
    assert match, "the page has no CSRF field"
    return match[1]


def subscribe(client: TestClient, email: str, **fields: Any) -> Any:
    token = csrf_of(client.get("/subscribe").text)
    data = {"csrf_token": token, "email": email, "name": "Sam Tester",
            "organisation": "Kent Police", "organisation_type": "police",
            "role": "first_responder", "region": "kent", "topics": ["newsletter"],
            "consent": client.app.state.web.settings.consent_version}
    data.update(fields)
    return client.post("/subscribe", data=data)


def mails_to(sink: FaultServer, rcpt: str) -> list[EmailMessage]:
    return [message_from_bytes(m, policy=policy.default)  # type: ignore[misc]
            for m in sink.handler.messages(rcpt)]


def text_of(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return part.get_content()


def links_in(msg: EmailMessage) -> list[str]:
    """Every URL in the text and HTML parts, and in List-Unsubscribe, without duplicates."""
    found: list[str] = []
    for kind in ("plain", "html"):
        part = msg.get_body((kind,))
        if part is not None:
            found += URL.findall(part.get_content())
    found += URL.findall(msg.get("List-Unsubscribe", ""))
    return list(dict.fromkeys(u.rstrip(".,);") for u in found))


def snapshot(engine: Engine) -> tuple[Any, ...]:
    """Everything a request could change for subscribers, to compare before and after."""
    with Session(engine) as session:
        subscribers = session.execute(select(
            Subscriber.id, Subscriber.status, Subscriber.region, Subscriber.role,
            Subscriber.paused_until, Subscriber.confirmed_at, Subscriber.left_at)
            .order_by(Subscriber.id)).all()
        subscriptions = session.execute(select(
            Subscription.subscriber_id, Subscription.topic_id, Subscription.status)
            .order_by(Subscription.subscriber_id, Subscription.topic_id)).all()
        events = session.execute(select(ConsentEvent.id).order_by(ConsentEvent.id)).all()
        rates = session.execute(select(RateEvent.id)).all()
    return tuple(subscribers), tuple(subscriptions), tuple(events), len(rates)


def events_of(engine: Engine, subscriber_id: int) -> list[tuple[str, str, str | None]]:
    with Session(engine) as session:
        return [tuple(r) for r in session.execute(  # type: ignore[misc]
            select(ConsentEvent.action, ConsentEvent.channel, ConsentEvent.consent_version)
            .where(ConsentEvent.subscriber_id == subscriber_id).order_by(ConsentEvent.id))]


def subscriber_by_email(engine: Engine, email: str) -> Subscriber | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.scalar(select(Subscriber).where(Subscriber.email_key == email.lower()))


def topic_statuses(engine: Engine, subscriber_id: int) -> dict[int, str]:
    with Session(engine) as session:
        return dict(session.execute(select(Subscription.topic_id, Subscription.status).where(
            Subscription.subscriber_id == subscriber_id)).all())  # type: ignore[arg-type]
