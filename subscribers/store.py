"""Every query on the subscriber tables.

State changes are guarded and idempotent: each one checks the row is in a state it may leave,
does nothing (and records nothing) when the change has already happened, and writes a
`ConsentEvent` when it does change something. Functions take the session first and never commit:
the caller owns the transaction, so a web request or an import is all or nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Insert,
    Integer,
    Select,
    Update,
    any_,
    bindparam,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.dml import ReturningUpdate

from subscribers.db import changed_rows, utcnow
from subscribers.errors import AddressSuppressed, InvalidInput, NotFound, SubscriberError
from subscribers.models import (
    LEFT,
    SENDABLE,
    Channel,
    ConsentAction,
    ConsentEvent,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    Suppression,
    SuppressionReason,
    Topic,
)
from subscribers.regions import within
from subscribers.rules import Rules
from subscribers.validation import (
    email_hmac,
    is_trusted_domain,
    normalise_address,
    normalise_name,
    normalise_organisation,
    vocabulary_value,
)


@dataclass(frozen=True)
class Profile:
    """What a person tells us about themselves, already validated by `profile_from`."""

    email: str
    key: str
    name: str | None = None
    organisation: str | None = None
    organisation_type: str | None = None
    role: str | None = None
    region: str | None = None


def profile_from(rules: Rules, *, email: str | None, name: str | None = None,
                 organisation: str | None = None, organisation_type: str | None = None,
                 role: str | None = None, region: str | None = None) -> Profile:
    """Validate raw input into a `Profile`; raises `InvalidInput` naming the field."""
    address = normalise_address(email, rules)
    return Profile(
        email=address.email,
        key=address.key,
        name=normalise_name(name),
        organisation=normalise_organisation(organisation),
        organisation_type=vocabulary_value(rules, "organisation_type", organisation_type),
        role=vocabulary_value(rules, "role", role),
        region=vocabulary_value(rules, "region", region),
    )


@dataclass(frozen=True)
class Context:
    """Who or what asked for a change, for the consent record."""

    channel: Channel
    actor: str | None = None  # a co-ordinator's login, or None for the subscriber themself
    ip: str | None = None
    user_agent: str | None = None
    consent_version: str | None = None
    lawful_basis: str | None = None
    detail: dict[str, Any] | None = None


# ---------------------------------------------------------------- topics

def list_topics(session: Session) -> Sequence[Topic]:
    return session.scalars(select(Topic).order_by(Topic.id)).all()


def get_topic(session: Session, slug: str) -> Topic:
    topic = session.scalar(select(Topic).where(Topic.slug == slug))
    if topic is None:
        known = ", ".join(t.slug for t in list_topics(session))
        raise NotFound(f"no topic '{slug}' (topics: {known})")
    return topic


def topics_by_slug(session: Session, slugs: Iterable[str]) -> list[Topic]:
    return [get_topic(session, slug) for slug in dict.fromkeys(slugs)]


def add_topic(session: Session, slug: str, name: str, description: str = "") -> Topic:
    if not slug.replace("-", "").replace("_", "").isalnum() or slug != slug.lower():
        raise InvalidInput("slug", "a topic slug is lower-case letters, digits, '-' and '_'")
    if session.scalar(select(Topic.id).where(Topic.slug == slug)) is not None:
        raise SubscriberError(f"topic '{slug}' exists already")
    topic = Topic(slug=slug, name=name.strip(), description=description.strip())
    session.add(topic)
    session.flush()
    return topic


# ---------------------------------------------------------------- lookups

def get(session: Session, subscriber_id: int, scope: tuple[str, ...] | None = None
        ) -> Subscriber:
    """A subscriber by id, within a region scope (None: every region). One outside it is not
    found, so the answer does not tell that it exists."""
    subscriber = session.scalar(select(Subscriber).where(
        Subscriber.id == subscriber_id, Subscriber.status != SubscriberStatus.ERASED,
        within(scope, Subscriber.region)))
    if subscriber is None:
        raise NotFound(f"no subscriber with id {subscriber_id}")
    return subscriber


def find_by_email(session: Session, rules: Rules, email: str) -> Subscriber | None:
    key = normalise_address(email, rules).key
    return session.scalar(select(Subscriber).where(Subscriber.email_key == key))


def get_by_email(session: Session, rules: Rules, email: str,
                 scope: tuple[str, ...] | None = None) -> Subscriber:
    key = normalise_address(email, rules).key
    subscriber = session.scalar(select(Subscriber).where(
        Subscriber.email_key == key, within(scope, Subscriber.region)))
    if subscriber is None:
        raise NotFound("no subscriber with that address")
    return subscriber


def resolve(session: Session, rules: Rules, ident: str,
            scope: tuple[str, ...] | None = None) -> Subscriber:
    """A subscriber named by id (`42`) or by address, as co-ordinators type them."""
    if ident.isdigit():
        return get(session, int(ident), scope)
    return get_by_email(session, rules, ident, scope)


def is_suppressed(session: Session, rules: Rules, key: str) -> bool:
    digest = email_hmac(rules, key)
    return session.scalar(select(exists().where(Suppression.email_hmac == digest))) or False


def active_topics(session: Session, subscriber_id: int) -> list[str]:
    return list(session.scalars(
        select(Topic.slug).join(Subscription)
        .where(Subscription.subscriber_id == subscriber_id,
               Subscription.status == SubscriptionStatus.ACTIVE)
        .order_by(Topic.id)))


def consent_history(session: Session, subscriber_id: int) -> Sequence[ConsentEvent]:
    return session.scalars(select(ConsentEvent).where(ConsentEvent.subscriber_id == subscriber_id)
                           .order_by(ConsentEvent.id)).all()


# ---------------------------------------------------------------- changes

def _record(session: Session, subscriber: Subscriber, action: ConsentAction, ctx: Context,
            topic: str | None = None, **detail: Any) -> None:
    session.add(ConsentEvent(
        subscriber_id=subscriber.id, action=action, channel=ctx.channel, topic=topic,
        consent_version=ctx.consent_version, lawful_basis=ctx.lawful_basis, ip=ctx.ip,
        user_agent=(ctx.user_agent or None) and ctx.user_agent[:300], actor=ctx.actor,
        detail={**(ctx.detail or {}), **detail} or None))


def _set_topics(session: Session, subscriber: Subscriber, topics: Sequence[Topic],
                ctx: Context) -> list[str]:
    """Make each topic active for the subscriber; return the slugs that changed."""
    existing = {s.topic_id: s for s in subscriber.subscriptions}
    changed = []
    for topic in topics:
        row = existing.get(topic.id)
        if row is None:
            subscriber.subscriptions.append(Subscription(topic_id=topic.id))
        elif row.status != SubscriptionStatus.ACTIVE:
            row.status = SubscriptionStatus.ACTIVE
        else:
            continue
        changed.append(topic.slug)
    return changed


class SubscribeOutcome(StrEnum):
    """What a sign-up found; the web layer chooses which email (if any) to send from it."""

    NEW = "new"  # a new pending subscriber: send a confirmation
    STILL_PENDING = "still_pending"  # asked again before confirming: resend, within the caps
    RETURNING = "returning"  # had left (or was suppressed): pending again, needs confirmation
    ALREADY_ACTIVE = "already_active"  # nothing changes: tell them they are subscribed
    AWAITING_APPROVAL = "awaiting_approval"  # confirmed, waiting for a co-ordinator


def subscribe(session: Session, rules: Rules, profile: Profile, topics: Sequence[Topic],
              ctx: Context) -> tuple[Subscriber, SubscribeOutcome]:
    """A sign-up (double opt-in): the subscriber is pending until `confirm`.

    Suppressed and departed addresses may sign up again this way, because the confirmation
    proves that the person who owns the address asked; `confirm` lifts the suppression.
    """
    if not topics:
        raise InvalidInput("topics", "choose at least one topic")
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email_key == profile.key))
    if subscriber is not None and subscriber.status == SubscriberStatus.ACTIVE:
        return subscriber, SubscribeOutcome.ALREADY_ACTIVE
    if subscriber is not None and subscriber.status == SubscriberStatus.AWAITING_APPROVAL:
        return subscriber, SubscribeOutcome.AWAITING_APPROVAL
    if subscriber is None:
        subscriber = Subscriber(email=profile.email, email_key=profile.key, source=ctx.channel,
                                status=SubscriberStatus.PENDING)
        session.add(subscriber)
        outcome = SubscribeOutcome.NEW
    elif subscriber.status == SubscriberStatus.PENDING:
        outcome = SubscribeOutcome.STILL_PENDING
        # An unconfirmed sign-up is deleted a while after it was last asked for
        # (`unconfirmed`); asking again mails a fresh link, so the wait starts again.
        subscriber.updated_at = utcnow()
    else:
        outcome = SubscribeOutcome.RETURNING
        subscriber.status = SubscriberStatus.PENDING
        subscriber.left_at = None
    profile_changed = _apply_profile(subscriber, profile)
    subscriber.email_hmac = email_hmac(rules, profile.key)
    session.flush()
    topics_changed = _set_topics(session, subscriber, topics, ctx)
    # One consent event per change of state: asking again with the same topics, profile and
    # consent wording while still pending changes nothing the record needs to show.
    if (outcome != SubscribeOutcome.STILL_PENDING or profile_changed or topics_changed
            or _last_consent_version(session, subscriber.id) != ctx.consent_version):
        _record(session, subscriber, ConsentAction.SUBSCRIBE, ctx,
                topics=[t.slug for t in topics])
    session.flush()
    return subscriber, outcome


def _last_consent_version(session: Session, subscriber_id: int) -> str | None:
    return session.scalar(
        select(ConsentEvent.consent_version)
        .where(ConsentEvent.subscriber_id == subscriber_id,
               ConsentEvent.action == ConsentAction.SUBSCRIBE)
        .order_by(ConsentEvent.id.desc()).limit(1))


def latest_sign_up(session: Session, subscriber_id: int) -> int | None:
    """The id of the consent event of this person's latest sign-up: what a confirmation and
    an approval complete, so the key of anything that must happen once per sign-up."""
    return session.scalar(
        select(ConsentEvent.id)
        .where(ConsentEvent.subscriber_id == subscriber_id,
               ConsentEvent.action == ConsentAction.SUBSCRIBE)
        .order_by(ConsentEvent.id.desc()).limit(1))


def _apply_profile(subscriber: Subscriber, profile: Profile) -> bool:
    """Copy the fields given; whether any of them changed."""
    changed = subscriber.email != profile.email
    subscriber.email = profile.email
    for name in ("name", "organisation", "organisation_type", "role", "region"):
        value = getattr(profile, name)
        if value is not None and value != getattr(subscriber, name):
            setattr(subscriber, name, value)
            changed = True
    return changed


def confirm(session: Session, rules: Rules, subscriber: Subscriber,
            ctx: Context) -> SubscriberStatus:
    """The owner of the address confirmed. Trusted domains become active; others await approval.

    Idempotent: confirming twice changes nothing the second time.
    """
    if subscriber.status != SubscriberStatus.PENDING:
        return SubscriberStatus(subscriber.status)
    assert subscriber.email_key is not None and subscriber.email_hmac is not None
    lifted = changed_rows(session.execute(
        delete(Suppression).where(Suppression.email_hmac == subscriber.email_hmac)
    ))
    if lifted:
        _record(session, subscriber, ConsentAction.UNSUPPRESS, ctx,
                reason="a fresh double opt-in confirmed the address")
    trusted = is_trusted_domain(rules, subscriber.email_key)
    subscriber.status = SubscriberStatus.ACTIVE if trusted else SubscriberStatus.AWAITING_APPROVAL
    subscriber.confirmed_at = utcnow()
    _record(session, subscriber, ConsentAction.CONFIRM, ctx, trusted_domain=trusted)
    session.flush()
    return SubscriberStatus(subscriber.status)


def approve(session: Session, subscriber: Subscriber, ctx: Context) -> bool:
    if subscriber.status != SubscriberStatus.AWAITING_APPROVAL:
        return False
    subscriber.status = SubscriberStatus.ACTIVE
    _record(session, subscriber, ConsentAction.APPROVE, ctx)
    session.flush()
    return True


def reject(session: Session, subscriber: Subscriber, ctx: Context) -> bool:
    """Turn down a sign-up awaiting approval; the address is not suppressed, only left."""
    if subscriber.status != SubscriberStatus.AWAITING_APPROVAL:
        return False
    _leave(subscriber, SubscriberStatus.UNSUBSCRIBED)
    _record(session, subscriber, ConsentAction.REJECT, ctx)
    session.flush()
    return True


def add_active(session: Session, rules: Rules, profile: Profile, topics: Sequence[Topic],
               ctx: Context) -> Subscriber:
    """Add someone as active on a recorded lawful basis (a co-ordinator or an import).

    Refuses suppressed addresses and people who left: only their own fresh double opt-in may
    bring them back, never a co-ordinator's list.
    """
    if not ctx.lawful_basis:
        raise InvalidInput("lawful_basis", "say on what lawful basis this person is added")
    if not topics:
        raise InvalidInput("topics", "choose at least one topic")
    if is_suppressed(session, rules, profile.key):
        raise AddressSuppressed(
            "this address is suppressed (it was erased, bounced or complained) and cannot be "
            "added again; the person may sign up themselves through the subscribe page")
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email_key == profile.key))
    if subscriber is not None:
        if subscriber.status in LEFT:
            raise AddressSuppressed(
                f"this address is {subscriber.status}; only the person may sign up again")
        raise SubscriberError(f"this address is already a subscriber ({subscriber.status})")
    now = utcnow()
    subscriber = Subscriber(email=profile.email, email_key=profile.key,
                            email_hmac=email_hmac(rules, profile.key),
                            status=SubscriberStatus.ACTIVE, lawful_basis=ctx.lawful_basis,
                            source=(ctx.detail or {}).get("source") or ctx.channel,
                            created_at=now, confirmed_at=now)
    _apply_profile(subscriber, profile)
    session.add(subscriber)
    session.flush()
    _set_topics(session, subscriber, topics, ctx)
    action = ConsentAction.IMPORT if ctx.channel == Channel.IMPORT else ConsentAction.ADD
    _record(session, subscriber, action, ctx, topics=[t.slug for t in topics])
    session.flush()
    return subscriber


def update_profile(session: Session, rules: Rules, subscriber: Subscriber, ctx: Context,
                   **fields: Any) -> bool:
    """Change name, organisation, organisation type, role or region; records what changed."""
    cleaned = {
        "name": normalise_name, "organisation": normalise_organisation,
    }
    changes = {}
    for name, raw in fields.items():
        if name in cleaned:
            value = cleaned[name](raw)
        elif name in ("organisation_type", "role", "region"):
            value = vocabulary_value(rules, name, raw)
        else:
            raise InvalidInput(name, f"'{name}' cannot be changed here")
        if value != getattr(subscriber, name):
            changes[name] = value
    if not changes:
        return False
    for name, value in changes.items():
        setattr(subscriber, name, value)
    _record(session, subscriber, ConsentAction.PROFILE, ctx, fields=sorted(changes))
    session.flush()
    return True


def subscribe_topic(session: Session, subscriber: Subscriber, topic: Topic, ctx: Context) -> bool:
    """Add a topic for an active subscriber (from their preferences page)."""
    if subscriber.status != SubscriberStatus.ACTIVE:
        raise SubscriberError(f"cannot add topics while the subscriber is {subscriber.status}")
    changed = _set_topics(session, subscriber, [topic], ctx)
    if changed:
        _record(session, subscriber, ConsentAction.TOPIC_ADD, ctx, topic=topic.slug)
        session.flush()
    return bool(changed)


def unsubscribe(session: Session, subscriber: Subscriber, ctx: Context,
                topic: Topic | None = None) -> bool:
    """Leave one topic, or (topic=None) everything. Returns whether anything changed."""
    if subscriber.status == SubscriberStatus.ERASED:
        return False
    if topic is not None:
        row = next((s for s in subscriber.subscriptions if s.topic_id == topic.id), None)
        if row is None or row.status == SubscriptionStatus.UNSUBSCRIBED:
            return False
        row.status = SubscriptionStatus.UNSUBSCRIBED
        _record(session, subscriber, ConsentAction.UNSUBSCRIBE, ctx, topic=topic.slug)
        session.flush()
        return True
    if subscriber.status in LEFT:
        return False
    _leave(subscriber, SubscriberStatus.UNSUBSCRIBED)
    _record(session, subscriber, ConsentAction.UNSUBSCRIBE, ctx)
    session.flush()
    return True


@dataclass(frozen=True)
class Unsubscribed:
    changed: bool
    topic_name: str | None  # the topic left, or None when it was everything


def unsubscribe_ids(session: Session, subscriber_id: int, topic_id: int | None,
                    ctx: Context) -> Unsubscribed | None:
    """`unsubscribe` for a caller holding only the ids an unsubscribe token names: the same rules
    and the same consent event, in two or three prebuilt Core statements instead of the ORM's
    load, lazy load, unit of work and flush (the one-click path answers mailbox providers by the
    hundred a second). None when there is no such subscriber, or it was erased. A `topic_id`
    that names no topic (since deleted) leaves everything, as `unsubscribe(topic=None)` would.

    Each change is a guarded UPDATE issued before anything else is read, so the row lock
    (PostgreSQL) or the write lock (SQLite, which then waits out busy_timeout instead of failing
    to upgrade a read snapshot) is held first: two posts racing for one address change it once
    and record one event. Do not use it on a session holding that subscriber's ORM objects,
    which these statements would leave stale.
    """
    q = _unsubscribe_statements()
    conn = session.connection()
    ids = {"sid": subscriber_id, "tid": topic_id}
    status = None
    if topic_id is not None:
        left_topic = conn.execute(q.leave_topic, ids).first()
        if left_topic is not None:  # its guard saw the subscriber there and not erased
            _insert_unsubscribe_event(conn, subscriber_id, ctx, left_topic.slug)
            return Unsubscribed(True, left_topic.name)
        row = conn.execute(q.status_and_topic, ids).first()
        if row is None or row.status == SubscriberStatus.ERASED:
            return None
        if row.slug is not None:
            return Unsubscribed(False, row.name)
        status = row.status  # the topic is gone: leave everything, under the lock already held
    changed = changed_rows(conn.execute(q.leave, {**ids, "now": utcnow()})) == 1
    if changed:
        conn.execute(q.leave_topics, ids)
        _insert_unsubscribe_event(conn, subscriber_id, ctx, None)
        return Unsubscribed(True, None)
    if status is None:
        status = conn.execute(q.status, ids).scalar()
    if status is None or status == SubscriberStatus.ERASED:
        return None
    return Unsubscribed(False, None)


class _UnsubscribeStatements(NamedTuple):
    leave_topic: ReturningUpdate[Any]
    event: Insert
    status_and_topic: Select[Any]
    leave: Update
    leave_topics: Update
    status: Select[Any]


@cache
def _unsubscribe_statements() -> _UnsubscribeStatements:
    # Built once with bound parameters: building and hashing the statement each time cost more
    # than running it.
    sub, subs, topics = Subscriber.__table__, Subscription.__table__, Topic.__table__
    sid, tid = bindparam("sid", type_=Integer), bindparam("tid", type_=Integer)
    unsubscribed = SubscriptionStatus.UNSUBSCRIBED.value
    not_erased = exists().where(sub.c.id == sid, sub.c.status != SubscriberStatus.ERASED.value)
    return _UnsubscribeStatements(
        # RETURNING the topic saves the first, usual, post a SELECT (SQLite has it since 3.35).
        leave_topic=update(subs).where(subs.c.subscriber_id == sid, subs.c.topic_id == tid,
                                       subs.c.status != unsubscribed, not_erased)
        .values(status=unsubscribed)
        .returning(*(select(column).where(topics.c.id == tid).scalar_subquery().label(column.key)
                     for column in (topics.c.slug, topics.c.name))),
        # inline: no RETURNING of the new id, which nothing reads.
        event=insert(ConsentEvent.__table__).inline(),
        status_and_topic=select(sub.c.status, topics.c.slug, topics.c.name).select_from(sub)
        .outerjoin(topics, topics.c.id == tid).where(sub.c.id == sid),
        leave=update(sub).where(sub.c.id == sid, sub.c.status.not_in([s.value for s in LEFT]))
        .values(status=SubscriberStatus.UNSUBSCRIBED.value, left_at=bindparam("now")),
        leave_topics=update(subs).where(subs.c.subscriber_id == sid, subs.c.status != unsubscribed)
        .values(status=unsubscribed),
        status=select(sub.c.status).where(sub.c.id == sid))


def _insert_unsubscribe_event(conn: Connection, subscriber_id: int, ctx: Context,
                              topic: str | None) -> None:
    # The row `_record` would add, as one INSERT without the unit of work.
    conn.execute(_unsubscribe_statements().event, {
        "subscriber_id": subscriber_id, "action": ConsentAction.UNSUBSCRIBE.value,
        "channel": ctx.channel.value, "topic": topic, "consent_version": ctx.consent_version,
        "lawful_basis": ctx.lawful_basis, "ip": ctx.ip,
        "user_agent": (ctx.user_agent or None) and ctx.user_agent[:300], "actor": ctx.actor,
        "detail": {**(ctx.detail or {})} or None})


def _leave(subscriber: Subscriber, status: SubscriberStatus) -> None:
    subscriber.status = status
    subscriber.left_at = utcnow()
    for row in subscriber.subscriptions:
        row.status = SubscriptionStatus.UNSUBSCRIBED


def _suppress(session: Session, digest: str, reason: SuppressionReason) -> None:
    if session.scalar(select(exists().where(Suppression.email_hmac == digest))):
        return
    session.add(Suppression(email_hmac=digest, reason=reason))


def mark_bounced(session: Session, subscriber: Subscriber, ctx: Context) -> bool:
    """A hard bounce: stop mailing and suppress the address."""
    return _mark(session, subscriber, ctx, SubscriberStatus.BOUNCED, ConsentAction.BOUNCE,
                 SuppressionReason.BOUNCED)


def mark_complained(session: Session, subscriber: Subscriber, ctx: Context) -> bool:
    """A spam complaint: unsubscribe from everything and suppress, at once."""
    return _mark(session, subscriber, ctx, SubscriberStatus.COMPLAINED, ConsentAction.COMPLAINT,
                 SuppressionReason.COMPLAINED)


def _mark(session: Session, subscriber: Subscriber, ctx: Context, status: SubscriberStatus,
          action: ConsentAction, reason: SuppressionReason) -> bool:
    if subscriber.status in (status, SubscriberStatus.ERASED):
        return False
    _leave(subscriber, status)
    if subscriber.email_hmac:
        _suppress(session, subscriber.email_hmac, reason)
    _record(session, subscriber, action, ctx)
    session.flush()
    return True


def erase(session: Session, subscriber: Subscriber, ctx: Context) -> None:
    """GDPR erasure: delete the personal data, keep a keyed-HMAC suppression entry and an
    anonymised trail of what happened when (no address, name, IP or user agent)."""
    if subscriber.status == SubscriberStatus.ERASED:
        return
    if subscriber.email_hmac:
        _suppress(session, subscriber.email_hmac, SuppressionReason.ERASED)
    for name in ("email", "email_key", "email_hmac", "name", "organisation",
                 "organisation_type", "role", "region", "source"):
        setattr(subscriber, name, None)
    subscriber.status = SubscriberStatus.ERASED
    subscriber.left_at = utcnow()
    session.execute(delete(Subscription).where(Subscription.subscriber_id == subscriber.id))
    session.execute(update(ConsentEvent).where(ConsentEvent.subscriber_id == subscriber.id)
                    .values(ip=None, user_agent=None, detail=None))
    _record(session, subscriber, ConsentAction.ERASE, Context(channel=ctx.channel, actor=ctx.actor))
    session.flush()
    session.expire(subscriber)


# ---------------------------------------------------------------- retention

def unconfirmed(cutoff: datetime | None = None) -> Any:
    """Sign-ups never confirmed (and, with `cutoff`, not asked for again since: `updated_at`
    moves with every request and change). Such a person never joined: nothing of them is
    kept once the wait is over."""
    never = (Subscriber.status == SubscriberStatus.PENDING) & Subscriber.confirmed_at.is_(None)
    return never if cutoff is None else never & (Subscriber.updated_at < cutoff)


def left_clock() -> Any:
    """When a person who left did so: `left_at`, or for one who asked to come back and never
    confirmed, that last request."""
    return case((Subscriber.status == SubscriberStatus.PENDING, Subscriber.updated_at),
                else_=func.coalesce(Subscriber.left_at, Subscriber.updated_at))


def departed(cutoff: datetime | None = None) -> Any:
    """People who left (unsubscribed, bounced, complained, or asked to come back and never
    confirmed), with `cutoff` before it: due to be erased to the keyed hash."""
    gone = Subscriber.status.in_(sorted(s.value for s in LEFT - {SubscriberStatus.ERASED}))
    returning = (Subscriber.status == SubscriberStatus.PENDING) & Subscriber.confirmed_at.is_not(
        None)
    who = gone | returning
    return who if cutoff is None else who & (left_clock() < cutoff)


def delete_unconfirmed(session: Session, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` unconfirmed sign-ups (`unconfirmed`) with their topics and
    consent events; returns how many. No suppression entry: the address never confirmed, so it
    may be added later on a lawful basis or sign up again."""
    ids = list(session.scalars(select(Subscriber.id).where(unconfirmed(cutoff))
                               .order_by(Subscriber.id).limit(limit)))
    if not ids:
        return 0
    # Explicitly, not through ON DELETE CASCADE, which SQLite honours only with foreign_keys on.
    session.execute(delete(Subscription).where(Subscription.subscriber_id.in_(ids)))
    session.execute(delete(ConsentEvent).where(ConsentEvent.subscriber_id.in_(ids)))
    done = changed_rows(session.execute(
        delete(Subscriber).where(Subscriber.id.in_(ids), unconfirmed(cutoff))
        .execution_options(synchronize_session=False)))
    session.expire_all()
    return done


