"""Where bounces come in: an LMTP/SMTP receiver, and readers for Maildir, mbox and IMAP.

Transport only: every message is handed over as raw bytes plus what the transport knows of the
envelope (`InboundMessage`); deciding what it is belongs to `mailer.bounces`, and recording it
to the store. No database here.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import mailbox
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.errors import MailerError

log = logging.getLogger(__name__)

#: Largest message the receiver accepts; a bounce quoting a whole newsletter is well below it.
MAX_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class InboundMessage:
    """One message as it arrived. `rcpt_tos` is the RCPT TO (empty when the source does not
    know the envelope, as with a mailbox); `mail_from` is "" for the null sender `<>` that
    bounces carry and None when unknown; `origin` says where it came from, for the log."""

    raw: bytes
    origin: str
    mail_from: str | None = None
    rcpt_tos: tuple[str, ...] = ()


#: Called once per received message. Raising makes the receiver answer 451 so that the MTA keeps
#: the bounce and tries again, rather than the bounce being lost.
InboundCallback = Callable[[InboundMessage], Any]


# ---- the LMTP / SMTP receiver ----

class _Handler:
    def __init__(self, callback: InboundCallback, lmtp: bool) -> None:
        self.callback = callback
        self.lmtp = lmtp

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        message = InboundMessage(
            raw=bytes(envelope.original_content or b""),
            origin=f"{'lmtp' if self.lmtp else 'smtp'} from {peer}",
            # aiosmtpd reports the null reverse-path as "<>"; every bounce has one.
            mail_from="" if envelope.mail_from in ("<>", None) else envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
        )
        try:
            # The callback may touch the database: keep it off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self.callback, message)
        except Exception:
            log.exception("the inbound callback failed; answering 451 so the MTA retries")
            reply = "451 4.3.0 Could not record the message now; try again later"
        else:
            reply = "250 2.0.0 OK"
        if self.lmtp:
            # RFC 2033 §4.2: after DATA, one reply per accepted recipient.
            return "\r\n".join([reply] * max(1, len(envelope.rcpt_tos)))
        return reply


class Receiver:
    """An LMTP (default) or SMTP server on a thread of its own, handing messages to `callback`.

    `port=0` picks a free port; `port` holds the real one after `start()`. Use as a context
    manager in tests, or `serve_forever()` from the command line.
    """

    def __init__(self, callback: InboundCallback, host: str = "127.0.0.1", port: int = 8024,
                 *, lmtp: bool = True, data_size_limit: int = MAX_MESSAGE_BYTES,
                 hostname: str | None = None) -> None:
        self.host, self.port, self.lmtp = host, port, lmtp
        self._handler = _Handler(callback, lmtp)
        self._limit = data_size_limit
        self._hostname = hostname
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def _protocol(self) -> SMTP:
        cls = LMTP if self.lmtp else SMTP
        return cls(self._handler, data_size_limit=self._limit, enable_SMTPUTF8=True,
                   hostname=self._hostname, loop=self._loop)

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(self._protocol, host=self.host, port=self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="bounce-receiver", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise MailerError(f"could not listen on {self.host}:{self.port}: {failure[0]}",
                              hint="choose another --port, or stop what is using this one")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._thread = None

    def serve_forever(self) -> None:
        """Start and block until interrupted (Ctrl-C), then stop cleanly."""
        self.start()
        try:
            assert self._thread is not None
            while self._thread.is_alive():
                self._thread.join(timeout=1.0)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- mailbox readers ----

def read_maildir(path: Path, *, since: datetime | None = None) -> Iterator[InboundMessage]:
    """Every message in a Maildir (new and cur), oldest first by name; nothing is moved.

    `since`: only messages delivered since then (a Maildir file's mtime is its delivery time).
    """
    path = Path(path)
    if not (path / "cur").is_dir() or not (path / "new").is_dir():
        raise MailerError(f"{path} is not a Maildir", hint="it needs cur/, new/ and tmp/")
    cutoff = since.timestamp() if since is not None else None
    found: list[tuple[str, str]] = []
    for sub in ("new", "cur"):
        with os.scandir(path / sub) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if not entry.is_file() or (cutoff is not None
                                               and entry.stat().st_mtime < cutoff):
                        continue
                except OSError:  # taken away meanwhile
                    continue
                # The key is the unique name; ":2,FLAGS" after it changes as it is read.
                found.append((entry.name.split(":", 1)[0], entry.path))
    for key, file in sorted(found):
        try:
            raw = Path(file).read_bytes()
        except OSError:  # moved to cur/ by a mail client meanwhile: the next read has it
            continue
        yield InboundMessage(raw=raw, origin=f"maildir:{path}#{key}")


def read_mbox(path: Path, *, since: datetime | None = None) -> Iterator[InboundMessage]:
    """Every message in an mbox file, in order; the file is not changed.

    `since`: only messages whose `From ` line is dated since then (undated ones are read)."""
    path = Path(path)
    if not path.is_file():
        raise MailerError(f"{path} is not an mbox file")
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        for index, key in enumerate(box.iterkeys()):
            msg = box.get_message(key)
            sender, _, dated = (msg.get_from() or "").partition(" ")
            if since is not None and (at := _from_line_date(dated)) and at < since:
                continue
            yield InboundMessage(raw=box.get_bytes(key), origin=f"mbox:{path}#{index}",
                                 mail_from=None if sender in ("MAILER-DAEMON", "") else sender)
    finally:
        box.close()


def _from_line_date(text: str) -> datetime | None:
    """The date of an mbox `From ` line (`Tue Mar 10 09:14:22 2026`, ctime format, UTC by
    convention), or None."""
    try:
        return datetime.strptime(" ".join(text.split()[:5]), "%a %b %d %H:%M:%S %Y").replace(
            tzinfo=UTC)
    except ValueError:
        return None


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _imap_date(at: datetime) -> str:
    """RFC 3501 `date` (`10-Mar-2026`), in English whatever the locale."""
    return f"{at.day}-{_MONTHS[at.month - 1]}-{at.year}"


def read_imap(host: str, user: str, password: str, *, folder: str = "INBOX",
              port: int | None = None, tls: str = "ssl",
              ssl_context: ssl.SSLContext | None = None,
              timeout: float = 60.0, since: datetime | None = None) -> Iterator[InboundMessage]:
    """Every message in an IMAP folder, opened read-only and fetched with BODY.PEEK so that no
    flag changes: a reader that stops half way loses nothing.

    `since`: only messages that arrived in the folder on or after that day (IMAP's SINCE,
    which counts whole days), so a mailbox that is never emptied is not read whole each time.

    `tls` is `ssl` (IMAPS, port 993; the default), `starttls` (port 143) or `none` (only for a
    server on this machine).
    """
    if tls not in ("ssl", "starttls", "none"):
        raise MailerError(f"unknown tls mode {tls!r}", hint="use ssl, starttls or none")
    context = ssl_context or ssl.create_default_context()
    try:
        if tls == "ssl":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(host, port or 993, ssl_context=context,
                                                    timeout=timeout)
        else:
            conn = imaplib.IMAP4(host, port or 143, timeout=timeout)
            if tls == "starttls":
                conn.starttls(ssl_context=context)
    except (OSError, imaplib.IMAP4.error) as exc:
        raise MailerError(f"could not connect to IMAP server {host}: {exc}") from None
    try:
        try:
            conn.login(user, password)
            typ, _ = conn.select(_quote_folder(folder), readonly=True)
            if typ != "OK":
                raise MailerError(f"IMAP folder {folder!r} could not be opened")
            criteria = ("SINCE", _imap_date(since)) if since is not None else ("ALL",)
            typ, data = conn.uid("SEARCH", *criteria)
        except imaplib.IMAP4.error as exc:
            raise MailerError(f"IMAP server {host} refused: {exc}",
                              hint="check the user, password and folder") from None
        uids = data[0].split() if typ == "OK" and data and data[0] else []
        for uid in uids:
            typ, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
            raw = next((p[1] for p in parts or [] if isinstance(p, tuple)), None)
            if typ != "OK" or raw is None:
                log.warning("IMAP UID %s could not be fetched", uid)
                continue
            yield InboundMessage(raw=raw, origin=f"imap://{host}/{folder};UID={uid.decode()}")
    finally:
        with contextlib.suppress(Exception):
            conn.logout()


def _quote_folder(folder: str) -> str:
    return f'"{folder}"' if " " in folder and not folder.startswith('"') else folder


def open_source(spec: str, password: str | None = None, *,
                since: datetime | None = None) -> Iterator[InboundMessage]:
    """The messages of a source named on the command line, those since `since` if given.

    `maildir:PATH`, `mbox:PATH`, a bare path (a directory is a Maildir, a file an mbox),
    `imaps://user@host[:port]/Folder` or `imap://user@host[:port]/Folder?tls=starttls|none`.
    An IMAP password in the URL is accepted but `password` is better: URLs end up in shell
    history.
    """
    if spec.startswith("maildir:"):
        return read_maildir(Path(spec.removeprefix("maildir:")), since=since)
    if spec.startswith("mbox:"):
        return read_mbox(Path(spec.removeprefix("mbox:")), since=since)
    if spec.startswith(("imap://", "imaps://")):
        parts = urlsplit(spec)
        tls = "ssl" if parts.scheme == "imaps" else parse_qs(parts.query).get(
            "tls", ["starttls"])[0]
        secret = password if password is not None else unquote(parts.password or "")
        if not parts.hostname or not parts.username:
            raise MailerError(f"{spec!r} needs a user and a host",
                              hint="imaps://bounces@mail.example.police.uk/INBOX")
        if not secret:
            raise MailerError("no IMAP password", hint="set MAILER_IMAP_PASSWORD")
        folder = unquote(parts.path.lstrip("/")) or "INBOX"
        try:
            port = parts.port
        except ValueError:
            raise MailerError(f"{spec!r}: the port is not a number",
                              hint="imaps://bounces@mail.example.police.uk:993/INBOX") from None
        return read_imap(parts.hostname, unquote(parts.username), secret, folder=folder,
                         port=port, tls=tls, since=since)
    path = Path(spec)
    if path.is_dir():
        return read_maildir(path, since=since)
    if path.is_file():
        return read_mbox(path, since=since)
    raise MailerError(f"no such mailbox: {spec}",
                      hint="give a Maildir directory, an mbox file or an imaps:// URL")
