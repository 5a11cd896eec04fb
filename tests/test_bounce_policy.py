"""The bounce policy on SQLite and PostgreSQL: what each inbound message does to the delivery,
the subscriber and the alerts, and what is kept of it.

Bounces here are real DSN and ARF messages (composed by `dsn` and `arf`, also used by the end
to end test) handed to `bounce_policy.receive` as the LMTP receiver hands them over.
"""

from __future__ import annotations

import dataclasses
import itertools
import mailbox
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from mailer import alerts, bounce_policy, outbox
from mailer.bounce_policy import (
    BounceAlert,
    BounceEvent,
    BouncePolicy,
    Decision,
    InboundRecord,
)
from mailer.config import Settings
from mailer.inbound import InboundMessage
from mailer.links import tokens_for
from mailer.models import Delivery, DeliveryStatus
from mailer.reference import message_id, return_path
from subscribers import store
from subscribers.db import utcnow
from subscribers.models import Channel, ConsentAction, SubscriberStatus
from subscribers.rules import Rules

BOUNCE_ADDRESS = "bounces@news.example.police.uk"
_serial = itertools.count(1)


# ---- real bounce and complaint messages ----

def dsn(recipient: str, status: str, *, to: str = BOUNCE_ADDRESS, action: str = "failed",
        original_message_id: str | None = None, reporter: str = "mx.force.example",
        diagnostic: str | None = None, original_headers: str | None = None) -> bytes:
    """An RFC 3464 DSN as Postfix writes one, for one recipient, with the original's headers
    (`original_headers` as sent, or a minimal block naming `original_message_id`)."""
    n = next(_serial)
    boundary = f"=_dsn_{n}"
    code = "550" if status.startswith("5") else "452"
    diag = diagnostic or f"smtp; {code} {status} <{recipient}>: mailbox problem"
    original = (f"Message-ID: {original_message_id}\r\n" if original_message_id else "") + (
        f"To: <{recipient}>\r\nSubject: MSHT newsletter\r\n")
    if original_headers is not None:
        original = original_headers.rstrip("\r\n") + "\r\n"
    return (
        f"From: MAILER-DAEMON@{reporter} (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn.{n}.{datetime.now(UTC).timestamp()}@{reporter}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"Your message to <{recipient}> could not be delivered.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {reporter}\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nDiagnostic-Code: {diag}\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n{original}\r\n"
        f"--{boundary}--\r\n").encode()


def arf(recipient: str, original_message_id: str, *, to: str = BOUNCE_ADDRESS,
        original_headers: str | None = None) -> bytes:
    """An RFC 5965 abuse report from a feedback loop, with the original message."""
    n = next(_serial)
    boundary = f"=_arf_{n}"
    return (
        "From: feedback@fbl.mail.example\r\n"
        f"To: {to}\r\n"
        "Subject: FW: MSHT newsletter\r\n"
        f"Message-ID: <arf.{n}@fbl.mail.example>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n"
        + (original_headers.rstrip("\r\n") + "\r\n" if original_headers is not None else
           f"Message-ID: {original_message_id}\r\nTo: <{recipient}>\r\n"
           "Subject: MSHT newsletter\r\n")
        + "\r\nThe newsletter.\r\n"
        f"--{boundary}--\r\n").encode()


VACATION = (b"From: someone@kent.police.uk\r\nTo: bounces@news.example.police.uk\r\n"
            b"Subject: Out of office\r\nAuto-Submitted: auto-replied\r\n"
            b"Message-ID: <ooo.1@kent.police.uk>\r\n\r\nI am on leave until Monday.\r\n")


# ---- a small world: people, editions, sent deliveries ----

@dataclasses.dataclass
class World:
    session: Session
    settings: Settings
    rules: Rules
    policy: BouncePolicy

    @property
    def secret(self) -> bytes:
        return self.settings.secret()

    def people(self, emails: Sequence[str]) -> dict[str, int]:
        ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
        topics = store.topics_by_slug(self.session, ["newsletter"])
        profiles = [(store.profile_from(self.rules, email=e, region="kent"), topics)
                    for e in emails]
        store.bulk_add_active(self.session, self.rules, profiles, ctx)
        return {e: store.get_by_email(self.session, self.rules, e).id for e in emails}

    def send(self, slug: str) -> int:
        """An edition to everyone, every delivery accepted by the relay."""
        edition, _ = outbox.store_edition(
            self.session, slug=slug, title=slug, subject=slug, topic="newsletter",
            regions=["kent"], roles=[], source=slug, compiled={}, actor="tester")
        outbox.enqueue(self.session, edition)
        self.session.execute(update(Delivery).where(Delivery.edition_id == edition.id)
                             .values(status=DeliveryStatus.SENT, last_code=250,
                                     last_reply="250 2.0.0 queued"))
        self.session.flush()
        return edition.id

    def verp(self, edition_id: int, subscriber_id: int) -> str:
        return return_path(self.secret, edition_id, subscriber_id, BOUNCE_ADDRESS)

    def bounce(self, edition_id: int, subscriber_id: int, email: str, status: str, *,
               now: datetime | None = None, **kw: object) -> bounce_policy.Outcome:
        verp = self.verp(edition_id, subscriber_id)
        raw = dsn(email, status, to=verp, **kw)  # type: ignore[arg-type]
        return self.receive(raw, (verp,), now=now)

    def receive(self, raw: bytes, rcpt_tos: tuple[str, ...] = (BOUNCE_ADDRESS,), *,
                now: datetime | None = None,
                policy: BouncePolicy | None = None) -> bounce_policy.Outcome:
        return bounce_policy.receive(
            self.session, policy or self.policy,
            InboundMessage(raw=raw, origin="lmtp from 127.0.0.1", mail_from="",
                           rcpt_tos=rcpt_tos), self.secret, rules=self.rules, now=now)

    def subscriber(self, subscriber_id: int) -> store.Subscriber:
        self.session.expire_all()
        return store.get(self.session, subscriber_id)

    def delivery(self, edition_id: int, subscriber_id: int) -> Delivery:
        self.session.expire_all()
        found = outbox.delivery_of(self.session, edition_id, subscriber_id)
        assert found is not None
        return found

    def suppressed(self, email: str) -> bool:
        return store.is_suppressed(self.session, self.rules, email.lower())


