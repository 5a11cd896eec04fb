"""Bounce, complaint and auto-reply classification on a corpus of real-format messages, and the
transports that feed it: LMTP/SMTP over loopback, Maildir and mbox files, IMAP against a small
in-process server (pymap)."""

from __future__ import annotations

import email
import imaplib
import mailbox
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
import yaml
from flufl.bounce import all_failures

from mailer.bounces import Kind, Verdict, classify_inbound
from mailer.errors import MailerError
from mailer.inbound import InboundMessage, Receiver, open_source, read_imap, read_maildir, read_mbox
from mailer.reference import message_id, return_path
from tests.imap_server import PASSWORD as IMAP_PASSWORD
from tests.imap_server import USER as IMAP_USER
from tests.imap_server import ImapServer
from tests.smtp_servers import TlsFiles, tls_files  # noqa: F401 (a fixture)

CORPUS = Path(__file__).parent / "bounce_corpus"
SECRET = b"test-secret-for-the-bounce-corpus-0001"
EXPECTED: dict[str, dict] = yaml.safe_load((CORPUS / "expected.yaml").read_text())
# The corpus was written on 1 December 2026 and its List-Unsubscribe tokens carry that time:
# read at a later moment, fixed, so that no run (the suite on a moved clock, tests/moved_clock; or
# in 2036, when the tokens expire) sees a token from the future or an expired one.
CORPUS_READ_AT = datetime(2026, 12, 1, 17, 0, tzinfo=UTC)


@pytest.fixture
def corpus_clock() -> Iterator[None]:
    with time_machine.travel(CORPUS_READ_AT, tick=True):
        yield
BOUNCE_ADDRESS = "bounces@news.example.police.uk"


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def described(verdict: Verdict) -> dict:
    """A verdict in the manifest's terms (its `subscriber` and `policy` are the policy test's)."""
    ref = verdict.reference
    edition = f"e{ref.edition_id}." if ref and ref.edition_id is not None else ""
    return {
        "kind": str(verdict.kind),
        "recipients": {f.recipient: " ".join(
            str(x) for x in (f.kind, f.status, "delayed" if f.action == "delayed" else None)
            if x) for f in verdict.failures},
        "reference": f"{edition}s{ref.subscriber_id} {ref.source}" if ref else None,
    }


# ---- the corpus ----

def test_the_corpus_has_thirty_messages_and_the_manifest_names_each_exactly_once() -> None:
    files = sorted(p.name for p in CORPUS.glob("*.eml"))
    assert len(files) >= 30
    assert files == sorted(EXPECTED)


def test_the_corpus_covers_every_kind_and_the_formats_asked_for() -> None:
    kinds = {entry["kind"] for entry in EXPECTED.values()}
    assert kinds == {"hard", "soft", "complaint", "auto_reply", "reply", "unknown"}
    for prefix in ("postfix", "exim", "m365", "exchange", "gmail", "yahoo", "qmail", "sendmail",
                   "lotus", "arf", "vacation", "ooo"):
        assert any(name.startswith(prefix) for name in EXPECTED), prefix


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.usefixtures("corpus_clock")
def test_each_corpus_message_is_classified_as_the_manifest_says(name: str) -> None:
    verdict = classify_inbound(corpus(name), SECRET)
    expected = {k: EXPECTED[name][k] for k in ("kind", "recipients", "reference")}
    assert described(verdict) == expected
    assert verdict.reason
    assert verdict.actionable == (verdict.kind in ("hard", "soft", "complaint"))


def test_a_dsn_is_read_by_status_not_action_and_the_precise_diagnostic_code_wins() -> None:
    # Exim 4.94 says `Status: 5.0.0`; the remote server's `550 5.1.1` is what the policy needs.
    verdict = classify_inbound(corpus("exim_dsn_4.94_5.1.1.eml"), SECRET)
    (failure,) = verdict.failures
    assert (failure.status, failure.status_source, failure.action) == ("5.1.1", "diagnostic",
                                                                       "failed")
    assert failure.status_subject == "addressing"


def test_a_full_mailbox_is_soft_even_when_the_receiver_calls_it_permanent() -> None:
    verdict = classify_inbound(corpus("gmail_5.2.2_mailbox_full.eml"), SECRET)
    assert verdict.kind is Kind.SOFT
    assert verdict.failures[0].status == "5.2.2"
    assert verdict.failures[0].action == "failed"