def departed_ids(session: Session, cutoff: datetime, limit: int) -> list[int]:
    """The ids of up to `limit` people who left before `cutoff` (`departed`)."""
    return list(session.scalars(select(Subscriber.id).where(departed(cutoff))
                                .order_by(Subscriber.id).limit(limit)))


# ---------------------------------------------------------------- segments and counts

def _on_topics(topics: Sequence[str] | None) -> Any:
    """Subscribed (actively) to one of these topics; to any topic when None. EXISTS, not a
    join, so that it can stand beside the send's own join on its topic."""
    # Its own alias: the send's query joins `subscription` too, and an EXISTS naming that
    # table would be correlated to the joined row instead of looking at all of them.
    other = aliased(Subscription)
    condition = exists().where(other.subscriber_id == Subscriber.id,
                               other.status == SubscriptionStatus.ACTIVE)
    if topics is not None:
        condition = condition.where(other.topic_id.in_(
            select(Topic.id).where(Topic.slug.in_(list(topics)))))
    return condition


def segment(topics: Sequence[str] | None, regions: Sequence[str] = (),
            roles: Sequence[str] = (),
            organisation_types: Sequence[str] = (),
            also_topics: Sequence[str] = ()) -> Select[int]:
    """The ids of subscribers an edition goes to: active, on one of the topics (None: any
    topic), also on one of `also_topics` if given (a saved segment's topics), in the regions,
    roles and organisation types if given (empty: all), and not suppressed. A SELECT for the
    outbox's INSERT ... SELECT."""
    query = select(Subscriber.id)
    if topics is None:  # a saved segment's own count: on any topic
        query = query.where(_on_topics(None))
    else:
        # A send's query, as it was before segments: the planner drives it from the topic's
        # subscriptions.
        query = (query.distinct()
                 .join(Subscription, Subscription.subscriber_id == Subscriber.id)
                 .join(Topic, Topic.id == Subscription.topic_id)
                 .where(Topic.slug.in_(list(topics)),
                        Subscription.status == SubscriptionStatus.ACTIVE))
    query = query.where(Subscriber.status.in_(list(SENDABLE)), not_paused(),
                        ~exists().where(Suppression.email_hmac == Subscriber.email_hmac))
    if also_topics:
        query = query.where(_on_topics(also_topics))
    if regions:
        query = query.where(Subscriber.region.in_(list(regions)))
    if roles:
        query = query.where(Subscriber.role.in_(list(roles)))
    if organisation_types:
        query = query.where(Subscriber.organisation_type.in_(list(organisation_types)))
    return query


