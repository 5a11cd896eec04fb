"""The store's state changes: guarded, idempotent, each one on the consent record."""

from __future__ import annotations

import datetime as dt

import pytest
import time_machine
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import migrations
from subscribers import store, validation
from subscribers.errors import AddressSuppressed, InvalidInput, SubscriberError
from subscribers.models import (
    Channel,
    ConsentEvent,
    Subscriber,
    SubscriberStatus,
    Suppression,
)
from subscribers.rules import Rules

WEB = store.Context(channel=Channel.WEB, ip="192.0.2.7", user_agent="Firefox",
                    consent_version="2026-12")
ADMIN = store.Context(channel=Channel.ADMIN, actor="coord.kent", lawful_basis="public_task")


def _profile(rules: Rules, email: str = "Jo.Bloggs@Kent.Police.UK", **kw: str) -> store.Profile:
    defaults = {"name": "Jo Bloggs", "organisation": "Kent Police", "organisation_type": "police",
                "role": "first_responder", "region": "kent"}
    return store.profile_from(rules, email=email, **{**defaults, **kw})


def _actions(session: Session, subscriber: Subscriber) -> list[str]:
    return [e.action for e in store.consent_history(session, subscriber.id)]


def test_double_opt_in_records_each_step(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter", "reminders"])
    subscriber, outcome = store.subscribe(session, rules, _profile(rules), topics, WEB)
    assert outcome is store.SubscribeOutcome.NEW
    assert subscriber.status == SubscriberStatus.PENDING
    assert store.segment_count(session, ["newsletter"]) == 0  # pending is not sendable

    assert store.confirm(session, rules, subscriber, WEB) is SubscriberStatus.ACTIVE
    assert store.confirm(session, rules, subscriber, WEB) is SubscriberStatus.ACTIVE
    assert _actions(session, subscriber) == ["subscribe", "confirm"]  # second confirm: nothing
    first = store.consent_history(session, subscriber.id)[0]
    assert (first.ip, first.consent_version, first.channel) == ("192.0.2.7", "2026-12", "web")
    assert store.segment_count(session, ["newsletter"]) == 1


def test_one_subscriber_per_address_whatever_its_case(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    first, _ = store.subscribe(session, rules, _profile(rules), topics, WEB)
    again, outcome = store.subscribe(session, rules, _profile(rules, " JO.BLOGGS@kent.police.uk"),
                                     topics, WEB)
    assert again.id == first.id and outcome is store.SubscribeOutcome.STILL_PENDING
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 1


def test_untrusted_domain_waits_for_approval(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    subscriber, _ = store.subscribe(
        session, rules, _profile(rules, "helper@charity.example.org", organisation_type="ngo"),
        topics, WEB)
    assert store.confirm(session, rules, subscriber, WEB) is SubscriberStatus.AWAITING_APPROVAL
    assert store.segment_count(session, ["newsletter"]) == 0
    assert store.approve(session, subscriber, ADMIN) is True
    assert store.approve(session, subscriber, ADMIN) is False
    assert store.segment_count(session, ["newsletter"]) == 1


def test_unsubscribe_is_idempotent_per_topic_and_overall(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter", "reminders"])
    subscriber = store.add_active(session, rules, _profile(rules), topics, ADMIN)
    reminders = store.get_topic(session, "reminders")
    one_click = store.Context(channel=Channel.ONE_CLICK)

    assert store.unsubscribe(session, subscriber, one_click, topic=reminders) is True
    assert store.unsubscribe(session, subscriber, one_click, topic=reminders) is False
    assert store.active_topics(session, subscriber.id) == ["newsletter"]
    assert subscriber.status == SubscriberStatus.ACTIVE

    assert store.unsubscribe(session, subscriber, one_click) is True
    assert store.unsubscribe(session, subscriber, one_click) is False
    assert subscriber.status == SubscriberStatus.UNSUBSCRIBED
    assert _actions(session, subscriber) == ["add", "unsubscribe", "unsubscribe"]
    assert store.segment_count(session, ["newsletter", "reminders"]) == 0


def test_add_refuses_people_who_left(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    subscriber = store.add_active(session, rules, _profile(rules), topics, ADMIN)
    store.unsubscribe(session, subscriber, ADMIN)
    with pytest.raises(AddressSuppressed, match="unsubscribed"):
        store.add_active(session, rules, _profile(rules), topics, ADMIN)
    with pytest.raises(InvalidInput, match="lawful basis"):
        store.add_active(session, rules, _profile(rules, "x@kent.police.uk"), topics,
                         store.Context(channel=Channel.ADMIN))


@pytest.mark.parametrize(("ctx", "action", "source"), [
    (store.Context(channel=Channel.IMPORT, actor="coord.kent", lawful_basis="public_task",
                   detail={"source": "kent-list.csv"}), "import", "kent-list.csv"),
    (ADMIN, "add", "admin")])
def test_adding_someone_records_who_on_what_basis_when_and_from_where(
        session: Session, rules: Rules, ctx: store.Context, action: str, source: str) -> None:
    topics = store.topics_by_slug(session, ["newsletter", "reminders"])
    with time_machine.travel(dt.datetime(2027, 2, 3, 10, 0, tzinfo=dt.UTC), tick=False):
        added = store.add_active(session, rules, _profile(rules), topics, ctx)
    session.expire_all()
    row = session.get(Subscriber, added.id)
    assert row is not None
    at = dt.datetime(2027, 2, 3, 10, 0, tzinfo=dt.UTC)
    assert (row.email, row.email_key, row.status, row.lawful_basis, row.source,
            row.created_at, row.confirmed_at, row.name, row.region) == (
        "Jo.Bloggs@kent.police.uk", "jo.bloggs@kent.police.uk", SubscriberStatus.ACTIVE,
        "public_task", source, at, at, "Jo Bloggs", "kent")
    assert row.email_hmac == validation.email_hmac(rules, "jo.bloggs@kent.police.uk")
    assert store.active_topics(session, row.id) == ["newsletter", "reminders"]
    (event,) = store.consent_history(session, row.id)
    assert (event.action, event.channel, event.actor, event.lawful_basis, event.detail) == (
        action, ctx.channel, "coord.kent", "public_task",
        {**(ctx.detail or {}), "topics": ["newsletter", "reminders"]})


def test_adding_someone_is_refused_with_the_field_and_what_to_do(
        session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    with pytest.raises(InvalidInput) as no_basis:
        store.add_active(session, rules, _profile(rules), topics,
                         store.Context(channel=Channel.ADMIN))
    assert (no_basis.value.field, str(no_basis.value)) == (
        "lawful_basis", "say on what lawful basis this person is added")
    with pytest.raises(InvalidInput) as no_topics:
        store.add_active(session, rules, _profile(rules), [], ADMIN)
    assert (no_topics.value.field, str(no_topics.value)) == (
        "topics", "choose at least one topic")
    kept = store.add_active(session, rules, _profile(rules), topics, ADMIN)
    with pytest.raises(SubscriberError) as twice:
        store.add_active(session, rules, _profile(rules), topics, ADMIN)
    assert str(twice.value) == "this address is already a subscriber (active)"
    store.mark_bounced(session, kept, store.Context(channel=Channel.BOUNCE))
    store.erase(session, kept, ADMIN)
    with pytest.raises(AddressSuppressed) as suppressed:
        store.add_active(session, rules, _profile(rules), topics, ADMIN)
    assert str(suppressed.value) == (
        "this address is suppressed (it was erased, bounced or complained) and cannot be added "
        "again; the person may sign up themselves through the subscribe page")
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 1  # nothing added


def test_bounce_and_complaint_suppress(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    a = store.add_active(session, rules, _profile(rules, "a@kent.police.uk"), topics, ADMIN)
    b = store.add_active(session, rules, _profile(rules, "b@kent.police.uk"), topics, ADMIN)
    bounce = store.Context(channel=Channel.BOUNCE)
    assert store.mark_bounced(session, a, bounce) is True
    assert store.mark_bounced(session, a, bounce) is False
    assert store.mark_complained(session, b, store.Context(channel=Channel.COMPLAINT)) is True
    reasons = set(session.scalars(select(Suppression.reason)))
    assert reasons == {"bounced", "complained"}
    assert store.is_suppressed(session, rules, "A@kent.police.uk".lower())
    assert store.segment_count(session, ["newsletter"]) == 0


def test_erase_keeps_only_a_keyed_hash_and_an_anonymous_trail(
        session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    subscriber, _ = store.subscribe(
        session, rules, _profile(rules, "Erase.Me@Essex.Police.UK", name="Zoë Unique-Name",
                                 region="essex"), topics, WEB)
    store.confirm(session, rules, subscriber, WEB)
    sid = subscriber.id
    store.erase(session, subscriber, ADMIN)
    session.commit()

    # No table holds the address or the name in clear, in any case: every table, so that
    # tables added later are checked too.
    dump = {name: repr(session.execute(select(table)).all()).lower()
            for name, table in migrations.metadata().tables.items()}
    for needle in ("erase.me", "unique-name", "192.0.2.7", "firefox"):
        assert not [name for name, rows in dump.items() if needle in rows], needle
    assert _actions(session, session.get(Subscriber, sid)) == ["subscribe", "confirm", "erase"]

    with pytest.raises(AddressSuppressed, match="suppressed"):
        store.add_active(session, rules, _profile(rules, "erase.me@essex.police.uk"), topics,
                         ADMIN)
    # A fresh double opt-in by the person may lift it, and says so in the record.
    again, outcome = store.subscribe(session, rules, _profile(rules, "erase.me@essex.police.uk"),
                                     topics, WEB)
    assert outcome is store.SubscribeOutcome.NEW and again.id != sid
    assert store.confirm(session, rules, again, WEB) is SubscriberStatus.ACTIVE
    assert _actions(session, again) == ["subscribe", "unsuppress", "confirm"]
    assert not store.is_suppressed(session, rules, "erase.me@essex.police.uk")


def test_erasure_clears_every_personal_field_and_records_who_erased_and_when(
        session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter", "reminders"])
    other = store.add_active(session, rules, _profile(rules, "stays@kent.police.uk"), topics,
                             ADMIN)
    subscriber, _ = store.subscribe(session, rules, _profile(rules), topics, WEB)
    store.confirm(session, rules, subscriber, WEB)
    sid, digest = subscriber.id, subscriber.email_hmac
    at = dt.datetime(2027, 3, 4, 9, 30, tzinfo=dt.UTC)
    with time_machine.travel(at, tick=False):
        store.erase(session, subscriber, ADMIN)
    session.expire_all()
    row = session.get(Subscriber, sid)
    assert row is not None
    personal = ("email", "email_key", "email_hmac", "name", "organisation",
                "organisation_type", "role", "region", "source")
    assert {name: getattr(row, name) for name in personal} == dict.fromkeys(personal)
    assert (row.status, row.left_at) == (SubscriberStatus.ERASED, at)
    assert store.active_topics(session, sid) == [] and row.subscriptions == []
    assert store.active_topics(session, other.id) == ["newsletter", "reminders"]  # theirs stay
    history = store.consent_history(session, sid)
    assert [(e.action, e.ip, e.user_agent, e.detail) for e in history] == [
        ("subscribe", None, None, None), ("confirm", None, None, None),
        ("erase", None, None, None)]
    assert (history[-1].actor, history[-1].channel) == ("coord.kent", Channel.ADMIN)
    assert session.scalar(select(Suppression.reason).where(Suppression.email_hmac == digest)) \
        == "erased"


def test_a_pause_is_set_moved_and_lifted_once_each_and_only_for_an_active_reader(
        session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    reader = store.add_active(session, rules, _profile(rules), topics, ADMIN)
    until = dt.datetime(2027, 6, 1, tzinfo=dt.UTC)
    assert store.pause(session, reader, WEB, None) is False  # nothing to lift
    assert store.pause(session, reader, WEB, until) is True
    assert store.pause(session, reader, WEB, until) is False  # the same date again
    assert store.pause(session, reader, WEB, until + dt.timedelta(days=30)) is True
    assert store.pause(session, reader, WEB, None) is True
    assert reader.paused_until is None
    pauses = [e.detail for e in store.consent_history(session, reader.id) if e.action == "pause"]
    assert pauses == [{"paused_until": "2027-06-01T00:00:00+00:00"},
                      {"paused_until": "2027-07-01T00:00:00+00:00"}, {"paused_until": None}]
    store.unsubscribe(session, reader, WEB)
    with pytest.raises(SubscriberError) as refused:
        store.pause(session, reader, WEB, until)
    assert str(refused.value) == "cannot pause while the subscriber is unsubscribed"
    assert store.pause(session, reader, WEB, None) is False  # lifting none is no error


def test_segment_filters_and_send_time_recheck(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    kent = store.add_active(session, rules, _profile(rules, "k@kent.police.uk"), topics, ADMIN)
    store.add_active(session, rules, _profile(rules, "e@essex.police.uk", region="essex",
                                              role="analyst"), topics, ADMIN)
    assert store.segment_count(session, ["newsletter"], regions=["kent"]) == 1
    assert store.segment_count(session, ["newsletter"], roles=["analyst"]) == 1
    assert store.segment_count(session, ["reminders"]) == 0
    assert store.is_sendable(session, kent.id, "newsletter")
    store.unsubscribe(session, kent, ADMIN)
    assert not store.is_sendable(session, kent.id, "newsletter")


def test_counts_by_region_role_topic_status(session: Session, rules: Rules) -> None:
    both = store.topics_by_slug(session, ["newsletter", "reminders"])
    store.add_active(session, rules, _profile(rules, "a@kent.police.uk"), both, ADMIN)
    store.add_active(session, rules, _profile(rules, "b@essex.police.uk", region="essex"),
                     both[:1], ADMIN)
    store.subscribe(session, rules, _profile(rules, "c@kent.police.uk"), both, WEB)
    counts = store.counts(session)
    assert counts.by_status == {"active": 2, "pending": 1}
    assert counts.by_region == {"kent": 1, "essex": 1}
    assert counts.by_topic == {"newsletter": 2, "reminders": 1}
    assert store.counts(session, regions=["essex"]).by_topic == {"newsletter": 1, "reminders": 0}


def test_subject_access_export_has_profile_subscriptions_and_history(
        session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    subscriber, _ = store.subscribe(session, rules, _profile(rules), topics, WEB)
    store.confirm(session, rules, subscriber, WEB)
    export = store.subject_access(session, subscriber)
    assert export["profile"]["email"] == "Jo.Bloggs@kent.police.uk"
    assert export["subscriptions"][0]["topic"] == "newsletter"
    assert [e["action"] for e in export["consent_history"]] == ["subscribe", "confirm"]


def test_topics_add_and_refuse_duplicates(session: Session) -> None:
    store.add_topic(session, "op-aidant", "Operation Aidant alerts")
    with pytest.raises(SubscriberError, match="exists"):
        store.add_topic(session, "op-aidant", "again")
    with pytest.raises(InvalidInput):
        store.add_topic(session, "Bad Slug", "x")


def test_consent_events_are_append_only_in_the_store(session: Session, rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter"])
    subscriber = store.add_active(session, rules, _profile(rules), topics, ADMIN)
    store.update_profile(session, rules, subscriber, ADMIN, name="Jo B", region="essex")
    assert store.update_profile(session, rules, subscriber, ADMIN, name="Jo B") is False
    events = session.scalars(select(ConsentEvent).order_by(ConsentEvent.id)).all()
    assert [e.action for e in events] == ["add", "profile"]
    assert events[1].detail == {"fields": ["name", "region"]}


def test_a_rejected_sign_up_leaves_unsuppressed_and_only_once(session: Session,
                                                               rules: Rules) -> None:
    topics = store.topics_by_slug(session, ["newsletter", "reminders"])
    waiting, _ = store.subscribe(session, rules, _profile(rules, "helper@charity.example.org"),
                                 topics, WEB)
    assert store.reject(session, waiting, ADMIN) is False  # not confirmed yet: nothing to reject
    assert waiting.status == SubscriberStatus.PENDING
    store.confirm(session, rules, waiting, WEB)
    assert store.reject(session, waiting, ADMIN) is True
    assert waiting.status == SubscriberStatus.UNSUBSCRIBED and waiting.left_at is not None
    assert store.active_topics(session, waiting.id) == []
    assert store.reject(session, waiting, ADMIN) is False
    assert store.approve(session, waiting, ADMIN) is False
    assert _actions(session, waiting) == ["subscribe", "confirm", "reject"]
    # turned down, not suppressed: the person may sign up again and be approved later
    assert not store.is_suppressed(session, rules, "helper@charity.example.org")


def test_suppressed_among_finds_exactly_the_suppressed_digests(session: Session,
                                                               rules: Rules) -> None:
    from subscribers.validation import email_hmac

    topics = store.topics_by_slug(session, ["newsletter"])
    gone = store.add_active(session, rules, _profile(rules, "gone@kent.police.uk"), topics, ADMIN)
    store.mark_bounced(session, gone, store.Context(channel=Channel.BOUNCE))
    digests = [email_hmac(rules, f"{n}@kent.police.uk") for n in ("gone", "here", "new")]
    assert store.suppressed_among(session, digests) == {digests[0]}
    assert store.suppressed_among(session, digests[1:]) == set()
    assert store.suppressed_among(session, []) == set()
