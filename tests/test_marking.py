"""Protective marking and archive visibility (issue 15, items 4 and 5), on both backends with
real SMTP over loopback: an OFFICIAL-SENSITIVE edition reaches only secure domains, says how
many it left out wherever a send is counted, and is on no public page; its "view in your
browser" link works only as the reader's own signed link."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mailer import outbox
from mailer.cli import run
from mailer.config import Settings
from mailer.edition import parse_edition
from mailer.errors import EditionError
from mailer.links import Links
from mailer.models import Delivery, DeliveryReason, DeliveryStatus
from mailer.render import compile_edition
from mailer.web.app import create_app
from mailer.worker import Policy, Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel, Subscriber
from subscribers.rules import Rules
from subscribers.validation import in_domains
from tests.smtp_servers import FaultServer, make_fault_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "editions" / "2020-q3-kent-essex.md"
BASE = "https://news.example.org"  # the worker refuses an unsubscribe link that is not https
FAST = Policy(retry_base=0.01, retry_cap=0.05, give_up=timedelta(hours=1), unknown_resends=1,
              throttle_pause=0.05)
SECURE = ["cat@kent.police.uk", "dan@essex.pnn.police.uk"]
# gmail.com, a look-alike that only contains "police.uk", and one that has it as a label
# in the middle: none is on a secure domain.
OUTSIDE = ["ana@gmail.com", "ben@gmail.com", "eve@kentpolice.uk", "fay@police.uk.example.com"]
NOW = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)


def source(**front: str) -> str:
    """The sample edition with these front-matter keys added at its top."""
    text = SAMPLE.read_text(encoding="utf-8")
    added = "".join(f"{key}: {value}\n" for key, value in front.items())
    return text.replace("---\n", "---\n" + added, 1)


def mailer(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = run(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return " ".join(out.split())  # rich may wrap a line; the words are what count


@pytest.fixture
def sessions(engine) -> sessionmaker[Session]:  # type: ignore[no-untyped-def]
    return session_factory(engine)


def _people(sessions: sessionmaker[Session], rules: Rules, emails: list[str]) -> None:
    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    with sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [(store.profile_from(rules, email=e, name=f"Reader {i}",
                                                             region="kent"), topics)
                                         for i, e in enumerate(emails)], ctx)
        s.commit()


def _drain(settings: Settings, sessions: sessionmaker[Session], server: FaultServer) -> None:
    sending = settings.model_copy(update={"smtp_url": type(settings.smtp_url)(server.url()),
                                          "rate_per_minute": 0, "rate_per_day": 0,
                                          "base_url": BASE})
    asyncio.run(Worker(sending, sessions, policy=FAST, poll=0.05).run(drain=True))


def _message(server: FaultServer, rcpt: str) -> EmailMessage:
    [raw] = server.handler.messages(rcpt)
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


# ---------------------------------------------------------------- the acceptance

def test_official_sensitive_reaches_only_secure_domains_and_is_on_no_public_page(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    monkeypatch.setenv("MAILER_BASE_URL", BASE)
    monkeypatch.setenv("MAILER_REQUIRE_APPROVAL", "false")
    settings = settings.model_copy(update={"base_url": BASE, "require_approval": False})
    _people(sessions, rules, SECURE + OUTSIDE)
    path = tmp_path / "2027-q1-sensitive.md"
    path.write_text(source(classification="OFFICIAL-SENSITIVE"), encoding="utf-8")

    dry = mailer(capsys, "edition", "send", str(path))
    assert "2 recipient(s) in its audience" in dry
    assert "left out: 4 (address not on a secure domain)" in dry
    sent = mailer(capsys, "edition", "send", str(path), "--confirm")
    assert "queued 2 message(s)" in sent
    _drain(settings, sessions, server)
    assert sorted(rcpt for _, rcpt in server.handler.envelopes()) == sorted(SECURE)
    assert all(server.handler.copies(a) == 0 for a in OUTSIDE)
    status = mailer(capsys, "edition", "status", path.stem)
    assert re.search(r"left out \(address not on a secure domain\) │ 4 │", status), status
    with sessions() as s:
        edition = outbox.get_edition(s, path.stem)
        p = outbox.progress(s, edition)
        assert (p.counts["sent"], p.total, p.left_out, p.counts["skipped"]) == (2, 2, 4, 0)
        assert outbox.left_out(s, edition) == 4
        reasons = dict(s.execute(select(Subscriber.email, Delivery.reason).join(
            Delivery, Delivery.subscriber_id == Subscriber.id)).tuples().all())
        assert {a for a, r in reasons.items() if r == DeliveryReason.NOT_SECURE} == set(OUTSIDE)
        edition_id = edition.id
        ids = dict(s.execute(select(Subscriber.email, Subscriber.id)).tuples().all())

    # The marking: first in the subject, top and bottom of both parts.
    message = _message(server, SECURE[0])
    assert message["Subject"].startswith("OFFICIAL-SENSITIVE: ")
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    text = text.replace("\r\n", "\n").strip()
    assert text.startswith("OFFICIAL-SENSITIVE\n") and text.endswith("\nOFFICIAL-SENSITIVE")
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    body = html[html.index("<body"):]
    assert body.count(">OFFICIAL-SENSITIVE<") == 2
    # Above the masthead (only the hidden preheader comes before it) and the last thing.
    assert body.index(">OFFICIAL-SENSITIVE<") < body.index("View this email in your browser")
    assert re.sub(r"<[^>]+>", " ", body).split()[-1] == "OFFICIAL-SENSITIVE"

    # The copy's "view in your browser" link is the reader's own signed link.
    links = set(re.findall(rf"{BASE}/read/[\w.-]+", text))
    assert len(links) == 1
    own = links.pop()

    with TestClient(create_app(settings), base_url=BASE) as client:
        assert path.stem not in client.get("/archive").text
        feed = ET.fromstring(client.get("/archive.xml").content)  # noqa: S314 - our own feed
        hrefs = [e.get("href") or "" for e in feed.iter("{http://www.w3.org/2005/Atom}link")]
        assert not any(path.stem in h for h in hrefs)
        assert client.get(f"/archive/{path.stem}").status_code == 404

        page = client.get(own.removeprefix(BASE))
        assert page.status_code == 200
        assert "OFFICIAL-SENSITIVE" in page.text and "Reader 0" not in page.text
        assert page.headers["x-robots-tag"] == "noindex, nofollow"
        assert '<meta name="robots" content="noindex, nofollow">' in page.text
        tampered = own[:-3] + ("AAA" if not own.endswith("AAA") else "BBB")
        assert client.get(tampered.removeprefix(BASE)).status_code == 400
        # A reader left out had no copy, so even a validly signed link opens nothing.
        outsider = Links(settings).view_own_copy(ids[OUTSIDE[0]], edition_id)
        assert client.get(outsider.removeprefix(BASE)).status_code == 404


def test_a_reader_whose_address_left_the_secure_domains_after_queueing_is_not_sent_it(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    _people(sessions, rules, SECURE)
    with sessions() as s:
        edition, _ = outbox.store_edition_source(
            s, settings, "moved", source(classification="OFFICIAL-SENSITIVE"), "tester")
        assert outbox.enqueue(s, edition) == 2
        s.execute(update(Subscriber).where(Subscriber.email == SECURE[1])
                  .values(email="dan@gmail.com", email_key="dan@gmail.com"))
        s.commit()
    _drain(settings, sessions, server)
    assert [rcpt for _, rcpt in server.handler.envelopes()] == [SECURE[0]]
    with sessions() as s:
        p = outbox.progress(s, outbox.get_edition(s, "moved"))
        assert (p.counts["sent"], p.left_out) == (1, 1)


def test_send_to_new_and_resend_keep_the_rule(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules) -> None:
    _people(sessions, rules, SECURE[:1] + OUTSIDE[:1])
    with sessions() as s:
        edition, _ = outbox.store_edition_source(
            s, settings, "again", source(classification="OFFICIAL-SENSITIVE"), "tester")
        assert outbox.enqueue(s, edition) == 1
        s.commit()
    _people(sessions, rules, ["new@gmail.com", "new@kent.police.uk"])
    with sessions() as s:
        edition = outbox.get_edition(s, "again")
        assert outbox.enqueue(s, edition) == 1  # what send-to-new runs
        s.execute(update(Delivery).values(status=DeliveryStatus.FAILED)
                  .where(Delivery.reason.is_(None)))
        assert outbox.requeue_failed(s, edition) == 2
        queued = s.scalars(select(Subscriber.email).join(Delivery).where(
            Delivery.status == DeliveryStatus.QUEUED)).all()
        assert sorted(queued) == sorted([SECURE[0], "new@kent.police.uk"])
        assert outbox.progress(s, edition).left_out == 2


def test_an_official_edition_goes_to_everyone_and_says_so(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules) -> None:
    _people(sessions, rules, SECURE + OUTSIDE)
    with sessions() as s:
        edition, _ = outbox.store_edition_source(s, settings, "open", source(), "tester")
        assert edition.compiled["subject"].startswith("OFFICIAL: ")
        assert edition.public and edition.compiled["archive"] == "public"
        assert outbox.left_out(s, edition) == 0
        assert outbox.enqueue(s, edition) == 6


def test_preflight_warns_when_the_audience_reaches_past_the_secure_domains(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules) -> None:
    from mailer.accounts import Actor, Role
    from mailer.operations import Caller
    from mailer.operations import editions as edition_ops

    _people(sessions, rules, SECURE + OUTSIDE[:1])
    with sessions() as s:
        outbox.store_edition_source(s, settings, "warned",
                                    source(classification="OFFICIAL-SENSITIVE"), "tester")
        admin = Caller(Actor(9, "ken", "Ken", Role.ADMIN, None), via="console")
        seen = edition_ops.preview(s, admin, settings, "warned")
        assert seen.left_out == 1
        assert ("OFFICIAL-SENSITIVE: 1 reader(s) in its audience are not on a secure domain "
                "and will be left out") in seen.warnings


# ---------------------------------------------------------------- archive visibility

def _sent(settings: Settings, sessions: sessionmaker[Session], slug: str, text: str) -> int:
    with sessions() as s:
        edition, _ = outbox.store_edition_source(s, settings, slug, text, "tester")
        outbox.enqueue(s, edition)
        s.commit()
        return edition.id


def test_subscribers_only_and_none_editions_stay_off_the_public_pages(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules,
        make_fault_server: Callable[..., FaultServer]) -> None:
    server = make_fault_server()
    settings = settings.model_copy(update={"base_url": BASE})
    _people(sessions, rules, SECURE[:1])
    _sent(settings, sessions, "open-one", source())
    readers = _sent(settings, sessions, "readers-one", source(archive="subscribers"))
    hidden = _sent(settings, sessions, "hidden-one", source(archive="none"))
    _drain(settings, sessions, server)
    copies = {m["Subject"]: m for m in (email.message_from_bytes(raw, policy=email.policy.default)
                                        for raw in server.handler.messages(SECURE[0]))}
    assert len(copies) == 1  # one subject for three editions: tell them apart by their links
    texts = [m.get_body(("plain",)).get_content()  # type: ignore[union-attr]
             for m in (email.message_from_bytes(raw, policy=email.policy.default)
                       for raw in server.handler.messages(SECURE[0]))]
    assert sum(f"{BASE}/archive/open-one" in t for t in texts) == 1
    assert sum(f"{BASE}/read/" in t for t in texts) == 1
    assert sum("View this email in your browser" not in t for t in texts) == 1
    with sessions() as s:
        sid = s.scalar(select(Subscriber.id))
        assert [p.slug for p in outbox.own_copies(s, sid)] == ["readers-one"]
    with TestClient(create_app(settings), base_url=BASE) as client:
        index = client.get("/archive").text
        assert "/archive/open-one" in index
        assert "readers-one" not in index and "hidden-one" not in index
        assert client.get("/archive/readers-one").status_code == 404
        assert client.get("/archive/hidden-one").status_code == 404
        links = Links(settings)
        assert client.get(links.view_own_copy(sid, readers).removeprefix(BASE)).status_code \
            == 200
        # archive: none is on the web for nobody, even with a validly signed link.
        assert client.get(links.view_own_copy(sid, hidden).removeprefix(BASE)).status_code \
            == 404


def test_a_readers_signed_link_expires(settings: Settings, sessions: sessionmaker[Session],
                                       rules: Rules) -> None:
    settings = settings.model_copy(update={"base_url": BASE, "view_link_days": 30})
    _people(sessions, rules, SECURE[:1])
    with time_machine.travel(NOW, tick=False):
        edition_id = _sent(settings, sessions, "expiring", source(archive="subscribers"))
        with sessions() as s:
            sid = s.scalar(select(Subscriber.id))
        link = Links(settings).view_own_copy(sid, edition_id).removeprefix(BASE)
    with TestClient(create_app(settings), base_url=BASE) as client:
        with time_machine.travel(NOW + timedelta(days=29), tick=False):
            assert client.get(link).status_code == 200
        with time_machine.travel(NOW + timedelta(days=31), tick=False):
            page = client.get(link)
            assert page.status_code == 400 and "expired" in page.text


def test_archive_folder_files_honour_their_visibility(settings: Settings, tmp_path: Path
                                                      ) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "file-open.md").write_text(source(), encoding="utf-8")
    (folder / "file-secret.md").write_text(source(classification="OFFICIAL-SENSITIVE"),
                                           encoding="utf-8")
    (folder / "file-readers.md").write_text(source(archive="subscribers"), encoding="utf-8")
    settings = settings.model_copy(update={"base_url": BASE, "archive_dir": folder})
    with TestClient(create_app(settings), base_url=BASE) as client:
        index = client.get("/archive").text
        assert "file-open" in index
        assert "file-secret" not in index and "file-readers" not in index
        assert client.get("/archive/file-open").status_code == 200
        assert client.get("/archive/file-secret").status_code == 404
        assert "file-secret" not in client.get("/archive.xml").text


# ---------------------------------------------------------------- the rule and its words

def test_official_sensitive_cannot_be_made_public_and_the_error_names_its_line() -> None:
    with pytest.raises(EditionError) as info:
        parse_edition(source(classification="OFFICIAL-SENSITIVE", archive="public"), "e.md")
    assert info.value.location == "e.md:3"
    assert "OFFICIAL-SENSITIVE edition cannot be public" in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("classification", "SECRET"),
                                            ("classification", "official sensitive"),
                                            ("archive", "everyone")])
def test_an_unknown_marking_or_visibility_is_refused_at_its_line(key: str, value: str) -> None:
    with pytest.raises(EditionError) as info:
        parse_edition(source(**{key: value}), "e.md")
    assert info.value.location == "e.md:2"
    assert key in str(info.value) and "is not one we know" in str(info.value)


def test_the_defaults_come_from_the_settings_and_sensitive_is_never_public(
        settings: Settings) -> None:
    sensitive = settings.model_copy(update={"default_classification": "OFFICIAL-SENSITIVE"})
    compiled = compile_edition(parse_edition(source(), "e.md"), sensitive)
    assert (compiled.classification, compiled.archive) == ("OFFICIAL-SENSITIVE", "subscribers")
    assert compiled.secure_domains == sorted(settings.secure_domains)
    lower_case = compile_edition(parse_edition(source(classification="official"), "e.md"),
                                 settings.model_copy(update={"default_archive": "none"}))
    assert (lower_case.classification, lower_case.archive) == ("OFFICIAL", "none")
    assert lower_case.secure_domains is None
    assert "View this email in your browser" not in lower_case.text
    assert "View this email in your browser" not in lower_case.html


def test_the_default_secure_domains_are_the_issues_list(settings: Settings) -> None:
    assert settings.secure_domains == ["police.uk", "pnn.police.uk", "gov.uk", "gcsx.gov.uk",
                                       "nhs.net", "cjsm.net"]


CASES = [("a@police.uk", True), ("a@kent.police.uk", True), ("b@KENT.Police.UK", True),
         ("a@essex.pnn.police.uk", True), ("a@x.gcsx.gov.uk", True), ("a@nhs.net", True),
         ("a@kentpolice.uk", False), ("a@police.uk.example.com", False),
         ("police.uk@gmail.com", False), ("a@nhs.network", False), ("a@cjsm.net.evil", False)]


def test_the_sql_and_python_domain_rules_agree(settings: Settings, sessions: sessionmaker[Session],
                                               rules: Rules) -> None:
    _people(sessions, rules, [e for e, _ in CASES])
    with sessions() as s:
        chosen = {e.lower() for e in s.scalars(select(Subscriber.email).where(
            store.at_domains(settings.secure_domains)))}
    for address, secure in CASES:
        assert in_domains(address, settings.secure_domains) is secure, address
        assert (address.lower() in chosen) is secure, address


def test_the_editor_keeps_the_marking_and_leaves_a_default_unwritten() -> None:
    from mailer import edition_form as ef

    form = ef.from_source(source(classification="OFFICIAL-SENSITIVE", archive="none"))
    assert (form.classification, form.archive) == ("OFFICIAL-SENSITIVE", "none")
    assert "classification" not in form.extra and "archive" not in form.extra
    again = parse_edition(ef.to_source(form), "e.md").meta
    assert (again.classification, again.archive) == ("OFFICIAL-SENSITIVE", "none")
    nxt = ef.next_issue(form)
    assert (nxt.classification, nxt.archive) == ("OFFICIAL-SENSITIVE", "none")
    form.classification = form.archive = ""
    text = ef.to_source(form)
    assert "classification:" not in text and "archive:" not in text


def test_the_preferences_page_from_the_magic_link_offers_the_readers_only_editions(
        settings: Settings, sessions: sessionmaker[Session], rules: Rules) -> None:
    settings = settings.model_copy(update={"base_url": BASE})
    _people(sessions, rules, SECURE[:1])
    _sent(settings, sessions, "shown-one", source(archive="subscribers"))
    _sent(settings, sessions, "public-one", source())
    with sessions() as s:
        sid = s.scalar(select(Subscriber.id))
        assert sid is not None
    links = Links(settings)
    with TestClient(create_app(settings), base_url=BASE) as client:
        page = client.get(links.preferences(sid).removeprefix(BASE)).text
        assert "Newsletters sent only to readers" in page
        [url] = re.findall(rf'href="({BASE}/read/[^"]+)"', page)
        assert client.get(url.removeprefix(BASE)).status_code == 200