def test_a_policy_rejection_is_hard_but_says_it_is_about_policy() -> None:
    verdict = classify_inbound(corpus("m365_5.7.1_not_authorized.eml"), SECRET)
    assert verdict.kind is Kind.HARD
    assert verdict.failures[0].status_subject == "policy"


def test_a_non_ascii_recipient_that_flufl_skips_is_reported() -> None:
    raw = corpus("dsn_non_ascii_recipient.eml")
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    assert not temporary and not permanent  # why we read DSNs ourselves
    assert classify_inbound(raw, SECRET).recipients == ("jörg.müller@example.org",)


def test_mixed_outcomes_keep_each_recipient_and_ignore_the_delivered_one() -> None:
    verdict = classify_inbound(corpus("dsn_multiple_recipients_mixed.eml"), SECRET)
    assert {(f.recipient, f.kind, f.action) for f in verdict.failures} == {
        ("left.force@example.org", Kind.HARD, "failed"),
        ("on.leave@example.org", Kind.SOFT, "delayed"),
    }
    assert "still.here@example.org" in verdict.reason
    assert verdict.status == "5.1.1"


def test_auto_submitted_on_a_dsn_does_not_make_it_an_auto_reply() -> None:
    raw = corpus("gmail_5.1.1_does_not_exist.eml")
    assert b"Auto-Submitted: auto-replied" in raw
    assert classify_inbound(raw, SECRET).kind is Kind.HARD


def test_a_complaint_names_the_recipient_and_the_feedback_type() -> None:
    verdict = classify_inbound(corpus("arf_yahoo_rfc822.eml"), SECRET)
    assert (verdict.kind, verdict.feedback_type, verdict.detector) == (Kind.COMPLAINT, "abuse",
                                                                       "arf")
    assert verdict.original_message_id == message_id(SECRET, 7, 150, "news.example.police.uk")


def test_a_not_spam_feedback_report_is_not_a_complaint() -> None:
    raw = corpus("arf_yahoo_rfc822.eml").replace(b"Feedback-Type: abuse",
                                                 b"Feedback-Type: not-spam")
    verdict = classify_inbound(raw, SECRET)
    assert verdict.kind is Kind.UNKNOWN
    assert verdict.feedback_type == "not-spam"


# ---- references ----

def test_a_reference_with_a_bad_mac_is_rejected() -> None:
    raw = corpus("postfix_5.1.1_user_unknown.eml")
    good = return_path(SECRET, 7, 101, BOUNCE_ADDRESS)
    assert classify_inbound(raw, SECRET).reference is not None
    # The same message with the MAC altered in every place it appears identifies nobody.
    mac = good.split(".")[2].split("@")[0]
    forged = raw.replace(mac.encode(), (mac[:-1] + ("0" if mac[-1] != "0" else "1")).encode())
    assert forged != raw
    assert classify_inbound(forged, SECRET).reference is None
    # And a reference signed with another secret is no reference either.
    assert classify_inbound(raw, b"another-secret-of-at-least-32-bytes!").reference is None


def test_the_envelope_recipient_is_the_first_place_looked_at() -> None:
    rcpt = return_path(SECRET, 9, 555, BOUNCE_ADDRESS)
    verdict = classify_inbound(corpus("postfix_5.1.1_user_unknown.eml"), SECRET, [rcpt])
    assert verdict.reference is not None
    assert (verdict.reference.edition_id, verdict.reference.subscriber_id,
            verdict.reference.source) == (9, 555, "envelope")


def test_without_verp_the_quoted_original_message_id_identifies_the_delivery() -> None:
    verdict = classify_inbound(corpus("qmail_no_mailbox.eml"), SECRET, [BOUNCE_ADDRESS])
    assert verdict.reference is not None
    assert (verdict.reference.subscriber_id, verdict.reference.source) == (115,
                                                                           "quoted:Message-ID")


# ---- bad input ----

@pytest.mark.parametrize("raw", [
    b"", b"\x00\xff" * 1000, b"not a message at all", b"Content-Type: multipart/report\r\n\r\n",
    b"From: a\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\nStatus: 9.9.9\r\n",
])
def test_junk_is_unknown_and_never_raises(raw: bytes) -> None:
    verdict = classify_inbound(raw, SECRET)
    assert verdict.kind is Kind.UNKNOWN
    assert not verdict.failures
    assert verdict.reason


