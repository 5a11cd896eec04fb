"""JSON API under /api/v1 for the console's operations, with its OpenAPI document at
/api/v1/openapi.json.

Authentication is an API token (`Authorization: Bearer msht_...`) made with
`mailer users token`; it is stored hashed and acts as its user with at most the role it was
given. Cookies are never read here, so a browser session cannot be ridden cross-site and the
API needs no CSRF token. The same permissions, region scope, four-eyes rule and audit entries
apply as in the console: both call the same library functions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.orm import Session

from mailer import accounts, audit, outbox
from mailer.accounts import Actor, Permission
from mailer.errors import MailerError
from mailer.models import Edition, EditionStatus
from mailer.web import public
from subscribers import store
from subscribers.errors import NotFound, SubscriberError
from subscribers.models import Channel, SubscriberStatus

T = TypeVar("T")
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]


class Problem(BaseModel):
    detail: str


class Me(BaseModel):
    login: str
    name: str
    role: str
    regions: list[str] | None


class Counts(BaseModel):
    by_status: dict[str, int]
    by_region: dict[str, int]
    by_role: dict[str, int]
    by_organisation_type: dict[str, int]
    by_topic: dict[str, int]


class SubscriberOut(BaseModel):
    id: int
    email: str | None
    name: str | None
    organisation: str | None
    organisation_type: str | None
    role: str | None
    region: str | None
    status: str
    topics: list[str] = []


class SubscriberPage(BaseModel):
    total: int
    items: list[SubscriberOut]


class EditionOut(BaseModel):
    id: int
    slug: str
    title: str
    subject: str
    topic: str
    regions: list[str]
    status: str
    created_by: str | None
    approval_requested_by: str | None
    approved_by: str | None
    scheduled_by: str | None
    scheduled_for: dt.datetime | None


class ProgressOut(BaseModel):
    edition_id: int
    status: str
    counts: dict[str, int]
    ambiguous: int
    total: int
    remaining: int


class ScheduleIn(BaseModel):
    at: AwareDatetime = Field(description="When to send, with its UTC offset")


class Done(BaseModel):
    changed: bool
    detail: str = ""


class AuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    actor_name: str | None
    via: str
    ip: str | None
    action: str
    target: str | None
    detail: dict[str, Any] | None


class AuditPage(BaseModel):
    total: int
    items: list[AuditOut]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
    409: {"model": Problem}}


def create_api(main: FastAPI) -> FastAPI:
    api = FastAPI(title="MSHT bulletin console API", version="1", docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json", responses=ERRORS)
    api.state.main = main

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": "the request is not valid",
                             "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")}
                                        for e in exc.errors()]}, status_code=422)

    api.add_exception_handler(RequestValidationError, invalid)
    _routes(api)
    return api


def _web(request: Request) -> public.Web:
    return request.app.state.main.state.web


async def _run(request: Request, work: Callable[[Session], T]) -> T:
    try:
        return await _web(request).run(work)
    except outbox.ApprovalRefused as exc:
        raise HTTPException(403, str(exc)) from None
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except MailerError as exc:
        raise HTTPException(409, str(exc)) from None
    except SubscriberError as exc:
        raise HTTPException(409, str(exc)) from None


def _needs(permission: Permission) -> Callable[..., Any]:
    async def dependency(request: Request) -> Actor:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        actor = None
        if scheme.lower() == "bearer" and presented:
            actor = await _web(request).run(lambda s: accounts.token_actor(s, presented.strip()))
        if actor is None:
            raise HTTPException(401, "a valid API token is needed",
                                headers={"WWW-Authenticate": "Bearer"})
        if not actor.can(permission):
            raise HTTPException(403, f"role {actor.role} may not do this")
        return actor
    return dependency


def _record(session: Session, actor: Actor, request: Request, action: str, target: str,
            **detail: Any) -> None:
    audit.record(session, actor=actor.login, actor_name=actor.name, via="api",
                 ip=request.client.host if request.client else None, action=action,
                 target=target, detail=detail or None)


def _edition(session: Session, eid: int) -> Edition:
    try:
        return outbox.get_edition(session, eid)
    except MailerError:
        raise NotFound(f"no edition {eid}") from None


def _edition_out(e: Edition) -> EditionOut:
    return EditionOut(id=e.id, slug=e.slug, title=e.title, subject=e.subject, topic=e.topic,
                      regions=list(e.regions), status=e.status, created_by=e.created_by,
                      approval_requested_by=e.approval_requested_by, approved_by=e.approved_by,
                      scheduled_by=e.scheduled_by, scheduled_for=e.scheduled_for)


def _subscriber(session: Session, actor: Actor, sid: int) -> Any:
    subscriber = store.get(session, sid)
    if actor.regions is not None and subscriber.region not in actor.regions:
        raise NotFound(f"no subscriber with id {sid}")
    return subscriber


def _routes(api: FastAPI) -> None:
    viewer = Depends(_needs(Permission.VIEW))

    @api.get("/me", response_model=Me)
    async def me(actor: Actor = viewer) -> Me:
        return Me(login=actor.login, name=actor.name, role=actor.role,
                  regions=list(actor.regions) if actor.regions is not None else None)

    @api.get("/counts", response_model=Counts)
    async def counts(request: Request, actor: Actor = viewer) -> Counts:
        c = await _run(request, lambda s: store.counts(s, regions=actor.regions or ()))
        return Counts(**vars(c))

    @api.get("/subscribers", response_model=SubscriberPage)
    async def subscribers(
            request: Request, actor: Actor = viewer,
            q: Annotated[str | None, Query(max_length=100)] = None,
            status: SubscriberStatus | None = None,
            region: Annotated[str | None, Query(max_length=40)] = None,
            limit: Annotated[int, Query(ge=1, le=500)] = 50,
            offset: Annotated[int, Query(ge=0, le=10**7)] = 0) -> SubscriberPage:
        if actor.regions is not None:
            if region is None:
                if not actor.regions:
                    raise HTTPException(403, "you have no regions")
                region = actor.regions[0]
            elif region not in actor.regions:
                raise HTTPException(403, f"region {region} is outside your scope")
        flt = store.Filter(status=status, region=region, search=q or None)

        def work(session: Session) -> SubscriberPage:
            total, rows = store.list_subscribers(session, flt, limit=limit, offset=offset)
            return SubscriberPage(total=total, items=[SubscriberOut(
                id=r.id, email=r.email, name=r.name, organisation=r.organisation,
                organisation_type=r.organisation_type, role=r.role, region=r.region,
                status=r.status) for r in rows])

        return await _run(request, work)

    @api.get("/subscribers/{sid}", response_model=SubscriberOut)
    async def subscriber(request: Request, sid: Id, actor: Actor = viewer) -> SubscriberOut:
        def work(session: Session) -> SubscriberOut:
            s = _subscriber(session, actor, sid)
            return SubscriberOut(id=s.id, email=s.email, name=s.name,
                                 organisation=s.organisation,
                                 organisation_type=s.organisation_type, role=s.role,
                                 region=s.region, status=s.status,
                                 topics=store.active_topics(session, s.id))
        return await _run(request, work)

    def subscriber_change(name: str, act: Callable[..., bool]) -> None:
        @api.post(f"/subscribers/{{sid}}/{name}", response_model=Done, name=f"subscriber_{name}")
        async def change(request: Request, sid: Id,
                         actor: Actor = Depends(_needs(Permission.SUBSCRIBERS_EDIT))) -> Done:
            def work(session: Session) -> Done:
                s = _subscriber(session, actor, sid)
                ctx = store.Context(channel=Channel.ADMIN, actor=actor.login)
                changed = act(session, s, ctx)
                if changed:
                    _record(session, actor, request, f"subscriber.{name}", f"subscriber:{sid}")
                return Done(changed=changed)
            return await _run(request, work)

    subscriber_change("approve", store.approve)
    subscriber_change("reject", store.reject)
    subscriber_change("unsubscribe", lambda s, sub, ctx: store.unsubscribe(s, sub, ctx))

    @api.get("/editions", response_model=list[EditionOut])
    async def editions(request: Request, actor: Actor = viewer,
                       limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[EditionOut]:
        return await _run(request, lambda s: [_edition_out(e)
                                              for e in outbox.list_editions(s, limit)])

    @api.get("/editions/{eid}", response_model=EditionOut)
    async def edition(request: Request, eid: Id, actor: Actor = viewer) -> EditionOut:
        return await _run(request, lambda s: _edition_out(_edition(s, eid)))

    @api.get("/editions/{eid}/progress", response_model=ProgressOut)
    async def edition_progress(request: Request, eid: Id, actor: Actor = viewer
                               ) -> ProgressOut:
        def work(session: Session) -> ProgressOut:
            p = outbox.progress(session, _edition(session, eid))
            return ProgressOut(edition_id=p.edition_id, status=p.status, counts=p.counts,
                               ambiguous=p.ambiguous, total=p.total, remaining=p.remaining)
        return await _run(request, work)

    def edition_step(name: str, permission: Permission,
                     step: Callable[[Session, Actor, Edition, Any], bool],
                     body: bool = False) -> None:
        needs = Depends(_needs(permission))

        async def perform(request: Request, eid: int, actor: Actor, data: Any) -> Done:
            def work(session: Session) -> Done:
                e = _edition(session, eid)
                if not actor.covers(e.regions):
                    raise HTTPException(403, "this edition's audience is outside your regions")
                changed = step(session, actor, e, data)
                if changed:
                    _record(session, actor, request, f"edition.{name.replace('-', '_')}",
                            f"edition:{eid}", **({"at": data.at.isoformat()} if body else {}))
                return Done(changed=changed)
            return await _run(request, work)

        if body:
            @api.post(f"/editions/{{eid}}/{name}", response_model=Done, name=f"edition_{name}")
            async def with_body(request: Request, eid: Id, data: ScheduleIn,
                                actor: Actor = needs) -> Done:
                return await perform(request, eid, actor, data)
        else:
            @api.post(f"/editions/{{eid}}/{name}", response_model=Done, name=f"edition_{name}")
            async def without_body(request: Request, eid: Id, actor: Actor = needs) -> Done:
                return await perform(request, eid, actor, None)

    edition_step("request-approval", Permission.EDITIONS_EDIT,
                 lambda s, a, e, _: outbox.request_approval(s, e, a.login))
    edition_step("approve", Permission.EDITIONS_APPROVE,
                 lambda s, a, e, _: outbox.approve(s, e, a.login))

    def schedule(s: Session, a: Actor, e: Edition, data: ScheduleIn) -> bool:
        outbox.schedule(s, e, a.login, data.at.astimezone(dt.UTC))
        return True

    edition_step("schedule", Permission.EDITIONS_SEND, schedule, body=True)
    edition_step("send", Permission.EDITIONS_SEND,
                 lambda s, a, e, _: outbox.send_approved(s, e, a.login) >= 0)
    edition_step("pause", Permission.EDITIONS_SEND,
                 lambda s, a, e, _: outbox.set_status(s, e, EditionStatus.PAUSED,
                                                      reason=f"by {a.login}"))
    edition_step("resume", Permission.EDITIONS_SEND,
                 lambda s, a, e, _: outbox.set_status(s, e, EditionStatus.SENDING))
    edition_step("cancel", Permission.EDITIONS_SEND,
                 lambda s, a, e, _: outbox.set_status(s, e, EditionStatus.CANCELLED))

    @api.get("/audit", response_model=AuditPage)
    async def audit_log(request: Request,
                        actor: Actor = Depends(_needs(Permission.AUDIT_VIEW)),
                        who: Annotated[str | None, Query(alias="actor", max_length=100)] = None,
                        action: Annotated[str | None, Query(max_length=60)] = None,
                        target: Annotated[str | None, Query(max_length=160)] = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 100,
                        offset: Annotated[int, Query(ge=0, le=10**7)] = 0) -> AuditPage:
        flt = audit.AuditFilter(actor=who, action=action, target=target)

        def work(session: Session) -> AuditPage:
            total, rows = audit.entries(session, flt, limit=limit, offset=offset)
            return AuditPage(total=total, items=[AuditOut(**audit.as_dict(r)) for r in rows])
        return await _run(request, work)
