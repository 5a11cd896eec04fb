"""The co-ordinator console under /admin: sign in, dashboard, subscribers, editions with four-eyes
approval, sends, bounces and their alerts, events and the audit log.

Rules every route keeps:
- every route except the sign-in page and the stylesheet needs a signed-in user with the
  route's permission (`_actor`); the answer to anyone else is a redirect to sign in or a 403;
- a co-ordinator sees and changes only subscribers in their regions, and may only send (or
  approve) an edition whose whole audience is in their regions; someone else's subscriber is a
  404, so the console does not confirm that an address exists elsewhere;
- every POST carries the CSRF token (the same signed double-submit as the recipient pages);
- every change writes an audit entry in the same transaction as the change;
- no SQL here: the work is done by `subscribers.store`, `mailer.outbox`, `mailer.accounts`,
  `mailer.audit`, `mailer.events`, `mailer.bounce_policy` and `mailer.alerts`, run on a worker
  thread through `Web.run`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from mailer import accounts, alerts, audit, bounce_policy, events, outbox, privacy
from mailer.accounts import Actor, Permission
from mailer.bounce_policy import BouncePolicy
from mailer.config import Settings
from mailer.edition import EditionErrors
from mailer.errors import EditionError, MailerError
from mailer.models import Edition, EditionStatus
from mailer.render import CompiledEdition, Recipient, RecipientUrls, personalise, preflight
from mailer.spreadsheet import write_csv
from mailer.web import public
from mailer.web.security import CSRF_FIELD, SecurityMiddleware, bucket, network_of
from subscribers import importer, store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput, NotFound, SubscriberError
from subscribers.models import Channel, SubscriberStatus

router = APIRouter(prefix="/admin")
CONSOLE_MAX_BODY = 4 * 1024 * 1024  # an edition source or a CSV of a few thousand people
PAGE = 50
LOGIN_ATTEMPTS_PER_NETWORK = 30  # failed sign-ins per 15 minutes, whatever the account
LOGIN_WINDOW = dt.timedelta(minutes=15)
PUBLIC_PATHS = frozenset({"/admin/login", "/admin/static/admin.css",
                          "/admin/static/progress.js"})
# The preview frame shows an email's own HTML: inline styles allowed, still no script.
PREVIEW_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
               "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' https: data:; "
            "frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The live progress page alone runs a script: our own file, fetching our own JSON.
PROGRESS_CSP = PAGE_CSP + "; script-src 'self'; connect-src 'self'"
LIVE = frozenset({EditionStatus.SCHEDULED, EditionStatus.SENDING})
LAWFUL_BASES = (("public_task", "Public task"), ("legitimate_interests", "Legitimate interests"),
                ("consent", "Consent"))


# ---------------------------------------------------------------- wiring

class BodyLimits:
    """The security middleware with the console's larger body limit under /admin and /api.

    One `SecurityMiddleware` per limit around the same app: the recipient pages keep their
    small limit (they take a few short fields from anyone), while signed-in staff may upload an
    edition or a CSV.
    """

    def __init__(self, app: Any, *, max_body: int, https: bool) -> None:
        self.public = SecurityMiddleware(app, max_body=max_body, https=https)
        self.console = SecurityMiddleware(app, max_body=max(max_body, CONSOLE_MAX_BODY),
                                          https=https)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        inner = self.console if path.startswith(("/admin/", "/api/")) else self.public
        await inner(scope, receive, send)


class Refusal(Exception):
    """A console request that cannot go on: shown as a console page with this status."""

    def __init__(self, status: int, title: str, *paragraphs: str) -> None:
        super().__init__(title)
        self.status, self.title, self.paragraphs = status, title, paragraphs


class LoginNeeded(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass
class Console:
    settings: Settings
    cookie: str
    secure: bool
    zone: ZoneInfo
    css: bytes
    progress_js: bytes
    import_dir: Path
    region_names: dict[str, str] = field(default_factory=dict)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the console and the API to the app built by `create_app`."""
    from mailer.web import api

    secure = settings.base_url.startswith("https://")
    app.state.console = Console(
        settings=settings, cookie="__Host-console" if secure else "console", secure=secure,
        zone=ZoneInfo(settings.timezone),
        css=(public_template_dir() / "admin" / "admin.css").read_bytes(),
        progress_js=(public_template_dir() / "admin" / "progress.js").read_bytes(),
        import_dir=settings.var_dir / "console-imports", region_names=dict(settings.regions))
    app.include_router(router)
    app.mount("/api/v1", api.create_api(app))

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


def public_template_dir() -> Path:
    from mailer.web.app import TEMPLATE_DIR

    return TEMPLATE_DIR


def console(request: Request) -> Console:
    return request.app.state.console


def _url(request: Request, path: str) -> str:
    return public.web(request).url(path)


def _ip(request: Request) -> str | None:
    return request.client.host if request.client else None


# ---------------------------------------------------------------- who is asking

async def _actor(request: Request, permission: Permission) -> Actor:
    token = request.cookies.get(console(request).cookie)

    def work(session: Session) -> Actor | None:
        user = accounts.session_user(session, token)
        return None if user is None else accounts.actor_of(user)

    actor = await public.web(request).run(work) if token else None
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


def _record(session: Session, actor: Actor, request: Request, action: str,
            target: str | None = None, **detail: Any) -> None:
    audit.record(session, actor=actor.login, actor_name=actor.name, via="console",
                 ip=_ip(request), action=action, target=target, detail=detail or None)


def _ctx(actor: Actor, request: Request, **kw: Any) -> store.Context:
    return store.Context(channel=Channel.ADMIN, actor=actor.login, ip=_ip(request),
                         user_agent=(request.headers.get("user-agent") or "")[:300] or None,
                         **kw)


def _scoped_subscriber(session: Session, actor: Actor, sid: int) -> Any:
    try:
        subscriber = store.get(session, sid)
    except NotFound:
        raise Refusal(404, "No such subscriber",
                      "There is no subscriber with that number in your regions.") from None
    if actor.regions is not None and subscriber.region not in actor.regions:
        raise Refusal(404, "No such subscriber",
                      "There is no subscriber with that number in your regions.")
    return subscriber