def test_a_huge_message_is_read_from_its_head_and_says_so() -> None:
    raw = corpus("postfix_5.1.1_user_unknown.eml") + b"x" * 300_000
    verdict = classify_inbound(raw, SECRET, max_bytes=100_000)
    assert verdict.kind is Kind.HARD
    assert verdict.recipients == ("anne.baker@example.org",)
    assert any("only the first 100000" in note for note in verdict.notes)


def test_something_that_is_not_bytes_is_unknown() -> None:
    assert classify_inbound("text", SECRET).kind is Kind.UNKNOWN  # type: ignore[arg-type]


# ---- the LMTP / SMTP receiver over loopback ----

@pytest.fixture
def received() -> list[InboundMessage]:
    return []


@pytest.fixture
def lmtp(received: list[InboundMessage]) -> Iterator[Receiver]:
    with Receiver(received.append, "127.0.0.1", 0, lmtp=True) as receiver:
        yield receiver


def test_lmtp_delivers_a_bounce_with_its_envelope_to_the_callback(
        lmtp: Receiver, received: list[InboundMessage]) -> None:
    raw = crlf(corpus("postfix_5.1.1_user_unknown.eml"))
    rcpt = return_path(SECRET, 7, 101, BOUNCE_ADDRESS)
    with smtplib.LMTP("127.0.0.1", lmtp.port) as client:
        refused = client.sendmail("", [rcpt], raw)
    assert refused == {}
    (message,) = received
    assert message.raw == raw
    assert (message.mail_from, message.rcpt_tos) == ("", (rcpt,))
    assert message.origin.startswith("lmtp from 127.0.0.1")
    verdict = classify_inbound(message.raw, SECRET, message.rcpt_tos)
    assert verdict.kind is Kind.HARD
    assert verdict.reference is not None and verdict.reference.source == "envelope"


def test_lmtp_answers_once_per_recipient_after_data(lmtp: Receiver,
                                                    received: list[InboundMessage]) -> None:
    with socket.create_connection(("127.0.0.1", lmtp.port)) as sock:
        reader = sock.makefile("rb")

        def reply() -> list[bytes]:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return lines

        reply()  # greeting
        for line in (b"LHLO test.example.org", b"MAIL FROM:<>",
                     b"RCPT TO:<bounces+a@news.example.police.uk>",
                     b"RCPT TO:<bounces+b@news.example.police.uk>", b"DATA"):
            sock.sendall(line + b"\r\n")
            reply()
        sock.sendall(b"Subject: hello\r\n\r\nbody\r\n.\r\n")
        assert reply()[0].startswith(b"250")
        assert reply()[0].startswith(b"250")  # the second recipient's own reply
        sock.sendall(b"QUIT\r\n")
        assert reply()[0].startswith(b"221")
    assert received[0].rcpt_tos == ("bounces+a@news.example.police.uk",
                                    "bounces+b@news.example.police.uk")


def test_smtp_mode_receives_too(received: list[InboundMessage]) -> None:
    raw = crlf(corpus("arf_yahoo_rfc822.eml"))
    with Receiver(received.append, "127.0.0.1", 0, lmtp=False) as receiver, \
            smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.sendmail("feedback@arf.example.com", ["fbl@news.example.police.uk"], raw)
    assert received[0].raw == raw
    assert classify_inbound(received[0].raw, SECRET).kind is Kind.COMPLAINT


def test_a_failing_callback_makes_the_mta_keep_the_bounce() -> None:
    def broken(message: InboundMessage) -> None:
        raise RuntimeError("database down")

    with Receiver(broken, "127.0.0.1", 0) as receiver, \
            smtplib.LMTP("127.0.0.1", receiver.port) as client, \
            pytest.raises(smtplib.SMTPDataError) as caught:
        client.sendmail("", ["bounces@news.example.police.uk"], b"Subject: x\r\n\r\ny\r\n")
    assert caught.value.smtp_code == 451


def test_a_port_in_use_is_a_clear_error(lmtp: Receiver) -> None:
    with pytest.raises(MailerError, match="could not listen"):
        Receiver(lambda m: None, "127.0.0.1", lmtp.port).start()


# ---- mailbox readers ----

NAMES = ["postfix_5.1.1_user_unknown.eml", "arf_yahoo_rfc822.eml", "ooo_notes_subject_only.eml"]


