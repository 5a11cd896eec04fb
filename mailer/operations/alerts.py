"""Bounces and alerts: the bounce records, the open bounce alerts that wait for a decision,
and the alerts mailed to the co-ordinators, each as the caller may see them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailer import alerts, bounce_policy, outbox
from mailer.accounts import Permission
from mailer.bounce_policy import BouncePolicy
from mailer.errors import NotFound, OutOfScope
from mailer.operations import Caller
from subscribers import store

RECENT_BOUNCES = 50
BOUNCE_KINDS = ("hard", "soft", "complaint")
# Closing a bounce alert may mark subscribers bounced: the permission that changes subscribers.
RESOLVE_ALERT = Permission.SUBSCRIBERS_EDIT


@dataclass(frozen=True)
class AlertView:
    """An open bounce alert as the faces show it, with whether this caller may close it."""

    id: int
    kind: str
    domain: str
    edition_id: int | None
    edition: str | None  # its slug, when the edition still exists
    regions: tuple[str, ...]  # the edition's audience; every region when it has none
    recipients: int
    bounced: int
    share: float
    detail: str
    created_at: dt.datetime
    updated_at: dt.datetime
    can_resolve: bool


def _alert_regions(session: Session, edition_id: int | None,
                   every_region: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The regions an alert is about (its send's audience) and the send's slug. A send to
    every region, or one that is gone, is everyone's: only who covers every region closes it."""
    if edition_id is None:
        return every_region, None
    try:
        edition = outbox.get_edition(session, edition_id)
    except NotFound:
        return every_region, None
    return tuple(edition.regions or every_region), edition.slug


def open_bounce_alerts(session: Session, caller: Caller, every_region: tuple[str, ...]
                       ) -> list[AlertView]:
    """Every open bounce alert. Everyone signed in sees them all (a domain and counts, no
    one's address): a Kent co-ordinator should know that Essex's mail is bouncing, though
    only Essex's may act."""
    views = []
    for a in bounce_policy.open_alerts(session):
        regions, slug = _alert_regions(session, a.edition_id, every_region)
        views.append(AlertView(
            id=a.id, kind=a.kind, domain=a.domain, edition_id=a.edition_id, edition=slug,
            regions=regions, recipients=a.recipients or 0, bounced=a.bounced or 0,
            share=a.share or 0.0, detail=a.detail, created_at=a.created_at,
            updated_at=a.updated_at,
            can_resolve=caller.actor.can(RESOLVE_ALERT) and caller.actor.covers(regions)))
    return views


def resolve_bounce_alert(session: Session, caller: Caller, policy: BouncePolicy, aid: int, *,
                         apply: bool, every_region: tuple[str, ...]
                         ) -> tuple[bounce_policy.BounceAlert, int]:
    """Apply or dismiss one bounce alert; returns it and how many subscribers it marked
    bounced. Only who covers the send's whole audience; one resolved already is a conflict."""
    caller.require(RESOLVE_ALERT)
    # Locked (FOR UPDATE on PostgreSQL) so that two people closing it at once are one
    # resolution: the second waits, then finds it closed.
    alert = session.get(bounce_policy.BounceAlert, aid, with_for_update=True)
    if alert is None:
        raise NotFound(f"no bounce alert {aid}")
    regions, _slug = _alert_regions(session, alert.edition_id, every_region)
    if not caller.actor.covers(regions):
        raise OutOfScope(f"this alert is about a send to {', '.join(regions)}, outside your "
                         "regions")
    changed = bounce_policy.resolve_alert(session, policy, aid, caller.actor.login, apply=apply)
    caller.record(session, f"bounce_alert.{'apply' if apply else 'dismiss'}",
                  f"bounce_alert:{aid}", kind=alert.kind, domain=alert.domain,
                  edition_id=alert.edition_id, marked_bounced=changed)
    return alert, changed


@dataclass(frozen=True)
class ToldView:
    """One alert to the co-ordinators (`mailer.alerts`) and how far its mailing got."""

    id: int
    subject: str
    kind: str
    regions: tuple[str, ...]  # empty: about every region
    created_at: dt.datetime
    mailed: bool  # to everyone it was for
    mailed_to: int  # how many addresses took it
    state: str  # how far the mailing got, in words
    last_error: str | None  # why it is not mailed to everyone yet


def coordinator_alerts(session: Session, caller: Caller, now: dt.datetime, limit: int = 10
                       ) -> list[ToldView]:
    """The newest alerts as they are mailed: about the caller's regions or about every
    region, not another region's."""
    return [ToldView(id=a.id, subject=a.subject, kind=a.kind, regions=tuple(a.regions or ()),
                     created_at=a.created_at, mailed=a.mailed_at is not None,
                     mailed_to=len(a.mailed_to or []), state=_mailing(a, now),
                     last_error=a.last_error if a.mailed_at is None else None)
            for a in alerts.recent(session, limit, caller.scope)]


def _mailing(alert: alerts.CoordinatorAlert, now: dt.datetime) -> str:
    got = len(alert.mailed_to or [])
    if alert.mailed_at is not None:
        return f"Mailed to {got}"
    so_far = f", {got} got it" if got else ""
    if alert.created_at < now - alerts.MAIL_FOR:  # `mail_pending` tries no longer
        return f"Not mailed to everyone{so_far}: no longer tried after {alerts.MAIL_FOR.days} days"
    if not alert.attempts:
        return "Waiting to be mailed"
    return f"Not mailed to everyone yet{so_far} ({alert.attempts} attempt(s)); tried again soon"


@dataclass(frozen=True)
class BounceRow:
    """One inbound bounce or complaint as the faces show it."""

    row: bounce_policy.Row
    edition: str | None
    subscriber: str | None  # the address, or None when it names nobody (or they were erased)


def recent_bounces(session: Session, caller: Caller, every_region: tuple[str, ...],
                   limit: int = RECENT_BOUNCES) -> tuple[list[BounceRow], int]:
    """The latest bounces and complaints in the caller's scope, and how many are outside it.
    Records that name nobody are seen only by who covers every region, as with the import."""
    everywhere = caller.actor.covers(every_region)
    rows = bounce_policy.recent(session, limit, kinds=BOUNCE_KINDS, scope=caller.scope,
                                everywhere=everywhere)
    hidden = bounce_policy.count_outside(session, kinds=BOUNCE_KINDS, scope=caller.scope,
                                         everywhere=everywhere)
    slugs: dict[int, str | None] = {}
    shown = []
    for r in rows:
        person = store.find(session, r.subscriber_id) if r.subscriber_id is not None else None
        shown.append(BounceRow(r, edition_slug(session, slugs, r.edition_id),
                               person.email if person is not None else None))
    return shown, hidden


def edition_slug(session: Session, cache: dict[int, str | None], edition_id: int | None
                 ) -> str | None:
    """An edition's slug for a record that outlives it (None once it is gone)."""
    if edition_id is None:
        return None
    if edition_id not in cache:
        try:
            cache[edition_id] = outbox.get_edition(session, edition_id).slug
        except NotFound:
            cache[edition_id] = None
    return cache[edition_id]
