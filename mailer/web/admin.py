"""The co-ordinator console under /admin: sign in, dashboard, subscribers, editions with four-eyes
approval, sends, bounces and their alerts, events and the audit log.

A face over `mailer.operations`: each route authenticates the person (`_actor`), reads the
form, calls one operation and renders the result. Rules every route keeps:
- every route except the sign-in page and the static files needs a signed-in user with the
  route's permission; anyone else is sent to sign in or shown a 403;
- what a person sees and changes is decided by the operations (region scope in SQL, the
  four-eyes rule, the audit entry in the change's transaction); their refusals become console
  pages in one place, `_refusal`;
- every POST carries the CSRF token (the same signed double-submit as the recipient pages);
- no SQL and no library writes here: work runs on a database thread through `Web.run`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from mailer import audit, charts, directory, events, outbox, wordimport
from mailer import edition_form as ef
from mailer.accounts import SESSION_LIFETIME, Actor, LoginOutcome, Permission, Role
from mailer.bounce_policy import BouncePolicy
from mailer.charts import Chart
from mailer.config import Settings
from mailer.edition import EditionErrors
from mailer.errors import (
    EditionError,
    MailerError,
    NotAllowed,
    NotFound,
    OutOfScope,
    RelayRefused,
)
from mailer.models import Edition, EditionStatus
from mailer.operations import Caller
from mailer.operations import alerts as alert_ops
from mailer.operations import audit_log as audit_ops
from mailer.operations import charts as chart_ops
from mailer.operations import editions as edition_ops
from mailer.operations import events as event_ops
from mailer.operations import media as media_ops
from mailer.operations import replies as reply_ops
from mailer.operations import retention as retention_ops
from mailer.operations import segments as segment_ops
from mailer.operations import subscribers as subscriber_ops
from mailer.operations import users as user_ops
from mailer.outbox import ApprovalRefused
from mailer.segments import AudienceFields
from mailer.web import runtime
from mailer.web.runtime import client_ip
from mailer.web.security import CONSOLE_MAX_BODY, network_of
from subscribers import importer, store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput, SubscriberError
from subscribers.errors import NotFound as SubscriberNotFound
from subscribers.models import SubscriberStatus

T = TypeVar("T")
router = APIRouter(prefix="/admin")
PAGE = 50
LOGIN_ATTEMPTS_PER_NETWORK = 30  # failed sign-ins per 15 minutes, whatever the account
LOGIN_WINDOW = dt.timedelta(minutes=15)
PUBLIC_PATHS = frozenset({"/admin/login", "/admin/login/directory", directory.CALLBACK_PATH,
                          "/admin/static/admin.css",
                          "/admin/static/progress.js", "/admin/static/editor.js"})
# The preview frame shows an email's own HTML: inline styles allowed, still no script.
PREVIEW_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
               "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' https: data:; "
            "frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The live progress page alone runs a script: our own file, fetching our own JSON.
PROGRESS_CSP = PAGE_CSP + "; script-src 'self'; connect-src 'self'"
# The structured editor runs one script too (editor.js): the live preview as the author types.
EDITOR_CSP = PROGRESS_CSP
# A chart is an SVG image whose shapes carry inline styles (matplotlib writes them so). Shown
# by an <img> it runs no script and loads nothing whatever its headers say; opened on its own
# it is a document, and this keeps it so while letting its styles apply.
CHART_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
EDITOR_FIELDS = 3000  # a long edition's cards and figures cells, each a form field
DRAFTS_KEPT = 64
LIVE = frozenset({EditionStatus.SCHEDULED, EditionStatus.SENDING})
LAWFUL_BASES = tuple(subscriber_ops.LAWFUL_BASES.items())
ALERTS_SHOWN = 10


# ---------------------------------------------------------------- wiring

class Refusal(Exception):
    """A console request that cannot go on: shown as a console page with this status."""

    def __init__(self, status: int, title: str, *paragraphs: str) -> None:
        super().__init__(title)
        self.status, self.title, self.paragraphs = status, title, paragraphs


class LoginNeeded(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class DraftPreviews:
    """The editor's previews of text not saved yet, kept a short while in memory for the
    preview frames to load: each under a random key, for the person who asked only."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def put(self, login: str, html: str) -> str:
        key = secrets.token_urlsafe(18)
        self._items[key] = (login, html)
        while len(self._items) > DRAFTS_KEPT:
            self._items.popitem(last=False)
        return key

    def get(self, login: str, key: str) -> str | None:
        item = self._items.get(key)
        return item[1] if item is not None and item[0] == login else None


@dataclass
class Console:
    settings: Settings
    cookie: str
    secure: bool
    zone: ZoneInfo
    css: bytes
    progress_js: bytes
    editor_js: bytes
    import_dir: Path
    region_names: dict[str, str] = field(default_factory=dict)
    drafts: DraftPreviews = field(default_factory=lambda: DraftPreviews())


def install(app: FastAPI, settings: Settings, template_dir: Path) -> None:
    """Add the console to the app built by `create_app`."""
    secure = settings.base_url.startswith("https://")
    app.state.console = Console(
        settings=settings, cookie="__Host-console" if secure else "console", secure=secure,
        zone=ZoneInfo(settings.timezone),
        css=(template_dir / "admin" / "admin.css").read_bytes(),
        progress_js=(template_dir / "admin" / "progress.js").read_bytes(),
        editor_js=(template_dir / "admin" / "editor.js").read_bytes(),
        import_dir=settings.var_dir / "console-imports", region_names=dict(settings.regions))
    app.include_router(router)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refusal)
        # Signed in (a refusal after `_actor`): keep the navigation and the sign-out button.
        actor = getattr(request.state, "actor", None)
        return _message(request, actor, exc.title, *exc.paragraphs, status=exc.status,
                        links=[("Back to the dashboard", _url(request, "/admin"))]
                        if actor is not None else None)

    async def login_needed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginNeeded)
        return RedirectResponse(f"{_url(request, '/admin/login')}?"
                                f"{urlencode({'next': exc.next_path})}", status_code=303)

    app.add_exception_handler(Refusal, refused)
    app.add_exception_handler(LoginNeeded, login_needed)


def console(request: Request) -> Console:
    return request.app.state.console  # type: ignore[no-any-return]


def _url(request: Request, path: str) -> str:
    return runtime.web(request).url(path)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _said(exc: Exception) -> str:
    """A refusal and its hint as sentences, for a problem shown on the form's own page."""
    hint = getattr(exc, "hint", None)
    return _sentence(str(exc)) + "." + (f" {_sentence(hint)}." if hint else "")


def _refusal(exc: MailerError | SubscriberError, thing: str = "record") -> Refusal:
    """The one translation of an operation's refusal into a console page."""
    hint = _sentence(getattr(exc, "hint", None) or "")
    said = _sentence(str(exc)) + "."
    if isinstance(exc, (NotFound, SubscriberNotFound)):
        return Refusal(404, f"No such {thing}",
                       f"There is no {thing} with that number in your regions.")
    if isinstance(exc, ApprovalRefused):
        return Refusal(403, "You cannot approve this edition", said, hint)
    if isinstance(exc, NotAllowed):
        return Refusal(403, "You do not have permission to do this", said, hint)
    if isinstance(exc, OutOfScope):
        if exc.field:  # a value chosen on a form, not the record itself
            return Refusal(400, "That change could not be made", said, hint)
        return Refusal(403, f"This {thing} is outside your regions", said, hint)
    if isinstance(exc, InvalidInput):
        return Refusal(400, "That change could not be made", said)
    return Refusal(409, "That cannot be done now", said, hint)


async def _run(request: Request, work: Callable[[Session], T], thing: str = "record") -> T:
    try:
        return await runtime.web(request).run(work)
    except (MailerError, SubscriberError) as exc:
        raise _refusal(exc, thing) from None


# ---------------------------------------------------------------- who is asking

async def _actor(request: Request, permission: Permission) -> Actor:
    token = request.cookies.get(console(request).cookie)

    actor = (await runtime.web(request).run(lambda s: user_ops.session_actor(s, token))
             if token else None)
    if actor is None:
        raise LoginNeeded(request.url.path if request.method == "GET" else "/admin")
    request.state.actor = actor
    if actor.regions == ():
        # Accounts are made with at least one region; one left with none (edited in the
        # database, say) must not fall through to the unscoped "every region" of a query.
        raise Refusal(403, "You have no regions",
                      "Your account is not linked to any region. Ask an administrator.")
    if not actor.can(permission):
        raise Refusal(403, "You do not have permission to do this",
                      f"Your role ({actor.role}) does not allow this. Ask an administrator if "
                      "you need it.")
    return actor


def _caller(request: Request, actor: Actor) -> Caller:
    return Caller(actor=actor, via="console", ip=client_ip(request),
                  user_agent=request.headers.get("user-agent"))


async def _signed_in(request: Request, permission: Permission) -> Caller:
    return _caller(request, await _actor(request, permission))


# ---------------------------------------------------------------- pages

