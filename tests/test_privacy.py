"""Erasure and subject access across every table: the outbox and the bounce records quote
addresses too, so erasing from the subscriber tables alone would not be enough."""

from __future__ import annotations

from sqlalchemy import select, update

from mailer import migrations, privacy
from mailer.models import Delivery
from subscribers import store
from subscribers.models import Channel
from tests.test_bounce_policy import World, world  # noqa: F401


def test_erase_leaves_the_address_in_no_table_after_a_send_and_a_bounce(world: World) -> None:
    email = "Erase.Me.Now@kent.police.uk"
    ids = world.people([email, "keeps@kent.police.uk"])
    edition = world.send("winter")
    sid = ids[email]
    world.session.execute(update(Delivery).where(Delivery.subscriber_id == sid).values(
        last_reply=f"250 2.0.0 <{email}> queued as 4F2"))
    outcome = world.bounce(edition, sid, email, "5.1.1")
    assert outcome.verdict.reference is not None

    export = privacy.subject_access(world.session, world.subscriber(sid))
    assert [d["edition"] for d in export["deliveries"]] == ["winter"]
    assert export["bounces"] and export["bounces"][0]["status"] == "5.1.1"

    privacy.erase(world.session, world.subscriber(sid),
                  store.Context(channel=Channel.ADMIN, actor="coord.kent"))
    world.session.commit()
    world.session.expire_all()
    for name, table in migrations.metadata().tables.items():
        rows = repr(world.session.execute(select(table)).all()).lower()
        assert "erase.me.now" not in rows, name
    assert store.is_suppressed(world.session, world.rules, email.lower())
    # The other person's records are untouched.
    other = world.session.scalar(select(Delivery.last_reply).where(
        Delivery.subscriber_id == ids["keeps@kent.police.uk"]))
    assert other == "250 2.0.0 queued"
