"""The append-only audit log: who did what, when and from where, in the console, API and CLI.

There is a function to add an entry, functions to read them, and the retention purge's
`delete_before`, and nothing else: no code path in the application updates one, and only the
purge deletes, entries older than `retention_audit_years`. Migration 0005 installs triggers
that make the database itself refuse UPDATE and DELETE on the table, so that even a bug (or a
hand-typed query through the app's own connection) cannot rewrite history; migration 0012 lets
DELETE through for entries over a year old only (the shortest period the settings allow), so
the last year stays beyond the reach of any code.

Entries name subscribers by id only (`subscriber:17`), never by address: the log outlives an
erasure, and must not keep the personal data the erasure removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Index,
    Integer,
    String,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from mailer.models import Edition
from subscribers.db import Base, UTCDateTime, changed_rows, utcnow
from subscribers.models import Subscriber
from subscribers.regions import Scope, within


class AuditEntry(Base):
    __tablename__ = "audit_entry"
    __table_args__ = (Index("ix_audit_entry_action_at", "action", "at"),
                      Index("ix_audit_entry_actor_at", "actor", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))  # a login, "cli:<os user>" or "(unknown)"
    actor_name: Mapped[str | None] = mapped_column(String(100))  # as displayed at the time
    via: Mapped[str] = mapped_column(String(20))  # console, api, cli
    ip: Mapped[str | None] = mapped_column(String(45))
    action: Mapped[str] = mapped_column(String(60))  # e.g. edition.approve, subscriber.erase
    target: Mapped[str | None] = mapped_column(String(160))  # e.g. edition:3, subscriber:17
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


def record(session: Session, *, actor: str, action: str, via: str = "console",
           actor_name: str | None = None, ip: str | None = None, target: str | None = None,
           detail: dict[str, Any] | None = None) -> AuditEntry:
    """Append one entry, in the caller's transaction: the change and its record commit
    together or not at all."""
    entry = AuditEntry(at=utcnow(), actor=actor[:100], actor_name=(actor_name or None)
                       and actor_name[:100], via=via[:20], ip=(ip or None) and ip[:45],
                       action=action[:60], target=(target or None) and target[:160],
                       detail=detail or None)
    session.add(entry)
    session.flush()
    return entry


def last_at(session: Session, action: str) -> datetime | None:
    """When `action` was last recorded."""
    return session.scalar(select(func.max(AuditEntry.at)).where(AuditEntry.action == action))


def delete_before(session: Session, cutoff: datetime, limit: int) -> int:
    """The retention purge: delete up to `limit` of the oldest entries from before `cutoff`;
    returns how many. Nothing else deletes from the log."""
    ids = list(session.scalars(select(AuditEntry.id).where(AuditEntry.at < cutoff)
                               .order_by(AuditEntry.id).limit(limit)))
    if not ids:
        return 0
    return changed_rows(session.execute(
        delete(AuditEntry).where(AuditEntry.id.in_(ids), AuditEntry.at < cutoff)
        .execution_options(synchronize_session=False)))


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None  # exact, or a prefix ending in '.' ("edition.")
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _within(scope: Scope, own: str | None = None) -> ColumnElement[bool]:
    """Entries about a subscriber or an edition in the scope (`regions.within`), those about
    neither, and the reader's own (`own`, their login: what they did themselves is theirs to
    read). An entry about an erased subscriber, who has no region left, is otherwise in no
    region's scope: only those who see every region see it."""
    if scope is None:
        return within(scope, AuditEntry.target)
    subscribers = select(literal("subscriber:", String) + cast(Subscriber.id, String)).where(
        within(scope, Subscriber.region))
    editions = select(literal("edition:", String) + cast(Edition.id, String)).where(
        within(scope, Edition.regions))
    return or_(AuditEntry.target.is_(None),
               ~AuditEntry.target.like("subscriber:%") & ~AuditEntry.target.like("edition:%"),
               AuditEntry.target.in_(subscribers), AuditEntry.target.in_(editions),
               AuditEntry.actor == (own or ""))


def entries(session: Session, flt: AuditFilter = AuditFilter(), limit: int = 100,
            offset: int = 0, scope: Scope = None, own: str | None = None
            ) -> tuple[int, Sequence[AuditEntry]]:
    """Matching entries within a region scope (and the reader `own`'s), newest first, and
    how many match in all."""
    query = select(AuditEntry).where(_within(scope, own))
    if flt.actor:
        query = query.where(AuditEntry.actor == flt.actor)
    if flt.action:
        query = query.where(AuditEntry.action.startswith(flt.action, autoescape=True)
                            if flt.action.endswith(".") else AuditEntry.action == flt.action)
    if flt.target:
        query = query.where(AuditEntry.target == flt.target)
    if flt.since:
        query = query.where(AuditEntry.at >= flt.since)
    if flt.until:
        query = query.where(AuditEntry.at < flt.until)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit)
                           .offset(offset)).all()
    return total, rows


def actions(session: Session) -> list[str]:
    """Every action that occurs in the log, for the filter's drop-down."""
    return list(session.scalars(select(AuditEntry.action).distinct().order_by(AuditEntry.action)))


def as_dict(entry: AuditEntry, with_ip: bool = True) -> dict[str, Any]:
    return {"id": entry.id, "at": entry.at.isoformat(), "actor": entry.actor,
            "actor_name": entry.actor_name, "via": entry.via,
            "ip": entry.ip if with_ip else None,
            "action": entry.action, "target": entry.target, "detail": entry.detail}


@dataclass(frozen=True)
class AuditView:
    """An entry as shown to one reader: a copy, so that hiding its IP address never touches
    the (append-only) row."""

    id: int
    at: datetime
    actor: str
    actor_name: str | None
    via: str
    ip: str | None
    action: str
    target: str | None
    detail: dict[str, Any] | None


def view(entry: AuditEntry, with_ip: bool) -> AuditView:
    return AuditView(entry.id, entry.at, entry.actor, entry.actor_name, entry.via,
                     entry.ip if with_ip else None, entry.action, entry.target, entry.detail)
