"""The door every single message leaves by: confirmation and manage-link mails, co-ordinator
alerts and test sends are DKIM-signed here (`mailer.dkim`) and handed to SMTP on a connection
of their own. List mail leaves through the worker's send loop, which signs with the same
`mailer.dkim.Signer`, in processes beside its SMTP sessions.
"""

from __future__ import annotations

from mailer import dkim
from mailer.config import Settings
from mailer.smtp import SendResult, deliver_once


def send_now(settings: Settings, to: str, data: bytes, *,
             mail_from: str | None = None) -> SendResult:
    """Sign `data` (CRLF bytes with its headers) with every configured key and send it.

    Raises `ConfigError` for an unusable key or relay URL; every SMTP outcome is a result.
    """
    signed = dkim.signer_for(settings).sign(_crlf(data))
    return deliver_once(settings.smtp_url.get_secret_value(),
                        mail_from or settings.from_address, to, signed)


def _crlf(data: bytes) -> bytes:
    # EmailMessage.as_bytes writes the policy's line ends (CRLF under SMTP policies); a bare
    # LF would be signed as one thing and seen by the receiver as another.
    if data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data
