"""mailer.signing: our DKIM signatures verify with dkimpy, hash what dkimpy hashes, and break
when a signed part (or an over-signed duplicate) changes."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer import signing
from mailer.config import Settings
from mailer.edition import load_edition
from mailer.reference import message_id
from mailer.render import (
    DKIM_HEADERS,
    DkimKey,
    Recipient,
    RecipientUrls,
    build_message,
    compile_edition,
    dkim_sign,
)
from mailer.signing import SigningError, canonical_body, sign

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
SELECTOR, DOMAIN = b"test", b"news.example.org"


@pytest.fixture(scope="module")
def key() -> tuple[bytes, bytes]:
    """(PEM private key, the DNS TXT record dkimpy is handed for it)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def verifies(raw: bytes, record: bytes) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"test._domainkey.news.example.org."
        return record

    return bool(dkim.verify(raw, dnsfunc=dnsfunc))


def signed(raw: bytes, pem: bytes, **kwargs: Any) -> bytes:
    return sign(raw, SELECTOR, DOMAIN, pem, include_headers=DKIM_HEADERS, **kwargs) + raw


def tags(field: bytes) -> dict[bytes, bytes]:
    value = re.sub(rb"\s+", b" ", field.split(b":", 1)[1])
    pairs = (t.strip().split(b"=", 1) for t in value.split(b";") if b"=" in t)
    return {k: v.strip() for k, v in pairs}


def dkimpy_signature(raw: bytes, pem: bytes) -> bytes:
    return dkim.sign(raw, SELECTOR, DOMAIN, pem, include_headers=list(DKIM_HEADERS),
                     canonicalize=(b"relaxed", b"relaxed"))


def message(body: bytes, *, subject: bytes = b"Summer bulletin", extra: bytes = b"") -> bytes:
    return (b"From: Kent & Essex <bulletin@news.example.org>\r\n"
            b"To: Ann <a@example.org>\r\n"
            b"Subject: " + subject + b"\r\n"
            b"Date: Tue, 01 Sep 2020 09:00:00 +0000\r\n"
            b"Message-ID: <e1.s7.abc@news.example.org>\r\n"
            b"List-Unsubscribe: <https://news.example.org/u/tok7>\r\n"
            b"List-Id: MSHT newsletter <msht.news.example.org>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            b"MIME-Version: 1.0\r\n" + extra +
            b'Content-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n"
            b"\r\n" + body)


# Trailing spaces and tabs, tab runs, a WSP-only line, empty trailing lines, folded and
# tab-indented headers, and quoted-printable UTF-8 with a soft line break.
MESSY = message(
    b"Dear Zo=C3=AB,  \r\n\tthe\t\t figures  for  Kent \t\r\n \t \r\n"
    b"Caf=C3=A9 referrals rose by 12 =E2=80=93 see the table=\r\n below.\r\n\r\n\r\n\r\n",
    subject=b"Summer \t bulletin:\r\n\tKent  and\r\n   Essex   ",
    extra=b"X-Campaign:\r\n 2020-q3 \r\n")


@pytest.fixture(scope="module")
def edition_message(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    conf = Settings(var_dir=tmp_path_factory.mktemp("var"), base_url="https://news.example.org",
                    from_address="bulletin@news.example.org", list_id="msht.news.example.org",
                    secret_key="s" * 40, suppression_key="k" * 40)
    compiled = compile_edition(load_edition(SAMPLE), conf)
    return build_message(compiled, Recipient("zoe@example.org", "Zoë Reader"),
                         RecipientUrls("https://news.example.org/u/tok7",
                                       "https://news.example.org/p/7",
                                       "https://news.example.org/archive/2020-q3?r=7"),
                         message_id=message_id(conf.secret(), 1, 7, "news.example.org"))


def test_an_edition_signature_is_dkimpys_signature(
        key: tuple[bytes, bytes], edition_message: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pem, record = key
    # Same t= for both; PKCS#1 v1.5 is deterministic, so the same signed bytes give the same b=.
    monkeypatch.setattr(dkim.time, "time", lambda: 1_600_000_000.5)
    raw = signed(edition_message, pem, timestamp=1_600_000_000)
    assert verifies(raw, record)
    field = raw.split(b"\r\nFrom:", 1)[0]
    ours, theirs = tags(field), tags(dkimpy_signature(edition_message, pem))
    assert list(ours) == [b"v", b"a", b"c", b"d", b"i", b"q", b"s", b"t", b"h", b"bh", b"b"]
    assert {k: v.replace(b" ", b"") for k, v in ours.items()} == {
        k: v.replace(b" ", b"") for k, v in theirs.items()}
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))


