"""The web's rate limits and per-address mail caps, counted in the `rate_event` table.

In the database, not in memory, so the caps hold across restarts and across web processes. A
bucket names a keyed hash of the address or network (`security.bucket`), never the address.
The table is defined with the subscriber tables (`subscribers.models.RateEvent`) because the
migrations build it from there; every query on it is here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from mailer.config import Settings
from mailer.web.security import bucket
from subscribers.db import utcnow
from subscribers.models import RateEvent

DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
# The longest window that reads rate events (a month's sign-up mails to one address), and a
# day to spare; the scheduler forgets older ones on every pass.
KEPT = dt.timedelta(days=31)
_ADVISORY_XACT_LOCK = text("SELECT pg_advisory_xact_lock(:k)")


def hold(session: Session, *keys: str) -> None:
    """Serialise read-then-write units on these keys until the transaction ends.

    On PostgreSQL, a transaction-scoped advisory lock per key (in sorted order, so two holders
    never wait on each other): two requests that count a rate bucket and then add to it take
    turns, so a cap is never passed by both at once. SQLite needs nothing: its web units
    already take turns on one thread (and across processes by `runtime.SqliteTurns`).
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    for key in sorted(set(keys)):
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        session.execute(_ADVISORY_XACT_LOCK, {"k": int.from_bytes(digest, "big", signed=True)})


def count_events(session: Session, name: str, since: dt.datetime) -> int:
    return session.scalar(select(func.count()).select_from(RateEvent).where(
        RateEvent.bucket == name, RateEvent.occurred_at > since)) or 0


def record_event(session: Session, *names: str) -> None:
    now = utcnow()
    session.add_all(RateEvent(bucket=b, occurred_at=now) for b in names)
    session.flush()


def prune_events(session: Session, before: dt.datetime) -> int:
    """Forget rate events older than `before` (`KEPT` ago, when nothing reads them any more);
    returns how many."""
    result = session.execute(delete(RateEvent).where(RateEvent.occurred_at < before))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class Limits:
    """The limits of one web app: its settings and the key that hashes the buckets."""

    settings: Settings
    key: bytes

    def bucket(self, kind: str, value: str) -> str:
        return bucket(self.key, kind, value)

    def allowed(self, session: Session, kind: str, value: str, limit: int,
                window: dt.timedelta) -> bool:
        return count_events(session, self.bucket(kind, value), utcnow() - window) < limit

    def count(self, session: Session, kind: str, value: str) -> None:
        record_event(session, self.bucket(kind, value))

    def post_allowed(self, session: Session, network: str) -> bool:
        """A form POST from this network, counted when allowed (the per-network hourly cap)."""
        if not self.allowed(session, "post", network, self.settings.posts_per_network_hour,
                            HOUR):
            return False
        self.count(session, "post", network)
        return True

    def may_mail(self, session: Session, kind: str, key: str, network: str) -> bool:
        """The per-address caps (≤ 1 a day, ≤ 3 a month by default) and the per-network cap;
        when the mail may go, it is counted now, in the same transaction."""
        s = self.settings
        hold(session, self.bucket(kind, key), self.bucket("netmail", network))  # count and add
        ok = (self.allowed(session, kind, key, s.signup_mails_per_day, DAY)
              and self.allowed(session, kind, key, s.signup_mails_per_month, 30 * DAY)
              and self.allowed(session, "netmail", network, s.mails_per_network_day, DAY))
        if ok:
            record_event(session, self.bucket(kind, key), self.bucket("netmail", network))
        return ok
