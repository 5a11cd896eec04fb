"""Readers' replies (issue 15, item 6), as the caller may see them: co-ordinators and
administrators, within their regions when a reply names one of our deliveries."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailer import replies
from mailer.accounts import Permission
from mailer.operations import Caller
from mailer.operations.alerts import edition_slug

RECENT_REPLIES = 100


@dataclass(frozen=True)
class ReplyView:
    row: replies.Row
    edition: str | None  # the slug, when the reply names an edition that still exists


def recent_replies(session: Session, caller: Caller, every_region: tuple[str, ...],
                   limit: int = RECENT_REPLIES) -> tuple[list[ReplyView], int]:
    """The newest replies in the caller's scope, and how many are outside it. A reply that
    names no reader of ours is seen only by who covers every region, as bounces are."""
    caller.require(Permission.REPLIES_VIEW)
    rows, hidden = replies.recent(session, limit, scope=caller.scope,
                                  everywhere=caller.actor.covers(every_region))
    slugs: dict[int, str | None] = {}
    return [ReplyView(r, edition_slug(session, slugs, r.edition_id)) for r in rows], hidden
