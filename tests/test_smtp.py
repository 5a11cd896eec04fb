"""mailer.smtp over real SMTP on loopback, against the fault-injecting relay in smtp_servers."""
# The fixtures are imported by name, as pytest needs, and then appear as test arguments.
# ruff: noqa: F811, RUF100

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mailer.errors import ConfigError
from mailer.smtp import (
    Outcome,
    SendResult,
    SmtpPool,
    SmtpTarget,
    Tls,
    classify,
    deliver_once,
    parse_smtp_url,
)
from tests.smtp_servers import (
    TEST_PASSWORD,
    TEST_USER,
    FaultServer,
    RandomFaults,
    TlsFiles,
    fault_server,  # noqa: F401
    make_fault_server,  # noqa: F401
    ssl_server,  # noqa: F401
    starttls_server,  # noqa: F401
    tls_files,  # noqa: F401
)

FROM = "bounces@news.example.org"
MESSAGE = (b"From: MSHT <bulletin@news.example.org>\r\nTo: <x@example.org>\r\n"
           b"Subject: test\r\nMessage-ID: <1@news.example.org>\r\n\r\n"
           b".a line that starts with a dot\r\n.\r\n..\r\nthe end\r\n")
MakeServer = Callable[..., FaultServer]


def send_all(url: str, rcpts: list[str], *, size: int = 1, max_per_connection: int = 100,
             timeout: float = 5.0, data: bytes = MESSAGE,
             prepared: bool = False) -> tuple[list[SendResult], int]:
    """Send one message to each recipient concurrently; the results and sessions opened."""
    async def run() -> tuple[list[SendResult], int]:
        async with SmtpPool(url, size=size, max_per_connection=max_per_connection,
                            timeout=timeout) as pool:
            results = await asyncio.gather(*(pool.send(FROM, r, data, prepared=prepared)
                                             for r in rcpts))
            return list(results), pool.connections_opened
    return asyncio.run(run())


def send_each(url: str, rcpts: list[str], **options: object) -> list[SendResult]:
    """One after another on one pool, so the order of connection use is fixed."""
    async def run() -> list[SendResult]:
        async with SmtpPool(url, **options) as pool:  # type: ignore[arg-type]
            return [await pool.send(FROM, r, MESSAGE) for r in rcpts]
    return asyncio.run(run())


# ---- the URL ----

def test_url_with_login_and_starttls() -> None:
    target = parse_smtp_url("smtp://alice:s3cret@relay.example.org:2587?tls=starttls")
    assert target == SmtpTarget("relay.example.org", 2587, Tls.STARTTLS, "alice", "s3cret")


@pytest.mark.parametrize(("url", "tls", "port"), [
    ("smtp://relay.example.org?tls=starttls", Tls.STARTTLS, 587),
    ("smtp://relay.example.org?tls=ssl", Tls.SSL, 465),
    ("smtp://relay.example.org?tls=none", Tls.NONE, 25),
    ("smtps://relay.example.org", Tls.SSL, 465),
    ("smtp://relay.example.org", Tls.STARTTLS, 587),  # encrypted unless told otherwise
    ("smtp://relay.example.org:465", Tls.SSL, 465),
    ("smtp://127.0.0.1:8025?tls=none", Tls.NONE, 8025),  # the default MAILER_SMTP_URL
])
def test_url_defaults(url: str, tls: Tls, port: int) -> None:
    target = parse_smtp_url(url)
    assert (target.tls, target.port) == (tls, port)


def test_url_credentials_are_percent_decoded() -> None:
    target = parse_smtp_url("smtp://msht%40kent.police.uk:p%40ss%3Aw%2Frd%25@relay.example.org")
    assert target.username == "msht@kent.police.uk"
    assert target.password == "p@ss:w/rd%"


def test_target_never_shows_the_password() -> None:
    target = parse_smtp_url("smtp://alice:hunter2secret@relay.example.org")
    assert "hunter2secret" not in repr(target)
    assert "hunter2secret" not in target.display()
    assert target.display() == "smtp://alice:********@relay.example.org:587?tls=starttls"


