"""Dates of interest: add, remove and import events; their reminders are planned at once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from mailer import events
from mailer.accounts import Permission
from mailer.events import Event, EventSpec
from mailer.operations import Caller


def add(session: Session, caller: Caller, spec: EventSpec) -> Event:
    caller.require(Permission.EDITIONS_SEND)
    event, _ = events.add_event(session, spec)
    caller.record(session, "event.add", f"event:{event.id}", name=event.name)
    events.plan_reminders(session)
    return event


def remove(session: Session, caller: Caller, ident: str | int) -> tuple[str, int]:
    """Remove an event and its reminders not yet sent; returns its name and how many."""
    caller.require(Permission.EDITIONS_SEND)
    event = events.get_event(session, ident)
    name = event.name
    caller.record(session, "event.remove", f"event:{event.id}", name=name)
    return name, events.remove_event(session, event)


def import_file(session: Session, caller: Caller, path: Path, specs: Sequence[EventSpec], *,
                replace: bool) -> tuple[int, int, int]:
    """Import events, all or nothing; returns (added, updated, reminders planned)."""
    caller.require(Permission.EDITIONS_SEND)
    added, updated = events.import_events(session, specs, replace=replace)
    caller.record(session, "events.import", None, file=path.name, added=added,
                  updated=updated)
    return added, updated, events.plan_reminders(session)