def _page(request: Request, actor: Actor | None, template: str, status: int = 200, *,
          headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    c = console(request)
    return runtime.render(request, f"admin/{template}", status,
                          headers={"Content-Security-Policy": PAGE_CSP, **(headers or {})},
                          actor=actor, Permission=Permission, region_names=c.region_names,
                          local=lambda value: _local(c, value),
                          local_iso=lambda value: _local_iso(c, value),
                          **{"need_code": False, "fixed_slug": False, "notice": None,
                             **context})


def _message(request: Request, actor: Actor | None, title: str, *paragraphs: str,
             status: int = 200, links: list[tuple[str, str]] | None = None) -> HTMLResponse:
    return _page(request, actor, "message.html.j2", status, title=title,
                 paragraphs=[p for p in paragraphs if p], links=links or [])


def _local(c: Console, value: dt.datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(c.zone).strftime("%d %b %Y %H:%M %Z")


def _local_iso(c: Console, value: str | None) -> str:
    """An ISO timestamp from a record (UTC) as people read it, in UK time."""
    if not value:
        return ""
    try:
        return _local(c, dt.datetime.fromisoformat(value))
    except ValueError:
        return value


def _see_other(request: Request, path: str, notice: str | None = None) -> RedirectResponse:
    query = f"?{urlencode({'notice': notice})}" if notice else ""
    return RedirectResponse(_url(request, path) + query, status_code=303)


def _notice(request: Request) -> str | None:
    value = request.query_params.get("notice")
    return value[:300] if value else None


async def _form(request: Request, files: int = 0, fields: int = 60) -> FormData:
    try:
        form = await request.form(max_files=files, max_fields=fields,
                                  max_part_size=CONSOLE_MAX_BODY)
    except HTTPException:
        raise
    except Exception:
        raise Refusal(400, "The form could not be read",
                      "Go back, reload the page and try again.") from None
    problem = runtime.csrf_problem(request, form)
    if problem is not None:
        raise Refusal(403, "This form could not be accepted",
                      f"For your security we could not accept this form: {problem}.",
                      "Go back, reload the page and try again. The console needs cookies.")
    return form


def _text(form: FormData, name: str, limit: int = 500) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


async def _upload(form: FormData, name: str) -> tuple[str, bytes] | None:
    value = form.get(name)
    if not isinstance(value, UploadFile) or not value.filename:
        return None
    data = await value.read(CONSOLE_MAX_BODY + 1)
    return value.filename, data


def _int(value: str | None, default: int = 0) -> int:
    try:
        return max(0, int(value or default))
    except ValueError:
        raise Refusal(400, "Something in the address is wrong",
                      "A page number must be a whole number.") from None


def _every_region(request: Request) -> tuple[str, ...]:
    return tuple(runtime.web(request).rules.regions)


# ---------------------------------------------------------------- sign in and out

@router.get("/static/admin.css", include_in_schema=False)
async def stylesheet(request: Request) -> Response:
    return Response(console(request).css, media_type="text/css",
                    headers={"Cache-Control": "public, max-age=3600"})


@router.get("/static/editor.js", include_in_schema=False)
async def editor_script(request: Request) -> Response:
    return Response(console(request).editor_js, media_type="text/javascript",
                    headers={"Cache-Control": "no-cache"})


@router.get("/static/progress.js", include_in_schema=False)
async def progress_script(request: Request) -> Response:
    return Response(console(request).progress_js, media_type="text/javascript",
                    headers={"Cache-Control": "public, max-age=3600"})


def _safe_next(value: str) -> str:
    # Only our own console pages: never another site, never a protocol-relative URL.
    if value.startswith("/admin") and not value.startswith("//") and "\\" not in value:
        return value[:300]
    return "/admin"


@router.get("/login")
async def login_form(request: Request) -> HTMLResponse:
    return _page(request, None, "login.html.j2", title="Sign in to the console",
                 next=_safe_next(request.query_params.get("next", "")), login="",
                 directory=directory.enabled(console(request).settings))


@router.post("/login")
async def login_post(request: Request) -> Response:
    w, c = runtime.web(request), console(request)
    form = await _form(request)
    login, password = _text(form, "login", 60), _text(form, "password", 1024)
    code, next_path = _text(form, "code", 20), _safe_next(_text(form, "next", 300))
    ip = client_ip(request)
    network = network_of(ip)
    previous = request.cookies.get(c.cookie)

    def work(session: Session) -> tuple[str, str | None]:
        if not w.limits.allowed(session, "login", network, LOGIN_ATTEMPTS_PER_NETWORK,
                                LOGIN_WINDOW):
            user_ops.sign_in_refused(session, via="console", ip=ip, reason="rate_limited")
            return "limited", None
        result = user_ops.sign_in(session, via="console", ip=ip, login=login,
                                  password=password, code=code, previous=previous,
                                  second_factor_required=directory.enabled(c.settings))
        if result.outcome not in (LoginOutcome.OK, LoginOutcome.NEED_CODE):
            # Only failures count against the network (OWASP): an office of staff behind one
            # address signing in each morning must not lock itself out; a guesser from it
            # is stopped after LOGIN_ATTEMPTS_PER_NETWORK tries, on any mix of accounts.
            w.limits.count(session, "login", network)
        return str(result.outcome), result.token

    outcome, token = await w.run(work)
    if outcome == "ok" and token:
        response = RedirectResponse(_url(request, next_path), status_code=303)
        response.set_cookie(c.cookie, token, max_age=int(SESSION_LIFETIME.total_seconds()),
                            httponly=True, samesite="lax", secure=c.secure, path="/")
        return response
    problems = {
        "limited": ("Too many sign-in attempts from your network. Wait 15 minutes and try "
                    "again.", 429),
        "need_code": ("Enter the 6-digit code from your authenticator app as well.", 401),
        "no_second_factor": ("Sign in with your force account. A password here is only for "
                             "break-glass accounts that have a second factor.", 403),
    }
    # A locked account is answered as a wrong password is: only a real account can be
    # locked, so saying so would tell a guesser which logins exist. The page says what happens.
    text, status = problems.get(outcome, (
        "The login, password or code was not recognised. After five failed attempts an "
        "account is locked for 15 minutes; an administrator can reset it.", 401))
    return _page(request, None, "login.html.j2", status, title="Sign in to the console",
                 next=next_path, login=login, errors={"login": text},
                 need_code=outcome == "need_code", directory=directory.enabled(c.settings))


# ---------------------------------------------------------------- the force's directory

def _pending_cookie(c: Console) -> str:
    return "__Host-console-directory" if c.secure else "console-directory"


@router.get("/login/directory")
async def directory_start(request: Request) -> Response:
    """Send the browser to the force's directory (OpenID Connect) to sign in."""
    c = console(request)
    if not directory.enabled(c.settings):
        raise Refusal(404, "Page not found", "Sign-in with a directory is not set up here.")
    next_path = _safe_next(request.query_params.get("next", ""))
    try:
        url, pending = await run_in_threadpool(directory.start, c.settings, next_path)
    except directory.DirectoryRefusal as exc:
        return _message(request, None, "The sign-in service cannot be reached", _said(exc),
                        status=503, links=[("Try again", _url(request, "/admin/login/directory")),
                                           ("Back to sign in", _url(request, "/admin/login"))])
    response = RedirectResponse(url, status_code=303)
    # Lax: the provider's redirect back is a top-level GET, which carries it.
    response.set_cookie(_pending_cookie(c), directory.seal(c.settings, pending),
                        max_age=directory.PENDING_SECONDS, httponly=True, samesite="lax",
                        secure=c.secure, path="/")
    return response


@router.get("/login/directory/callback")
async def directory_callback(request: Request) -> Response:
    """The directory's answer: a session when it vouches for someone with a mapped role; a
    page saying why not (and what to do) otherwise. Every outcome is in the audit log."""
    w, c = runtime.web(request), console(request)
    if not directory.enabled(c.settings):
        raise Refusal(404, "Page not found", "Sign-in with a directory is not set up here.")
    ip = client_ip(request)
    network = network_of(ip)
    pending = directory.unseal(c.settings, request.cookies.get(_pending_cookie(c)))
    params = {k: v[:4000] for k, v in request.query_params.items()}
    again = [("Try again", _url(request, "/admin/login/directory")),
             ("Back to sign in", _url(request, "/admin/login"))]

    def limited(session: Session) -> bool:
        # Refused answers count against the network as wrong passwords do: the same budget.
        if w.limits.allowed(session, "login", network, LOGIN_ATTEMPTS_PER_NETWORK, LOGIN_WINDOW):
            return False
        user_ops.sign_in_refused(session, via="console", ip=ip, reason="rate_limited")
        return True

    if await w.run(limited):
        return _message(request, None, "Too many sign-in attempts",
                        "Too many sign-in attempts from your network. Wait 15 minutes and try "
                        "again.", status=429, links=again[1:])
    try:
        identity = await run_in_threadpool(directory.finish, c.settings, pending, params)
    except directory.DirectoryRefusal as exc:
        refusal = exc

        def refused(session: Session) -> None:
            user_ops.directory_refused(session, via="console", ip=ip, refusal=refusal)
            w.limits.count(session, "login", network)

        await w.run(refused)
        response: Response = _message(request, None, "You could not be signed in", _said(exc),
                                      status=503 if exc.reason == "unreachable" else 401,
                                      links=again)
    else:
        previous = request.cookies.get(c.cookie)
        result = await w.run(lambda s: user_ops.directory_sign_in(
            s, via="console", ip=ip, identity=identity, grants=dict(c.settings.oidc_roles),
            known_regions=list(c.settings.regions), previous=previous))
        if result.outcome == LoginOutcome.OK and result.token:
            response = RedirectResponse(_url(request, pending.next_path if pending else "/admin"),
                                        status_code=303)
            response.set_cookie(c.cookie, result.token,
                                max_age=int(SESSION_LIFETIME.total_seconds()), httponly=True,
                                samesite="lax", secure=c.secure, path="/")
        elif result.outcome == LoginOutcome.DISABLED:
            response = _message(
                request, None, "Your account is disabled",
                "Your account in this console has been disabled by an administrator.",
                "Ask an administrator of the console if you need it again.", status=403,
                links=again[1:])
        else:
            response = _message(
                request, None, "Your account does not give you access to the console",
                f"Your force account ({identity.username or identity.name}) signed in, but it "
                "has no role in this service.",
                "Ask your force's directory administrator to give you one of the console's "
                "roles, then try again.", status=403, links=again)
    response.delete_cookie(_pending_cookie(c), path="/", secure=c.secure, httponly=True,
                           samesite="lax")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    caller = await _signed_in(request, Permission.VIEW)
    await _form(request)
    c = console(request)
    token = request.cookies.get(c.cookie)
    await _run(request, lambda s: user_ops.sign_out(s, caller, token))
    response = _see_other(request, "/admin/login")
    response.delete_cookie(c.cookie, path="/", secure=c.secure, httponly=True, samesite="lax")
    return response


# ---------------------------------------------------------------- dashboard

@router.get("")
@router.get("/")
async def dashboard(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    c = console(request)
    every_region = _every_region(request)

    def work(session: Session) -> dict[str, Any]:
        figures = subscriber_ops.counts(session, caller)
        now = utcnow()
        return {"counts": figures, "upcoming": edition_ops.upcoming(session, caller),
                "recent": edition_ops.recent_sends(session, caller),
                "reminders": events.upcoming(session, now, now + dt.timedelta(days=60))[:10],
                "pending": figures.by_status.get(SubscriberStatus.AWAITING_APPROVAL, 0),
                "reconfirm": subscriber_ops.reconfirmation(session, caller, c.settings),
                "bounce_alerts": alert_ops.open_bounce_alerts(session, caller, every_region),
                "told": alert_ops.coordinator_alerts(session, caller, now, ALERTS_SHOWN),
                "charts": chart_ops.dashboard(session, caller, c.settings, now),
                # topics live in the database, not in the settings the labels come from
                "topic_names": {t.slug: t.name for t in store.list_topics(session)}}

    view = await _run(request, work)
    return _page(request, caller.actor, "dashboard.html.j2", title="Dashboard", **view,
                 eta=lambda n: outbox.eta_text(c.settings, n), back="/admin",
                 notice=_notice(request))


# ---------------------------------------------------------------- charts

async def _chart_svg(chart: Chart) -> Response:
    # Drawing takes a tenth of a second of CPU: off the event loop.
    body = await run_in_threadpool(charts.svg, chart)
    return Response(body, media_type="image/svg+xml",
                    headers={"Content-Security-Policy": CHART_CSP,
                             "Cache-Control": "private, no-store"})


def _chart_csv(chart: Chart) -> Response:
    # The key is ours (a fixed name or an edition's number), never typed: a safe file name.
    name = f"{chart.key}-{utcnow():%Y%m%d-%H%M}.csv"
    return Response(charts.csv_text(chart), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


async def _dashboard_chart(request: Request, key: str) -> Chart:
    caller = await _signed_in(request, Permission.VIEW)
    settings = console(request).settings
    return await _run(request, lambda s: chart_ops.chart(s, caller, settings, key, utcnow()),
                      "chart")


@router.get("/charts/{chart}.svg")
async def chart_svg(request: Request, chart: str) -> Response:
    return await _chart_svg(await _dashboard_chart(request, chart))


@router.get("/charts/{chart}.csv")
async def chart_csv(request: Request, chart: str) -> Response:
    return _chart_csv(await _dashboard_chart(request, chart))


async def _edition_chart(request: Request, eid: int) -> Chart:
    caller = await _signed_in(request, Permission.VIEW)
    return await _run(request, lambda s: chart_ops.edition(s, caller, eid), "edition")


@router.get("/editions/{eid}/chart.svg")
async def edition_chart_svg(request: Request, eid: int) -> Response:
    return await _chart_svg(await _edition_chart(request, eid))


@router.get("/editions/{eid}/chart.csv")
async def edition_chart_csv(request: Request, eid: int) -> Response:
    return _chart_csv(await _edition_chart(request, eid))


# ---------------------------------------------------------------- subscribers

def _filter(request: Request, caller: Caller) -> Any:
    """The list's or export's filter, always inside the caller's regions."""
    q = request.query_params
    try:
        return subscriber_ops.filter_for(
            caller, status=q.get("status") or None, region=(q.get("region") or "")[:40] or None,
            role=q.get("role") or None, topic=q.get("topic") or None,
            search=(q.get("q") or "")[:100] or None)
    except InvalidInput:
        raise Refusal(400, "Unknown status", "Choose a status from the list.") from None
    except OutOfScope:
        raise Refusal(403, "That region is outside your scope",
                      f"You can see {', '.join(caller.scope or ())} only.") from None


def _regions_for(request: Request, caller: Caller) -> dict[str, str]:
    return {r: n for r, n in runtime.web(request).rules.regions.items()
            if caller.scope is None or r in caller.scope}


def _selects(request: Request, caller: Caller) -> list[tuple[str, str, dict[str, str]]]:
    rules = runtime.web(request).rules
    return [("organisation_type", "Type of organisation", rules.organisation_types),
            ("role", "Role", rules.roles), ("region", "Region", _regions_for(request, caller))]


@router.get("/subscribers")
async def subscribers_list(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    flt = _filter(request, caller)
    q = request.query_params
    page = _int(q.get("page"))
    sort = q.get("sort") or "added"
    if sort not in store.SORTS:
        raise Refusal(400, "Unknown order", "Sort the list by pressing a column heading.")
    descending = q.get("order") == "descending"
    w = runtime.web(request)

    def work(session: Session) -> tuple[int, list[Any], list[Any]]:
        total, rows = subscriber_ops.page(session, caller, flt, limit=PAGE, offset=page * PAGE,
                                          sort=sort, descending=descending)
        return total, list(rows), [(t.slug, t.name) for t in store.list_topics(session)]

    total, rows, topics = await _run(request, work)
    regions = list(_regions_for(request, caller).items())
    query = {k: v for k, v in q.items() if k != "page"}
    # The column headings sort the list (the same filter, the first page), as the MOJ and
    # GOV.UK sortable tables do; aria-sort tells a screen reader which way.
    unsorted = {k: v for k, v in query.items() if k not in ("sort", "order")}
    columns = [(key, heading, sort == key,
                urlencode({**unsorted, "sort": key,
                           "order": "descending" if sort == key and not descending
                           else "ascending"}))
               for key, heading in (("address", "Address"), ("name", "Name"),
                                    ("organisation", "Organisation"), ("region", "Region"),
                                    ("status", "Status"))]
    return _page(request, caller.actor, "subscribers.html.j2", title="Subscribers", rows=rows,
                 total=total, page=page, pages=(total + PAGE - 1) // PAGE, flt=flt,
                 statuses=[s.value for s in SubscriberStatus if s != SubscriberStatus.ERASED],
                 regions=regions, all_regions=caller.scope is None, roles=w.rules.roles,
                 topics=topics, query=urlencode(query), notice=_notice(request),
                 columns=columns, descending=descending)


@router.get("/subscribers/export.csv")
async def subscribers_export(request: Request) -> Response:
    caller = await _signed_in(request, Permission.SUBSCRIBERS_EXPORT)
    flt = _filter(request, caller)

    def work(session: Session) -> str:
        out = io.StringIO()
        subscriber_ops.export(session, caller, flt, out)
        return out.getvalue()

    body = await _run(request, work)
    stamp = utcnow().strftime("%Y%m%d-%H%M")
    return Response(body, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="subscribers-{_scope_name(flt)}-'
                               f'{stamp}.csv"'})


def _scope_name(flt: Any) -> str:
    name = flt.region or ("-".join(flt.scope) if flt.scope is not None else "all")
    return "".join(ch for ch in name if ch.isalnum() or ch in "-_")[:80] or "regions"


def _profile_fields(form: FormData) -> dict[str, str | None]:
    return {name: _text(form, name, 254) or None for name in subscriber_ops.PROFILE}


def _subscriber_form(request: Request, caller: Caller, values: dict[str, Any],
                     errors: dict[str, str], topics: list[Any], status: int = 200
                     ) -> HTMLResponse:
    return _page(request, caller.actor, "subscriber_new.html.j2", status,
                 title="Add a subscriber", values=values, errors=errors, topics=topics,
                 lawful_bases=LAWFUL_BASES, selects=_selects(request, caller))


async def _topic_choices(request: Request) -> list[tuple[str, str]]:
    return await runtime.web(request).run(
        lambda s: [(t.slug, t.name) for t in store.list_topics(s)])


@router.get("/subscribers/new")
async def subscriber_new(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.SUBSCRIBERS_EDIT)
    return _subscriber_form(request, caller, {"topics": ["newsletter"]}, {},
                            await _topic_choices(request))


@router.post("/subscribers/new")
async def subscriber_add(request: Request) -> Response:
    caller = await _signed_in(request, Permission.SUBSCRIBERS_EDIT)
    form = await _form(request)
    w = runtime.web(request)
    values: dict[str, Any] = {"email": _text(form, "email", 254), **_profile_fields(form)}
    values["topics"] = [v for v in form.getlist("topics") if isinstance(v, str)][:10]
    values["lawful_basis"] = _text(form, "lawful_basis", 40)

    def work(session: Session) -> tuple[int | None, dict[str, str]]:
        try:
            subscriber = subscriber_ops.add(
                session, caller, w.rules, email=values["email"], topics=values["topics"],
                lawful_basis=values["lawful_basis"],
                **{k: values[k] for k in subscriber_ops.PROFILE})
        except InvalidInput as exc:
            return None, {exc.field: str(exc)}
        except OutOfScope as exc:
            return None, {exc.field or "region": str(exc)}
        except SubscriberError as exc:
            return None, {"email": str(exc)}
        return subscriber.id, {}

    sid, errors = await _run(request, work, "subscriber")
    if sid is None:
        return _subscriber_form(request, caller, values, errors,
                                await _topic_choices(request), 400)
    return _see_other(request, f"/admin/subscribers/{sid}", "The subscriber was added.")


@router.get("/subscribers/{sid}")
async def subscriber_view(request: Request, sid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)

    def work(session: Session) -> dict[str, Any]:
        record = subscriber_ops.history(session, caller, sid)
        slugs: dict[int, str | None] = {}
        bounces = [(e, alert_ops.edition_slug(session, slugs, e.edition_id))
                   for e in subscriber_ops.bounce_events(session, caller, sid)]
        return {"s": record, "deliveries": record["deliveries"], "bounces": bounces}

    view = await _run(request, work, "subscriber")
    return _page(request, caller.actor, "subscriber.html.j2", title="Subscriber", sid=sid,
                 **view, selects=_selects(request, caller), notice=_notice(request))


async def _subscriber_change(request: Request, sid: int, permission: Permission,
                             change: Callable[[Session, Caller, FormData], str]) -> Response:
    caller = await _signed_in(request, permission)
    form = await _form(request)
    notice = await _run(request, lambda s: change(s, caller, form), "subscriber")
    return _see_other(request, f"/admin/subscribers/{sid}" if "erased" not in notice
                      else "/admin/subscribers", notice)


@router.post("/subscribers/{sid}/edit")
async def subscriber_edit(request: Request, sid: int) -> Response:
    rules = runtime.web(request).rules

    def change(session: Session, caller: Caller, form: FormData) -> str:
        changed = subscriber_ops.edit(session, caller, rules, sid, _profile_fields(form))
        return "The changes were saved." if changed else "Nothing had changed."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.post("/subscribers/{sid}/unsubscribe")
async def subscriber_unsubscribe(request: Request, sid: int) -> Response:
    def change(session: Session, caller: Caller, form: FormData) -> str:
        changed = subscriber_ops.unsubscribe(session, caller, sid)
        return "Unsubscribed from everything." if changed else "They were not subscribed."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.post("/subscribers/{sid}/approve")
async def subscriber_approve(request: Request, sid: int) -> Response:
    settings = console(request).settings

    def change(session: Session, caller: Caller, form: FormData) -> str:
        if subscriber_ops.decide(session, caller, settings, sid, approve=True):
            return "Approved: a welcome mail is on its way, and they will receive the next send."
        return "Nothing to approve: this sign-up is not waiting."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.post("/subscribers/{sid}/reject")
async def subscriber_reject(request: Request, sid: int) -> Response:
    settings = console(request).settings

    def change(session: Session, caller: Caller, form: FormData) -> str:
        if subscriber_ops.decide(session, caller, settings, sid, approve=False):
            return "The sign-up was turned down: a short, kind note is on its way to them."
        return "Nothing to turn down: this sign-up is not waiting."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.get("/subscribers/{sid}/erase")
async def subscriber_erase_confirm(request: Request, sid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.SUBSCRIBERS_ERASE)
    record = await _run(request, lambda s: subscriber_ops.history(s, caller, sid), "subscriber")
    return _page(request, caller.actor, "erase.html.j2", title="Erase a subscriber", sid=sid,
                 profile=record["profile"])


@router.post("/subscribers/{sid}/erase")
async def subscriber_erase(request: Request, sid: int) -> Response:
    def change(session: Session, caller: Caller, form: FormData) -> str:
        if _text(form, "confirm") != "erase":
            raise InvalidInput("confirm", "type the word erase to confirm")
        subscriber_ops.erase(session, caller, sid)
        return f"Subscriber {sid} was erased."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_ERASE, change)


# ---------------------------------------------------------------- import

async def _importer(request: Request) -> Caller:
    caller = await _signed_in(request, Permission.SUBSCRIBERS_IMPORT)
    try:
        subscriber_ops.require_import(caller, runtime.web(request).rules)
    except MailerError as exc:
        raise Refusal(403, "Importing needs every region", _sentence(str(exc)) + ".",
                      _sentence(exc.hint or "") + ".") from None
    return caller


@router.get("/import")
async def import_form(request: Request) -> HTMLResponse:
    caller = await _importer(request)
    return _page(request, caller.actor, "import.html.j2", title="Import subscribers",
                 report=None, lawful_bases=LAWFUL_BASES, basis="public_task", sha="")


@router.post("/import")
async def import_post(request: Request) -> HTMLResponse:
    caller = await _importer(request)
    form = await _form(request, files=1)
    c, w = console(request), runtime.web(request)
    basis = _text(form, "lawful_basis", 40)
    if basis not in subscriber_ops.LAWFUL_BASES:
        raise Refusal(400, "Choose a lawful basis", "Say on what lawful basis people are added.")
    sha = _text(form, "sha", 64)
    apply = bool(sha)
    if apply:  # the second step: the file checked a moment ago, by its digest
        if len(sha) != 64 or not all(ch in "0123456789abcdef" for ch in sha):
            raise Refusal(400, "Unknown import", "Upload the file again.")
        path = c.import_dir / f"{sha}.csv"
        if not path.exists():
            raise Refusal(400, "Unknown import", "Upload the file again.")
        name = _text(form, "name", 200) or path.name
    else:
        upload = await _upload(form, "file")
        if upload is None:
            raise Refusal(400, "Choose a file", "Choose the CSV file to import.")
        name, data = upload
        sha = hashlib.sha256(data).hexdigest()
        c.import_dir.mkdir(parents=True, exist_ok=True)
        path = c.import_dir / f"{sha}.csv"
        path.write_bytes(data)
    options = importer.Options(lawful_basis=basis, source=Path(name).name[:200],
                               actor=caller.actor.login)
    try:
        report = await run_in_threadpool(
            lambda: subscriber_ops.import_file(w.sessions, caller, w.rules, path, options,
                                               apply=apply))
    except (MailerError, SubscriberError) as exc:
        raise Refusal(400, "The file could not be imported", str(exc)) from None
    if report.applied:
        path.unlink(missing_ok=True)
    return _page(request, caller.actor, "import.html.j2", 200 if report.ok else 400,
                 title="Import subscribers", report=report, lawful_bases=LAWFUL_BASES,
                 basis=basis, sha=sha, name=options.source)


# ---------------------------------------------------------------- editions

@router.get("/editions")
async def editions_list(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    rows = await _run(request, lambda s: list(edition_ops.listing(s, caller, 100)))
    return _page(request, caller.actor, "editions.html.j2", title="Editions", rows=rows,
                 notice=_notice(request))


@router.get("/editions/new")
async def edition_new(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    return _page(request, caller.actor, "edition_form.html.j2", title="Upload an edition",
                 slug="", source="", problems=[], action="/admin/editions/new")


def _problems(exc: MailerError | SubscriberError) -> list[str]:
    if isinstance(exc, EditionErrors):
        return [e.with_hint() for e in exc.errors]
    if isinstance(exc, EditionError):
        return [exc.with_hint()]
    hint = getattr(exc, "hint", None)
    return [str(exc)] + ([hint] if hint else [])


async def _save_source(request: Request, caller: Caller, slug: str, source: str,
                       action: str) -> Response:
    settings = console(request).settings
    try:
        edition, changed = await runtime.web(request).run(
            lambda s: edition_ops.save(s, caller, settings, slug, source))
    except OutOfScope as exc:
        raise _refusal(exc, "edition") from None
    except (MailerError, SubscriberError) as exc:
        return _page(request, caller.actor, "edition_form.html.j2", 400,
                     title="Fix the edition", slug=slug, source=source,
                     problems=_problems(exc), action=action)
    return _see_other(request, f"/admin/editions/{edition.id}",
                      "Saved. Check the preview below." if changed else "No change.")


@router.post("/editions/new")
async def edition_upload(request: Request) -> Response:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    form = await _form(request, files=1)
    upload = await _upload(form, "file")
    slug = _text(form, "slug", 120)
    if upload is not None:
        filename, data = upload
        try:
            source = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise Refusal(400, "The file is not text", "Save the edition as UTF-8 text "
                          "(a .md file) and upload it again.") from None
        slug = slug or Path(filename).stem
    else:
        value = form.get("source")
        source = value if isinstance(value, str) else ""
    if not source.strip():
        raise Refusal(400, "No edition", "Choose the edition's file, or paste its text.")
    return await _save_source(request, caller, slug, source, "/admin/editions/new")


# ---------------------------------------------------------------- the structured editor
#
# A face over `mailer.edition_form`: the form's fields become an `EditionForm`, a button's
# `do` value changes its shape (a card moved, a grid row added), and "save" turns it into the
# edition source and saves it through `edition_ops.save`, like the raw-source page. Every
# button is a plain submit: the editor works without JavaScript; editor.js only adds the live
# preview.

_CELL = re.compile(r"^s(\d+)\.t(\d+)\.r(\d+)c(\d+)$")


def _number(value: str) -> int:
    """A count or an index from the editor's own hidden fields (0 when not a number)."""
    return int(value) if value.isdigit() else 0


def _words_of(value: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", value.strip().lower()) if w]


def _read_editor(form: FormData) -> ef.EditionForm:
    """The editor's fields as an `EditionForm` (whatever was typed, checked only on save)."""
    try:
        extra = json.loads(_text(form, "extra", 100_000) or "{}")
    except ValueError:
        extra = {}
    model = ef.EditionForm(
        title=_text(form, "title", 200), issue=_text(form, "issue", 10),
        date=_text(form, "date", 10), subject=_text(form, "subject", 300),
        preheader=_text(form, "preheader", 300), topic=_text(form, "topic", 40),
        regions=[r for r in form.getlist("regions") if isinstance(r, str)][:50],
        roles=_words_of(_text(form, "roles", 500)),
        organisation_types=_words_of(_text(form, "organisation_types", 500)),
        from_name=_text(form, "from_name", 200), classification=_text(form, "classification", 20),
        archive=_text(form, "archive", 20), intro=_long(form, "intro"),
        extra=extra if isinstance(extra, dict) else {})
    count = min(_number(_text(form, "sections", 5)), 200)
    cells: dict[tuple[int, int], dict[tuple[int, int], str]] = {}
    for name, value in form.multi_items():
        match = _CELL.match(name)
        if match and isinstance(value, str):
            i, t, r, c = (int(g) for g in match.groups())
            if r < 200 and c < 30:
                cells.setdefault((i, t), {})[(r, c)] = value.strip()[:500]
    for i in range(count):
        layout = _text(form, f"s{i}.layout", 10)
        section = ef.FormSection(heading=_text(form, f"s{i}.heading", 200),
                                 layout=layout if layout in ef.LAYOUTS else "text",
                                 body=_long(form, f"s{i}.body"))
        for t in range(min(_number(_text(form, f"s{i}.tables", 3)), 20)):
            grid = cells.get((i, t), {})
            rows = max(_number(_text(form, f"s{i}.t{t}.rows", 3)), 1)
            cols = max(_number(_text(form, f"s{i}.t{t}.cols", 3)), 1)
            section.tables.append([[grid.get((r, c), "") for c in range(min(cols, 30))]
                                   for r in range(min(rows, 200))])
        model.sections.append(section)
    return model


def _long(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.replace("\r\n", "\n")[:200_000] if isinstance(value, str) else ""


def _reshape(model: ef.EditionForm, action: str) -> None:
    """Apply one of the editor's buttons to the form (an unknown one changes nothing)."""
    parts = action.split("-")
    numbers = [int(p) for p in parts if p.isdigit()]
    sections = model.sections
    if action == "add-section":
        sections.append(ef.FormSection())
        return
    if not numbers or numbers[0] >= len(sections):
        return
    i = numbers[0]
    section = sections[i]
    verb = "-".join(p for p in parts if not p.isdigit())
    if verb == "up" and i > 0:
        sections[i - 1], sections[i] = sections[i], sections[i - 1]
    elif verb == "down" and i + 1 < len(sections):
        sections[i + 1], sections[i] = sections[i], sections[i + 1]
    elif verb == "remove":
        del sections[i]
    elif verb == "add-table":  # a grid makes the section a figures section
        section.tables.append([["", ""], ["", ""]])
        section.layout = "figures"
    elif len(numbers) > 1 and numbers[1] < len(section.tables):
        grid = section.tables[numbers[1]]
        if verb == "add-row":
            grid.append([""] * max(len(r) for r in grid))
        elif verb == "add-col":
            for row in grid:
                row.append("")
        elif verb == "remove-table":
            del section.tables[numbers[1]]


def _placed(model: ef.EditionForm, warnings: list[str]) -> tuple[dict[int, list[str]], list[str]]:
    """Each preflight warning on the section it is about (found by the text it quotes), the
    rest for the whole edition."""
    on: dict[int, list[str]] = {}
    general: list[str] = []
    for warning in warnings:
        quoted = [q for q in re.findall(r"'([^']+)'|\(([^)]+)\)|: (\S+)$", warning)
                  for q in q if q]
        index = next((i for i, s in enumerate(model.sections)
                      if any(q in ef.section_markdown(s) for q in quoted)), None)
        if index is None:
            general.append(warning)
        else:
            on.setdefault(index, []).append(warning)
    return on, general


def _editor_problems(exc: MailerError | SubscriberError, model: ef.EditionForm) -> list[str]:
    """The edition's problems named by the editor's parts (the author never sees the source's
    line numbers): "About this issue", "Introduction" or "Section 2 (Kent picture)"."""
    errors = exc.errors if isinstance(exc, EditionErrors) else [exc]
    places = ef.places(model)
    out = []
    for error in errors:
        location = getattr(error, "location", None) or ""
        line = location.rpartition(":")[2]
        message = str(error)
        message = message[len(location) + 2:] if location and message.startswith(
            location + ": ") else message
        where = ef.place_of(places, int(line)) if line.isdigit() else None
        out.append(f"{where}: {message}" if where else _sentence(message))
        hint = getattr(error, "hint", None)
        if hint and not isinstance(exc, EditionErrors):
            out.append(_sentence(hint))
    return out


def _editor_page(request: Request, caller: Caller, model: ef.EditionForm, *, eid: int | None,
                 slug: str, status: int = 200, problems: list[str] | None = None,
                 warnings: list[str] | None = None, preview: str | None = None,
                 notice: str | None = None) -> HTMLResponse:
    c = console(request)
    on, general = _placed(model, warnings or [])
    action = f"/admin/editions/{eid}/compose" if eid is not None else "/admin/editions/compose"
    return _page(request, caller.actor, "edition_editor.html.j2", status,
                 headers={"Content-Security-Policy": EDITOR_CSP},
                 title=f"Edit {slug}" if eid is not None else "Write an edition",
                 f=model, eid=eid, slug=slug, action=action, layouts=ef.LAYOUTS,
                 problems=problems or [], section_warnings=on, general_warnings=general,
                 preview=preview, extra=json.dumps(model.extra, default=str),
                 every_region=[(r, c.region_names.get(r, r)) for r in _every_region(request)],
                 default_classification=c.settings.default_classification,
                 default_archive=c.settings.default_archive, notice=notice)


def _new_slug(model: ef.EditionForm, typed: str) -> str:
    if typed:
        return typed
    words = re.sub(r"[^a-z0-9]+", "-", f"{model.date} issue {model.issue}".lower()).strip("-")
    return words or "new-edition"


async def _preview_of(request: Request, caller: Caller, slug: str, model: ef.EditionForm
                      ) -> tuple[str | None, list[str], list[str]]:
    """(preview key, preflight warnings, problems) for the form as it stands."""
    c = console(request)
    source = ef.to_source(model)
    try:
        draft = await runtime.web(request).run(
            lambda s: edition_ops.draft_preview(s, caller, c.settings, slug, source))
    except (NotAllowed, OutOfScope) as exc:
        raise _refusal(exc, "edition") from None
    except (MailerError, SubscriberError) as exc:
        return None, [], _editor_problems(exc, model)
    return c.drafts.put(caller.actor.login, draft.html), draft.warnings, []


@router.get("/editions/compose")
async def compose_new(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    model = ef.EditionForm(regions=list(caller.scope or ()),
                           sections=[ef.FormSection()])
    notice = None
    if request.query_params.get("start") == "last":
        last = await _run(request, lambda s: edition_ops.last_source(s, caller), "edition")
        if last is None:
            notice = "There is no earlier issue to start from: this is a blank page."
        else:
            try:
                model = ef.next_issue(ef.from_source(last))
                notice = ("Started from the last issue: its dates, links and the headings of "
                          "its figures tables are here to update.")
            except ef.FormSourceError:
                notice = "The last issue could not be read: this is a blank page."
    return _editor_page(request, caller, model, eid=None, slug="", notice=notice)


@router.get("/editions/{eid}/compose")
async def compose_existing(request: Request, eid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    edition = await _run(request, lambda s: edition_ops.get(s, caller, eid), "edition")
    try:
        model = ef.from_source(edition.source)
    except ef.FormSourceError as exc:
        raise Refusal(409, "This edition cannot be shown in the editor",
                      _sentence(str(exc)) + ".", "Use the source page instead.") from None
    return _editor_page(request, caller, model, eid=eid, slug=edition.slug)


async def _compose(request: Request, eid: int | None) -> Response:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    c = console(request)
    form = await _form(request, files=1, fields=EDITOR_FIELDS)
    model = _read_editor(form)
    action = _text(form, "do", 40)
    if eid is not None:
        slug = (await _run(request, lambda s: edition_ops.get(s, caller, eid), "edition")).slug
    else:
        slug = _text(form, "slug", 120)

    def again(status: int = 200, **kw: Any) -> HTMLResponse:
        return _editor_page(request, caller, model, eid=eid, slug=slug, status=status, **kw)

    if action == "add-image":
        upload = await _upload(form, "image")
        where = _number(_text(form, "image_section", 5)) - 1  # 0: the introduction
        if upload is None:
            return again(400, problems=["Choose an image file to add."])
        name, data = upload
        alt = _text(form, "image_alt", 300)
        try:
            stored = await runtime.web(request).run(
                lambda s: media_ops.upload_image(s, caller, c.settings, data, alt, name))
        except (NotAllowed, OutOfScope) as exc:
            raise _refusal(exc, "edition") from None
        except MailerError as exc:
            return again(400, problems=_problems(exc))
        markdown = f"![{stored.alt.replace(']', ' ')}]({stored.url})"
        if 0 <= where < len(model.sections):
            target = model.sections[where]
            target.body = f"{target.body.rstrip()}\n\n{markdown}".lstrip()
        else:
            model.intro = f"{model.intro.rstrip()}\n\n{markdown}".lstrip()
        return again(notice=f"Image added ({stored.width} × {stored.height}), with its alt "
                            "text.")
    if action not in ("save", "preview"):
        _reshape(model, action)
        return again()
    if action == "preview":
        key, warnings, problems = await _preview_of(request, caller, _new_slug(model, slug),
                                                    model)
        return again(400 if problems else 200, problems=problems, warnings=warnings,
                     preview=key)
    slug = _new_slug(model, slug)
    source = ef.to_source(model)
    try:
        edition, changed = await runtime.web(request).run(
            lambda s: edition_ops.save(s, caller, c.settings, slug, source))
    except OutOfScope as exc:
        raise _refusal(exc, "edition") from None
    except (MailerError, SubscriberError) as exc:
        return again(400, problems=_editor_problems(exc, model))
    return _see_other(request, f"/admin/editions/{edition.id}",
                      "Saved. Check the preview below." if changed else "No change.")


@router.post("/editions/compose")
async def compose_new_post(request: Request) -> Response:
    return await _compose(request, None)


@router.post("/editions/{eid}/compose")
async def compose_existing_post(request: Request, eid: int) -> Response:
    return await _compose(request, eid)


@router.post("/editions/compose/preview")
async def compose_preview(request: Request) -> Response:
    """The editor's live preview (editor.js): the form as it stands, rendered by the server;
    the frames then load the draft by its key. Nothing is stored."""
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    form = await _form(request, files=0, fields=EDITOR_FIELDS)
    model = _read_editor(form)
    slug = _new_slug(model, _text(form, "slug", 120))
    key, warnings, problems = await _preview_of(request, caller, slug, model)
    on, general = _placed(model, warnings)
    return JSONResponse({
        "preview": _url(request, f"/admin/editions/draft/{key}.html") if key else None,
        "problems": problems, "general": general,
        "sections": {str(i): w for i, w in on.items()}})


@router.get("/editions/draft/{key}.html")
async def draft_preview(request: Request, key: str) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    html = console(request).drafts.get(caller.actor.login, key[:40])
    if html is None:
        raise Refusal(404, "This preview has gone", "Preview the edition again.")
    return HTMLResponse(html, headers={"Content-Security-Policy": PREVIEW_CSP,
                                       "X-Frame-Options": "SAMEORIGIN"})


@router.post("/editions/compose/word")
async def compose_from_word(request: Request) -> Response:
    """A Word document turned into the editor's form, its problems listed; saved only when
    the author saves."""
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    c = console(request)
    form = await _form(request, files=1)
    upload = await _upload(form, "document")
    if upload is None:
        raise Refusal(400, "No document", "Choose the Word document (.docx) to import.")
    name, data = upload
    details = wordimport.Details(title=_text(form, "title", 200) or None,
                                 issue=_number(_text(form, "issue", 6)) or None)
    day = _text(form, "date", 10)
    if day:
        try:
            details.date = dt.date.fromisoformat(day)
        except ValueError:
            raise Refusal(400, "Unknown date", "Give the date as YYYY-MM-DD.") from None
    try:
        result = await runtime.web(request).run(
            lambda s: media_ops.import_word(s, caller, c.settings, data, name, details))
    except (NotAllowed, OutOfScope) as exc:
        raise _refusal(exc, "edition") from None
    except MailerError as exc:
        blank = ef.EditionForm(regions=list(caller.scope or ()), sections=[ef.FormSection()])
        return _editor_page(request, caller, blank, eid=None, slug="", status=400,
                            problems=_problems(exc))
    model = ef.from_source(result.source)
    if not model.regions:
        model.regions = list(caller.scope or ())
    return _editor_page(request, caller, model, eid=None, slug="",
                        problems=[str(p) for p in result.problems],
                        notice=f"Imported {name}: check each section, then save.")


@router.get("/editions/{eid}")
async def edition_view(request: Request, eid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    return await _edition_page(request, caller, eid, notice=_notice(request))


async def _edition_page(request: Request, caller: Caller, eid: int, status: int = 200, *,
                        notice: str | None = None, problems: Sequence[tuple[str, str]] = (),
                        ) -> HTMLResponse:
    """The edition's page; `problems` are (what went wrong, the field's id or "") from a step
    the page's own forms asked for, shown above it in an error summary, not on a page apart."""
    c = console(request)

    def work(session: Session) -> dict[str, Any]:
        seen = edition_ops.preview(session, caller, c.settings, eid)
        e = seen.edition
        return {"e": e, "text": seen.text, "warnings": seen.warnings,
                "audience": seen.audience, "progress": outbox.progress(session, e),
                "reach": edition_ops.audience(session, caller, eid),
                "left_out": seen.left_out,
                "covers": caller.actor.covers(e.regions),
                "may_approve": outbox.second_pair_of_eyes(e, caller.actor.login),
                "colleagues": (user_ops.colleagues(session, caller)
                               if caller.actor.can(Permission.EDITIONS_EDIT) else []),
                "changes": edition_ops.changes(session, caller, eid),
                "history": list(edition_ops.history(session, caller, eid)),
                "chart": (chart_ops.edition(session, caller, eid)
                          if e.started_at is not None else None)}

    view = await _run(request, work, "edition")
    return _page(request, caller.actor, "edition.html.j2", status, title=view["e"].title,
                 **view, notice=notice, problems=problems,
                 now_local=dt.datetime.now(c.zone))


@router.get("/editions/{eid}/preview.html")
async def edition_preview(request: Request, eid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    settings = console(request).settings
    seen = await _run(request, lambda s: edition_ops.preview(s, caller, settings, eid),
                      "edition")
    return HTMLResponse(seen.html, headers={"Content-Security-Policy": PREVIEW_CSP,
                                            "X-Frame-Options": "SAMEORIGIN"})


@router.get("/editions/{eid}/edit")
async def edition_edit_form(request: Request, eid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    edition = await _run(request, lambda s: edition_ops.get(s, caller, eid), "edition")
    return _page(request, caller.actor, "edition_form.html.j2", title=f"Edit {edition.slug}",
                 slug=edition.slug, source=edition.source, problems=[],
                 action=f"/admin/editions/{eid}/edit", fixed_slug=True)


@router.post("/editions/{eid}/edit")
async def edition_edit(request: Request, eid: int) -> Response:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    form = await _form(request)
    value = form.get("source")
    source = value if isinstance(value, str) else ""
    slug = (await _run(request, lambda s: edition_ops.get(s, caller, eid), "edition")).slug
    return await _save_source(request, caller, slug, source, f"/admin/editions/{eid}/edit")


class Unconfirmed(MailerError):
    """A step whose confirmation box was left empty: shown against that box."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


async def _edition_step(request: Request, eid: int, permission: Permission,
                        step: Callable[[Session, Caller, FormData], str]) -> Response:
    caller = await _signed_in(request, permission)
    form = await _form(request)
    try:
        notice = await runtime.web(request).run(lambda s: step(s, caller, form))
    except (MailerError, SubscriberError) as exc:
        refusal = _refusal(exc, "edition")
        if refusal.status == 404 or (isinstance(exc, OutOfScope) and not exc.field):
            raise refusal from None
        # What the page's own forms can cause is said on the page, with what to do: no dead
        # end on a page of its own.
        said = " ".join(p for p in refusal.paragraphs if p)
        return await _edition_page(request, caller, eid,
                                   400 if isinstance(exc, Unconfirmed) else refusal.status,
                                   problems=[(said, getattr(exc, "field", None) or "")])
    return _see_other(request, f"/admin/editions/{eid}", notice)


@router.post("/editions/{eid}/test-send")
async def edition_test_send(request: Request, eid: int) -> Response:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    form = await _form(request)
    c, w = console(request), runtime.web(request)
    chosen = [v for v in form.getlist("colleagues") if isinstance(v, str)][:20]
    try:
        sent = await run_in_threadpool(edition_ops.test_send, w.sessions, caller, c.settings,
                                       eid, chosen)
    except (NotFound, OutOfScope, NotAllowed) as exc:
        raise _refusal(exc, "edition") from None
    except MailerError as exc:  # said on the edition's page, with what to do
        refused = isinstance(exc, RelayRefused)  # else: no address, a colleague, a header
        what = "was not sent" if refused else "could not be sent"
        return await _edition_page(request, caller, eid, 502 if refused else 409, problems=[(
            f"The test message {what}: {_said(exc)}", "")])
    return _see_other(request, f"/admin/editions/{eid}",
                      f"A test copy was sent to {', '.join(sent)}.")


@router.post("/editions/{eid}/request-approval")
async def edition_request_approval(request: Request, eid: int) -> Response:
    def step(session: Session, caller: Caller, form: FormData) -> str:
        edition_ops.request_approval(session, caller, eid)
        return "Approval requested: another co-ordinator must now approve it."

    return await _edition_step(request, eid, Permission.EDITIONS_EDIT, step)


@router.post("/editions/{eid}/approve")
async def edition_approve(request: Request, eid: int) -> Response:
    def step(session: Session, caller: Caller, form: FormData) -> str:
        edition_ops.approve(session, caller, eid)
        return "Approved. It can now be scheduled or sent."

    return await _edition_step(request, eid, Permission.EDITIONS_APPROVE, step)


def _when(form: FormData, zone: ZoneInfo) -> dt.datetime:
    day, at = _text(form, "date", 10), _text(form, "time", 5)
    try:
        local = dt.datetime.combine(dt.date.fromisoformat(day), dt.time.fromisoformat(at))
    except ValueError:
        raise MailerError("give the date as YYYY-MM-DD and the time as HH:MM") from None
    return local.replace(tzinfo=zone)


@router.post("/editions/{eid}/schedule")
async def edition_schedule(request: Request, eid: int) -> Response:
    c = console(request)

    def step(session: Session, caller: Caller, form: FormData) -> str:
        when = _when(form, c.zone)
        edition_ops.schedule(session, caller, c.settings, eid, when)
        return f"Scheduled for {_local(c, when)}."

    return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)


@router.post("/editions/{eid}/send")
async def edition_send(request: Request, eid: int) -> Response:
    settings = console(request).settings

    def step(session: Session, caller: Caller, form: FormData) -> str:
        edition_ops.get(session, caller, eid)  # a stranger's edition is not found first
        if _text(form, "confirm") != "yes":
            raise Unconfirmed("Tick the box to confirm that it should go to everyone in its "
                              "audience now", "confirm-send")
        added = edition_ops.send(session, caller, settings, eid)
        return f"Sending: {added} message(s) queued."

    return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)


def _control(action: str, done: str) -> Any:
    async def route(request: Request, eid: int) -> Response:
        def step(session: Session, caller: Caller, form: FormData) -> str:
            edition_ops.control(session, caller, eid, action)
            return done

        return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)

    route.__name__ = f"edition_{action}"
    return route


@router.post("/editions/{eid}/resend-failed")
async def edition_resend_failed(request: Request, eid: int) -> Response:
    def step(session: Session, caller: Caller, form: FormData) -> str:
        queued = edition_ops.resend_failed(session, caller, eid,
                                           include_unknown=_text(form, "unknown") == "yes")
        return f"{queued} message(s) queued again." if queued else "Nothing to send again."
    return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)


@router.post("/editions/{eid}/send-to-new")
async def edition_send_to_new(request: Request, eid: int) -> Response:
    def step(session: Session, caller: Caller, form: FormData) -> str:
        queued = edition_ops.send_to_new(session, caller, eid)
        return (f"{queued} message(s) queued for people who joined since." if queued
                else "Nobody has joined since who has not had it.")
    return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)


router.post("/editions/{eid}/pause")(_control("pause", "Paused."))
router.post("/editions/{eid}/resume")(_control("resume", "Resumed."))
router.post("/editions/{eid}/cancel")(_control("cancel", "Cancelled: nothing more will be sent."))


def _progress_view(request: Request, caller: Caller, eid: int
                   ) -> Callable[[Session], tuple[Edition, outbox.Progress]]:
    def work(session: Session) -> tuple[Edition, outbox.Progress]:
        edition = edition_ops.get(session, caller, eid)
        return edition, outbox.progress(session, edition)
    return work


@router.get("/editions/{eid}/progress")
async def edition_progress(request: Request, eid: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    c = console(request)
    edition, p = await _run(request, _progress_view(request, caller, eid), "edition")
    live = p.status in LIVE
    return _page(request, caller.actor, "progress.html.j2", title=f"Sending {edition.slug}",
                 headers={"Content-Security-Policy": PROGRESS_CSP} if live else None,
                 e=edition, p=p, eta=outbox.time_left_text(c.settings, p), live=live,
                 updated=dt.datetime.now(c.zone).strftime("%H:%M:%S"))


@router.get("/editions/{eid}/progress.json")
async def edition_progress_json(request: Request, eid: int) -> Response:
    """The progress page's figures, for its script to update the table in place."""
    caller = await _signed_in(request, Permission.VIEW)
    c = console(request)
    _edition, p = await _run(request, _progress_view(request, caller, eid), "edition")
    return JSONResponse({"status": str(p.status), "counts": p.counts, "total": p.total,
                         "ambiguous": p.ambiguous, "taken_over": p.taken_over,
                         "once": p.once, "remaining": p.remaining,
                         "eta": outbox.time_left_text(c.settings, p),
                         "live": p.status in LIVE,
                         "updated": dt.datetime.now(c.zone).strftime("%H:%M:%S")})


# ---------------------------------------------------------------- bounces and alerts

@router.get("/bounces")
async def bounces_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    every_region = _every_region(request)

    def work(session: Session) -> dict[str, Any]:
        rows, hidden = alert_ops.recent_bounces(session, caller, every_region)
        return {"rows": rows, "hidden": hidden,
                "bounce_alerts": alert_ops.open_bounce_alerts(session, caller, every_region)}

    view = await _run(request, work)
    return _page(request, caller.actor, "bounces.html.j2", title="Bounces and complaints",
                 **view, notice=_notice(request), back="/admin/bounces")


@router.get("/replies")
async def replies_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.REPLIES_VIEW)
    every_region = _every_region(request)
    rows, hidden = await _run(
        request, lambda s: reply_ops.recent_replies(s, caller, every_region))
    days = console(request).settings.reader_reply_retention_days
    return _page(request, caller.actor, "replies.html.j2", title="Replies from readers",
                 rows=rows, hidden=hidden, days=days)


@router.post("/bounces/alerts/{aid}/resolve")
async def bounce_alert_resolve(request: Request, aid: int) -> Response:
    """`mailer bounces resolve ID --apply|--dismiss` from the console."""
    caller = await _signed_in(request, alert_ops.RESOLVE_ALERT)
    form = await _form(request)
    c = console(request)
    resolution = _text(form, "resolution", 20)
    if resolution not in ("apply", "dismiss"):
        raise Refusal(400, "Choose what to do with the alert",
                      "Apply the held bounces, or dismiss them.")
    back = "/admin/bounces" if _text(form, "back", 40) == "/admin/bounces" else "/admin"
    every_region = _every_region(request)
    try:
        policy = BouncePolicy.from_settings(c.settings)
    except MailerError as exc:
        raise Refusal(500, "The bounce settings are wrong", _sentence(str(exc)) + ".",
                      _sentence(exc.hint or "")) from None
    apply = resolution == "apply"

    def work(session: Session) -> str:
        alert, changed = alert_ops.resolve_bounce_alert(session, caller, policy, aid,
                                                        apply=apply, every_region=every_region)
        if apply:
            return (f"Alert {aid} applied: {changed} subscriber(s) at {alert.domain} marked "
                    "bounced.")
        return f"Alert {aid} dismissed: the held bounces from {alert.domain} change nobody."

    try:
        notice = await runtime.web(request).run(work)
    except NotFound:
        raise Refusal(404, "No such alert", "There is no open bounce alert with that "
                      "number. It may have been removed after its retention period.") from None
    except OutOfScope as exc:
        raise Refusal(403, "This alert is outside your regions",
                      f"{_sentence(str(exc))}; you can act only for "
                      f"{', '.join(caller.scope or ())}. Ask a co-ordinator who covers all of "
                      "its audience.") from None
    except (MailerError, SubscriberError) as exc:  # resolved a moment ago by someone else
        raise _refusal(exc, "alert") from None
    return _see_other(request, back, notice)


# ---------------------------------------------------------------- events

EVENT_FIELDS = ("name", "date", "until", "offsets", "at", "text", "description", "link",
                "topic", "weekend", "segment")


def _event_values(e: events.Event | None = None) -> dict[str, Any]:
    """An event's form fields as typed (empty for a new one)."""
    if e is None:
        return {"name": "", "date": "", "until": "", "yearly": False, "offsets": "14, 1",
                "at": events.DEFAULT_SEND_TIME, "text": "", "description": "", "link": "",
                "topic": "reminders", "weekend": "friday", "segment": ""}
    return {"name": e.name, "date": e.starts_on.isoformat(),
            "until": e.ends_on.isoformat() if e.ends_on else "", "yearly": e.yearly,
            "offsets": ", ".join(str(o) for o in e.offsets or ()), "at": e.send_time,
            "text": e.reminder_text, "description": e.description, "link": e.link or "",
            "topic": e.topic, "weekend": e.weekend, "segment": e.segment or ""}


def _event_spec(values: dict[str, Any]) -> events.EventSpec:
    """The form as an `EventSpec`; the CLI's parsing and validation decide what is wrong."""
    until = values["until"]
    return events.EventSpec(
        name=values["name"], starts_on=events.parse_date(values["date"], "date"),
        ends_on=events.parse_date(until, "last day") if until else None,
        yearly=values["yearly"], offsets=events.parse_offsets(values["offsets"], "reminders"),
        send_time=values["at"], reminder_text=values["text"],
        description=values["description"], link=values["link"] or None,
        topic=values["topic"], weekend=values["weekend"], segment=values["segment"] or None)


def _calendar(session: Session, zone: ZoneInfo) -> dict[str, Any]:
    now = utcnow()
    today = now.astimezone(zone).date()
    rows = [(e, events.next_occurrence(e, today)) for e in events.list_events(session)]
    return {"calendar": rows,
            "reminders": events.upcoming(session, now, now + dt.timedelta(days=400))[:30]}


async def _events_page(request: Request, caller: Caller, status: int = 200, *,
                       values: dict[str, Any] | None = None, problems: list[str] | None = None,
                       editing: int | None = None) -> HTMLResponse:
    c = console(request)
    view = await _run(request, lambda s: _calendar(s, c.zone))
    title = "Change an event" if editing is not None else "Events and reminders"
    return _page(request, caller.actor, "events.html.j2", status, title=title, **view,
                 values=values or _event_values(), problems=problems or [], editing=editing,
                 notice=_notice(request))


@router.get("/events")
async def events_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    return await _events_page(request, caller)


async def _event_change(request: Request, editing: int | None) -> Response:
    """Add (editing None) or change an event from the form; a refusal shows the form again
    with what was typed and the problem, and nothing is stored."""
    caller = await _signed_in(request, Permission.EDITIONS_SEND)
    form = await _form(request)
    values: dict[str, Any] = {name: _text(form, name, 2000) for name in EVENT_FIELDS}
    values["yearly"] = _text(form, "yearly", 5) == "yes"

    def work(session: Session) -> str:
        spec = _event_spec(values)
        if editing is None:
            return event_ops.add(session, caller, spec).name
        return event_ops.update(session, caller, editing, spec).name

    try:
        name = await runtime.web(request).run(work)
    except (NotAllowed, NotFound) as exc:
        raise _refusal(exc, "event") from None
    except (MailerError, SubscriberError) as exc:
        return await _events_page(request, caller, 400, values=values,
                                  problems=_problems(exc), editing=editing)
    return _see_other(request, "/admin/events",
                      f"Event '{name}' {'added' if editing is None else 'changed'}; "
                      "its reminders are planned.")


@router.post("/events/new")
async def event_add(request: Request) -> Response:
    return await _event_change(request, None)


@router.get("/events/{event_id}/edit")
async def event_edit_form(request: Request, event_id: int) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_SEND)
    values = await _run(request, lambda s: _event_values(event_ops.get(s, caller, event_id)),
                        "event")
    return await _events_page(request, caller, values=values, editing=event_id)


@router.post("/events/{event_id}/edit")
async def event_edit(request: Request, event_id: int) -> Response:
    return await _event_change(request, event_id)


@router.post("/events/{event_id}/remove")
async def event_remove(request: Request, event_id: int) -> Response:
    caller = await _signed_in(request, Permission.EDITIONS_SEND)
    await _form(request)
    name, dropped = await _run(request, lambda s: event_ops.remove(s, caller, event_id),
                               "event")
    return _see_other(request, "/admin/events",
                      f"Event '{name}' removed, with {dropped} planned reminder(s).")


# ---------------------------------------------------------------- saved segments

SEGMENT_LISTS = ("regions", "roles", "organisation_types", "topics")


def _segment_choices(request: Request, session: Session) -> list[tuple[str, str, Any]]:
    rules = runtime.web(request).rules
    return [("regions", "Regions", list(rules.regions.items())),
            ("roles", "Roles", list(rules.roles.items())),
            ("organisation_types", "Organisation types", list(rules.organisation_types.items())),
            ("topics", "Also subscribed to one of these topics",
             [(t.slug, t.name) for t in store.list_topics(session)])]


def _segment_fields(values: dict[str, Any]) -> AudienceFields:
    return AudienceFields(*(list(values[name]) for name in SEGMENT_LISTS))


async def _segments_page(request: Request, caller: Caller, status: int = 200, *,
                         values: dict[str, Any] | None = None,
                         problems: list[str] | None = None, editing: str | None = None,
                         count: int | None = None) -> HTMLResponse:
    """The list with each segment's live count, and the form; `count` is the form's own
    live count (the "Count readers" button, or the segment being edited)."""
    def view(session: Session) -> dict[str, Any]:
        rows = [segment_ops.counted(session, caller, g.slug)
                for g in segment_ops.listing(session, caller)]
        return {"rows": rows, "choices": _segment_choices(request, session)}
    shown = await _run(request, view, "segment")
    values = values or {"slug": "", "name": "", "description": "",
                        **{name: [] for name in SEGMENT_LISTS}}
    title = "Change a segment" if editing else "Saved segments"
    return _page(request, caller.actor, "segments.html.j2", status, title=title, **shown,
                 values=values, problems=problems or [], editing=editing, count=count,
                 words=_segment_fields(values).words(), notice=_notice(request))


@router.get("/segments")
async def segments_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.VIEW)
    return await _segments_page(request, caller)


@router.get("/segments/{slug}")
async def segment_page(request: Request, slug: str) -> HTMLResponse:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    shown = await _run(request, lambda s: segment_ops.counted(s, caller, slug), "segment")
    g = shown.segment
    values = {"slug": g.slug, "name": g.name, "description": g.description,
              **{name: list(getattr(shown.fields, name)) for name in SEGMENT_LISTS}}
    return await _segments_page(request, caller, values=values, editing=g.slug,
                                count=shown.count)


async def _segment_change(request: Request, editing: str | None) -> Response:
    """Count (the form again with its live count, nothing stored) or save; a refusal shows
    the form again with what was chosen and the problem."""
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    form = await _form(request)
    values: dict[str, Any] = {name: _text(form, name, 2000)
                              for name in ("slug", "name", "description")}
    for name in SEGMENT_LISTS:
        values[name] = [v.strip()[:60] for v in form.getlist(name) if isinstance(v, str)]
    if editing:
        values["slug"] = editing
    settings = console(request).settings
    fields = _segment_fields(values)
    counting = _text(form, "action", 10) == "count"

    def work(session: Session) -> int | str:
        if counting:
            return segment_ops.count_fields(session, caller, settings, fields)
        if editing:
            return segment_ops.edit(session, caller, settings, editing, name=values["name"],
                                    description=values["description"], fields=fields).name
        return segment_ops.add(session, caller, settings, slug=values["slug"],
                               name=values["name"], description=values["description"],
                               fields=fields).name

    try:
        done = await runtime.web(request).run(work)
    except (NotAllowed, NotFound) as exc:
        raise _refusal(exc, "segment") from None
    except (MailerError, SubscriberError) as exc:
        return await _segments_page(request, caller, 400, values=values,
                                    problems=_problems(exc), editing=editing)
    if isinstance(done, int):
        return await _segments_page(request, caller, values=values, editing=editing,
                                    count=done)
    return _see_other(request, "/admin/segments",
                      f"Segment '{done}' {'changed' if editing else 'added'}.")


@router.post("/segments/new")
async def segment_add(request: Request) -> Response:
    return await _segment_change(request, None)


@router.post("/segments/{slug}")
async def segment_edit(request: Request, slug: str) -> Response:
    return await _segment_change(request, slug)


@router.post("/segments/{slug}/remove")
async def segment_remove(request: Request, slug: str) -> Response:
    caller = await _signed_in(request, Permission.EDITIONS_EDIT)
    await _form(request)
    await _run(request, lambda s: segment_ops.remove(s, caller, slug), "segment")
    return _see_other(request, "/admin/segments", f"Segment '{slug}' removed.")


# ---------------------------------------------------------------- audit

def _day(value: str | None, end: bool = False) -> dt.datetime | None:
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise Refusal(400, "Unknown date", "Give dates as YYYY-MM-DD.") from None
    start = dt.datetime.combine(day + dt.timedelta(days=1 if end else 0), dt.time())
    return start.replace(tzinfo=dt.UTC)


@router.get("/audit")
async def audit_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.AUDIT_VIEW)
    q = request.query_params
    flt = audit.AuditFilter(actor=(q.get("actor") or "")[:100] or None,
                            action=(q.get("action") or "")[:60] or None,
                            target=(q.get("target") or "")[:160] or None,
                            since=_day(q.get("since")), until=_day(q.get("until"), end=True))
    page = _int(q.get("page"))

    def work(session: Session) -> tuple[int, list[Any], list[str]]:
        total, rows = audit_ops.entries(session, caller, flt, limit=PAGE, offset=page * PAGE)
        return total, list(rows), audit.actions(session)

    total, rows, known = await _run(request, work)
    query = {k: v for k, v in q.items() if k != "page"}
    return _page(request, caller.actor, "audit.html.j2", title="Audit log", rows=rows,
                 total=total, page=page, pages=(total + PAGE - 1) // PAGE, flt=flt,
                 actions=known, since=q.get("since", ""), until=q.get("until", ""),
                 query=urlencode(query))


# ---------------------------------------------------------------- users

@router.get("/users")
async def users_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.USERS_MANAGE)
    rows = await _run(request, lambda s: list(user_ops.listing(s, caller)))
    return _page(request, caller.actor, "users.html.j2", title="Users", rows=rows,
                 notice=_notice(request))


def _user_page(request: Request, caller: Caller, user: Any, values: dict[str, Any],
               status: int = 200, *, problems: Sequence[str] = (),
               notice: str | None = None) -> HTMLResponse:
    """One account's page (`user` None: the form for a new one), its forms and what went
    wrong with the last of them."""
    return _page(request, caller.actor, "user.html.j2", status,
                 title=f"User {user.login}" if user else "Add a user", u=user, values=values,
                 roles=list(Role), problems=problems, notice=notice,
                 every_region=list(console(request).region_names.items()),
                 yourself=user is not None and user.id == caller.actor.user_id)


def _user_values(form: FormData) -> dict[str, Any]:
    return {"login": _text(form, "login", 60), "name": _text(form, "name", 100),
            "email": _text(form, "email", 254), "role": _text(form, "role", 20),
            "regions": [v for v in form.getlist("regions") if isinstance(v, str)][:20]}


@router.get("/users/new")
async def user_new(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.USERS_MANAGE)
    return _user_page(request, caller, None, {"role": Role.COORDINATOR, "regions": []})


@router.post("/users/new")
async def user_add(request: Request) -> Response:
    caller = await _signed_in(request, Permission.USERS_MANAGE)
    form = await _form(request)
    values = _user_values(form)
    known = list(console(request).region_names)

    def work(session: Session) -> str:
        return user_ops.add(session, caller, login=values["login"], name=values["name"],
                            role=Role(values["role"] or Role.VIEWER),
                            regions=values["regions"], known_regions=known,
                            password=_text(form, "password", 2000),
                            email=values["email"] or None).login
    try:
        login = await runtime.web(request).run(work)
    except (MailerError, ValueError) as exc:
        return _user_page(request, caller, None, values, 400, problems=[_said(exc)])
    return _see_other(request, f"/admin/users/{login}",
                      "The user was added. Give them their password by a separate channel.")


@router.get("/users/{login}")
async def user_view(request: Request, login: str) -> HTMLResponse:
    caller = await _signed_in(request, Permission.USERS_MANAGE)
    user = await _run(request, lambda s: user_ops.get(s, caller, login), "user")
    return _user_page(request, caller, user, {}, notice=_notice(request))


async def _user_step(request: Request, login: str,
                     step: Callable[[Session, Caller, FormData], str]) -> Response:
    """A form on a user's page: done, back to the page with a notice; refused, the page with
    what went wrong and what to do."""
    caller = await _signed_in(request, Permission.USERS_MANAGE)
    form = await _form(request)
    try:
        notice = await runtime.web(request).run(lambda s: step(s, caller, form))
    except (MailerError, ValueError) as exc:
        if isinstance(exc, NotFound):
            raise _refusal(exc, "user") from None
        user = await _run(request, lambda s: user_ops.get(s, caller, login), "user")
        return _user_page(request, caller, user, {}, 400, problems=[_said(exc)])
    return _see_other(request, f"/admin/users/{login}", notice)


@router.post("/users/{login}/edit")
async def user_edit(request: Request, login: str) -> Response:
    known = list(console(request).region_names)

    def step(session: Session, caller: Caller, form: FormData) -> str:
        v = _user_values(form)
        changed = user_ops.change(session, caller, login, role=Role(v["role"]),
                                  regions=v["regions"], known_regions=known, name=v["name"],
                                  email=v["email"])
        return "Saved." + (" They are signed out, and sign in again with their new rights."
                           if {"role", "regions"} & set(changed) else "") if changed \
            else "No change."
    return await _user_step(request, login, step)


def _user_control(do: Callable[[Session, Caller, str], object], done: str) -> Any:
    async def route(request: Request, login: str) -> Response:
        def step(session: Session, caller: Caller, form: FormData) -> str:
            do(session, caller, login)
            return done
        return await _user_step(request, login, step)
    return route


for _name, _do, _done in (
        ("disable", lambda s, c, login: user_ops.set_disabled(s, c, login, True),
         "Disabled: signed out everywhere, and their API tokens no longer work."),
        ("enable", lambda s, c, login: user_ops.set_disabled(s, c, login, False),
         "Enabled: they can sign in again (their old API tokens stay revoked)."),
        ("second-factor-off", lambda s, c, login: user_ops.second_factor(s, c, login, on=False),
         "Their authenticator app is no longer asked for. They can set up a new one with an "
         "administrator.")):
    router.post(f"/users/{{login}}/{_name}", name=f"user_{_name.replace('-', '_')}")(
        _user_control(_do, _done))


@router.post("/users/{login}/password")
async def user_password(request: Request, login: str) -> Response:
    def step(session: Session, caller: Caller, form: FormData) -> str:
        user_ops.reset_password(session, caller, login, _text(form, "password", 2000))
        return "The password was reset and they are signed out. Give them the new one by a " \
               "separate channel."
    return await _user_step(request, login, step)


# ---------------------------------------------------------------- privacy (read-only)

@router.get("/privacy")
async def privacy_page(request: Request) -> HTMLResponse:
    caller = await _signed_in(request, Permission.PRIVACY_REPORT)
    settings = console(request).settings
    rows = await _run(request, lambda s: retention_ops.privacy_report(s, caller, settings))
    return _page(request, caller.actor, "privacy.html.j2", title="Privacy: records held",
                 rows=rows, now=utcnow())