@pytest.mark.parametrize(("url", "problem"), [
    ("http://alice:hunter2secret@relay.example.org", "scheme"),
    ("smtp://alice:hunter2secret@:25", "no host"),
    ("smtp://alice:hunter2secret@relay.example.org:99999", "port"),
    ("smtp://alice:hunter2secret@relay.example.org:abc", "port"),
    ("smtp://alice:hunter2secret@relay.example.org?tls=yes", "tls=yes"),
    ("smtp://alice:hunter2secret@relay.example.org?tsl=none", "unknown option tsl"),
    ("smtp://alice:hunter2secret@relay.example.org?tls=none", "unencrypted"),
    ("smtps://alice:hunter2secret@relay.example.org?tls=starttls", "implicit TLS"),
    ("smtp://alice@relay.example.org", "both a user name and a password"),
    ("smtp://alice:hunter2secret@relay.example.org/path", "path"),
    ("relay.example.org", "scheme"),
])
def test_bad_url_is_a_config_error_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_smtp_url(url)
    shown = f"{caught.value} {caught.value.hint}"
    assert problem in str(caught.value)
    assert "hunter2secret" not in shown


def test_a_login_without_tls_is_allowed_on_loopback_only() -> None:
    assert parse_smtp_url("smtp://a:b@127.0.0.1:25?tls=none").username == "a"
    assert parse_smtp_url("smtp://a:b@localhost:25?tls=none").username == "a"


# ---- classification of reply codes ----

@pytest.mark.parametrize(("code", "enhanced", "stage", "outcome"), [
    (250, "2.0.0", "end", Outcome.SENT),
    (421, "4.4.2", "rcpt", Outcome.RETRY),
    (450, "4.2.1", "rcpt", Outcome.RETRY),
    (451, "4.7.28", "mail", Outcome.RETRY),
    (452, "4.2.2", "rcpt", Outcome.RETRY),
    (421, None, "greeting", Outcome.RETRY),
    (550, "5.1.1", "rcpt", Outcome.BOUNCED),
    (550, None, "rcpt", Outcome.BOUNCED),
    (551, None, "rcpt", Outcome.BOUNCED),
    (553, "5.1.3", "rcpt", Outcome.BOUNCED),
    (550, "5.1.1", "end", Outcome.BOUNCED),  # relays that check the address after DATA
    (552, "5.2.2", "rcpt", Outcome.FAILED),
    (552, "5.3.4", "end", Outcome.FAILED),
    (554, "5.6.0", "end", Outcome.FAILED),
    (550, None, "end", Outcome.FAILED),  # content refused: the address is not to blame
    (554, None, "data", Outcome.FAILED),
    (550, "5.7.1", "rcpt", Outcome.HALT),
    (550, "5.7.515", "end", Outcome.HALT),
    (550, "5.7.26", "end", Outcome.HALT),
    (535, "5.7.8", "auth", Outcome.HALT),
    (530, "5.7.0", "mail", Outcome.HALT),
    (454, "4.7.0", "starttls", Outcome.HALT),
    (554, None, "greeting", Outcome.HALT),
    (550, "5.1.8", "mail", Outcome.HALT),  # our sender refused: never blame the recipients
    (553, None, "mail", Outcome.HALT),
    (552, None, "mail", Outcome.FAILED),
])
def test_classify(code: int, enhanced: str | None, stage: str, outcome: Outcome) -> None:
    assert classify(code, enhanced, stage) is outcome


@pytest.mark.parametrize(("code", "enhanced", "throttled"), [
    (421, "4.7.0", True), (451, "4.7.28", True), (421, "4.4.2", False), (450, "4.7.1", False),
    (451, None, False),
])
def test_throttling_is_visible(code: int, enhanced: str | None, throttled: bool) -> None:
    result = SendResult(Outcome.RETRY, code, enhanced, "", "rcpt")
    assert result.throttled is throttled


# ---- each fault over the wire, with and without PIPELINING ----

