"""Transactional mail from the web pages: the confirmation, "already subscribed" and manage-link
messages. Transactional, not list mail: `Auto-Submitted: auto-generated` (RFC 3834) so
auto-responders stay quiet, and no List-* headers, because these are answers to a request and
not part of the newsletter (Gmail exempts form-submission confirmations from one-click).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from mailer.config import Settings
from mailer.outgoing import send_now, template_env, transactional
from mailer.smtp import Outcome
from subscribers.db import utcnow

log = logging.getLogger(__name__)

_SUBJECTS = {
    "confirm": "Please confirm your subscription",
    "already_subscribed": "You are already subscribed",
    "manage_link": "Your link to manage your subscription",
}


@dataclass(frozen=True)
class Outgoing:
    """One message to send after the response has gone (so timing reveals nothing)."""

    to: str
    kind: str
    context: dict[str, Any]


class Mailer:
    """Builds the web's transactional messages; `mailer.outgoing.send_now` signs and sends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = template_env()
        self.sent: list[tuple[str, str]] = []  # (kind, outcome): for logs and tests

    def build(self, item: Outgoing) -> EmailMessage:
        subject = _SUBJECTS[item.kind]
        if item.kind == "already_subscribed" and item.context.get("awaiting"):
            subject = "Your sign-up is waiting for approval"
        return transactional(self.settings, self.env, item.kind, item.to, subject,
                             item.context, utcnow())

    def send(self, item: Outgoing) -> None:
        """Send one message; failures are logged, never raised (the page has been answered)."""
        from mailer.render import POLICY

        try:
            data = self.build(item).as_bytes(policy=POLICY)
            result = send_now(self.settings, item.to, data)
        except Exception:  # a bug or bad config must not kill the server's background task
            log.exception("could not send the %s mail", item.kind)
            self.sent.append((item.kind, "error"))
            return
        if result.outcome != Outcome.SENT:
            log.warning("the %s mail was not accepted: %s %s", item.kind, result.code,
                        result.reply)
        self.sent.append((item.kind, str(result.outcome)))

    def send_all(self, items: list[Outgoing]) -> None:
        for item in items:
            self.send(item)
