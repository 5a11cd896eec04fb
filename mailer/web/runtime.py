"""What every web route shares, built once by `app.create_app`: the settings, the database
threads, tokens and links, CSRF, the rate limits, the page templates, transactional mail.

The recipient pages, the console and the API all reach it through `web(request)`; none of them
reaches into another's module for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.background import BackgroundTask
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from mailer.archive import Archive
from mailer.config import Settings
from mailer.links import Links, tokens_for
from mailer.web.mail import Mailer, Outgoing
from mailer.web.ratelimit import Limits
from mailer.web.security import CSRF_FIELD, Csrf
from subscribers.db import session_scope
from subscribers.models import Channel
from subscribers.rules import Rules
from subscribers.store import Context
from subscribers.tokens import Tokens

T = TypeVar("T")


@dataclass
class Web:
    """Everything the routes share, built once by `create_app`."""

    settings: Settings
    rules: Rules
    sessions: sessionmaker[Session]
    tokens: Tokens
    links: Links
    csrf: Csrf
    limits: Limits
    mailer: Mailer
    pages: jinja2.Environment
    archive: Archive
    site_name: str = "Kent & Essex MSHT bulletin"
    topics_cache: list[Any] = field(default_factory=list)
    # The threads that run database work (the driver blocks). SQLite allows one writer, and
    # threads racing for it wait in its busy handler, which sleeps in steps of up to 100 ms: one
    # thread takes turns far faster. PostgreSQL gets as many as the engine's pool holds.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="db"))
    turns: AbstractContextManager[Any] = field(default_factory=contextlib.nullcontext)

    @classmethod
    def build(cls, settings: Settings, sessions: sessionmaker[Session],
              pages: jinja2.Environment, db_threads: int = 1) -> Web:
        tokens = tokens_for(settings)
        return cls(settings=settings, rules=settings.rules(), sessions=sessions,
                   executor=ThreadPoolExecutor(db_threads, thread_name_prefix="db"),
                   turns=SqliteTurns.for_url(settings.database) or contextlib.nullcontext(),
                   tokens=tokens, links=Links(settings, tokens),
                   csrf=Csrf(settings.secret(), settings.base_url),
                   limits=Limits(settings, settings.suppression_secret()),
                   mailer=Mailer(settings), pages=pages, archive=Archive(settings))

    def url(self, path: str) -> str:
        return self.links.url(path)

    def ctx(self, request: Request, channel: Channel = Channel.WEB) -> Context:
        return Context(channel=channel, ip=client_ip(request),
                       user_agent=request.headers.get("user-agent"),
                       consent_version=self.settings.consent_version)

    def run(self, work: Callable[[Session], T]) -> asyncio.Future[T]:
        """Run `work` in one transaction on a database thread. An executor future rather than
        anyio's `to_thread`: the one-click path is short enough for anyio's cancel scopes and
        capacity limiter to be a large share of it. Once a unit has started it always runs to
        the end and commits, even if the request is abandoned."""
        def unit() -> T:
            try:
                with self.turns, session_scope(self.sessions) as session:
                    return work(session)
            except IntegrityError:
                # On PostgreSQL another request wrote the same unique row a moment ago (two
                # sign-ups for one new address at once): the unit was rolled back whole, and
                # run again it finds that row and takes the path for an existing one.
                with self.turns, session_scope(self.sessions) as session:
                    return work(session)
        return asyncio.wrap_future(self.executor.submit(unit))

    def close(self) -> None:
        """Wait for database work in flight; for the app's shutdown, before the engine goes."""
        self.executor.shutdown(wait=True)


class SqliteTurns:
    """One unit of database work at a time across every web process on one SQLite file (uvicorn
    --workers), by an exclusive flock on a file beside it.

    SQLite serialises the writes by itself, but a process waiting for them polls in sleeps of up
    to 100 ms, and the read-then-write units (mail caps, sign-ups, exactly one consent event per
    change) are only atomic if no other unit runs between their read and their write. In one
    process the single database thread gives both; this extends it to several. A waiting
    process is woken by the kernel the moment the lock is free. Other programs on the database
    (the sending worker, the CLI) do not take it and are still kept apart by busy_timeout alone.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @classmethod
    def for_url(cls, url: str) -> SqliteTurns | None:
        """The turns for a SQLite file URL; None for PostgreSQL or an in-memory database."""
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return cls(f"{parsed.database}-web.lock")

    # Opened for each unit (only ever from the one database thread) and closed after it, which
    # also drops the lock: a few microseconds, and no descriptor outlives an app.
    def __enter__(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __exit__(self, *_exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def web(request: Request) -> Web:
    return request.app.state.web  # type: ignore[no-any-return]


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


# ---------------------------------------------------------------- rendering

def render(request: Request, template: str, status: int = 200, *,
           headers: dict[str, str] | None = None, background: BackgroundTask | None = None,
           **context: Any) -> HTMLResponse:
    w = web(request)
    cookie = request.cookies.get(w.csrf.cookie)
    fresh = not cookie or len(cookie) > 64
    if fresh:
        cookie = w.csrf.new_cookie()
    assert cookie is not None
    body = w.pages.get_template(template).render(
        base_url=w.settings.base_url, site_name=w.site_name,
        contact_address=w.settings.contact_address, csrf_token=w.csrf.form_token(cookie),
        **{"errors": {}, "notice": None, **context})
    response = HTMLResponse(body, status_code=status, headers=headers, background=background)
    if fresh:
        response.set_cookie(w.csrf.cookie, cookie, httponly=True, samesite="lax",
                            secure=w.csrf.secure, path="/")
    return response


def message(request: Request, title: str, *paragraphs: str, status: int = 200,
            links: list[tuple[str, str]] | None = None, undo: dict[str, str] | None = None,
            background: BackgroundTask | None = None) -> HTMLResponse:
    return render(request, "message.html.j2", status, title=title, paragraphs=paragraphs,
                  links=links or [], undo=undo, background=background)


def send_later(w: Web, items: list[Outgoing]) -> BackgroundTask | None:
    return BackgroundTask(w.mailer.send_all, items) if items else None


# ---------------------------------------------------------------- forms

async def read_form(request: Request) -> FormData:
    """The posted fields; no files, few fields, small parts: nothing a recipient page needs
    more."""
    try:
        return await request.form(max_files=0, max_fields=40, max_part_size=8192)
    except HTTPException:
        raise
    except Exception:  # python-multipart's own errors on malformed bodies
        raise HTTPException(400, "The form data could not be read.") from None


def csrf_problem(request: Request, form: FormData) -> str | None:
    """Why this form fails the CSRF check, or None when it passes."""
    value = form.get(CSRF_FIELD)
    return web(request).csrf.problem(request.headers, request.cookies,
                                     value if isinstance(value, str) else None)


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""
