"""The door every single message leaves by: confirmation and manage-link mails, reconfirmation
requests, co-ordinator alerts and test sends are DKIM-signed here (`mailer.dkim`) and handed to
SMTP on a connection of their own. List mail leaves through the worker's send loop, which signs
with the same `mailer.dkim.Signer`, in processes beside its SMTP sessions.

`transactional` builds the messages written to one reader about their own subscription
(templates/emails/<kind>.txt.j2 and .html.j2), with the headers every such message carries.
"""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2

from mailer import dkim
from mailer.config import Settings
from mailer.errors import RelayRefused
from mailer.smtp import SendResult, deliver_once

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "emails"


def template_env() -> jinja2.Environment:
    # Explicit per-suffix autoescape: select_autoescape() does not know ".html.j2".
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        # The text parts must not be HTML-escaped; the HTML parts always are.
        autoescape=lambda name: name is not None and name.endswith(".html.j2"),  # noqa: S701
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def transactional(settings: Settings, env: jinja2.Environment, kind: str, to: str,
                  subject: str, context: dict[str, Any], now: datetime) -> EmailMessage:
    """A message to one reader about their own subscription, from templates `kind`.txt.j2
    and `kind`.html.j2. Marked auto-generated, so that out-of-office replies stay away."""
    context = {"from_name": settings.from_name, "contact_address": settings.contact_address,
               "base_url": settings.base_url, "email": to, **context}
    msg = EmailMessage()
    msg["From"] = Address(settings.from_name, addr_spec=settings.from_address)
    msg["Reply-To"] = Address(addr_spec=settings.reply_address)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=settings.from_address.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"  # Exchange's own spelling of the same request
    msg.set_content(env.get_template(f"{kind}.txt.j2").render(context))
    msg.add_alternative(env.get_template(f"{kind}.html.j2").render(context), subtype="html")
    return msg


def send_now(settings: Settings, to: str, data: bytes, *,
             mail_from: str | None = None) -> SendResult:
    """Sign `data` (CRLF bytes with its headers) with every configured key and send it.

    Raises `ConfigError` for an unusable key or relay URL; every SMTP outcome is a result.
    """
    signed = dkim.signer_for(settings).sign(_crlf(data))
    return deliver_once(settings.smtp_url.get_secret_value(),
                        mail_from or settings.from_address, to, signed)


def not_sent(settings: Settings, result: SendResult) -> RelayRefused:
    """A single message the relay did not take, with what to do when nothing answered: the
    first thing a newcomer meets with no relay running."""
    if result.stage != "connect":
        return RelayRefused(f"the mail relay answered: {result.reply}")
    relay = urlsplit(settings.smtp_url.get_secret_value())
    return RelayRefused(
        f"nothing answers at {relay.hostname}:{relay.port or 25} ({result.reply})",
        hint="start the mail relay; to try things out, run `mailer dev-sink` in another "
             "terminal (it keeps every message; MAILER_SMTP_URL says which relay to use)")


def _crlf(data: bytes) -> bytes:
    # EmailMessage.as_bytes writes the policy's line ends (CRLF under SMTP policies); a bare
    # LF would be signed as one thing and seen by the receiver as another.
    if data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data