@pytest.fixture
def world(session: Session, settings: Settings, rules: Rules) -> World:
    policy = dataclasses.replace(BouncePolicy.from_settings(settings), hold=timedelta(0))
    return World(session, settings, rules, policy)


T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


# ---- the policy as shipped ----

def test_the_settings_give_the_policy_of_the_issue(settings: Settings) -> None:
    policy = BouncePolicy.from_settings(settings)
    assert (policy.hard_threshold, policy.soft_threshold, policy.soft_min_sends) == (1, 3, 2)
    assert policy.soft_window == timedelta(days=90)
    assert policy.domain_alert_ratio == 0.5 and not policy.policy_rejections_suppress
    assert policy.raw_retention == timedelta(days=90) and policy.hold == timedelta(minutes=60)


def test_a_record_retention_shorter_than_the_soft_window_is_refused(settings: Settings) -> None:
    from mailer.errors import ConfigError

    with pytest.raises(ConfigError, match="soft_window"):
        BouncePolicy.from_settings(settings.model_copy(
            update={"bounce_record_retention_days": 30}))


# ---- hard bounces ----

def test_a_hard_bounce_suppresses_at_once_and_every_record_shows_it(world: World) -> None:
    ids = world.people(["gone@kent.police.uk", "stays@kent.police.uk"])
    edition = world.send("spring")
    sid = ids["gone@kent.police.uk"]
    outcome = world.bounce(edition, sid, "gone@kent.police.uk", "5.1.1")

    assert outcome.decision is Decision.SUPPRESSED and not outcome.duplicate
    assert world.subscriber(sid).status == SubscriberStatus.BOUNCED
    assert world.suppressed("gone@kent.police.uk")
    assert world.subscriber(ids["stays@kent.police.uk"]).status == SubscriberStatus.ACTIVE
    delivery = world.delivery(edition, sid)
    assert delivery.status == DeliveryStatus.BOUNCED and delivery.last_code == 550
    assert "5.1.1" in (delivery.last_reply or "")
    last = store.consent_history(world.session, sid)[-1]
    assert (last.action, last.channel) == (ConsentAction.BOUNCE, Channel.BOUNCE)
    assert last.detail["edition_id"] == edition and last.detail["status"] == "5.1.1"
    (event,) = bounce_policy.events_for(world.session, sid)
    assert (event.kind, event.action, event.delivery_id) == ("hard", "suppressed", delivery.id)
    record = world.session.get(InboundRecord, outcome.inbound_id)
    assert record.decision == "suppressed" and record.reference_source == "envelope"
    assert bounce_policy.raw_message(world.session, outcome.inbound_id) == record.raw
    assert record.raw is not None and b"5.1.1" in record.raw


def test_the_same_bounce_read_twice_counts_once(world: World) -> None:
    ids = world.people(["twice@kent.police.uk"])
    edition = world.send("spring")
    verp = world.verp(edition, ids["twice@kent.police.uk"])
    raw = dsn("twice@kent.police.uk", "4.4.7", to=verp)
    first = world.receive(raw, (verp,))
    again = world.receive(raw, (verp,))
    assert again.duplicate and again.inbound_id == first.inbound_id
    assert world.session.scalar(select(func.count()).select_from(InboundRecord)) == 1
    assert len(bounce_policy.events_for(world.session, ids["twice@kent.police.uk"])) == 1


def test_a_bounce_that_beats_the_relays_reply_is_not_undone_by_it(world: World) -> None:
    """A relay may bounce before the worker has written its reply: once the final dot is
    marked the bounce stands and the late "sent" changes nothing; before the dot the row is
    still the worker's."""
    ids = world.people(["quick@kent.police.uk", "early@kent.police.uk"])
    edition, _ = outbox.store_edition(
        world.session, slug="race", title="race", subject="race", topic="newsletter",
        regions=["kent"], roles=[], source="race", compiled={}, actor="tester")
    outbox.enqueue(world.session, edition)
    claims = {c.subscriber_id: c for c in
              outbox.claim_due(world.session, "w", 5, timedelta(minutes=5))}
    quick, early = claims[ids["quick@kent.police.uk"]], claims[ids["early@kent.police.uk"]]
    outbox.mark_dotted(world.session, "w", [quick.delivery_id], utcnow())
    for email, claim in (("quick@kent.police.uk", quick), ("early@kent.police.uk", early)):
        world.bounce(edition.id, claim.subscriber_id, email, "5.1.1")
    assert world.delivery(edition.id, quick.subscriber_id).status == DeliveryStatus.BOUNCED
    assert world.delivery(edition.id, early.subscriber_id).status == DeliveryStatus.SENDING
    assert outbox.record(world.session, "w", [
        outbox.Result(c.delivery_id, DeliveryStatus.SENT, 250, "250 queued")
        for c in (quick, early)]) == 1  # only the row still in the worker's hands
    row = world.delivery(edition.id, quick.subscriber_id)
    assert (row.status, row.last_code, row.lease_until) == (DeliveryStatus.BOUNCED, 550, None)
    assert "5.1.1" in (row.last_reply or "")
    assert world.subscriber(quick.subscriber_id).status == SubscriberStatus.BOUNCED