def _scoped_edition(session: Session, actor: Actor, eid: int) -> Edition:
    try:
        return outbox.get_edition(session, eid)
    except MailerError:
        raise Refusal(404, "No such edition", "There is no edition with that number.") from None


def _require_cover(actor: Actor, edition: Edition) -> None:
    if not actor.covers(edition.regions):
        where = ", ".join(edition.regions) or "every region"
        raise Refusal(403, "This edition is outside your regions",
                      f"It goes to {where}; you can act only for "
                      f"{', '.join(actor.regions or ())}. Ask a co-ordinator who covers all of "
                      "its audience.")


# ---------------------------------------------------------------- pages

def _page(request: Request, actor: Actor | None, template: str, status: int = 200, *,
          headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    c = console(request)
    return public.render(request, f"admin/{template}", status,
                         headers={"Content-Security-Policy": PAGE_CSP, **(headers or {})},
                         actor=actor, Permission=Permission, region_names=c.region_names,
                         local=lambda value: _local(c, value),
                         local_iso=lambda value: _local_iso(c, value),
                         **{"need_code": False, "fixed_slug": False, "notice": None, **context})


def _message(request: Request, actor: Actor | None, title: str, *paragraphs: str,
             status: int = 200, links: list[tuple[str, str]] | None = None) -> HTMLResponse:
    return _page(request, actor, "message.html.j2", status, title=title, paragraphs=paragraphs,
                 links=links or [])


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


async def _form(request: Request, files: int = 0) -> FormData:
    try:
        form = await request.form(max_files=files, max_fields=60,
                                  max_part_size=CONSOLE_MAX_BODY)
    except HTTPException:
        raise
    except Exception:
        raise Refusal(400, "The form could not be read",
                      "Go back, reload the page and try again.") from None
    value = form.get(CSRF_FIELD)
    problem = public.web(request).csrf.problem(request.headers, request.cookies,
                                               value if isinstance(value, str) else None)
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


# ---------------------------------------------------------------- sign in and out

@router.get("/static/admin.css", include_in_schema=False)
async def stylesheet(request: Request) -> Response:
    return Response(console(request).css, media_type="text/css",
                    headers={"Cache-Control": "public, max-age=3600"})


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
                 next=_safe_next(request.query_params.get("next", "")), login="")


@router.post("/login")
async def login_post(request: Request) -> Response:
    w, c = public.web(request), console(request)
    form = await _form(request)
    login, password = _text(form, "login", 60), _text(form, "password", 1024)
    code, next_path = _text(form, "code", 20), _safe_next(_text(form, "next", 300))
    network, ip = network_of(_ip(request)), _ip(request)
    previous = request.cookies.get(c.cookie)

    def work(session: Session) -> tuple[str, Actor | None, str | None]:
        if not w.allowed(session, "login", network, LOGIN_ATTEMPTS_PER_NETWORK, LOGIN_WINDOW):
            audit.record(session, actor="(unknown)", via="console", ip=ip,
                         action="login.rate_limited")
            return "limited", None, None
        result = accounts.authenticate(session, login, password, code)
        user = result.user
        who = user.login if user else "(unknown)"
        if result.outcome != accounts.LoginOutcome.OK or user is None:
            # Only failures count against the network (OWASP): an office of staff behind one
            # address signing in each morning must not lock itself out; a guesser from it
            # is stopped after LOGIN_ATTEMPTS_PER_NETWORK tries, on any mix of accounts.
            if result.outcome != accounts.LoginOutcome.NEED_CODE:
                store.record_event(session, bucket(w.rate_key, "login", network))
            audit.record(session, actor=who, actor_name=user.display_name if user else None,
                         via="console", ip=ip, action=f"login.{result.outcome}")
            return str(result.outcome), None, None
        accounts.end_session(session, previous)  # signing in again never keeps an old session
        token = accounts.start_session(session, user, ip)
        actor = accounts.actor_of(user)
        audit.record(session, actor=actor.login, actor_name=actor.name, via="console", ip=ip,
                     action="login.ok")
        return "ok", actor, token

    outcome, _actor_seen, token = await w.run(work)
    if outcome == "ok" and token:
        response = RedirectResponse(_url(request, next_path), status_code=303)
        response.set_cookie(c.cookie, token, max_age=int(accounts.SESSION_LIFETIME
                                                         .total_seconds()),
                            httponly=True, samesite="lax", secure=c.secure, path="/")
        return response
    problems = {
        "limited": ("Too many sign-in attempts from your network. Wait 15 minutes and try "
                    "again.", 429),
        "need_code": ("Enter the 6-digit code from your authenticator app as well.", 401),
    }
    # A locked account is answered as a wrong password is: only a real account can be
    # locked, so saying so would tell a guesser which logins exist. The page says what happens.
    text, status = problems.get(outcome, (
        "The login, password or code was not recognised. After five failed attempts an "
        "account is locked for 15 minutes; an administrator can reset it.", 401))
    return _page(request, None, "login.html.j2", status, title="Sign in to the console",
                 next=next_path, login=login, errors={"login": text},
                 need_code=outcome == "need_code")


@router.post("/logout")
async def logout(request: Request) -> Response:
    actor = await _actor(request, Permission.VIEW)
    await _form(request)
    c = console(request)
    token = request.cookies.get(c.cookie)

    def work(session: Session) -> None:
        accounts.end_session(session, token)
        _record(session, actor, request, "logout")

    await public.web(request).run(work)
    response = _see_other(request, "/admin/login")
    response.delete_cookie(c.cookie, path="/", secure=c.secure, httponly=True, samesite="lax")
    return response


# ---------------------------------------------------------------- dashboard

