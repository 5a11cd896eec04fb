"""Address checks: the fast path (each distinct domain checked once) must agree with
email-validator's own `validate_email` on every input, result and error message alike."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from subscribers import validation
from subscribers.errors import InvalidInput
from subscribers.rules import Rules
from subscribers.validation import Address, normalise_address, validate_email_syntax
from tests.test_importer import BAD, GOOD

FIELDS = ("original", "normalized", "local_part", "ascii_local_part", "domain", "ascii_domain",
          "ascii_email", "smtputf8", "display_name")


def _reference(text: str, *, allow_smtputf8: bool) -> object:
    return validate_email(text, check_deliverability=False, allow_smtputf8=allow_smtputf8,
                          allow_quoted_local=False, allow_domain_literal=False,
                          allow_display_name=False)


def _outcome(check: object, text: str, allow_smtputf8: bool) -> tuple[str, object]:
    try:
        result = check(text, allow_smtputf8=allow_smtputf8)  # type: ignore[operator]
    except EmailNotValidError as exc:
        return "error", str(exc)
    return "ok", tuple(getattr(result, f) for f in FIELDS)


# Pieces chosen for what tends to break address parsers: case, dots, quoting, IDN scripts,
# look-alike and full-width separators, combining and zero-width characters, reserved names.
_LOCAL_CHARS = st.sampled_from([
    *"abcXYZ09.-_+!#$%&'*/=?^`{|}~", "..", " ", '"', "\\", "@", "<", ">", "é", "ü", "ß",
    "\u0301", "\u200b", "Я", "中", "\u00a0", "(", ")", ",", ";", ":", "[", "]"])
_LOCAL = st.one_of(
    st.lists(_LOCAL_CHARS, max_size=12).map("".join),
    st.sampled_from(["postmaster", "PostMaster", "ABUSE", "jo.bloggs", "a" * 64, "a" * 65,
                     '"jo"', '"jo bloggs"', '"a@b"', '"a\\"b"', "", ".jo", "jo.", "józef"]),
    st.text(max_size=8),
)
_LABEL = st.one_of(
    st.text(st.sampled_from(list("abcdeKLMxyz0129-")), min_size=1, max_size=10),
    st.sampled_from(["xn--bcher-kva", "XN--BCHER-KVA", "xn--80ak6aa92e", "xn--", "xn--zz",
                     "bücher", "BÜCHER", "müller", "gmаil", "пример", "例え", "עברית", "مثال",
                     "ab--cd", "-kent", "kent-", "d" * 63, "d" * 64, "bad_domain", "１２３",
                     "a\u0301", "a\u200bb", "⒈", "ǅ"]),
)
_TLD = st.sampled_from(["uk", "UK", "org", "com", "invalid", "local", "localhost", "test",
                        "onion", "example", "1", "xn--p1ai", "рф", "中国", "c0m"])
_SEP = st.sampled_from([".", ".", ".", "。", "．", "..", ""])
_DOMAIN = st.one_of(
    st.builds(lambda labels, seps, tld, end: "".join(
                  label + sep for label, sep in zip(labels, seps, strict=False)) + tld + end,
              st.lists(_LABEL, min_size=0, max_size=4), st.lists(_SEP, min_size=4, max_size=4),
              _TLD, st.sampled_from(["", "", "", ".", "..", " ", "@x.org", ">"])),
    st.sampled_from(["", "[192.0.2.1]", "[IPv6:2001:db8::1]", "[192.0.2.1", "localhost",
                     "kent.police.uk", "Kent.Police.UK", "kent.police.uk.",
                     ".".join(["d" * 60] * 5) + ".uk", "x" * 250 + ".uk"]),
    st.text(max_size=12),
)
# Mostly valid: without it, nearly every generated address fails early and the paths that
# produce a normalised address (case, IDNA, reserved names) would go untested.
_PLAIN_LOCAL = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[A-Za-z0-9_+-]{1,6}){0,2}",
                             fullmatch=True)
_GOOD_LABEL = st.one_of(
    st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True),
    st.sampled_from(["bücher", "BÜCHER", "xn--bcher-kva", "пример", "例え", "ελληνικά", "straße",
                     "gmаil", "mañana", "日本", "עברית", "１２３", "Ⅻ"]),
)
_GOOD_TLD = st.sampled_from(["uk", "UK", "org", "com", "net", "de", "рф", "xn--p1ai", "invalid",
                             "local", "test", "example", "co.uk", "police.uk"])
_PLAUSIBLE = st.builds(
    lambda local, labels, tld, end: f"{local}@{'.'.join([*labels, tld])}{end}",
    _PLAIN_LOCAL, st.lists(_GOOD_LABEL, min_size=1, max_size=3), _GOOD_TLD,
    st.sampled_from(["", "", "", "", "", "", ".", "。"]))
_ADDRESS = st.one_of(
    _PLAUSIBLE,
    _PLAUSIBLE,
    st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN),
    st.builds(lambda name, local, domain: f"{name} <{local}@{domain}>",
              st.sampled_from(["Jo", '"Jo B"', ""]), _LOCAL, _DOMAIN),
    st.text(max_size=30),
)


@settings(max_examples=3000, deadline=None)
@given(text=_ADDRESS, allow_smtputf8=st.booleans())
@example(text="Jo.Bloggs@Kent.Police.UK", allow_smtputf8=False)
@example(text="POSTMASTER@bücher.de", allow_smtputf8=False)
@example(text="jo@XN--BCHER-KVA.de", allow_smtputf8=True)
@example(text="jo@kent.police.uk.", allow_smtputf8=False)
@example(text='"jo"@kent.police.uk', allow_smtputf8=False)
@example(text="a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 60 + ".uk",
         allow_smtputf8=False)
def test_fast_path_agrees_with_validate_email(text: str, allow_smtputf8: bool) -> None:
    expected = _outcome(_reference, text, allow_smtputf8)
    # Twice: the second answer comes from the domain cache, and must not differ.
    assert _outcome(validate_email_syntax, text, allow_smtputf8) == expected
    assert _outcome(validate_email_syntax, text, allow_smtputf8) == expected


def _normalised(raw: str, rules: Rules) -> Address | str:
    try:
        return normalise_address(raw, rules)
    except InvalidInput as exc:
        return f"{exc.field}: {exc}"


@pytest.mark.parametrize("allow_smtputf8", [False, True])
def test_normalise_address_is_unchanged_for_the_import_cases(
        monkeypatch: pytest.MonkeyPatch, allow_smtputf8: bool) -> None:
    rules = Rules(suppression_key=b"k" * 40, allow_smtputf8=allow_smtputf8)
    raws = [cells[0] for cells in GOOD] + [cells[0] for cells, _, _ in BAD] + [
        "Jo.Bloggs@Kent.Police.UK", "  x@kent.police.uk\u200b ", "jo@bücher.de",
        "Ab@XN--BCHER-KVA.DE", "józef@kent.police.uk", "test@gmаil.com"]
    fast = [_normalised(raw, rules) for raw in raws]
    monkeypatch.setattr(validation, "validate_email_syntax", _reference)
    assert fast == [_normalised(raw, rules) for raw in raws]


# ---- the suppression key and trusted domains: what keeps the people who left unreadable and
# approval from being skipped

def test_the_suppression_hash_is_hmac_sha256_under_the_configured_key() -> None:
    # A known vector (RFC 2104 HMAC-SHA256): if the hash stopped being keyed, or keyed by
    # anything but the configured key, suppressions already stored would stop matching.
    key = normalise_address("Sam.Tester@Kent.Police.UK", Rules(suppression_key=b"k" * 40)).key
    assert key == "sam.tester@kent.police.uk"
    digest = validation.email_hmac(Rules(suppression_key=b"k" * 40), key)
    assert digest == "07b77ff80562655eb0f036dc1aed87a3f34adf5ac8d704425e0587d2ea64712d"
    # another key, another hash: without the key nobody can test a guessed address against it
    assert validation.email_hmac(Rules(suppression_key=b"j" * 40), key) != digest
    assert validation.email_hmac(Rules(suppression_key=b"k" * 40), "other@kent.police.uk") \
        != digest


@pytest.mark.parametrize(("email", "trusted"), [
    ("a@police.uk", True),
    ("a@kent.police.uk", True),
    ("a@KENT.Police.UK", True),
    ("a@x.y.essex.police.uk", True),
    ("a@nhs.net", True),
    ("a@kentpolice.uk", False),  # a look-alike: the same letters, not a label of police.uk
    ("a@notgov.uk", False),
    ("a@police.uk.example.com", False),
    ("a@police.ukk", False),
    ("a@example.org", False),
])
def test_trusted_domains_match_whole_labels(email: str, trusted: bool) -> None:
    assert validation.is_trusted_domain(Rules(suppression_key=b"k" * 40), email) is trusted


def test_only_the_configured_trusted_domains_count() -> None:
    rules = Rules(suppression_key=b"k" * 40, trusted_domains=("essex.police.uk",))
    assert validation.is_trusted_domain(rules, "a@essex.police.uk")
    assert not validation.is_trusted_domain(rules, "a@kent.police.uk")
    assert not validation.is_trusted_domain(Rules(suppression_key=b"k" * 40, trusted_domains=()),
                                            "a@kent.police.uk")


@pytest.mark.parametrize(("typed", "slug"), [
    ("Single point of contact (SPOC)", "spoc"), ("single point of contact (spoc)", "spoc"),
    ("  Support worker. ", "support_worker"), ("support-worker", "support_worker"),
    ("_first_responder_", "first_responder"), ("Other", "other"),
    ("Supportworker", None), ("", None), ("SP OC", None)])
def test_a_role_typed_in_a_spreadsheet_matches_by_slug_or_label_whatever_the_punctuation(
        typed: str, slug: str | None) -> None:
    # What an import or a form accepts for a vocabulary: the slug or the label, in any case,
    # with punctuation and spaces around or between the words; nothing looser.
    assert Rules(suppression_key=b"k" * 32).match("role", typed) == slug


def test_an_unknown_vocabulary_value_is_refused_with_its_field_in_words_and_known_ones() -> None:
    # What an import row or a form shows the co-ordinator: which field, what was typed (cut to
    # 40 characters), and the values that would have been accepted.
    rules = Rules(suppression_key=b"k" * 40, organisation_types={"police": "Police",
                                                                 "ngo": "NGO"})
    assert validation.vocabulary_value(rules, "organisation_type", " NGO ") == "ngo"
    assert validation.vocabulary_value(rules, "organisation_type", "  ") is None
    with pytest.raises(InvalidInput) as refused:
        validation.vocabulary_value(rules, "organisation_type", "  " + "p" * 50 + "  ")
    assert refused.value.field == "organisation_type"
    assert str(refused.value) == (f"unknown organisation type '{'p' * 40}' "
                                  "(one of: ngo, police)")
