"""Telling the co-ordinators: what a person must act on, mailed to them once.

A send halted by the relay, a reminder that could not go out in time, no edition approved three
weeks before the quarter's usual date, a domain whose bounces were held back instead of
disabling everyone there: each is recorded once, under a key, where it happens
(`raise_alert`, in the same transaction as the change it reports). `mail_pending` (the
scheduler's pass, or `mailer alerts send`) then emails every alert not yet mailed to the active
admins, and to the co-ordinators of the alert's regions, who have an address on their account
(or, when none has, to the contact address).

SMTP runs outside any transaction, and each address that accepted the mail is written down:
a mail that failed is tried again on the next pass, to those who did not get it, so nothing is
lost and nobody is told twice. Plain text, `Auto-Submitted` (RFC 3834): a message to a person
at work, not list mail.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from zoneinfo import ZoneInfo

from sqlalchemy import JSON, Integer, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from mailer.accounts import Role, User
from mailer.config import Settings
from mailer.outgoing import send_now
from mailer.smtp import Outcome
from subscribers.db import Base, UTCDateTime, session_scope, utcnow
from subscribers.regions import Scope, within

log = logging.getLogger(__name__)

# An alert nobody could be mailed (no address to mail) is tried for this long; it
# stays listed by `mailer alerts list` and on the console after that.
MAIL_FOR = timedelta(days=7)
PER_PASS = 20


class CoordinatorAlert(Base):
    __tablename__ = "coordinator_alert"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(160), unique=True)
    kind: Mapped[str] = mapped_column(String(40))  # halt, missed-reminder, quarterly-nudge, ...
    subject: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)  # [] = every region
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    mailed_to: Mapped[list[str]] = mapped_column(JSON, default=list)  # addresses that took it
    mailed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # all of them did
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


def raise_alert(session: Session, key: str, kind: str, subject: str, message: str,
                regions: Iterable[str] = (), now: datetime | None = None) -> bool:
    """Record an alert once per key; True when it is new. Never fails the caller's change
    because another process recorded the same alert a moment ago."""
    if session.scalar(select(CoordinatorAlert.id).where(CoordinatorAlert.key == key)):
        return False
    alert = CoordinatorAlert(key=key[:160], kind=kind, subject=subject[:200], message=message,
                             regions=sorted(set(regions)), created_at=now or utcnow())
    try:
        with session.begin_nested():
            session.add(alert)
    except IntegrityError:
        return False
    log.warning("co-ordinators alerted (%s): %s", kind, subject)
    return True


def key_for(*parts: object) -> str:
    """A short stable key from the parts that make an alert the same one (a long reason is
    hashed, so the key stays within its column)."""
    text = ":".join(str(p) for p in parts)
    if len(text) <= 120:
        return text
    return text[:100] + ":" + hashlib.sha256(text.encode()).hexdigest()[:16]


def recent(session: Session, limit: int = 50, scope: Scope = None
           ) -> Sequence[CoordinatorAlert]:
    """The newest alerts within a region scope: about one of its regions, or about every
    region (`subscribers.regions.within`)."""
    return session.scalars(select(CoordinatorAlert).where(within(scope, CoordinatorAlert.regions))
                           .order_by(CoordinatorAlert.id.desc()).limit(limit)).all()


def recipients(session: Session, regions: Sequence[str], fallback: str = "") -> list[str]:
    """The addresses to tell: active admins, and the co-ordinators of these regions (all of
    them when the alert is not about particular regions); when no such account has an
    address, `fallback` (the contact address, the co-ordinators' shared mailbox)."""
    users = session.scalars(select(User).where(
        User.disabled.is_(False), User.email.is_not(None),
        User.role.in_([Role.ADMIN, Role.COORDINATOR])).order_by(User.id)).all()
    wanted = set(regions)
    found: dict[str, str] = {}  # one mail an address, however its case was typed
    for user in users:
        if user.role == Role.COORDINATOR and wanted and not wanted & set(user.regions or []):
            continue
        address = (user.email or "").strip()
        if address:
            found.setdefault(address.lower(), address)
    return list(found.values()) or ([fallback] if fallback else [])


@dataclass(frozen=True)
class _Mail:
    alert_id: int
    subject: str
    body: str
    to: list[str]
    told_before: bool  # someone has it already (a mail that failed for others last time)


def mail_pending(sessions: sessionmaker[Session], settings: Settings,
                 now: datetime | None = None) -> int:
    """Email the alerts not yet mailed; returns how many are now mailed to everyone."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        waiting = session.scalars(
            select(CoordinatorAlert).where(CoordinatorAlert.mailed_at.is_(None),
                                           CoordinatorAlert.created_at >= now - MAIL_FOR)
            .order_by(CoordinatorAlert.id).limit(PER_PASS)).all()
        mails = []
        for alert in waiting:
            to = [a for a in recipients(session, alert.regions, settings.contact_address)
                  if a not in alert.mailed_to]
            mails.append(_Mail(alert.id, alert.subject, _body(alert, settings), to,
                               bool(alert.mailed_to)))
    done = 0
    for mail in mails:
        accepted: list[str] = []
        errors: list[str] = []
        for address in mail.to:
            problem = _send(settings, address, mail.subject, mail.body)
            (errors if problem else accepted).append(problem or address)
        if not mail.to and not mail.told_before:
            errors.append("no admin or co-ordinator account has an email address, and "
                          "MAILER_CONTACT_ADDRESS is empty")
        with session_scope(sessions) as session:
            row = session.get(CoordinatorAlert, mail.alert_id)
            assert row is not None
            row.attempts += 1
            row.mailed_to = [*row.mailed_to, *accepted]
            row.last_error = "; ".join(errors)[:1000] or None
            if not errors:
                row.mailed_at = now
                done += 1
            else:
                log.warning("alert %s not mailed to everyone: %s", row.key, row.last_error)
    return done


def _body(alert: CoordinatorAlert, settings: Settings) -> str:
    when = alert.created_at.astimezone(ZoneInfo(settings.timezone))
    return (f"{alert.message.strip()}\n\n"
            f"Recorded {when:%A %d %B %Y at %H:%M} UK time.\n"
            f"The console: {settings.base_url}/admin\n\n"
            f"You are told because you are an administrator or a co-ordinator for "
            f"{', '.join(alert.regions) if alert.regions else 'every region'} "
            f"of {settings.from_name}.\n")


def _send(settings: Settings, to: str, subject: str, body: str) -> str | None:
    """Send one alert mail; the reason it was not accepted, or None."""
    from mailer.render import POLICY

    msg = EmailMessage()
    msg["From"] = Address(settings.from_name, addr_spec=settings.from_address)
    msg["To"] = to
    msg["Subject"] = f"[{settings.from_name}] {subject}"
    msg["Date"] = format_datetime(utcnow())
    msg["Message-ID"] = make_msgid(domain=settings.from_address.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(body)
    try:
        result = send_now(settings, to, msg.as_bytes(policy=POLICY))
    except Exception as exc:  # a bad URL or a bug: the alert stays pending, and says why
        return f"{to}: {type(exc).__name__}: {exc}"
    if result.outcome != Outcome.SENT:
        return f"{to}: {result.reply}"
    return None