def test_the_maildir_reader_yields_every_message_unchanged(tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "bounces", create=True)
    keys = {box.add(corpus(name)): name for name in NAMES[:2]}
    # One already seen by a mail client sits in cur/ rather than new/.
    seen = mailbox.MaildirMessage(corpus(NAMES[2]))
    seen.set_subdir("cur")
    keys[box.add(seen)] = NAMES[2]
    messages = list(open_source(str(tmp_path / "bounces")))
    assert sorted(m.raw for m in messages) == sorted(corpus(n) for n in NAMES)
    assert {m.origin.rsplit("#", 1)[1] for m in messages} == set(keys)
    assert len(list(box.iterkeys())) == 3  # nothing moved or removed


def test_the_maildir_reader_refuses_a_directory_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(MailerError, match="not a Maildir"):
        list(read_maildir(tmp_path))


def test_the_mbox_reader_yields_every_message(tmp_path: Path) -> None:
    path = tmp_path / "bounces.mbox"
    box = mailbox.mbox(path)
    for name in NAMES:
        box.add(corpus(name))
    box.flush()
    box.close()
    messages = list(open_source(f"mbox:{path}"))
    assert [classify_inbound(m.raw, SECRET).kind for m in messages] == [
        Kind.HARD, Kind.COMPLAINT, Kind.AUTO_REPLY]
    assert [m.origin for m in messages] == [f"mbox:{path}#{i}" for i in range(3)]
    first = next(iter(read_mbox(path)))
    assert first.raw.startswith(b"Return-Path: <>")  # the mbox From_ line is not part of it
    assert first.mail_from is None  # mailbox.mbox wrote "From MAILER-DAEMON": nothing known


def test_an_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MailerError, match="no such mailbox"):
        open_source(str(tmp_path / "absent"))


# ---- IMAP, against a real IMAP server (pymap, in process, on loopback) ----

@pytest.fixture
def imap_messages() -> list[bytes]:
    return [crlf(corpus(n)) for n in NAMES]


def test_the_imap_reader_fetches_every_message_and_changes_no_flag(
        imap_messages: list[bytes]) -> None:
    with ImapServer({"INBOX": imap_messages}) as server:
        messages = list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                                  tls="none", timeout=10))
        assert [m.raw for m in messages] == imap_messages
        assert [m.origin.rsplit(";", 1)[1] for m in messages] == [
            f"UID={uid}" for uid in _uids(server)]
        assert server.flags() == [frozenset()] * 3  # read-only: nothing marked \Seen
        # What the check above would catch: an ordinary reader marks every message seen.
        client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
        client.login(IMAP_USER, IMAP_PASSWORD)
        client.select("INBOX")
        client.fetch("1:*", "(BODY[])")
        client.logout()
        assert server.flags() == [frozenset({"\\Seen"})] * 3


def _uids(server: ImapServer) -> list[int]:
    client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    try:
        client.login(IMAP_USER, IMAP_PASSWORD)
        client.select("INBOX", readonly=True)
        return [int(u) for u in client.uid("SEARCH", None, "ALL")[1][0].split()]
    finally:
        client.logout()


def test_the_imap_reader_uses_starttls_and_checks_the_certificate(
        imap_messages: list[bytes], tls_files: TlsFiles) -> None:
    with ImapServer({"INBOX": imap_messages}, tls="starttls",
                    server_context=tls_files.server_context()) as server:
        trusted = ssl.create_default_context(cafile=str(tls_files.cert))
        messages = list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                                  tls="starttls", ssl_context=trusted, timeout=10))
        assert [m.raw for m in messages] == imap_messages
        # A certificate nobody vouches for is a clear error, not a traceback: so the
        # handshake did happen, and is checked.
        with pytest.raises(MailerError, match=r"could not connect.*certificate"):
            list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                           tls="starttls", timeout=10))


def test_the_imap_reader_speaks_imaps_to_a_folder_with_a_space(
        imap_messages: list[bytes], tls_files: TlsFiles) -> None:
    with ImapServer({"INBOX": [], "Bounce Reports": imap_messages[:2]}, tls="ssl",
                    server_context=tls_files.server_context()) as server:
        trusted = ssl.create_default_context(cafile=str(tls_files.cert))
        messages = list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                                  folder="Bounce Reports", ssl_context=trusted, timeout=10))
        assert [m.raw for m in messages] == imap_messages[:2]
        assert messages[0].origin.startswith("imap://127.0.0.1/Bounce Reports;UID=")
        assert list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                              ssl_context=trusted, timeout=10)) == []  # an empty INBOX
        with pytest.raises(MailerError, match=r"could not be opened|refused"):
            list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                           folder="No Such Folder", ssl_context=trusted, timeout=10))


