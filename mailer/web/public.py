"""The recipient pages: subscribe, confirm, the yearly "still working with MSHT?", unsubscribe
(RFC 8058 one-click), preferences (with a copy of the reader's data, and erasure),
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

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from mailer import outbox
from mailer.operations import readers
from mailer.operations.readers import FIELDS
from mailer.web.mail import Outgoing
from mailer.web.runtime import (
    Web,
    client_ip,
    csrf_problem,
    message,
    read_form,
    render,
    send_later,
    text,
    web,
)
from mailer.web.security import network_of
from subscribers import store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput
from subscribers.models import Channel, Subscriber, SubscriberStatus
from subscribers.store import SubscribeOutcome
from subscribers.tokens import Claims, InvalidToken, Purpose
from subscribers.validation import is_trusted_domain

router = APIRouter()


def csrf_refusal(request: Request, form: FormData) -> HTMLResponse | None:
    problem = csrf_problem(request, form)
    if problem is None:
        return None
    return message(request, "This form could not be accepted",
                   f"For your security we could not accept this form: {problem}.",
                   "Go back, reload the page and try again. The page needs cookies enabled.",
                   status=403)


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


@router.get("/static/favicon.svg", include_in_schema=False)
@router.get("/favicon.ico", include_in_schema=False)  # asked for by browsers whatever the page says
async def favicon(request: Request) -> Response:
    return Response(request.app.state.favicon, media_type="image/svg+xml",
                    headers={"Cache-Control": "public, max-age=86400"})


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
        "already subscribed, we will email you a link to your preferences instead.",
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
    fields = {name: text(form, name).strip() for name in FIELDS}
    chosen = [v for v in form.getlist("topics") if isinstance(v, str)][:10]
    consent = text(form, "consent") == w.settings.consent_version
    values: dict[str, Any] = {**fields, "topics": chosen, "consent": consent}
    honeypot = bool(text(form, "website"))
    network = network_of(client_ip(request))
    ctx = w.ctx(request)

    # The answer must take as long for an address we know as for a new one (D1), so the
    # request only checks the form; the sign-up itself and its mail run after the answer.
    def check(session: Session) -> tuple[str, Any]:
        if not w.limits.post_allowed(session, network):
            return "limited", None
        form = readers.check_sign_up(session, w.rules, fields, chosen, consent)
        if form.errors:
            return "invalid", form.errors
        return "ok", None if honeypot else form  # a bot: the same answer, nothing else

    def work(form: readers.SignUpForm) -> Callable[[Session], list[Outgoing]]:
        def unit(session: Session) -> list[Outgoing]:
            done = readers.sign_up(session, w.rules, form, ctx)
            assert done.subscriber.email_key is not None
            # The "already subscribed" notice has its own caps: the confirmation mail of an
            # hour ago must not swallow the mail the page has just promised.
            kind = "signup" if done.outcome not in _ALREADY else "already"
            if not w.limits.may_mail(session, kind, done.subscriber.email_key, network):
                return []
            return [_signup_mail(w, done.subscriber, done.outcome, done.topic_names)]
        return unit

    async def after(form: readers.SignUpForm) -> None:
        mails = await w.run(work(form))
        if mails:
            await run_in_threadpool(w.mailer.send_all, mails)

    status, result = await w.run(check)
    if status == "limited":
        return _too_many(request)
    if status == "invalid":
        return _subscribe_page(request, topics, values, result, 400)
    return _check_inbox(request, BackgroundTask(after, result) if result else None)


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


_ALREADY = frozenset({SubscribeOutcome.ALREADY_ACTIVE, SubscribeOutcome.AWAITING_APPROVAL})


def _signup_mail(w: Web, subscriber: Subscriber, outcome: SubscribeOutcome,
                 topic_names: list[str]) -> Outgoing:
    assert subscriber.email is not None
    if outcome in _ALREADY:
        return Outgoing(subscriber.email, "already_subscribed", {
            "awaiting": outcome == SubscribeOutcome.AWAITING_APPROVAL,
            "preferences_url": w.links.preferences(subscriber.id)})
    return Outgoing(subscriber.email, "confirm", {
        "confirm_url": w.links.confirm(subscriber.id),
        "confirm_days": w.settings.confirm_link_days,
        "topics": ", ".join(topic_names),
        "trusted": is_trusted_domain(w.rules, subscriber.email)})


# ---------------------------------------------------------------- confirm

def _bad_link(request: Request, exc: InvalidToken, again: str = "/subscribe",
              again_text: str = "Subscribe again") -> HTMLResponse:
    first = ("This link has expired." if exc.expired
             else "This link is not valid. It may have been copied incompletely, or be for "
                  "an address that is no longer on our list.")
    return message(request, "This link does not work", first,
                   links=[(again_text, web(request).url(again))], status=400)


def _link_for_nobody(request: Request) -> HTMLResponse:
    """A well-signed reader link whose reader is not there (never was, or erased): the same
    page as a link that does not verify, so that holding an erased person's old link tells
    nothing about them."""
    return _bad_link(request, InvalidToken("no such reader"), "/manage", "Get a new link by email")

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
                  action=w.links.page(Purpose.CONFIRM, token))


@router.post("/confirm/{token}")
async def confirm_post(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    checked = await _link_form(request, Purpose.CONFIRM, token)
    if isinstance(checked, HTMLResponse):
        return checked
    _form, claims = checked
    ctx = w.ctx(request)

    status = await w.run(lambda s: readers.confirm(s, w.settings, w.rules, claims.subscriber_id,
                                                     ctx))
    if status == SubscriberStatus.ACTIVE:
        return message(request, "You are subscribed",
                       "Thank you: your address is confirmed and you will receive the next "
                       "newsletter.",
                       "We are sending you a welcome email with the next dates of interest, "
                       "which you can add to your calendar.",
                       links=[("Past newsletters", w.url("/archive"))])
    if status == SubscriberStatus.AWAITING_APPROVAL:
        return message(request, "Thank you, your address is confirmed",
                       "Because your address is not on a police, government or NHS domain, a "
                       "co-ordinator will check your sign-up before we send you anything. You "
                       "do not need to do anything else: we will email you either way.")
    return message(request, "This sign-up is no longer waiting",
                   "This link was for a sign-up that has since been cancelled or finished.",
                   links=[("Subscribe again", w.url("/subscribe"))], status=400)


# ---------------------------------------------------------------- yearly reconfirmation

@router.get("/still-working/{token}")
async def reconfirm_page(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    try:
        claims = w.tokens.read(Purpose.RECONFIRM, token)
    except InvalidToken as exc:
        return _bad_link(request, exc, "/manage", "Get a link to your preferences by email")
    return render(request, "reconfirm.html.j2", title="Are you still working with MSHT?",
                  action=w.links.page(Purpose.RECONFIRM, token),
                  preferences=w.links.preferences(claims.subscriber_id))


@router.post("/still-working/{token}")
async def reconfirm_post(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    checked = await _link_form(request, Purpose.RECONFIRM, token, "/manage",
                               "Get a link to your preferences by email")
    if isinstance(checked, HTMLResponse):
        return checked
    _form, claims = checked
    ctx = w.ctx(request)
    status = await w.run(lambda s: readers.reconfirm(s, claims.subscriber_id, ctx))
    if status == SubscriberStatus.ACTIVE:
        return message(request, "Thank you",
                       "We will keep sending you the newsletter and reminders, and ask again "
                       "in a year.",
                       links=[("Your preferences", w.links.preferences(claims.subscriber_id))])
    return message(request, "You are not subscribed",
                   "This address is not subscribed at the moment, so there is nothing to "
                   "keep.", links=[("Subscribe", w.url("/subscribe"))], status=400)


# ---------------------------------------------------------------- unsubscribe (RFC 8058)

def _unsubscribed_generic(request: Request) -> HTMLResponse:
    """The one answer to an unsubscribe post that changes nothing (a bad token, a reader not
    there): 200, no detail (no oracle), and a way to reach us, since a mailbox provider reads a
    non-2xx as a broken unsubscribe."""
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

    def work(session: Session) -> tuple[bool, Any, str | None]:
        subscriber = store.find(session, claims.subscriber_id)
        topic = store.topic_by_id(session, claims.topic_id) if claims.topic_id else None
        if subscriber is None:
            return False, None, None
        # A link opened again after it was used says so (the person holding it is the reader
        # it was mailed to), rather than offering a form as if nothing had happened.
        left: str | None = None
        if subscriber.status == SubscriberStatus.UNSUBSCRIBED:
            left = f"everything {w.site_name} sends"
        elif topic is not None and topic.slug not in store.active_topics(session, subscriber.id):
            left = topic.name
        return True, ({"name": topic.name} if topic else None), left

    known, topic, left = await w.run(work)
    if not known:
        return _link_for_nobody(request)
    if left is not None:
        return _unsubscribed_page(request, token, claims.subscriber_id,
                                  f"You have already unsubscribed from {left}.")
    return render(request, "unsubscribe.html.j2", title="Unsubscribe", topic=topic,
                  action=w.links.page(Purpose.UNSUBSCRIBE, token),
                  preferences_url=w.links.preferences(claims.subscriber_id))


def _unsubscribed_page(request: Request, token: str, subscriber_id: int,
                       said: str) -> HTMLResponse:
    """Where an unsubscribe link leads once it has been used: what was done, the way back."""
    w = web(request)
    return message(
        request, "You are unsubscribed", said,
        links=[("Manage your other preferences", w.links.preferences(subscriber_id))],
        undo={"action": w.links.page(Purpose.UNSUBSCRIBE, token, "/undo"),
              "text": "Did you press it by mistake?", "button": "Subscribe me again"})


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
    done = await w.run(lambda session: readers.unsubscribe(
        session, claims.subscriber_id, None if everything else claims.topic_id, ctx))
    if one_click:
        return _one_click_answer(done is not None)
    if done is None:
        return _unsubscribed_generic(request)
    what = done.topic_name or f"everything {w.site_name} sends"
    return _unsubscribed_page(request, token, claims.subscriber_id,
                              f"You have been unsubscribed from {what}.")


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

    status = await w.run(lambda s: readers.undo_unsubscribe(
        s, w.rules, claims.subscriber_id, claims.topic_id, ctx))
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
        # Editions kept out of the public archive that went to this reader: the magic link
        # (/manage) is how a reader who lost the email still reaches them.
        "own_copies": [(p.subject, w.links.view_own_copy(subscriber.id, p.id))
                       for p in outbox.own_copies(session, subscriber.id)],
    }


def _not_active_page(request: Request, status: str) -> HTMLResponse:
    w = web(request)
    if status in (SubscriberStatus.PENDING, SubscriberStatus.AWAITING_APPROVAL):
        return message(request, "Your subscription is not active yet",
                       "Your sign-up is waiting to be confirmed or approved. You can change your "
                       "preferences once it is active.")
    if status == SubscriberStatus.LAPSED:
        return message(request, "Your mail is stopped",
                       "We asked whether you still work with modern slavery and human "
                       "trafficking and did not hear back, so we stopped sending you mail. To "
                       "start again, press the button on the page the link in that email "
                       "opens, or subscribe again.",
                       links=[("Subscribe", w.url("/subscribe"))])
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
    if view is None:
        return _link_for_nobody(request)
    if view["state"] != SubscriberStatus.ACTIVE:
        return _not_active_page(request, view["state"])
    return render(request, "preferences.html.j2", title="Your preferences", **view,
                  **_preferences_links(w, token, claims.subscriber_id))


def _preferences_links(w: Web, token: str, subscriber_id: int) -> dict[str, Any]:
    return {"action": w.links.page(Purpose.MANAGE, token),
            "download_action": w.links.page(Purpose.MANAGE, token, "/download"),
            "erase_url": w.links.page(Purpose.MANAGE, token, "/erase"),
            "unsubscribe_url": w.links.unsubscribe(subscriber_id)}


@router.post("/preferences/{token}")
async def preferences_post(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    checked = await _link_form(request, Purpose.MANAGE, token, "/manage", "Get a new link by email")
    if isinstance(checked, HTMLResponse):
        return checked
    form, claims = checked
    wanted = {v for v in form.getlist("topics") if isinstance(v, str)}
    pause = text(form, "pause") or "keep"
    if pause not in readers.PAUSES:
        raise HTTPException(400, "Choose a pause from the list.")
    ctx = w.ctx(request)
    fields = {name: text(form, name) or None for name in ("region", "role")}

    def work(session: Session) -> tuple[str, dict[str, Any] | None, dict[str, str]]:
        subscriber = store.find(session, claims.subscriber_id)
        if subscriber is None:
            return "gone", None, {}
        if subscriber.status != SubscriberStatus.ACTIVE:
            return str(subscriber.status), None, {}
        refused = readers.set_preferences(session, w.rules, subscriber, fields, wanted, pause,
                                          ctx)
        errors = {k: _sentence(v) for k, v in refused.items()}
        return "ok", _preferences_view(w, session, subscriber), errors

    status, view, errors = await w.run(work)
    if status == "gone":
        return _link_for_nobody(request)
    if view is None:
        return _not_active_page(request, status)
    notice = None if errors else (
        "Your preferences are saved." if view["active"]
        else "Your preferences are saved. You have no topics chosen, so you will get no mail.")
    return render(request, "preferences.html.j2", 400 if errors else 200,
                  title="Your preferences", **view, notice=notice,
                  **_preferences_links(w, token, claims.subscriber_id))


# ---------------------------------------------------------------- the reader's own data
# Both live on the preferences page and answer as it does: a bad link, and a link for nobody
# (never there, or erased), get the bad-link page. Each acts
# only on a POST with the page's CSRF token, so a link scanner opening every URL acts on
# nothing. Unlike the preferences form, they serve anyone the link still names, subscribed or
# not: the right to a copy and to erasure does not end with the subscription.

async def _manage_form(request: Request, token: str) -> tuple[FormData, Claims] | HTMLResponse:
    return await _link_form(request, Purpose.MANAGE, token, "/manage", "Get a new link by email")


@router.post("/preferences/{token}/download")
async def download_own_data(request: Request, token: str) -> Response:
    w = web(request)
    checked = await _manage_form(request, token)
    if isinstance(checked, HTMLResponse):
        return checked
    _form, claims = checked
    data = await w.run(lambda s: readers.own_data(s, claims.subscriber_id))
    if data is None:
        return _link_for_nobody(request)
    body = json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n"
    return Response(body.encode(), media_type="application/json", headers={
        "Content-Disposition": 'attachment; filename="msht-bulletin-my-data.json"',
        "Cache-Control": "no-store"})


@router.get("/preferences/{token}/erase")
async def erase_page(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    try:
        claims = w.tokens.read(Purpose.MANAGE, token)
    except InvalidToken as exc:
        return _bad_link(request, exc, "/manage", "Get a new link by email")

    def work(session: Session) -> str | None:
        subscriber = store.find(session, claims.subscriber_id)
        return None if subscriber is None else subscriber.email

    email = await w.run(work)
    if email is None:
        return _link_for_nobody(request)
    return render(request, "erase.html.j2", title="Erase your data", email=email,
                  action=w.links.page(Purpose.MANAGE, token, "/erase"),
                  download_action=w.links.page(Purpose.MANAGE, token, "/download"),
                  preferences_url=w.links.page(Purpose.MANAGE, token))


@router.post("/preferences/{token}/erase")
async def erase_post(request: Request, token: str) -> HTMLResponse:
    w = web(request)
    checked = await _manage_form(request, token)
    if isinstance(checked, HTMLResponse):
        return checked
    _form, claims = checked
    ctx = w.ctx(request)
    if not await w.run(lambda s: readers.erase(s, claims.subscriber_id, ctx)):
        return _link_for_nobody(request)
    return message(request, "Your data has been erased",
                   "We have deleted your address, your name and your other details, and what "
                   "you subscribed to. You will get no more mail from us.",
                   "What we keep says nothing about who you are: a keyed hash of your address, "
                   "which cannot be turned back into it, so that no list we are given can add "
                   "you again; and an anonymous record of what was sent and when.",
                   "If you want the newsletter again one day, you can subscribe again with "
                   "the same address.",
                   links=[("Subscribe again", w.url("/subscribe"))])


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
    network = network_of(client_ip(request))

    def work(session: Session) -> tuple[str, Any]:
        if not w.limits.post_allowed(session, network):
            return "limited", None
        try:
            subscriber = store.find_by_email(session, w.rules, typed)
        except InvalidInput as exc:
            return "invalid", _sentence(str(exc))
        mailable = (SubscriberStatus.ACTIVE, SubscriberStatus.AWAITING_APPROVAL,
                    SubscriberStatus.PENDING)
        if subscriber is None or subscriber.status not in mailable or not subscriber.email:
            return "ok", []
        assert subscriber.email_key is not None
        if not w.limits.may_mail(session, "manage", subscriber.email_key, network):
            return "ok", []
        return "ok", [Outgoing(subscriber.email, "manage_link", {
            "preferences_url": w.links.preferences(subscriber.id),
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


# An email's HTML is styled inline; allow that on these pages only (still no script of any kind).
_EMAIL_PAGE_CSP = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                              "img-src https: data:; frame-ancestors 'none'; "
                                              "base-uri 'none'; form-action 'none'"}


@router.get("/read/{token}")
async def own_copy(request: Request, token: str) -> Response:
    """A reader's "view in your browser" of an edition kept out of the public archive
    (`archive: subscribers`): only through their signed link, never listed or indexed."""
    w = web(request)
    try:
        claims = w.tokens.read(Purpose.VIEW, token)
    except InvalidToken as exc:
        return _bad_link(request, exc, "/manage", "Get a new link by email")
    edition_id = claims.edition_id
    found = None if edition_id is None else await w.run(
        lambda session: outbox.own_copy(session, edition_id, claims.subscriber_id))
    if found is None:
        raise HTTPException(404, "There is no newsletter for you at this address.")
    html = w.archive.own_page(*found, w.links.page(Purpose.VIEW, token))
    # The security middleware adds no-store and no-referrer: the URL is the reader's key.
    return HTMLResponse(html, headers={**_EMAIL_PAGE_CSP, "X-Robots-Tag": "noindex, nofollow"})


@router.get("/archive/{slug}")
async def archive_edition(request: Request, slug: str) -> Response:
    w = web(request)
    sent = await w.run(lambda session: outbox.published_compiled(session, slug))
    html = (w.archive.sent_page(*sent) if sent is not None
            else await run_in_threadpool(w.archive.page, slug))
    if html is None:
        raise HTTPException(404, "There is no published newsletter at this address.")
    return HTMLResponse(html, headers=_EMAIL_PAGE_CSP)
