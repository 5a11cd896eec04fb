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