def test_a_bounce_naming_only_the_unsubscribe_token_finds_a_delivery_the_relay_has(
        world: World) -> None:
    """A relay that rewrites our Message-ID and bounces at once returns only the List-Unsubscribe
    token: the delivery it names may still be `sending` with its dot marked, and is the one."""
    ids = world.people(["quick@kent.police.uk"])
    sid = ids["quick@kent.police.uk"]
    edition, _ = outbox.store_edition(
        world.session, slug="race", title="race", subject="race", topic="newsletter",
        regions=["kent"], roles=[], source="race", compiled={}, actor="tester")
    outbox.enqueue(world.session, edition)
    [claim] = outbox.claim_due(world.session, "w", 5, timedelta(minutes=5))
    topic = store.topics_by_slug(world.session, ["newsletter"])[0]
    token = tokens_for(world.settings).unsubscribe(sid, topic.id)
    returned = (f"Message-ID: <rewritten.1@relay.example>\r\nTo: <quick@kent.police.uk>\r\n"
                f"Subject: race\r\nList-Unsubscribe: <https://news.example/u/{token}>\r\n")

    def bounce() -> bounce_policy.Outcome:
        return world.receive(dsn("quick@kent.police.uk", "5.1.1", original_headers=returned))
    assert bounce().decision is Decision.UNMATCHED  # before the dot the relay has nothing
    outbox.mark_dotted(world.session, "w", [claim.delivery_id], utcnow())
    outcome = bounce()
    assert outcome.decision is Decision.SUPPRESSED, outcome.detail
    assert world.delivery(edition.id, sid).status == DeliveryStatus.BOUNCED


def test_a_report_counts_fully_only_when_it_names_the_readers_own_address(
        world: World) -> None:
    """Our token names the delivery; the report's recipient says whether it is about this
    reader's mailbox (in any case) or where their mail went on to (a forward): at most soft."""
    ids = world.people(["Mixed.Case@kent.police.uk", "forwards@kent.police.uk"])
    edition = world.send("spring")
    own = world.bounce(edition, ids["Mixed.Case@kent.police.uk"], "MIXED.CASE@Kent.Police.UK",
                       "5.1.1")
    assert own.decision is Decision.SUPPRESSED
    assert world.suppressed("mixed.case@kent.police.uk")
    forward = world.bounce(edition, ids["forwards@kent.police.uk"],
                           "old.mailbox@elsewhere.example", "5.1.1")
    assert forward.decision is Decision.COUNTED
    assert ("the report names old.mailbox@elsewhere.example, not the subscriber's address"
            in forward.detail)
    assert world.subscriber(ids["forwards@kent.police.uk"]).status == SubscriberStatus.ACTIVE


def test_with_two_hard_bounces_needed_each_reader_counts_their_own_in_the_window(
        world: World) -> None:
    world.policy = dataclasses.replace(world.policy, hard_threshold=2)
    ids = world.people(["one@kent.police.uk", "two@kent.police.uk"])
    first, second = world.send("spring"), world.send("summer")
    one, two = ids["one@kent.police.uk"], ids["two@kent.police.uk"]
    said = world.bounce(first, one, "one@kent.police.uk", "5.1.1", now=T0)
    assert (said.decision, said.detail) == (Decision.COUNTED, "hard bounce 1 of 2")
    other = world.bounce(first, two, "two@kent.police.uk", "5.1.1", now=T0)  # not one's
    assert (other.decision, other.detail) == (Decision.COUNTED, "hard bounce 1 of 2")
    late = world.bounce(second, one, "one@kent.police.uk", "5.1.1",
                        now=T0 + timedelta(days=91))  # the first has left the window
    assert (late.decision, late.detail) == (Decision.COUNTED, "hard bounce 1 of 2")
    again = world.bounce(second, one, "one@kent.police.uk", "5.1.1",
                         now=T0 + timedelta(days=92))
    assert (again.decision, again.detail) == (
        Decision.SUPPRESSED, "hard bounce 5.1.1: the address is dead; marked bounced and "
                             "suppressed")
    assert world.subscriber(two).status == SubscriberStatus.ACTIVE


