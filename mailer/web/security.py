"""What every response and every form post goes through: headers, body size, CSRF, rate keys.

The headers and the size limit are a plain ASGI middleware (cheap enough for the one-click path,
which must answer hundreds of posts a second). CSRF is a signed double-submit cookie checked
together with Fetch Metadata and Origin (OWASP's CSRF cheat sheet); the RFC 8058 one-click
endpoint is the deliberate exception, because a mailbox provider's POST carries no cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSRF_FIELD = "csrf_token"
CONSOLE_MAX_BODY = 4 * 1024 * 1024  # an edition source or a CSV of a few thousand people
# No inline script or style anywhere; forms only post back to us; nobody may frame us.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' https: data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_TOO_LARGE = (b"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Request too "
              b"large</title></head><body><main><h1>Request too large</h1><p>What you sent is "
              b"larger than any form on this site needs.</p></main></body></html>")


class _BodyTooLarge(Exception):
    pass


class SecurityMiddleware:
    """Adds the security headers to every response and refuses bodies over `max_body` bytes.

    The body limit is checked against Content-Length up front and again while a chunked body
    streams in, so no route ever buffers more than `max_body`.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, https: bool) -> None:
        self.app = app
        self.max_body = max_body
        headers = [
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),  # token URLs must not leak onwards
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"x-frame-options", b"DENY"),
            (b"permissions-policy", b"interest-cohort=()"),
        ]
        if https:  # only meaningful, and only safe to promise, when we are served over HTTPS
            headers.append((b"strict-transport-security",
                            b"max-age=63072000; includeSubDomains; preload"))
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await self._too_large(send)
            return
        started = False
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in self.headers if n not in present]
                if b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send_with_headers)

    async def _too_large(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(_TOO_LARGE)).encode()),
            (b"connection", b"close"), *self.headers, (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": _TOO_LARGE})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # let the server's own parser refuse it
    return None


class Csrf:
    """Signed double-submit: a random cookie, and in each form an HMAC of it under our key.

    An attacker's page can make the browser send our cookie but cannot read it, so it cannot
    compute the form value; a stolen form value is useless without the matching cookie.
    """

    def __init__(self, key: bytes, base_url: str) -> None:
        self._key = hashlib.sha256(b"msht-mailer/csrf|" + key).digest()
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.secure = parts.scheme == "https"
        # The __Host- prefix makes browsers refuse the cookie unless it is Secure, host-only
        # and for path /; over plain http (development) it cannot be used.
        self.cookie = "__Host-csrf" if self.secure else "csrf"

    def new_cookie(self) -> str:
        return secrets.token_urlsafe(24)

    def form_token(self, cookie: str) -> str:
        return hmac.new(self._key, cookie.encode(), hashlib.sha256).hexdigest()

    def problem(self, headers: Any, cookies: dict[str, str], form_value: str | None) -> str | None:
        """Why this form post must be refused, or None if it may proceed."""
        # Fetch Metadata first: browsers that send it say exactly where a request came from.
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return "the form was sent from another site"
        # Our own pages send Referrer-Policy: no-referrer, under which browsers post with
        # `Origin: null`; so only a named foreign origin is proof of a cross-site post.
        origin = headers.get("origin")
        if origin not in (None, "null") and origin != self.origin:
            return "the form was sent from another site"
        cookie = cookies.get(self.cookie)
        if not cookie or not form_value:
            return "your browser did not send the form's security cookie"
        if not hmac.compare_digest(self.form_token(cookie), form_value):
            return "the form's security check did not match"
        return None


def network_of(ip: str | None) -> str:
    """The network a rate limit counts: /24 for IPv4 and /56 for IPv6, since one host or one
    customer's line usually owns at least that much and can rotate addresses inside it."""
    if not ip:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 56
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def bucket(key: bytes, kind: str, value: str) -> str:
    """A rate bucket name that does not reveal the address or network it counts."""
    digest = hmac.new(key, f"{kind}|{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}:{digest[:40]}"


class BodyLimits:
    """The security middleware with the console's larger body limit under /admin and /api.

    One `SecurityMiddleware` per limit around the same app: the recipient pages keep their
    small limit (they take a few short fields from anyone), while signed-in staff may upload an
    edition or a CSV.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, https: bool) -> None:
        self.public = SecurityMiddleware(app, max_body=max_body, https=https)
        self.console = SecurityMiddleware(app, max_body=max(max_body, CONSOLE_MAX_BODY),
                                          https=https)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        inner = self.console if path.startswith(("/admin/", "/api/")) else self.public
        await inner(scope, receive, send)
