"""Every message of the bounce corpus, through the whole inbound path, on SQLite and PostgreSQL.

`tests/test_bounces.py` checks what each message is (kind, recipients, reference). This checks
what that does: each message arrives, as a mailbox fetch hands it over, about a live delivery
to the subscriber the manifest names, and the decision and the subscriber's state afterwards
must be the manifest's `policy`. The corpus references are signed with the corpus secret for
edition 7 and subscriber ids of the 100s; they are signed again here for the real ids, so the
messages are otherwise byte for byte what is on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailer import bounce_policy, outbox
from mailer.bounce_policy import BounceAlert, BouncePolicy
from mailer.config import Settings
from mailer.inbound import InboundMessage
from mailer.links import tokens_for
from mailer.models import Delivery, DeliveryStatus
from mailer.reference import delivery_ref, parse_delivery_ref
from subscribers import store
from subscribers.models import Channel, SubscriberStatus
from subscribers.tokens import InvalidToken, Purpose, Tokens
from tests.test_bounces import CORPUS, EXPECTED, SECRET, corpus_clock  # noqa: F401 (a fixture)

_REF = re.compile(rb"e(\d+)\.s(\d+)\.[0-9a-f]{16}")
_TOKEN = re.compile(rb"/u/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)")
CORPUS_TOKENS = Tokens([SECRET])

#: What the subscriber is after each decision.
STATUS_AFTER = {"suppressed": SubscriberStatus.BOUNCED, "complaint": SubscriberStatus.COMPLAINED}


def _corpus_sids(raw: bytes) -> set[int]:
    """The subscriber ids the message's valid references and tokens name."""
    found = {int(m[2]) for m in _REF.finditer(raw)
             if parse_delivery_ref(SECRET, m[0].decode())}
    for m in _TOKEN.finditer(raw):
        with contextlib.suppress(InvalidToken):  # not a token of the corpus key
            found.add(CORPUS_TOKENS.read(Purpose.UNSUBSCRIBE, m[1].decode()).subscriber_id)
    return found


def _resign(raw: bytes, ids: dict[int, int], edition_id: int, topic_id: int,
            settings: Settings) -> bytes:
    """The message with each valid corpus reference and token signed again for the real
    (edition, subscriber); forged ones stay as they are, and so stay invalid."""
    secret, tokens = settings.secret(), tokens_for(settings)

    def ref(m: re.Match[bytes]) -> bytes:
        if not parse_delivery_ref(SECRET, m[0].decode()):
            return m[0]
        return delivery_ref(secret, edition_id, ids[int(m[2])]).encode()

    def token(m: re.Match[bytes]) -> bytes:
        try:
            claims = CORPUS_TOKENS.read(Purpose.UNSUBSCRIBE, m[1].decode())
        except InvalidToken:
            return m[0]
        return b"/u/" + tokens.unsubscribe(ids[claims.subscriber_id], topic_id).encode()

    return _TOKEN.sub(token, _REF.sub(ref, raw))


