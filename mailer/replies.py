"""Replies reach a person (issue 15, item 6): a reader's reply to the bounce receiver is kept
and forwarded to the contact address, instead of being filed as an unknown message.

receive -> keep -> forward -> forget:

* `keep` (called by `bounce_policy.receive` for a `Kind.REPLY` verdict, in its transaction)
  records the reply once, by the SHA-256 of its bytes, so an MTA's redelivery or a mailbox read
  again is recognised and not forwarded twice. A reply that would loop (from one of our own
  addresses, or carrying our forward marker) is not kept here: `receive` files it as unknown.
* `forward_pending` (after each message the receiver takes, on each of its settle passes and
  on the scheduler's) sends what is not forwarded yet, outside any transaction. Each reply is
  claimed first with a guarded UPDATE and a lease, as the outbox claims deliveries, so two
  processes never both send one; a relay that is down leaves it pending for the next pass.
* The forward is a new message From our own address (never the reader's: DMARC), Reply-To the
  reader, with a short cover note and the reply attached intact as message/rfc822, its bytes as
  they arrived.
* `purge` (the retention pass) deletes replies `reader_reply_retention_days` after they came.

Where replies go is the settings' `contact_address`, as a publication will supply it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy as email_policy
from email.headerregistry import Address
from email.message import Message
from email.parser import BytesParser
from email.utils import format_datetime, make_msgid, parseaddr
from zoneinfo import ZoneInfo

from sqlalchemy import (
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from mailer.bounces import Verdict
from mailer.config import Settings
from mailer.inbound import InboundMessage
from mailer.outgoing import send_now
from mailer.smtp import Outcome
from subscribers import store
from subscribers.db import Base, UTCDateTime, changed_rows, session_scope, utcnow
from subscribers.models import Subscriber, SubscriberStatus
from subscribers.regions import Scope, within
from subscribers.rules import Rules

log = logging.getLogger(__name__)

#: Our forwards carry it; a message that comes back with it is one of ours, never forwarded.
MARKER = "X-MSHT-Forwarded-Reply"
#: How long a claim holds: longer than one SMTP transaction can take (`deliver_once`: 30 s).
LEASE = timedelta(minutes=5)
PER_PASS = 20
#: How long a reply the relay refuses is tried again (on every pass of the receiver and the
#: scheduler), as alerts are (`alerts.MAIL_FOR`): a relay down over a long weekend included.
#: After that it stays listed, marked as not forwarded.
FORWARD_FOR = timedelta(days=7)


class ReaderReply(Base):
    """One reply from a reader, as received, and whether it was forwarded."""

    __tablename__ = "reader_reply"
    __table_args__ = (
        Index("ix_reader_reply_received_at", "received_at"),
        Index("ix_reader_reply_pending", "forwarded_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Of the raw bytes: the same reply redelivered is recognised, and forwarded once.
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    origin: Mapped[str] = mapped_column(String(300))
    from_address: Mapped[str] = mapped_column(String(320))
    from_name: Mapped[str | None] = mapped_column(String(200))
    subject: Mapped[str | None] = mapped_column(String(300))
    # From our signed reference in In-Reply-To/References; plain integers, so a reply
    # outlives what it names. `subscriber_id` also places the reply in a region.
    edition_id: Mapped[int | None] = mapped_column(Integer)
    subscriber_id: Mapped[int | None] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    forwarded_to: Mapped[str | None] = mapped_column(String(320))
    forwarded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


# ---------------------------------------------------------------- keeping

def own_addresses(settings: Settings) -> frozenset[str]:
    """Addresses that are us: mail from them is never forwarded (it would loop)."""
    return frozenset(a.strip().lower() for a in (
        settings.from_address, settings.contact_address, settings.reply_address,
        settings.bounce_address or "") if a and a.strip())


def loop_reason(raw: bytes, own: frozenset[str]) -> str | None:
    """Why forwarding this message could loop (our own forward, or mail from our own
    address), or None."""
    msg = _parse(raw)
    if msg.get(MARKER) is not None:
        return f"it carries our {MARKER} marker: one of our own forwards came back"
    sender = parseaddr(_decoded(msg, "From"))[1].strip().lower()
    if sender in own:
        return f"it is from our own address ({sender})"
    return None


def keep(session: Session, message: InboundMessage, verdict: Verdict, *,
         rules: Rules | None = None, now: datetime | None = None) -> tuple[ReaderReply, bool]:
    """Record a reply once; returns it and whether it was new. The caller commits.

    The reader is the one our signed reference names (the reply's In-Reply-To), else, with
    `rules`, the subscriber whose address wrote it: only to place the reply in a region for
    the console, so a forged From costs nothing (the forward goes to the contact address
    whoever it names)."""
    raw = bytes(message.raw or b"")
    digest = hashlib.sha256(raw).hexdigest()
    existing = session.scalar(select(ReaderReply).where(ReaderReply.sha256 == digest))
    if existing is not None:
        return existing, False
    msg = _parse(raw)
    name, address = parseaddr(_decoded(msg, "From"))
    ref = verdict.reference
    subscriber_id = ref.subscriber_id if ref else None
    if subscriber_id is None and rules is not None and address:
        try:
            reader = store.find_by_email(session, rules, address)
        except Exception:  # an address our rules refuse is no reader of ours
            reader = None
        subscriber_id = reader.id if reader is not None else None
    reply = ReaderReply(
        received_at=now or utcnow(), sha256=digest, origin=message.origin[:300],
        from_address=address[:320], from_name=_plain(name, 200) or None,
        subject=_plain(verdict.subject or "", 300) or None,
        edition_id=ref.edition_id if ref else None,
        subscriber_id=subscriber_id, size=len(raw), raw=raw)
    try:
        with session.begin_nested():
            session.add(reply)
            session.flush()
    except IntegrityError:
        # The same reply taken meanwhile by another receiver thread (an MTA that gave up
        # waiting and delivered again): that one is the record.
        found = session.scalar(select(ReaderReply).where(ReaderReply.sha256 == digest))
        if found is None:
            raise
        return found, False
    return reply, True


# ---------------------------------------------------------------- forwarding

@dataclass(frozen=True)
class _Claimed:
    id: int
    raw: bytes
    from_address: str
    from_name: str | None
    subject: str | None
    received_at: datetime
    edition: str | None


def forward_pending(sessions: sessionmaker[Session], settings: Settings,
                    now: datetime | None = None) -> int:
    """Forward the replies not forwarded yet to the contact address; returns how many went.

    SMTP runs outside any transaction; a reply is claimed (a lease) before it is sent and
    marked forwarded as soon as the relay has taken it, so a reply is sent once however many
    receivers and schedulers run this at the same time."""
    now = now or utcnow()
    to = settings.contact_address.strip()
    if not to:
        return 0
    done = 0
    with session_scope(sessions) as session:
        ids = session.scalars(select(ReaderReply.id).where(
            ReaderReply.forwarded_at.is_(None), ReaderReply.received_at >= now - FORWARD_FOR,
            or_(ReaderReply.claimed_until.is_(None), ReaderReply.claimed_until < now))
            .order_by(ReaderReply.id).limit(PER_PASS)).all()
    for reply_id in ids:
        claimed = _claim(sessions, reply_id, now)
        if claimed is None:
            continue
        problem = _send(settings, to, claimed, now)
        with session_scope(sessions) as session:
            row = session.get(ReaderReply, reply_id)
            if row is None:  # purged meanwhile
                continue
            row.attempts += 1
            row.claimed_until = None
            if problem is None:
                row.forwarded_at, row.forwarded_to, row.last_error = now, to, None
                done += 1
            else:
                row.last_error = problem[:1000]
                log.warning("reply %s not forwarded yet: %s", reply_id, problem)
    return done


def _claim(sessions: sessionmaker[Session], reply_id: int, now: datetime) -> _Claimed | None:
    with session_scope(sessions) as session:
        taken = changed_rows(session.execute(
            update(ReaderReply).where(
                ReaderReply.id == reply_id, ReaderReply.forwarded_at.is_(None),
                or_(ReaderReply.claimed_until.is_(None), ReaderReply.claimed_until < now))
            .values(claimed_until=now + LEASE).execution_options(synchronize_session=False)))
        if not taken:
            return None  # another process has it, or it went meanwhile
        row = session.get(ReaderReply, reply_id)
        assert row is not None
        return _Claimed(row.id, row.raw, row.from_address, row.from_name, row.subject,
                        row.received_at, _edition_subject(session, row.edition_id))


def _edition_subject(session: Session, edition_id: int | None) -> str | None:
    if edition_id is None:
        return None
    from mailer.models import Edition

    edition = session.get(Edition, edition_id)
    return edition.subject if edition is not None else None


def forward_message(settings: Settings, to: str, reply: _Claimed, now: datetime) -> bytes:
    """The forward: a cover note, then the reply as it arrived (message/rfc822), in CRLF bytes.

    Built by hand, not by the email package, because the attached bytes must be the reply's
    own: a parse and re-serialise would refold its headers and re-encode its body."""
    from mailer.render import POLICY

    domain = settings.from_address.rpartition("@")[2] or None
    who = f"{reply.from_name} <{reply.from_address}>" if reply.from_name else reply.from_address
    when = reply.received_at.astimezone(ZoneInfo(settings.timezone))
    about = (f"It answers the newsletter \"{reply.edition}\".\n" if reply.edition
             else "It does not say which newsletter it answers.\n")
    cover = (f"A reader replied to {settings.from_name}.\n\n"
             f"From: {who}\n"
             f"Subject: {reply.subject or '(none)'}\n"
             f"Received: {when:%A %d %B %Y at %H:%M} UK time\n"
             f"{about}\n"
             "Their message is attached exactly as it arrived. Replying to this email "
             "answers them: it goes to their address, not to the newsletter.\n")
    raw = _crlf(reply.raw)
    boundary = f"==_{secrets.token_hex(12)}_=="
    while boundary.encode() in raw:  # astronomically unlikely; cheap to rule out
        boundary = f"==_{secrets.token_hex(12)}_=="
    head = "".join(POLICY.header_factory(n, v).fold(policy=POLICY) for n, v in [
        ("From", str(Address(settings.from_name, addr_spec=settings.from_address))),
        ("To", to)])
    # An address we cannot write as ASCII (SMTPUTF8) goes without a Reply-To, rather than
    # the reply never being forwarded: the note still names it.
    with contextlib.suppress(Exception):
        head += POLICY.header_factory(
            "Reply-To", str(Address(addr_spec=reply.from_address))).fold(policy=POLICY)
    head += "".join(POLICY.header_factory(n, v).fold(policy=POLICY) for n, v in [
        ("Subject", _plain(f"Reply from {who}: {reply.subject or '(no subject)'}", 200)),
        ("Date", format_datetime(now)),
        ("Message-ID", make_msgid(domain=domain)),
        ("Auto-Submitted", "auto-forwarded"),
        (MARKER, f"{reply.id}")])
    cte = "7bit" if raw.isascii() else "8bit"
    if any(len(line) > 998 for line in raw.split(b"\r\n")):
        cte = "binary"  # RFC 2046 §5.2.1 allows no other encoding for message/rfc822
    cover_part = _qp(cover)
    return b"".join([
        head.encode("ascii"),
        b"MIME-Version: 1.0\r\n",
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode("ascii"),
        f"--{boundary}\r\n".encode("ascii"),
        b'Content-Type: text/plain; charset="utf-8"\r\n',
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        cover_part, b"\r\n",
        f"--{boundary}\r\n".encode("ascii"),
        b"Content-Type: message/rfc822\r\n",
        b'Content-Disposition: attachment; filename="reply.eml"\r\n',
        f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii"),
        # The CRLF before a boundary belongs to the delimiter (RFC 2046 §5.1.1): without one
        # of its own, the reply would lose its last line end.
        raw, b"\r\n",
        f"--{boundary}--\r\n".encode("ascii"),
    ])


def _send(settings: Settings, to: str, reply: _Claimed, now: datetime) -> str | None:
    """Send one forward; why it was not taken, or None."""
    try:
        result = send_now(settings, to, forward_message(settings, to, reply, now))
    except Exception as exc:  # a bad relay URL or a bug: the reply stays pending, and says why
        return f"{type(exc).__name__}: {exc}"
    return None if result.outcome == Outcome.SENT else result.reply


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class Row:
    """One reply for the console."""

    id: int
    received_at: datetime
    from_address: str
    from_name: str | None
    subject: str | None
    edition_id: int | None
    size: int
    forwarded_at: datetime | None
    attempts: int
    last_error: str | None
    given_up: bool  # not forwarded, and no longer tried (`FORWARD_FOR`)


def _in_scope(scope: Scope, everywhere: bool) -> ColumnElement[bool]:
    """As bounces are scoped: a reply is in a region scope when the reader it names is; one
    that names nobody is seen only by who covers every region."""
    placed = (Subscriber.status != SubscriberStatus.ERASED) & within(scope, Subscriber.region)
    return or_(placed, Subscriber.id.is_(None)) if everywhere else placed


def recent(session: Session, limit: int = 100, *, scope: Scope = None,
           everywhere: bool = True, now: datetime | None = None) -> tuple[list[Row], int]:
    """The newest replies within a region scope, newest first, and how many lie outside it."""
    joined = select(ReaderReply).outerjoin(
        Subscriber, Subscriber.id == ReaderReply.subscriber_id)
    shown, hidden = joined, 0
    if scope is not None:
        condition = _in_scope(scope, everywhere)
        shown = joined.where(condition)
        counted = select(func.count()).select_from(ReaderReply).outerjoin(
            Subscriber, Subscriber.id == ReaderReply.subscriber_id)
        # All less those in scope, not NOT(in scope): a missing reader makes that NULL.
        hidden = ((session.scalar(counted) or 0)
                  - (session.scalar(counted.where(condition)) or 0))
    rows = session.scalars(shown.order_by(ReaderReply.id.desc()).limit(limit)).all()
    give_up = (now or utcnow()) - FORWARD_FOR
    return [Row(r.id, r.received_at, r.from_address, r.from_name, r.subject, r.edition_id,
                r.size, r.forwarded_at, r.attempts, r.last_error,
                r.forwarded_at is None and r.received_at < give_up) for r in rows], hidden


# ---------------------------------------------------------------- retention

def purge(session: Session, retention: timedelta, *, now: datetime | None = None,
          limit: int = 500) -> int:
    """Delete up to `limit` replies received more than `retention` ago: each was forwarded
    when it came, and the contact mailbox keeps what the co-ordinators chose to keep.
    Returns how many went."""
    before = (now or utcnow()) - retention
    ids = select(ReaderReply.id).where(ReaderReply.received_at < before).order_by(
        ReaderReply.id).limit(limit)
    doomed = list(session.scalars(ids))
    if not doomed:
        return 0
    return changed_rows(session.execute(
        delete(ReaderReply).where(ReaderReply.id.in_(doomed))
        .execution_options(synchronize_session=False))) or 0


def forget_subscriber(session: Session, subscriber_id: int, address: str) -> int:
    """For an erasure: the replies a person sent (by our reference to them, or their
    address). Returns how many were deleted."""
    return changed_rows(session.execute(
        delete(ReaderReply).where(or_(
            ReaderReply.subscriber_id == subscriber_id,
            func.lower(ReaderReply.from_address) == address.strip().lower()))
        .execution_options(synchronize_session=False))) or 0


def sent_by(session: Session, subscriber_id: int, address: str) -> list[dict[str, object]]:
    """A person's replies, for a subject access export (what they wrote, not the bytes)."""
    rows = session.scalars(select(ReaderReply).where(or_(
        ReaderReply.subscriber_id == subscriber_id,
        func.lower(ReaderReply.from_address) == address.strip().lower()))
        .order_by(ReaderReply.id)).all()
    return [{"at": r.received_at.isoformat(), "subject": r.subject,
             "edition_id": r.edition_id,
             "forwarded_at": r.forwarded_at.isoformat() if r.forwarded_at else None}
            for r in rows]


# ---------------------------------------------------------------- helpers

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _plain(text: str, limit: int) -> str:
    """Text from a reader made safe for one header line: no control characters, no
    encoded-word look-alikes (the CVE-2024-6923 line break), whitespace collapsed."""
    text = " ".join(_CONTROL.sub(" ", text).split()).replace("=?", "= ?")
    return text[:limit]


def _parse(raw: bytes) -> Message:
    return BytesParser(policy=email_policy.default).parsebytes(raw, headersonly=True)


def _decoded(msg: Message, name: str) -> str:
    """A header as text (encoded-words decoded), or "" when it is missing or unreadable."""
    try:
        return str(msg.get(name, "") or "")
    except Exception:  # a malformed header must not lose the reply
        return ""


def _crlf(data: bytes) -> bytes:
    if data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


def _qp(text: str) -> bytes:
    from email.quoprimime import body_encode

    encoded = body_encode(text.encode("utf-8").decode("latin-1"), 74, "\r\n")
    return encoded.encode("ascii")