@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
@pytest.mark.parametrize(("local", "outcome", "code", "enhanced", "stage"), [
    ("ok", Outcome.SENT, 250, "2.0.0", "end"),
    ("shutting-down", Outcome.RETRY, 421, "4.4.2", "rcpt"),
    ("mailbox-busy", Outcome.RETRY, 450, "4.2.1", "rcpt"),
    ("service-unavailable", Outcome.RETRY, 451, "4.3.0", "rcpt"),
    ("insufficient-storage", Outcome.RETRY, 452, "4.2.2", "rcpt"),
    ("gone", Outcome.BOUNCED, 550, "5.1.1", "rcpt"),
    ("no-such-user", Outcome.BOUNCED, 550, None, "rcpt"),
    ("relay-denied", Outcome.BOUNCED, 553, None, "rcpt"),
    ("policy", Outcome.HALT, 550, "5.7.1", "rcpt"),
    ("too-much-mail-data", Outcome.FAILED, 552, "5.3.4", "end"),
    ("rejected", Outcome.FAILED, 554, "5.6.0", "end"),
])
def test_each_reply_is_classified_per_recipient(
        make_fault_server: MakeServer, pipelining: bool, local: str, outcome: Outcome,
        code: int, enhanced: str | None, stage: str) -> None:
    server = make_fault_server(pipelining=pipelining)
    rcpt = f"{local}@example.org"
    [result], _ = send_all(server.url(), [rcpt])
    assert (result.outcome, result.code, result.enhanced, result.stage) == (
        outcome, code, enhanced, stage)
    assert server.handler.copies(rcpt) == (1 if outcome is Outcome.SENT else 0)


def test_the_message_arrives_byte_for_byte_after_dot_stuffing(fault_server: FaultServer) -> None:
    [result], _ = send_all(fault_server.url(), ["ok@example.org"])
    assert result.outcome is Outcome.SENT
    assert fault_server.handler.messages("ok@example.org") == [MESSAGE]
    assert fault_server.handler.envelopes() == [(FROM, "ok@example.org")]


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_final_dot_waits_for_the_record_and_a_failed_record_sends_nothing(
        make_fault_server: MakeServer, pipelining: bool) -> None:
    """The worker's crash accounting (docs/design.md, crash policy) rests on this: nothing
    can arrive before `before_dot` has finished, and if it fails nothing arrives at all."""
    server = make_fault_server(pipelining=pipelining)
    seen_at_record: list[int] = []

    async def run() -> tuple[SendResult, SendResult, SendResult, int]:
        async with SmtpPool(server.url(), size=1) as pool:
            async def record() -> None:
                await asyncio.sleep(0)  # let the envelope go out first
                seen_at_record.append(server.handler.accepted())

            sent = await pool.send(FROM, "ok@example.org", MESSAGE, before_dot=record)

            async def broken() -> None:
                raise OSError("the database is gone")
            kept_back = await pool.send(FROM, "kept-back@example.org", MESSAGE,
                                        before_dot=broken)
            after = await pool.send(FROM, "after@example.org", MESSAGE)
            return sent, kept_back, after, pool.connections_opened

    sent, kept_back, after, sessions = asyncio.run(run())
    assert sent.outcome is Outcome.SENT and seen_at_record == [0]
    assert server.handler.copies("ok@example.org") == 1
    # Not sent, and a plain retry: nothing can have arrived.
    assert (kept_back.outcome, kept_back.stage, kept_back.code) == (Outcome.RETRY, "data", None)
    assert "the database is gone" in kept_back.reply
    assert server.handler.copies("kept-back@example.org") == 0
    # The abandoned session is not reused mid-DATA: the next message goes on a new one.
    assert after.outcome is Outcome.SENT and sessions == 2


def test_a_prepared_message_goes_as_it_stands_and_arrives_byte_for_byte(
        fault_server: FaultServer) -> None:
    # What build_message writes: CRLF only, no line starting with a dot (QP writes =2E).
    prepared = MESSAGE.replace(b"\r\n.", b"\r\n=2E")
    [result], _ = send_all(fault_server.url(), ["ok@example.org"], data=prepared,
                           prepared=True)
    assert result.outcome is Outcome.SENT
    assert fault_server.handler.messages("ok@example.org") == [prepared]


def test_bare_line_feeds_are_sent_as_crlf(fault_server: FaultServer) -> None:
    [result], _ = send_all(fault_server.url(), ["ok@example.org"],
                           data=b"Subject: lf\n\n.dot\nend")
    assert result.outcome is Outcome.SENT
    assert fault_server.handler.messages("ok@example.org") == [
        b"Subject: lf\r\n\r\n.dot\r\nend\r\n"]


# ---- sessions: reuse, cap, RSET, reconnect ----

def test_one_connection_serves_many_messages(fault_server: FaultServer) -> None:
    rcpts = [f"r{i}@example.org" for i in range(20)]
    results, opened = send_all(fault_server.url(), rcpts, size=1)
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert opened == 1
    assert fault_server.handler.connections == 1


