"""schemathesis against the API's own OpenAPI document: every operation, with generated
parameters and bodies, as an administrator, a co-ordinator and a viewer, must never answer with
a server error, and every answer must match what the document says (status code, content type,
body schema, headers) and refuse the call again without its token.

Generated ids would almost never name a real row, and generated text is never a valid edition,
so each case draws the path ids from the rows the fixture made (or keeps the generated ones),
and an operation whose body needs real content sometimes gets a valid body instead of the
generated one. The test then requires every operation to have succeeded at least once: a run
that only ever collected 401s, 404s and 422s would prove nothing about the authenticated paths.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks as st_checks
from sqlalchemy import Engine

from mailer import events, outbox
from mailer.config import Settings
from mailer.web.app import create_app
from subscribers.db import session_factory
from tests.test_admin_routes import domain_alert, make_user, people, sample_edition
from tests.test_api import _token
from tests.web_fixtures import (  # noqa: F401
    SAMPLE,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

EXAMPLES = 40  # per operation; hypothesis stops early only for an operation with few inputs
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance,
          st_checks.content_type_conformance, st_checks.response_schema_conformance,
          st_checks.response_headers_conformance, st_checks.ignored_auth]


@pytest.fixture
def api(web_settings: Settings, engine: Engine) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    """The app (on a loopback base URL, so test sends can be built) and the rows to aim at."""
    local = web_settings.model_copy(update={"base_url": "http://127.0.0.1:8000"})
    make_user(engine, "root", role="admin", regions=(), email="root@kent.police.uk")
    make_user(engine, "cora", regions=("kent", "essex"), email="cora@essex.police.uk")
    make_user(engine, "vic", role="viewer", regions=("kent",))
    # Real open bounce alerts (each also tells the co-ordinators), for the resolve and the
    # alert lists. Made first: a send to Kent made after the people below would go to them
    # too, and 4 bounces of 12 would not be enough to hold.
    aids = [domain_alert(engine, local, region=region)[0] for region in ("kent", "essex")]
    sids = people(engine, local, [(f"r{i}@kent.police.uk", "kent") for i in range(6)]
                  + [("e1@essex.police.uk", "essex"), ("m1@medway.gov.uk", "medway")])
    # Editions in each state an operation needs, two of those whose operations need the
    # likeliest draws: put forward by someone else (approve), approved (schedule, send),
    # sending (pause), paused (resume), and a plain draft.
    eids = [sample_edition(engine, local, author="alice", regions="[kent]", slug=f"e{i}")
            for i in range(7)]
    with session_factory(engine)() as session:
        *forward, sending, paused, _draft = (outbox.get_edition(session, e) for e in eids)
        approved = forward[2:]
        for edition in (*forward, sending, paused):
            outbox.request_approval(session, edition, "alice")
        for edition in (*approved, sending, paused):
            outbox.approve(session, edition, "bob")
        outbox.send_approved(session, sending, "bob")
        outbox.send_approved(session, paused, "bob")
        outbox.set_status(session, paused, outbox.EditionStatus.PAUSED)
        # Events to change and remove (one each may go: removing runs last).
        event_ids = [events.add_event(session, events.EventSpec(
            name=f"Day {i}", starts_on=dt.date(2099, 6, 1 + i)))[0].id for i in range(3)]
        session.commit()
    tokens = {"admin": _token(engine, "root", role="admin"), "coordinator": _token(engine, "cora"),
              "viewer": _token(engine, "vic", role="viewer")}
    with TestClient(create_app(local)) as client:
        yield client, {"sid": [*sids, 999_999], "eid": [*eids, 999_999],
                        "event_id": [*event_ids, 999_999],
                        "aid": [*aids, 999_999], "tokens": tokens}


VALID_BODIES: dict[tuple[str, str], list[Any]] = {
    ("POST", "/editions"): [{"slug": "uploaded", "source": SAMPLE.read_text()}],
    ("PUT", "/editions/{eid}/source"): [
        {"source": SAMPLE.read_text().replace("regions: [kent, essex]", "regions: [kent]")}],
    ("POST", "/subscribers"): [{"email": f"new{i}@kent.police.uk", "region": "kent",
                                "lawful_basis": "public_task"} for i in range(3)],
    ("POST", "/subscribers/import"): ["email,name,region\nimp@kent.police.uk,Imp,kent\n"],
    ("POST", "/editions/{eid}/schedule"): [{"at": "2099-01-05T09:00:00+00:00"}],
    ("POST", "/bounce-alerts/{aid}/resolve"): [{"apply": True}, {"apply": False}],
    ("POST", "/events"): [{"name": f"Added day {i}", "starts_on": "2099-03-0" + str(i + 1)}
                          for i in range(3)],
    ("PUT", "/events/{event_id}"): [{"name": "Changed day", "starts_on": "2099-04-01",
                                     "offsets": [7]}],
}


def _exercise(operation: Any, rows: dict[str, Any], seen: Counter[int]) -> None:
    """Run one operation's generated cases, counting the status codes in `seen`."""
    valid = VALID_BODIES.get((operation.method.upper(), operation.path), [])

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(), data=st.data())
    def call(case: Any, data: Any) -> None:
        for name in list(case.path_parameters or {}):
            pick = data.draw(st.sampled_from([None, *rows.get(name, [])]), label=name)
            if pick is not None:
                case.path_parameters[name] = pick
        if valid and data.draw(st.booleans(), label="valid body"):
            case.body = data.draw(st.sampled_from(valid), label="body")
        who = data.draw(st.sampled_from(sorted(rows["tokens"])), label="token")
        headers = rows["tokens"][who]
        response = case.call(headers=headers)
        seen[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    call()


def test_no_operation_answers_with_a_server_error_or_against_the_document(
        api: tuple[TestClient, dict[str, Any]]) -> None:
    client, rows = api
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", client.app)
    statuses: dict[str, Counter[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    # Erasing goes last: run earlier, it would leave the other operations nobody to act on.
    for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):
        seen = statuses[f"{operation.method.upper()} {operation.path}"] = Counter()
        _exercise(operation, rows, seen)
    # What was really run: every operation, each many times, and each succeeded at least once.
    documented = client.get("/api/v1/openapi.json").json()["paths"]
    assert len(statuses) == sum(len(item) for item in documented.values()) > 25
    total = sum(sum(c.values()) for c in statuses.values())
    assert total >= 30 * len(statuses), total
    never = sorted(op for op, c in statuses.items() if not any(200 <= s < 300 for s in c))
    assert never == [], {op: dict(statuses[op]) for op in never}
    print(f"\nschemathesis: {total} calls over {len(statuses)} operations")
    for op, counts in sorted(statuses.items()):
        print(f"  {op}: {dict(sorted(counts.items()))}")