def at_domains(domains: Sequence[str]) -> ColumnElement[bool]:
    """SQL twin of `validation.in_domains`: the subscriber's address is at one of `domains` or
    a subdomain of one (whole labels: the '@' or '.' before the domain is part of the match).
    In SQL so a send's enqueue and its counts stay set-based."""
    key = func.lower(func.coalesce(Subscriber.email_key, ""))
    matches: list[ColumnElement[bool]] = []
    for domain in domains:
        escaped = domain.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        matches += [key.like(f"%@{escaped}", escape="\\"), key.like(f"%.{escaped}", escape="\\")]
    return or_(*matches) if matches else false()


def is_sendable(session: Session, subscriber_id: int, topic_slug: str) -> bool:
    """The send-time re-check: still active, still on the topic, not suppressed."""
    return subscriber_id in sendable_among(session, [subscriber_id], topic_slug)


# Status and pause are checked in Python, not SQL: with either in the WHERE clause SQLite
# (no statistics) walks the status index over every active subscriber (5 ms for 100 ids at
# 20k, growing with the list) instead of making 100 primary-key lookups. Built once: the
# worker runs it for every batch it claims.
_SENDABLE_CANDIDATES = select(Subscriber.id, Subscriber.status, Subscriber.paused_until).where(
    Subscriber.id.in_(bindparam("ids", expanding=True)),
    exists().where(Subscription.subscriber_id == Subscriber.id,
                   Subscription.status == SubscriptionStatus.ACTIVE,
                   Subscription.topic_id == select(Topic.id).where(
                       Topic.slug == bindparam("topic")).scalar_subquery()),
    ~exists().where(Suppression.email_hmac == Subscriber.email_hmac))


