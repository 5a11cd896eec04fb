"""What a reader does for themself on the recipient pages: sign up, confirm, say yes to the
yearly reconfirmation, unsubscribe (and undo it), change their preferences, take a copy of
their data, erase themself. A reader acts through a signed link (the token names them) or a
form, not a console account, so there is no permission check here: each change writes its
consent event, in `subscribers.store`, in the change's transaction. Erasure alone also writes
an audit entry, because the audit log is where every erasure is answered for, whoever asked
for it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from mailer import audit, privacy, welcome
from mailer.config import Settings
from subscribers import store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput, SubscriberError
from subscribers.models import Subscriber, SubscriberStatus
from subscribers.rules import Rules
from subscribers.store import Context, SubscribeOutcome

FIELDS = ("email", "name", "organisation", "organisation_type", "role", "region")
UNDO_WINDOW = dt.timedelta(days=1)
PAUSES = ("keep", "0", "1", "3", "6", "12")  # months; 0 ends a pause


@dataclass
class SignUpForm:
    """A sign-up form checked: what was wrong with it, or the profile and topics it asks for.
    Checking touches nothing that depends on the address, so it takes the same time for an
    address we know and one we do not."""

    errors: dict[str, str] = field(default_factory=dict)
    profile: store.Profile | None = None
    topics: list[str] = field(default_factory=list)


@dataclass
class SignUp:
    """A sign-up's outcome: who it names now, and what it found."""

    subscriber: Subscriber
    outcome: SubscribeOutcome
    topic_names: list[str] = field(default_factory=list)


def check_sign_up(session: Session, rules: Rules, values: Mapping[str, str], topics: list[str],
                  consent: bool) -> SignUpForm:
    """Check a sign-up form; nothing is written."""
    result = SignUpForm()
    try:
        result.profile = store.profile_from(rules, **{n: values.get(n) or None for n in FIELDS})
    except InvalidInput as exc:
        result.errors[exc.field] = str(exc)
    chosen = []
    try:
        chosen = store.topics_by_slug(session, topics)
    except SubscriberError:
        result.errors["topics"] = "choose from the topics listed"
    if not chosen and "topics" not in result.errors:
        result.errors["topics"] = "choose at least one topic"
    if not consent:
        result.errors["consent"] = ("tick the box to agree, so that we may send you the "
                                    "newsletter")
    result.topics = [t.slug for t in chosen]
    return result


def sign_up(session: Session, rules: Rules, form: SignUpForm, ctx: Context) -> SignUp:
    """Subscribe (pending a confirmation) as a checked form asks. The web does this after it
    has answered, so that the answer's time does not tell whether the address was known."""
    assert form.profile is not None and not form.errors
    chosen = store.topics_by_slug(session, form.topics)
    subscriber, outcome = store.subscribe(session, rules, form.profile, chosen, ctx)
    return SignUp(subscriber, outcome, [t.name for t in chosen])


def confirm(session: Session, settings: Settings, rules: Rules, subscriber_id: int,
            ctx: Context) -> str | None:
    """Confirm a sign-up from its link; the status it leads to, or None if nobody is left.
    A sign-up this makes active is welcomed (`mailer.welcome`); a second press changes
    nothing, so it queues nothing."""
    subscriber = store.find(session, subscriber_id)
    if subscriber is None:
        return None
    was = subscriber.status
    status = store.confirm(session, rules, subscriber, ctx)
    if was == SubscriberStatus.PENDING and status == SubscriberStatus.ACTIVE:
        welcome.queue_welcome(session, settings, subscriber)
    return str(status)


def reconfirm(session: Session, subscriber_id: int, ctx: Context) -> str | None:
    """The yearly "yes, I still work with MSHT" from its link: the status it leads to (a
    lapsed reader is active again), or None if nobody is left."""
    subscriber = store.find(session, subscriber_id)
    if subscriber is None:
        return None
    store.reconfirm(session, subscriber, ctx)
    return str(subscriber.status)


