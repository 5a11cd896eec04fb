"""Errors raised by the subscriber database.

`subscribers` must not import `mailer`, so this is the root of its own small family; the CLI and
web layers catch it beside `mailer.errors.MailerError` and show the message as it is.
"""


class SubscriberError(Exception):
    """A request about a subscriber that cannot be carried out; the message says why."""


class InvalidInput(SubscriberError):
    """An address, name or field value that fails validation. `field` names which one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class AddressSuppressed(SubscriberError):
    """The address is on the suppression list; only a fresh double opt-in may lift it."""


class NotFound(SubscriberError):
    """No subscriber, topic or record matches."""


class ImportFileError(SubscriberError):
    """The import file as a whole cannot be read (encoding, header, shape)."""