@pytest.mark.parametrize(("status", "diagnostic", "names_subscriber", "kind"), [
    ("5.4.1", "smtp; 550 5.4.1 Recipient address rejected: Access denied", True, "hard"),
    ("5.4.1", "smtp; 550 5.4.1 Relay access denied", True, "soft"),  # not "no such mailbox"
    ("5.1.1", "smtp; 550 5.1.1 user unknown", False, "soft"),  # a forward: not their mailbox
    (None, "", True, "hard"),  # no code: wording as sure as a 5.1.1
])
def test_what_a_permanent_failure_means_for_the_reader(
        settings: Settings, status: str | None, diagnostic: str, names_subscriber: bool,
        kind: str) -> None:
    from mailer.bounces import Failure, Kind, Verdict

    failure = Failure(recipient="r@kent.police.uk", kind=Kind.HARD, status=status,
                      action="failed", diagnostic=diagnostic)
    verdict = Verdict(Kind.HARD, "test", failures=(failure,))
    policy = BouncePolicy.from_settings(settings)
    assert policy.event_kind(verdict, failure, names_subscriber=names_subscriber) == kind
    dead = dataclasses.replace(failure, status="5.1.1")
    assert policy.event_kind(verdict, dead) == "hard"  # their own address unless told
    assert policy.event_kind(verdict, None) == "hard"  # naming nobody: the whole message's
    assert policy.event_kind(dataclasses.replace(verdict, kind=Kind.SOFT), None) == "soft"


def test_an_expired_delivery_is_soft_a_dead_domain_is_hard(world: World) -> None:
    ids = world.people(["slow@kent.police.uk", "nodomain@kent.police.uk"])
    edition = world.send("spring")
    assert world.bounce(edition, ids["slow@kent.police.uk"], "slow@kent.police.uk",
                        "5.4.7").decision is Decision.COUNTED
    assert world.bounce(edition, ids["nodomain@kent.police.uk"], "nodomain@kent.police.uk",
                        "5.4.4").decision is Decision.SUPPRESSED


# ---- soft bounces ----

def test_soft_bounces_disable_after_three_across_two_sends_counted_once_a_day(
        world: World) -> None:
    ids = world.people(["full@kent.police.uk"])
    sid, address = ids["full@kent.police.uk"], "full@kent.police.uk"
    first, second = world.send("spring"), world.send("summer")

    assert world.bounce(first, sid, address, "4.2.2", now=T0).decision is Decision.COUNTED
    later_that_day = world.bounce(first, sid, address, "4.2.2", now=T0 + timedelta(hours=3))
    assert later_that_day.decision is Decision.NOT_COUNTED
    assert world.bounce(first, sid, address, "5.2.2",
                        now=T0 + timedelta(days=1)).decision is Decision.COUNTED
    third = world.bounce(first, sid, address, "4.2.2", now=T0 + timedelta(days=2))
    assert third.decision is Decision.COUNTED and "1 of 2 sends" in third.detail
    assert world.subscriber(sid).status == SubscriberStatus.ACTIVE  # one send is not enough
    assert world.subscriber(sid).bounce_score == 3.0

    fourth = world.bounce(second, sid, address, "4.2.2", now=T0 + timedelta(days=30))
    assert fourth.decision is Decision.DISABLED
    assert world.subscriber(sid).status == SubscriberStatus.BOUNCED
    assert world.suppressed(address)


def test_a_soft_bounce_counts_once_per_utc_day_at_the_days_exact_edges(world: World) -> None:
    """Reports are judged in the order they come, not the order they happened: a report about
    yesterday can arrive after one about today."""
    ids = world.people(["edge@kent.police.uk"])
    sid, address = ids["edge@kent.police.uk"], "edge@kent.police.uk"
    edition = world.send("spring")
    day = datetime(2026, 3, 2, tzinfo=UTC)

    def at(moment: datetime) -> bounce_policy.Outcome:
        return world.bounce(edition, sid, address, "4.2.2", now=moment)
    midnight = at(day)  # the first moment of the day
    assert (midnight.decision, midnight.detail) == (
        Decision.COUNTED, "soft bounce 1 of 3 in 90 days (1 of 2 sends)")
    last = at(day + timedelta(days=1) - timedelta(microseconds=1))  # its last moment
    assert (last.decision, last.detail) == (Decision.NOT_COUNTED,
                                            "a soft bounce already counted today")
    assert at(day + timedelta(hours=12)).decision is Decision.NOT_COUNTED
    next_midnight = at(day + timedelta(days=2))  # a day later than the next
    assert next_midnight.decision is Decision.COUNTED
    late = at(day + timedelta(days=1, hours=12))  # about the day between, reported late
    assert (late.decision, late.detail) == (
        Decision.COUNTED, "soft bounce 3 of 3 in 90 days (1 of 2 sends)")


def test_soft_bounces_reach_the_threshold_exactly_and_the_window_edge_still_counts(
        world: World) -> None:
    ids = world.people(["full2@kent.police.uk"])
    sid, address = ids["full2@kent.police.uk"], "full2@kent.police.uk"
    first, second = world.send("spring"), world.send("summer")
    assert world.bounce(first, sid, address, "4.2.2", now=T0).decision is Decision.COUNTED
    assert world.bounce(first, sid, address, "4.2.2",
                        now=T0 + timedelta(days=1)).decision is Decision.COUNTED
    # the third, exactly 90 days after the first: the first still counts, so 3 of 3
    third = world.bounce(second, sid, address, "4.2.2", now=T0 + timedelta(days=90))
    assert (third.decision, third.detail) == (
        Decision.DISABLED, "soft bounce 3 in 90 days across 2 sends: marked bounced and "
                           "suppressed")
    assert world.subscriber(sid).status == SubscriberStatus.BOUNCED


