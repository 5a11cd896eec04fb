"""JSON API under /api/v1 for the console's operations, with its OpenAPI document at
/api/v1/openapi.json.

Authentication is an API token (`Authorization: Bearer msht_...`) made with
`mailer users token`; it is stored hashed and acts as its user with at most the role it was
given. Cookies are never read here, so a browser session cannot be ridden cross-site and the
API needs no CSRF token. The same permissions, region scope, four-eyes rule and audit entries
apply as in the console: both call the same library functions.

Every answer other than a success is `{"detail": "..."}` (422 adds `errors`), as documented
in the OpenAPI document, which schemathesis checks the answers against.
"""

from __future__ import annotations

import datetime as dt
import io
import tempfile
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from mailer import accounts, audit, events, outbox, privacy
from mailer.accounts import Actor, Permission
from mailer.bounce_policy import BouncePolicy
from mailer.edition import EditionErrors
from mailer.errors import EditionError, MailerError
from mailer.models import Edition, EditionStatus
from mailer.render import CompiledEdition, Recipient, personalise, preflight
from mailer.spreadsheet import write_csv
from mailer.web import public
from mailer.web.admin import (
    RESOLVE_ALERT,
    AlertOutsideRegions,
    _coordinator_alerts,
    _open_alerts,
    resolve_bounce_alert,
)
from subscribers import importer, store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput, NotFound, SubscriberError
from subscribers.models import Channel, SubscriberStatus

T = TypeVar("T")
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]


class Problem(BaseModel):
    detail: str


class FieldProblem(BaseModel):
    loc: list[str | int]
    msg: str


class Invalid(BaseModel):
    detail: str
    errors: list[FieldProblem] = []


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


LawfulBasis = Literal["public_task", "legitimate_interests", "consent"]
Short = Annotated[str, Field(max_length=254)]


class SubscriberIn(BaseModel):
    """Someone added by a co-ordinator, active at once, on a recorded lawful basis."""

    email: Short
    name: Short | None = None
    organisation: Short | None = None
    organisation_type: Short | None = None
    role: Short | None = None
    region: Short | None = None
    topics: Annotated[list[Annotated[str, Field(max_length=80)]],
                      Field(min_length=1, max_length=10)] = ["newsletter"]
    lawful_basis: LawfulBasis


class SubscriberChange(BaseModel):
    """Only the fields given are changed; null clears one."""

    name: Short | None = None
    organisation: Short | None = None
    organisation_type: Short | None = None
    role: Short | None = None
    region: Short | None = None


class SubscriberHistory(BaseModel):
    subscriptions: list[dict[str, Any]]
    consent_history: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    bounces: list[dict[str, Any]]


class ImportRow(BaseModel):
    line: int
    field: str
    message: str


class ImportOut(BaseModel):
    applied: bool
    sha256: str
    rows: int
    new: int
    existing: int
    kept_out: list[ImportRow]
    errors: list[ImportRow]
    warnings: list[str]


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


Source = Annotated[str, Field(min_length=1, max_length=1_000_000,
                              description="The edition's Markdown source with its front matter")]


class EditionIn(BaseModel):
    slug: Annotated[str, Field(min_length=1, max_length=120, pattern=r"^[A-Za-z0-9._-]+$")]
    source: Source


class SourceIn(BaseModel):
    source: Source


class PreviewOut(BaseModel):
    html: str
    text: str
    warnings: list[str]
    audience: dict[str, dict[str, int]]


class EventOut(BaseModel):
    slug: str
    name: str
    next_date: dt.date | None
    yearly: bool
    offsets: list[int]


class ReminderOut(BaseModel):
    event: str
    occurrence: dt.date
    offset_days: int
    send_at: dt.datetime
    not_after: dt.datetime
    status: str


class Calendar(BaseModel):
    events: list[EventOut]
    reminders: list[ReminderOut]


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


