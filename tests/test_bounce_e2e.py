"""End to end: a real send through a local MTA double that accepts everything and then bounces
some recipients asynchronously, as a relay does: after its 250 it composes a real DSN (or, for
one reader, a feedback-loop complaint) and delivers it over LMTP to a running `mailer bounces
serve` process. Those subscribers end bounced or suppressed, and the next send skips them. On
SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import queue
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr
from sqlalchemy import select, update
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from mailer import bounce_policy, outbox
from mailer.bounce_policy import InboundRecord
from mailer.config import Settings
from mailer.models import Delivery, DeliveryStatus
from mailer.reference import return_path
from mailer.worker import Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel, ConsentAction, SubscriberStatus
from subscribers.rules import Rules
from tests.test_bounce_policy import BOUNCE_ADDRESS, arf, dsn
from tests.test_worker import FAST, SAMPLE

WAIT = 30.0  # seconds: the bound on every wait below, never a sleep


class BouncingMta:
    """Accepts every message (250), then, on a thread of its own, reports on chosen recipients
    to the envelope sender's handler over LMTP: `fates[rcpt]` is a DSN status code, or
    "complaint" for an ARF report sent to the plain bounce address (feedback loops do not see
    VERP). `rewrite_message_id`: the relay puts its own Message-ID on what it sends on, as
    Amazon SES does, so the returned headers no longer carry ours.

    A report counts as sent once the receiver's 250 came back: `mailer bounces serve` answers
    only after it has committed what it decided."""

    def __init__(self, lmtp_port: int, fates: dict[str, str], *,
                 rewrite_message_id: bool = False) -> None:
        self.lmtp_port, self.fates = lmtp_port, fates
        self.rewrite_message_id = rewrite_message_id
        self.copies: Counter[str] = Counter()
        self.envelope_from: dict[str, str] = {}
        self.reports_sent = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Condition()
        self._queue: queue.Queue[tuple[str, str, bytes] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._report, name="mta-double", daemon=True)
        self._thread.start()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = bytes(envelope.original_content or b"")
        if self.rewrite_message_id:
            content = re.sub(rb"(?mi)^Message-ID:[^\r\n]*",
                             f"Message-ID: <0102018e.{len(self.copies)}@relay.example>"
                             .encode(), content, count=1)
        for rcpt in envelope.rcpt_tos:
            with self._lock:
                self.copies[rcpt] += 1
                self.envelope_from[rcpt] = envelope.mail_from or ""
            if rcpt in self.fates:
                self._queue.put((envelope.mail_from or "", rcpt, content))
        return "250 2.0.0 Ok: queued"  # accepted now; the bounce comes later, separately

    def _report(self) -> None:
        while (item := self._queue.get()) is not None:
            mail_from, rcpt, content = item
            headers = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
            fate = self.fates[rcpt]
            if fate == "complaint":
                original = email.message_from_bytes(content, policy=email.policy.compat32)
                kept = "".join(f"{name}: {original[name]}\r\n" for name in
                               ("Message-ID", "To", "Subject", "List-Unsubscribe")
                               if original[name])
                raw, to = arf(rcpt, original["Message-ID"], original_headers=kept), \
                    BOUNCE_ADDRESS
            else:
                raw, to = dsn(rcpt, fate, to=mail_from, original_headers=headers), mail_from
            try:
                with smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=WAIT) as lmtp:
                    lmtp.sendmail("", [to], raw)  # the null sender: it is a bounce
            except Exception as exc:  # reported by wait_for, not lost on this thread
                self.errors.append(exc)
            with self._lock:
                self.reports_sent += 1
                self._lock.notify_all()

    def wait_for(self, n: int) -> None:
        with self._lock:
            assert self._lock.wait_for(lambda: self.reports_sent >= n, timeout=WAIT), (
                f"only {self.reports_sent} of {n} reports delivered")
        assert not self.errors, self.errors

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=WAIT)


class _Controller(Controller):
    def _trigger_server(self) -> None:
        # Bound to port 0: learn the real port before aiosmtpd's start-up probe connects.
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class ServeProcess:
    """`mailer bounces serve` as an MTA's LMTP transport would find it: its own process, its
    output read as it comes (a full pipe would stall it) into `output`."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.port = proc, 0
        self.output: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="serve-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.output.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()  # it exited

    def wait_for_port(self) -> int:
        def listening() -> bool:
            for line in self.output:
                if found := re.search(r"listening for (LMTP|SMTP) on 127\.0\.0\.1:(\d+)", line):
                    self.port = int(found[2])
                    return True
            return not self._reader.is_alive()

        with self._cond:
            self._cond.wait_for(listening, timeout=WAIT)
        if not self.port:
            self.stop()
            pytest.fail("`mailer bounces serve` did not start:\n" + "".join(self.output))
        return self.port

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Ctrl-C, as an operator stops it; or SIGTERM, as systemd and `kill` do."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
        self._reader.join(timeout=WAIT)
        return self.proc.returncode


