"""DKIM on every message we send: each path's message, as a real relay on loopback received it,
verifies with dkimpy against the key records a real DNS server on loopback serves, and stops
verifying when a covered header or the body changes; during a key rotation both selectors
sign, and an Ed25519 key co-signs beside RSA (RFC 8463)."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dkim as dkimpy
import pytest
import time_machine
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from mailer import alerts, dkim, events, outbox, schedule
from mailer.cli import run
from mailer.config import Settings
from mailer.errors import ConfigError
from mailer.events import Event, EventSpec
from mailer.web.mail import Mailer, Outgoing
from mailer.worker import Worker
from subscribers import store
from subscribers.db import session_factory
from subscribers.models import Channel
from subscribers.rules import Rules
from tests.dns_server import DnsServer, serving
from tests.smtp_servers import FaultServer, make_fault_server  # noqa: F401

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
DOMAIN = "example.org"  # From's domain in the test settings, so d= by default
READER = "reader@kent.police.uk"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dkim")
    paths = {"old": folder / "old.pem", "new": folder / "new.pem", "ed": folder / "ed.pem",
             "stranger": folder / "stranger.pem"}
    for name, path in paths.items():
        dkim.generate_key(path, ed25519=name == "ed")
    return paths


@pytest.fixture(scope="module")
def dns(keys: dict[str, Path]) -> Iterator[DnsServer]:
    zone = {(f"{selector}._domainkey.{DOMAIN}", "TXT"):
            [" ".join(f'"{s}"' for s in dkim.txt_strings(dkim.txt_value(keys[name].read_bytes())))]
            for selector, name in (("mail2026", "old"), ("mail2027", "new"), ("ed2026", "ed"))}
    with serving(zone) as server:
        yield server


def signatures(raw: bytes) -> list[dict[str, str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M)
    return [{k.strip(): v.strip() for k, _, v in (t.partition("=") for t in
                                                  re.sub(r"\s+", "", f).split(";")) if k}
            for f in fields]


def verified(raw: bytes, dns: DnsServer) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, top first, the keys asked of the DNS server."""
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return dns.txt(name.decode())

    def one(idx: int) -> bool:
        try:
            return bool(dkimpy.DKIM(raw).verify(idx=idx, dnsfunc=dnsfunc))
        except dkimpy.DKIMException:  # a body hash mismatch is raised, not returned
            return False

    return [one(i) for i in range(len(signatures(raw)))]


def with_keys(settings: Settings, keys: dict[str, Path], *extra: str, **kw: object) -> Settings:
    return settings.model_copy(update={
        "dkim_key_file": keys["old"], "dkim_selector": "mail2026",
        "dkim_extra_keys": [f"{sel}={keys[name]}" for sel, name in
                            (("mail2027", "new"), ("ed2026", "ed")) if sel in extra], **kw})


def relay_settings(settings: Settings, server: FaultServer) -> Settings:
    return settings.model_copy(update={"smtp_url": type(settings.smtp_url)(server.url()),
                                       "rate_per_minute": 0, "rate_per_day": 0})


# ---- each path, as the relay received it

def _people(sessions: sessionmaker[Session], rules: Rules, topics: list[str]) -> None:
    with sessions() as s:
        store.bulk_add_active(s, rules, [(store.profile_from(
            rules, email=READER, name="Ann Reader", region="kent"),
            store.topics_by_slug(s, topics))], store.Context(channel=Channel.IMPORT))
        s.commit()


def send_edition(settings: Settings, sessions: sessionmaker[Session], rules: Rules,
                 server: FaultServer) -> bytes:
    _people(sessions, rules, ["newsletter"])
    with sessions() as s:
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        outbox.enqueue(s, edition)
        s.commit()
    # the default: signing in processes beside the SMTP loop
    summary = asyncio.run(Worker(settings, sessions, poll=0.05).run(drain=True))
    assert summary.sent == 1
    return server.handler.messages(READER)[0]


