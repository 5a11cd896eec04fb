"""SMTP submission: the relay URL, a pool of reused connections, one result per recipient.

No database here. The worker hands in an envelope and the message bytes and gets back a
`SendResult` whose `outcome` says what the outbox row should become; nothing in this module
raises for an SMTP problem (only `ConfigError` for a bad URL).

Why a small hand-written asyncio client rather than smtplib or aiosmtplib
(`../shared/reference/measurements.md` §3, and `bench/smtp_raw.py` here): with ~69 KB messages
on this 2-core box, smtplib tops out around 1,000 msgs/s even on 4-8 threads (it answers every
command in lockstep and runs two regex passes over each body) and aiosmtplib at ~570-740. The
delivery engine must reach 1,000 msgs/s end to end *with* a database write per message, so the
client needs clear headroom above that. A minimal asyncio client that pipelines
MAIL/RCPT/DATA (RFC 2920) when offered and dot-stuffs with `bytes.replace` reached ~1,900
msgs/s on 8 connections. In `bench/smtp_raw.py` (a contended run) this pool costs ~0.5 ms of
client CPU per message against ~0.7 for smtplib threads and ~0.3 for a bare pipelined client
with no error handling; the difference is the price of the checks below, mostly scanning the
body for bare LFs. This module is that client plus what a real sender needs: STARTTLS and
implicit TLS (verified certificates), AUTH PLAIN/LOGIN, a timeout on every phase, classification
of every reply, RSET after a refusal, reconnect on drop and a cap per connection. It stays small
on purpose: one recipient per transaction, no SIZE/DSN/CHUNKING.

Classification (standards.md §4.1): by reply code and enhanced status code, per recipient.
A drop or timeout before the final dot is `retry`; once the final dot may have reached the
server it is `unknown` (the message may have been delivered: §0 finding 5).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

from mailer.errors import ConfigError

__all__ = [
    "Outcome",
    "SendResult",
    "SmtpPool",
    "SmtpTarget",
    "Tls",
    "classify",
    "deliver_once",
    "parse_smtp_url",
]


class Tls(StrEnum):
    STARTTLS = "starttls"
    SSL = "ssl"  # implicit TLS from the first byte (port 465)
    NONE = "none"


DEFAULT_PORTS = {Tls.STARTTLS: 587, Tls.SSL: 465, Tls.NONE: 25}


class Outcome(StrEnum):
    """What one recipient's transaction came to; the worker maps each to a delivery status."""

    SENT = "sent"  # 2xx after the final dot
    RETRY = "retry"  # 4xx, connection error, timeout before the final dot
    BOUNCED = "bounced"  # the address is bad: 5.1.x, or 550/551/553 to RCPT
    FAILED = "failed"  # permanent for this message only (e.g. 552/554 after DATA)
    HALT = "halt"  # our side is broken (5.7.x, auth, TLS, sender refused): stop the whole send
    UNKNOWN = "unknown"  # dropped or timed out after the final dot: may have been delivered


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    code: int | None  # the SMTP reply code; None when no reply came (drop, timeout, TLS)
    enhanced: str | None  # RFC 3463 status such as "5.1.1", when the server gave one
    reply: str  # the server's reply, code first ("550 5.1.1 ..."), or what went wrong here
    stage: str = ""  # the SMTP step that decided it: connect, greeting, ehlo, starttls, auth,
    # mail, rcpt, data, or end (the reply to the final dot)

    @property
    def throttled(self) -> bool:
        """The relay asks us to slow down (421/451 4.7.x): pause the whole send, not one row."""
        return self.code in (421, 451) and (self.enhanced or "").startswith("4.7.")


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    """Where and how to submit; from `parse_smtp_url`. The password never appears in repr."""

    host: str
    port: int
    tls: Tls
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: str | None = None  # trust this CA file instead of the system store
    helo: str | None = None  # the name we give in EHLO; default: this host's name

    def display(self) -> str:
        """The target as a URL with the password masked, for logs and messages."""
        user = f"{self.username}:********@" if self.username else ""
        return f"smtp://{user}{self.host}:{self.port}?tls={self.tls}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)