def unsubscribe(session: Session, subscriber_id: int, topic_id: int | None, ctx: Context
                ) -> store.Unsubscribed | None:
    """The one-click unsubscribe (one topic, or everything when `topic_id` is None)."""
    return store.unsubscribe_ids(session, subscriber_id, topic_id, ctx)


def undo_unsubscribe(session: Session, rules: Rules, subscriber_id: int, topic_id: int | None,
                     ctx: Context) -> str:
    """Undo an unsubscribe pressed by mistake: a topic for someone still active, or the whole
    subscription for a day after leaving; a bounced or complained address never comes back
    this way. Returns "active", the status it leads to, or "gone"."""
    subscriber = store.find(session, subscriber_id)
    if subscriber is None:
        return "gone"
    topic = store.topic_by_id(session, topic_id) if topic_id else None
    if subscriber.status == SubscriberStatus.ACTIVE and topic is not None:
        store.subscribe_topic(session, subscriber, topic, ctx)
        return "active"
    recent = subscriber.left_at is not None and utcnow() - subscriber.left_at < UNDO_WINDOW
    if subscriber.status != SubscriberStatus.UNSUBSCRIBED or not recent:
        return "gone" if subscriber.status != SubscriberStatus.ACTIVE else "active"
    assert subscriber.email and subscriber.email_key
    topics = [topic] if topic else store.list_topics(session)
    profile = store.Profile(email=subscriber.email, key=subscriber.email_key)
    subscriber, _ = store.subscribe(session, rules, profile, list(topics), ctx)
    return str(store.confirm(session, rules, subscriber, ctx))


def months_from(now: dt.datetime, months: int) -> dt.datetime:
    month = now.month - 1 + months
    year, month = now.year + month // 12, month % 12 + 1
    day = min(now.day, 28)  # every month has a 28th; a pause need not be day-exact
    return now.replace(year=year, month=month, day=day, microsecond=0)


def set_preferences(session: Session, rules: Rules, subscriber: Subscriber,
                    fields: Mapping[str, str | None], wanted: Collection[str], pause: str,
                    ctx: Context) -> dict[str, str]:
    """Save an active reader's preferences page: profile fields, topics and a pause.
    Returns the fields that were refused (the rest is saved)."""
    if pause not in PAUSES:
        raise InvalidInput("pause", "choose a pause from the list")
    errors: dict[str, str] = {}
    try:
        store.update_profile(session, rules, subscriber, ctx, **fields)
    except InvalidInput as exc:
        errors[exc.field] = str(exc)
    for topic in store.list_topics(session):
        if topic.slug in wanted:
            store.subscribe_topic(session, subscriber, topic, ctx)
        else:
            store.unsubscribe(session, subscriber, ctx, topic=topic)
    if pause != "keep":
        until = None if pause == "0" else months_from(utcnow(), int(pause))
        store.pause(session, subscriber, ctx, until)
    return errors


def own_data(session: Session, subscriber_id: int) -> dict[str, Any] | None:
    """Everything held on the reader a link names (UK GDPR Art. 15 and 20): the co-ordinators'
    subject-access export of them, less the co-ordinators' own details. None when the link names
    nobody, or someone already erased."""
    subscriber = store.find(session, subscriber_id)
    if subscriber is None:
        return None
    return {"exported_at": utcnow().isoformat(),
            **privacy.subject_access(session, subscriber, for_them=True)}


def erase(session: Session, subscriber_id: int, ctx: Context) -> bool:
    """Erase the reader a link names, as a co-ordinator's erase does (UK GDPR Art. 17): only a
    keyed hash of the address stays, on the suppression list. False when the link names
    nobody, or someone already erased, so a second press changes nothing."""
    subscriber = store.find(session, subscriber_id)
    if subscriber is None:
        return False
    privacy.erase(session, subscriber, ctx)
    # The co-ordinators' entry, with the reader as the actor. Named by id only, and without
    # the IP address: the erasure has just removed that from their consent history, and the
    # audit log outlives it.
    target = f"subscriber:{subscriber_id}"
    audit.record(session, actor=target, via="web", action="subscriber.erase", target=target)
    return True
