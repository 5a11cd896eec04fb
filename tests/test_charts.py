"""The console's charts (issue 18, item 3): readers at each month end by region and by type of
organisation, what became of each send in the week after it, and reminders sent and missed
by quarter; on SQLite and PostgreSQL.

The rows are written as the store records them (join, leave and lapse times, deliveries,
unsubscribe events, planned reminders), several of them on the edges that matter: a join
just after midnight UK time on the 1st (still the month before in UTC), a leave and an
unsubscribe exactly 7 days after a send. The expected figures are counted here again in plain
Python over the same rows, and the chart's table, its CSV and the page's table must equal them;
a Kent co-ordinator's charts must leave Essex out.
"""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import date as Date
from html.parser import HTMLParser
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from mailer import charts
from mailer.charts import Chart
from mailer.config import Settings
from mailer.events import Event, Reminder
from mailer.models import Delivery, Edition
from mailer.web.app import create_app
from subscribers.db import session_factory
from subscribers.models import ConsentEvent, Subscriber
from tests.conftest import _require_or_skip
from tests.test_admin_e2e import _sign_in
from tests.test_admin_routes import login, make_user, sample_edition
from tests.test_web_e2e import AXE, _axe, served  # noqa: F401
from tests.web_fixtures import BASE, fault_server, make_fault_server, sink, web_settings  # noqa: F401

UK = ZoneInfo("Europe/London")
NOW = datetime(2026, 6, 15, 11, 0, tzinfo=UTC)
MONTHS = ["Jul 2025", "Aug 2025", "Sep 2025", "Oct 2025", "Nov 2025", "Dec 2025", "Jan 2026",
          "Feb 2026", "Mar 2026", "Apr 2026", "May 2026", "Jun 2026"]
QUARTERS = ["Jul to Sep 2024", "Oct to Dec 2024", "Jan to Mar 2025", "Apr to Jun 2025",
            "Jul to Sep 2025", "Oct to Dec 2025", "Jan to Mar 2026", "Apr to Jun 2026"]
SERIES = ["Delivered", "Bounced", "Unsubscribed within 7 days"]
CAPTIONS = {"readers-by-region": "Readers at each month end, by region",
            "readers-by-organisation-type": "Readers at each month end, by type of organisation",
            "sends": "What became of each send",
            "reminders": "Reminders sent and missed, by quarter"}


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@dataclass(frozen=True)
class Reader:
    name: str
    region: str | None
    kind: str | None  # organisation type
    status: str
    joined: datetime | None
    left: datetime | None = None
    lapsed: datetime | None = None  # the LAPSE consent event


READERS = [
    Reader("k1", "kent", "police", "active", utc(2025, 5, 10)),
    Reader("k2", "kent", "ngo", "unsubscribed", utc(2025, 9, 3, 10), left=utc(2026, 3, 5, 9)),
    # 00:30 on 1 April in the UK (summer time), still 31 March in UTC: April's reader.
    Reader("k3", "kent", "police", "active", utc(2026, 3, 31, 23, 30)),
    Reader("k4", "kent", "health", "lapsed", utc(2025, 8, 1), lapsed=utc(2026, 4, 20, 2)),
    # Came back and not confirmed again, and one waiting for approval: no readers (yet).
    Reader("k5", "kent", "police", "pending", utc(2025, 10, 1)),
    Reader("k6", "kent", None, "awaiting_approval", utc(2026, 5, 1)),
    Reader("e1", "essex", "police", "active", utc(2025, 11, 15)),
    # Left at 00:30 on 1 June UK time: still a reader at the end of May.
    Reader("e2", "essex", "local_authority", "bounced", utc(2025, 7, 1),
           left=utc(2026, 5, 31, 23, 30)),
    Reader("e3", "essex", "local_authority", "active", utc(2026, 6, 10)),
    Reader("x1", None, None, "erased", utc(2025, 12, 1), left=utc(2026, 3, 1)),  # erased
    Reader("n1", "kent", "police", "pending", None),  # never confirmed
]


@dataclass(frozen=True)
class Send:
    slug: str
    regions: str  # the edition's audience, as its source writes it
    started: datetime | None
    deliveries: dict[str, str]  # reader -> delivery status


