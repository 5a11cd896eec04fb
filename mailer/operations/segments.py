"""Saved segments: list, show with a live count, add, edit, remove. Making, changing or
removing one needs every region it reaches (a Kent co-ordinator cannot make a segment that
reaches Essex); seeing one needs one of its regions, as for an edition."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailer import audience as audience_rule
from mailer import segments
from mailer.accounts import Permission
from mailer.config import Settings
from mailer.operations import Caller
from mailer.segments import AudienceFields, SavedSegment


def _target(segment: SavedSegment) -> str:
    return f"segment:{segment.slug}"


@dataclass(frozen=True)
class Counted:
    segment: SavedSegment
    fields: AudienceFields
    count: int  # active readers it reaches now, on any topic (its own topics if it names any)


def listing(session: Session, caller: Caller) -> Sequence[SavedSegment]:
    return segments.list_segments(session, caller.scope)


def get(session: Session, caller: Caller, slug: str) -> SavedSegment:
    return segments.get_segment(session, slug, caller.scope)


def counted(session: Session, caller: Caller, slug: str) -> Counted:
    segment = get(session, caller, slug)
    fields = AudienceFields.of(segment)
    return Counted(segment, fields, segments.count(session, fields))


def count_fields(session: Session, caller: Caller, settings: Settings,
                 fields: AudienceFields) -> int:
    """The live count for fields being chosen (not saved yet): checked, and counted only
    within what the caller could save."""
    _checked(session, caller, settings, fields)
    return segments.count(session, fields)


def _checked(session: Session, caller: Caller, settings: Settings,
             fields: AudienceFields) -> None:
    audience_rule.check_fields(fields, audience_rule.known(session, settings), "segment")
    caller.require_cover(fields.regions, "this segment's audience")


def add(session: Session, caller: Caller, settings: Settings, *, slug: str, name: str,
        description: str, fields: AudienceFields) -> SavedSegment:
    caller.require(Permission.EDITIONS_EDIT)
    _checked(session, caller, settings, fields)
    segment = segments.add_segment(session, slug=slug, name=name, description=description,
                                   fields=fields, actor=caller.actor.login)
    caller.record(session, "segment.add", _target(segment), name=segment.name,
                  **_detail(fields))
    return segment


def edit(session: Session, caller: Caller, settings: Settings, slug: str, *, name: str,
         description: str, fields: AudienceFields) -> SavedSegment:
    """Change a segment. Editions and events already stored keep the audience they were
    stored with (what was approved goes out); the next save of one picks up the change."""
    caller.require(Permission.EDITIONS_EDIT)
    segment = get(session, caller, slug)
    # The caller must cover what it reached before as well as what it will reach.
    caller.require_cover(segment.regions, "this segment's audience")
    _checked(session, caller, settings, fields)
    before = _detail(AudienceFields.of(segment))
    segments.update_segment(session, segment, name=name, description=description,
                            fields=fields, actor=caller.actor.login)
    caller.record(session, "segment.edit", _target(segment), name=segment.name,
                  before=before, **_detail(fields))
    return segment


def remove(session: Session, caller: Caller, slug: str) -> None:
    caller.require(Permission.EDITIONS_EDIT)
    segment = get(session, caller, slug)
    caller.require_cover(segment.regions, "this segment's audience")
    caller.record(session, "segment.remove", _target(segment), name=segment.name,
                  **_detail(AudienceFields.of(segment)))
    segments.remove_segment(session, segment)


def _detail(fields: AudienceFields) -> dict[str, list[str]]:
    return {"regions": fields.regions, "roles": fields.roles,
            "organisation_types": fields.organisation_types, "topics": fields.topics}
