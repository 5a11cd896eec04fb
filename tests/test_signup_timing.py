"""D1: the subscribe page's answer takes as long for an address we know as for a new one.

Measured against the app under a real uvicorn on loopback with a real SMTP sink, as an
attacker would see it: 220 sign-ups of each kind (new addresses, active subscribers), in a
shuffled interleaved order so drift in the machine's load falls on both alike, each timed from
the client. After each answer the test waits (bounded) for that sign-up's mail, so work left
over from one request never lands on the next.

The two samples are compared with a two-sided Mann-Whitney U test (normal approximation with
the tie correction; at 220 a side it is accurate far beyond the threshold used). The test
fails when p < 0.001: if the time does not depend on the kind, it fails by chance once in a
thousand runs (the false-positive rate). Before the fix, where a new address cost ~10 ms more
than a known one (the medians 23.8 and 13.5 ms of the report), p was below 1e-30.
"""

from __future__ import annotations

import math
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine

from mailer.config import Settings
from mailer.web.app import create_app
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    csrf_of,
    fault_server,
    make_fault_server,
    make_settings,
    sink,
)

PER_KIND = 220
ALPHA = 0.001


def mann_whitney_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test, normal approximation, ties corrected."""
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    n1, n2 = len(a), len(b)
    u = sum(r for r, (_, side) in zip(ranks, pooled, strict=True) if side == 0) - n1 * (n1 + 1) / 2
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    z = (u - n1 * n2 / 2) / sigma
    return math.erfc(abs(z) / math.sqrt(2))


def test_the_statistic_tells_a_10ms_leak_and_not_noise() -> None:
    rng = random.Random(7)
    noise = [rng.gauss(15, 4) for _ in range(2 * PER_KIND)]
    assert mann_whitney_p(noise[:PER_KIND], noise[PER_KIND:]) > ALPHA
    assert mann_whitney_p([v + 10 for v in noise[:PER_KIND]], noise[PER_KIND:]) < 1e-20


@pytest.fixture
def served(settings: Settings, sink: FaultServer, tmp_path: Path) -> Iterator[Settings]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    web_settings = make_settings(sink, tmp_path, base_url=f"http://127.0.0.1:{port}",
                                 posts_per_network_hour=10_000, mails_per_network_day=10_000)
    server = uvicorn.Server(uvicorn.Config(create_app(web_settings), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield web_settings
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_a_sign_up_takes_as_long_for_a_known_address_as_for_a_new_one(
        served: Settings, sink: FaultServer, engine: Engine) -> None:
    rules = served.rules()
    known = [f"known{n}@kent.police.uk" for n in range(PER_KIND + 10)]
    with session_factory(engine)() as session:
        topics = store.topics_by_slug(session, ["newsletter"])
        for email in known:
            store.add_active(session, rules, store.profile_from(rules, email=email), topics,
                             store.Context(channel=Channel.IMPORT, lawful_basis="public_task"))
        session.commit()
    fresh = [f"new{n}@kent.police.uk" for n in range(PER_KIND + 10)]
    order = [("new", a) for a in fresh] + [("known", a) for a in known]
    random.Random(17).shuffle(order)
    times: dict[str, list[float]] = {"new": [], "known": []}
    with httpx.Client(base_url=served.base_url, timeout=30) as client:
        token = csrf_of(client.get("/subscribe").text)
        for n, (kind, email) in enumerate(order):
            data = {"csrf_token": token, "email": email, "name": "Sam Tester",
                    "organisation": "Kent Police", "organisation_type": "police",
                    "role": "first_responder", "region": "kent", "topics": ["newsletter"],
                    "consent": served.consent_version}
            start = time.perf_counter()
            response = client.post("/subscribe", data=data)
            took = time.perf_counter() - start
            assert response.status_code == 200, response.text
            assert "Check your inbox" in response.text
            assert sink.handler.wait_until(lambda h, e=email: h.copies(e) >= 1, timeout=15), email
            if n >= 20:  # the first twenty warm the server up, untimed
                times[kind].append(took * 1000)
    new, old = times["new"], times["known"]
    assert len(new) >= 200 and len(old) >= 200
    p = mann_whitney_p(new, old)
    assert p >= ALPHA, (f"the time tells them apart: median {statistics.median(new):.2f} ms new, "
                        f"{statistics.median(old):.2f} ms known, p={p:.2g}")