SENDS = [
    Send("a-both", "[kent, essex]", utc(2026, 3, 2, 9),
         {"k1": "sent", "k2": "sent", "k4": "bounced", "e1": "sent", "e2": "sent", "x1": "sent"}),
    Send("b-essex", "[essex]", utc(2026, 5, 5, 9), {"e1": "sent", "e2": "bounced", "e3": "sent"}),
    Send("c-kent", "[kent]", utc(2026, 6, 1, 9), {"k1": "sent", "k3": "sent", "k4": "failed"}),
    Send("d-draft", "[kent, essex]", None, {}),
]
# Unsubscribe consent events: (reader, when). A's send started 2 March 09:00 UTC.
UNSUBSCRIBES = [
    ("k2", utc(2026, 3, 5, 9)),  # 3 days after A
    ("e1", utc(2026, 3, 9, 9)),  # exactly 7 days after A: outside its week
    ("x1", utc(2026, 3, 2, 8)),  # an hour before A
    ("e2", utc(2026, 3, 9, 8, 59)),  # just inside A's week
    ("e1", utc(2026, 5, 6, 9)),  # a day after B
    ("k3", utc(2026, 6, 3, 9)),  # two days after C
]
# (status, due): reminders of one event, each for its own occurrence.
REMINDERS = [
    ("enqueued", utc(2026, 3, 31, 23, 30)),  # 00:30 on 1 April UK time: April to June
    ("missed", utc(2026, 1, 15, 9)),
    ("enqueued", utc(2025, 10, 1, 8)),
    ("enqueued", utc(2026, 6, 10, 8)),
    ("planned", utc(2026, 6, 20, 8)),  # not yet due
    ("cancelled", utc(2026, 2, 1, 8)),
    ("missed", utc(2024, 6, 30, 23, 30)),  # 1 July UK time: the first quarter shown
    ("enqueued", utc(2024, 6, 15, 8)),  # before the quarters shown
]


@pytest.fixture
def world(engine: Engine, web_settings: Settings) -> dict[str, int]:
    """The rows above, written straight into the tables; the editions' ids by slug."""
    ids: dict[str, int] = {}
    with session_factory(engine)() as session:
        for r in READERS:
            row = Subscriber(email=None if r.status == "erased" else f"{r.name}@x.police.uk",
                             email_key=None if r.status == "erased" else f"{r.name}@x.police.uk",
                             region=r.region, organisation_type=r.kind, status=r.status,
                             confirmed_at=r.joined, left_at=r.left, created_at=utc(2025, 1, 1))
            session.add(row)
            session.flush()
            ids[r.name] = row.id
            if r.lapsed:
                session.add(ConsentEvent(subscriber_id=row.id, action="lapse", channel="system",
                                         occurred_at=r.lapsed))
        for name, when in UNSUBSCRIBES:
            session.add(ConsentEvent(subscriber_id=ids[name], action="unsubscribe",
                                     channel="one_click", occurred_at=when))
        event = Event(slug="harbour", name="Harbour watch day", starts_on=Date(2024, 1, 1))
        session.add(event)
        session.flush()
        for i, (status, due) in enumerate(REMINDERS):
            session.add(Reminder(event_id=event.id, occurrence=Date(2024, 1, 1) + timedelta(i),
                                 offset_days=1, send_at=due, not_after=due + timedelta(hours=4),
                                 status=status))
        session.commit()
    for send in SENDS:
        eid = sample_edition(engine, web_settings, regions=send.regions, slug=send.slug)
        ids[send.slug] = eid
        with session_factory(engine)() as session:
            if send.started is not None:
                session.execute(update(Edition).where(Edition.id == eid).values(
                    status="sent", started_at=send.started, title=f"Issue {send.slug}"))
            for name, status in send.deliveries.items():
                session.add(Delivery(edition_id=eid, subscriber_id=ids[name], status=status,
                                     queued_at=send.started, next_attempt_at=send.started))
            session.commit()
    return ids


# ---------------------------------------------------------------- counted again, in Python

def _in(scope: tuple[str, ...] | None, region: str | None) -> bool:
    return scope is None or region in scope


