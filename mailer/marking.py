"""Protective marking (the UK Government Security Classifications) and archive visibility: the
words, the defaults and the one rule that ties them. Pure: no database, no settings object.

An edition is OFFICIAL or OFFICIAL-SENSITIVE. UK practice writes the marking in capitals at the
start of an email's subject and at the top and bottom of its body; OFFICIAL need not be marked,
but a reader of this list should never have to guess which one a copy is, so both are shown.
OFFICIAL-SENSITIVE is a need-to-know caveat: it goes only to secure domains and is never
published (an archive page is publication). Who is on a secure domain is decided once, by
`subscribers.validation.in_domains` and its SQL twin `subscribers.store.at_domains`.
"""

from __future__ import annotations

from enum import StrEnum


class Classification(StrEnum):
    OFFICIAL = "OFFICIAL"
    OFFICIAL_SENSITIVE = "OFFICIAL-SENSITIVE"


class ArchiveVisibility(StrEnum):
    PUBLIC = "public"  # the public archive and its feed
    SUBSCRIBERS = "subscribers"  # unlisted, noindex: a reader's signed link opens it
    NONE = "none"  # not on the web at all; the email has no "view in your browser" link


# The list. gcsx.gov.uk and the other GSi domains were retired in 2019 (it is a
# subdomain of gov.uk, so dropping it changes nothing while gov.uk stays): kept because the
# issue asked for it, and the list is a setting.
SECURE_DOMAINS = ("police.uk", "pnn.police.uk", "gov.uk", "gcsx.gov.uk", "nhs.net", "cjsm.net")
NOT_SECURE = "address not on a secure domain"


def left_out_text(count: int) -> str:
    """What the dry run, the approval screen and the status say about the readers left out."""
    return f"left out: {count} ({NOT_SECURE})"


def left_out_warning(count: int) -> str:
    """The preflight warning for an OFFICIAL-SENSITIVE edition whose audience reaches past
    the secure domains: not a refusal (the rest should still get it), but never a surprise."""
    return (f"OFFICIAL-SENSITIVE: {count} reader(s) in its audience are not on a secure "
            "domain and will be left out")


def marked_subject(subject: str, classification: str) -> str:
    """The subject line as sent: the marking first, in capitals, as UK government mail has it."""
    return f"{classification}: {subject}"


def resolve(classification: str | None, archive: str | None, default_classification: str,
            default_archive: str) -> tuple[Classification, ArchiveVisibility]:
    """An edition's marking and visibility: what its front matter says, else the defaults
    (today the settings', later its publication's). OFFICIAL-SENSITIVE taken from a default is
    never public: an explicit `archive: public` on one is refused by validation instead."""
    marking = Classification(classification or default_classification)
    visibility = ArchiveVisibility(archive or default_archive)
    if marking == Classification.OFFICIAL_SENSITIVE and visibility == ArchiveVisibility.PUBLIC:
        visibility = ArchiveVisibility.SUBSCRIBERS
    return marking, visibility