@router.get("")
@router.get("/")
async def dashboard(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    c = console(request)

    every_region = tuple(public.web(request).rules.regions)

    def work(session: Session) -> dict[str, Any]:
        figures = store.counts(session, regions=actor.regions or ())
        now = utcnow()
        return {"counts": figures, "upcoming": outbox.upcoming_editions(session),
                "recent": outbox.recent_sends(session),
                "reminders": events.upcoming(session, now, now + dt.timedelta(days=60))[:10],
                "pending": figures.by_status.get(SubscriberStatus.AWAITING_APPROVAL, 0),
                "bounce_alerts": _open_alerts(session, actor, every_region),
                "told": _coordinator_alerts(session, actor, now)}

    view = await public.web(request).run(work)
    return _page(request, actor, "dashboard.html.j2", title="Dashboard", **view,
                 eta=lambda n: _eta(c.settings, n), back="/admin", notice=_notice(request))


def _eta(settings: Settings, remaining: int) -> str:
    return outbox.eta_text(settings, remaining)


# ---------------------------------------------------------------- subscribers

def _filter(request: Request, actor: Actor) -> store.Filter:
    """The list's or export's filter, always inside the actor's regions: a co-ordinator sees
    all of theirs together by default, or narrows to one; another region is refused."""
    q = request.query_params
    status = q.get("status") or None
    if status is not None and status not in {s.value for s in SubscriberStatus}:
        raise Refusal(400, "Unknown status", "Choose a status from the list.")
    region = (q.get("region") or "")[:40] or None
    if region is not None and actor.regions is not None and region not in actor.regions:
        raise Refusal(403, "That region is outside your scope",
                      f"You can see {', '.join(actor.regions)} only.")
    return store.Filter(status=status, region=region, scope=actor.regions,
                        role=(q.get("role") or None), topic=(q.get("topic") or None),
                        search=(q.get("q") or "")[:100] or None)


@router.get("/subscribers")
async def subscribers_list(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    flt = _filter(request, actor)
    page = _int(request.query_params.get("page"))
    w = public.web(request)

    def work(session: Session) -> tuple[int, list[Any], list[Any]]:
        total, rows = store.list_subscribers(session, flt, limit=PAGE, offset=page * PAGE)
        return total, list(rows), [(t.slug, t.name) for t in store.list_topics(session)]

    total, rows, topics = await w.run(work)
    regions = [(r, console(request).region_names.get(r, r))
               for r in (actor.regions if actor.regions is not None else w.rules.regions)]
    query = {k: v for k, v in request.query_params.items() if k != "page"}
    return _page(request, actor, "subscribers.html.j2", title="Subscribers", rows=rows,
                 total=total, page=page, pages=(total + PAGE - 1) // PAGE, flt=flt,
                 statuses=[s.value for s in SubscriberStatus if s != SubscriberStatus.ERASED],
                 regions=regions, all_regions=actor.regions is None, roles=w.rules.roles,
                 topics=topics, query=urlencode(query), notice=_notice(request))


@router.get("/subscribers/export.csv")
async def subscribers_export(request: Request) -> Response:
    actor = await _actor(request, Permission.SUBSCRIBERS_EXPORT)
    flt = _filter(request, actor)

    def work(session: Session) -> tuple[str, int]:
        out = io.StringIO()
        n = write_csv(out, store.iter_export(session, flt))
        _record(session, actor, request, "subscribers.export", None, rows=n,
                filter={k: v for k, v in vars(flt).items() if v})
        return out.getvalue(), n

    body, _n = await public.web(request).run(work)
    stamp = utcnow().strftime("%Y%m%d-%H%M")
    return Response(body, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="subscribers-{_scope_name(flt)}-'
                               f'{stamp}.csv"'})


def _scope_name(flt: store.Filter) -> str:
    name = flt.region or ("-".join(flt.scope) if flt.scope is not None else "all")
    return "".join(ch for ch in name if ch.isalnum() or ch in "-_")[:80] or "regions"


def _profile_fields(form: FormData) -> dict[str, str | None]:
    return {name: _text(form, name, 254) or None
            for name in ("email", "name", "organisation", "organisation_type", "role", "region")}


def _subscriber_form(request: Request, actor: Actor, values: dict[str, Any],
                     errors: dict[str, str], topics: list[Any], status: int = 200
                     ) -> HTMLResponse:
    w = public.web(request)
    regions = {r: n for r, n in w.rules.regions.items()
               if actor.regions is None or r in actor.regions}
    return _page(request, actor, "subscriber_new.html.j2", status, title="Add a subscriber",
                 values=values, errors=errors, topics=topics, lawful_bases=LAWFUL_BASES,
                 selects=[("organisation_type", "Type of organisation",
                           w.rules.organisation_types), ("role", "Role", w.rules.roles),
                          ("region", "Region", regions)])


async def _topic_choices(request: Request) -> list[tuple[str, str]]:
    return await public.web(request).run(
        lambda s: [(t.slug, t.name) for t in store.list_topics(s)])


@router.get("/subscribers/new")
async def subscriber_new(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.SUBSCRIBERS_EDIT)
    return _subscriber_form(request, actor, {"topics": ["newsletter"]}, {},
                            await _topic_choices(request))


@router.post("/subscribers/new")
async def subscriber_add(request: Request) -> Response:
    actor = await _actor(request, Permission.SUBSCRIBERS_EDIT)
    form = await _form(request)
    w = public.web(request)
    values: dict[str, Any] = _profile_fields(form)
    values["topics"] = [v for v in form.getlist("topics") if isinstance(v, str)][:10]
    basis = _text(form, "lawful_basis", 40)
    values["lawful_basis"] = basis

    def work(session: Session) -> tuple[int | None, dict[str, str]]:
        try:
            profile = store.profile_from(w.rules, **{k: values[k] for k in (
                "email", "name", "organisation", "organisation_type", "role", "region")})
        except InvalidInput as exc:
            return None, {exc.field: str(exc)}
        if actor.regions is not None and profile.region not in actor.regions:
            return None, {"region": "choose one of your regions"}
        if basis not in {b for b, _ in LAWFUL_BASES}:
            return None, {"lawful_basis": "say on what lawful basis this person is added"}
        try:
            topics = store.topics_by_slug(session, values["topics"])
            subscriber = store.add_active(session, w.rules, profile, topics,
                                          _ctx(actor, request, lawful_basis=basis))
        except InvalidInput as exc:
            return None, {exc.field: str(exc)}
        except SubscriberError as exc:
            return None, {"email": str(exc)}
        _record(session, actor, request, "subscriber.add", f"subscriber:{subscriber.id}",
                region=profile.region, lawful_basis=basis)
        return subscriber.id, {}

    sid, errors = await w.run(work)
    if sid is None:
        return _subscriber_form(request, actor, values, errors, await _topic_choices(request),
                                400)
    return _see_other(request, f"/admin/subscribers/{sid}", "The subscriber was added.")


@router.get("/subscribers/{sid}")
async def subscriber_view(request: Request, sid: int) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    w = public.web(request)

    def work(session: Session) -> dict[str, Any]:
        subscriber = _scoped_subscriber(session, actor, sid)
        slugs: dict[int, str | None] = {}
        bounces = [(e, _slug(session, slugs, e.edition_id))
                   for e in bounce_policy.events_for(session, sid)]
        return {"s": privacy.subject_access(session, subscriber),
                "deliveries": outbox.deliveries_for(session, sid), "bounces": bounces}

    view = await w.run(work)
    regions = {r: n for r, n in w.rules.regions.items()
               if actor.regions is None or r in actor.regions}
    return _page(request, actor, "subscriber.html.j2", title="Subscriber", sid=sid, **view,
                 selects=[("organisation_type", "Type of organisation",
                           w.rules.organisation_types), ("role", "Role", w.rules.roles),
                          ("region", "Region", regions)], notice=_notice(request))


async def _subscriber_change(request: Request, sid: int, permission: Permission,
                             change: Callable[[Session, Actor, Any, FormData], str]
                             ) -> Response:
    actor = await _actor(request, permission)
    form = await _form(request)

    def work(session: Session) -> str:
        subscriber = _scoped_subscriber(session, actor, sid)
        return change(session, actor, subscriber, form)

    try:
        notice = await public.web(request).run(work)
    except InvalidInput as exc:
        raise Refusal(400, "That change could not be made", str(exc).capitalize()) from None
    return _see_other(request, f"/admin/subscribers/{sid}" if "erased" not in notice
                      else "/admin/subscribers", notice)


@router.post("/subscribers/{sid}/edit")
async def subscriber_edit(request: Request, sid: int) -> Response:
    w = public.web(request)

    def change(session: Session, actor: Actor, subscriber: Any, form: FormData) -> str:
        fields = _profile_fields(form)
        fields.pop("email")
        if actor.regions is not None and fields["region"] not in actor.regions:
            raise InvalidInput("region", "choose one of your regions")
        changed = store.update_profile(session, w.rules, subscriber, _ctx(actor, request),
                                       **fields)
        if changed:
            _record(session, actor, request, "subscriber.edit", f"subscriber:{sid}",
                    fields=sorted(k for k in fields))
        return "The changes were saved." if changed else "Nothing had changed."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.post("/subscribers/{sid}/unsubscribe")
async def subscriber_unsubscribe(request: Request, sid: int) -> Response:
    def change(session: Session, actor: Actor, subscriber: Any, form: FormData) -> str:
        changed = store.unsubscribe(session, subscriber, _ctx(actor, request))
        if changed:
            _record(session, actor, request, "subscriber.unsubscribe", f"subscriber:{sid}")
        return "Unsubscribed from everything." if changed else "They were not subscribed."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.post("/subscribers/{sid}/approve")
async def subscriber_approve(request: Request, sid: int) -> Response:
    def change(session: Session, actor: Actor, subscriber: Any, form: FormData) -> str:
        if store.approve(session, subscriber, _ctx(actor, request)):
            _record(session, actor, request, "subscriber.approve", f"subscriber:{sid}")
            return "Approved: they will receive the next send."
        return "Nothing to approve: this sign-up is not waiting."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.post("/subscribers/{sid}/reject")
async def subscriber_reject(request: Request, sid: int) -> Response:
    def change(session: Session, actor: Actor, subscriber: Any, form: FormData) -> str:
        if store.reject(session, subscriber, _ctx(actor, request)):
            _record(session, actor, request, "subscriber.reject", f"subscriber:{sid}")
            return "The sign-up was turned down."
        return "Nothing to turn down: this sign-up is not waiting."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_EDIT, change)