def expected_readers(by: str, words: dict[str, str], scope: tuple[str, ...] | None
                     ) -> tuple[list[str], list[list[Any]]]:
    """The readers table (header, rows): a column per group with anyone in it."""
    ends = []
    for label in MONTHS:
        first = datetime.strptime(label, "%b %Y")
        year, month = (first.year + 1, 1) if first.month == 12 else (first.year,
                                                                      first.month + 1)
        ends.append(min(datetime(year, month, 1, tzinfo=UK), NOW))
    groups: dict[str, list[int]] = {}
    for r in READERS:
        if not _in(scope, r.region) or r.joined is None or r.status in ("pending",
                                                                       "awaiting_approval"):
            continue
        code = r.region if by == "region" else r.kind
        name = words[code] if code else "Not recorded"
        counts = groups.setdefault(name, [0] * len(ends))
        gone = r.lapsed if r.status == "lapsed" else r.left
        for i, end in enumerate(ends):
            if r.joined < end and (gone is None or gone >= end):
                counts[i] += 1
    names = sorted((n for n, c in groups.items() if any(c)),
                   key=lambda n: (n == "Not recorded", n))
    return (["Month", *names],
            [[month, *(groups[n][i] for n in names)] for i, month in enumerate(MONTHS)])


def expected_send(send: Send, scope: tuple[str, ...] | None) -> list[Any]:
    region = {r.name: r.region for r in READERS}
    assert send.started is not None
    mine = {name: status for name, status in send.deliveries.items()
            if _in(scope, region[name])}
    left = {name for name, when in UNSUBSCRIBES
            if send.started <= when < send.started + timedelta(days=7)}
    return [f"Issue {send.slug} ({send.started.astimezone(UK):%d %b %Y})",
            sum(s == "sent" for s in mine.values()), sum(s == "bounced" for s in mine.values()),
            sum(name in left for name in mine)]


def expected_sends(scope: tuple[str, ...] | None) -> list[list[Any]]:
    shown = []
    for send in SENDS:
        audience = send.regions.strip("[]").replace(" ", "").split(",")
        if send.started is not None and (scope is None or set(audience) & set(scope)):
            shown.append(send)
    return [expected_send(s, scope) for s in sorted(shown, key=lambda s: s.started or NOW)]


def expected_reminders() -> list[list[Any]]:
    rows = [[q, 0, 0] for q in QUARTERS]
    for status, due in REMINDERS:
        local = due.astimezone(UK)
        index = (local.year - 2024) * 4 + (local.month - 1) // 3 - 2  # July 2024 is 0
        if 0 <= index < len(rows) and status in ("enqueued", "missed"):
            rows[index][1 if status == "enqueued" else 2] += 1
    return rows


# ---------------------------------------------------------------- reading what is served