def test_the_pool_never_opens_more_than_its_size(fault_server: FaultServer) -> None:
    rcpts = [f"r{i}@example.org" for i in range(40)]
    results, opened = send_all(fault_server.url(), rcpts, size=4)
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert 1 <= fault_server.handler.connections == opened <= 4
    assert all(fault_server.handler.copies(r) == 1 for r in rcpts)


def test_messages_per_connection_are_capped(fault_server: FaultServer) -> None:
    rcpts = [f"r{i}@example.org" for i in range(10)]
    results = send_each(fault_server.url(), rcpts, size=1, max_per_connection=3)
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert fault_server.handler.connections == 4  # 3 + 3 + 3 + 1


def test_a_refusal_is_reset_and_the_session_goes_on(fault_server: FaultServer) -> None:
    rcpts = ["a@example.org", "gone@example.org", "b@example.org", "mailbox-busy@example.org",
             "rejected@example.org", "c@example.org"]
    results = send_each(fault_server.url(), rcpts, size=1)
    assert [r.outcome for r in results] == [
        Outcome.SENT, Outcome.BOUNCED, Outcome.SENT, Outcome.RETRY, Outcome.FAILED, Outcome.SENT]
    assert fault_server.handler.connections == 1
    assert [fault_server.handler.copies(r) for r in rcpts] == [1, 0, 1, 0, 0, 1]


def test_a_silent_close_after_n_messages_reconnects_transparently(
        make_fault_server: MakeServer) -> None:
    server = make_fault_server(close_after=2)
    rcpts = [f"r{i}@example.org" for i in range(5)]
    results = send_each(server.url(), rcpts, size=1)
    assert [r.outcome for r in results] == [Outcome.SENT] * 5
    assert server.handler.connections == 3
    assert [server.handler.copies(r) for r in rcpts] == [1] * 5


def test_after_a_421_the_next_message_gets_a_new_connection(fault_server: FaultServer) -> None:
    results = send_each(fault_server.url(), ["shutting-down@example.org", "ok@example.org"],
                        size=1)
    assert [r.outcome for r in results] == [Outcome.RETRY, Outcome.SENT]
    assert not results[0].throttled
    assert fault_server.handler.connections == 2


def test_a_421_greeting_is_retry_and_the_next_connection_works(
        make_fault_server: MakeServer) -> None:
    server = make_fault_server(greeting_failures=1)
    results = send_each(server.url(), ["a@example.org", "b@example.org"], size=1)
    assert (results[0].outcome, results[0].code, results[0].stage) == (
        Outcome.RETRY, 421, "greeting")
    assert results[1].outcome is Outcome.SENT
    assert server.handler.copies("a@example.org") == 0


def test_a_refused_connection_is_retry() -> None:
    server = FaultServer().start()
    url = server.url()
    server.stop()  # nothing listens on that port any more
    result = deliver_once(url, FROM, "a@example.org", MESSAGE, timeout=2)
    assert (result.outcome, result.code, result.stage) == (Outcome.RETRY, None, "connect")


def test_one_recipient_never_changes_another_ones_result(make_fault_server: MakeServer) -> None:
    """A seeded mix of every fault over 4 sessions: each result is what its address planned."""
    schedule = RandomFaults(seed=20241018, mix={
        "shutting-down": 0.05, "mailbox-busy": 0.05, "service-unavailable": 0.05,
        "insufficient-storage": 0.05, "gone": 0.05, "no-such-user": 0.05,
        "too-much-mail-data": 0.05, "rejected": 0.05, "drop-after-data": 0.02})
    server = make_fault_server(schedule=schedule, keywords=False)
    rcpts = [f"reader{i:03d}@example.org" for i in range(200)]
    results, _ = send_all(server.url(), rcpts, size=4, timeout=5)
    expected = {None: Outcome.SENT, "drop-after-data": Outcome.UNKNOWN,
                "gone": Outcome.BOUNCED, "no-such-user": Outcome.BOUNCED,
                "too-much-mail-data": Outcome.FAILED, "rejected": Outcome.FAILED}
    planned = [schedule.planned(r) for r in rcpts]
    assert len(set(planned)) >= 8  # the seed really mixes the faults
    assert [r.outcome for r in results] == [expected.get(p, Outcome.RETRY) for p in planned]
    kept = {None, "drop-after-data"}  # what the relay holds a copy of
    assert [server.handler.copies(r) for r in rcpts] == [int(p in kept) for p in planned]


