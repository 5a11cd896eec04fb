"""A person's rights over their data, across every table that holds it (UK GDPR Art. 15, 17).

The subscriber tables, the outbox and the bounce records each keep their own queries; this
module is the one place that asks all of them, so no face (CLI, console, API) can erase a
person from one table and forget another.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from mailer import bounce_policy, outbox, replies
from subscribers import store
from subscribers.models import Subscriber


def subject_access(session: Session, subscriber: Subscriber, *,
                   for_them: bool = False) -> dict[str, Any]:
    """Everything we hold on one person: profile, subscriptions, consent history, what we sent
    them and what came back. `for_them`: the copy they download themself, in which a
    co-ordinator's steps name no co-ordinator."""
    export = store.subject_access(session, subscriber, for_them=for_them)
    export["deliveries"] = outbox.deliveries_for(session, subscriber.id)
    export["bounces"] = [
        {"at": e.occurred_at.isoformat(), "kind": e.kind, "status": e.status,
         "edition_id": e.edition_id, "action": e.action}
        for e in bounce_policy.events_for(session, subscriber.id)]
    export["replies"] = replies.sent_by(session, subscriber.id, subscriber.email or "")
    return export


def erase(session: Session, subscriber: Subscriber, ctx: store.Context) -> None:
    """Erase a person everywhere: relay replies, bounce messages and their own replies to us
    can quote the address, so they go before the subscriber row is anonymised and its
    suppression entry kept."""
    outbox.forget_subscriber(session, subscriber.id)
    bounce_policy.forget_subscriber(session, subscriber.id)
    replies.forget_subscriber(session, subscriber.id, subscriber.email or "")
    store.erase(session, subscriber, ctx)
