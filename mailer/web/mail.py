"""Transactional mail from the web pages: the confirmation, "already subscribed" and manage-link
messages. Transactional, not list mail: `Auto-Submitted: auto-generated` (RFC 3834) so
auto-responders stay quiet, and no List-* headers, because these are answers to a request and
not part of the newsletter (Gmail exempts form-submission confirmations from one-click).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import jinja2

from mailer.config import Settings
from mailer.outgoing import send_now
from mailer.smtp import Outcome
from subscribers.db import utcnow

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent.parent / "templates" / "emails"
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


def _env() -> jinja2.Environment:
    # Explicit per-suffix autoescape: select_autoescape() does not know ".html.j2".
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        # The text parts must not be HTML-escaped; the HTML parts always are.
        autoescape=lambda name: name is not None and name.endswith(".html.j2"),  # noqa: S701
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class Mailer:
    """Builds the web's transactional messages; `mailer.outgoing.send_now` signs and sends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = _env()
        self.sent: list[tuple[str, str]] = []  # (kind, outcome): for logs and tests

    def build(self, item: Outgoing) -> EmailMessage:
        s = self.settings
        context = {"from_name": s.from_name, "contact_address": s.contact_address,
                   "base_url": s.base_url, "email": item.to, **item.context}
        subject = _SUBJECTS[item.kind]
        if item.kind == "already_subscribed" and item.context.get("awaiting"):
            subject = "Your sign-up is waiting for approval"
        msg = EmailMessage()
        msg["From"] = Address(s.from_name, addr_spec=s.from_address)
        msg["To"] = item.to
        msg["Subject"] = subject
        msg["Date"] = format_datetime(utcnow())
        msg["Message-ID"] = make_msgid(domain=s.from_address.rpartition("@")[2] or None)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"  # Exchange's own spelling of the same request
        msg.set_content(self.env.get_template(f"{item.kind}.txt.j2").render(context))
        msg.add_alternative(self.env.get_template(f"{item.kind}.html.j2").render(context),
                            subtype="html")
        return msg

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
