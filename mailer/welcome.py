"""The welcome mail, and the short notice for a sign-up that was turned down.

A sign-up becomes active when its owner confirms it (a trusted domain) or a co-ordinator approves
it (any other domain); that reader is then welcomed: what they will get and how often, the
latest issue in the public archive, the next dates of interest with an `.ics` file for each
(`events.occurrence_ics`, the reminders' builder), and how to leave. A sign-up a co-ordinator
turns down gets a kind notice instead.

Both leave through the outbox like every list mail, as an edition of one delivery (kind
`welcome` or `declined`): recorded, retried by the worker, carrying the List-Unsubscribe
headers, and re-checked at send time, so nobody who has left by then is welcomed. Each is
keyed on the sign-up it completes (`store.latest_sign_up`) through the edition's unique slug,
so a second confirmation, an approval run twice or two requests racing make one mail, while a
reader who leaves and later signs up again is welcomed again.

The operation that makes the state change calls `queue_welcome` or `queue_declined` in the
same transaction, so the mail exists if and only if the change does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import events, outbox
from mailer.archive import Archive
from mailer.config import Settings
from mailer.links import Links
from mailer.models import Edition, EditionKind
from mailer.render import Attachment, compile_list_email
from subscribers import store
from subscribers.db import utcnow
from subscribers.models import Subscriber

NEXT_DATES = 3  # how many dates of interest a welcome lists
# How often the reminders come, which their topic's description does not say (the
# newsletter's says "each quarter"; a topic added later says it in its own description).
HOW_OFTEN = {
    "reminders": "A short email ahead of each date, most often two weeks and again a day "
                 "before it.",
}
ICS_TYPE = "text/calendar; charset=utf-8; method=PUBLISH"


@dataclass(frozen=True)
class _Date:
    name: str
    when: str
    description: str
    link: str | None
    ics_name: str


def queue_welcome(session: Session, settings: Settings, subscriber: Subscriber, *,
                  approved: bool = False, now: datetime | None = None) -> Edition | None:
    """Queue the welcome for a reader whose sign-up has just become active (confirmed, or
    `approved` by a co-ordinator). None when this sign-up has had its welcome already, or the
    reader is on no topic."""
    now = now or utcnow()
    topics = store.active_topics(session, subscriber.id)
    if not topics:
        return None
    slug = _slug("welcome", session, subscriber)
    if outbox.edition_exists(session, slug):
        return None
    zone = ZoneInfo(settings.timezone)
    today = now.astimezone(zone).date()
    dates = events.next_dates(session, today, NEXT_DATES)
    shown = [_date(event, day) for event, day in dates]
    latest = _latest_issue(session, settings)
    chosen = {t.slug: t for t in store.list_topics(session) if t.slug in topics}
    subject = "Welcome: you are now subscribed"
    compiled = compile_list_email(
        "welcome",
        {"approved": approved,
         "topics": [{"name": t.name, "description": t.description,
                     "how_often": HOW_OFTEN.get(t.slug, "")} for t in chosen.values()],
         "latest": latest, "archive_url": Links(settings).url("/archive"), "dates": shown},
        settings, subject=subject, title="Welcome", now=now,
        preheader="What you will get, the latest issue and the next dates of interest",
        attachments=[Attachment(d.ics_name, ICS_TYPE,
                                events.occurrence_ics(event, day, settings, now))
                     for d, (event, day) in zip(shown, dates, strict=True)],
        why=(f"You are getting this email because you subscribed to the mailing list of "
             f"{settings.from_name} and your subscription is now active."))
    topic = "newsletter" if "newsletter" in topics else topics[0]
    return _queue(session, slug, EditionKind.WELCOME, topic, subject, compiled.to_dict(),
                  f"welcome for subscriber {subscriber.id}, topics {', '.join(topics)}, "
                  f"dates {', '.join(f'{e.slug} {d}' for e, d in dates) or 'none'}, "
                  f"latest issue {latest['slug'] if latest else 'none'}\n", subscriber, now)


def queue_declined(session: Session, settings: Settings, subscriber: Subscriber, *,
                   now: datetime | None = None) -> Edition | None:
    """Queue the notice for a reader whose sign-up a co-ordinator has just turned down. None
    when this sign-up has had its notice already."""
    now = now or utcnow()
    slug = _slug("declined", session, subscriber)
    if outbox.edition_exists(session, slug):
        return None
    subject = "About your sign-up"
    compiled = compile_list_email(
        "declined", {}, settings, subject=subject, title="About your sign-up", now=now,
        preheader="Thank you for your interest in our mailing list",
        why=(f"You are getting this email because you asked to subscribe to the mailing list "
             f"of {settings.from_name}."))
    topics = store.list_topics(session)
    return _queue(session, slug, EditionKind.DECLINED, topics[0].slug, subject,
                  compiled.to_dict(), f"declined notice for subscriber {subscriber.id}\n",
                  subscriber, now)


def _slug(kind: str, session: Session, subscriber: Subscriber) -> str:
    return f"{kind}-{subscriber.id}-{store.latest_sign_up(session, subscriber.id) or 0}"


def _queue(session: Session, slug: str, kind: EditionKind, topic: str, subject: str,
           compiled: dict[str, object], source: str, subscriber: Subscriber,
           now: datetime) -> Edition | None:
    # Two confirmations racing on PostgreSQL both get here: the unique slug lets one through,
    # and the other waits for it and then finds the row taken, leaving its own change whole.
    try:
        with session.begin_nested():
            edition, _ = outbox.store_edition(
                session, slug=slug, title=subject, subject=subject, topic=topic, regions=[],
                roles=[], source=source, compiled=compiled, actor="system", kind=kind)
            edition.public = False
            outbox.enqueue_one(session, edition, subscriber.id, now=now)
    except IntegrityError:
        return None
    return edition


def _latest_issue(session: Session, settings: Settings) -> dict[str, str] | None:
    entries = Archive(settings).entries(outbox.published(session))
    if not entries:
        return None
    first = entries[0]
    return {"slug": first.slug, "subject": first.subject, "date": first.date_text,
            "url": Links(settings).view_online(first.slug)}


def _date(event: events.Event, day: date) -> _Date:
    return _Date(event.name, events.when_text(event, day), event.description, event.link,
                 events.ics_name(event, day))
