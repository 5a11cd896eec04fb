"""Replies reach a person (issue 15, item 6): a reader's reply to the bounce receiver is
forwarded to the contact mailbox intact; automatic mail is not; a reply is forwarded once."""

from __future__ import annotations

import email
import email.policy
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from mailer import bounce_policy, replies, retention
from mailer.bounce_policy import BouncePolicy, Decision, InboundRecord
from mailer.bounces import Kind, classify_inbound
from mailer.config import Settings
from mailer.inbound import InboundMessage
from mailer.outgoing import template_env, transactional
from mailer.reference import message_id
from mailer.replies import MARKER, ReaderReply
from subscribers.db import session_factory
from tests.test_admin_routes import app_client, login, make_user, people  # noqa: F401
from tests.test_bounce_e2e import WAIT, ServeProcess, _Controller
from tests.test_bounce_policy import dsn
from tests.waiting import wait_for
from tests.web_fixtures import (  # noqa: F401
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

CONTACT = "msht.coordinators@kent.police.uk"
OURS = "msht-bulletin@news.example.org"
READER = "jo.bloggs@essex.police.uk"
NOW = datetime(2026, 3, 10, 9, 30, tzinfo=UTC)


class Sink:
    """The contact mailbox's relay: keeps every message it is given, by recipient."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos),
                                  bytes(envelope.original_content or b"")))
        return "250 2.0.0 kept"

    def to(self, rcpt: str) -> list[bytes]:
        with self._lock:
            return [data for _, rcpts, data in self.received if rcpt in rcpts]


@pytest.fixture
def contact_sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    controller = _Controller(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield handler, controller.port
    controller.stop()


@pytest.fixture
def sessions(engine) -> sessionmaker[DbSession]:
    return session_factory(engine)


def _ours(settings: Settings, smtp_port: int) -> Settings:
    return settings.model_copy(update={
        "smtp_url": SecretStr(f"smtp://127.0.0.1:{smtp_port}?tls=none"),
        "from_address": OURS, "contact_address": CONTACT})


def reply_bytes(settings: Settings, *, subject: str = "Re: MSHT newsletter, spring 2026",
                extra: str = "", sender: str = f"Jo Bloggs <{READER}>", body: str = "") -> bytes:
    """A reply as Outlook or Gmail sends one: our Message-ID in In-Reply-To, a UTF-8 body."""
    ours = message_id(settings.secret(), 7, 9, "news.example.org")
    return (f"From: {sender}\r\nTo: {OURS}\r\nSubject: {subject}\r\n"
            f"Date: Tue, 10 Mar 2026 09:14:22 +0000\r\n"
            f"Message-ID: <reply.{abs(hash(subject + extra + body))}@essex.police.uk>\r\n"
            f"In-Reply-To: {ours}\r\nReferences: {ours}\r\n{extra}"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            + (body or "Thank you: could Chelmsford’s safeguarding team have the "
                       "training dates?\r\n\r\n> On 9 March you wrote:\r\n> .dotted line\r\n")
            ).encode("utf-8")


OUT_OF_OFFICE = {
    "rfc3834": "Auto-Submitted: auto-replied\r\n",
    "x-autoreply": "X-Autoreply: yes\r\n",
    "precedence": "Precedence: bulk\r\n",
    "exchange-loop": "X-MS-Exchange-Inbox-Rules-Loop: jo.bloggs@essex.police.uk\r\n",
    "suppress": "X-Auto-Response-Suppress: All\r\n",
}
OUT_OF_OFFICE_SUBJECTS = ["Automatic reply: MSHT newsletter", "Out of Office: MSHT newsletter",
                          "Auto: MSHT newsletter", "Autoreply: MSHT newsletter"]


def attached_original(forward: bytes) -> bytes:
    """The message/rfc822 part's bytes exactly as they are in the forward."""
    found = re.search(rb"Content-Type: message/rfc822\r\n.*?\r\n\r\n(.*)\r\n--(==_[0-9a-f]+_==)"
                      rb"--\r\n$", forward, re.S)
    assert found, forward[:2000]
    return found[1]


# ---------------------------------------------------------------- what is a reply

@pytest.mark.parametrize("extra", list(OUT_OF_OFFICE.values()), ids=list(OUT_OF_OFFICE))
def test_automatic_headers_are_not_replies(extra: str) -> None:
    settings = Settings()
    raw = reply_bytes(settings, extra=extra)
    assert classify_inbound(raw, settings.secret()).kind is not Kind.REPLY
    assert classify_inbound(reply_bytes(settings), settings.secret()).kind is Kind.REPLY


@pytest.mark.parametrize("subject", OUT_OF_OFFICE_SUBJECTS)
def test_out_of_office_subjects_are_not_replies(subject: str) -> None:
    settings = Settings()
    assert classify_inbound(reply_bytes(settings, subject=subject),
                            settings.secret()).kind is not Kind.REPLY


def test_the_null_sender_and_a_no_reply_address_are_not_replies() -> None:
    settings = Settings()
    raw = reply_bytes(settings)
    assert classify_inbound(raw, settings.secret(), envelope_sender="").kind is not Kind.REPLY
    assert classify_inbound(raw, settings.secret(),
                            envelope_sender=READER).kind is Kind.REPLY
    assert classify_inbound(reply_bytes(settings, extra="Return-Path: <>\r\n"),
                            settings.secret()).kind is not Kind.REPLY
    assert classify_inbound(reply_bytes(settings, sender="noreply@essex.police.uk"),
                            settings.secret()).kind is not Kind.REPLY


def test_a_dsn_is_still_a_bounce() -> None:
    settings = Settings()
    assert classify_inbound(dsn(READER, "5.1.1"), settings.secret()).kind is Kind.HARD


# ---------------------------------------------------------------- over real SMTP

def _serve(settings: Settings, tmp_path: Path, smtp_port: int) -> ServeProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(MAILER_DATABASE_URL=settings.database, MAILER_VAR_DIR=str(settings.var_dir),
               MAILER_SECRET_KEY=settings.secret().decode(),
               MAILER_SUPPRESSION_KEY=settings.suppression_secret().decode(),
               MAILER_CONFIG=str(tmp_path / "none.toml"), MAILER_FROM_ADDRESS=OURS,
               MAILER_CONTACT_ADDRESS=CONTACT,
               MAILER_SMTP_URL=f"smtp://127.0.0.1:{smtp_port}?tls=none",
               PYTHONUNBUFFERED="1", COLUMNS="200")
    server = ServeProcess(subprocess.Popen(
        [sys.executable, "-m", "mailer", "bounces", "serve", "--smtp", "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    server.wait_for_port()
    return server


def _submit(port: int, raw: bytes, mail_from: str = READER) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
        smtp.sendmail(mail_from, ["bounces@news.example.org"], raw)


def test_a_readers_reply_reaches_the_contact_mailbox_intact_and_automatic_mail_does_not(
        settings: Settings, sessions: sessionmaker[DbSession], contact_sink: tuple[Sink, int],
        tmp_path: Path) -> None:
    mailbox, smtp_port = contact_sink
    server = _serve(settings, tmp_path, smtp_port)
    try:
        reply = reply_bytes(settings)
        _submit(server.port, reply)
        # The receiver forwards before it answers 250, so it is there once sendmail returns.
        assert wait_for(lambda: mailbox.to(CONTACT), WAIT), "".join(server.output)
        automatic = [reply_bytes(settings, extra=e) for e in OUT_OF_OFFICE.values()] + [
            reply_bytes(settings, subject=s) for s in OUT_OF_OFFICE_SUBJECTS]
        for raw in automatic:
            _submit(server.port, raw)
        _submit(server.port, dsn(READER, "5.1.1"), mail_from="")
        _submit(server.port, reply)  # an MTA's redelivery after a lost 250
    finally:
        assert server.stop() == 0, "".join(server.output)

    [forward] = mailbox.to(CONTACT)
    assert attached_original(forward) == reply  # byte for byte as the reader sent it
    msg = email.message_from_bytes(forward, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == OURS  # never the reader's From (DMARC)
    assert msg["Reply-To"].addresses[0].addr_spec == READER
    assert msg["Auto-Submitted"] == "auto-forwarded" and msg[MARKER]
    cover, attached = list(msg.iter_parts())
    assert READER in cover.get_content() and "Chelmsford" not in cover.get_content()
    inner = attached.get_content()
    assert inner["In-Reply-To"] == message_id(settings.secret(), 7, 9, "news.example.org")
    assert "Chelmsford’s safeguarding team" in inner.get_content()

    with sessions() as s:
        [row] = s.scalars(select(ReaderReply)).all()
        assert (row.from_address, row.edition_id, row.subscriber_id) == (READER, 7, 9)
        assert row.forwarded_at is not None and row.forwarded_to == CONTACT
        assert row.raw == reply and row.size == len(reply)
        kinds = sorted(s.scalars(select(InboundRecord.kind)).all())
    # Every automatic message is filed with the bounces (none is a reply); the DSN is a bounce.
    assert len(kinds) == len(automatic) + 1 and kinds.count("hard") == 1, kinds
    assert set(kinds) == {"hard", "auto_reply", "unknown"}, kinds


def _receive(s: DbSession, settings: Settings, raw: bytes,
             mail_from: str | None = READER) -> bounce_policy.Outcome:
    return bounce_policy.receive(
        s, BouncePolicy(), InboundMessage(raw, "test", mail_from=mail_from), settings.secret(),
        now=NOW, own_addresses=replies.own_addresses(settings))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed: nothing listens there


def test_a_reply_waits_while_the_relay_is_down_and_is_forwarded_once_when_it_is_back(
        settings: Settings, sessions: sessionmaker[DbSession],
        contact_sink: tuple[Sink, int]) -> None:
    mailbox, smtp_port = contact_sink
    down = _ours(settings, _free_port())
    with sessions() as s:
        outcome = _receive(s, down, reply_bytes(settings))
        s.commit()
    assert outcome.decision is Decision.REPLY and not outcome.duplicate

    assert replies.forward_pending(sessions, down, NOW) == 0
    with sessions() as s:
        row = s.scalars(select(ReaderReply)).one()
        assert row.forwarded_at is None and row.attempts == 1 and row.last_error

    up = _ours(settings, smtp_port)
    later = NOW + timedelta(minutes=1)
    assert replies.forward_pending(sessions, up, later) == 1
    assert replies.forward_pending(sessions, up, later + timedelta(minutes=1)) == 0
    with sessions() as s:
        again = _receive(s, up, reply_bytes(settings))  # redelivered after it went
        s.commit()
    assert again.duplicate and again.inbound_id == outcome.inbound_id
    assert replies.forward_pending(sessions, up, later + timedelta(minutes=2)) == 0
    assert len(mailbox.to(CONTACT)) == 1
    with sessions() as s:
        row = s.scalars(select(ReaderReply)).one()
        assert row.forwarded_at == later and row.attempts == 2 and row.last_error is None


def test_a_claimed_reply_is_not_sent_by_a_second_forwarder(
        settings: Settings, sessions: sessionmaker[DbSession],
        contact_sink: tuple[Sink, int]) -> None:
    mailbox, smtp_port = contact_sink
    up = _ours(settings, smtp_port)
    with sessions() as s:
        _receive(s, up, reply_bytes(settings))
        s.commit()
        reply_id = s.scalars(select(ReaderReply.id)).one()
    assert replies._claim(sessions, reply_id, NOW) is not None  # another process has it
    assert replies.forward_pending(sessions, up, NOW + timedelta(seconds=10)) == 0
    assert mailbox.to(CONTACT) == []
    # Its lease runs out (that process died): the next pass sends it.
    assert replies.forward_pending(sessions, up, NOW + replies.LEASE + timedelta(seconds=1)) == 1


def test_a_reply_the_relay_refuses_for_a_week_is_no_longer_tried(
        settings: Settings, sessions: sessionmaker[DbSession],
        contact_sink: tuple[Sink, int]) -> None:
    mailbox, smtp_port = contact_sink
    with sessions() as s:
        _receive(s, settings, reply_bytes(settings))
        s.commit()
    up = _ours(settings, smtp_port)
    late = NOW + replies.FORWARD_FOR + timedelta(seconds=1)
    assert replies.forward_pending(sessions, up, late) == 0
    assert mailbox.to(CONTACT) == []
    with sessions() as s:
        [row], hidden = replies.recent(s, now=late)
    assert row.given_up and hidden == 0
    assert replies.forward_pending(sessions, up, late - timedelta(seconds=2)) == 1


def test_erasing_a_reader_deletes_their_replies_and_subject_access_lists_them(
        settings: Settings, sessions: sessionmaker[DbSession], rules) -> None:
    from subscribers import store
    from subscribers.models import Channel

    ours = _ours(settings, _free_port())
    with sessions() as s:
        [topic] = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [(store.profile_from(rules, email=READER,
                                                             region="essex"), [topic])],
                              store.Context(channel=Channel.IMPORT, lawful_basis="public_task"))
        _receive(s, ours, reply_bytes(settings, body="first"))
        _receive(s, ours, reply_bytes(settings, sender="other@kent.police.uk", body="x"))
        s.commit()
        reader = store.get_by_email(s, rules, READER)
        from mailer import privacy

        export = privacy.subject_access(s, reader)
        assert [r["subject"] for r in export["replies"]] == ["Re: MSHT newsletter, spring 2026"]
        privacy.erase(s, reader, store.Context(channel=Channel.ADMIN, actor="test"))
        s.commit()
        left = s.scalars(select(ReaderReply.from_address)).all()
    assert left == ["other@kent.police.uk"]


def test_mail_from_our_own_address_or_with_our_marker_is_never_forwarded(
        settings: Settings, sessions: sessionmaker[DbSession]) -> None:
    ours = _ours(settings, _free_port())
    with sessions() as s:
        own = _receive(s, ours, reply_bytes(settings, sender=f"Bulletin <{OURS}>"))
        marked = _receive(s, ours, reply_bytes(settings, extra=f"{MARKER}: 3\r\n"))
        contact = _receive(s, ours, reply_bytes(settings, sender=CONTACT, body="fwd"))
        s.commit()
        assert s.scalar(select(func.count()).select_from(ReaderReply)) == 0
    assert {own.decision, marked.decision, contact.decision} == {Decision.UNKNOWN}
    assert "not forwarded" in own.verdict.reason and MARKER in marked.verdict.reason


def test_a_forward_of_a_reply_with_header_tricks_stays_one_header_each(
        settings: Settings) -> None:
    ours = _ours(settings, _free_port())
    claimed = replies._Claimed(1, reply_bytes(settings), READER, "Jo\r\nBcc: x@y.example",
                               "hi =?utf-8?q?=0ABcc:_x@y.example?=", NOW, None)
    raw = replies.forward_message(ours, CONTACT, claimed, NOW)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc" not in head
    assert email.message_from_bytes(raw, policy=email.policy.default)["Bcc"] is None


# ---------------------------------------------------------------- retention, Reply-To

def test_replies_are_deleted_by_the_retention_pass_after_the_period(
        settings: Settings, sessions: sessionmaker[DbSession]) -> None:
    ours = _ours(settings, _free_port())
    with sessions() as s:
        _receive(s, ours, reply_bytes(settings))
        s.commit()
    periods = retention.Periods.from_settings(settings)
    assert periods.reader_replies_days == 90
    with sessions() as s:
        [holding] = [h for h in retention.report(s, periods) if h.key == "reader_replies"]
    assert holding.held == 1 and holding.next_purge == NOW + timedelta(days=90)
    kept = retention.purge(sessions, periods, NOW + timedelta(days=89))
    assert kept.reader_replies_deleted == 0
    gone = retention.purge(sessions, periods, NOW + timedelta(days=90, seconds=1))
    assert gone.reader_replies_deleted == 1
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ReaderReply)) == 0


def test_transactional_mail_to_readers_carries_the_reply_to(settings: Settings) -> None:
    context = {"name": "Jo", "organisation": "Essex Police", "yes_url": "https://x.example/y",
               "preferences_url": "https://x.example/p", "answer_by": "1 April 2026"}

    def reply_to(chosen: Settings) -> str:
        msg = transactional(chosen, template_env(), "reconfirm", READER, "Still with us?",
                            context, NOW)
        return str(msg["Reply-To"])

    assert reply_to(settings.model_copy(update={"reply_to": "replies@kent.police.uk"})) == (
        "replies@kent.police.uk")
    assert reply_to(settings) == settings.contact_address


# ---------------------------------------------------------------- the console

#: The console's replies: an hour ago, so within the week they are forwarded for.
RECENTLY = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def _kept(engine, settings: Settings, sender: str, subscriber_id: int | None) -> None:
    ref = (f"In-Reply-To: {message_id(settings.secret(), 7, subscriber_id, 'x.example')}\r\n"
           if subscriber_id is not None else "")
    raw = (f"From: {sender}\r\nSubject: Re: newsletter from {sender}\r\n{ref}\r\nThanks\r\n"
           ).encode()
    with session_factory(engine)() as s:
        verdict = classify_inbound(raw, settings.secret())
        assert verdict.kind is Kind.REPLY
        replies.keep(s, InboundMessage(raw, "test"), verdict, rules=settings.rules(),
                     now=RECENTLY)
        s.commit()


def test_the_replies_page_lists_replies_to_coordinators_within_their_regions(
        app_client, engine, web_settings: Settings) -> None:
    make_user(engine, "kent", regions=("kent",))
    make_user(engine, "root", role="admin", regions=())
    make_user(engine, "vic", role="viewer")
    _kent_id, essex_id = people(engine, web_settings, [("k@kent.police.uk", "kent"),
                                                       ("e@essex.police.uk", "essex")])
    # Kent's names no delivery of ours: placed by its address (a Kent reader's).
    _kept(engine, web_settings, "k@kent.police.uk", None)
    _kept(engine, web_settings, "e@essex.police.uk", essex_id)
    _kept(engine, web_settings, "stranger@essex.police.uk", None)

    assert login(app_client, "vic").status_code == 303
    assert app_client.get("/admin/replies").status_code == 403  # readers' words: no viewer
    assert "/admin/replies" not in app_client.get("/admin").text

    assert login(app_client, "kent").status_code == 303
    assert 'href="http://testserver/admin/replies"' in app_client.get("/admin").text
    page = app_client.get("/admin/replies")
    assert page.status_code == 200
    main = page.text.split('<main id="main"')[1]
    assert "k@kent.police.uk" in main and "essex" not in main.lower()
    assert "2 more from readers outside your regions" in main
    # UK time, as every console page shows it
    assert RECENTLY.astimezone(ZoneInfo("Europe/London")).strftime("%d %b %Y %H:%M %Z") in main
    assert "Waiting to be forwarded" in main

    assert login(app_client, "root").status_code == 303
    main = app_client.get("/admin/replies").text.split('<main id="main"')[1]
    assert all(a in main for a in ("k@kent.police.uk", "e@essex.police.uk",
                                   "stranger@essex.police.uk"))
    assert "not shown" not in main