# ---- throttling ----

def test_throttling_after_k_messages_a_minute_is_visible(make_fault_server: MakeServer) -> None:
    server = make_fault_server(throttle_per_minute=3)
    results = send_each(server.url(), [f"r{i}@example.org" for i in range(5)], size=1)
    assert [r.outcome for r in results] == [Outcome.SENT] * 3 + [Outcome.RETRY] * 2
    assert [r.throttled for r in results] == [False] * 3 + [True] * 2
    assert (results[3].code, results[3].enhanced, results[3].stage) == (451, "4.7.28", "mail")
    assert server.handler.accepted() == 3


def test_a_421_throttle_closes_and_is_visible(make_fault_server: MakeServer) -> None:
    server = make_fault_server(throttle_per_minute=1,
                               throttle_reply="421 4.7.0 Too many messages, come back later")
    results = send_each(server.url(), ["a@example.org", "b@example.org", "c@example.org"],
                        size=1)
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.RETRY, Outcome.RETRY]
    assert results[1].throttled and results[2].throttled
    assert server.handler.connections == 2  # the 421 ended the first session


# ---- no reply after the final dot: may have been delivered ----

def test_a_drop_after_the_final_dot_is_unknown_and_the_relay_has_it(
        fault_server: FaultServer) -> None:
    results = send_each(fault_server.url(), ["drop-after-data@example.org", "ok@example.org"],
                        size=1)
    assert (results[0].outcome, results[0].code, results[0].stage) == (
        Outcome.UNKNOWN, None, "end")
    assert fault_server.handler.copies("drop-after-data@example.org") == 1
    assert results[1].outcome is Outcome.SENT  # a fresh session carried on


def test_a_stall_past_the_timeout_is_unknown_and_the_relay_has_it(
        fault_server: FaultServer) -> None:
    results = send_each(fault_server.url(), ["stall@example.org", "ok@example.org"], size=1,
                        timeout=0.5)
    assert (results[0].outcome, results[0].stage) == (Outcome.UNKNOWN, "end")
    assert "may have been delivered" in results[0].reply
    assert fault_server.handler.wait_until(lambda h: h.copies("stall@example.org") == 1)
    assert results[1].outcome is Outcome.SENT
    assert fault_server.handler.connections == 2


# ---- halting faults: nothing accepted, nothing blamed on the recipient ----

@pytest.mark.parametrize("reply", [
    "550 5.7.1 Client does not have permissions to send as this sender",
    "550 5.7.515 Access denied, sending domain does not meet the required authentication level",
    "530 5.7.0 Authentication required",
    "553 5.1.8 Sender address rejected: domain not found",
])
def test_a_refused_sender_halts(make_fault_server: MakeServer, reply: str) -> None:
    server = make_fault_server(mail_reply=reply)
    results, _ = send_all(server.url(), ["a@example.org", "b@example.org"], size=1)
    assert [r.outcome for r in results] == [Outcome.HALT, Outcome.HALT]
    assert results[0].code == int(reply[:3])
    assert server.handler.accepted() == 0


def test_starttls_and_auth_plain(starttls_server: FaultServer) -> None:
    result = deliver_once(starttls_server.login_url(), FROM, "ok@example.org", MESSAGE, timeout=5)
    assert result.outcome is Outcome.SENT
    assert starttls_server.handler.logins == [f"PLAIN:{TEST_USER}"]
    assert starttls_server.handler.copies("ok@example.org") == 1


def test_auth_login_when_plain_is_not_offered(make_fault_server: MakeServer,
                                              tls_files: TlsFiles) -> None:
    server = make_fault_server(tls="starttls", tls_files=tls_files, auth=True,
                               smtp_options={"auth_exclude_mechanism": ["PLAIN"]})
    result = deliver_once(server.login_url(), FROM, "ok@example.org", MESSAGE, timeout=5)
    assert result.outcome is Outcome.SENT
    assert server.handler.logins == [f"LOGIN:{TEST_USER}"]


def test_implicit_tls_and_auth(ssl_server: FaultServer) -> None:
    result = deliver_once(ssl_server.login_url(), FROM, "ok@example.org", MESSAGE, timeout=5)
    assert result.outcome is Outcome.SENT
    assert ssl_server.handler.copies("ok@example.org") == 1