_QUERY_KEYS = {"tls", "cafile", "helo"}


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(not a URL)"
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:********@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    return f"{scheme}://{netloc}{tail}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse `smtp://user:pass@host:587?tls=starttls` (`tls=ssl`, `tls=none`; `smtps://` = ssl).

    Credentials are percent-decoded, so a password with `@` or `:` is written `%40` / `%3A`.
    Without `tls=` the default is implicit TLS on port 465 and STARTTLS otherwise: a plain
    connection must be asked for. Optional `cafile=/path.pem` trusts a private CA and `helo=`
    sets the EHLO name. Raises `ConfigError` naming the problem; the password is never echoed.
    """
    shown = _redact(url)

    def bad(problem: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"MAILER_SMTP_URL {shown}: {problem}",
                           hint or "use smtp://user:password@host:587?tls=starttls")

    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise bad("the port or host is malformed") from None
    if parts.scheme not in ("smtp", "smtps"):
        raise bad(f"the scheme must be smtp:// or smtps://, not {parts.scheme or 'nothing'}")
    if not parts.hostname:
        raise bad("no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise bad("unexpected path or fragment after the host")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise bad("the query string is malformed") from None
    unknown = sorted(set(query) - _QUERY_KEYS)
    if unknown:
        raise bad(f"unknown option {', '.join(unknown)}", "options are tls=, cafile= and helo=")
    if any(len(values) > 1 for values in query.values()):
        raise bad("an option is given twice")
    opts = {key: values[0] for key, values in query.items()}

    tls_given = opts.get("tls")
    if tls_given is not None:
        try:
            tls = Tls(tls_given.lower())
        except ValueError:
            raise bad(f"tls={tls_given} is not one of starttls, ssl, none") from None
        if parts.scheme == "smtps" and tls is not Tls.SSL:
            raise bad("smtps:// means implicit TLS; drop tls= or use smtp://")
    elif parts.scheme == "smtps" or port == 465:
        tls = Tls.SSL
    else:
        tls = Tls.STARTTLS
    if port == 0:
        raise bad("port 0")

    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username == "":
        username = None
    if (username is None) != (password is None):
        raise bad("give both a user name and a password, or neither")
    host = parts.hostname
    if username and tls is Tls.NONE and not _is_loopback(host):
        raise bad("the password would cross the network unencrypted",
                  "use tls=starttls or tls=ssl with a relay that needs a login")
    if "cafile" in opts and tls is Tls.NONE:
        raise bad("cafile= makes no sense with tls=none")
    return SmtpTarget(host=host, port=port or DEFAULT_PORTS[tls], tls=tls, username=username,
                      password=password, cafile=opts.get("cafile") or None,
                      helo=opts.get("helo") or None)


# ---- classification ----

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_AUTH_OR_TLS_CODES = frozenset({454, 530, 534, 535, 538})
_SETUP_STAGES = frozenset({"greeting", "ehlo", "starttls", "auth"})


def classify(code: int, enhanced: str | None, stage: str) -> Outcome:
    """The outcome of a reply `code` (with its RFC 3463 `enhanced` status) at `stage`.

    Order matters: our own faults (5.7.x, auth, TLS, the server refusing us at setup, or our
    envelope sender refused) halt the send *before* any rule could blame the recipient, so a
    broken configuration never marks subscribers bounced.
    """
    if 200 <= code < 400:
        return Outcome.SENT
    if code in _AUTH_OR_TLS_CODES or (enhanced or "").startswith("5.7."):
        return Outcome.HALT
    if code < 500:
        return Outcome.RETRY
    if stage in _SETUP_STAGES:
        return Outcome.HALT
    if stage == "mail":
        # 552 / 5.3.4 at MAIL is the message's size; anything else refuses our sender
        # address, which would fail every recipient alike.
        too_big = code == 552 or (enhanced or "").startswith("5.3.4")
        return Outcome.FAILED if too_big else Outcome.HALT
    if (enhanced or "").startswith("5.1.") or (stage == "rcpt" and code in (550, 551, 553)):
        return Outcome.BOUNCED
    return Outcome.FAILED


# ---- one connection ----

class _Reply:
    __slots__ = ("code", "enhanced", "lines")

    def __init__(self, code: int, lines: list[bytes]) -> None:
        self.code = code
        self.lines = lines
        match = _ENHANCED.match(self.text_of(lines[0]))
        self.enhanced = (match.group(0) if match and int(match.group(1)) == code // 100
                         else None)

    @staticmethod
    def text_of(line: bytes) -> str:
        return line[4:].decode("utf-8", "replace").strip()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def text(self) -> str:
        return f"{self.code} " + " ".join(self.text_of(line) for line in self.lines)


class _Lost(Exception):
    """The connection closed or failed; `stage` says where, `detail` what."""

    def __init__(self, stage: str, detail: str, *, tls: bool = False) -> None:
        super().__init__(detail)
        self.stage = stage
        self.detail = detail
        self.tls = tls


class _Refused(Exception):
    """The server answered a setup step with an error reply."""

    def __init__(self, stage: str, reply: _Reply) -> None:
        super().__init__(reply.text())
        self.stage = stage
        self.reply = reply


NOT_STARTED = "not-started"  # the stage of a send that never began (see SmtpPool.send)
BeforeDot = Callable[[], Awaitable[None]]  # what a send awaits just before its final dot


def _consume(future: asyncio.Future[None]) -> None:
    """Read the outcome of a record no longer awaited (the transaction ended before its dot),
    so that its error is not logged as never retrieved."""
    if not future.cancelled():
        future.exception()


def _local_result(stage: str, detail: str, outcome: Outcome) -> SendResult:
    return SendResult(outcome, None, None, detail, stage)


def _reply_result(stage: str, reply: _Reply) -> SendResult:
    return SendResult(classify(reply.code, reply.enhanced, stage), reply.code, reply.enhanced,
                      reply.text(), stage)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the server"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")


def _stuff(data: bytes, prepared: bool = False) -> bytes:
    """CRLF line ends, dot-stuffed (RFC 5321 §4.5.2), ending in CRLF.CRLF.

    A bare LF is turned into CRLF: servers that take LF as a line end could otherwise see an
    early end of data ("SMTP smuggling"). These scans are most of the client's CPU per message
    (for 64 KB, ~40 µs to look for a line starting with a dot and ~130 µs for bare LFs), so a
    `prepared` message, which its builder has proved needs neither, is sent as it stands.
    """
    if prepared:
        return data + b".\r\n"
    if data.count(b"\n") != data.count(b"\r\n"):
        data = re.sub(rb"\r?\n", b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    if data.find(b"\r\n.") >= 0:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + (b".\r\n" if data.endswith(b"\r\n") or not data else b"\r\n.\r\n")


class _Connection:
    """One SMTP session. Not safe for concurrent use: the pool lends it to one sender at a time."""

    def __init__(self, target: SmtpTarget, timeout: float, data_timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.data_timeout = data_timeout
        self.extensions: dict[str, str] = {}
        self.transactions = 0  # transactions finished on this session (any outcome)
        self.usable = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    # -- low level --

    async def _read_reply(self, stage: str, timeout: float | None) -> _Reply:
        """One reply, within `timeout`; None when the caller holds a deadline around it."""
        if timeout is None:
            return await self._read_lines(stage)
        try:
            async with asyncio.timeout(timeout):
                return await self._read_lines(stage)
        except TimeoutError as exc:
            raise _Lost(stage, f"{_describe(exc)} waiting for the reply") from None

    async def _read_lines(self, stage: str) -> _Reply:
        assert self._reader is not None
        lines: list[bytes] = []
        try:
            while True:
                line = await self._reader.readline()
                if not line.endswith(b"\n"):
                    raise _Lost(stage, "connection closed by the server")
                lines.append(line.rstrip(b"\r\n"))
                if len(line) < 4 or line[3:4] != b"-":
                    break
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            raise _Lost(stage, f"{_describe(exc)} waiting for the reply") from None
        last = lines[-1]
        if len(last) < 3 or not last[:3].isdigit():
            raise _Lost(stage, f"not an SMTP reply: {last[:60]!r}")
        return _Reply(int(last[:3]), lines)

    async def _write(self, stage: str, payload: bytes) -> None:
        assert self._writer is not None
        try:
            self._writer.write(payload)
            if self._writer.transport.get_write_buffer_size():  # else drain has nothing to wait
                async with asyncio.timeout(self.timeout):
                    await self._writer.drain()
        except (TimeoutError, OSError) as exc:
            raise _Lost(stage, f"{_describe(exc)} while sending") from None

    async def _command(self, stage: str, line: bytes) -> _Reply:
        await self._write(stage, line + b"\r\n")
        return await self._read_reply(stage, self.timeout)

    # -- session setup --

    async def open(self) -> None:
        """Connect, greet, EHLO, STARTTLS, AUTH. Raises `_Lost` or `_Refused`."""
        t = self.target
        context = t.ssl_context() if t.tls is not Tls.NONE else None
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    t.host, t.port,
                    ssl=context if t.tls is Tls.SSL else None,
                    server_hostname=t.host if t.tls is Tls.SSL else None,
                    ssl_handshake_timeout=self.timeout if t.tls is Tls.SSL else None)
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            raise _Lost("connect", f"TLS failed: {_describe(exc)}", tls=True) from None
        except (TimeoutError, OSError) as exc:
            raise _Lost("connect", f"cannot connect to {t.host}:{t.port}: {_describe(exc)}"
                        ) from None
        greeting = await self._read_reply("greeting", self.timeout)
        if greeting.code != 220:
            raise _Refused("greeting", greeting)
        await self._ehlo()
        if t.tls is Tls.STARTTLS:
            await self._starttls(context)
        if t.username is not None:
            await self._auth()
        self.usable = True

    async def _ehlo(self) -> None:
        name = (self.target.helo or _local_name()).encode("idna")
        reply = await self._command("ehlo", b"EHLO " + name)
        if not reply.ok:
            helo = await self._command("ehlo", b"HELO " + name)
            if not helo.ok:
                raise _Refused("ehlo", reply)
            self.extensions = {}
            return
        self.extensions = {}
        for line in reply.lines[1:]:
            keyword, _, params = _Reply.text_of(line).partition(" ")
            self.extensions[keyword.upper()] = params

    async def _starttls(self, context: ssl.SSLContext | None) -> None:
        assert context is not None and self._writer is not None
        if "STARTTLS" not in self.extensions:
            raise _Lost("starttls", "the server does not offer STARTTLS (tls=starttls asks for "
                        "it; use tls=ssl for port 465)", tls=True)
        reply = await self._command("starttls", b"STARTTLS")
        if reply.code != 220:
            raise _Refused("starttls", reply)
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.start_tls(context, server_hostname=self.target.host,
                                             ssl_handshake_timeout=self.timeout)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise _Lost("starttls", f"TLS failed: {_describe(exc)}", tls=True) from None
        except (TimeoutError, OSError) as exc:
            raise _Lost("starttls", f"TLS handshake: {_describe(exc)}", tls=True) from None
        await self._ehlo()  # RFC 3207 §4.2: forget what was learnt before TLS

    async def _auth(self) -> None:
        user = (self.target.username or "").encode()
        password = (self.target.password or "").encode()
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self._command("auth", b"AUTH PLAIN " + token)
        elif "LOGIN" in mechanisms:
            reply = await self._command("auth", b"AUTH LOGIN")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command("auth", base64.b64encode(secret))
        else:
            offered = " ".join(mechanisms) or "none"
            raise _Lost("auth", f"a login is configured but the server offers no AUTH PLAIN or "
                        f"LOGIN (offered: {offered})", tls=True)
        if reply.code != 235:
            raise _Refused("auth", reply)

    # -- transactions --

    async def transact(self, mail_from: str, rcpt: str, data: bytes,
                       prepared: bool = False, before_dot: BeforeDot | None = None
                       ) -> SendResult:
        """One message to one recipient. Marks itself unusable when the session is in doubt."""
        try:
            return await self._transact(mail_from, rcpt, data, prepared, before_dot)
        except _Lost as lost:
            self.usable = False
            outcome = Outcome.UNKNOWN if lost.stage == "end" else Outcome.RETRY
            detail = lost.detail
            if outcome is Outcome.UNKNOWN:
                detail += " after the final dot: the message may have been delivered"
            return _local_result(lost.stage, detail, outcome)
        finally:
            self.transactions += 1

    async def _transact(self, mail_from: str, rcpt: str, data: bytes,
                        prepared: bool, before_dot: BeforeDot | None) -> SendResult:
        # The caller's record (before_dot) must be done before the final dot; started now, it
        # overlaps the envelope's round trip instead of adding to it.
        marking = asyncio.ensure_future(before_dot()) if before_dot is not None else None
        try:
            return await self._exchange(mail_from, rcpt, data, prepared, marking)
        finally:
            if marking is not None and not marking.done():
                marking.add_done_callback(_consume)

    async def _exchange(self, mail_from: str, rcpt: str, data: bytes, prepared: bool,
                        marking: asyncio.Future[None] | None) -> SendResult:
        smtputf8 = not (mail_from.isascii() and rcpt.isascii())
        if smtputf8 and "SMTPUTF8" not in self.extensions:
            return _local_result("mail", "a non-ASCII address needs SMTPUTF8, which the server "
                                 "does not offer", Outcome.FAILED)
        params = b""
        if smtputf8:
            params += b" SMTPUTF8"
        if "8BITMIME" in self.extensions and not data.isascii():
            params += b" BODY=8BITMIME"
        mail = b"MAIL FROM:<" + mail_from.encode() + b">" + params + b"\r\n"
        rcpt_line = b"RCPT TO:<" + rcpt.encode() + b">\r\n"
        if "PIPELINING" in self.extensions:
            await self._write("mail", mail + rcpt_line + b"DATA\r\n")
            replies: list[tuple[str, _Reply]] = []
            stage = "mail"
            try:
                # One deadline for the three pipelined replies, which arrive together: a
                # timer each was a tenth of the client's CPU.
                async with asyncio.timeout(self.timeout):
                    for stage in ("mail", "rcpt", "data"):
                        replies.append((stage, await self._read_reply(stage, None)))
                        if replies[-1][1].code == 421:  # closing: no other reply will come
                            break
            except (_Lost, TimeoutError) as exc:
                if replies and not replies[0][1].ok:  # closed after refusing: say why
                    self.usable = False
                    return _reply_result(*replies[0])
                if isinstance(exc, TimeoutError):
                    raise _Lost(stage, f"{_describe(exc)} waiting for the reply") from None
                raise
            if replies[-1][1].code == 421:
                self.usable = False
                return _reply_result(*replies[-1])
            refusal = next(((stage, r) for stage, r in replies[:2] if not r.ok), None)
            r_data = replies[2][1]
            if refusal is not None:
                if r_data.code == 354:  # a server that ignored the refusal: end the data empty
                    await self._write("data", b".\r\n")
                    await self._read_reply("data", self.timeout)
                return await self._after_refusal(*refusal)
        else:
            for stage, line in (("mail", mail), ("rcpt", rcpt_line)):
                await self._write(stage, line)
                reply = await self._read_reply(stage, self.timeout)
                if not reply.ok:
                    return await self._after_refusal(stage, reply)
            r_data = await self._command("data", b"DATA")
        if r_data.code != 354:
            return await self._after_refusal("data", r_data)
        # From here the final dot may reach the server: a failure is no longer a clean retry.
        # The caller records that first (before_dot), so that after a crash it can tell a
        # message that may have arrived from one that certainly did not.
        if marking is not None:
            try:
                await marking
            except Exception as exc:  # whatever failed in the caller's record
                # Unrecorded, the message must not be completed. The session is inside DATA
                # and cannot be reused; closed without the dot, the server discards it.
                self.usable = False
                return _local_result("data", f"not sent: could not record it first ({exc})",
                                     Outcome.RETRY)
        await self._write("end", _stuff(data, prepared))
        final = await self._read_reply("end", self.data_timeout)
        if final.code == 421:
            self.usable = False
        return _reply_result("end", final)

    async def _after_refusal(self, stage: str, reply: _Reply) -> SendResult:
        result = _reply_result(stage, reply)
        if reply.code == 421:  # the server is closing the channel
            self.usable = False
            return result
        try:
            rset = await self._command("rset", b"RSET")
            self.usable = rset.ok
        except _Lost:
            self.usable = False
        return result

    async def close(self, quit_first: bool = True) -> None:
        self.usable = False
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            if quit_first and not writer.is_closing():
                writer.write(b"QUIT\r\n")
                async with asyncio.timeout(min(self.timeout, 5.0)):
                    await writer.drain()
                    if self._reader is not None:
                        await self._reader.readline()
        except (TimeoutError, OSError, ValueError):
            pass  # QUIT is a courtesy; the session is over either way
        writer.close()
        try:
            async with asyncio.timeout(min(self.timeout, 5.0)):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            pass


_local_name_cache: list[str] = []


def _local_name() -> str:
    # gethostname, not getfqdn: getfqdn can block on DNS for seconds per call.
    if not _local_name_cache:
        _local_name_cache.append(socket.gethostname() or "localhost")
    return _local_name_cache[0]


def _setup_failure(exc: _Lost | _Refused) -> SendResult:
    if isinstance(exc, _Refused):
        return _reply_result(exc.stage, exc.reply)
    return _local_result(exc.stage, exc.detail, Outcome.HALT if exc.tls else Outcome.RETRY)


# ---- the pool ----

class SmtpPool:
    """Up to `size` reused SMTP sessions to one relay, lent to one `send` at a time each.

    `async with SmtpPool(target, size=8) as pool: result = await pool.send(frm, rcpt, data)`;
    run many `send`s concurrently (tasks, gather) to use every session. Sessions open lazily,
    are replaced when they drop, and are closed with QUIT after `max_per_connection`
    transactions (relays such as Yahoo drop silently at their own limit). A refused recipient is
    followed by RSET, so the next message on that session starts clean. A session that has
    served before and turns out dead at the first reply of a new transaction (closed while idle)
    is replaced and the message tried once more: nothing had been accepted, so this cannot
    duplicate. `timeout` bounds every step (connect, each reply, each write);
    `data_timeout` (default `timeout`) bounds the wait for the reply to the final dot.
    """

    def __init__(self, target: SmtpTarget | str, *, size: int = 4,
                 max_per_connection: int = 100, timeout: float = 30.0,
                 data_timeout: float | None = None) -> None:
        if size < 1 or max_per_connection < 1:
            raise ValueError("size and max_per_connection must be at least 1")
        self.target = parse_smtp_url(target) if isinstance(target, str) else target
        self.size = size
        self.max_per_connection = max_per_connection
        self.timeout = timeout
        self.data_timeout = timeout if data_timeout is None else data_timeout
        self.connections_opened = 0  # sessions successfully set up, for tests and status
        self._idle: asyncio.LifoQueue[_Connection | None] | None = None
        self._closed = False

    async def __aenter__(self) -> SmtpPool:
        self._slots()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _slots(self) -> asyncio.LifoQueue[_Connection | None]:
        if self._idle is None:
            self._idle = asyncio.LifoQueue()
            for _ in range(self.size):
                self._idle.put_nowait(None)
        return self._idle

    async def _open(self) -> _Connection | SendResult:
        conn = _Connection(self.target, self.timeout, self.data_timeout)
        try:
            await conn.open()
        except (_Lost, _Refused) as exc:
            await conn.close(quit_first=isinstance(exc, _Refused))
            return _setup_failure(exc)
        self.connections_opened += 1
        return conn

    async def send(self, mail_from: str, rcpt: str, data: bytes, *,
                   prepared: bool = False, start_by: float | None = None,
                   before_dot: BeforeDot | None = None) -> SendResult:
        """Submit `data` from envelope sender `mail_from` to the one recipient `rcpt`.

        `prepared`: the caller has proved that `data` has CRLF line ends only, no line that
        starts with a dot, and a final CRLF (the worker's messages from
        `mailer.render.build_message` have), so it goes out as it stands; anything else is
        normalised and dot-stuffed here.
        `start_by` (the event loop's clock): when no session is free before then, nothing is
        sent and the result has stage "not-started" (the caller's claim on it has lapsed).
        `before_dot`: started when the transaction starts and awaited just before the final
        dot is written (after the server has accepted the envelope and DATA); the worker
        records there that the message may soon have arrived."""
        if self._closed:
            raise RuntimeError("the SMTP pool is closed")
        if _FORBIDDEN_IN_ADDRESS.search(mail_from) or _FORBIDDEN_IN_ADDRESS.search(rcpt):
            return _local_result("mail", "an envelope address contains a space, control "
                                 "character or angle bracket", Outcome.FAILED)
        slots = self._slots()
        conn = await slots.get()
        if start_by is not None and asyncio.get_running_loop().time() > start_by:
            slots.put_nowait(conn)
            return _local_result(NOT_STARTED, "not sent: no session was free in time",
                                 Outcome.RETRY)
        try:
            for _attempt in range(2):
                reused = conn is not None and conn.usable
                if conn is None or not conn.usable:
                    if conn is not None:
                        await conn.close(quit_first=False)
                    opened = await self._open()
                    if isinstance(opened, SendResult):
                        conn = None
                        return opened
                    conn = opened
                result = await conn.transact(mail_from, rcpt, data, prepared, before_dot)
                stale = (reused and result.code is None and result.stage == "mail"
                         and result.outcome is Outcome.RETRY)
                if not stale:
                    break
                # an idle session that the server had closed: try once on a fresh one
            assert conn is not None  # each pass above ends holding a session, or returned
            if not conn.usable or conn.transactions >= self.max_per_connection or self._closed:
                await conn.close(quit_first=conn.usable)
                conn = None
            return result
        except BaseException:
            if conn is not None:  # cancelled mid-transaction: the session state is unknown
                await conn.close(quit_first=False)
                conn = None
            raise
        finally:
            slots.put_nowait(conn)

    async def close(self) -> None:
        """QUIT every idle session. Sessions still in use are closed when their send returns."""
        self._closed = True
        if self._idle is None:
            return
        idle = []
        while not self._idle.empty():
            idle.append(self._idle.get_nowait())
        for conn in idle:
            if conn is not None:
                await conn.close()
            self._idle.put_nowait(None)  # keeps the slot count for a send still returning


# ---- one-off sends ----

async def _deliver_once(target: SmtpTarget, mail_from: str, rcpt: str, data: bytes,
                        timeout: float) -> SendResult:
    async with SmtpPool(target, size=1, max_per_connection=1, timeout=timeout) as pool:
        return await pool.send(mail_from, rcpt, data)


def deliver_once(smtp_url: str, mail_from: str, rcpt: str, data: bytes,
                 timeout: float = 30) -> SendResult:
    """Send one message on its own connection, synchronously: test sends, confirmation mails.

    Returns a `SendResult` for every SMTP outcome; raises only `ConfigError` for a bad URL.
    Safe to call from inside a running event loop (it then runs on a helper thread).
    """
    target = parse_smtp_url(smtp_url)
    coro_args = (target, mail_from, rcpt, data, timeout)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_deliver_once(*coro_args))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, _deliver_once(*coro_args)).result()
