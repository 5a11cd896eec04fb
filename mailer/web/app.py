"""`create_app(settings)`: the FastAPI app served by `mailer web`: the recipient pages, the
co-ordinator console under /admin and the API under /api/v1, over one shared `runtime.Web`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from mailer.config import Settings
from mailer.labels import Labels
from mailer.migrations import require_current
from mailer.web import admin, api, media, ops, public, runtime
from mailer.web.security import BodyLimits
from subscribers.db import make_engine, session_factory

log = logging.getLogger(__name__)
TEMPLATE_DIR = Path(__file__).resolve().parent.parent.parent / "templates" / "web"
# Per worker process. bench/web.py, two workers on 2 cores: 4 threads gave 450-680 one-click
# POSTs/s, 2 gave 410-450, and 8 gave 290-475 with a third of the machine idle.
PG_DB_THREADS = 4
_TITLES = {400: "Something in the request is wrong", 403: "Not allowed", 404: "Page not found",
           405: "That is not possible here", 413: "Request too large",
           415: "Unsupported form encoding", 429: "Too many requests"}


class BuiltOnFirstUse:
    """An ASGI app made at its first request. FastAPI takes about 60 ms to build the API's
    routes (a pydantic adapter for each field), which every web app would pay at its start
    whether or not it serves the API: each test of a reader or console page makes one."""

    def __init__(self, build: Callable[[], FastAPI]) -> None:
        self._build = build
        self._app: FastAPI | None = None

    @property
    def app(self) -> FastAPI:
        if self._app is None:  # a race builds it twice at worst: both are the same API
            self._app = self._build()
        return self._app

    @property
    def routes(self) -> list[BaseRoute]:  # what Starlette's Mount lists as its routes
        return self.app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def page_environment() -> jinja2.Environment:
    # Always on, for every suffix: these pages show what subscribers typed.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                              undefined=jinja2.StrictUndefined, auto_reload=False)


def create_app(settings: Settings, *, dev_inbox: Path | None = None) -> FastAPI:
    """The recipient web app. Refuses to start on a database whose schema is not current.

    `dev_inbox` (a dev sink's Maildir) adds /dev/inbox: `mailer demo` only, never production.
    """
    # SQLite: one database thread (see `runtime.Web.executor`); PostgreSQL: a thread for each
    # pooled connection, so a request never waits on the pool while a thread is idle.
    sqlite = settings.database.startswith("sqlite")
    db_threads = 1 if sqlite else PG_DB_THREADS
    engine = (make_engine(settings.database) if sqlite
              else make_engine(settings.database, pool_size=db_threads))
    require_current(engine)
    pages = page_environment()
    words = Labels(settings)
    pages.filters.update(label=words.one, labels=words.many, action=words.action,
                         detail=words.detail)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        web.close()
        engine.dispose()

    app = FastAPI(title="MSHT bulletin", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    web = app.state.web = runtime.Web.build(settings, session_factory(engine), pages, db_threads)
    app.state.css = (TEMPLATE_DIR / "site.css").read_bytes()
    app.state.favicon = (TEMPLATE_DIR / "favicon.svg").read_bytes()
    for path, endpoint, methods in public.FAST_ROUTES:  # ahead of the routers: first match
        app.add_route(path, endpoint, methods=methods, include_in_schema=False)
    app.include_router(public.router)
    admin.install(app, settings, TEMPLATE_DIR)
    app.mount("/api/v1", BuiltOnFirstUse(lambda: api.create_api(app)))
    app.include_router(media.router(settings))  # /media/: images of the editions
    ops.install(app, settings, engine)  # /metrics, /readyz, request latency
    if dev_inbox is not None:
        from mailer.web import devinbox

        app.include_router(devinbox.router(dev_inbox))

    async def http_error(request: Request, exc: Exception) -> HTMLResponse:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) and status != 404 else (
            "There is no page at this address. Check the link, or start again from the "
            "subscribe page.")
        if status == 405:
            detail = "This address does not accept that kind of request."
        response = runtime.message(request, _TITLES.get(status, "Something went wrong"), detail,
                                  status=status,
                                  links=[("Go to the subscribe page", settings.base_url
                                          + "/subscribe")])
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def invalid_request(request: Request, exc: Exception) -> HTMLResponse:
        return runtime.message(request, _TITLES[400],
                              "The address or the form you sent is not one this site can use.",
                              status=400)

    async def server_error(request: Request, exc: Exception) -> HTMLResponse:
        # Logged in full for us; the person sees a plain page, never a traceback.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return HTMLResponse(
            "<!doctype html><html lang=\"en-GB\"><head><meta charset=\"utf-8\"><title>Sorry, "
            "something went wrong</title></head><body><main><h1>Sorry, something went wrong"
            "</h1><p>Please try again in a few minutes. If it keeps happening, write to "
            f"{jinja2.utils.markupsafe.escape(settings.contact_address)}.</p></main></body>"
            "</html>", status_code=500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, server_error)
    https = urlsplit(settings.base_url).scheme == "https"
    app.add_middleware(BodyLimits, max_body=settings.max_request_bytes, https=https)
    return app


def app_from_environment() -> FastAPI:
    """For `uvicorn --factory` (several worker processes): the app from MAILER_* settings."""
    from mailer.config import load_settings

    return create_app(load_settings())