def test_render_dkim_sign_uses_the_fast_signer_and_still_accepts_dkimpy(
        key: tuple[bytes, bytes], edition_message: bytes) -> None:
    pem, record = key
    dkim_key = DkimKey(SELECTOR.decode(), DOMAIN.decode(), pem)
    ours = dkim_sign(edition_message, dkim_key)
    theirs = dkim_sign(edition_message, dkim_key, sign=dkim.sign)
    assert verifies(ours, record) and verifies(theirs, record)
    assert tags(ours.split(b"\r\n\r\n")[0])[b"bh"] == tags(theirs.split(b"\r\n\r\n")[0])[b"bh"]


def test_a_messy_message_verifies_and_hashes_the_body_as_dkimpy_does(
        key: tuple[bytes, bytes]) -> None:
    pem, record = key
    raw = signed(MESSY, pem)
    assert verifies(raw, record)
    assert tags(raw)[b"bh"] == tags(dkimpy_signature(MESSY, pem))[b"bh"]


@pytest.mark.parametrize("tamper", [
    lambda raw: raw.replace(b"rose by 12", b"rose by 13"),
    lambda raw: raw.replace(b"\r\n\r\n\r\n\r\n", b"\r\nP.S.\r\n"),
    lambda raw: raw.replace(b"Summer \t bulletin", b"Winter \t bulletin"),
    lambda raw: raw.replace(b"To: Ann <a@", b"To: Ann <b@"),
    lambda raw: raw.replace(b"tok7", b"evil"),
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u>"
                            b"\r\n\r\n", 1),
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe-Post: "
                            b"List-Unsubscribe=One-Click\r\n\r\n", 1),
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nFrom: evil@example.com\r\n\r\n", 1),
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nSubject: Urgent\r\n\r\n", 1),
], ids=["body", "body-tail", "subject", "to", "unsubscribe-changed", "unsubscribe-duplicated",
        "post-duplicated", "from-duplicated", "subject-duplicated"])
def test_changing_a_signed_part_or_adding_an_over_signed_header_fails(
        key: tuple[bytes, bytes], tamper: Callable[[bytes], bytes]) -> None:
    pem, record = key
    raw = signed(MESSY, pem)
    changed = tamper(raw)
    assert changed != raw
    assert not verifies(changed, record)


@pytest.mark.parametrize("tamper", [
    lambda raw: b"Received: from relay.example.net\r\n" + raw,
    lambda raw: raw.replace(b"X-Campaign:\r\n 2020-q3", b"X-Campaign: 2021-q1"),
    lambda raw: raw.replace(b"Subject: Summer \t bulletin:", b"Subject:   Summer bulletin:"),
    lambda raw: raw.replace(b"\r\n\r\n\r\n\r\n", b"\r\n"),
    lambda raw: raw.replace(b"\t\t figures", b" figures"),
], ids=["received-added", "unsigned-header", "subject-whitespace", "trailing-lines",
        "body-whitespace"])
def test_what_relaxed_canonicalisation_or_h_leaves_out_can_change(
        key: tuple[bytes, bytes], tamper: Callable[[bytes], bytes]) -> None:
    pem, record = key
    raw = signed(MESSY, pem)
    changed = tamper(raw)
    assert changed != raw
    assert verifies(changed, record)


