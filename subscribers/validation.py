"""Checks and normal forms for what people type: addresses, names, vocabulary fields. Pure.

Each function returns the value to store or raises `InvalidInput` with a message fit to show the
person who typed it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import email_validator
from email_validator import EmailNotValidError, EmailSyntaxError, ValidatedEmail, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from email_validator.syntax import (
    validate_email_domain_name,
    validate_email_length,
    validate_email_local_part,
)

from subscribers.errors import InvalidInput
from subscribers.rules import Rules

# Stripped from the ends of an address: pasted addresses carry these (GOV.UK Notify does the same).
_EDGE_JUNK = " \t\r\n\u00a0\u200b\u200c\u200d\u2060\ufeff"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Characters that can make text display as something other than what it is.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Unicode's own line and paragraph separators: a name with one prints on two lines in a header.
_LINE_SEPARATOR = re.compile("[\u2028\u2029\u0085]")
# Invisible characters: trimmed from the ends (pasted text carries them), refused inside, where
# they would make two names that look the same compare different. ZWJ and ZWNJ (U+200C, U+200D)
# stay allowed inside: some scripts and emoji need them.
_INVISIBLE_EDGE = " \u00a0\u200b\u200c\u200d\u2060\ufeff"
_INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad]")
_FORMULA_START = ("=", "+", "@", "\t", "\r", "\0")

MAX_NAME = 100
MAX_ORGANISATION = 200


@dataclass(frozen=True)
class Address:
    email: str  # what we send to: the address as typed, domain lower-cased (ASCII form)
    key: str  # what we match on: one subscriber per address whatever its case


def normalise_address(raw: str | None, rules: Rules) -> Address:
    if raw is None or not raw.strip(_EDGE_JUNK):
        raise InvalidInput("email", "the email address is missing")
    text = raw.strip(_EDGE_JUNK)
    if any(ch in text for ch in "\r\n"):
        raise InvalidInput("email", "the email address contains a line break")
    if "<" in text or ">" in text:
        raise InvalidInput("email", "give the bare address (name@example.org), not 'Name <...>'")
    if text.count("@") > 1 and ("," in text or ";" in text or " " in text):
        raise InvalidInput("email", "one address per row: this cell holds several")
    try:
        if rules.check_deliverability:
            result = validate_email(
                text,
                check_deliverability=True,
                allow_smtputf8=rules.allow_smtputf8,
                allow_quoted_local=False,
                allow_domain_literal=False,
                allow_display_name=False,
            )
        else:
            result = validate_email_syntax(text, allow_smtputf8=rules.allow_smtputf8)
    except EmailNotValidError as exc:
        raise InvalidInput("email", f"not a valid email address: {exc}") from None
    local = result.local_part
    if len(local.encode()) > 64:
        raise InvalidInput("email", "the part before the @ is longer than 64 characters")
    email = result.ascii_email or result.normalized
    if len(email) > 254:
        raise InvalidInput("email", "the address is longer than 254 characters")
    if _mixed_scripts(result.domain):
        raise InvalidInput("email", "the domain mixes alphabets (a look-alike of another domain?)")
    return Address(email=email, key=email.lower())


def validate_email_syntax(text: str, *, allow_smtputf8: bool) -> ValidatedEmail:
    """`validate_email(text, check_deliverability=False, allow_smtputf8=..., allow_quoted_local=
    False, allow_domain_literal=False, allow_display_name=False)`, with the same result and the
    same errors, but checking each distinct domain only once.

    An import repeats a handful of domains over and over, and the domain (UTS-46, IDNA) is most
    of what `validate_email` costs. Plain addresses (an ASCII local part without quotes) take
    email-validator's own steps here, with the domain step cached; anything unusual is handed to
    `validate_email` itself rather than reimplemented.
    """
    local, at, domain = text.partition("@")
    # With no quote or '<' before the first '@', email-validator splits there too (no character
    # combines with an '@' under NFC), and an ASCII local part is already NFC.
    if (not at or not domain or not local.isascii() or '"' in local or "<" in local
            or (domain.startswith("[") and domain.endswith("]"))):
        return validate_email(text, check_deliverability=False, allow_smtputf8=allow_smtputf8,
                              allow_quoted_local=False, allow_domain_literal=False,
                              allow_display_name=False)
    # Read at call time, as validate_email does, so the library's module settings still apply.
    info = validate_email_local_part(local, allow_smtputf8=allow_smtputf8,
                                     allow_empty_local=email_validator.ALLOW_EMPTY_LOCAL,
                                     quoted_local_part=False, strict=email_validator.STRICT)
    ret = ValidatedEmail()
    ret.original = text
    ret.display_name = None
    ret.smtputf8 = info["smtputf8"]
    ret.local_part = info["local_part"]
    ret.ascii_local_part = info["ascii_local_part"]
    if (ret.ascii_local_part is not None
            and ret.ascii_local_part.lower() in CASE_INSENSITIVE_MAILBOX_NAMES):
        ret.ascii_local_part = ret.ascii_local_part.lower()
        ret.local_part = ret.local_part.lower()
    checked = _domain(domain, email_validator.TEST_ENVIRONMENT,
                      email_validator.GLOBALLY_DELIVERABLE)
    if isinstance(checked, str):
        raise EmailSyntaxError(checked)
    ret.ascii_domain, ret.domain = checked
    ret.normalized = ret.local_part + "@" + ret.domain
    ret.ascii_email = (ret.ascii_local_part + "@" + ret.ascii_domain
                       if ret.ascii_local_part and ret.ascii_domain else None)
    validate_email_length(ret)
    return ret


@functools.lru_cache(maxsize=4096)
def _domain(domain: str, test_environment: bool,
            globally_deliverable: bool) -> tuple[str, str] | str:
    """(ASCII form, Unicode form) of a domain, or email-validator's reason for refusing it.

    The reason is returned rather than raised because lru_cache does not keep exceptions, and
    a file may repeat a bad domain as often as a good one.
    """
    try:
        info = validate_email_domain_name(domain, test_environment=test_environment,
                                          globally_deliverable=globally_deliverable)
    except EmailSyntaxError as exc:
        return str(exc)
    return info["ascii_domain"], info["domain"]


def _mixed_scripts(domain: str) -> bool:
    """True when one domain label mixes letters of several scripts (e.g. Latin and Cyrillic)."""
    if domain.isascii():
        return False
    for label in domain.split("."):
        scripts = {unicodedata.name(ch, "?").split(" ")[0] for ch in label if ch.isalpha()}
        if len(scripts) > 1:
            return True
    return False


def normalise_text(raw: str | None, field: str, limit: int) -> str | None:
    """NFC, trimmed (of spaces and invisible characters), at most `limit` characters, no
    control, line-separator, invisible or bidi characters inside; None if empty."""
    if raw is None:
        return None
    text = unicodedata.normalize("NFC", raw).strip(_INVISIBLE_EDGE)
    if not text:
        return None
    label = field.replace("_", " ")
    if len(text) > limit:
        raise InvalidInput(field, f"the {label} is longer than {limit} characters")
    if _CONTROL.search(text) or _LINE_SEPARATOR.search(text):
        raise InvalidInput(field, f"the {label} contains a control character or line break")
    if _INVISIBLE.search(text):
        raise InvalidInput(field, f"the {label} contains an invisible character (zero-width "
                                  f"space, word joiner, soft hyphen or byte-order mark)")
    if _BIDI.search(text):
        raise InvalidInput(field, f"the {label} contains a text-direction control character")
    if text.startswith(_FORMULA_START):
        raise InvalidInput(field, f"the {label} starts with '{text[0]}' like a spreadsheet formula")
    if "=?" in text and "?=" in text:
        raise InvalidInput(field, f"the {label} contains an encoded-word (=?...?=)")
    return text


def normalise_name(raw: str | None) -> str | None:
    return normalise_text(raw, "name", MAX_NAME)


def normalise_organisation(raw: str | None) -> str | None:
    return normalise_text(raw, "organisation", MAX_ORGANISATION)


def vocabulary_value(rules: Rules, field: str, raw: str | None) -> str | None:
    """A slug from the field's vocabulary, matched on slug or label, whatever the case."""
    if raw is None or not raw.strip():
        return None
    slug = rules.match(field, raw)
    if slug is not None:
        return slug
    label = field.replace("_", " ")
    raise InvalidInput(field, f"unknown {label} '{raw.strip()[:40]}' "
                              f"(one of: {', '.join(sorted(rules.vocabulary(field)))})")


def email_hmac(rules: Rules, key: str) -> str:
    """The keyed hash kept for suppression: without the key it cannot be reversed by guessing."""
    return hmac.new(rules.suppression_key, key.encode(), hashlib.sha256).hexdigest()


def in_domains(email: str, domains: Iterable[str]) -> bool:
    """Whether the address is at one of `domains` or a subdomain of one: whole labels, never
    a substring (`kentpolice.uk` is not `police.uk`). `store.at_domains` is its SQL twin."""
    domain = email.rpartition("@")[2].lower()
    return any(domain == d.lower() or domain.endswith("." + d.lower()) for d in domains)


def is_trusted_domain(rules: Rules, email: str) -> bool:
    return in_domains(email, rules.trusted_domains)