@router.get("/subscribers/{sid}/erase")
async def subscriber_erase_confirm(request: Request, sid: int) -> HTMLResponse:
    actor = await _actor(request, Permission.SUBSCRIBERS_ERASE)

    def work(session: Session) -> dict[str, Any]:
        return privacy.subject_access(session, _scoped_subscriber(session, actor, sid))["profile"]

    profile = await public.web(request).run(work)
    return _page(request, actor, "erase.html.j2", title="Erase a subscriber", sid=sid,
                 profile=profile)


@router.post("/subscribers/{sid}/erase")
async def subscriber_erase(request: Request, sid: int) -> Response:
    def change(session: Session, actor: Actor, subscriber: Any, form: FormData) -> str:
        if _text(form, "confirm") != "erase":
            raise InvalidInput("confirm", "type the word erase to confirm")
        privacy.erase(session, subscriber, _ctx(actor, request))  # the outbox's copies too
        _record(session, actor, request, "subscriber.erase", f"subscriber:{sid}")
        return f"Subscriber {sid} was erased."

    return await _subscriber_change(request, sid, Permission.SUBSCRIBERS_ERASE, change)


# ---------------------------------------------------------------- import

def _require_all_regions(request: Request, actor: Actor) -> None:
    # The import report does not say which regions its rows are in, so only someone who
    # covers every region may import: a Kent co-ordinator cannot add Essex people this way.
    if actor.regions is not None and not actor.covers(public.web(request).rules.regions):
        raise Refusal(403, "Importing needs every region",
                      "A CSV can add people in any region, so only an administrator or a "
                      "co-ordinator for every region can import. Add people one at a time, "
                      "or ask an administrator.")


@router.get("/import")
async def import_form(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.SUBSCRIBERS_IMPORT)
    _require_all_regions(request, actor)
    return _page(request, actor, "import.html.j2", title="Import subscribers", report=None,
                 lawful_bases=LAWFUL_BASES, basis="public_task", sha="")


@router.post("/import")
async def import_post(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.SUBSCRIBERS_IMPORT)
    _require_all_regions(request, actor)
    form = await _form(request, files=1)
    c, w = console(request), public.web(request)
    basis = _text(form, "lawful_basis", 40)
    if basis not in {b for b, _ in LAWFUL_BASES}:
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
                               actor=actor.login)
    try:
        report = await run_in_threadpool(importer.import_file, w.sessions, w.rules, path,
                                         options, apply)
    except SubscriberError as exc:
        raise Refusal(400, "The file could not be imported", str(exc)) from None
    if report.applied:
        await w.run(lambda s: _record(s, actor, request, "subscribers.import", None,
                                      file=options.source, sha256=sha, added=report.new,
                                      lawful_basis=basis))
        path.unlink(missing_ok=True)
    return _page(request, actor, "import.html.j2", 200 if report.ok else 400,
                 title="Import subscribers", report=report, lawful_bases=LAWFUL_BASES,
                 basis=basis, sha=sha, name=options.source)


