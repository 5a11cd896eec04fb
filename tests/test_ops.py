"""/metrics (Prometheus, bearer token), /readyz, and the JSON log format; SQLite and PostgreSQL,
a real worker sending over SMTP on loopback while /metrics is scraped."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool

from mailer import backup, logs, migrations, outbox
from mailer.config import Settings
from mailer.web.app import create_app
from subscribers import store
from subscribers.db import make_engine, session_factory
from subscribers.models import Channel
from tests.smtp_servers import FastSink
from tests.waiting import wait_for

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
TOKEN = "m" * 40


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


def _queued(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return samples[("mailer_outbox_deliveries", (("state", "queued"),))]


def test_without_a_token_set_metrics_does_not_exist(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/metrics", headers={"Authorization": "Bearer x"}).status_code == 404


def test_metrics_needs_the_bearer_token(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"metrics_token": type(settings.smtp_url)(TOKEN)}))
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == 401, headers
            assert "mailer_" not in response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
        samples = _scrape(client)
    assert samples[("mailer_scheduler_leader", ())] == 0
    assert ("mailer_last_backup_age_seconds", ()) not in samples  # no backup yet: absent


def test_metrics_scraped_during_a_send_show_the_queue_falling(
        settings: Settings, tmp_path: Path) -> None:
    n = 3000
    rules = settings.rules()
    engine = make_engine(settings.database, poolclass=NullPool)
    with session_factory(engine)() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [
            (store.profile_from(rules, email=f"m{i}@kent.police.uk", region="kent"), topics)
            for i in range(n)], store.Context(channel=Channel.IMPORT, lawful_basis="public_task"))
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        outbox.enqueue(s, edition)
        s.commit()
    engine.dispose()
    key = tmp_path / "backup.key"
    backup.make_key_file(key)
    keyed = settings.model_copy(update={"metrics_token": type(settings.smtp_url)(TOKEN),
                                        "backup_key_file": key})
    backup.create(keyed, backup.default_path(keyed))
    sink = FastSink().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")
           or k.startswith("MAILER_TEST_")}
    env.update(MAILER_DATABASE_URL=settings.database, MAILER_VAR_DIR=str(settings.var_dir),
               MAILER_SECRET_KEY="s" * 40, MAILER_SUPPRESSION_KEY="k" * 40,
               MAILER_SMTP_URL=sink.url(), MAILER_RATE_PER_MINUTE="0", MAILER_RATE_PER_DAY="0",
               MAILER_CONFIG=str(tmp_path / "none.toml"))
    worker: subprocess.Popen[bytes] | None = None
    try:
        with TestClient(create_app(keyed)) as client:
            before = _scrape(client)  # before the worker starts: on a busy machine the app's
            assert _queued(before) == n  # start-up can take longer than the first claim
            worker = subprocess.Popen([sys.executable, "-m", "mailer", "worker", "--drain"],
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
            assert wait_for(lambda: sink.total() >= 300, 60)
            during = _scrape(client)
            mark = sink.total()
            assert wait_for(lambda: sink.total() >= mark + 300, 60)
            later = _scrape(client)
            assert worker.wait(120) == 0
            done = _scrape(client)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(10)
        sink.stop()
    assert n > _queued(during) > _queued(later) > _queued(done) == 0
    assert done[("mailer_messages_sent_total", ())] == n == sink.total()
    assert done[("mailer_delivery_last_smtp_reply", (("class", "2xx"),))] == n
    assert done[("mailer_outbox_deliveries", (("state", "sent"),))] == n
    assert 0 <= done[("mailer_last_backup_age_seconds", ())] < 3600
    # Request latency by route template: the scrapes themselves were timed.
    assert done[("mailer_http_request_duration_seconds_count",
                 (("method", "GET"), ("route", "/metrics"), ("status", "200")))] >= 3


def test_latency_is_labelled_by_route_template_not_raw_path(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"metrics_token": type(settings.smtp_url)(TOKEN)}))
    with TestClient(app) as client:
        for token in ("abc", "def", "ghi"):
            client.get(f"/confirm/{token}")
        client.get("/no/such/page")
        samples = _scrape(client)
    routes = {dict(labels).get("route") for (name, labels) in samples
              if name == "mailer_http_request_duration_seconds_count"}
    assert "/confirm/{token}" in routes and "unmatched" in routes
    assert not any(r and ("abc" in r or "ghi" in r) for r in routes)
    confirms = sum(v for (name, labels), v in samples.items()
                   if name == "mailer_http_request_duration_seconds_count"
                   and dict(labels).get("route") == "/confirm/{token}")
    assert confirms == 3


def test_readyz_says_ready_and_why_not(settings: Settings) -> None:
    app = create_app(settings)
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        older = sorted(migrations.known_revisions())[-2]
        migrations.downgrade(settings.database, older)
        behind = client.get("/readyz")
        assert behind.status_code == 503
        assert "mailer db upgrade" in behind.json()["reason"]
        assert client.get("/healthz").status_code == 200  # alive, only not ready


def test_json_log_format_writes_one_object_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json", logging.INFO, force=True)
        logging.getLogger("mailer.test").warning("sent %s of %s", 3, 5)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["message"] == "sent 3 of 5"
        assert record["level"] == "WARNING" and record["logger"] == "mailer.test"
        assert record["time"].endswith("Z")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