def send_reminder(settings: Settings, sessions: sessionmaker[Session], rules: Rules,
                  server: FaultServer) -> bytes:
    _people(sessions, rules, ["reminders"])
    at = datetime(2027, 5, 13, 8, 0, tzinfo=UTC)  # 09:00 BST the day before
    with sessions() as s:
        s.execute(delete(Event))
        with time_machine.travel(at - timedelta(days=2), tick=False):
            events.add_event(s, EventSpec(name="Test day", starts_on=date(2027, 5, 14),
                                          offsets=[1], reminder_text="Be ready."))
        s.commit()
    with sessions() as s:
        assert schedule.catch_up(s, settings, at).reminders
        s.commit()
    inline = settings.model_copy(update={"dkim_sign_processes": 0})  # signing in the loop
    summary = asyncio.run(Worker(inline, sessions, poll=0.05, clock=lambda: at)
                          .run(drain=True))
    assert summary.sent == 1
    return server.handler.messages(READER)[0]


def send_transactional(kind: str) -> Callable[..., bytes]:
    def send(settings: Settings, sessions: sessionmaker[Session], rules: Rules,
             server: FaultServer) -> bytes:
        mailer = Mailer(settings)
        context = ({"confirm_url": "https://news.example.org/confirm/tok", "confirm_days": 7,
                    "topics": "newsletter", "trusted": True} if kind == "confirm" else
                   {"preferences_url": "https://news.example.org/preferences/tok",
                    "manage_days": 180})
        mailer.send(Outgoing(READER, kind, context))
        assert mailer.sent == [(kind, "sent")]
        return server.handler.messages(READER)[0]
    return send


def send_alert(settings: Settings, sessions: sessionmaker[Session], rules: Rules,
               server: FaultServer) -> bytes:
    with sessions() as s:
        alerts.raise_alert(s, "test:1", "halt", "Sending has stopped", "The relay refused us.")
        s.commit()
    assert alerts.mail_pending(sessions, settings) == 1
    return server.handler.messages(settings.contact_address)[0]