def test_soft_bounces_older_than_the_window_are_forgotten(world: World) -> None:
    ids = world.people(["leave@kent.police.uk"])
    sid, address = ids["leave@kent.police.uk"], "leave@kent.police.uk"
    first, second = world.send("spring"), world.send("autumn")
    world.bounce(first, sid, address, "4.2.2", now=T0)
    world.bounce(first, sid, address, "4.2.2", now=T0 + timedelta(days=1))
    late = world.bounce(second, sid, address, "4.2.2", now=T0 + timedelta(days=120))
    assert late.decision is Decision.COUNTED and "soft bounce 1 of 3" in late.detail
    assert world.subscriber(sid).status == SubscriberStatus.ACTIVE


def test_a_delay_notice_is_recorded_and_not_counted(world: World) -> None:
    ids = world.people(["delayed@kent.police.uk"])
    edition = world.send("spring")
    sid = ids["delayed@kent.police.uk"]
    outcome = world.bounce(edition, sid, "delayed@kent.police.uk", "4.4.1", action="delayed")
    assert outcome.decision is Decision.NOT_COUNTED and "delay" in outcome.detail
    delivery = world.delivery(edition, sid)
    assert delivery.status == DeliveryStatus.SENT and "delay" in (delivery.last_reply or "")


# ---- complaints, policy rejections, auto-replies, unknowns ----

def test_a_complaint_unsubscribes_and_suppresses_at_once(world: World) -> None:
    ids = world.people(["angry@kent.police.uk"])
    edition = world.send("spring")
    sid = ids["angry@kent.police.uk"]
    # Feedback loops send to the address of the original's Return-Path: no VERP token in the
    # envelope here, so the Message-ID of the original is what names the delivery.
    mid = message_id(world.secret, edition, sid, "example.org")
    outcome = world.receive(arf("angry@kent.police.uk", mid))
    assert outcome.decision is Decision.COMPLAINT
    assert world.subscriber(sid).status == SubscriberStatus.COMPLAINED
    assert store.active_topics(world.session, sid) == []
    assert world.suppressed("angry@kent.police.uk")
    assert store.consent_history(world.session, sid)[-1].action == ConsentAction.COMPLAINT
    assert world.delivery(edition, sid).status == DeliveryStatus.SENT  # it did arrive


def test_a_policy_rejection_alerts_and_leaves_the_subscriber_alone(world: World) -> None:
    ids = world.people(["dmarc@kent.police.uk"])
    edition = world.send("spring")
    sid = ids["dmarc@kent.police.uk"]
    outcome = world.bounce(edition, sid, "dmarc@kent.police.uk", "5.7.26")
    assert outcome.decision is Decision.NOT_COUNTED and "authentication" in outcome.detail
    assert world.subscriber(sid).status == SubscriberStatus.ACTIVE
    assert not world.suppressed("dmarc@kent.police.uk")
    (alert,) = bounce_policy.open_alerts(world.session)
    assert (alert.kind, alert.domain, alert.edition_id) == ("policy", "kent.police.uk", edition)
    assert "DMARC" in alert.detail
    assert world.delivery(edition, sid).status == DeliveryStatus.BOUNCED
    assert [(a.kind, a.key) for a in alerts.recent(world.session)] == [
        ("bounce-policy", f"bounce-alert:{alert.id}")]
    world.bounce(edition, sid, "dmarc@kent.police.uk", "5.7.26")  # again: still one alert
    assert len(alerts.recent(world.session)) == 1


def test_policy_rejections_suppress_when_the_setting_says_so(world: World) -> None:
    ids = world.people(["group@kent.police.uk"])
    edition = world.send("spring")
    strict = dataclasses.replace(world.policy, policy_rejections_suppress=True)
    verp = world.verp(edition, ids["group@kent.police.uk"])
    outcome = world.receive(dsn("group@kent.police.uk", "5.7.1", to=verp), (verp,),
                            policy=strict)
    assert outcome.decision is Decision.SUPPRESSED


def test_auto_replies_and_unreadable_mail_are_kept_and_change_nothing(world: World) -> None:
    ids = world.people(["ooo@kent.police.uk"])
    world.send("spring")
    ignored = world.receive(VACATION)
    junk = world.receive(b"\x00\xff not a message at all")
    assert ignored.decision is Decision.IGNORED and "auto-reply" in ignored.detail
    assert junk.decision is Decision.UNKNOWN and "kept for review" in junk.detail
    assert world.subscriber(ids["ooo@kent.police.uk"]).status == SubscriberStatus.ACTIVE
    assert world.session.scalar(select(func.count()).select_from(InboundRecord)) == 2
    assert world.session.scalar(select(func.count()).select_from(BounceEvent)) == 0
    assert bounce_policy.raw_message(world.session, junk.inbound_id) == (
        b"\x00\xff not a message at all")


def test_a_bounce_without_our_reference_is_kept_but_not_trusted(world: World) -> None:
    ids = world.people(["victim@kent.police.uk"])
    world.send("spring")
    forged = world.receive(dsn("victim@kent.police.uk", "5.1.1"))
    assert forged.decision is Decision.UNMATCHED and "reference" in forged.detail
    assert world.subscriber(ids["victim@kent.police.uk"]).status == SubscriberStatus.ACTIVE

    trusting = dataclasses.replace(world.policy, match_by_address=True)
    matched = world.receive(dsn("victim@kent.police.uk", "5.1.1"), policy=trusting)
    assert matched.decision is Decision.SUPPRESSED


