"""Edition revisions: every saved source is kept, with who saved it and whether it was put
forward or approved, so an approver can see what changed since the text they (or a colleague)
last looked at.

The edition row holds the current source; a revision is a copy taken at each save that changed
it. `baseline` picks what the current text is compared with: the latest revision that was
approved, or failing that the latest one put forward, other than the current text itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from mailer.models import Edition
from subscribers.db import Base, UTCDateTime, utcnow


class EditionRevision(Base):
    __tablename__ = "edition_revision"
    __table_args__ = (Index("uq_edition_revision_number", "edition_id", "number", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    edition_id: Mapped[int] = mapped_column(ForeignKey("edition.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per edition
    source: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(String(64))
    saved_by: Mapped[str | None] = mapped_column(String(100))
    saved_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    put_forward_by: Mapped[str | None] = mapped_column(String(100))
    approved_by: Mapped[str | None] = mapped_column(String(100))


def keep(session: Session, edition: Edition, actor: str | None) -> EditionRevision:
    """A revision of the edition's current source (called after each save that changed it)."""
    last = session.scalar(select(func.max(EditionRevision.number))
                          .where(EditionRevision.edition_id == edition.id)) or 0
    revision = EditionRevision(edition_id=edition.id, number=last + 1, source=edition.source,
                               source_sha256=edition.source_sha256, saved_by=actor,
                               saved_at=utcnow())
    session.add(revision)
    session.flush()
    return revision


def current(session: Session, edition: Edition) -> EditionRevision | None:
    return session.scalar(select(EditionRevision)
                          .where(EditionRevision.edition_id == edition.id,
                                 EditionRevision.source_sha256 == edition.source_sha256)
                          .order_by(EditionRevision.number.desc()).limit(1))


def mark(session: Session, edition: Edition, *, put_forward_by: str | None = None,
         approved_by: str | None = None) -> None:
    """Note on the current revision that it was put forward or approved (an edition stored
    before revisions were kept gets its first revision here)."""
    revision = current(session, edition) or keep(session, edition, edition.created_by)
    if put_forward_by:
        revision.put_forward_by = put_forward_by
    if approved_by:
        revision.approved_by = approved_by
    session.flush()


def listing(session: Session, edition: Edition) -> Sequence[EditionRevision]:
    return session.scalars(select(EditionRevision)
                           .where(EditionRevision.edition_id == edition.id)
                           .order_by(EditionRevision.number.desc())).all()


def baseline(session: Session, edition: Edition) -> EditionRevision | None:
    """What the current source is compared with: the latest approved revision, else the latest
    one put forward, that is not the current text."""
    for column in (EditionRevision.approved_by, EditionRevision.put_forward_by):
        found = session.scalar(select(EditionRevision)
                               .where(EditionRevision.edition_id == edition.id,
                                      column.is_not(None),
                                      EditionRevision.source_sha256 != edition.source_sha256)
                               .order_by(EditionRevision.number.desc()).limit(1))
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class DiffRow:
    """One row of a side-by-side diff: each side's line number and text (None: no line)."""

    kind: str  # "same", "changed", "added", "removed", "gap"
    old_no: int | None
    old: str | None
    new_no: int | None
    new: str | None


def side_by_side(old: str, new: str, context: int = 2) -> list[DiffRow]:
    """The two sources line by line, unchanged runs cut to `context` lines around changes.
    Plain data: the page template escapes it like any other text."""
    a, b = old.splitlines(), new.splitlines()
    rows: list[DiffRow] = []
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(context):
        if rows:
            rows.append(DiffRow("gap", None, None, None, None))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows += [DiffRow("same", i + 1, a[i], j + 1, b[j])
                         for i, j in zip(range(i1, i2), range(j1, j2), strict=True)]
                continue
            olds, news = list(range(i1, i2)), list(range(j1, j2))
            for k in range(max(len(olds), len(news))):
                i = olds[k] if k < len(olds) else None
                j = news[k] if k < len(news) else None
                kind = "changed" if i is not None and j is not None else (
                    "removed" if i is not None else "added")
                rows.append(DiffRow(kind, None if i is None else i + 1,
                                    None if i is None else a[i],
                                    None if j is None else j + 1,
                                    None if j is None else b[j]))
    return rows
