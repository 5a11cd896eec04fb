"""What operations watch: `/metrics` (Prometheus, behind a bearer token) and `/readyz`.

`/metrics` uses prometheus-client. The figures about sending (the outbox by state, messages
sent, the deliveries' last SMTP reply by class, bounces, the scheduler's leadership, the last
backup's age) are read from the database and the backup directory at scrape time by a custom
collector, so any number of web, worker and scheduler processes need no shared memory and agree
on every figure. Only the request latency histogram lives in the process that served the
requests: with several uvicorn workers each scrape sees the one that answered it.

Without MAILER_METRICS_TOKEN, `/metrics` answers 404 (as if it did not exist); with it, a
missing or wrong `Authorization: Bearer` answers 401, compared in constant time.

`/readyz`, beside `/healthz` (the process is up): 200 when the database answers and its schema
is the code's, else 503 with the reason, for a load balancer or an orchestrator.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailer import backup, bounce_policy, migrations, outbox
from mailer.config import Settings
from mailer.models import DeliveryStatus, EditionStatus
from mailer.schedule import leader_present

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DatabaseCollector:
    """Every figure that the database or the backup directory holds, read at scrape time."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []  # nothing is read at registration: the database may not be up yet

    def collect(self) -> Iterator[Metric]:
        outbox_gauge = GaugeMetricFamily("mailer_outbox_deliveries",
                                   "Deliveries in the outbox, by state", labels=["state"])
        editions = GaugeMetricFamily("mailer_editions", "Editions, by status",
                                     labels=["status"])
        sent = CounterMetricFamily("mailer_messages_sent", "Messages the relay accepted")
        replies = GaugeMetricFamily(
            "mailer_delivery_last_smtp_reply", "Deliveries by the class of the last SMTP "
            "reply to them (2xx accepted, 4xx temporary, 5xx permanent, none: not tried)",
            labels=["class"])
        bounces = CounterMetricFamily("mailer_bounces", "Bounce and complaint events recorded, "
                                      "by kind", labels=["kind"])
        leader = GaugeMetricFamily("mailer_scheduler_leader",
                                   "1 when a scheduler leads this database, else 0")
        with Session(self.engine) as session:
            figures = outbox.figures(session)
            events = bounce_policy.event_counts(session)
        for state in DeliveryStatus:
            outbox_gauge.add_metric([state.value], figures.deliveries.get(state.value, 0))
        for status in EditionStatus:
            editions.add_metric([status.value], figures.editions.get(status.value, 0))
        sent.add_metric([], figures.deliveries.get(DeliveryStatus.SENT.value, 0))
        for name in ("2xx", "4xx", "5xx", "none"):
            replies.add_metric([name], figures.replies.get(name, 0))
        for kind, n in events.items():
            bounces.add_metric([kind], n)
        leader.add_metric([], 1 if leader_present(self.engine) else 0)
        yield from (outbox_gauge, editions, sent, replies, bounces, leader)
        age = backup.last_backup_age(self.settings)
        if age is not None:  # no backup at all: the series is absent (alert on absent())
            yield GaugeMetricFamily("mailer_last_backup_age_seconds",
                                    "Seconds since the newest backup in the backup directory",
                                    value=age.total_seconds())


class Timing:
    """ASGI middleware: each request's duration, labelled by its route's template (never the
    raw path, whose tokens would make a series per reader), method and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram, routes: list[BaseRoute]) -> None:
        self.app = app
        self.histogram = histogram
        self.routes = routes  # the app's own list, so routes added later count too

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            template = getattr(scope.get("route"), "path", None) or self._template(scope)
            self.histogram.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started)

    def _template(self, scope: Scope) -> str:
        # Routes added with add_route (the fast recipient routes) leave no "route" in the
        # scope this middleware sees: match them again, which costs a regex or two.
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"


def install(app: FastAPI, settings: Settings, engine: Engine) -> None:
    """Add /metrics, /readyz and the latency middleware to the web app."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, engine))
    latency = Histogram("mailer_http_request_duration_seconds",
                        "Web request latency, by route template", ["method", "route", "status"],
                        registry=registry, buckets=LATENCY_BUCKETS)
    token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token \
        else None

    async def metrics(request: Request) -> Response:
        if token is None:
            return PlainTextResponse("Not found", status_code=404)
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip().encode(), token)):
            return PlainTextResponse("A bearer token is needed", status_code=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        body = await run_in_threadpool(generate_latest, registry)  # the collector queries
        return Response(body, media_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})

    async def readyz(request: Request) -> Response:
        try:
            state = await run_in_threadpool(migrations.schema_state, engine)
        except SQLAlchemyError as exc:
            reason = f"the database does not answer: {type(exc).__name__}"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        if not state.up_to_date:
            return JSONResponse({"ready": False, "reason": f"the schema is at {state.current}, "
                                 f"the code expects {state.head}: run `mailer db upgrade`"},
                                status_code=503)
        return JSONResponse({"ready": True, "schema": state.current})

    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
    app.add_middleware(Timing, histogram=latency, routes=app.router.routes)