# ---------------------------------------------------------------- editions

@router.get("/editions")
async def editions_list(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    rows = await public.web(request).run(lambda s: list(outbox.list_editions(s, 100)))
    return _page(request, actor, "editions.html.j2", title="Editions", rows=rows,
                 notice=_notice(request))


@router.get("/editions/new")
async def edition_new(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.EDITIONS_EDIT)
    return _page(request, actor, "edition_form.html.j2", title="Upload an edition", slug="",
                 source="", problems=[], action="/admin/editions/new")


def _problems(exc: EditionError) -> list[str]:
    if isinstance(exc, EditionErrors):
        return [f"{e.location + ': ' if e.location else ''}{e}" for e in exc.errors]
    return [f"{exc.location + ': ' if exc.location else ''}{exc}"]


async def _save_source(request: Request, actor: Actor, slug: str, source: str,
                       action: str) -> Response:
    c, w = console(request), public.web(request)

    def work(session: Session) -> tuple[int, bool]:
        edition, changed = outbox.store_edition_source(session, c.settings, slug, source,
                                                       actor.login)
        _require_cover(actor, edition)
        if changed:
            _record(session, actor, request, "edition.save", f"edition:{edition.id}",
                    slug=edition.slug, sha256=edition.source_sha256)
        return edition.id, changed

    try:
        eid, changed = await w.run(work)
    except EditionError as exc:
        return _page(request, actor, "edition_form.html.j2", 400, title="Fix the edition",
                     slug=slug, source=source, problems=_problems(exc), action=action)
    except (MailerError, SubscriberError) as exc:
        hint = getattr(exc, "hint", None)
        return _page(request, actor, "edition_form.html.j2", 400, title="Fix the edition",
                     slug=slug, source=source, problems=[str(exc)] + ([hint] if hint else []),
                     action=action)
    return _see_other(request, f"/admin/editions/{eid}",
                      "Saved. Check the preview below." if changed else "No change.")


@router.post("/editions/new")
async def edition_upload(request: Request) -> Response:
    actor = await _actor(request, Permission.EDITIONS_EDIT)
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
    return await _save_source(request, actor, slug, source.replace("\r\n", "\n"),
                              "/admin/editions/new")


@router.get("/editions/{eid}")
async def edition_view(request: Request, eid: int) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    c = console(request)

    def work(session: Session) -> dict[str, Any]:
        edition = _scoped_edition(session, actor, eid)
        compiled = CompiledEdition.from_dict(edition.compiled)
        page = personalise(compiled, Recipient(email="reader@example.org", name="Preview Reader"),
                           _preview_urls(c.settings, edition.slug))
        p = outbox.progress(session, edition)
        return {"e": edition, "text": page.text, "warnings": preflight(compiled),
                "audience": outbox.audience_breakdown(session, edition), "progress": p,
                "covers": actor.covers(edition.regions)}

    view = await public.web(request).run(work)
    return _page(request, actor, "edition.html.j2", title=view["e"].title, **view,
                 notice=_notice(request), now_local=dt.datetime.now(c.zone))


def _preview_urls(settings: Settings, slug: str) -> RecipientUrls:
    # Not real tokens: a preview must never carry a link that acts for a subscriber.
    base = settings.base_url
    return RecipientUrls(unsubscribe=f"{base}/unsubscribe/preview",
                         preferences=f"{base}/preferences/preview",
                         view_online=f"{base}/archive/{slug}")


@router.get("/editions/{eid}/preview.html")
async def edition_preview(request: Request, eid: int) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    c = console(request)

    def work(session: Session) -> str:
        edition = _scoped_edition(session, actor, eid)
        compiled = CompiledEdition.from_dict(edition.compiled)
        return personalise(compiled, Recipient(email="reader@example.org",
                                               name="Preview Reader"),
                           _preview_urls(c.settings, edition.slug)).html

    html = await public.web(request).run(work)
    return HTMLResponse(html, headers={"Content-Security-Policy": PREVIEW_CSP,
                                       "X-Frame-Options": "SAMEORIGIN"})


@router.get("/editions/{eid}/edit")
async def edition_edit_form(request: Request, eid: int) -> HTMLResponse:
    actor = await _actor(request, Permission.EDITIONS_EDIT)
    edition = await public.web(request).run(lambda s: _scoped_edition(s, actor, eid))
    return _page(request, actor, "edition_form.html.j2", title=f"Edit {edition.slug}",
                 slug=edition.slug, source=edition.source, problems=[],
                 action=f"/admin/editions/{eid}/edit", fixed_slug=True)


@router.post("/editions/{eid}/edit")
async def edition_edit(request: Request, eid: int) -> Response:
    actor = await _actor(request, Permission.EDITIONS_EDIT)
    form = await _form(request)
    value = form.get("source")
    source = value.replace("\r\n", "\n") if isinstance(value, str) else ""
    slug = (await public.web(request).run(lambda s: _scoped_edition(s, actor, eid))).slug
    return await _save_source(request, actor, slug, source, f"/admin/editions/{eid}/edit")


async def _edition_step(request: Request, eid: int, permission: Permission,
                        step: Callable[[Session, Actor, Edition, FormData], str],
                        cover: bool = True) -> Response:
    actor = await _actor(request, permission)
    form = await _form(request)

    def work(session: Session) -> str:
        edition = _scoped_edition(session, actor, eid)
        if cover:
            _require_cover(actor, edition)
        return step(session, actor, edition, form)

    try:
        notice = await public.web(request).run(work)
    except outbox.ApprovalRefused as exc:
        # The attempt's own transaction was rolled back; a refused self-approval is still a
        # step of the edition's history, so it is logged on its own.
        reason = str(exc)
        await public.web(request).run(lambda s: _record(
            s, actor, request, "edition.approve_refused", f"edition:{eid}", reason=reason))
        raise Refusal(403, "You cannot approve this edition", str(exc).capitalize() + ".",
                      (exc.hint or "").capitalize()) from None
    except MailerError as exc:
        raise Refusal(409, "That cannot be done now", str(exc).capitalize() + ".",
                      (exc.hint or "").capitalize()) from None
    return _see_other(request, f"/admin/editions/{eid}", notice)


@router.post("/editions/{eid}/test-send")
async def edition_test_send(request: Request, eid: int) -> Response:
    actor = await _actor(request, Permission.EDITIONS_EDIT)
    await _form(request)
    c, w = console(request), public.web(request)
    if not actor.email:
        raise Refusal(400, "No address for you", "Your account has no email address for test "
                      "sends. Ask an administrator to add one.")
    edition = await w.run(lambda s: _scoped_edition(s, actor, eid))
    try:
        result = await run_in_threadpool(_send_test, c.settings, edition, actor)
    except MailerError as exc:  # the message could not be built (a header refused) or sent
        problem = str(exc)
        await w.run(lambda s: _record(s, actor, request, "edition.test_send", f"edition:{eid}",
                                      to=actor.email, outcome="refused", reason=problem))
        raise Refusal(409, "The test message could not be made",
                      problem.capitalize() + ".") from None

    def work(session: Session) -> None:
        _record(session, actor, request, "edition.test_send", f"edition:{eid}",
                to=actor.email, outcome=str(result.outcome), code=result.code)

    await w.run(work)
    if str(result.outcome) != "sent":
        raise Refusal(502, "The test message was not sent",
                      f"The mail relay answered: {result.reply}")
    return _see_other(request, f"/admin/editions/{eid}",
                      f"A test copy was sent to {actor.email}.")


def _send_test(settings: Settings, edition: Edition, actor: Actor) -> Any:
    from mailer.outgoing import send_now
    from mailer.reference import message_id
    from mailer.render import build_message

    assert actor.email
    compiled = CompiledEdition.from_dict(edition.compiled)
    reader = Recipient(email=actor.email, name=actor.name)
    domain = settings.from_address.rpartition("@")[2]
    data = build_message(compiled, reader, _preview_urls(settings, edition.slug),
                         message_id=message_id(settings.secret(), edition.id, 0, domain))
    return send_now(settings, actor.email, data)


@router.post("/editions/{eid}/request-approval")
async def edition_request_approval(request: Request, eid: int) -> Response:
    def step(session: Session, actor: Actor, edition: Edition, form: FormData) -> str:
        if outbox.request_approval(session, edition, actor.login):
            _record(session, actor, request, "edition.request_approval", f"edition:{eid}",
                    sha256=edition.source_sha256)
        return "Approval requested: another co-ordinator must now approve it."

    return await _edition_step(request, eid, Permission.EDITIONS_EDIT, step)


@router.post("/editions/{eid}/approve")
async def edition_approve(request: Request, eid: int) -> Response:
    def step(session: Session, actor: Actor, edition: Edition, form: FormData) -> str:
        if outbox.approve(session, edition, actor.login):
            _record(session, actor, request, "edition.approve", f"edition:{eid}",
                    sha256=edition.source_sha256, author=edition.created_by,
                    requested_by=edition.approval_requested_by)
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

    def step(session: Session, actor: Actor, edition: Edition, form: FormData) -> str:
        when = _when(form, c.zone)
        outbox.schedule(session, edition, actor.login, when.astimezone(dt.UTC))
        _record(session, actor, request, "edition.schedule", f"edition:{eid}",
                at=when.astimezone(dt.UTC).isoformat())
        return f"Scheduled for {_local(c, when)}."

    return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)