def _csv(response: Any) -> list[list[str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert re.fullmatch(r'attachment; filename="[a-z0-9-]+-\d{8}-\d{4}\.csv"',
                        response.headers["content-disposition"])
    return list(csv.reader(io.StringIO(response.text)))


def _strings(rows: list[list[Any]]) -> list[list[str]]:
    return [[str(cell) for cell in row] for row in rows]


class _Tables(HTMLParser):
    """Each table's caption and the text of its cells, row by row; and the images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self._caption: str | None = None
        self._rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._caption, self._rows = "", []
        elif tag == "caption":
            self._in_caption = True
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "a":
            self.links.append(dict(attrs).get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._in_caption = False
        elif tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table" and self._caption is not None:
            self.tables[self._caption] = self._rows

    def handle_data(self, data: str) -> None:
        if self._in_caption and self._caption is not None:
            self._caption += data
        elif self._cell is not None:
            self._cell.append(data)


def _page(client: TestClient, path: str) -> _Tables:
    response = client.get(path)
    assert response.status_code == 200, response.text
    parser = _Tables()
    parser.feed(response.text)
    return parser


def _check_svg(response: Any) -> ET.Element:
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    # Inline styles for the picture's shapes, and nothing else: no script, no loads.
    assert response.headers["content-security-policy"].startswith("default-src 'none'; ")
    assert "script" not in response.headers["content-security-policy"]
    root = ET.fromstring(response.content)  # noqa: S314 (our own output) well-formed, or raises
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    tags = {element.tag.rsplit("}", 1)[-1] for element in root.iter()}
    assert "script" not in tags and "foreignObject" not in tags
    links = [value for element in root.iter() for key, value in element.attrib.items()
             if key.rsplit("}", 1)[-1] in ("href", "src")]
    assert links and all(link.startswith("#") for link in links)  # its own shapes only
    assert b"<script" not in response.content and b"javascript:" not in response.content
    return root


@pytest.fixture
def client(web_settings: Settings) -> Iterator[TestClient]:
    with time_machine.travel(NOW, tick=True), TestClient(create_app(web_settings),
                                                         base_url=BASE) as c:
        yield c


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("who,scope", [("root", None), ("kent", ("kent",))])
def test_every_chart_table_and_csv_equals_the_counts_made_from_the_rows(
        client: TestClient, engine: Engine, web_settings: Settings, world: dict[str, int],
        who: str, scope: tuple[str, ...] | None) -> None:
    make_user(engine, "root", role="admin", regions=())
    make_user(engine, "kent", role="coordinator", regions=("kent",))
    assert login(client, who).status_code == 303
    regions, kinds = web_settings.regions, web_settings.organisation_types
    wanted = {
        "readers-by-region": expected_readers("region", regions, scope),
        "readers-by-organisation-type": expected_readers("organisation_type", kinds, scope),
        "sends": (["Send", *SERIES], expected_sends(scope)),
        "reminders": (["Quarter", "Sent", "Missed"], expected_reminders()),
    }
    page = _page(client, "/admin")
    for key, (header, rows) in wanted.items():
        assert _csv(client.get(f"/admin/charts/{key}.csv")) == [header, *_strings(rows)], key
        assert page.tables[f"{CAPTIONS[key]}: the figures"] == [header, *_strings(rows)], key
        _check_svg(client.get(f"/admin/charts/{key}.svg"))
        image = next(i for i in page.images if str(i["src"]).endswith(f"/charts/{key}.svg"))
        assert image["alt"] and "chart" in str(image["alt"]).lower()
        assert f"{BASE}/admin/charts/{key}.csv" in page.links
    # A sanity check of the data itself, so the comparison above cannot pass on nothing.
    assert wanted["readers-by-region"][1][-1][1:] == ([2, 2, 0] if scope is None else [2])
    assert sum(row[3] for row in wanted["sends"][1]) == (4 if scope is None else 2)


def test_a_kent_coordinator_sees_nothing_of_essex(client: TestClient, engine: Engine,
                                                  world: dict[str, int]) -> None:
    make_user(engine, "kent", role="coordinator", regions=("kent",))
    assert login(client, "kent").status_code == 303
    by_region = _csv(client.get("/admin/charts/readers-by-region.csv"))
    assert by_region[0] == ["Month", "Kent"]
    sends = _csv(client.get("/admin/charts/sends.csv"))
    assert [row[0] for row in sends[1:]] == ["Issue a-both (02 Mar 2026)",
                                             "Issue c-kent (01 Jun 2026)"]
    # The send to both counties counts only its Kent readers: k1 and k2 delivered, k4
    # bounced, k2 left within the week (Essex's e2 did too, and is not counted).
    assert sends[1][1:] == ["2", "1", "1"]
    assert client.get(f"/admin/editions/{world['b-essex']}/chart.csv").status_code == 404
    assert client.get(f"/admin/editions/{world['b-essex']}/chart.svg").status_code == 404
    svg = client.get("/admin/charts/readers-by-region.svg").text
    assert "Kent" in svg and "Essex" not in svg


def test_an_editions_page_shows_its_own_figures_with_a_table_and_a_csv(
        client: TestClient, engine: Engine, world: dict[str, int]) -> None:
    make_user(engine, "root", role="admin", regions=())
    assert login(client, "root").status_code == 303
    eid = world["a-both"]
    row = expected_send(SENDS[0], None)
    assert row[1:] == [5, 1, 2]  # k1, k2, e1, e2, x1 delivered; k4 bounced; k2 and e2 left
    header = ["Send", *SERIES]
    assert _csv(client.get(f"/admin/editions/{eid}/chart.csv")) == [header, _strings([row])[0]]
    page = _page(client, f"/admin/editions/{eid}")
    assert page.tables["What became of this send: the figures"] == [header,
                                                                     _strings([row])[0]]
    assert any(str(i["src"]).endswith(f"/admin/editions/{eid}/chart.svg") for i in page.images)
    assert f"{BASE}/admin/editions/{eid}/chart.csv" in page.links
    _check_svg(client.get(f"/admin/editions/{eid}/chart.svg"))
    # A send that has not started has no figures to show on its page.
    draft = _page(client, f"/admin/editions/{world['d-draft']}")
    assert not any(caption.endswith(": the figures") for caption in draft.tables)


def test_a_cell_a_spreadsheet_would_run_as_a_formula_is_written_as_text(
        client: TestClient, engine: Engine, world: dict[str, int]) -> None:
    make_user(engine, "root", role="admin", regions=())
    with session_factory(engine)() as session:
        session.execute(update(Edition).where(Edition.id == world["c-kent"]).values(
            title='=HYPERLINK("https://example.org")'))
        session.commit()
    assert login(client, "root").status_code == 303
    rows = _csv(client.get(f"/admin/editions/{world['c-kent']}/chart.csv"))
    assert rows[1][0] == "'=HYPERLINK(\"https://example.org\") (01 Jun 2026)"
    sends = _csv(client.get("/admin/charts/sends.csv"))
    assert sends[-1][0].startswith("'=HYPERLINK")


def test_the_charts_need_a_signed_in_person_and_an_unknown_chart_is_not_found(
        client: TestClient, engine: Engine, world: dict[str, int]) -> None:
    for path in ("/admin/charts/sends.csv", "/admin/charts/sends.svg",
                 f"/admin/editions/{world['a-both']}/chart.csv"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and "/admin/login" in response.headers["location"]
    make_user(engine, "root", role="admin", regions=())
    assert login(client, "root").status_code == 303
    assert client.get("/admin/charts/everything.csv").status_code == 404
    assert client.get("/admin/charts/sends.csv").status_code == 200


@pytest.mark.browser
def test_the_charts_show_in_chromium_under_the_consoles_csp_pass_axe_and_fit_a_phone(
        browser: Any, served: Settings, engine: Engine, world: dict[str, int],
        artifacts: Any) -> None:
    """The pictures load as images under the page's CSP (which forbids the inline styles an
    inlined SVG would need: none is refused), the pages pass axe-core, and nothing scrolls
    sideways at 375 px."""
    make_user(engine, "root", role="admin", regions=())
    context = browser.new_context(bypass_csp=False)
    page = context.new_page()
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    try:
        _sign_in(page, served.base_url, "root")
        problems: list[str] = []
        for path in ("/admin", f"/admin/editions/{world['a-both']}"):
            page.set_viewport_size({"width": 1280, "height": 900})
            page.goto(served.base_url + path, wait_until="load")
            drawn = page.evaluate("""() => [...document.querySelectorAll('.chart img')]
                .map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])""")
            assert drawn and all(ok for _src, ok in drawn), drawn
            page.screenshot(path=str(artifacts / f"charts{path.replace('/', '-')}.png"),
                            full_page=True)
            page.set_viewport_size({"width": 375, "height": 720})
            width = page.evaluate("document.documentElement.scrollWidth")
            if width > 375:
                problems.append(f"{path}: {width} px wide at 375 px")
        assert len(drawn) == 1  # the edition's page: its own chart
        assert problems == [] and refused == []
    finally:
        context.close()
    if not AXE.exists():
        _require_or_skip(f"axe-core is not installed at {AXE} (bash .ci/setup)")
    context = browser.new_context(bypass_csp=True)  # only so axe itself can be injected
    page = context.new_page()
    try:
        _sign_in(page, served.base_url, "root")
        found = _axe(page)
        page.goto(f"{served.base_url}/admin/editions/{world['a-both']}")
        found += _axe(page)
    finally:
        context.close()
    assert found == []


def test_the_same_figures_draw_the_same_svg_with_its_words_as_text_and_an_empty_chart_says_so(
        ) -> None:
    chart = Chart(key="sends", title="What became of each send", category="Send",
                  categories=["Issue 1 (02 Mar 2026)", "Issue 2 (05 May 2026)"],
                  ticks=["02 Mar", "05 May"],
                  series=[("Delivered", [5, 2]), ("Bounced", [1, 0])])
    first = charts.svg(chart)
    assert first == charts.svg(chart)  # no date, no random ids: cacheable, comparable
    text = first.decode()
    for words in ("What became of each send", "Delivered", "Bounced", "02 Mar", "05 May"):
        assert f">{words}<" in text, words  # kept as text, not drawn as glyph outlines
    assert "Issue 1" not in text  # the axis has the short labels; the table the long ones
    assert chart.describe().startswith("Bar chart of what became of each send (Delivered, ")
    nothing = Chart(key="readers-by-region", title="Readers at each month end, by region",
                    category="Month", categories=["Jun 2026"], series=[], kind="line")
    empty = charts.svg(nothing)
    ET.fromstring(empty)  # noqa: S314 (our own output)
    assert b">Nothing to show yet<" in empty
    assert nothing.describe() == "Readers at each month end, by region: nothing to show yet."
    assert charts.csv_text(nothing).splitlines() == ["Month", "Jun 2026"]