class BounceAlertOut(BaseModel):
    """An open bounce alert: held bounces from one domain (or a policy refusal) that wait for
    a person to apply or dismiss them."""

    id: int
    kind: str
    domain: str
    edition_id: int | None
    edition: str | None = Field(description="The send's slug, when it still exists")
    regions: list[str] = Field(description="The send's audience; only who covers all of it "
                               "may resolve the alert")
    recipients: int
    bounced: int
    share: float
    detail: str
    created_at: dt.datetime
    updated_at: dt.datetime
    can_resolve: bool = Field(description="Whether this token may resolve it")


class ResolveIn(BaseModel):
    apply: bool = Field(strict=True, description="true: the bounces are real, so those "
                        "subscribers are treated as bounced; false: dismiss them, changing "
                        "nobody")


class ResolvedOut(BaseModel):
    id: int
    resolution: Literal["applied", "dismissed"]
    resolved_by: str
    marked_bounced: int
    detail: str


class CoordinatorAlertOut(BaseModel):
    """An alert mailed to the co-ordinators (a halted send, a missed reminder, held bounces)."""

    id: int
    kind: str
    subject: str
    regions: list[str] = Field(description="The regions it is about; empty: every region")
    created_at: dt.datetime
    mailed: bool = Field(description="Mailed to everyone it was for")
    mailed_to: int = Field(description="How many addresses took it")
    state: str
    last_error: str | None


# Query parameters (module level: under `from __future__ import annotations` FastAPI resolves
# annotations by name in the module, never in the function that declares a route).
Q = Annotated[str | None, Query(max_length=100,
                                description="Part of the address, name or organisation")]
Region = Annotated[str | None, Query(max_length=40, description="One region; by default every "
                                     "region in the token's scope")]
Word = Annotated[str | None, Query(max_length=60)]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
    409: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Invalid},
    502: {"model": Problem, "description": "The mail relay refused a test message"}}
BEARER = HTTPBearer(auto_error=False, scheme_name="token",
                    description="An API token made with `mailer users token`")


def create_api(main: FastAPI) -> FastAPI:
    api = FastAPI(title="MSHT bulletin console API", version="1", docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json", responses=ERRORS)
    api.state.main = main

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": "the request is not valid",
                             "errors": [{"loc": [str(p) if not isinstance(p, int) else p
                                                 for p in e.get("loc", ())],
                                         "msg": str(e.get("msg", ""))}
                                        for e in exc.errors()]}, status_code=422)

    api.add_exception_handler(RequestValidationError, invalid)
    _routes(api)
    return api


def _web(request: Request) -> public.Web:
    return request.app.state.main.state.web


def _invalid(message: str, field: str) -> HTTPException:
    return HTTPException(422, message, headers={"X-Invalid-Field": field})


async def _run(request: Request, work: Callable[[Session], T]) -> T:
    try:
        return await _web(request).run(work)
    except outbox.ApprovalRefused as exc:
        raise HTTPException(403, str(exc)) from None
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except EditionErrors as exc:
        raise _invalid("; ".join(str(e) for e in exc.errors), "source") from None
    except EditionError as exc:
        raise _invalid(str(exc), "source") from None
    except MailerError as exc:
        raise HTTPException(409, str(exc)) from None
    except InvalidInput as exc:
        raise _invalid(f"{exc.field}: {exc}", exc.field) from None
    except SubscriberError as exc:
        raise HTTPException(409, str(exc)) from None


