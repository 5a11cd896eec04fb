"""Item 9: asking again to subscribe records a consent event only when something changes."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from mailer.config import Settings
from mailer.web.app import create_app
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    BASE,
    events_of,
    fault_server,
    make_fault_server,
    make_settings,
    sink,
    subscribe,
    subscriber_by_email,
)

EMAIL = "repeat@kent.police.uk"


def test_sixty_repeat_sign_ups_record_one_event_and_a_change_records_another(
        settings: Settings, sink: FaultServer, engine: Engine, tmp_path) -> None:
    web_settings = make_settings(sink, tmp_path, posts_per_network_hour=1000)
    with TestClient(create_app(web_settings), base_url=BASE) as client:
        responses = [subscribe(client, EMAIL) for _ in range(60)]
        assert {r.status_code for r in responses} == {200}
        sub = subscriber_by_email(engine, EMAIL)
        assert sub is not None
        version = web_settings.consent_version
        assert events_of(engine, sub.id) == [("subscribe", "web", version)]
        # A new topic is a change of state: recorded once, however often it is asked again.
        for _ in range(3):
            subscribe(client, EMAIL, topics=["newsletter", "reminders"])
        assert events_of(engine, sub.id) == [("subscribe", "web", version)] * 2
        # So is a changed profile.
        subscribe(client, EMAIL, topics=["newsletter", "reminders"], name="Sam Other")
        assert len(events_of(engine, sub.id)) == 3
