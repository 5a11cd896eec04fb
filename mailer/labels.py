"""The words people are shown for the codes we store: a status, a role, a region.

One table per install: the fixed states of the system's records, then the install's own
vocabularies from the settings (readers' roles, organisation types, regions), which already
carry their labels. A code without a label is shown as it is, rather than hidden.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from mailer.config import Settings

STATES = {
    # a reader
    "pending": "Waiting for confirmation",
    "awaiting_approval": "Waiting for approval",
    "active": "Active",
    "unsubscribed": "Unsubscribed",
    "bounced": "Bounced",
    "complained": "Marked our mail as spam",
    "erased": "Erased",
    "lapsed": "Lapsed (did not reconfirm)",
    # an edition
    "draft": "Draft",
    "approved": "Approved",
    "scheduled": "Scheduled",
    "sending": "Sending",
    "paused": "Paused",
    "sent": "Sent",
    "cancelled": "Cancelled",
    # a delivery
    "queued": "Queued",
    "retry": "Retrying",
    "failed": "Failed",
    "unknown": "Unknown (no reply from the relay)",
    "skipped": "Skipped",
    # a reminder
    "planned": "Planned",
    "enqueued": "Queued",
    "missed": "Missed",
    # an edition's archive visibility (mailer.marking)
    "public": "Public: in the archive and its feed",
    "subscribers": "Readers only: opened from their own copy, not listed",
    "none": "Not on the web",
    # a console account's role
    "viewer": "Viewer",
    "coordinator": "Co-ordinator",
    "admin": "Administrator",
}


class Labels:
    def __init__(self, settings: Settings) -> None:
        self.words = {**STATES, **settings.organisation_types, **settings.roles,
                      **settings.regions}

    def one(self, code: object) -> str:
        text = "" if code is None else str(code)
        return self.words.get(text, text)

    def many(self, codes: Iterable[object], none: str = "") -> str:
        return ", ".join(self.one(c) for c in codes) or none

    def action(self, code: str) -> str:
        """An audit action as words: `edition.approve_refused` -> "Edition: approve refused"."""
        noun, _, verb = code.partition(".")
        noun = noun.replace("_", " ").capitalize()
        return f"{noun}: {verb.replace('_', ' ')}" if verb else noun

    def detail(self, detail: Mapping[str, object] | None) -> str:
        """An audit entry's detail as a line a person reads: no Python lists, no full hashes."""
        return "; ".join(f"{key.replace('_', ' ')}: {self._value(value)}"
                         for key, value in (detail or {}).items())

    def _value(self, value: object) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list | tuple):
            return ", ".join(self._value(v) for v in value) or "none"
        if isinstance(value, Mapping):
            return ", ".join(f"{k.replace('_', ' ')} {self._value(v)}" for k, v in value.items())
        text = "" if value is None else str(value)
        if _FINGERPRINT.fullmatch(text):  # a source's or a key's hash: enough to compare
            return f"{text[:10]}…"
        return self.one(text)


_FINGERPRINT = re.compile(r"[0-9a-f]{32,}")