@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),
    (b"\r\n", b""),
    (b" \t \r\n\r\n", b""),
    (b"abc", b"abc\r\n"),
    (b"a \t b \r\n\r\n", b"a b\r\n"),
    (b"\r\n\r\na\r\n", b"\r\n\r\na\r\n"),
    (b"a\r\r\n\r\n", b"a\r\r\n"),
    # RFC 6376 §3.4.4 drops WSP at the end of every line, the last too; dkimpy keeps it when
    # the body lacks its final CRLF (SMTP always adds one, so receivers agree with us).
    (b"abc  ", b"abc\r\n"),
])
def test_relaxed_body_canonicalisation(body: bytes, canonical: bytes) -> None:
    assert canonical_body(body) == canonical


_WSP_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e)
                    | st.sampled_from(" \t"), max_size=40)
_LINES = st.lists(_WSP_TEXT, max_size=12)


def _body(lines: list[str], trailing_empty: int) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("ascii") + b"\r\n" * trailing_empty


@given(lines=_LINES, trailing_empty=st.integers(0, 3))
def test_body_canonicalisation_matches_dkimpy(lines: list[str], trailing_empty: int) -> None:
    body = _body(lines, trailing_empty)
    assert canonical_body(body) == Relaxed.canonicalize_body(body)


@st.composite
def _header_value(draw: st.DrawFn) -> bytes:
    """A value with WSP runs anywhere and, sometimes, folds (CRLF + WSP) between words."""
    words = draw(st.lists(st.text(alphabet=st.characters(min_codepoint=0x21,
                                                         max_codepoint=0x7e), max_size=12),
                          max_size=6))
    out = draw(st.sampled_from(["", " ", "\t", "  "]))
    for word in words:
        out += word + draw(st.sampled_from([" ", "\t", " \t ", "\r\n ", "\r\n\t", "  \r\n  "]))
    return out.encode("ascii")


# The key fixture is module-wide and read-only, so sharing it across examples is fine.
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=_LINES, trailing_empty=st.integers(0, 3), subject=_header_value(),
       list_id=_header_value())
def test_any_body_and_header_values_verify_with_dkimpy(
        key: tuple[bytes, bytes], lines: list[str], trailing_empty: int, subject: bytes,
        list_id: bytes) -> None:
    pem, record = key
    raw = message(_body(lines, trailing_empty), subject=subject).replace(
        b"List-Id: MSHT newsletter <msht.news.example.org>", b"List-Id:" + list_id)
    ours = signed(raw, pem)
    assert verifies(ours, record)
    assert tags(ours)[b"bh"] == tags(dkimpy_signature(raw, pem))[b"bh"]


def test_the_key_is_parsed_once(key: tuple[bytes, bytes]) -> None:
    pem, _ = key
    signing.rsa_signer.cache_clear()
    for _ in range(3):
        signed(MESSY, pem)
    info = signing.rsa_signer.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_t_is_the_given_timestamp(key: tuple[bytes, bytes]) -> None:
    pem, record = key
    raw = signed(MESSY, pem, timestamp=1_600_000_000)
    assert tags(raw)[b"t"] == b"1600000000"
    assert verifies(raw, record)


def test_what_cannot_be_signed_is_refused(key: tuple[bytes, bytes]) -> None:
    pem, _ = key
    with pytest.raises(SigningError, match="bare LF"):
        signed(MESSY.replace(b"below.\r\n", b"below.\n"), pem)
    with pytest.raises(SigningError, match="relaxed/relaxed"):
        signed(MESSY, pem, canonicalize=(b"relaxed", b"simple"))
    with pytest.raises(SigningError, match="From"):
        sign(MESSY, SELECTOR, DOMAIN, pem, include_headers=[b"subject"])
    with pytest.raises(SigningError, match="selector or domain"):
        sign(MESSY, b"a; b=", DOMAIN, pem, include_headers=DKIM_HEADERS)
    with pytest.raises(SigningError, match="not a header field"):
        signed(b"From bulletin@news.example.org\r\n" + MESSY, pem)
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(SigningError, match="RSA"):
        signed(MESSY, ed)
    with pytest.raises(SigningError, match="unusable DKIM private key"):
        signed(MESSY, b"-----BEGIN RSA PRIVATE KEY-----\nnope\n-----END RSA PRIVATE KEY-----\n")