def test_a_wrong_password_halts_and_is_not_echoed(starttls_server: FaultServer) -> None:
    url = starttls_server.url(TEST_USER, "wrong-password-xyz")
    result = deliver_once(url, FROM, "ok@example.org", MESSAGE, timeout=5)
    assert (result.outcome, result.code, result.stage) == (Outcome.HALT, 535, "auth")
    assert "wrong-password-xyz" not in result.reply and TEST_PASSWORD not in result.reply
    assert starttls_server.handler.accepted() == 0


def test_an_untrusted_certificate_halts(starttls_server: FaultServer) -> None:
    result = deliver_once(starttls_server.login_url(trust=False), FROM, "ok@example.org",
                          MESSAGE, timeout=5)
    assert (result.outcome, result.code, result.stage) == (Outcome.HALT, None, "starttls")
    assert "certificate" in result.reply
    assert starttls_server.handler.accepted() == 0


def test_starttls_not_offered_halts(fault_server: FaultServer) -> None:
    result = deliver_once(fault_server.url(tls="starttls"), FROM, "ok@example.org", MESSAGE,
                          timeout=5)
    assert (result.outcome, result.stage) == (Outcome.HALT, "starttls")
    assert fault_server.handler.accepted() == 0


def test_454_tls_not_available_halts(make_fault_server: MakeServer, tls_files: TlsFiles) -> None:
    server = make_fault_server(advertise_starttls=True)  # offers STARTTLS, then cannot do it
    url = server.url(tls="starttls").replace("tls=starttls",
                                             f"tls=starttls&cafile={tls_files.cert}")
    result = deliver_once(url, FROM, "ok@example.org", MESSAGE, timeout=5)
    assert (result.outcome, result.code, result.stage) == (Outcome.HALT, 454, "starttls")
    assert server.handler.accepted() == 0


def test_implicit_tls_against_a_plain_server_halts(fault_server: FaultServer,
                                                   tls_files: TlsFiles) -> None:
    url = f"smtp://127.0.0.1:{fault_server.port}?tls=ssl&cafile={tls_files.cert}"
    result = deliver_once(url, FROM, "ok@example.org", MESSAGE, timeout=5)
    assert (result.outcome, result.stage) == (Outcome.HALT, "connect")
    assert fault_server.handler.accepted() == 0


# ---- the envelope and the sync wrapper ----

@pytest.mark.parametrize("rcpt", ["a@example.org\r\nRCPT TO:<b@example.org>", "<a@example.org>",
                                  "a b@example.org"])
def test_an_unsafe_envelope_address_is_refused_locally(fault_server: FaultServer,
                                                       rcpt: str) -> None:
    result = deliver_once(fault_server.url(), FROM, rcpt, MESSAGE, timeout=5)
    assert result.outcome is Outcome.FAILED
    assert fault_server.handler.connections == 0


def test_deliver_once_works_inside_a_running_event_loop(fault_server: FaultServer) -> None:
    async def caller() -> SendResult:
        return deliver_once(fault_server.url(), FROM, "ok@example.org", MESSAGE, timeout=5)

    assert asyncio.run(caller()).outcome is Outcome.SENT
    assert fault_server.handler.copies("ok@example.org") == 1


def test_deliver_once_rejects_a_bad_url_with_config_error() -> None:
    with pytest.raises(ConfigError):
        deliver_once("smtp://:25", FROM, "ok@example.org", MESSAGE)


def test_a_send_that_cannot_start_by_its_deadline_sends_nothing(fault_server: FaultServer) -> None:
    # The worker's claim on a row lapses at a deadline: past it the row may be another's.
    from mailer.smtp import NOT_STARTED

    async def run() -> list[SendResult]:
        async with SmtpPool(fault_server.url(), size=1) as pool:
            now = asyncio.get_running_loop().time()
            return [await pool.send(FROM, "late@example.org", MESSAGE, start_by=now - 1),
                    await pool.send(FROM, "ok@example.org", MESSAGE, start_by=now + 60)]
    late, ok = asyncio.run(run())
    assert (late.stage, late.outcome, ok.outcome) == (NOT_STARTED, Outcome.RETRY, Outcome.SENT)
    assert fault_server.handler.copies("late@example.org") == 0
    assert fault_server.handler.copies("ok@example.org") == 1