def sendable_among(session: Session, ids: Sequence[int], topic_slug: str) -> set[int]:
    """Which of these subscribers may still be sent `topic_slug` now: the segment's rules,
    driven by the ids (primary-key lookups) rather than by the topic's whole membership."""
    now = utcnow()
    rows = session.execute(_SENDABLE_CANDIDATES, {"ids": list(ids), "topic": topic_slug})
    return {r.id for r in rows if r.status in SENDABLE
            and (r.paused_until is None or r.paused_until <= now)}


_DECLINED_CANDIDATES = select(Subscriber.id).where(
    Subscriber.id.in_(bindparam("ids", expanding=True)),
    Subscriber.status == SubscriberStatus.UNSUBSCRIBED,
    ~exists().where(Suppression.email_hmac == Subscriber.email_hmac))


def declined_among(session: Session, ids: Sequence[int]) -> set[int]:
    """Which of these people may still be told that their sign-up was turned down: still left
    as `reject` left them (not signed up again, bounced, complained or erased since), and not
    suppressed."""
    return set(session.scalars(_DECLINED_CANDIDATES, {"ids": list(ids)}))


def segment_count(session: Session, topics: Sequence[str], regions: Sequence[str] = (),
                  roles: Sequence[str] = ()) -> int:
    return session.scalar(select(func.count()).select_from(
        segment(topics, regions, roles).subquery())) or 0


