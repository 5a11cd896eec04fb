"""A fault-injecting SMTP relay for tests: aiosmtpd, in-process, on 127.0.0.1, random free port.

What it answers is chosen per recipient, like digipost/smtp-test-server-node: the local part
before any `+` is a keyword from `FAULTS` (`gone+7@example.org` -> 550 5.1.1), or a seeded
`RandomFaults` schedule picks one per address. Server-wide options add a 421 greeting, a refused
sender (`mail_reply`, e.g. 550 5.7.x for everyone), a silent close after N messages on a
connection, throttling after K messages a minute, PIPELINING, STARTTLS or implicit TLS with a
self-signed certificate, and AUTH with one test user.

It keeps every accepted message per recipient (`copies()`, to count duplicates) and counts
connections. Accepted means the final dot was read and the message kept, which is also true for
the `drop-after-data` and `stall` faults: the real-world case where a client sees no reply yet
the relay has the message (standards.md §0 finding 5).

Use the fixtures by importing them explicitly: `from tests.smtp_servers import fault_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOSTNAME = "fault.test"  # given to aiosmtpd: its default does a slow getfqdn per connection
TEST_USER = "relay-user"
TEST_PASSWORD = "p@ss:wo/rd%1"  # every character that must be percent-encoded in a URL

# aiosmtpd warns on every login that Session.login_data is deprecated: noise, not news.
logging.getLogger("mail.log").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Fault:
    """What the server does for one recipient.

    stage: `rcpt` answers RCPT TO; `data` acts after the final dot. action: `reply` sends
    `reply` (and closes the connection when `close`); `drop` keeps the message and closes with no
    reply; `stall` keeps the message and answers only after `FaultHandler.stall_seconds`.
    """

    stage: str
    reply: str = ""
    action: str = "reply"
    close: bool = False

    @property
    def transient(self) -> bool:
        return self.action != "reply" or self.reply.startswith("4")


FAULTS: dict[str, Fault] = {
    "shutting-down": Fault("rcpt", "421 4.4.2 Service shutting down", close=True),
    "mailbox-busy": Fault("rcpt", "450 4.2.1 Mailbox busy, try again later"),
    "service-unavailable": Fault("rcpt", "451 4.3.0 Local error in processing"),
    "insufficient-storage": Fault("rcpt", "452 4.2.2 Insufficient system storage"),
    "slow-down": Fault("rcpt", "451 4.7.28 Rate limited, please try again later"),
    "busy-closing": Fault("rcpt", "421 4.7.0 Too many messages, closing", close=True),
    "gone": Fault("rcpt", "550 5.1.1 The email account does not exist"),
    "no-such-user": Fault("rcpt", "550 No such user here"),  # no enhanced code
    "relay-denied": Fault("rcpt", "553 Requested action not taken: mailbox name not allowed"),
    "policy": Fault("rcpt", "550 5.7.1 Sender not authorised for this recipient"),
    "too-much-mail-data": Fault("data", "552 5.3.4 Message size exceeds fixed limit"),
    "rejected": Fault("data", "554 5.6.0 Message content rejected"),
    "drop-after-data": Fault("data", action="drop"),
    "stall": Fault("data", action="stall"),
}

# A mix for "random fault" runs: every kind of fault a delivery must survive, but no 5.7.x
# (that halts the whole send by design, so it gets its own tests).
DEFAULT_MIX: dict[str, float] = {
    "shutting-down": 0.02, "mailbox-busy": 0.05, "service-unavailable": 0.03,
    "insufficient-storage": 0.02, "gone": 0.04, "no-such-user": 0.01,
    "too-much-mail-data": 0.01, "rejected": 0.01, "drop-after-data": 0.01, "stall": 0.01,
}


@dataclass(frozen=True)
class RandomFaults:
    """A seeded schedule: each address draws one fault (or none) from `mix`, the same every run.

    Transient faults (4xx, drop, stall) hold for the first `transient_attempts` attempts at that
    address and then clear, so a retrying sender eventually gets through; permanent ones hold.
    """

    seed: int
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    transient_attempts: int = 1

    def planned(self, rcpt: str) -> str | None:
        draw = random.Random(f"{self.seed}:{rcpt.lower()}").random()
        total = 0.0
        for keyword in sorted(self.mix):
            total += self.mix[keyword]
            if draw < total:
                return keyword
        return None

    def fault_for(self, rcpt: str, attempt: int) -> Fault | None:
        keyword = self.planned(rcpt)
        if keyword is None:
            return None
        fault = FAULTS[keyword]
        if fault.transient and attempt > self.transient_attempts:
            return None
        return fault


class FaultHandler:
    """aiosmtpd handler; runs on the server's thread, read by tests through the lock."""

    def __init__(self, *, schedule: RandomFaults | None = None, keywords: bool = True,
                 pipelining: bool = True, mail_reply: str | None = None,
                 greeting_failures: int = 0,
                 greeting_reply: str = "421 4.3.2 Service not available, try later",
                 close_after: int | None = None, throttle_per_minute: int | None = None,
                 throttle_reply: str = "451 4.7.28 Too many messages this minute",
                 stall_seconds: float = 5.0, advertise_starttls: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.schedule = schedule
        self.keywords = keywords
        self.pipelining = pipelining
        self.mail_reply = mail_reply
        self.initial_greeting_failures = greeting_failures
        self.greeting_failures = greeting_failures
        self.greeting_reply = greeting_reply
        self.close_after = close_after
        self.throttle_per_minute = throttle_per_minute
        self.throttle_reply = throttle_reply
        self.stall_seconds = stall_seconds
        self.clock = clock  # the throttle's minutes (a test can share the worker's clock)
        self.throttled = 0  # throttle replies given
        self.advertise_starttls = advertise_starttls  # offer STARTTLS without having TLS
        self.release = asyncio.Event()  # set (on the server loop) to end stalls early
        self._lock = threading.Condition()
        self._received: dict[str, list[bytes]] = defaultdict(list)
        self._envelopes: list[tuple[str, str]] = []
        self._attempts: Counter[str] = Counter()
        self._accepted_at: deque[float] = deque()
        self.connections = 0
        self.logins: list[str] = []

    # -- what tests read --

    def reset(self) -> None:
        with self._lock:
            self._received.clear()
            self._envelopes.clear()
            self._attempts.clear()
            self._accepted_at.clear()
            self.connections = 0
            self.logins.clear()
            self.greeting_failures = self.initial_greeting_failures

    def copies(self, rcpt: str) -> int:
        with self._lock:
            return len(self._received.get(rcpt, ()))

    def messages(self, rcpt: str) -> list[bytes]:
        with self._lock:
            return list(self._received.get(rcpt, ()))

    def accepted(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._received.values())

    def envelopes(self) -> list[tuple[str, str]]:
        """(mail_from, rcpt) of every accepted message, in order."""
        with self._lock:
            return list(self._envelopes)

    def attempts(self, rcpt: str) -> int:
        with self._lock:
            return self._attempts[rcpt]

    def wait_until(self, predicate: Callable[[FaultHandler], bool], timeout: float = 5.0) -> bool:
        """Wait (bounded) for the server thread to reach a state, e.g. a message kept."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    # -- aiosmtpd hooks --

    def _fault(self, rcpt: str, attempt: int) -> Fault | None:
        if self.keywords:
            keyword = rcpt.partition("@")[0].partition("+")[0].lower()
            if keyword in FAULTS:
                fault = FAULTS[keyword]
                if self.schedule is None or not fault.transient:
                    return fault
                return fault if attempt <= self.schedule.transient_attempts else None
        if self.schedule is not None:
            return self.schedule.fault_for(rcpt, attempt)
        return None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = []
        if self.pipelining:
            extra.append("250-PIPELINING")
        if self.advertise_starttls:
            extra.append("250-STARTTLS")
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.mail_reply is not None:
            return self.mail_reply
        if self.throttle_per_minute is not None:
            with self._lock:
                now = self.clock()
                while self._accepted_at and now - self._accepted_at[0] > 60:
                    self._accepted_at.popleft()
                over = len(self._accepted_at) >= self.throttle_per_minute
                self.throttled += over
            if over:
                if self.throttle_reply.startswith("421"):
                    self._close_soon(server)
                return self.throttle_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        with self._lock:
            self._attempts[address] += 1
            attempt = self._attempts[address]
        fault = self._fault(address, attempt)
        if fault is not None and fault.stage == "rcpt":
            if fault.close:
                self._close_soon(server)
            return fault.reply
        if envelope.rcpt_tos:
            return "452 4.5.3 One recipient per message, please"
        envelope.fault = fault  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fault: Fault | None = getattr(envelope, "fault", None)
        if fault is not None and fault.action == "reply":
            return fault.reply
        content = envelope.original_content or b""
        with self._lock:
            for rcpt in envelope.rcpt_tos:
                self._received[rcpt].append(content)
                self._envelopes.append((envelope.mail_from or "", rcpt))
            self._accepted_at.append(self.clock())
            count = self.accepted()
            self._lock.notify_all()
        session.messages = getattr(session, "messages", 0) + 1  # type: ignore[attr-defined]
        if fault is not None and fault.action == "drop":
            assert server.transport is not None
            server.transport.close()
            # Closing cancels this coroutine (connection_lost), so no reply is ever written.
            await asyncio.wait_for(asyncio.Event().wait(), 30)
        if fault is not None and fault.action == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.stall_seconds)
        if self.close_after is not None and session.messages >= self.close_after:  # type: ignore[attr-defined]
            self._close_soon(server)  # silently, after this reply: the Yahoo behaviour
        return f"250 2.0.0 OK queued as {count}"

    @staticmethod
    def _close_soon(server: SMTP) -> None:
        # After the reply now being returned has been written: close() flushes first.
        transport = server.transport
        if transport is not None:
            server.loop.call_soon(transport.close)

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == TEST_USER.encode()
              and auth_data.password == TEST_PASSWORD.encode())
        if ok:
            with self._lock:
                self.logins.append(f"{mechanism}:{TEST_USER}")
        return AuthResult(success=ok, handled=False)


class _FaultSMTP(SMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # a new connection, not the STARTTLS upgrade
            handler: FaultHandler = self.event_handler
            with handler._lock:
                handler.connections += 1
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        handler: FaultHandler = self.event_handler
        with handler._lock:
            refuse = handler.greeting_failures > 0
            if refuse:
                handler.greeting_failures -= 1
        if refuse:
            await self.push(handler.greeting_reply)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()


class _Controller(Controller):
    implicit_tls = False

    def factory(self) -> SMTP:
        server = _FaultSMTP(self.handler, **self.SMTP_kwargs)
        if self.implicit_tls:
            # aiosmtpd only counts STARTTLS as TLS and would refuse AUTH on an implicit-TLS
            # session; saying auth_require_tls=False instead makes it warn on every connection.
            server._auth_require_tls = False
        return server

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the real port before aiosmtpd's start-up probe connects.
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_tls_files(directory: Path) -> TlsFiles:
    """A self-signed certificate for localhost and 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return TlsFiles(cert, key)


class FaultServer:
    """The relay: `start()`, `stop()` (or `with`), then `url()` for the client under test.

    tls: `none`, `starttls` (required before MAIL) or `ssl` (implicit). auth: require AUTH as
    TEST_USER / TEST_PASSWORD (aiosmtpd only offers it over TLS).
    """

    def __init__(self, *, tls: str = "none", tls_files: TlsFiles | None = None,
                 auth: bool = False, smtp_options: dict[str, Any] | None = None,
                 **handler_options: Any) -> None:
        if tls != "none" and tls_files is None:
            raise ValueError("TLS needs tls_files")
        self.tls = tls
        self.tls_files = tls_files
        self.handler = FaultHandler(**handler_options)
        kwargs: dict[str, Any] = {"server_hostname": HOSTNAME}
        if tls == "starttls":
            assert tls_files is not None
            kwargs.update(tls_context=tls_files.server_context(), require_starttls=True)
        elif tls == "ssl":
            assert tls_files is not None
            kwargs["ssl_context"] = tls_files.server_context()
        if auth:
            kwargs.update(authenticator=self.handler.authenticate, auth_required=True)
        kwargs.update(smtp_options or {})
        self._controller = _Controller(self.handler, hostname="127.0.0.1", port=0, **kwargs)
        self._controller.implicit_tls = tls == "ssl"
        self.port = 0

    def start(self) -> FaultServer:
        self._controller.start()
        self.port = self._controller.port
        self.handler.reset()  # forget aiosmtpd's own start-up probe connection
        return self

    def stop(self) -> None:
        loop = self._controller.loop
        loop.call_soon_threadsafe(self.handler.release.set)
        self._controller.stop()

    def release_stalls(self) -> None:
        self._controller.loop.call_soon_threadsafe(self.handler.release.set)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, user: str | None = None, password: str | None = None,
            tls: str | None = None, trust: bool = True) -> str:
        """An smtp:// URL for this server; `trust` adds cafile= for the self-signed cert."""
        from urllib.parse import quote

        creds = ""
        if user is not None:
            creds = f"{quote(user, safe='')}:{quote(password or '', safe='')}@"
        mode = tls or self.tls
        query = f"tls={mode}"
        if trust and mode != "none" and self.tls_files is not None:
            query += f"&cafile={quote(str(self.tls_files.cert))}"
        return f"smtp://{creds}127.0.0.1:{self.port}?{query}"

    def login_url(self, **kwargs: Any) -> str:
        return self.url(TEST_USER, TEST_PASSWORD, **kwargs)


