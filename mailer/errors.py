"""One family of errors. Each says what went wrong and, where it can, what to do next.

The CLI and web layers catch `MailerError` (and `subscribers.errors.SubscriberError`) once, at the
edge, and show the message: never a traceback.
"""

from __future__ import annotations

import re


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

    def with_hint(self) -> str:
        """The problem, where it is, and what to do, on one line (one of a list)."""
        return f"{self.args[0]} ({self.hint})" if self.hint else str(self.args[0])


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


# What PyYAML says it was doing ("while parsing a flow sequence"), in an author's words.
_YAML_CONTEXTS = {
    "flow sequence": "the list in [ ] that starts on line {line}",
    "flow mapping": "the { } that starts on line {line}",
    "block mapping": "the keys that start on line {line}",
    "block collection": "the keys that start on line {line}",
    "quoted scalar": "the quoted text that starts on line {line}",
}


def yaml_problem(exc: Exception, first_line: int = 1) -> tuple[str, int | None]:
    """A YAML parser error as one sentence and the one line it is about (1-based, counted
    from `first_line`): PyYAML's own text names two places and quotes its parser's states."""
    problem = str(getattr(exc, "problem", None) or "").strip() or str(exc).splitlines()[0]
    mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    line = first_line + mark.line if mark is not None else None
    context = re.sub(r"^while (parsing|scanning) (an? )?", "",
                     str(getattr(exc, "context", None) or "")).strip()
    if context and context_mark is not None:
        context_line = first_line + context_mark.line
        if context_line != line:
            words = _YAML_CONTEXTS.get(context, "what starts on line {line}")
            problem += f", in {words.format(line=context_line)}; is a bracket or quote missing?"
    return problem.replace("found character '\\t'", "found a tab"), line