@dataclass
class Counts:
    by_status: dict[str, int] = field(default_factory=dict)
    by_region: dict[str, int] = field(default_factory=dict)  # active subscribers only
    by_role: dict[str, int] = field(default_factory=dict)
    by_organisation_type: dict[str, int] = field(default_factory=dict)
    by_topic: dict[str, int] = field(default_factory=dict)  # active subscriptions


def counts(session: Session, regions: Sequence[str] | None = None) -> Counts:
    """Subscriber figures within a region scope (`regions.within`; None: every region)."""
    in_scope = within(None if regions is None else tuple(regions), Subscriber.region)
    active = Subscriber.status == SubscriberStatus.ACTIVE
    out = Counts()
    out.by_status = dict(session.execute(
        select(Subscriber.status, func.count()).where(in_scope).group_by(Subscriber.status)).all())
    for column, target in ((Subscriber.region, out.by_region), (Subscriber.role, out.by_role),
                           (Subscriber.organisation_type, out.by_organisation_type)):
        for value, n in session.execute(
                select(column, func.count()).where(active, in_scope).group_by(column)):
            target[value or "(not given)"] = n
    per_topic = dict(session.execute(
        select(Topic.slug, func.count())
        .join(Subscription, Subscription.topic_id == Topic.id)
        .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
        .where(Subscription.status == SubscriptionStatus.ACTIVE, active, in_scope)
        .group_by(Topic.slug)).all())
    out.by_topic = {t.slug: per_topic.get(t.slug, 0) for t in list_topics(session)}
    return out


