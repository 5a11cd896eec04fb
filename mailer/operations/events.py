"""Dates of interest: add, change, remove and import events; their reminders are planned at once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from mailer import audience as audience_rule
from mailer import events
from mailer.accounts import Permission
from mailer.config import Settings
from mailer.errors import NotFound
from mailer.events import Event, EventError, EventSpec
from mailer.operations import Caller
from mailer.segments import AudienceFields


def _event(session: Session, ident: str | int) -> Event:
    """An event by id or slug; a missing one is `NotFound`, which every face shows as such."""
    try:
        return events.get_event(session, ident)
    except EventError as exc:
        raise NotFound(str(exc), hint=exc.hint) from None


def get(session: Session, caller: Caller, ident: str | int) -> Event:
    return _event(session, ident)


def _audience_checked(session: Session, caller: Caller, event: Event,
                      settings: Settings | None) -> None:
    """An event with an audience needs every region of it, as an edition does; its inline
    fields name known values (when the face has the settings to know them). One without an
    audience reaches everyone on its topic, as events always have."""
    fields = AudienceFields(list(event.regions), list(event.roles),
                            list(event.organisation_types), list(event.audience_topics))
    if settings is not None and event.segment is None:
        audience_rule.check_fields(fields, audience_rule.known(session, settings),
                                   f"event '{event.slug}': audience")
    if event.regions:
        caller.require_cover(event.regions, "this event's audience")


def add(session: Session, caller: Caller, spec: EventSpec,
        settings: Settings | None = None) -> Event:
    caller.require(Permission.EDITIONS_SEND)
    event, _ = events.add_event(session, spec)
    _audience_checked(session, caller, event, settings)
    caller.record(session, "event.add", f"event:{event.id}", name=event.name,
                  starts_on=event.starts_on.isoformat(), offsets=list(event.offsets))
    events.plan_reminders(session)
    return event


def update(session: Session, caller: Caller, ident: str | int, spec: EventSpec,
           settings: Settings | None = None) -> Event:
    """Change an event (it keeps its slug); its reminders not yet sent are planned again."""
    caller.require(Permission.EDITIONS_SEND)
    current = _event(session, ident)
    if current.regions:
        caller.require_cover(current.regions, "this event's audience")
    spec.slug = current.slug
    before = {"name": current.name, "starts_on": current.starts_on.isoformat(),
              "offsets": list(current.offsets or ())}
    event, _ = events.add_event(session, spec, replace=True)
    _audience_checked(session, caller, event, settings)
    caller.record(session, "event.update", f"event:{event.id}", name=event.name,
                  before=before, offsets=list(event.offsets),
                  starts_on=event.starts_on.isoformat())
    events.plan_reminders(session)
    return event


def remove(session: Session, caller: Caller, ident: str | int) -> tuple[str, int]:
    """Remove an event and its reminders not yet sent; returns its name and how many."""
    caller.require(Permission.EDITIONS_SEND)
    event = _event(session, ident)
    if event.regions:
        caller.require_cover(event.regions, "this event's audience")
    name = event.name
    caller.record(session, "event.remove", f"event:{event.id}", name=name)
    return name, events.remove_event(session, event)


def import_file(session: Session, caller: Caller, path: Path, specs: Sequence[EventSpec], *,
                replace: bool, settings: Settings | None = None) -> tuple[int, int, int]:
    """Import events, all or nothing; returns (added, updated, reminders planned)."""
    caller.require(Permission.EDITIONS_SEND)
    added, updated = events.import_events(session, specs, replace=replace)
    for spec in specs:
        assert spec.slug is not None
        _audience_checked(session, caller, _event(session, spec.slug), settings)
    caller.record(session, "events.import", None, file=path.name, added=added,
                  updated=updated)
    return added, updated, events.plan_reminders(session)
