"""The recipient pages: subscribe, confirm, unsubscribe (RFC 8058 one-click), preferences,
manage-by-email, archive, health.

Rules every route keeps:
- a GET never changes anything (Microsoft 365 and other scanners fetch every link in a mail);
- every form POST carries the CSRF token, except `/u/{token}`, the one-click target, whose
  token in the URL is the capability (RFC 8058 forbids the sender relying on cookies);
- answers never reveal whether an address is known: subscribe and manage always show the same
  page and send any mail after the response, so timing says nothing either;
- all URLs are built from `settings.base_url`, never from the Host header;
- bad input gets a clear 4xx page; a bad unsubscribe token gets the same generic 200 page.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from mailer import outbox
from mailer.config import Settings
from mailer.links import tokens_for
from mailer.web.archive import Archive
from mailer.web.mail import Mailer, Outgoing
from mailer.web.security import CSRF_FIELD, Csrf, bucket, network_of
from subscribers import store
from subscribers.db import session_scope, utcnow
from subscribers.errors import InvalidInput, SubscriberError
from subscribers.models import Channel, Subscriber, SubscriberStatus
from subscribers.rules import Rules
from subscribers.store import Context, SubscribeOutcome
from subscribers.tokens import Claims, InvalidToken, Purpose, Tokens
from subscribers.validation import is_trusted_domain

T = TypeVar("T")
DAY = dt.timedelta(days=1)
FIELDS = ("email", "name", "organisation", "organisation_type", "role", "region")
UNDO_WINDOW = dt.timedelta(days=1)

router = APIRouter()


@dataclass
class Web:
    """Everything the routes share, built once by `create_app`."""

    settings: Settings
    rules: Rules
    sessions: sessionmaker[Session]
    tokens: Tokens
    csrf: Csrf
    mailer: Mailer
    pages: jinja2.Environment
    archive: Archive
    rate_key: bytes
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
        secret = settings.secret()
        return cls(settings=settings, rules=settings.rules(), sessions=sessions,
                   executor=ThreadPoolExecutor(db_threads, thread_name_prefix="db"),
                   turns=SqliteTurns.for_url(settings.database) or contextlib.nullcontext(),
                   tokens=tokens_for(settings),
                   csrf=Csrf(secret, settings.base_url), mailer=Mailer(settings), pages=pages,
                   archive=Archive(settings), rate_key=settings.suppression_secret())

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}{path}"

    def ctx(self, request: Request, channel: Channel = Channel.WEB) -> Context:
        return Context(channel=channel, ip=request.client.host if request.client else None,
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

    def allowed(self, session: Session, kind: str, value: str, limit: int,
                window: dt.timedelta) -> bool:
        return store.count_events(session, bucket(self.rate_key, kind, value),
                                  utcnow() - window) < limit

    def may_mail(self, session: Session, kind: str, key: str, network: str) -> bool:
        """The per-address caps (≤ 1 a day, ≤ 3 a month by default) and the per-network cap;
        when the mail may go, it is counted now, in the same transaction."""
        s = self.settings
        store.hold(session, bucket(self.rate_key, kind, key),
                   bucket(self.rate_key, "netmail", network))  # count and add as one step
        ok = (self.allowed(session, kind, key, s.signup_mails_per_day, DAY)
              and self.allowed(session, kind, key, s.signup_mails_per_month, 30 * DAY)
              and self.allowed(session, "netmail", network, s.mails_per_network_day, DAY))
        if ok:
            store.record_event(session, bucket(self.rate_key, kind, key),
                               bucket(self.rate_key, "netmail", network))
        return ok


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
    return request.app.state.web


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


async def read_form(request: Request) -> FormData:
    """The posted fields; no files, few fields, small parts: nothing here needs more."""
    try:
        return await request.form(max_files=0, max_fields=40, max_part_size=8192)
    except HTTPException:
        raise
    except Exception:  # python-multipart's own errors on malformed bodies
        raise HTTPException(400, "The form data could not be read.") from None


def csrf_refusal(request: Request, form: FormData) -> HTMLResponse | None:
    value = form.get(CSRF_FIELD)
    problem = web(request).csrf.problem(request.headers, request.cookies,
                                        value if isinstance(value, str) else None)
    if problem is None:
        return None
    return message(request, "This form could not be accepted",
                   f"For your security we could not accept this form: {problem}.",
                   "Go back, reload the page and try again. The page needs cookies enabled.",
                   status=403)


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _too_many(request: Request) -> HTMLResponse:
    response = message(request, "Too many requests",
                       "We have had a lot of requests from your network. Please try again "
                       "in an hour.", status=429)
    response.headers["Retry-After"] = "3600"
    return response


# ---------------------------------------------------------------- health

@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request) -> Response:
    try:
        ok = await web(request).run(store.ping)
    except Exception:
        ok = False
    return JSONResponse({"status": "ok" if ok else "unavailable",
                         "database": "ok" if ok else "unreachable"},
                        status_code=200 if ok else 503)


@router.get("/static/site.css", include_in_schema=False)
async def stylesheet(request: Request) -> Response:
    return Response(request.app.state.css, media_type="text/css",
                    headers={"Cache-Control": "public, max-age=3600"})


# ---------------------------------------------------------------- subscribe

def _subscribe_page(request: Request, topics: list[Any], values: dict[str, Any],
                    errors: dict[str, str] | None = None, status: int = 200) -> HTMLResponse:
    return render(request, "subscribe.html.j2", status, title="Subscribe",
                  **_form_context(web(request), topics, values, errors or {}))


async def _topics(w: Web) -> list[Any]:
    if not w.topics_cache:
        rows = await w.run(lambda s: [(t.slug, t.name, t.description)
                                      for t in store.list_topics(s)])
        w.topics_cache = [{"slug": a, "name": b, "description": c} for a, b, c in rows]
    return w.topics_cache


def _blank() -> dict[str, Any]:
    return {**dict.fromkeys(FIELDS, ""), "topics": ["newsletter"], "consent": False}


@router.get("/", include_in_schema=False)
@router.get("/subscribe")
async def subscribe_form(request: Request) -> HTMLResponse:
    return _subscribe_page(request, await _topics(web(request)), _blank())


def _check_inbox(request: Request, background: BackgroundTask | None = None) -> HTMLResponse:
    return message(
        request, "Check your inbox",
        "If the address you gave can subscribe, we have sent it an email. Open the link in it "
        "and press the button on that page to confirm.",
        "The email can take a few minutes to arrive; check your junk folder too. If you are "
        "already subscribed we will tell you so by email instead.",
        "Addresses that are not on a police, government or NHS domain are checked by a "
        "co-ordinator after you confirm.",
        links=[("Back to the subscribe page", web(request).url("/subscribe"))],
        background=background)


@router.post("/subscribe")
async def subscribe_post(request: Request) -> HTMLResponse:
    w = web(request)
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    topics = await _topics(w)
    values = {name: text(form, name).strip() for name in FIELDS}
    values["topics"] = [v for v in form.getlist("topics") if isinstance(v, str)][:10]
    values["consent"] = text(form, "consent") == w.settings.consent_version
    honeypot = bool(text(form, "website"))
    network = network_of(request.client.host if request.client else None)
    ctx = w.ctx(request)

    def work(session: Session) -> tuple[str, Any]:
        if not w.allowed(session, "post", network, w.settings.posts_per_network_hour,
                         dt.timedelta(hours=1)):
            return "limited", None
        store.record_event(session, bucket(w.rate_key, "post", network))
        if honeypot:  # a bot: answer exactly as for a person, do nothing else
            return "ok", []
        errors: dict[str, str] = {}
        profile = None
        try:
            profile = store.profile_from(w.rules, **{n: values[n] or None for n in FIELDS})
        except InvalidInput as exc:
            errors[exc.field] = str(exc)
        chosen = []
        try:
            chosen = store.topics_by_slug(session, values["topics"])
        except SubscriberError:
            errors["topics"] = "choose from the topics listed"
        if not chosen and "topics" not in errors:
            errors["topics"] = "choose at least one topic"
        if not values["consent"]:
            errors["consent"] = "tick the box to agree, so that we may send you the newsletter"
        if errors or profile is None:
            return "invalid", errors
        subscriber, outcome = store.subscribe(session, w.rules, profile, chosen, ctx)
        if not w.may_mail(session, "signup", profile.key, network):
            return "ok", []
        return "ok", [_signup_mail(w, subscriber, outcome, [t.name for t in chosen])]

    status, result = await w.run(work)
    if status == "limited":
        return _too_many(request)
    if status == "invalid":
        return _subscribe_page(request, topics, values, result, 400)
    return _check_inbox(request, send_later(w, result))


def _form_context(w: Web, topics: list[Any], values: dict[str, Any],
                  errors: dict[str, str]) -> dict[str, Any]:
    order = [*FIELDS, "topics", "consent"]
    return {"topics": topics, "values": values,
            "selects": [("organisation_type", "Type of organisation", w.rules.organisation_types),
                        ("role", "Your role", w.rules.roles),
                        ("region", "Where you work", w.rules.regions)],
            "consent_version": w.settings.consent_version,
            "consent_wording": w.settings.consent_wording,
            "errors": {k: _sentence(errors[k]) for k in order if k in errors}}


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


def _signup_mail(w: Web, subscriber: Subscriber, outcome: SubscribeOutcome,
                 topic_names: list[str]) -> Outgoing:
    assert subscriber.email is not None
    if outcome in (SubscribeOutcome.ALREADY_ACTIVE, SubscribeOutcome.AWAITING_APPROVAL):
        return Outgoing(subscriber.email, "already_subscribed", {
            "awaiting": outcome == SubscribeOutcome.AWAITING_APPROVAL,
            "preferences_url": w.url(f"/preferences/{w.tokens.manage(subscriber.id)}")})
    return Outgoing(subscriber.email, "confirm", {
        "confirm_url": w.url(f"/confirm/{w.tokens.confirm(subscriber.id)}"),
        "confirm_days": w.settings.confirm_link_days,
        "topics": ", ".join(topic_names),
        "trusted": is_trusted_domain(w.rules, subscriber.email)})


# ---------------------------------------------------------------- confirm

def _bad_link(request: Request, exc: InvalidToken, again: str = "/subscribe",
              again_text: str = "Subscribe again") -> HTMLResponse:
    first = ("This link has expired." if exc.expired
             else "This link is not valid. It may have been copied incompletely.")
    return message(request, "This link does not work", first,
                   links=[(again_text, web(request).url(again))], status=400)

async def checked_form(request: Request) -> FormData | HTMLResponse:
    """The posted form once it passes the CSRF check, or the page that refuses it."""
    form = await read_form(request)
    return csrf_refusal(request, form) or form


async def _link_form(request: Request, purpose: Purpose, token: str, again: str = "/subscribe",
                     again_text: str = "Subscribe again"
                     ) -> tuple[FormData, Claims] | HTMLResponse:
    """A form posted from a link's page: CSRF-checked, with the link's claims."""
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    try:
        return form, web(request).tokens.read(purpose, token)
    except InvalidToken as exc:
        return _bad_link(request, exc, again, again_text)



@router.get("/confirm/{token}")
async def confirm_page(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    try:
        w.tokens.read(Purpose.CONFIRM, token)
    except InvalidToken as exc:
        return _bad_link(request, exc)
    return render(request, "confirm.html.j2", title="Confirm your subscription",
                  action=w.url(f"/confirm/{token}"))


@router.post("/confirm/{token}")
async def confirm_post(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    checked = await _link_form(request, Purpose.CONFIRM, token)
    if isinstance(checked, HTMLResponse):
        return checked
    _form, claims = checked
    ctx = w.ctx(request)

    def work(session: Session) -> str | None:
        subscriber = store.find(session, claims.subscriber_id)
        if subscriber is None:
            return None
        return str(store.confirm(session, w.rules, subscriber, ctx))

    status = await w.run(work)
    if status == SubscriberStatus.ACTIVE:
        return message(request, "You are subscribed",
                       "Thank you: your address is confirmed and you will receive the next "
                       "newsletter.", links=[("Past newsletters", w.url("/archive"))])
    if status == SubscriberStatus.AWAITING_APPROVAL:
        return message(request, "Thank you, your address is confirmed",
                       "Because your address is not on a police, government or NHS domain, a "
                       "co-ordinator will check your sign-up before we send you anything. You "
                       "do not need to do anything else.")
    return message(request, "This sign-up is no longer waiting",
                   "This link was for a sign-up that has since been cancelled or finished.",
                   links=[("Subscribe again", w.url("/subscribe"))], status=400)


# ---------------------------------------------------------------- unsubscribe (RFC 8058)

def _unsubscribed_generic(request: Request) -> HTMLResponse:
    """The one answer to every unusable unsubscribe token: 200, no detail (no oracle), and a
    way to reach us, since a mailbox provider reads a non-2xx as a broken unsubscribe."""
    w = web(request)
    return message(request, "Unsubscribe",
                   "If this address was subscribed, it will not receive any more mail from "
                   "this link's list.",
                   f"If you keep receiving mail, ask for a new link below or write to "
                   f"{w.settings.contact_address}.",
                   links=[("Manage your subscription by email", w.url("/manage"))])


@router.get("/u/{token}")
async def unsubscribe_page(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    try:
        claims = w.tokens.read(Purpose.UNSUBSCRIBE, token)
    except InvalidToken as exc:
        return _bad_link(request, exc, "/manage", "Get a new link by email")

    def work(session: Session) -> tuple[bool, Any]:
        subscriber = store.find(session, claims.subscriber_id)
        topic = store.topic_by_id(session, claims.topic_id) if claims.topic_id else None
        return subscriber is not None, ({"name": topic.name} if topic else None)

    known, topic = await w.run(work)
    if not known:
        return _unsubscribed_generic(request)
    return render(request, "unsubscribe.html.j2", title="Unsubscribe", topic=topic,
                  action=w.url(f"/u/{token}"),
                  preferences_url=w.url(f"/preferences/{w.tokens.manage(claims.subscriber_id)}"))


def _bare_page(title: str, text: str) -> bytes:
    return (f'<!doctype html><html lang="en-GB"><head><meta charset="utf-8"><title>{title}'
            f"</title></head><body><main><h1>{title}</h1><p>{text}</p></main></body></html>"
            ).encode()


# What a mailbox provider's one-click POST gets back. RFC 8058 shows its answer to nobody, so it
# need not be the page a person sees: no template, no CSRF cookie or token, no personal link.
# The same two bodies for everyone (done, or a token that names nobody), so they say nothing
# about any address; a person who presses the button on our page still gets the full page.
_ONE_CLICK_DONE = _bare_page("You are unsubscribed",
                             "This address will not receive any more mail from this list.")
_ONE_CLICK_UNKNOWN = _bare_page("Unsubscribe", "If this address was subscribed, it will not "
                                "receive any more mail from this link's list.")


def _one_click_answer(known: bool) -> Response:
    return Response(_ONE_CLICK_DONE if known else _ONE_CLICK_UNKNOWN,
                    media_type="text/html; charset=utf-8")


async def unsubscribe_post(request: Request) -> Response:
    """The one-click target: no cookie, no CSRF token, 200 and never a redirect. A post with
    `List-Unsubscribe=One-Click` (RFC 8058, from a mailbox provider) gets a short constant
    answer; the form on the unsubscribe page (`scope`) gets the full page with the undo button.

    A plain Starlette route that `create_app` puts ahead of the routers (see `FAST_ROUTES`).
    """
    w = web(request)
    token: str = request.path_params["token"]
    form = await read_form(request)
    one_click = text(form, "List-Unsubscribe") == "One-Click"
    try:
        claims = w.tokens.read(Purpose.UNSUBSCRIBE, token)
    except InvalidToken:
        return _one_click_answer(False) if one_click else _unsubscribed_generic(request)
    everything = text(form, "scope") == "all" or claims.topic_id is None
    ctx = w.ctx(request, Channel.ONE_CLICK if one_click else Channel.WEB)
    done = await w.run(lambda session: store.unsubscribe_ids(
        session, claims.subscriber_id, None if everything else claims.topic_id, ctx))
    if one_click:
        return _one_click_answer(done is not None)
    if done is None:
        return _unsubscribed_generic(request)
    what = (f"from {done.topic_name}" if done.topic_name
            else f"from everything {w.site_name} sends")
    return message(
        request, "You are unsubscribed", f"You have been unsubscribed {what}.",
        links=[("Manage your other preferences",
                w.url(f"/preferences/{w.tokens.manage(claims.subscriber_id)}"))],
        undo={"action": w.url(f"/u/{token}/undo"), "text": "Did you press it by mistake?",
              "button": "Subscribe me again"})


# Routes with nothing for FastAPI to validate or inject, served ahead of the routers: FastAPI's
# dependency solving and its two passes over the included routers' routes cost more than the
# one-click work itself.
FAST_ROUTES: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
    ("/u/{token}", unsubscribe_post, ["POST"])]


@router.post("/u/{token}/undo")
async def unsubscribe_undo(request: Request, token: str) -> HTMLResponse:
    """Undo an unsubscribe pressed by mistake. The token came in a mail to this address, which
    proves ownership as a confirmation mail would; a full re-subscribe is only offered for a
    day after leaving, and a bounced or complained address never comes back this way."""
    w = web(request)
    checked = await _link_form(request, Purpose.UNSUBSCRIBE, token)
    if isinstance(checked, HTMLResponse):
        return checked
    _form, claims = checked
    ctx = w.ctx(request)

    def work(session: Session) -> str:
        subscriber = store.find(session, claims.subscriber_id)
        if subscriber is None:
            return "gone"
        topic = store.topic_by_id(session, claims.topic_id) if claims.topic_id else None
        if subscriber.status == SubscriberStatus.ACTIVE and topic is not None:
            store.subscribe_topic(session, subscriber, topic, ctx)
            return "active"
        recent = subscriber.left_at is not None and utcnow() - subscriber.left_at < UNDO_WINDOW
        if subscriber.status != SubscriberStatus.UNSUBSCRIBED or not recent:
            return "gone" if subscriber.status != SubscriberStatus.ACTIVE else "active"
        assert subscriber.email and subscriber.email_key
        topics = [topic] if topic else store.list_topics(session)
        profile = store.Profile(email=subscriber.email, key=subscriber.email_key)
        subscriber, _ = store.subscribe(session, w.rules, profile, list(topics), ctx)
        return str(store.confirm(session, w.rules, subscriber, ctx))

    status = await w.run(work)
    if status == "active":
        return message(request, "You are subscribed again",
                       "Nothing is lost: you will keep receiving mail as before.")
    if status == SubscriberStatus.AWAITING_APPROVAL:
        return message(request, "You are subscribed again",
                       "A co-ordinator will approve your subscription again before we send "
                       "you anything.")
    return message(request, "Please subscribe again",
                   "This link can no longer restore your subscription. You can sign up again "
                   "on the subscribe page.", links=[("Subscribe", w.url("/subscribe"))])


# ---------------------------------------------------------------- preferences

def _months_from(now: dt.datetime, months: int) -> dt.datetime:
    month = now.month - 1 + months
    year, month = now.year + month // 12, month % 12 + 1
    day = min(now.day, 28)  # every month has a 28th; a pause need not be day-exact
    return now.replace(year=year, month=month, day=day, microsecond=0)


def _preferences_view(w: Web, session: Session, subscriber: Subscriber) -> dict[str, Any]:
    topics = [{"slug": t.slug, "name": t.name} for t in store.list_topics(session)]
    paused = subscriber.paused_until
    return {
        "email": subscriber.email, "state": str(subscriber.status), "topics": topics,
        "active": store.active_topics(session, subscriber.id),
        "selects": [("region", "Where you work", w.rules.regions, subscriber.region),
                    ("role", "Your role", w.rules.roles, subscriber.role)],
        "paused_until": (f"{paused.day} {paused:%B %Y}" if paused and paused > utcnow()
                         else None),
    }


def _not_active_page(request: Request, status: str | None) -> HTMLResponse:
    w = web(request)
    if status in (SubscriberStatus.PENDING, SubscriberStatus.AWAITING_APPROVAL):
        return message(request, "Your subscription is not active yet",
                       "Your sign-up is waiting to be confirmed or approved. You can change your "
                       "preferences once it is active.")
    return message(request, "You are not subscribed",
                   "This address is not subscribed at the moment.",
                   links=[("Subscribe", w.url("/subscribe"))])


@router.get("/preferences/{token}")
async def preferences_page(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    try:
        claims = w.tokens.read(Purpose.MANAGE, token)
    except InvalidToken as exc:
        return _bad_link(request, exc, "/manage", "Get a new link by email")

    def work(session: Session) -> dict[str, Any] | None:
        subscriber = store.find(session, claims.subscriber_id)
        return None if subscriber is None else _preferences_view(w, session, subscriber)

    view = await w.run(work)
    if view is None or view["state"] != SubscriberStatus.ACTIVE:
        return _not_active_page(request, view and view["state"])
    return render(request, "preferences.html.j2", title="Your preferences", **view,
                  action=w.url(f"/preferences/{token}"),
                  unsubscribe_url=w.url(f"/u/{w.tokens.unsubscribe(claims.subscriber_id)}"))


@router.post("/preferences/{token}")
async def preferences_post(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    checked = await _link_form(request, Purpose.MANAGE, token, "/manage", "Get a new link by email")
    if isinstance(checked, HTMLResponse):
        return checked
    form, claims = checked
    wanted = {v for v in form.getlist("topics") if isinstance(v, str)}
    pause = text(form, "pause") or "keep"
    if pause not in ("keep", "0", "1", "3", "6", "12"):
        raise HTTPException(400, "Choose a pause from the list.")
    ctx = w.ctx(request)
    fields = {name: text(form, name) or None for name in ("region", "role")}

    def work(session: Session) -> tuple[str, dict[str, Any] | None, dict[str, str]]:
        subscriber = store.find(session, claims.subscriber_id)
        if subscriber is None:
            return "gone", None, {}
        if subscriber.status != SubscriberStatus.ACTIVE:
            return str(subscriber.status), None, {}
        errors: dict[str, str] = {}
        try:
            store.update_profile(session, w.rules, subscriber, ctx, **fields)
        except InvalidInput as exc:
            errors[exc.field] = _sentence(str(exc))
        for topic in store.list_topics(session):
            if topic.slug in wanted:
                store.subscribe_topic(session, subscriber, topic, ctx)
            else:
                store.unsubscribe(session, subscriber, ctx, topic=topic)
        if pause != "keep":
            until = None if pause == "0" else _months_from(utcnow(), int(pause))
            store.pause(session, subscriber, ctx, until)
        return "ok", _preferences_view(w, session, subscriber), errors

    status, view, errors = await w.run(work)
    if view is None:
        return _not_active_page(request, None if status == "gone" else status)
    notice = None if errors else (
        "Your preferences are saved." if view["active"]
        else "Your preferences are saved. You have no topics chosen, so you will get no mail.")
    return render(request, "preferences.html.j2", 400 if errors else 200,
                  title="Your preferences", **view, notice=notice,
                  action=w.url(f"/preferences/{token}"),
                  unsubscribe_url=w.url(f"/u/{w.tokens.unsubscribe(claims.subscriber_id)}"))


# ---------------------------------------------------------------- manage by email

@router.get("/manage")
async def manage_form(request: Request) -> HTMLResponse:
    return render(request, "manage.html.j2", title="Manage your subscription", email="")


@router.post("/manage")
async def manage_post(request: Request) -> HTMLResponse:
    w = web(request)
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    typed = text(form, "email").strip()
    network = network_of(request.client.host if request.client else None)

    def work(session: Session) -> tuple[str, Any]:
        if not w.allowed(session, "post", network, w.settings.posts_per_network_hour,
                         dt.timedelta(hours=1)):
            return "limited", None
        store.record_event(session, bucket(w.rate_key, "post", network))
        try:
            subscriber = store.find_by_email(session, w.rules, typed)
        except InvalidInput as exc:
            return "invalid", _sentence(str(exc))
        mailable = (SubscriberStatus.ACTIVE, SubscriberStatus.AWAITING_APPROVAL,
                    SubscriberStatus.PENDING)
        if subscriber is None or subscriber.status not in mailable or not subscriber.email:
            return "ok", []
        assert subscriber.email_key is not None
        if not w.may_mail(session, "manage", subscriber.email_key, network):
            return "ok", []
        return "ok", [Outgoing(subscriber.email, "manage_link", {
            "preferences_url": w.url(f"/preferences/{w.tokens.manage(subscriber.id)}"),
            "manage_days": w.settings.manage_link_days})]

    status, result = await w.run(work)
    if status == "limited":
        return _too_many(request)
    if status == "invalid":
        return render(request, "manage.html.j2", 400, title="Manage your subscription",
                      email=typed, errors={"email": result})
    return message(request, "Check your inbox",
                   "If that address is subscribed, we have sent it a link to your preferences "
                   "page. The email can take a few minutes to arrive; check your junk folder "
                   "too.", links=[("Back", w.url("/manage"))], background=send_later(w, result))


# ---------------------------------------------------------------- archive

@router.get("/archive")
async def archive_index(request: Request) -> HTMLResponse:
    entries = await _archive_entries(web(request))
    return render(request, "archive.html.j2", title="Past newsletters", editions=entries)


async def _archive_entries(w: Web) -> list[Any]:
    sent = await w.run(outbox.published)
    return await run_in_threadpool(w.archive.entries, sent)


@router.get("/archive.xml")
async def archive_feed(request: Request) -> Response:
    w = web(request)
    entries = await _archive_entries(w)
    body = w.pages.get_template("archive.xml.j2").render(
        base_url=w.settings.base_url, site_name=w.site_name, editions=entries,
        updated=entries[0].updated if entries else "1970-01-01T00:00:00Z")
    return Response(body, media_type="application/atom+xml; charset=utf-8")


@router.get("/archive/{slug}")
async def archive_edition(request: Request, slug: str) -> Response:
    w = web(request)
    sent = await w.run(lambda session: outbox.published_compiled(session, slug))
    html = (w.archive.sent_page(*sent) if sent is not None
            else await run_in_threadpool(w.archive.page, slug))
    if html is None:
        raise HTTPException(404, "There is no published newsletter at this address.")
    # An email's HTML is styled inline; allow that here only (still no script of any kind).
    return HTMLResponse(html, headers={
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   "img-src https: data:; frame-ancestors 'none'; "
                                   "base-uri 'none'; form-action 'none'"})