@dataclass(frozen=True)
class Filter:
    status: str | None = None
    region: str | None = None
    role: str | None = None
    topic: str | None = None
    search: str | None = None  # part of the address, name or organisation
    # A co-ordinator's regions: nobody outside them, whatever `region` says (None: no limit).
    scope: tuple[str, ...] | None = None


def _filtered(flt: Filter) -> Select[Subscriber]:
    query = select(Subscriber).where(Subscriber.status != SubscriberStatus.ERASED)
    if flt.scope is not None:
        query = query.where(within(flt.scope, Subscriber.region))
    if flt.status:
        query = query.where(Subscriber.status == flt.status)
    if flt.region:
        query = query.where(Subscriber.region == flt.region)
    if flt.role:
        query = query.where(Subscriber.role == flt.role)
    if flt.topic:
        query = query.where(exists().where(
            Subscription.subscriber_id == Subscriber.id, Subscription.topic_id == Topic.id,
            Topic.slug == flt.topic, Subscription.status == SubscriptionStatus.ACTIVE))
    if flt.search:
        like = f"%{flt.search.lower().replace('%', '').replace('_', '')}%"
        query = query.where(func.lower(Subscriber.email_key).like(like)
                            | func.lower(Subscriber.name).like(like)
                            | func.lower(Subscriber.organisation).like(like))
    return query


# What a list of subscribers can be sorted by (a name for each, as the console's links say).
SORTS: dict[str, Any] = {
    "added": Subscriber.id, "address": Subscriber.email_key,
    "name": func.lower(func.coalesce(Subscriber.name, "")),
    "organisation": func.lower(func.coalesce(Subscriber.organisation, "")),
    "region": func.coalesce(Subscriber.region, ""), "status": Subscriber.status,
}


def list_subscribers(session: Session, flt: Filter = Filter(), limit: int = 50,
                     offset: int = 0, sort: str = "added", descending: bool = False
                     ) -> tuple[int, Sequence[Subscriber]]:
    """One page of the filtered list, in `sort` order (ties in the order they were added, so
    paging never shows a row twice); an unknown sort is refused."""
    if sort not in SORTS:
        raise InvalidInput("sort", f"cannot sort by {sort[:40]!r}")
    query = _filtered(flt)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    key = SORTS[sort].desc() if descending else SORTS[sort].asc()
    rows = session.scalars(query.order_by(key, Subscriber.id).limit(limit)
                           .offset(offset)).all()
    return total, rows


