"""The operations: everything a co-ordinator does, written once for every face.

The console, the API and the command line are faces: they parse input, call one operation and
render its result as HTML, JSON or terminal output. An operation takes the session, the
`Caller` (who acts, through which face, from where) and its arguments, and does four things
once:

1. checks the permission and the region scope (`Caller.require`, `Caller.require_cover`, and
   the scoped fetches of each subject, which use `subscribers.regions.within` in SQL);
2. calls the library (`subscribers.store`, `mailer.outbox`, `mailer.events`, ...);
3. writes the audit entry, with one set of keys whatever the face, in the change's own
   transaction;
4. refuses with a domain error from `mailer.errors` (`NotFound`, `NotAllowed`, `OutOfScope`,
   `Conflict`, or the library's own errors), never an HTTP or CLI type. Each face translates
   them in one place.

One module per subject: `subscribers`, `editions`, `alerts`, `events`, `users`.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from mailer import audit
from mailer.accounts import Actor, Permission, Role
from mailer.errors import NotAllowed, OutOfScope
from subscribers import store
from subscribers.models import Channel

FACES = ("console", "api", "cli")


@dataclass(frozen=True)
class Caller:
    """Who acts, through which face (`console`, `api` or `cli`), and from where."""

    actor: Actor
    via: str
    ip: str | None = None
    user_agent: str | None = None

    @property
    def scope(self) -> tuple[str, ...] | None:
        """The regions this person sees (None: every region)."""
        return self.actor.regions

    def require(self, permission: Permission) -> None:
        if not self.actor.can(permission):
            raise NotAllowed(f"your role ({self.actor.role}) does not allow this",
                             hint="ask an administrator if you need it")

    def require_cover(self, regions: Iterable[str], what: str = "this edition's audience"
                      ) -> None:
        """Acting on something that reaches these regions needs all of them in scope; one
        that reaches every region (none named), an administrator."""
        wanted = tuple(regions)
        if not self.actor.covers(wanted):
            raise OutOfScope(f"{what} ({', '.join(wanted) or 'every region'}) is outside your "
                             f"regions ({', '.join(self.actor.regions or ())})",
                             hint="ask a co-ordinator who covers all of it")

    def require_region(self, region: str | None) -> None:
        """A region this person chose for a record (a subscriber's) must be one of theirs."""
        if self.actor.regions is not None and region not in self.actor.regions:
            raise OutOfScope("choose one of your regions", field="region",
                             hint=f"you can act for {', '.join(self.actor.regions)} only")

    def context(self, **kw: Any) -> store.Context:
        """The consent record's context for a change made by this caller."""
        return store.Context(channel=Channel.CLI if self.via == "cli" else Channel.ADMIN,
                             actor=self.actor.login, ip=self.ip,
                             user_agent=(self.user_agent or "")[:300] or None, **kw)

    def record(self, session: Session, action: str, target: str | None = None,
               **detail: Any) -> None:
        """The audit entry for this caller's change, in the change's transaction."""
        audit.record(session, actor=self.actor.login, actor_name=self.actor.name,
                     via=self.via, ip=self.ip, action=action, target=target,
                     detail=detail or None)


def command_line_caller() -> Caller:
    """The person at the keyboard: the command line acts with every permission over every
    region (whoever can run it can read the database anyway), recorded as `cli:<login>`."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "unknown"
    actor = Actor(user_id=0, login=f"cli:{login}", name=login, role=Role.ADMIN, regions=None)
    return Caller(actor=actor, via="cli")
