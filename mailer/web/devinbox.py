"""The dev inbox, `/dev/inbox`: the mail the demo's dev sink received, to open and click through.

Only `mailer demo` mounts it (`create_app(settings, dev_inbox=...)`); production never has the
route. A message's HTML is served as its own page under a CSP `sandbox` (no script, no forms,
an opaque origin, nothing fetched but images), so what a mail contains cannot act as our site,
while its links (unsubscribe, preferences, view online) still go to the real pages.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

from mailer.devsink import DevSink
from mailer.web import runtime

_KEY = re.compile(r"[A-Za-z0-9._-]{1,200}")
# The mail's own HTML: sandboxed (no scripts, forms or same-origin), inline styles and images
# only; a click on a link navigates the tab, as a mail client would open it.
MAIL_CSP = ("sandbox allow-popups allow-popups-to-escape-sandbox "
            "allow-top-navigation-by-user-activation; default-src 'none'; "
            "style-src 'unsafe-inline'; img-src data: http: https:; form-action 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")


def _parsed(sink: DevSink, key: str) -> EmailMessage:
    if not _KEY.fullmatch(key):
        raise HTTPException(404)
    try:
        raw = sink.raw(key)
    except KeyError:
        raise HTTPException(404) from None
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _part(message: EmailMessage, kind: str) -> str:
    body = message.get_body((kind,))
    return body.get_content() if body is not None else ""


INBOX_PAGE = 50  # messages a page: the demo's 200 copies are four pages, not one long one


def router(directory: Path) -> APIRouter:
    """The routes over the Maildir at `directory` (read only; the sink itself writes it)."""
    sink = DevSink(directory)
    routes = APIRouter()

    @routes.get("/dev/inbox", include_in_schema=False)
    async def inbox(request: Request) -> HTMLResponse:
        messages = list(reversed(sink.messages()))
        pages = max(1, -(-len(messages) // INBOX_PAGE))
        try:
            page = min(max(int(request.query_params.get("page", "1")), 1), pages)
        except ValueError:
            page = 1
        rows: list[dict[str, Any]] = [
            {"key": m.key, "received": m.received, "to": ", ".join(m.rcpt_to),
             "subject": m.subject}
            for m in messages[(page - 1) * INBOX_PAGE:page * INBOX_PAGE]]
        return runtime.render(request, "dev/inbox.html.j2", title="Dev inbox", rows=rows,
                              total=len(messages), page=page, pages=pages,
                              directory=str(directory))

    @routes.get("/dev/inbox/{key}", include_in_schema=False)
    async def show(request: Request, key: str) -> HTMLResponse:
        message = _parsed(sink, key)
        fields = [(name, str(message[name])) for name in
                   ("From", "To", "Delivered-To", "Subject", "Date", "Message-ID", "List-Id",
                    "List-Unsubscribe", "List-Unsubscribe-Post") if message[name]]
        attachments = [(part.get_filename() or "(unnamed)", part.get_content_type())
                       for part in message.iter_attachments()]
        return runtime.render(request, "dev/message.html.j2", title=str(message["Subject"]),
                             key=key, fields=fields, text=_part(message, "plain"),
                             attachments=attachments,
                             has_html=bool(message.get_body(("html",))))

    @routes.get("/dev/inbox/{key}/html", include_in_schema=False)
    async def html(key: str) -> Response:
        message = _parsed(sink, key)
        return HTMLResponse(_part(message, "html"), headers={
            "Content-Security-Policy": MAIL_CSP, "Cache-Control": "no-store"})

    @routes.get("/dev/inbox/{key}/raw", include_in_schema=False)
    async def raw(key: str) -> Response:
        _parsed(sink, key)
        return Response(sink.raw(key), media_type="text/plain; charset=utf-8")

    return routes