def iter_export(session: Session, flt: Filter = Filter(),
                batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Subscribers as plain dicts, in id order, fetched in batches so memory stays flat."""
    last_id = 0
    while True:
        rows = session.scalars(_filtered(flt).where(Subscriber.id > last_id)
                               .order_by(Subscriber.id).limit(batch)).all()
        if not rows:
            return
        topics = _topics_of(session, [r.id for r in rows])
        for row in rows:
            yield {**_profile_dict(row), "topics": topics.get(row.id, [])}
        last_id = rows[-1].id
        session.expunge_all()


def _topics_of(session: Session, ids: Sequence[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for sid, slug in session.execute(
            select(Subscription.subscriber_id, Topic.slug).join(Topic)
            .where(Subscription.subscriber_id.in_(ids),
                   Subscription.status == SubscriptionStatus.ACTIVE).order_by(Topic.id)):
        out.setdefault(sid, []).append(slug)
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _profile_dict(s: Subscriber) -> dict[str, Any]:
    return {
        "id": s.id, "email": s.email, "name": s.name, "organisation": s.organisation,
        "organisation_type": s.organisation_type, "role": s.role, "region": s.region,
        "status": s.status, "lawful_basis": s.lawful_basis, "source": s.source,
        "created_at": _iso(s.created_at), "confirmed_at": _iso(s.confirmed_at),
        "left_at": _iso(s.left_at),
    }


def subject_access(session: Session, subscriber: Subscriber, *,
                   for_them: bool = False) -> dict[str, Any]:
    """Everything we hold on one person (UK GDPR Art. 15): profile, subscriptions, history.
    `for_them`: the copy the person downloads themself (see `_consent_entry`)."""
    subscriptions = session.execute(
        select(Topic.slug, Subscription.status, Subscription.created_at, Subscription.updated_at)
        .join(Topic).where(Subscription.subscriber_id == subscriber.id).order_by(Topic.id)).all()
    return {
        "profile": _profile_dict(subscriber),
        "subscriptions": [{"topic": t, "status": st, "since": _iso(c), "changed": _iso(u)}
                          for t, st, c, u in subscriptions],
        "consent_history": [_consent_entry(e, for_them)
                            for e in consent_history(session, subscriber.id)],
    }


def _consent_entry(event: ConsentEvent, for_them: bool) -> dict[str, Any]:
    """One step of the history. In the person's own copy, their own steps carry their address
    and browser; a co-ordinator's would carry the co-ordinator's, which are not the reader's to
    have (UK GDPR Art. 15(4): a copy must not affect the rights of others), so a co-ordinator
    is named by role only there. The console shows who it was."""
    own = event.actor is None or not for_them
    by = event.actor if own or event.channel == Channel.SYSTEM else "a co-ordinator"
    return {"at": _iso(event.occurred_at), "action": event.action, "channel": event.channel,
            "topic": event.topic, "consent_version": event.consent_version,
            "lawful_basis": event.lawful_basis, "ip": event.ip if own else None,
            "user_agent": event.user_agent if own else None, "by": by, "detail": event.detail}


# ---------------------------------------------------------------- bulk import

def _among(session: Session, column: Any, values: Sequence[str]) -> Any:
    """`column IN values`, for the thousands of values an import batch looks up at once.

    On PostgreSQL as `= ANY(array)`: one parameter, where IN gives each value its own, and
    SQLAlchemy and psycopg spent more time on those than the server did on the lookups.
    """
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(list(values), ARRAY(column.type)))
    return column.in_(list(values))


def existing_by_key(session: Session, keys: Sequence[str]) -> dict[str, str]:
    """Status of each key that is already a subscriber."""
    rows = session.execute(select(Subscriber.email_key, Subscriber.status)
                           .where(_among(session, Subscriber.email_key, keys)))
    return {key: status for key, status in rows if key is not None}  # erased rows have none


def suppressed_among(session: Session, digests: Sequence[str]) -> set[str]:
    return set(session.scalars(
        select(Suppression.email_hmac).where(_among(session, Suppression.email_hmac, digests))))


def refresh_statistics(session: Session) -> None:
    """After a bulk load: PostgreSQL plans from statistics that autovacuum refreshes only
    later, and with none, per-row lookups (the worker's send-time re-check) become scans."""
    if session.get_bind().dialect.name == "postgresql":
        for table in (Subscriber.__table__, Subscription.__table__, ConsentEvent.__table__):
            session.execute(text(f"ANALYZE {table.name}"))


def bulk_add_active(session: Session, rules: Rules,
                    profiles: Sequence[tuple[Profile, Sequence[Topic]]], ctx: Context,
                    digests: Mapping[str, str] | None = None) -> int:
    """Insert many new active subscribers at once (an import), with their topics and consent
    events. The caller has already excluded existing, departed and suppressed addresses.

    `digests` (key -> `email_hmac`) saves recomputing hashes the caller already has.
    """
    for start in range(0, len(profiles), _BULK_CHUNK):
        _bulk_add_chunk(session, rules, profiles[start:start + _BULK_CHUNK], ctx, digests)
    return len(profiles)


# Bounds each IN list (SQLite allows 32,766 parameters) and the rows held at once.
_BULK_CHUNK = 2000


def _bulk_add_chunk(session: Session, rules: Rules,
                    profiles: Sequence[tuple[Profile, Sequence[Topic]]], ctx: Context,
                    digests: Mapping[str, str] | None) -> None:
    if not profiles:
        return
    now = utcnow()
    source = (ctx.detail or {}).get("source") or ctx.channel
    sub = Subscriber.__table__
    session.execute(insert(sub), [{
        "email": p.email, "email_key": p.key,
        "email_hmac": digests[p.key] if digests else email_hmac(rules, p.key),
        "name": p.name, "organisation": p.organisation, "organisation_type": p.organisation_type,
        "role": p.role, "region": p.region, "status": SubscriberStatus.ACTIVE,
        "lawful_basis": ctx.lawful_basis, "source": source, "bounce_score": 0.0,
        "created_at": now, "updated_at": now, "confirmed_at": now,
    } for p, _ in profiles])
    # The subscriptions and consent events differ only by topic, so each is one INSERT ...
    # SELECT over the new rows (found by their unique key) per topic or topic list: the database
    # writes those rows, instead of SQLAlchemy binding and converting every value of every row,
    # which was most of an import's time. No ids travel back to Python.
    by_topic: dict[int, list[str]] = {}
    by_topics: dict[tuple[str, ...], list[str]] = {}
    for profile, topics in profiles:
        unique = {t.id: t.slug for t in topics}
        for topic_id in unique:
            by_topic.setdefault(topic_id, []).append(profile.key)
        by_topics.setdefault(tuple(unique.values()), []).append(profile.key)
    subscription, event = Subscription.__table__, ConsentEvent.__table__
    for topic_id, keys in by_topic.items():
        session.execute(insert(subscription).from_select(
            ["subscriber_id", "topic_id", "status", "created_at", "updated_at"],
            select(sub.c.id, literal(topic_id, Integer()),
                   literal(SubscriptionStatus.ACTIVE.value, subscription.c.status.type),
                   literal(now, subscription.c.created_at.type),
                   literal(now, subscription.c.updated_at.type))
            .where(_among(session, sub.c.email_key, keys))))
    for slugs, keys in by_topics.items():
        session.execute(insert(event).from_select(
            ["subscriber_id", "action", "channel", "lawful_basis", "consent_version", "actor",
             "detail", "occurred_at"],
            select(sub.c.id, literal(ConsentAction.IMPORT.value, event.c.action.type),
                   literal(str(ctx.channel), event.c.channel.type),
                   literal(ctx.lawful_basis, event.c.lawful_basis.type),
                   literal(ctx.consent_version, event.c.consent_version.type),
                   literal(ctx.actor, event.c.actor.type),
                   literal({**(ctx.detail or {}), "topics": list(slugs)}, event.c.detail.type),
                   literal(now, event.c.occurred_at.type))
            .where(_among(session, sub.c.email_key, keys)).order_by(sub.c.id)))


# ---------------------------------------------------------------- web
# Queries for the recipient web pages (mailer.web.public). Same rules as above: session first,
# never commit.

def find(session: Session, subscriber_id: int) -> Subscriber | None:
    """The subscriber a token names, or None if there is none (or it was erased): a token page
    then shows its generic answer instead of an error."""
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber.status == SubscriberStatus.ERASED:
        return None
    return subscriber


def topic_by_id(session: Session, topic_id: int) -> Topic | None:
    return session.get(Topic, topic_id)


def ping(session: Session) -> bool:
    """True when the database answers; for /healthz."""
    return session.scalar(select(func.count()).select_from(Topic)) is not None


def pause(session: Session, subscriber: Subscriber, ctx: Context,
          until: datetime | None) -> bool:
    """No mail until `until` (None resumes). Returns whether anything changed."""
    if subscriber.status != SubscriberStatus.ACTIVE and until is not None:
        raise SubscriberError(f"cannot pause while the subscriber is {subscriber.status}")
    if subscriber.paused_until == until:
        return False
    if until is None and subscriber.paused_until is None:
        return False
    subscriber.paused_until = until
    _record(session, subscriber, ConsentAction.PAUSE, ctx,
            paused_until=until.isoformat() if until else None)
    session.flush()
    return True


def not_paused(now: datetime | None = None) -> Any:
    """A paused subscriber gets no mail until the date (part of `segment`)."""
    moment = now or utcnow()
    return (Subscriber.paused_until.is_(None)) | (Subscriber.paused_until <= moment)


# ---------------------------------------------------------------- yearly reconfirmation
# A reader is asked once a cycle whether they still work with MSHT. A cycle starts at their
# confirmation or their last "yes", whichever is later; the request of a cycle is the
# `reconfirm_asked_at` at or after that start. Who is lapsed is the status, so `SENDABLE`
# alone keeps them out of every send.

def reconfirm_cycle_start() -> Any:
    """When the reader's current cycle began. The later of the two, not the first non-null:
    someone who left and signed up again has a confirmation newer than an old "yes". A row
    without either (added before confirmations were dated) counts from when it was added."""
    return case((Subscriber.reconfirmed_at > Subscriber.confirmed_at, Subscriber.reconfirmed_at),
                else_=func.coalesce(Subscriber.confirmed_at, Subscriber.reconfirmed_at,
                                    Subscriber.created_at))


def _asked_this_cycle() -> Any:
    # Strictly after: a request always comes a cycle after its start, while a "yes" at the
    # very moment of the request (a frozen clock, a coarse one) must start a new cycle.
    return Subscriber.reconfirm_asked_at.is_not(None) & (
        Subscriber.reconfirm_asked_at > reconfirm_cycle_start())


def reconfirm_due(now: datetime, after: timedelta) -> Any:
    """Active readers whose cycle is `after` old and who have not been asked in it. A paused
    reader is asked once the pause ends: a request they cannot be expected to read would
    lapse them for being away."""
    return ((Subscriber.status == SubscriberStatus.ACTIVE) & ~_asked_this_cycle()
            & (reconfirm_cycle_start() <= now - after) & not_paused(now))


def reconfirm_waiting() -> Any:
    """Asked this cycle and not answered (yet)."""
    return (Subscriber.status == SubscriberStatus.ACTIVE) & _asked_this_cycle()


def lapse_due(now: datetime, window: timedelta) -> Any:
    """Asked this cycle, and the answer window is over."""
    return reconfirm_waiting() & (Subscriber.reconfirm_asked_at <= now - window)


def reconfirm_due_ids(session: Session, now: datetime, after: timedelta,
                      limit: int) -> list[int]:
    """Up to `limit` readers due to be asked, the longest waiting first."""
    if limit <= 0:
        return []
    return list(session.scalars(select(Subscriber.id).where(reconfirm_due(now, after))
                                .order_by(reconfirm_cycle_start(), Subscriber.id).limit(limit)))


def count_reconfirm_due(session: Session, now: datetime, after: timedelta) -> int:
    return session.scalar(select(func.count()).select_from(Subscriber)
                          .where(reconfirm_due(now, after))) or 0


def is_reconfirm_due(session: Session, subscriber_id: int, now: datetime,
                     after: timedelta) -> bool:
    return bool(session.scalar(select(exists().where(Subscriber.id == subscriber_id,
                                                     reconfirm_due(now, after)))))


def count_reconfirm_asked_since(session: Session, since: datetime) -> int:
    """Requests sent since `since`, whatever became of the readers since."""
    return session.scalar(select(func.count()).select_from(Subscriber).where(
        Subscriber.reconfirm_asked_at >= since)) or 0


def mark_reconfirm_asked(session: Session, subscriber_id: int, now: datetime,
                         after: timedelta, ctx: Context) -> bool:
    """Record that this cycle's request went out; False (and nothing recorded) when the reader
    is no longer due (asked already, left, paused), so a cycle is asked once."""
    done = changed_rows(session.execute(
        update(Subscriber).where(Subscriber.id == subscriber_id, reconfirm_due(now, after))
        .values(reconfirm_asked_at=now).execution_options(synchronize_session=False)))
    if done:
        _record_id(session, subscriber_id, ConsentAction.RECONFIRM_ASK, ctx)
    return bool(done)


def lapse_overdue(session: Session, now: datetime, window: timedelta, ctx: Context,
                  limit: int) -> int:
    """Lapse up to `limit` readers whose answer window is over; how many. Each is a guarded
    UPDATE, so a second run (or a "yes" that came first) changes nothing."""
    ids = list(session.scalars(select(Subscriber.id).where(lapse_due(now, window))
                               .order_by(Subscriber.id).limit(limit)))
    lapsed = 0
    for subscriber_id in ids:
        if changed_rows(session.execute(
                update(Subscriber).where(Subscriber.id == subscriber_id, lapse_due(now, window))
                .values(status=SubscriberStatus.LAPSED)
                .execution_options(synchronize_session=False))):
            _record_id(session, subscriber_id, ConsentAction.LAPSE, ctx)
            lapsed += 1
    session.expire_all()
    return lapsed


def reconfirm(session: Session, subscriber: Subscriber, ctx: Context) -> bool:
    """The reader answered "yes": a new cycle starts, and a lapsed reader is active again.
    False when there was nothing to answer (not asked this cycle, or not active or lapsed),
    so a second press records nothing."""
    lapsed = subscriber.status == SubscriberStatus.LAPSED
    if not lapsed:
        waiting = session.scalar(select(exists().where(
            Subscriber.id == subscriber.id, reconfirm_waiting())))
        if not waiting:
            return False
    subscriber.status = SubscriberStatus.ACTIVE
    subscriber.reconfirmed_at = utcnow()
    _record(session, subscriber, ConsentAction.RECONFIRM, ctx, was_lapsed=lapsed)
    session.flush()
    return True


@dataclass(frozen=True)
class ReconfirmCounts:
    due: int  # to be asked (spread over the coming days)
    asked: int  # asked, no answer yet, still within the window
    answered: int  # said yes within the last cycle
    lapsed: int  # no answer in time: not mailed until they answer


def reconfirm_counts(session: Session, now: datetime, after: timedelta,
                     scope: tuple[str, ...] | None = None) -> ReconfirmCounts:
    """The reconfirmation figures within a region scope (None: every region)."""
    in_scope = within(scope, Subscriber.region)

    def n(condition: Any) -> int:
        return session.scalar(select(func.count()).select_from(Subscriber)
                              .where(condition, in_scope)) or 0

    return ReconfirmCounts(
        due=n(reconfirm_due(now, after)), asked=n(reconfirm_waiting()),
        answered=n((Subscriber.status == SubscriberStatus.ACTIVE)
                   & (Subscriber.reconfirmed_at > now - after)),
        lapsed=n(Subscriber.status == SubscriberStatus.LAPSED))


def _record_id(session: Session, subscriber_id: int, action: ConsentAction,
               ctx: Context) -> None:
    # `_record` for a change made by a guarded UPDATE, without loading the row.
    session.add(ConsentEvent(
        subscriber_id=subscriber_id, action=action, channel=ctx.channel, actor=ctx.actor,
        consent_version=ctx.consent_version, lawful_basis=ctx.lawful_basis,
        detail=ctx.detail or None))