def start_serve(settings: Settings, tmp_path: Path, *args: str) -> ServeProcess:
    """Start the command on a free port (`--port 0`) and read the port it says it listens on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(MAILER_DATABASE_URL=settings.database, MAILER_VAR_DIR=str(settings.var_dir),
               MAILER_SECRET_KEY=settings.secret().decode(),
               MAILER_SUPPRESSION_KEY=settings.suppression_secret().decode(),
               MAILER_CONFIG=str(tmp_path / "none.toml"), MAILER_BOUNCE_HOLD_MINUTES="0",
               PYTHONUNBUFFERED="1", COLUMNS="200")
    server = ServeProcess(subprocess.Popen(
        [sys.executable, "-m", "mailer", "bounces", "serve", "--port", "0",
         "--settle-every", "0.2", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    server.wait_for_port()
    return server


@pytest.fixture
def sessions(engine) -> sessionmaker[DbSession]:
    return session_factory(engine)


@pytest.fixture
def serve(settings: Settings, tmp_path: Path) -> Iterator[ServeProcess]:
    server = start_serve(settings, tmp_path)
    yield server
    assert server.stop() == 0, "".join(server.output)


def _mta(serve: ServeProcess, fates: dict[str, str],
         **options: bool) -> tuple[BouncingMta, _Controller]:
    mta = BouncingMta(serve.port, fates, **options)
    controller = _Controller(mta, hostname="127.0.0.1", port=0, server_hostname="mta.test")
    controller.start()
    return mta, controller


def _people(sessions: sessionmaker[DbSession], rules: Rules, emails: list[str]) -> dict[str, int]:
    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    with sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        store.bulk_add_active(s, rules, [(store.profile_from(rules, email=e, region="kent"),
                                          topics) for e in emails], ctx)
        s.commit()
        return {e: store.get_by_email(s, rules, e).id for e in emails}


def _send(sessions: sessionmaker[DbSession], settings: Settings, path: Path) -> int:
    with sessions() as s:
        edition, _ = outbox.store_edition_file(s, settings, path, "tester")
        outbox.enqueue(s, edition)
        s.commit()
        edition_id = edition.id
    asyncio.run(Worker(settings, sessions, policy=FAST, poll=0.05).run(drain=True))
    return edition_id


def _sender(settings: Settings, controller: _Controller, *, verp: bool) -> Settings:
    return settings.model_copy(update={
        "smtp_url": SecretStr(f"smtp://127.0.0.1:{controller.port}?tls=none"),
        "rate_per_minute": 0, "rate_per_day": 0, "bounce_address": BOUNCE_ADDRESS,
        "verp": verp})


def _deliveries(sessions: sessionmaker[DbSession], edition_id: int) -> dict[int, Delivery]:
    with sessions() as s:
        return {d.subscriber_id: d for d in s.scalars(
            select(Delivery).where(Delivery.edition_id == edition_id))}


def _next_edition(tmp_path: Path) -> Path:
    second_file = tmp_path / "2020-q4-kent-essex.md"
    shutil.copy(SAMPLE, second_file)
    return second_file


def test_bounces_reported_after_acceptance_suppress_and_the_next_send_skips_them(
        settings: Settings, sessions: sessionmaker[DbSession], rules: Rules,
        serve: ServeProcess, tmp_path: Path) -> None:
    fine = [f"reader{i}@kent.police.uk" for i in range(8)] + [
        f"reader{i}@essex.police.uk" for i in range(3)]
    fates = {"left.force@kent.police.uk": "5.1.1", "retired@essex.police.uk": "5.1.10",
             "on.leave@kent.police.uk": "4.2.2", "angry@kent.police.uk": "complaint"}
    ids = _people(sessions, rules, fine + list(fates))
    mta, controller = _mta(serve, fates)
    try:
        sender = _sender(settings, controller, verp=True)
        first = _send(sessions, sender, SAMPLE)
        assert all(mta.copies[e] == 1 for e in fine + list(fates))  # everyone was accepted
        # VERP: each message left with its own return path, naming its delivery.
        assert mta.envelope_from["left.force@kent.police.uk"].startswith("bounces+e")
        mta.wait_for(len(fates))

        with sessions() as s:
            gone = store.get(s, ids["left.force@kent.police.uk"])
            retired = store.get(s, ids["retired@essex.police.uk"])
            on_leave = store.get(s, ids["on.leave@kent.police.uk"])
            angry = store.get(s, ids["angry@kent.police.uk"])
            assert (gone.status, retired.status) == (SubscriberStatus.BOUNCED,) * 2
            assert angry.status == SubscriberStatus.COMPLAINED
            assert on_leave.status == SubscriberStatus.ACTIVE  # one soft bounce is not enough
            assert on_leave.bounce_score == 1.0
            for who in ("left.force@kent.police.uk", "retired@essex.police.uk",
                        "angry@kent.police.uk"):
                assert store.is_suppressed(s, rules, who)
            history = [e.action for e in store.consent_history(s, gone.id)]
            assert history[-1] == ConsentAction.BOUNCE
            assert store.consent_history(s, angry.id)[-1].action == ConsentAction.COMPLAINT
            sources = dict(s.execute(select(InboundRecord.subscriber_id,
                                            InboundRecord.reference_source)).all())
            assert sources[gone.id] == "envelope"  # the RCPT TO of the LMTP delivery
            assert sources[angry.id] == "original:Message-ID"  # the FBL saw no VERP
        rows = _deliveries(sessions, first)
        assert rows[ids["left.force@kent.police.uk"]].status == DeliveryStatus.BOUNCED
        assert "5.1.1" in (rows[ids["left.force@kent.police.uk"]].last_reply or "")
        assert rows[ids["on.leave@kent.police.uk"]].status == DeliveryStatus.BOUNCED
        assert rows[ids["angry@kent.police.uk"]].status == DeliveryStatus.SENT
        assert rows[ids["reader0@kent.police.uk"]].status == DeliveryStatus.SENT

        second = _send(sessions, sender, _next_edition(tmp_path))
        mta.wait_for(len(fates) + 1)  # the soft bounce again, for the second send
        rows = _deliveries(sessions, second)
        skipped = {ids[e] for e in ("left.force@kent.police.uk", "retired@essex.police.uk",
                                    "angry@kent.police.uk")}
        assert skipped.isdisjoint(rows)  # never queued: the segment leaves them out
        assert set(rows) == {ids[e] for e in [*fine, "on.leave@kent.police.uk"]}
        assert mta.copies["left.force@kent.police.uk"] == 1
        assert mta.copies["angry@kent.police.uk"] == 1
        assert mta.copies["reader0@kent.police.uk"] == 2
        assert mta.copies["on.leave@kent.police.uk"] == 2
        with sessions() as s:
            events = bounce_policy.events_for(s, ids["on.leave@kent.police.uk"])
            assert [(e.edition_id, e.kind) for e in events] == [(first, "soft"),
                                                                 (second, "soft")]
            assert store.get(s, ids["on.leave@kent.police.uk"]).status == "active"
    finally:
        controller.stop()
        mta.stop()
    # What the process said about each message: its log is the operator's view of it.
    serve.stop()
    said = "".join(serve.output)
    assert said.count("decision:") == len(fates) + 1
    assert "suppressed" in said and "complaint" in said


@pytest.mark.parametrize("rewrite_message_id", [False, True],
                         ids=["message-id-returned", "message-id-rewritten"])
def test_without_verp_the_returned_headers_name_the_delivery(
        settings: Settings, sessions: sessionmaker[DbSession], rules: Rules,
        serve: ServeProcess, tmp_path: Path, rewrite_message_id: bool) -> None:
    ids = _people(sessions, rules, ["stays@kent.police.uk", "moved.on@kent.police.uk"])
    mta, controller = _mta(serve, {"moved.on@kent.police.uk": "5.1.1"},
                           rewrite_message_id=rewrite_message_id)
    try:
        sender = _sender(settings, controller, verp=False)
        first = _send(sessions, sender, SAMPLE)
        assert mta.envelope_from["moved.on@kent.police.uk"] == BOUNCE_ADDRESS  # no token
        mta.wait_for(1)
        with sessions() as s:
            record = s.scalar(select(InboundRecord))
            assert record is not None
            # Our Message-ID when the relay kept it; else the unsubscribe token of the
            # returned List-Unsubscribe, which names the subscriber (the edition is inferred).
            assert (record.reference_source, record.decision) == (
                "original:List-Unsubscribe-token" if rewrite_message_id
                else "original:Message-ID", "suppressed")
            assert (record.edition_id, record.subscriber_id) == (
                first, ids["moved.on@kent.police.uk"])
            assert store.get(s, ids["moved.on@kent.police.uk"]).status == "bounced"
        assert _deliveries(sessions, first)[ids["moved.on@kent.police.uk"]].status == (
            DeliveryStatus.BOUNCED)

        second = _send(sessions, sender, _next_edition(tmp_path))
        assert set(_deliveries(sessions, second)) == {ids["stays@kent.police.uk"]}
        assert mta.copies["moved.on@kent.police.uk"] == 1
        assert mta.copies["stays@kent.police.uk"] == 2
    finally:
        controller.stop()
        mta.stop()


def test_serve_speaks_smtp_too_and_stops_cleanly_on_sigterm(
        settings: Settings, sessions: sessionmaker[DbSession], rules: Rules,
        tmp_path: Path) -> None:
    ids = _people(sessions, rules, ["gone.away@kent.police.uk"])
    sid = ids["gone.away@kent.police.uk"]
    with sessions() as s:
        edition, _ = outbox.store_edition(
            s, slug="serve", title="t", subject="t", topic="newsletter", regions=["kent"],
            roles=[], source="serve", compiled={}, actor="tester")
        outbox.enqueue(s, edition)
        s.execute(update(Delivery).values(status=DeliveryStatus.SENT))
        s.commit()
        edition_id = edition.id
    server = start_serve(settings, tmp_path, "--smtp")
    try:
        verp = return_path(settings.secret(), edition_id, sid, BOUNCE_ADDRESS)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=WAIT) as client:
            refused = client.sendmail("", [verp], dsn("gone.away@kent.police.uk", "5.1.1",
                                                      to=verp))
        assert refused == {}
        with sessions() as s:  # the 250 came after the commit
            assert store.get(s, sid).status == SubscriberStatus.BOUNCED
            record = s.scalar(select(InboundRecord))
            assert record is not None and record.decision == "suppressed"
            assert record.origin == "smtp from 127.0.0.1"
    finally:
        code = server.stop(signal.SIGTERM)
    said = "".join(server.output)
    assert code == 0 and said.rstrip().endswith("stopped"), said
    assert "Traceback" not in said
