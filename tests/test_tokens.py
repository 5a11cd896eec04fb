"""Tokens: purpose-bound, expiring, rotatable, opaque."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
import time_machine
from hypothesis import example, given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeTimedSerializer

from subscribers.tokens import MAX_TOKEN_LENGTH, Claims, InvalidToken, Lifetimes, Purpose, Tokens

OLD = b"o" * 40
NEW = b"n" * 40
OTHER = b"x" * 40


def test_round_trip_for_each_purpose() -> None:
    tokens = Tokens([NEW])
    assert tokens.read(Purpose.CONFIRM, tokens.confirm(7)) == Claims(7)
    assert tokens.read(Purpose.MANAGE, tokens.manage(8)) == Claims(8)
    assert tokens.read(Purpose.UNSUBSCRIBE, tokens.unsubscribe(9, topic_id=2)) == Claims(9, 2)
    assert tokens.read(Purpose.UNSUBSCRIBE, tokens.unsubscribe(9)) == Claims(9, None)
    assert tokens.read(Purpose.RECONFIRM, tokens.reconfirm(10)) == Claims(10)


@pytest.mark.parametrize("made", list(Purpose))
@pytest.mark.parametrize("read", list(Purpose))
def test_a_token_works_only_for_its_own_purpose(made: Purpose, read: Purpose) -> None:
    tokens = Tokens([NEW])
    token = tokens.make(made, 5)
    if made == read:
        assert tokens.read(read, token).subscriber_id == 5
    else:
        with pytest.raises(InvalidToken):
            tokens.read(read, token)


def test_tampered_truncated_and_foreign_tokens_are_refused_and_say_why() -> None:
    tokens = Tokens([NEW])
    token = tokens.unsubscribe(5, 1)
    # a character in the middle of the signature: the last one may only carry padding bits
    flipped = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]
    _, _, rest = token.partition(".")
    other_payload = base64.urlsafe_b64encode(b"[6,1]").rstrip(b"=").decode()
    # Refused before any signature is checked: empty, too long to be ours, or not ASCII.
    for bad in ("", "é" * 10, "a" * (MAX_TOKEN_LENGTH + 1), token + "é"):
        with pytest.raises(InvalidToken, match=r"^malformed token$") as info:
            tokens.read(Purpose.UNSUBSCRIBE, bad)
        assert not info.value.expired  # the page must not say "expired" for these
    for bad in (flipped, token[:-5], token + "x", other_payload + "." + rest, "...",
                "not a token", "a" * MAX_TOKEN_LENGTH, Tokens([OTHER]).unsubscribe(5, 1)):
        with pytest.raises(InvalidToken, match=r"^the link is not valid$") as info:
            tokens.read(Purpose.UNSUBSCRIBE, bad)
        assert not info.value.expired


@pytest.mark.parametrize("payload", [[], [0], [-3], [5, 0], [1, 2, 3], ["5"], [True], [5.0],
                                     {"id": 5}, 5, None],
                         ids=repr)
def test_a_token_signed_with_our_key_but_not_made_by_us_is_refused(payload: object) -> None:
    """A valid signature over a payload `make` never writes (no id, a zero or negative id, three
    ids, text, a flag, a number that is not a whole one, an object) reaches nobody."""
    upstream = URLSafeTimedSerializer([NEW], salt="msht-mailer/unsubscribe",
                                      signer_kwargs={"digest_method": hashlib.sha256})
    with pytest.raises(InvalidToken, match=r"^the link is not valid$") as info:
        Tokens([NEW]).read(Purpose.UNSUBSCRIBE, upstream.dumps(payload))
    assert not info.value.expired
    assert Tokens([NEW]).read(Purpose.UNSUBSCRIBE, upstream.dumps([5, 1])) == Claims(5, 1)


def test_no_address_or_name_inside_the_token() -> None:
    token = Tokens([NEW]).unsubscribe(123, 4)
    payload = token.split(".")[0]
    decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert decoded == b"[123,4]"
    assert "@" not in token


def test_unsubscribe_survives_three_years_and_a_key_rotation() -> None:
    with time_machine.travel(dt.datetime(2026, 1, 10, tzinfo=dt.UTC), tick=False):
        token = Tokens([OLD]).unsubscribe(42, 1)
    rotated = Tokens([OLD, NEW])
    with time_machine.travel(dt.datetime(2029, 2, 1, tzinfo=dt.UTC), tick=False):
        assert rotated.read(Purpose.UNSUBSCRIBE, token) == Claims(42, 1)
        # the newest key signs new tokens, which the old key alone cannot verify
        fresh = rotated.unsubscribe(42, 1)
        with pytest.raises(InvalidToken):
            Tokens([OLD]).read(Purpose.UNSUBSCRIBE, fresh)
    # once the old key is retired, its tokens stop working
    with pytest.raises(InvalidToken):
        Tokens([NEW]).read(Purpose.UNSUBSCRIBE, token)


def test_confirm_tokens_expire_after_their_lifetime() -> None:
    tokens = Tokens([NEW], Lifetimes(confirm=7 * 86400))
    with time_machine.travel(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), tick=False):
        token = tokens.confirm(1)
    with time_machine.travel(dt.datetime(2026, 1, 7, 23, tzinfo=dt.UTC), tick=False):
        assert tokens.read(Purpose.CONFIRM, token) == Claims(1)
    with time_machine.travel(dt.datetime(2026, 1, 8, 1, tzinfo=dt.UTC), tick=False):
        with pytest.raises(InvalidToken, match=r"^the link has expired$") as info:
            tokens.read(Purpose.CONFIRM, token)
        assert info.value.expired


def test_unsubscribe_tokens_do_expire_eventually() -> None:
    tokens = Tokens([NEW])
    with time_machine.travel(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), tick=False):
        token = tokens.unsubscribe(1)
    with time_machine.travel(dt.datetime(2036, 6, 1, tzinfo=dt.UTC), tick=False):
        with pytest.raises(InvalidToken) as info:
            tokens.read(Purpose.UNSUBSCRIBE, token)
        assert info.value.expired


def test_only_whole_number_ids_make_a_token() -> None:
    tokens = Tokens([NEW])
    for bad in (("7",), (7, "1"), (True,), (7.0,)):
        with pytest.raises(TypeError, match="token ids are whole numbers"):
            tokens.make(Purpose.MANAGE, *bad)  # type: ignore[arg-type]


def test_keys_must_be_given_and_long_enough() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Tokens([])
    with pytest.raises(ValueError, match="32 bytes"):
        Tokens([b"short"])


@given(subscriber_id=st.integers(1, 10**11 - 1), topic_id=st.none() | st.integers(1, 10**6))
# Repeated digits: itsdangerous's zlib shortens this payload, so its bytes differ from ours.
@example(subscriber_id=12499999999, topic_id=124999)
@settings(max_examples=200, deadline=None)
def test_tokens_are_the_bytes_itsdangerous_makes_and_read_its_compressed_ones(
        subscriber_id: int, topic_id: int | None) -> None:
    # Our serializer skips zlib and reuses its Signer: wherever zlib would not have shortened
    # the payload the token is itsdangerous's byte for byte, and wherever it would, both read.
    tokens = Tokens([NEW])
    upstream = URLSafeTimedSerializer([NEW], salt="msht-mailer/unsubscribe",
                                      signer_kwargs={"digest_method": hashlib.sha256})
    payload = [subscriber_id] if topic_id is None else [subscriber_id, topic_id]
    with time_machine.travel(dt.datetime(2026, 12, 1, tzinfo=dt.UTC), tick=False):
        ours = tokens.unsubscribe(subscriber_id, topic_id)
        theirs = upstream.dumps(payload)
        assert not ours.startswith(".")  # never compressed
        if not theirs.startswith("."):
            assert ours == theirs
        assert tokens.read(Purpose.UNSUBSCRIBE, theirs) == Claims(subscriber_id, topic_id)
        assert upstream.loads(ours) == payload
        compressed = upstream.dumps([999_999_999_999, topic_id or 1])
        assert compressed.startswith(".")  # zlib won: the form we no longer write
        assert tokens.read(Purpose.UNSUBSCRIBE, compressed) == Claims(999_999_999_999,
                                                                      topic_id or 1)


@given(st.integers(min_value=1, max_value=10**15), st.none() | st.integers(1, 10**6),
       st.sampled_from(list(Purpose)))
@settings(max_examples=200, deadline=None)
def test_a_token_is_the_bytes_itsdangerous_itself_would_write(
        subscriber_id: int, topic_id: int | None, purpose: Purpose) -> None:
    # make() writes the token without itsdangerous's layers; it must not differ by a byte.
    tokens = Tokens([b"o" * 32, b"n" * 32])
    with time_machine.travel(dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC), tick=False):
        made = tokens.make(purpose, subscriber_id, topic_id)
        payload = [subscriber_id] if topic_id is None else [subscriber_id, topic_id]
        assert made == tokens._serializers[purpose].dumps(payload)
        assert tokens.read(purpose, made) == Claims(subscriber_id, topic_id)


DAY = 86400


@pytest.mark.parametrize(("purpose", "lifetime"), [
    (Purpose.CONFIRM, 7 * DAY),
    (Purpose.MANAGE, 180 * DAY),
    (Purpose.UNSUBSCRIBE, 10 * 365 * DAY),
])
def test_each_link_purpose_lives_as_long_as_the_readme_says(purpose: Purpose,
                                                            lifetime: int) -> None:
    # Confirmation 7 days, preferences 180 days, unsubscribe 10 years: a link works a minute
    # before its time and not a minute after, by default and through the settings' issuer.
    from mailer.config import Settings
    from mailer.links import tokens_for

    settings = Settings(secret_key="s" * 40, suppression_key="k" * 40)
    for tokens in (Tokens([NEW]), tokens_for(settings)):
        made = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        with time_machine.travel(made, tick=False):
            token = tokens.make(purpose, 11)
        with time_machine.travel(made + dt.timedelta(seconds=lifetime - 60), tick=False):
            assert tokens.read(purpose, token) == Claims(11)
        with time_machine.travel(made + dt.timedelta(seconds=lifetime + 60), tick=False):
            with pytest.raises(InvalidToken) as info:
                tokens.read(purpose, token)
            assert info.value.expired


def test_signing_keys_shorter_than_32_bytes_are_refused() -> None:
    from mailer.config import Settings
    from mailer.errors import ConfigError

    for short in (b"k" * 16, b"k" * 31):
        with pytest.raises(ValueError, match="at least 32 bytes"):
            Tokens([short])
        with pytest.raises(ValueError, match="at least 32 bytes"):
            Tokens([b"n" * 32, short])  # a short retired key is refused too
    assert Tokens([b"k" * 32]).read(Purpose.MANAGE, Tokens([b"k" * 32]).manage(3)) == Claims(3)
    assert Tokens([b"", b"k" * 32]).manage(3)  # an empty slot is skipped, not refused
    for name in ("secret_key", "suppression_key"):
        with pytest.raises(ConfigError, match="too short"):
            getattr(Settings(**{name: "s" * 31}),
                    "secret" if name == "secret_key" else "suppression_secret")()
        assert getattr(Settings(**{name: "s" * 32}), "secret" if name == "secret_key"
                       else "suppression_secret")() == b"s" * 32