# ---- fixtures (import them explicitly into the test module) ----

@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def make_fault_server() -> Iterator[Callable[..., FaultServer]]:
    """A factory: `make_fault_server(close_after=3)` returns a started server, stopped after."""
    servers: list[FaultServer] = []

    def make(**options: Any) -> FaultServer:
        server = FaultServer(**options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fault_server(make_fault_server: Callable[..., FaultServer]) -> FaultServer:
    """Plain SMTP with PIPELINING and the keyword faults."""
    return make_fault_server()


@pytest.fixture
def starttls_server(make_fault_server: Callable[..., FaultServer],
                    tls_files: TlsFiles) -> FaultServer:
    """STARTTLS required, then AUTH required (TEST_USER / TEST_PASSWORD)."""
    return make_fault_server(tls="starttls", tls_files=tls_files, auth=True)


@pytest.fixture
def ssl_server(make_fault_server: Callable[..., FaultServer], tls_files: TlsFiles) -> FaultServer:
    """Implicit TLS, then AUTH required."""
    return make_fault_server(tls="ssl", tls_files=tls_files, auth=True)


# ---- a fast counting sink, for volume tests ----

class FastSink:
    """A minimal SMTP sink for sends of tens of thousands: plain asyncio protocol code, no
    aiosmtpd (which tops out near 300 messages/s here), PIPELINING, one recipient per message.
    It counts what it accepted per recipient (`copies`, `total`); `hold()` stops answering new
    transactions (MAIL FROM waits for ever) while a message already in DATA is still accepted,
    so a test can freeze the relay at a known point."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Condition()
        self._holding = False
        self._receiving = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> FastSink:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(lambda: _SinkProtocol(self), "127.0.0.1", 0), self._loop)
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?tls=none"

    def hold(self) -> None:
        with self._lock:
            self._holding = True

    @property
    def holding(self) -> bool:
        with self._lock:
            return self._holding

    def copies(self, rcpt: str) -> int:
        with self._lock:
            return self._counts[rcpt]

    def receiving(self) -> int:
        """Transactions begun (MAIL accepted) and not ended: each may still be accepted, even
        while held, so a held sink is settled only when this is 0."""
        with self._lock:
            return self._receiving

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def _accept(self, rcpt: str | None) -> None:
        with self._lock:
            self._receiving -= 1
            if rcpt is not None:
                self._counts[rcpt] += 1
            self._lock.notify_all()

    def _begin(self) -> None:
        with self._lock:
            self._receiving += 1


class _SinkProtocol(asyncio.Protocol):
    END = b"\r\n.\r\n"

    def __init__(self, sink: FastSink) -> None:
        self.sink = sink
        self.buffer = bytearray()
        self.in_data = False
        self.scanned = 0  # how much of the buffer is known to hold no end of message
        self.open = False  # a transaction is under way (MAIL accepted, not yet ended)
        self.rcpt: str | None = None
        self.stalled = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.test ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()  # cut off mid-transaction: not accepted

    def _end(self) -> None:
        if self.open:
            self.open = self.in_data = False
            with self.sink._lock:
                self.sink._receiving -= 1

    def data_received(self, data: bytes) -> None:
        # A message is ~63 KB in many reads: look for its end only in what is new (and the
        # four bytes before it), not from the start again on every read.
        self.buffer += data
        if self.stalled:
            return
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(self.END, max(0, self.scanned - 4))
                if end < 0:
                    self.scanned = len(self.buffer)
                    break
                del self.buffer[:end + len(self.END)]
                self.scanned = 0
                self.in_data = self.open = False
                self.sink._accept(self.rcpt)
                self.rcpt = None
                out.append(b"250 2.0.0 OK\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line = bytes(self.buffer[:end])
            verb = line[:4].upper()
            if verb == b"MAIL" and self.sink.holding:
                self.stalled = True  # the relay froze: this and what follows go unanswered
                break
            del self.buffer[:end + 2]
            if verb in (b"EHLO", b"HELO"):
                out.append(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.rcpt = None
                if not self.open:
                    self.open = True
                    self.sink._begin()
                out.append(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                address = line.split(b":", 1)[1].strip().split(b" ", 1)[0]
                self.rcpt = address.strip(b"<>").decode()
                out.append(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.scanned = 0
                out.append(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 bye\r\n")
                assert self.transport is not None
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:  # RSET, NOOP and the rest
                if verb == b"RSET":
                    self._end()
                out.append(b"250 2.0.0 OK\r\n")
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))


@pytest.fixture
def fast_sink() -> Iterator[FastSink]:
    sink = FastSink().start()
    yield sink
    sink.stop()