def test_the_imap_reader_reports_a_refused_login(imap_messages: list[bytes]) -> None:
    with ImapServer({"INBOX": imap_messages}) as server, \
            pytest.raises(MailerError, match="refused"):
        list(read_imap("127.0.0.1", IMAP_USER, "wrong", port=server.port, tls="none",
                       timeout=10))


def test_since_reads_only_what_arrived_lately_from_each_kind_of_mailbox(
        tmp_path: Path, imap_messages: list[bytes]) -> None:
    old, new = datetime(2025, 1, 10, 12, 0, tzinfo=UTC), datetime.now(UTC)
    since = new - timedelta(days=30)
    # IMAP: SINCE on the day each message arrived in the folder.
    with ImapServer({"INBOX": [(imap_messages[0], old), (imap_messages[1], new)]}) as server:
        got = list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                             tls="none", timeout=10, since=since))
        assert [m.raw for m in got] == [imap_messages[1]]
        assert len(list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=server.port,
                                  tls="none", timeout=10))) == 2
    # Maildir: the file's mtime is when it was delivered.
    box = mailbox.Maildir(tmp_path / "md", create=True)
    stale = box.add(corpus(NAMES[0]))
    box.add(corpus(NAMES[1]))
    path = next((tmp_path / "md" / "new").glob(f"{stale}*"))
    os.utime(path, (old.timestamp(), old.timestamp()))
    assert [m.raw for m in read_maildir(tmp_path / "md", since=since)] == [corpus(NAMES[1])]
    assert len(list(read_maildir(tmp_path / "md"))) == 2
    # mbox: the date of each message's From line.
    mbox_path = tmp_path / "bounces.mbox"
    mb = mailbox.mbox(mbox_path)
    for raw, when in ((corpus(NAMES[0]), old), (corpus(NAMES[1]), new)):
        message = mailbox.mboxMessage(raw)
        message.set_from("MAILER-DAEMON", time.gmtime(when.timestamp()))
        mb.add(message)
    mb.flush()
    mb.close()
    assert [m.origin for m in read_mbox(mbox_path, since=since)] == [f"mbox:{mbox_path}#1"]
    assert len(list(open_source(str(mbox_path)))) == 2


def test_an_unknown_tls_mode_is_refused_before_connecting() -> None:
    with pytest.raises(MailerError, match="unknown tls mode 'tls'"):
        list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=1, tls="tls"))
    with pytest.raises(MailerError, match="unknown tls mode 'yes'"):
        list(open_source("imap://bounces@127.0.0.1:1/INBOX?tls=yes", "password"))


def test_an_imap_server_that_is_not_there_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MailerError, match="could not connect"):
        list(read_imap("127.0.0.1", IMAP_USER, IMAP_PASSWORD, port=port, tls="none",
                       timeout=10))


def test_an_imap_url_needs_a_password_and_a_numeric_port() -> None:
    with pytest.raises(MailerError, match="no IMAP password"):
        open_source("imaps://bounces@mail.example.police.uk/INBOX")
    with pytest.raises(MailerError, match="the port is not a number"):
        open_source("imaps://bounces@mail.example.police.uk:nine/INBOX", "password")


# ---- the command line ----

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("MAILER_") and not key.startswith("MAILER_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAILER_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET.decode())


@pytest.mark.usefixtures("cli_env")
def test_bounces_parse_prints_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    assert run(["bounces", "parse", str(CORPUS / "postfix_5.1.1_user_unknown.eml")]) == 0
    out = capsys.readouterr().out
    assert "hard" in out
    assert "anne.baker@example.org" in out
    assert "edition 7, subscriber 101" in out


@pytest.mark.usefixtures("cli_env")
def test_bounces_fetch_reads_a_maildir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       settings: object) -> None:
    # `settings` points the command at a migrated database of this test's own.
    from mailer.cli import run

    box = mailbox.Maildir(tmp_path / "md", create=True)
    box.add(corpus("gmail_4.2.2_over_quota_delay.eml"))
    assert run(["bounces", "fetch", f"maildir:{tmp_path / 'md'}"]) == 0
    out = capsys.readouterr().out
    assert "soft" in out and "1 message(s) read, 1 new" in out
    # Longer than the records are kept, a re-read could act on old bounces again: refused.
    assert run(["bounces", "fetch", "--since", "401", f"maildir:{tmp_path / 'md'}"]) == 1
    assert "longer than the 400 days" in capsys.readouterr().err
