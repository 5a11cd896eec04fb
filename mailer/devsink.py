"""The development mail sink: an SMTP server that keeps every message in a Maildir.

`mailer dev-sink` runs it in the foreground; tests and the demo start it in-process with
`DevSink(directory).start()`. The Maildir (stdlib `mailbox`) can be opened by any mail client
(mutt -f var/devsink) and is listed by `DevSink.messages()` or `mailer dev-sink --list`.
It accepts everything, from anyone, and must only listen on loopback.
"""

from __future__ import annotations

import email.utils
import functools
import mailbox
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, Envelope, Session

SINK_HOSTNAME = "devsink.localhost"  # given explicitly: aiosmtpd's default getfqdn() is slow


@dataclass(frozen=True)
class SinkMessage:
    key: str  # the Maildir key, for `DevSink.raw(key)`
    received: str  # RFC 5322 date the sink stored it
    mail_from: str  # envelope sender (Return-Path)
    rcpt_to: tuple[str, ...]  # envelope recipients
    subject: str
    message_id: str


def _sort_key(key: str) -> tuple[int, int, str]:
    # Maildir keys are "<seconds>.M<microseconds>P<pid>Q<n>.<host>": sort by time, not text.
    seconds, _, rest = key.partition(".")
    micro = rest[1:].partition("P")[0] if rest.startswith("M") else ""
    return (int(seconds) if seconds.isdigit() else 0, int(micro) if micro.isdigit() else 0, key)


class _Handler:
    def __init__(self, sink: DevSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        key = self.sink._store(envelope.mail_from or "", list(envelope.rcpt_tos), content)
        return f"250 2.0.0 OK stored as {key}"


@functools.cache
def _controller_class() -> type[Controller]:
    # aiosmtpd costs ~120 ms to import, and every CLI command imports this module.
    import asyncio

    from aiosmtpd.controller import Controller

    class _Controller(Controller):
        def _trigger_server(self) -> None:
            # With port 0 the OS picks one: learn it before aiosmtpd's start-up probe connects.
            assert isinstance(self.server, asyncio.Server)
            self.port = self.server.sockets[0].getsockname()[1]
            super()._trigger_server()

    return _Controller


class DevSink:
    """A local SMTP server storing to a Maildir. `port=0` picks a free port (see `.port`).

    `on_message` is called (on the server's thread) with each stored `SinkMessage`.
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 8025,
                 on_message: Callable[[SinkMessage], None] | None = None) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self.on_message = on_message
        self._lock = threading.Lock()
        self._maildir: mailbox.Maildir | None = None
        self._controller: Controller | None = None

    def _box(self) -> mailbox.Maildir:
        if self._maildir is None:
            # mailbox only makes tmp/new/cur for a directory that does not exist yet
            for sub in ("tmp", "new", "cur"):
                (self.directory / sub).mkdir(parents=True, exist_ok=True)
            self._maildir = mailbox.Maildir(self.directory, create=False)
        return self._maildir

    def start(self) -> DevSink:
        if self._controller is not None:
            raise RuntimeError("the dev sink is already running")
        self._box()
        controller = _controller_class()(_Handler(self), hostname=self.host, port=self.port,
                                         server_hostname=SINK_HOSTNAME)
        controller.start()
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> DevSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The MAILER_SMTP_URL that sends here."""
        return f"smtp://{self.host}:{self.port}?tls=none"

    def _store(self, mail_from: str, rcpt_to: list[str], content: bytes) -> str:
        # Trace headers as a local delivery agent would add them, so a mail client shows the
        # envelope; the message bytes themselves are kept exactly as received.
        received = email.utils.format_datetime(email.utils.localtime())
        trace = [f"Return-Path: <{mail_from}>"]
        trace += [f"Delivered-To: {rcpt}" for rcpt in rcpt_to]
        trace.append(f"Received: by {SINK_HOSTNAME} (mailer dev-sink); {received}")
        raw = "\r\n".join(trace).encode("utf-8", "surrogateescape") + b"\r\n" + content
        with self._lock:
            key = self._box().add(raw)
        if self.on_message is not None:
            self.on_message(self._describe(key, raw))
        return key

    @staticmethod
    def _describe(key: str, raw: bytes) -> SinkMessage:
        headers = BytesHeaderParser(policy=default_policy).parsebytes(raw)

        def one(name: str) -> str:
            value: Any = headers.get(name, "")
            return str(value).strip()

        received = one("Received").rpartition(";")[2].strip()
        return SinkMessage(key=key, received=received,
                           mail_from=one("Return-Path").strip("<>"),
                           rcpt_to=tuple(str(v) for v in headers.get_all("Delivered-To", [])),
                           subject=one("Subject"), message_id=one("Message-ID"))

    def messages(self) -> list[SinkMessage]:
        """Every stored message, oldest first."""
        with self._lock:
            box = self._box()
            keys = sorted(box.keys(), key=_sort_key)
            return [self._describe(key, box.get_bytes(key)) for key in keys]

    def raw(self, key: str) -> bytes:
        """The stored bytes: the sink's trace headers, then the message as received."""
        with self._lock:
            return self._box().get_bytes(key)

    def clear(self) -> int:
        """Delete every stored message; returns how many there were."""
        with self._lock:
            box = self._box()
            keys = list(box.keys())
            for key in keys:
                box.remove(key)
            return len(keys)