def test_a_reference_to_no_delivery_is_unmatched(world: World) -> None:
    world.people(["someone@kent.police.uk"])
    verp = return_path(world.secret, 999, 999, BOUNCE_ADDRESS)
    outcome = world.receive(dsn("someone@kent.police.uk", "5.1.1", to=verp), (verp,))
    assert outcome.decision is Decision.UNMATCHED and "no such delivery" in outcome.detail


def test_a_message_the_policy_fails_on_is_kept_with_the_reason(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = world.people(["bug@kent.police.uk"])
    edition = world.send("spring")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug in the policy")

    monkeypatch.setattr(bounce_policy, "_decide", broken)
    outcome = world.bounce(edition, ids["bug@kent.police.uk"], "bug@kent.police.uk", "5.1.1")
    assert outcome.decision is Decision.ERROR and "simulated bug" in outcome.detail
    world.session.commit()  # the message survives the failed savepoint
    record = world.session.get(InboundRecord, outcome.inbound_id)
    assert record.decision == "error" and record.raw
    assert world.subscriber(ids["bug@kent.police.uk"]).status == SubscriberStatus.ACTIVE

    monkeypatch.undo()  # the bug fixed: the same message, when it comes again, is acted on
    again = world.receive(record.raw, (world.verp(edition, ids["bug@kent.police.uk"]),))
    assert again.inbound_id == outcome.inbound_id and again.decision is Decision.SUPPRESSED
    assert world.subscriber(ids["bug@kent.police.uk"]).status == SubscriberStatus.BOUNCED
    assert world.session.scalar(select(func.count()).select_from(InboundRecord)) == 1


# ---- the domain alert ----

def _force(world: World, n: int = 6) -> dict[str, int]:
    return world.people([f"officer{i}@essex.police.uk" for i in range(n)]
                        + ["other@kent.police.uk"])


def test_most_of_a_domain_bouncing_raises_an_alert_instead_of_disabling_it(
        world: World) -> None:
    ids = _force(world)
    edition = world.send("spring")
    policy = dataclasses.replace(world.policy, hold=timedelta(minutes=60))
    world.policy = policy
    for i in range(4):  # 4 of 6 at essex.police.uk: the force's mail system, not its officers
        address = f"officer{i}@essex.police.uk"
        assert world.bounce(edition, ids[address], address, "5.1.1",
                            now=T0 + timedelta(minutes=i)).decision is Decision.PENDING
    world.bounce(edition, ids["other@kent.police.uk"], "other@kent.police.uk", "5.1.1", now=T0)
    assert bounce_policy.settle(world.session, policy, now=T0 + timedelta(minutes=30)) == []

    settled = bounce_policy.settle(world.session, policy, now=T0 + timedelta(minutes=65))
    decisions = {s.subscriber_id: s.decision for s in settled}
    assert decisions == {**{ids[f"officer{i}@essex.police.uk"]: Decision.HELD for i in range(4)},
                         ids["other@kent.police.uk"]: Decision.SUPPRESSED}
    assert all(world.subscriber(ids[f"officer{i}@essex.police.uk"]).status == "active"
               for i in range(6))
    (alert,) = bounce_policy.open_alerts(world.session)
    assert (alert.kind, alert.domain, alert.recipients, alert.bounced) == (
        "domain", "essex.police.uk", 6, 4)
    (told,) = alerts.recent(world.session)  # the co-ordinators are told, once
    assert (told.kind, told.key) == ("bounce-domain", f"bounce-alert:{alert.id}")
    assert "essex.police.uk" in told.subject and f"resolve {alert.id}" in told.message

    # A co-ordinator checked with the force: the addresses really are gone.
    changed = bounce_policy.resolve_alert(world.session, policy, alert.id, "coordinator",
                                          apply=True, now=T0 + timedelta(hours=2))
    assert changed == 4
    assert [world.subscriber(ids[f"officer{i}@essex.police.uk"]).status for i in range(6)] == [
        "bounced"] * 4 + ["active"] * 2
    assert bounce_policy.open_alerts(world.session) == []


def test_a_dismissed_alert_keeps_later_bounces_of_that_send_held(world: World) -> None:
    ids = _force(world)
    edition = world.send("spring")
    for i in range(4):
        address = f"officer{i}@essex.police.uk"
        world.bounce(edition, ids[address], address, "4.4.7")  # hold 0: settled at once
    (alert,) = bounce_policy.open_alerts(world.session)
    # With no hold the first bounces are acted on before the burst is visible; the third
    # crosses the line (3 of 6 is not more than half, 4 of 6 is).
    statuses = [e.action for i in range(4) for e in bounce_policy.events_for(
        world.session, ids[f"officer{i}@essex.police.uk"])]
    assert statuses == ["counted", "counted", "counted", "held"]
    bounce_policy.resolve_alert(world.session, world.policy, alert.id, "coordinator",
                                apply=False)
    late = world.bounce(edition, ids["officer5@essex.police.uk"], "officer5@essex.police.uk",
                        "5.1.1")
    assert late.decision is Decision.HELD and "dismissed" in late.detail
    assert world.subscriber(ids["officer5@essex.police.uk"]).status == "active"


def test_a_domain_alert_counts_people_of_this_send_from_the_smallest_domain_it_covers(
        world: World) -> None:
    """Five recipients at a domain is the smallest an alert covers; each person counts once
    however many reports they bring, and another send's bounces are not this send's."""
    ids = _force(world, n=4)  # 4 at essex.police.uk, below the smallest
    earlier = world.send("spring")
    for i in range(3):
        address = f"officer{i}@essex.police.uk"
        assert world.bounce(earlier, ids[address], address, "4.2.2",
                            now=T0 + timedelta(minutes=i)).decision is Decision.COUNTED
    ids.update(world.people(["officer4@essex.police.uk"]))  # now 5 at the domain
    edition = world.send("summer")
    decisions = [world.bounce(edition, ids[f"officer{i}@essex.police.uk"],
                              f"officer{i}@essex.police.uk", "4.2.2",
                              now=T0 + timedelta(days=1, minutes=minutes)).decision
                 for i, minutes in ((0, 0), (0, 1), (1, 2))]  # officer0 twice: one person
    assert decisions == [Decision.COUNTED, Decision.NOT_COUNTED, Decision.COUNTED]
    assert bounce_policy.open_alerts(world.session) == []  # 2 of 5: not most
    third = world.bounce(edition, ids["officer2@essex.police.uk"], "officer2@essex.police.uk",
                         "4.2.2", now=T0 + timedelta(days=1, minutes=3))
    assert "held: 3 of 5 recipients at essex.police.uk bounced this send (domain alert)" \
        in third.detail
    (alert,) = bounce_policy.open_alerts(world.session)
    assert (alert.edition_id, alert.recipients, alert.bounced) == (edition, 5, 3)
    assert alert.detail == ("3 of 5 recipients at essex.police.uk bounced this send: their mail "
                            "system may be down or refusing us; nobody is disabled until a "
                            "co-ordinator resolves this alert")


def test_a_small_domain_is_never_an_alert(world: World) -> None:
    ids = world.people(["solo@tiny.example.org"])
    edition = world.send("spring")
    outcome = world.bounce(edition, ids["solo@tiny.example.org"], "solo@tiny.example.org",
                           "5.1.1")
    assert outcome.decision is Decision.SUPPRESSED
    assert world.session.scalar(select(func.count()).select_from(BounceAlert)) == 0


# ---- retention ----

def test_purge_drops_raw_after_the_retention_and_records_later(world: World) -> None:
    ids = world.people(["old@kent.police.uk"])
    edition = world.send("spring")
    outcome = world.bounce(edition, ids["old@kent.police.uk"], "old@kent.police.uk", "4.2.2",
                           now=T0)
    policy = world.policy
    nothing = bounce_policy.purge(world.session, policy, now=T0 + timedelta(days=89))
    assert nothing.raw_cleared == 0
    done = bounce_policy.purge(world.session, policy, now=T0 + timedelta(days=91))
    assert (done.raw_cleared, done.records_deleted) == (1, 0)
    world.session.expire_all()
    record = world.session.get(InboundRecord, outcome.inbound_id)
    assert record.raw is None and record.raw_purged_at is not None
    assert record.decision == "counted"  # what was decided outlives the raw message
    gone = bounce_policy.purge(world.session, policy, now=T0 + timedelta(days=401))
    assert gone.records_deleted == 1
    assert bounce_policy.events_for(world.session, ids["old@kent.police.uk"]) == []


# ---- the command line ----

def test_fetch_records_then_list_shows_and_purge_runs(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer.cli import run

    ids = world.people(["cli@kent.police.uk", "ooo@kent.police.uk"])
    edition = world.send("spring")
    world.session.commit()
    sid = ids["cli@kent.police.uk"]
    box = mailbox.Maildir(tmp_path / "md", create=True)
    box.add(dsn("cli@kent.police.uk", "5.1.1", to=world.verp(edition, sid)))
    box.add(VACATION)
    # The CLI's default hold is 60 minutes: say 0 so the fetch acts at once.
    monkeypatch.setenv("MAILER_BOUNCE_HOLD_MINUTES", "0")
    assert run(["bounces", "fetch", f"maildir:{tmp_path / 'md'}"]) == 0
    out = capsys.readouterr().out
    assert "suppressed" in out and "ignored" in out and "2 message(s) read" in out
    assert run(["bounces", "fetch", f"maildir:{tmp_path / 'md'}"]) == 0
    assert "already received" in capsys.readouterr().out
    assert run(["bounces", "list", "--subscriber", str(sid)]) == 0
    listed = capsys.readouterr().out
    assert "no open alerts" in listed and "hard 5.1.1 suppressed" in listed
    assert f"edition {edition}, subscriber {sid}" in listed
    assert run(["bounces", "purge"]) == 0
    assert "raw messages cleared: 0" in capsys.readouterr().out
    assert run(["bounces", "resolve", "12345", "--dismiss"]) == 1
    assert "no bounce alert 12345" in capsys.readouterr().err
    world.session.expire_all()
    assert world.subscriber(sid).status == SubscriberStatus.BOUNCED


def test_fetch_reads_an_imap_mailbox_and_leaves_it_as_it_was(
        world: World, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.parse import quote

    from mailer.cli import run
    from tests.imap_server import PASSWORD, USER, ImapServer

    ids = world.people(["imap.gone@kent.police.uk"])
    edition = world.send("spring")
    world.session.commit()
    sid = ids["imap.gone@kent.police.uk"]
    # An Exchange Online mailbox: the relay allowed no VERP, so the bounce reached the plain
    # bounce address and only the returned Message-ID names the delivery.
    mid = message_id(world.secret, edition, sid, "news.example.police.uk")
    bounce = dsn("imap.gone@kent.police.uk", "5.1.10", original_message_id=mid)
    monkeypatch.setenv("MAILER_BOUNCE_HOLD_MINUTES", "0")
    monkeypatch.setenv("MAILER_IMAP_PASSWORD", PASSWORD)
    with ImapServer({"INBOX": [bounce, VACATION]}) as server:
        url = f"imap://{quote(USER)}@127.0.0.1:{server.port}/INBOX?tls=none"
        assert run(["bounces", "fetch", url]) == 0
        out = capsys.readouterr().out
        assert "2 message(s) read" in out and "suppressed" in out and "ignored" in out
        assert run(["bounces", "fetch", url]) == 0
        assert "already received" in capsys.readouterr().out
        assert server.flags() == [frozenset(), frozenset()]  # nothing marked seen or deleted
    world.session.expire_all()
    assert world.subscriber(sid).status == SubscriberStatus.BOUNCED
    record = world.session.scalar(select(InboundRecord).where(InboundRecord.subscriber_id == sid))
    assert record is not None and record.origin.startswith("imap://127.0.0.1/INBOX;UID=")
    assert record.reference_source == "original:Message-ID"


def test_fetch_says_clearly_when_the_imap_password_is_wrong(
        world: World, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer.cli import run
    from tests.imap_server import ImapServer

    monkeypatch.setenv("MAILER_IMAP_PASSWORD", "not-the-password")
    with ImapServer({"INBOX": [VACATION]}) as server:
        assert run(["bounces", "fetch",
                    f"imap://bounces@127.0.0.1:{server.port}/INBOX?tls=none"]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err


def test_list_shows_uk_time(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    ids = world.people(["summer@kent.police.uk"])
    edition = world.send("summer")
    sid = ids["summer@kent.police.uk"]
    world.bounce(edition, sid, "summer@kent.police.uk", "4.2.2",
                 now=datetime(2026, 7, 1, 8, 30, tzinfo=UTC))
    world.session.commit()
    assert run(["bounces", "list", "--subscriber", str(sid)]) == 0
    out = capsys.readouterr().out
    assert "2026-07-01 09:30 BST soft 4.2.2 counted" in out  # stored as 08:30 UTC
    assert "bounce 1 2026-07-01 09:30 BST soft 4.2.2" in out


def test_fetch_applies_the_retention_periods_itself(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    ids = world.people(["long.ago@kent.police.uk"])
    edition = world.send("spring")
    sid = ids["long.ago@kent.police.uk"]
    old = world.bounce(edition, sid, "long.ago@kent.police.uk", "4.2.2",
                       now=datetime.now(UTC) - timedelta(days=91))
    world.session.commit()
    mailbox.Maildir(tmp_path / "empty", create=True)
    assert run(["bounces", "fetch", f"maildir:{tmp_path / 'empty'}"]) == 0
    assert "raw messages cleared: 1" in capsys.readouterr().out
    world.session.expire_all()
    record = world.session.get(InboundRecord, old.inbound_id)
    assert record.raw is None and record.decision == "counted"


def test_an_alert_raised_meanwhile_by_another_receiver_is_the_one_updated(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = world.people(["dmarc.a@kent.police.uk", "dmarc.b@kent.police.uk"])
    edition = world.send("spring")
    world.bounce(edition, ids["dmarc.a@kent.police.uk"], "dmarc.a@kent.police.uk", "5.7.26")
    (alert,) = bounce_policy.open_alerts(world.session)
    world.session.commit()
    real, looks = bounce_policy._find_alert, []

    def raced(*args: object) -> BounceAlert | None:
        # Our look finds nothing, as when another thread commits the alert just after it.
        looks.append(args)
        return None if len(looks) == 1 else real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(bounce_policy, "_find_alert", raced)
    outcome = world.bounce(edition, ids["dmarc.b@kent.police.uk"], "dmarc.b@kent.police.uk",
                           "5.7.26")
    assert outcome.decision is Decision.NOT_COUNTED  # not an error: the unique key held
    assert len(looks) == 2
    assert [a.id for a in bounce_policy.open_alerts(world.session)] == [alert.id]


def test_a_settle_that_fails_leaves_the_message_recorded_and_the_event_pending(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = world.people(["later@kent.police.uk"])
    edition = world.send("spring")
    sid = ids["later@kent.police.uk"]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated failure while settling")

    monkeypatch.setattr(bounce_policy, "_judge", broken)
    outcome = world.bounce(edition, sid, "later@kent.police.uk", "5.1.1")
    assert outcome.decision is Decision.PENDING
    (event,) = bounce_policy.events_for(world.session, sid)
    assert event.action == "pending"
    monkeypatch.undo()
    (settled,) = bounce_policy.settle(world.session, world.policy)
    assert settled.decision is Decision.SUPPRESSED
    assert world.subscriber(sid).status == SubscriberStatus.BOUNCED
    assert world.session.get(InboundRecord, outcome.inbound_id).decision == "suppressed"
