"""The yearly reconfirmation: "are you still working with MSHT at <organisation>?" (issue 17).

    due        active, confirmed (or last said yes) `reconfirm_after_days` ago, not asked in
               this cycle, not paused                          store.reconfirm_due
    asked      the request mailed (one consent event)         store.mark_reconfirm_asked
    answered   "yes" on the link's page, a POST (a scanner's GET changes nothing); a lapsed
               reader is active again                          store.reconfirm
    lapsed     no answer `reconfirm_answer_days` after the request: status `lapsed`, which is
               not in `SENDABLE`, so no send reaches them       store.lapse_overdue

The scheduler's leader runs `run` on every pass. Requests are spread: on one UK day at most
ceil((due + asked in the last `reconfirm_spread_days`) / `reconfirm_spread_days`) go out, so
the readers due at once (a database upgraded with years of readers, an import's anniversary)
are asked evenly over about that many days, and the readers who come due day by day are
asked the day they do. Counting the recent requests keeps the daily figure steady while the
backlog shrinks, instead of asking fewer each day and trailing on for months.

Each request is sent first and recorded after (the record is the guard that the cycle is
asked): a crash between the two can send one reader a second copy, which is harmless, where
recording first could lapse a reader who was never mailed. A temporary failure records
nothing and stops the run (the relay is likely down); the next pass tries again. A permanent
refusal for one address is recorded as asked with the refusal (see `ask`); one after the
final dot with no reply (`unknown`) as asked, since it may have arrived.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from email.message import EmailMessage

import jinja2
from sqlalchemy.orm import Session, sessionmaker

from mailer.config import Settings
from mailer.links import Links
from mailer.outbox import LONDON
from mailer.outgoing import send_now, template_env, transactional
from mailer.render import POLICY
from mailer.smtp import Outcome
from subscribers import store
from subscribers.db import session_scope, utcnow
from subscribers.models import Channel, Subscriber

log = logging.getLogger(__name__)

ACTOR = "scheduler"
LAPSE_BATCH = 500  # rows a transaction, as the retention purge does


@dataclass(frozen=True)
class Plan:
    """The reconfirmation settings in force."""

    after: timedelta = timedelta(days=365)
    window: timedelta = timedelta(days=30)
    spread_days: int = 14

    @classmethod
    def from_settings(cls, s: Settings) -> Plan:
        return cls(after=timedelta(days=s.reconfirm_after_days),
                   window=timedelta(days=s.reconfirm_answer_days),
                   spread_days=s.reconfirm_spread_days)


@dataclass
class Ran:
    """What one run did."""

    lapsed: int = 0
    asked: int = 0
    failed: int = 0  # a send the relay did not take for now; asked again on a later pass
    refused: int = 0  # refused for good (a dead address): counted as asked, with the refusal


def uk_day_start(now: datetime) -> datetime:
    """Midnight UK time of `now`'s UK day, in UTC: a "day" for the quota is the one people
    live in, so no UK calendar day gets more than its share."""
    local = now.astimezone(LONDON)
    return datetime.combine(local.date(), time(0), LONDON).astimezone(now.tzinfo)


def daily_quota(session: Session, plan: Plan, now: datetime) -> int:
    """How many requests one UK day may carry (see the module docstring)."""
    due = store.count_reconfirm_due(session, now, plan.after)
    recent = store.count_reconfirm_asked_since(session, now - timedelta(days=plan.spread_days))
    return math.ceil((due + recent) / plan.spread_days)


def room_today(session: Session, plan: Plan, now: datetime) -> int:
    """Requests that may still go out today."""
    sent = store.count_reconfirm_asked_since(session, uk_day_start(now))
    return max(0, daily_quota(session, plan, now) - sent)


def build_request(settings: Settings, links: Links, subscriber: Subscriber, now: datetime,
                  plan: Plan, env: jinja2.Environment | None = None) -> EmailMessage:
    """The request mail: a "yes" link (its page has the button) and the preferences link."""
    assert subscriber.email is not None
    env = env or template_env()
    answer_by = (now + plan.window).astimezone(LONDON)
    organisation = subscriber.organisation or "your organisation"
    context = {"name": subscriber.name, "organisation": organisation,
               "yes_url": links.reconfirm(subscriber.id),
               "preferences_url": links.preferences(subscriber.id),
               "answer_by": f"{answer_by.day} {answer_by:%B %Y}"}
    return transactional(settings, env, "reconfirm", subscriber.email,
                         f"Are you still working with MSHT at {organisation}?", context, now)


def lapse(sessions: sessionmaker[Session], plan: Plan, now: datetime,
          keep_going: Callable[[], bool] = lambda: True) -> int:
    """Lapse every reader whose window is over, in batches of their own transactions."""
    ctx = store.Context(channel=Channel.SYSTEM, actor=ACTOR,
                        detail={"answer_days": plan.window.days})
    total = 0
    while keep_going():
        with session_scope(sessions) as session:
            done = store.lapse_overdue(session, now, plan.window, ctx, LAPSE_BATCH)
        total += done
        if done < LAPSE_BATCH:
            break
    return total


def ask(settings: Settings, sessions: sessionmaker[Session], plan: Plan, now: datetime,
        keep_going: Callable[[], bool] = lambda: True) -> Ran:
    """Mail today's share of the requests due; each one recorded once it is sent."""
    ran = Ran()
    with session_scope(sessions) as session:
        ids = store.reconfirm_due_ids(session, now, plan.after, room_today(session, plan, now))
    if not ids:
        return ran
    links, env = Links(settings), template_env()
    ctx = store.Context(channel=Channel.SYSTEM, actor=ACTOR)
    for subscriber_id in ids:
        if not keep_going():  # the leadership went: the new leader carries on
            break
        with session_scope(sessions) as session:
            subscriber = session.get(Subscriber, subscriber_id)
            if subscriber is None or not store.is_reconfirm_due(session, subscriber_id, now,
                                                                plan.after):
                continue  # left, paused or answered since the list was read
            assert subscriber.email is not None
            to, data = subscriber.email, build_request(
                settings, links, subscriber, now, plan, env).as_bytes(policy=POLICY)
        try:
            result = send_now(settings, to, data)
        except Exception:  # a bad relay setting: said in the log on every pass until fixed
            log.exception("reconfirm: could not send a request")
            ran.failed += 1
            break
        if result.outcome in (Outcome.RETRY, Outcome.HALT):
            log.warning("reconfirm: the relay did not take a request: %s %s", result.code,
                        result.reply)
            ran.failed += 1
            break
        asked = ctx
        if result.outcome in (Outcome.BOUNCED, Outcome.FAILED):
            # Refused for this address for good: asking again every pass would only hammer
            # it. Recorded as asked, with the refusal, so the cycle runs on and the reader
            # lapses unless they answer some other way (a dead address should stop getting
            # mail anyway). The code only: a relay's words can quote the address, and the
            # consent history outlives the retention of relay replies.
            asked = store.Context(channel=ctx.channel, actor=ctx.actor,
                                  detail={"refused": result.code, "outcome": str(result.outcome)})
            ran.refused += 1
        with session_scope(sessions) as session:
            if store.mark_reconfirm_asked(session, subscriber_id, now, plan.after, asked):
                ran.asked += 1
    return ran


def run(settings: Settings, sessions: sessionmaker[Session], now: datetime | None = None,
        *, keep_going: Callable[[], bool] = lambda: True) -> Ran:
    """One pass: lapse whoever is out of time, then ask today's share of those due."""
    now = now or utcnow()
    plan = Plan.from_settings(settings)
    lapsed = lapse(sessions, plan, now, keep_going)
    ran = ask(settings, sessions, plan, now, keep_going)
    ran.lapsed = lapsed
    return ran
