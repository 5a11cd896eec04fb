"""Saved segments: a named audience (regions, roles, organisation types, topics) that editions
and events name by slug instead of repeating the lists.

A segment is resolved into the edition's or event's own audience columns when that is saved,
so the region scope (`subscribers.regions.within`) and the send read one set of columns
whichever way the audience was given, and what an approver saw is what goes out even if the
segment is edited afterwards. The slug is kept beside them to say where they came from.

An empty list means "every": a segment with no regions reaches every region. `topics` narrows
further: a reader must also be subscribed to one of them (the send itself is on the edition's
or event's own topic, which is what its unsubscribe link leaves).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import JSON, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from mailer.errors import Conflict, MailerError, NotFound
from subscribers import store
from subscribers.db import Base, UTCDateTime, utcnow
from subscribers.regions import Scope, within

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,59}$")


class SavedSegment(Base):
    __tablename__ = "saved_segment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(60), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    organisation_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    topics: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


@dataclass
class AudienceFields:
    """An audience as lists (empty: every). What a segment holds and what an edition or
    event resolves to."""

    regions: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    organisation_types: list[str] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, segment: SavedSegment) -> AudienceFields:
        return cls(list(segment.regions), list(segment.roles),
                   list(segment.organisation_types), list(segment.topics))

    def words(self) -> str:
        """The audience in words, for the approval screen and the dry run."""
        parts = [f"{label}: {', '.join(values)}" if values else f"every {plural}"
                 for label, plural, values in (
                     ("regions", "region", self.regions), ("roles", "role", self.roles),
                     ("organisation types", "organisation type", self.organisation_types))]
        if self.topics:
            parts.append(f"also subscribed to: {', '.join(self.topics)}")
        return "; ".join(parts)


def check_slug(slug: str) -> str:
    slug = slug.strip().lower()
    if not _SLUG.match(slug):
        raise MailerError(f"'{slug[:40]}' cannot name a segment",
                          hint="use lower-case letters, digits and '-', e.g. kent-police")
    return slug


def list_segments(session: Session, scope: Scope = None) -> Sequence[SavedSegment]:
    """Segments whose regions share one with the scope (or reach every region)."""
    return session.scalars(select(SavedSegment).where(within(scope, SavedSegment.regions))
                           .order_by(SavedSegment.slug)).all()


def slugs(session: Session) -> list[str]:
    return list(session.scalars(select(SavedSegment.slug).order_by(SavedSegment.slug)))


def get_segment(session: Session, slug: str, scope: Scope = None) -> SavedSegment:
    found = session.scalar(select(SavedSegment).where(SavedSegment.slug == slug,
                                                      within(scope, SavedSegment.regions)))
    if found is None:
        known = [s.slug for s in list_segments(session, scope)]
        raise NotFound(f"no segment '{slug}'; known: {', '.join(known) or '(none)'}",
                       hint="`mailer segments list` shows them")
    return found


def add_segment(session: Session, *, slug: str, name: str, description: str,
                fields: AudienceFields, actor: str | None) -> SavedSegment:
    slug = check_slug(slug)
    if not name.strip():
        raise MailerError("a segment needs a name")
    if session.scalar(select(SavedSegment.id).where(SavedSegment.slug == slug)) is not None:
        raise Conflict(f"there is already a segment '{slug}'",
                       hint="edit it, or choose another slug")
    segment = SavedSegment(slug=slug, created_by=actor)
    _apply(segment, name, description, fields)
    session.add(segment)
    session.flush()
    return segment


def update_segment(session: Session, segment: SavedSegment, *, name: str, description: str,
                   fields: AudienceFields, actor: str | None) -> None:
    if not name.strip():
        raise MailerError("a segment needs a name")
    _apply(segment, name, description, fields)
    segment.updated_by, segment.updated_at = actor, utcnow()
    session.flush()


def _apply(segment: SavedSegment, name: str, description: str, fields: AudienceFields) -> None:
    segment.name, segment.description = name.strip()[:200], description.strip()
    segment.regions, segment.roles = list(fields.regions), list(fields.roles)
    segment.organisation_types, segment.topics = (list(fields.organisation_types),
                                                  list(fields.topics))


def remove_segment(session: Session, segment: SavedSegment) -> None:
    session.delete(segment)
    session.flush()


def count(session: Session, fields: AudienceFields, topic: str | None = None) -> int:
    """How many readers this audience reaches now: on `topic` (an edition's or event's) when
    given, else on any topic. The same SELECT the outbox enqueues from."""
    query = store.segment([topic] if topic else None, fields.regions, fields.roles,
                          fields.organisation_types, also_topics=fields.topics)
    return session.scalar(select(func.count()).select_from(query.subquery())) or 0