def send_test_copy(settings: Settings, sessions: sessionmaker[Session], rules: Rules,
                   server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """`mailer edition preview --to`, the command line's test send, with the settings in the
    environment as an operator would set them."""
    monkeypatch.setenv("MAILER_SMTP_URL", settings.smtp_url.get_secret_value())
    monkeypatch.setenv("MAILER_DKIM_KEY_FILE", str(settings.dkim_key_file))
    monkeypatch.setenv("MAILER_DKIM_SELECTOR", settings.dkim_selector)
    monkeypatch.setenv("MAILER_DKIM_EXTRA_KEYS", str(settings.dkim_extra_keys).replace("'", '"'))
    assert run(["edition", "preview", str(SAMPLE), "--to", READER]) == 0
    return server.handler.messages(READER)[0]


PATHS: dict[str, Callable[..., bytes]] = {
    "edition": send_edition, "reminder": send_reminder,
    "confirmation": send_transactional("confirm"),
    "manage-link": send_transactional("manage_link"),
    "alert": send_alert, "test-send": send_test_copy}
LIST_HEADERS = (b"List-Id", b"List-Unsubscribe", b"List-Unsubscribe-Post")
COVERED = (b"From", b"To", b"Subject", b"Date", b"Message-ID", *LIST_HEADERS)


def _tampered(raw: bytes) -> dict[str, bytes]:
    """Each covered header changed, each added a second time, and the body changed."""
    head, body = raw.split(b"\r\n\r\n", 1)
    out = {}
    for name in COVERED:
        match = re.search(rb"^" + name + rb":[^\r]*", head, re.M | re.I)
        if match is None:
            # absent (transactional mail has no List-*): adding one must break it too
            out[f"{name.decode()} added"] = head + b"\r\n" + name + b": <x@evil.example>" + \
                b"\r\n\r\n" + body
            continue
        line = match[0]
        out[f"{name.decode()} changed"] = raw.replace(line, line + b"x", 1)
        out[f"{name.decode()} added"] = head + b"\r\n" + name + b": evil\r\n\r\n" + body
    out["body changed"] = head + b"\r\n\r\n" + body.replace(b"e", b"E", 1)
    return out


@pytest.mark.parametrize("path", list(PATHS))
def test_a_message_from_each_path_verifies_under_every_selector_and_breaks_when_changed(
        path: str, settings: Settings, engine: object, rules: Rules, keys: dict[str, Path],
        dns: DnsServer, make_fault_server: Callable[..., FaultServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_fault_server()
    sessions = session_factory(engine)  # type: ignore[arg-type]
    sending = relay_settings(with_keys(settings, keys, "mail2027", "ed2026"), server)
    kwargs = {"monkeypatch": monkeypatch} if path == "test-send" else {}
    raw = PATHS[path](sending, sessions, rules, server, **kwargs)

    sigs = signatures(raw)
    # the current key, the next one of the rotation, and the Ed25519 co-signature
    assert [(s["s"], s["a"], s["d"]) for s in sigs] == [
        ("mail2026", "rsa-sha256", DOMAIN), ("mail2027", "rsa-sha256", DOMAIN),
        ("ed2026", "ed25519-sha256", DOMAIN)]
    h = sigs[0]["h"].lower().split(":")
    for name in COVERED:  # covered and over-signed: named once more than the message has it
        present = len(re.findall(rb"^" + name + rb":", raw.split(b"\r\n\r\n")[0], re.M | re.I))
        assert present <= 1 and h.count(name.decode().lower()) == 2, name
    assert verified(raw, dns) == [True, True, True]
    for what, changed in _tampered(raw).items():
        assert changed != raw
        assert verified(changed, dns) == [False, False, False], what


def test_without_a_key_nothing_is_signed_and_a_bad_key_stops_the_worker_before_it_sends(
        settings: Settings, engine: object, tmp_path: Path) -> None:
    assert dkim.signer_for(settings).sign(b"From: a@b\r\n\r\nhi\r\n") == b"From: a@b\r\n\r\nhi\r\n"
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    broken = settings.model_copy(update={"dkim_key_file": bad, "dkim_selector": "s1"})
    with pytest.raises(ConfigError, match=r"MAILER_DKIM_KEY_FILE .*not a usable PEM"):
        Worker(broken, session_factory(engine))  # type: ignore[arg-type]
    unnamed = settings.model_copy(update={"dkim_key_file": bad})
    with pytest.raises(ConfigError, match="selector"):
        dkim.load_keys(unnamed)
    missing = settings.model_copy(update={"dkim_key_file": tmp_path / "absent.pem",
                                          "dkim_selector": "s1"})
    with pytest.raises(ConfigError, match="cannot read"):
        dkim.load_keys(missing)


def test_a_rotation_keeps_verifying_when_either_selector_is_gone_from_dns(
        keys: dict[str, Path], settings: Settings) -> None:
    """The overlap's point: mail signed by both still verifies before the new record has
    spread and after the old one is withdrawn."""
    signer = dkim.signer_for(with_keys(settings, keys, "mail2027"))
    raw = signer.sign(b"From: Bulletin <msht-bulletin@example.org>\r\nTo: a@example.net\r\n"
                      b"Subject: hi\r\n\r\nhello\r\n")
    both = {f"{sel}._domainkey.{DOMAIN}": dkim.txt_value(keys[name].read_bytes())
            for sel, name in (("mail2026", "old"), ("mail2027", "new"))}
    for withdrawn in both:
        zone = {(name, "TXT"): [" ".join(f'"{s}"' for s in dkim.txt_strings(value))]
                for name, value in both.items() if name != withdrawn}
        with serving(zone) as server:
            results = verified(raw, server)
        assert results.count(True) == 1, withdrawn


# ---- mailer dkim keygen

def test_keygen_writes_a_private_key_only_we_can_read_and_prints_its_record(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys" / "s2027.pem"
    assert run(["dkim", "keygen", "--selector", "s2027", "--domain", "news.example.org",
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert "name:  s2027._domainkey.news.example.org" in printed
    value_line = next(line for line in printed.splitlines() if "value:" in line)
    strings = re.findall(r'"([^"]*)"', value_line)
    assert len(strings) >= 2 and all(len(s) <= 255 for s in strings)  # RSA-2048: ~400 bytes
    assert "".join(strings) == dkim.txt_value(out.read_bytes())
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=")

    before = out.read_bytes()
    assert run(["dkim", "keygen", "--selector", "s2027", "--out", str(out)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert out.read_bytes() == before

    ed = tmp_path / "ed.pem"
    assert run(["dkim", "keygen", "--selector", "ed1", "--ed25519", "--out", str(ed)]) == 0
    printed = capsys.readouterr().out
    assert "k=ed25519; p=" in printed and "ed1._domainkey.example.org" in printed
    assert stat.S_IMODE(os.stat(ed).st_mode) == 0o600