@router.post("/editions/{eid}/send")
async def edition_send(request: Request, eid: int) -> Response:
    def step(session: Session, actor: Actor, edition: Edition, form: FormData) -> str:
        if _text(form, "confirm") != "yes":
            raise MailerError("tick the box to confirm that it should go now")
        added = outbox.send_approved(session, edition, actor.login)
        _record(session, actor, request, "edition.send", f"edition:{eid}", queued=added)
        return f"Sending: {added} message(s) queued."

    return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)


def _control(target: EditionStatus, action: str, done: str) -> Any:
    async def route(request: Request, eid: int) -> Response:
        def step(session: Session, actor: Actor, edition: Edition, form: FormData) -> str:
            if outbox.set_status(session, edition, target, reason=f"by {actor.login}"
                                 if target == EditionStatus.PAUSED else None):
                _record(session, actor, request, f"edition.{action}", f"edition:{eid}")
            return done

        return await _edition_step(request, eid, Permission.EDITIONS_SEND, step)

    route.__name__ = f"edition_{action}"
    return route


router.post("/editions/{eid}/pause")(_control(EditionStatus.PAUSED, "pause", "Paused."))
router.post("/editions/{eid}/resume")(_control(EditionStatus.SENDING, "resume", "Resumed."))
router.post("/editions/{eid}/cancel")(_control(EditionStatus.CANCELLED, "cancel",
                                               "Cancelled: nothing more will be sent."))


@router.get("/editions/{eid}/progress")
async def edition_progress(request: Request, eid: int) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    c = console(request)

    def work(session: Session) -> tuple[Edition, outbox.Progress]:
        edition = _scoped_edition(session, actor, eid)
        return edition, outbox.progress(session, edition)

    edition, p = await public.web(request).run(work)
    live = p.status in LIVE
    return _page(request, actor, "progress.html.j2", title=f"Sending {edition.slug}",
                 headers={"Content-Security-Policy": PROGRESS_CSP} if live else None,
                 e=edition, p=p, eta=_eta(c.settings, p.remaining), live=live,
                 updated=dt.datetime.now(c.zone).strftime("%H:%M:%S"))


@router.get("/editions/{eid}/progress.json")
async def edition_progress_json(request: Request, eid: int) -> Response:
    """The progress page's figures, for its script to update the table in place."""
    actor = await _actor(request, Permission.VIEW)
    c = console(request)

    def work(session: Session) -> outbox.Progress:
        return outbox.progress(session, _scoped_edition(session, actor, eid))

    p = await public.web(request).run(work)
    return JSONResponse({"status": str(p.status), "counts": p.counts, "total": p.total,
                         "ambiguous": p.ambiguous, "remaining": p.remaining,
                         "eta": _eta(c.settings, p.remaining), "live": p.status in LIVE,
                         "updated": dt.datetime.now(c.zone).strftime("%H:%M:%S")})