def _needs(permission: Permission) -> Callable[..., Any]:
    async def dependency(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Actor:
        actor = None
        presented = credentials.credentials.strip() if credentials is not None else ""
        if presented:
            actor = await _web(request).run(lambda s: accounts.token_actor(s, presented))
        if actor is None:
            raise HTTPException(401, "a valid API token is needed",
                                headers={"WWW-Authenticate": "Bearer"})
        if actor.regions == ():
            # Tokens of an account with no region must not fall through to "every region".
            raise HTTPException(403, "your account has no regions")
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


def _subscriber_out(session: Session, s: Any) -> SubscriberOut:
    return SubscriberOut(id=s.id, email=s.email, name=s.name, organisation=s.organisation,
                         organisation_type=s.organisation_type, role=s.role, region=s.region,
                         status=s.status, topics=store.active_topics(session, s.id))


def _ctx(actor: Actor, request: Request, **kw: Any) -> store.Context:
    return store.Context(channel=Channel.ADMIN, actor=actor.login,
                         ip=request.client.host if request.client else None,
                         user_agent=(request.headers.get("user-agent") or "")[:300] or None,
                         **kw)


def _in_scope(actor: Actor, region: str | None) -> None:
    if actor.regions is not None and region not in actor.regions:
        raise HTTPException(403, f"region {region or '(none)'} is outside your scope")


def _filter(actor: Actor, status: SubscriberStatus | None, region: str | None,
            role: str | None, topic: str | None, q: str | None) -> store.Filter:
    if region is not None:
        _in_scope(actor, region)
    return store.Filter(status=status, region=region, role=role, topic=topic, search=q or None,
                        scope=actor.regions)


async def _save(request: Request, actor: Actor, slug: str, source: str) -> EditionOut:
    settings = _web(request).settings

    def work(session: Session) -> EditionOut:
        e, changed = outbox.store_edition_source(session, settings, slug,
                                                 source.replace("\r\n", "\n"), actor.login)
        if not actor.covers(e.regions):
            raise HTTPException(403, "this edition's audience is outside your regions")
        if changed:
            _record(session, actor, request, "edition.save", f"edition:{e.id}", slug=e.slug,
                    sha256=e.source_sha256)
        return _edition_out(e)
    return await _run(request, work)


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
            request: Request, actor: Actor = viewer, q: Q = None,
            status: SubscriberStatus | None = None, region: Region = None, role: Word = None,
            topic: Word = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
            offset: Annotated[int, Query(ge=0, le=10**7)] = 0) -> SubscriberPage:
        flt = _filter(actor, status, region, role, topic, q)

        def work(session: Session) -> SubscriberPage:
            total, rows = store.list_subscribers(session, flt, limit=limit, offset=offset)
            return SubscriberPage(total=total, items=[SubscriberOut(
                id=r.id, email=r.email, name=r.name, organisation=r.organisation,
                organisation_type=r.organisation_type, role=r.role, region=r.region,
                status=r.status) for r in rows])

        return await _run(request, work)

    # Before /subscribers/{sid}, which would otherwise take "export" for an id.
    @api.get("/subscribers/export", response_class=Response, responses={200: {
        "content": {"text/csv": {"schema": {"type": "string"}}},
        "description": "The subscribers matching the filter, as the console's CSV export"}})
    async def subscribers_export(
            request: Request, actor: Actor = Depends(_needs(Permission.SUBSCRIBERS_EXPORT)),
            q: Q = None, status: SubscriberStatus | None = None, region: Region = None,
            role: Word = None, topic: Word = None) -> Response:
        flt = _filter(actor, status, region, role, topic, q)

        def work(session: Session) -> str:
            out = io.StringIO()
            n = write_csv(out, store.iter_export(session, flt))
            _record(session, actor, request, "subscribers.export", None, rows=n,
                    filter={k: v for k, v in vars(flt).items() if v})
            return out.getvalue()

        body = await _run(request, work)
        stamp = utcnow().strftime("%Y%m%d-%H%M")
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="subscribers-{stamp}.csv"'})

    @api.post("/subscribers", response_model=SubscriberOut, status_code=201)
    async def subscriber_add(request: Request, data: SubscriberIn, actor: Actor = Depends(
            _needs(Permission.SUBSCRIBERS_EDIT))) -> SubscriberOut:
        rules = _web(request).rules

        def work(session: Session) -> SubscriberOut:
            profile = store.profile_from(rules, email=data.email, name=data.name,
                                         organisation=data.organisation,
                                         organisation_type=data.organisation_type,
                                         role=data.role, region=data.region)
            _in_scope(actor, profile.region)
            topics = store.topics_by_slug(session, data.topics)
            s = store.add_active(session, rules, profile, topics,
                                 _ctx(actor, request, lawful_basis=data.lawful_basis))
            _record(session, actor, request, "subscriber.add", f"subscriber:{s.id}",
                    region=profile.region, lawful_basis=data.lawful_basis)
            return _subscriber_out(session, s)
        return await _run(request, work)

    @api.get("/subscribers/{sid}", response_model=SubscriberOut)
    async def subscriber(request: Request, sid: Id, actor: Actor = viewer) -> SubscriberOut:
        return await _run(request, lambda s: _subscriber_out(s, _subscriber(s, actor, sid)))

    @api.get("/subscribers/{sid}/history", response_model=SubscriberHistory)
    async def subscriber_history(request: Request, sid: Id, actor: Actor = viewer
                                 ) -> SubscriberHistory:
        def work(session: Session) -> SubscriberHistory:
            record = privacy.subject_access(session, _subscriber(session, actor, sid))
            return SubscriberHistory(**{k: record[k] for k in SubscriberHistory.model_fields})
        return await _run(request, work)

    @api.patch("/subscribers/{sid}", response_model=SubscriberOut)
    async def subscriber_edit(request: Request, sid: Id, data: SubscriberChange,
                              actor: Actor = Depends(_needs(Permission.SUBSCRIBERS_EDIT))
                              ) -> SubscriberOut:
        rules = _web(request).rules
        fields = {k: getattr(data, k) for k in data.model_fields_set}
        if "region" in fields:
            _in_scope(actor, fields["region"])

        def work(session: Session) -> SubscriberOut:
            s = _subscriber(session, actor, sid)
            if fields and store.update_profile(session, rules, s, _ctx(actor, request),
                                               **fields):
                _record(session, actor, request, "subscriber.edit", f"subscriber:{sid}",
                        fields=sorted(fields))
            return _subscriber_out(session, s)
        return await _run(request, work)

    @api.delete("/subscribers/{sid}", response_model=Done)
    async def subscriber_erase(request: Request, sid: Id, actor: Actor = Depends(
            _needs(Permission.SUBSCRIBERS_ERASE))) -> Done:
        """Erase the person everywhere (UK GDPR Art. 17); their address stays suppressed."""
        def work(session: Session) -> Done:
            s = _subscriber(session, actor, sid)  # an erased person is not found any more
            privacy.erase(session, s, _ctx(actor, request))
            _record(session, actor, request, "subscriber.erase", f"subscriber:{sid}")
            return Done(changed=True)
        return await _run(request, work)

    @api.post("/subscribers/import", response_model=ImportOut, openapi_extra={
        "requestBody": {"required": True, "content": {"text/csv": {"schema": {
            "type": "string"}}}}})
    async def subscribers_import(
            request: Request, lawful_basis: LawfulBasis,
            apply: Annotated[bool, Query(description="False (the default) only reports what "
                                         "would happen")] = False,
            actor: Actor = Depends(_needs(Permission.SUBSCRIBERS_IMPORT))) -> ImportOut:
        w = _web(request)
        if actor.regions is not None and not actor.covers(w.rules.regions):
            raise HTTPException(403, "a CSV can add people in any region: only someone who "
                                "covers every region may import")
        data = await request.body()
        options = importer.Options(lawful_basis=lawful_basis, source="api upload",
                                   actor=actor.login)
        with tempfile.TemporaryDirectory() as tmp:
            path = FilePath(tmp) / "upload.csv"
            path.write_bytes(data)
            try:
                report = await run_in_threadpool(importer.import_file, w.sessions, w.rules,
                                                 path, options, apply)
            except SubscriberError as exc:
                raise _invalid(str(exc), "body") from None
        if report.applied:
            await _run(request, lambda s: _record(
                s, actor, request, "subscribers.import", None, file=options.source,
                sha256=report.sha256, added=report.new, lawful_basis=lawful_basis))

        def rows(problems: list[Any]) -> list[ImportRow]:
            return [ImportRow(line=p.line, field=p.field, message=p.message) for p in problems]
        return ImportOut(applied=report.applied, sha256=report.sha256, rows=report.rows,
                         new=report.new, existing=len(report.existing),
                         kept_out=rows(report.kept_out), errors=rows(report.errors),
                         warnings=report.warnings)

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

    @api.post("/editions", response_model=EditionOut, status_code=201)
    async def edition_upload(request: Request, data: EditionIn, actor: Actor = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> EditionOut:
        """Upload a new edition, or a new version of the one with this slug (which withdraws
        its approval)."""
        return await _save(request, actor, data.slug, data.source)

    @api.get("/editions/{eid}", response_model=EditionOut)
    async def edition(request: Request, eid: Id, actor: Actor = viewer) -> EditionOut:
        return await _run(request, lambda s: _edition_out(_edition(s, eid)))

    @api.put("/editions/{eid}/source", response_model=EditionOut)
    async def edition_edit(request: Request, eid: Id, data: SourceIn, actor: Actor = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> EditionOut:
        slug = await _run(request, lambda s: _edition(s, eid).slug)
        return await _save(request, actor, slug, data.source)

    @api.get("/editions/{eid}/preview", response_model=PreviewOut)
    async def edition_preview(request: Request, eid: Id, actor: Actor = viewer) -> PreviewOut:
        """The HTML and plain-text parts as a reader would get them, and the preflight
        warnings. Its links are placeholders, never a real subscriber's."""
        from mailer.web.admin import _preview_urls

        settings = _web(request).settings

        def work(session: Session) -> PreviewOut:
            e = _edition(session, eid)
            compiled = CompiledEdition.from_dict(e.compiled)
            page = personalise(compiled, Recipient(email="reader@example.org",
                                                   name="Preview Reader"),
                               _preview_urls(settings, e.slug))
            return PreviewOut(html=page.html, text=page.text, warnings=preflight(compiled),
                              audience=outbox.audience_breakdown(session, e))
        return await _run(request, work)

    @api.post("/editions/{eid}/test-send", response_model=Done)
    async def edition_test_send(request: Request, eid: Id, actor: Actor = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> Done:
        """One copy to the token's own user, through the real relay."""
        from mailer.web.admin import _send_test

        if not actor.email:
            raise HTTPException(409, "your account has no email address for test sends")
        w = _web(request)
        e = await _run(request, lambda s: _edition(s, eid))
        try:
            result = await run_in_threadpool(_send_test, w.settings, e, actor)
        except MailerError as exc:  # the message could not be built (a header refused) or sent
            problem = str(exc)
            await _run(request, lambda s: _record(
                s, actor, request, "edition.test_send", f"edition:{eid}", to=actor.email,
                outcome="refused", reason=problem))
            raise HTTPException(409, f"the test message could not be made: {problem}") from None
        await _run(request, lambda s: _record(
            s, actor, request, "edition.test_send", f"edition:{eid}", to=actor.email,
            outcome=str(result.outcome), code=result.code))
        if str(result.outcome) != "sent":
            raise HTTPException(502, f"the mail relay answered: {result.code or ''} "
                                f"{result.reply}".strip())
        return Done(changed=True, detail=f"sent to {actor.email}")

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
            refused: list[str] = []

            def work(session: Session) -> Done:
                e = _edition(session, eid)
                if not actor.covers(e.regions):
                    raise HTTPException(403, "this edition's audience is outside your regions")
                try:
                    changed = step(session, actor, e, data)
                except outbox.ApprovalRefused as exc:
                    refused.append(str(exc))
                    raise
                if changed:
                    _record(session, actor, request, f"edition.{name.replace('-', '_')}",
                            f"edition:{eid}", **({"at": data.at.isoformat()} if body else {}))
                return Done(changed=changed)
            try:
                return await _run(request, work)
            except HTTPException:
                if refused:  # rolled back with the attempt; logged on its own, as in the console
                    await _run(request, lambda s: _record(
                        s, actor, request, "edition.approve_refused", f"edition:{eid}",
                        reason=refused[0]))
                raise

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

    @api.get("/events", response_model=Calendar)
    async def calendar(request: Request, actor: Actor = viewer,
                       days: Annotated[int, Query(ge=1, le=400)] = 400) -> Calendar:
        """Dates of interest with their next occurrence, and the reminders due in `days`
        with their "not after" times."""
        zone = _web(request).settings.timezone

        def work(session: Session) -> Calendar:
            from zoneinfo import ZoneInfo

            now = utcnow()
            today = now.astimezone(ZoneInfo(zone)).date()
            return Calendar(
                events=[EventOut(slug=e.slug, name=e.name, yearly=e.yearly,
                                 next_date=events.next_occurrence(e, today),
                                 offsets=list(e.offsets or ()))
                        for e in events.list_events(session)],
                reminders=[ReminderOut(event=e.slug, occurrence=r.occurrence,
                                       offset_days=r.offset_days, send_at=r.send_at,
                                       not_after=r.not_after, status=r.status)
                           for r, e in events.upcoming(session, now,
                                                       now + dt.timedelta(days=days))])
        return await _run(request, work)

    @api.get("/bounce-alerts", response_model=list[BounceAlertOut])
    async def bounce_alerts(request: Request, actor: Actor = viewer) -> list[BounceAlertOut]:
        """The open bounce alerts. Every token sees them all (a domain and counts, nobody's
        address), as in the console; `can_resolve` says whether this one may close each."""
        every_region = tuple(_web(request).rules.regions)
        return await _run(request, lambda s: [
            BounceAlertOut(**{**vars(a), "regions": list(a.regions)})
            for a in _open_alerts(s, actor, every_region)])

    @api.post("/bounce-alerts/{aid}/resolve", response_model=ResolvedOut, responses={
        503: {"model": Problem, "description": "The bounce settings are wrong"}})
    async def bounce_alert_resolve(request: Request, aid: Id, data: ResolveIn,
                                   actor: Actor = Depends(_needs(RESOLVE_ALERT))
                                   ) -> ResolvedOut:
        """`mailer bounces resolve ID --apply|--dismiss`: only who covers the send's whole
        audience; an alert resolved already answers 409."""
        w = _web(request)
        every_region = tuple(w.rules.regions)
        try:
            policy = BouncePolicy.from_settings(w.settings)
        except MailerError as exc:
            raise HTTPException(503, f"the bounce settings are wrong: {exc}") from None

        def work(session: Session) -> ResolvedOut:
            try:
                alert, changed = resolve_bounce_alert(
                    session, policy, actor, aid, apply=data.apply, every_region=every_region,
                    via="api", ip=request.client.host if request.client else None)
            except AlertOutsideRegions as exc:
                raise HTTPException(403, f"{exc}; you can act only for "
                                    f"{', '.join(actor.regions or ())}") from None
            detail = (f"{changed} subscriber(s) at {alert.domain} marked bounced" if data.apply
                      else f"the held bounces from {alert.domain} change nobody")
            return ResolvedOut(id=aid, resolution="applied" if data.apply else "dismissed",
                               resolved_by=actor.login, marked_bounced=changed, detail=detail)
        return await _run(request, work)

    @api.get("/alerts", response_model=list[CoordinatorAlertOut])
    async def coordinator_alerts(request: Request, actor: Actor = viewer,
                                 limit: Annotated[int, Query(ge=1, le=200)] = 50
                                 ) -> list[CoordinatorAlertOut]:
        """The latest alerts to the co-ordinators, newest first: for a co-ordinator, those
        about their regions and those about every region."""
        return await _run(request, lambda s: [
            CoordinatorAlertOut(**{**vars(a), "regions": list(a.regions)})
            for a in _coordinator_alerts(s, actor, utcnow(), limit=limit)])

    @api.get("/audit", response_model=AuditPage)
    async def audit_log(request: Request,
                        actor: Actor = Depends(_needs(Permission.AUDIT_VIEW)),
                        who: Annotated[str | None, Query(alias="actor", max_length=100)] = None,
                        action: Annotated[str | None, Query(max_length=60)] = None,
                        target: Annotated[str | None, Query(max_length=160)] = None,
                        since: AwareDatetime | None = None, until: AwareDatetime | None = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 100,
                        offset: Annotated[int, Query(ge=0, le=10**7)] = 0) -> AuditPage:
        flt = audit.AuditFilter(actor=who, action=action, target=target, since=since,
                                until=until)

        def work(session: Session) -> AuditPage:
            total, rows = audit.entries(session, flt, limit=limit, offset=offset)
            return AuditPage(total=total, items=[AuditOut(**audit.as_dict(r)) for r in rows])
        return await _run(request, work)
