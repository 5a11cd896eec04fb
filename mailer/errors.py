"""One family of errors. Each says what went wrong and, where it can, what to do next.

The CLI and web layers catch `MailerError` (and `subscribers.errors.SubscriberError`) once, at the
edge, and show the message: never a traceback.
"""

from __future__ import annotations


class MailerError(Exception):
    """Something the user can act on; `hint` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(MailerError):
    """The settings are missing, malformed or contradictory."""


class SchemaMismatch(MailerError):
    """The database schema is behind or ahead of the code."""


class EditionError(MailerError):
    """An edition source that cannot be used. `location` is `file:line` where known."""

    def __init__(self, message: str, location: str | None = None, hint: str | None = None):
        super().__init__(f"{location}: {message}" if location else message, hint)
        self.location = location


class TransientDeliveryError(MailerError):
    """Worth trying again later: a 4xx reply, a dropped connection, a timeout before DATA."""


class PermanentDeliveryError(MailerError):
    """Trying again will not help this recipient: a 5xx reply for this address."""


class RelayRefused(MailerError):
    """A single message (a test send) that the relay did not take; the message says its
    reply."""


# What an operation (`mailer.operations`) refuses, whatever the face: each face turns these into
# its own answer (a console page, an HTTP status, a line on the terminal) in one place.

class NotFound(MailerError):
    """No such record, or none this person may see: a record outside someone's regions is
    answered as missing, so that the answer does not tell that it exists."""


class NotAllowed(MailerError):
    """This person's role, or a rule such as four-eyes approval, does not allow it."""


class OutOfScope(MailerError):
    """The record is one this person may know of, but it reaches beyond their regions; or
    (`field` set) a value they chose, such as a subscriber's region, is outside them."""

    def __init__(self, message: str, hint: str | None = None, field: str | None = None
                 ) -> None:
        super().__init__(message, hint)
        self.field = field


class Conflict(MailerError):
    """Not possible in the record's present state (sent already, resolved a moment ago...)."""