# ---------------------------------------------------------------- bounces and alerts

RECENT_BOUNCES = 50
BOUNCE_KINDS = ("hard", "soft", "complaint")
# A co-ordinator's list is filtered after reading (a record's region is its subscriber's):
# read this many so that a region with few bounces among many still fills its page.
SCOPED_READ = 500
ALERTS_SHOWN = 10


@dataclass(frozen=True)
class AlertView:
    """An open bounce alert as the console shows it, with whether this actor may close it."""

    id: int
    kind: str
    domain: str
    edition_id: int | None
    edition: str | None  # its slug, when the edition still exists
    regions: tuple[str, ...]  # the edition's audience; every region when it has none
    recipients: int
    bounced: int
    share: float
    detail: str
    created_at: dt.datetime
    updated_at: dt.datetime
    can_resolve: bool


def _alert_regions(session: Session, edition_id: int | None,
                   every_region: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The regions an alert is about (its send's audience) and the send's slug. A send to
    every region, or one that is gone, is everyone's: only who covers every region closes it."""
    if edition_id is None:
        return every_region, None
    try:
        edition = outbox.get_edition(session, edition_id)
    except MailerError:
        return every_region, None
    return tuple(edition.regions or every_region), edition.slug


# Closing a bounce alert may mark subscribers bounced: the permission that changes subscribers.
RESOLVE_ALERT = Permission.SUBSCRIBERS_EDIT


class AlertOutsideRegions(Exception):
    """The actor does not cover every region a bounce alert is about."""

    def __init__(self, regions: tuple[str, ...]) -> None:
        super().__init__(f"this alert is about a send to {', '.join(regions)}, outside your "
                         "regions")
        self.regions = regions


def resolve_bounce_alert(session: Session, policy: BouncePolicy, actor: Actor, aid: int, *,
                         apply: bool, every_region: tuple[str, ...], via: str,
                         ip: str | None) -> tuple[bounce_policy.BounceAlert, int]:
    """Apply or dismiss one bounce alert for the console and the API alike, with its audit
    entry; returns the alert and how many subscribers it marked bounced. Raises NotFound for
    an unknown alert, AlertOutsideRegions when the actor does not cover its audience, and
    MailerError when it was resolved already. The caller has checked RESOLVE_ALERT."""
    # Locked (FOR UPDATE on PostgreSQL) so that two people closing it at once are one
    # resolution: the second waits, then finds it closed.
    alert = session.get(bounce_policy.BounceAlert, aid, with_for_update=True)
    if alert is None:
        raise NotFound(f"no bounce alert {aid}")
    regions, _slug = _alert_regions(session, alert.edition_id, every_region)
    if not actor.covers(regions):
        raise AlertOutsideRegions(regions)
    changed = bounce_policy.resolve_alert(session, policy, aid, actor.login, apply=apply)
    audit.record(session, actor=actor.login, actor_name=actor.name, via=via, ip=ip,
                 action=f"bounce_alert.{'apply' if apply else 'dismiss'}",
                 target=f"bounce_alert:{aid}",
                 detail={"kind": alert.kind, "domain": alert.domain,
                         "edition_id": alert.edition_id, "marked_bounced": changed})
    return alert, changed


def _open_alerts(session: Session, actor: Actor, every_region: tuple[str, ...]
                 ) -> list[AlertView]:
    # Everyone signed in sees them all (a domain and counts, no one's address): a Kent
    # co-ordinator should know that Essex's mail is bouncing, though only Essex's may act.
    views = []
    for a in bounce_policy.open_alerts(session):
        regions, slug = _alert_regions(session, a.edition_id, every_region)
        views.append(AlertView(
            id=a.id, kind=a.kind, domain=a.domain, edition_id=a.edition_id, edition=slug,
            regions=regions, recipients=a.recipients or 0, bounced=a.bounced or 0,
            share=a.share or 0.0, detail=a.detail, created_at=a.created_at,
            updated_at=a.updated_at,
            can_resolve=actor.can(RESOLVE_ALERT) and actor.covers(regions)))
    return views


@dataclass(frozen=True)
class ToldView:
    """One alert to the co-ordinators (`mailer.alerts`) and how far its mailing got."""

    id: int
    subject: str
    kind: str
    regions: tuple[str, ...]  # empty: about every region
    created_at: dt.datetime
    mailed: bool  # to everyone it was for
    mailed_to: int  # how many addresses took it
    state: str  # how far the mailing got, in words
    last_error: str | None  # why it is not mailed to everyone yet


def _coordinator_alerts(session: Session, actor: Actor, now: dt.datetime,
                        limit: int = ALERTS_SHOWN) -> list[ToldView]:
    # As they are mailed: a co-ordinator sees the alerts about their regions and those about
    # every region, not another region's.
    mine = set(actor.regions) if actor.regions is not None else None
    read = limit if mine is None else max(limit, SCOPED_READ)
    rows = [a for a in alerts.recent(session, read)
            if mine is None or not a.regions or mine & set(a.regions)][:limit]
    return [ToldView(id=a.id, subject=a.subject, kind=a.kind, regions=tuple(a.regions or ()),
                     created_at=a.created_at, mailed=a.mailed_at is not None,
                     mailed_to=len(a.mailed_to or []), state=_mailing(a, now),
                     last_error=a.last_error if a.mailed_at is None else None)
            for a in rows]


def _mailing(alert: alerts.CoordinatorAlert, now: dt.datetime) -> str:
    got = len(alert.mailed_to or [])
    if alert.mailed_at is not None:
        return f"Mailed to {got}"
    so_far = f", {got} got it" if got else ""
    if alert.created_at < now - alerts.MAIL_FOR:  # `mail_pending` tries no longer
        return f"Not mailed to everyone{so_far}: no longer tried after {alerts.MAIL_FOR.days} days"
    if not alert.attempts:
        return "Waiting to be mailed"
    return f"Not mailed to everyone yet{so_far} ({alert.attempts} attempt(s)); tried again soon"


@dataclass(frozen=True)
class BounceRow:
    """One inbound bounce or complaint on the Bounces page."""

    row: bounce_policy.Row
    edition: str | None
    subscriber: str | None  # the address, or None when it names nobody (or they were erased)


def _recent_bounces(session: Session, actor: Actor, every_region: tuple[str, ...]
                    ) -> tuple[list[BounceRow], int]:
    """The latest bounces and complaints this actor may see, and how many were left out.

    A record is in a co-ordinator's scope when its subscriber is in their regions. One that
    names nobody (unmatched) or someone erased cannot be placed in a region: as with the
    import, only who covers every region sees those."""
    everywhere = actor.covers(every_region)
    rows = bounce_policy.recent(session, RECENT_BOUNCES if everywhere else SCOPED_READ,
                                kinds=BOUNCE_KINDS)
    slugs: dict[int, str | None] = {}
    found: dict[int, Any] = {}
    shown: list[BounceRow] = []
    hidden = 0
    for r in rows:
        person = None
        if r.subscriber_id is not None:
            if r.subscriber_id not in found:
                found[r.subscriber_id] = store.find(session, r.subscriber_id)
            person = found[r.subscriber_id]
        visible = (actor.regions is None or (person.region in actor.regions if person
                                             is not None else everywhere))
        if not visible:
            hidden += 1
            continue
        if len(shown) < RECENT_BOUNCES:
            shown.append(BounceRow(r, _slug(session, slugs, r.edition_id),
                                   person.email if person is not None else None))
    return shown, hidden


def _slug(session: Session, cache: dict[int, str | None], edition_id: int | None) -> str | None:
    if edition_id is None:
        return None
    if edition_id not in cache:
        try:
            cache[edition_id] = outbox.get_edition(session, edition_id).slug
        except MailerError:  # the record outlives the edition
            cache[edition_id] = None
    return cache[edition_id]


@router.get("/bounces")
async def bounces_page(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    every_region = tuple(public.web(request).rules.regions)

    def work(session: Session) -> dict[str, Any]:
        rows, hidden = _recent_bounces(session, actor, every_region)
        return {"rows": rows, "hidden": hidden,
                "bounce_alerts": _open_alerts(session, actor, every_region)}

    view = await public.web(request).run(work)
    return _page(request, actor, "bounces.html.j2", title="Bounces and complaints", **view,
                 notice=_notice(request), back="/admin/bounces")


@router.post("/bounces/alerts/{aid}/resolve")
async def bounce_alert_resolve(request: Request, aid: int) -> Response:
    """`mailer bounces resolve ID --apply|--dismiss` from the console."""
    actor = await _actor(request, RESOLVE_ALERT)
    form = await _form(request)
    c, w = console(request), public.web(request)
    resolution = _text(form, "resolution", 20)
    if resolution not in ("apply", "dismiss"):
        raise Refusal(400, "Choose what to do with the alert",
                      "Apply the held bounces, or dismiss them.")
    back = "/admin/bounces" if _text(form, "back", 40) == "/admin/bounces" else "/admin"
    every_region = tuple(w.rules.regions)
    try:
        policy = BouncePolicy.from_settings(c.settings)
    except MailerError as exc:
        raise Refusal(500, "The bounce settings are wrong", str(exc).capitalize() + ".",
                      (exc.hint or "").capitalize()) from None

    def work(session: Session) -> str:
        apply = resolution == "apply"
        try:
            alert, changed = resolve_bounce_alert(session, policy, actor, aid, apply=apply,
                                                  every_region=every_region, via="console",
                                                  ip=_ip(request))
        except NotFound:
            raise Refusal(404, "No such alert", "There is no open bounce alert with that "
                          "number. It may have been removed after its retention period.") from None
        except AlertOutsideRegions as exc:
            raise Refusal(403, "This alert is outside your regions",
                          f"It is about a send to {', '.join(exc.regions)}; you can act only "
                          f"for {', '.join(actor.regions or ())}. Ask a co-ordinator who covers "
                          "all of its audience.") from None
        if apply:
            return (f"Alert {aid} applied: {changed} subscriber(s) at {alert.domain} marked "
                    "bounced.")
        return f"Alert {aid} dismissed: the held bounces from {alert.domain} change nobody."

    try:
        notice = await w.run(work)
    except MailerError as exc:  # resolved a moment ago by someone else
        raise Refusal(409, "That cannot be done now", str(exc).capitalize() + ".",
                      (exc.hint or "").capitalize()) from None
    return _see_other(request, back, notice)


# ---------------------------------------------------------------- events

@router.get("/events")
async def events_page(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.VIEW)
    c = console(request)

    def work(session: Session) -> dict[str, Any]:
        now = utcnow()
        today = now.astimezone(c.zone).date()
        rows = [(e, events.next_occurrence(e, today)) for e in events.list_events(session)]
        return {"calendar": rows,
                "reminders": events.upcoming(session, now, now + dt.timedelta(days=400))[:30]}

    view = await public.web(request).run(work)
    return _page(request, actor, "events.html.j2", title="Events and reminders", **view)


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
    actor = await _actor(request, Permission.AUDIT_VIEW)
    q = request.query_params
    flt = audit.AuditFilter(actor=(q.get("actor") or "")[:100] or None,
                            action=(q.get("action") or "")[:60] or None,
                            target=(q.get("target") or "")[:160] or None,
                            since=_day(q.get("since")), until=_day(q.get("until"), end=True))
    page = _int(q.get("page"))

    def work(session: Session) -> tuple[int, list[Any], list[str]]:
        total, rows = audit.entries(session, flt, limit=PAGE, offset=page * PAGE)
        return total, list(rows), audit.actions(session)

    total, rows, known = await public.web(request).run(work)
    query = {k: v for k, v in q.items() if k != "page"}
    return _page(request, actor, "audit.html.j2", title="Audit log", rows=rows, total=total,
                 page=page, pages=(total + PAGE - 1) // PAGE, flt=flt, actions=known,
                 since=q.get("since", ""), until=q.get("until", ""), query=urlencode(query))


# ---------------------------------------------------------------- users (read-only here)

@router.get("/users")
async def users_page(request: Request) -> HTMLResponse:
    actor = await _actor(request, Permission.USERS_MANAGE)
    rows = await public.web(request).run(lambda s: list(accounts.list_users(s)))
    return _page(request, actor, "users.html.j2", title="Users", rows=rows)