@pytest.mark.usefixtures("corpus_clock")
def test_each_corpus_message_gets_the_policy_the_manifest_says(session: Session,
                                                               settings: Settings) -> None:
    settings = settings.model_copy(update={"allow_smtputf8": True})  # jörg.müller@, søren@
    rules = settings.rules()
    # The domain alert has tests of its own (test_bounce_policy.py); here most of the corpus
    # is at example.com and example.org, which would otherwise trip it.
    policy = dataclasses.replace(BouncePolicy.from_settings(settings), hold=timedelta(0),
                                 domain_alert_min_recipients=10_000)
    names = sorted(EXPECTED)
    assert len(names) >= 30
    addresses: dict[str, str] = {}
    corpus_sid: dict[str, int | None] = {}
    for name in names:
        sids = _corpus_sids((CORPUS / name).read_bytes())
        assert len(sids) <= 1, f"{name} names more than one subscriber: {sids}"
        corpus_sid[name] = next(iter(sids), None)
        addresses[name] = EXPECTED[name]["subscriber"] or f"subscriber.{len(addresses)}@example.net"
    assert len(set(addresses.values())) == len(addresses)

    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    topics = store.topics_by_slug(session, ["newsletter"])
    store.bulk_add_active(session, rules, [
        (store.profile_from(rules, email=a, region="kent"), topics) for a in addresses.values()],
        ctx)
    real = {name: store.get_by_email(session, rules, addresses[name]).id for name in names}
    ids = {sid: real[name] for name, sid in corpus_sid.items() if sid is not None}
    edition, _ = outbox.store_edition(
        session, slug="spring-2026", title="Spring 2026", subject="MSHT Bulletin - Spring 2026",
        topic="newsletter", regions=["kent"], roles=[], source="spring", compiled={},
        actor="tester")
    assert outbox.enqueue(session, edition) == len(names)
    session.execute(update(Delivery).where(Delivery.edition_id == edition.id)
                    .values(status=DeliveryStatus.SENT, last_code=250))
    session.flush()
    topic_id = outbox.topic_id(session, "newsletter")

    seen: dict[str, tuple[str, str]] = {}
    for name in names:
        raw = _resign((CORPUS / name).read_bytes(), ids, edition.id, topic_id, settings)
        outcome = bounce_policy.receive(
            session, policy, InboundMessage(raw=raw, origin=f"maildir:corpus#{name}"),
            settings.secret(), rules=rules, token_keys=settings.token_keys())
        session.expire_all()
        status = session.get(store.Subscriber, real[name]).status
        seen[name] = (str(outcome.decision), str(status))
    expected = {name: (EXPECTED[name]["policy"],
                       str(STATUS_AFTER.get(EXPECTED[name]["policy"], SubscriberStatus.ACTIVE)))
                for name in names}
    assert seen == expected

    # The forged bounce named a real subscriber's address; only a signed reference counts.
    victim = store.get_by_email(session, rules, "victim@example.org")
    assert victim.status == SubscriberStatus.ACTIVE
    assert not store.is_suppressed(session, rules, "victim@example.org")
    # Both 5.7.1 rejections raised a policy alert instead of changing anyone.
    alerts = session.scalars(select(BounceAlert)).all()
    assert {(a.kind, a.domain) for a in alerts} == {("policy", "example.org"),
                                                    ("policy", "example.police.uk")}
    # Where only an unsubscribe token survived, the delivery was still found.
    token_only = real["postfix_no_verp_list_unsubscribe.eml"]
    delivery = outbox.delivery_of(session, edition.id, token_only)
    assert delivery is not None and delivery.status == DeliveryStatus.BOUNCED
    (event,) = bounce_policy.events_for(session, token_only)
    assert (event.edition_id, event.kind, event.action) == (edition.id, "hard", "suppressed")
    # A list address one of whose members is gone: counted as soft for the list, and said why.
    (team,) = bounce_policy.events_for(session, real["dsn_multiple_recipients_mixed.eml"])
    assert team.kind == "soft" and "left.force@example.org" in (team.diagnostic or "")


@pytest.mark.parametrize("name", ["postfix_no_verp_list_unsubscribe.eml",
                                  "arf_headers_only_list_unsubscribe.eml"])
@pytest.mark.usefixtures("corpus_clock")
def test_a_token_from_another_key_names_nobody(name: str) -> None:
    from mailer.bounces import classify_inbound

    raw = (CORPUS / name).read_bytes()
    assert classify_inbound(raw, SECRET).reference is not None
    assert classify_inbound(raw, b"another-secret-of-at-least-32-bytes!").reference is None
    # A rotated key still reads it: the old key is among the token keys.
    rotated = classify_inbound(raw, b"the-new-secret-of-at-least-32-bytes!",
                               token_keys=[SECRET, b"the-new-secret-of-at-least-32-bytes!"])
    assert rotated.reference is not None and rotated.reference.edition_id is None
