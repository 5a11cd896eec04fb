"""JSON API under /api/v1 for the console's operations, with its OpenAPI document at
/api/v1/openapi.json.

A face over `mailer.operations`, as the console is: the same permissions, region scope,
four-eyes rule and audit entries, because both call the same operations; their refusals become
HTTP statuses in one place, `_run`. Authentication is an API token (`Authorization: Bearer
msht_...`) made with `mailer users token`; it is stored hashed and acts as its user with at
most the role it was given. Cookies are never read here, so a browser session cannot be ridden
cross-site and the API needs no CSRF token.

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
from zoneinfo import ZoneInfo

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from mailer import audit, events
from mailer.accounts import Permission
from mailer.bounce_policy import BouncePolicy
from mailer.edition import EditionErrors
from mailer.errors import (
    EditionError,
    MailerError,
    NotAllowed,
    NotFound,
    OutOfScope,
    RelayRefused,
)
from mailer.models import Edition
from mailer.operations import Caller
from mailer.operations import alerts as alert_ops
from mailer.operations import audit_log as audit_ops
from mailer.operations import editions as edition_ops
from mailer.operations import events as event_ops
from mailer.operations import segments as segment_ops
from mailer.operations import subscribers as subscriber_ops
from mailer.operations import users as user_ops
from mailer.segments import AudienceFields
from mailer.web import runtime
from mailer.web.runtime import client_ip
from subscribers import importer, store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput, SubscriberError
from subscribers.errors import NotFound as SubscriberNotFound
from subscribers.models import SubscriberStatus

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
    ambiguous: int = Field(description="May have been sent twice: a copy may have arrived "
                                       "before the one sent (docs/design.md, crash policy)")
    taken_over: int = Field(description="Resent after a crash: claims taken over from a "
                                        "worker that died")
    once: int = Field(description="Certainly sent once")
    left_out: int = Field(0, description="OFFICIAL-SENSITIVE: readers in the audience left "
                                         "out, their address not on a secure domain")
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
    left_out: int = Field(0, description="OFFICIAL-SENSITIVE: readers in the audience who "
                                         "will be left out, their address not on a secure "
                                         "domain")


class EventOut(BaseModel):
    id: int
    slug: str
    name: str
    starts_on: dt.date
    ends_on: dt.date | None
    next_date: dt.date | None
    yearly: bool
    offsets: list[int]
    send_time: str = Field(description="UK wall-clock time, HH:MM")
    reminder_text: str
    description: str
    link: str | None
    topic: str
    weekend: str
    segment: str | None = None
    regions: list[str] = Field([], description="Its reminders' regions (none: every region)")


class EventIn(BaseModel):
    """A date of interest as typed; checked by the same rules as `mailer events add`."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    starts_on: dt.date
    ends_on: dt.date | None = None
    yearly: bool = False
    offsets: Annotated[list[Annotated[int, Field(ge=0, le=366)]],
                       Field(min_length=1, max_length=20)] = [14, 1]
    send_time: Annotated[str, Field(pattern=r"^\d\d:\d\d$")] = "09:00"
    reminder_text: Annotated[str, Field(max_length=2000)] = ""
    description: Annotated[str, Field(max_length=5000)] = ""
    link: Annotated[str | None, Field(max_length=500)] = None
    topic: Annotated[str, Field(min_length=1, max_length=40)] = "reminders"
    weekend: Literal["friday", "as_scheduled"] = "friday"
    segment: SegmentSlug | None = Field(None, description="A saved segment's slug, or:")
    audience: AudienceIn | None = Field(None, description="Who its reminders reach (none: "
                                                          "everyone on its topic)")

    def spec(self) -> events.EventSpec:
        return events.EventSpec(name=self.name, starts_on=self.starts_on, ends_on=self.ends_on,
                                yearly=self.yearly, offsets=list(self.offsets),
                                send_time=self.send_time, reminder_text=self.reminder_text,
                                description=self.description, link=self.link,
                                topic=self.topic, weekend=self.weekend, segment=self.segment,
                                audience=self.audience.fields() if self.audience
                                else AudienceFields())


VocabList = Annotated[list[Annotated[str, Field(min_length=1, max_length=60)]],
                      Field(max_length=50)]
SegmentSlug = Annotated[str, Field(min_length=1, max_length=60, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class AudienceIn(BaseModel):
    """An audience as lists; an empty list means every value."""

    regions: VocabList = []
    roles: VocabList = []
    organisation_types: VocabList = []
    topics: VocabList = Field([], description="Readers must also be on one of these topics")

    def fields(self) -> AudienceFields:
        return AudienceFields(list(self.regions), list(self.roles),
                              list(self.organisation_types), list(self.topics))


class SegmentChange(AudienceIn):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str, Field(max_length=2000)] = ""


class SegmentIn(SegmentChange):
    slug: SegmentSlug


class SegmentOut(BaseModel):
    slug: str
    name: str
    description: str
    regions: list[str]
    roles: list[str]
    organisation_types: list[str]
    topics: list[str]
    audience: str = Field(description="The audience in words")
    count: int = Field(description="Active readers it reaches now, on any topic")


class EditionAudienceOut(BaseModel):
    segment: str | None
    audience: str = Field(description="The audience in words")
    topic: str
    count: int = Field(description="Readers a send would queue now")


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


class ResendIn(BaseModel):
    include_unknown: bool = Field(False, description="Also the messages that may have "
                                  "arrived (no reply from the relay): they could go twice")


class TestSendIn(BaseModel):
    colleagues: list[Annotated[str, Field(min_length=1, max_length=60)]] = Field(
        default_factory=list, max_length=20,
        description="Console logins to send the test to; none: the token's own user")


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


def _web(request: Request) -> runtime.Web:
    return request.app.state.main.state.web  # type: ignore[no-any-return]


def _invalid(message: str, field: str) -> HTTPException:
    return HTTPException(422, message, headers={"X-Invalid-Field": field})


def _refusal(exc: MailerError | SubscriberError) -> HTTPException:
    """The one translation of an operation's refusal into an HTTP answer."""
    if isinstance(exc, (NotFound, SubscriberNotFound)):
        return HTTPException(404, str(exc))
    if isinstance(exc, (NotAllowed, OutOfScope)):
        return HTTPException(403, str(exc))
    if isinstance(exc, EditionErrors):
        return _invalid("; ".join(str(e) for e in exc.errors), "source")
    if isinstance(exc, EditionError):
        return _invalid(str(exc), "source")
    if isinstance(exc, InvalidInput):
        return _invalid(f"{exc.field}: {exc}", exc.field)
    if isinstance(exc, events.EventError):
        return _invalid(str(exc), "event")
    if isinstance(exc, RelayRefused):
        return HTTPException(502, str(exc))
    return HTTPException(409, str(exc))


async def _run(request: Request, work: Callable[[Session], T]) -> T:
    try:
        return await _web(request).run(work)
    except (MailerError, SubscriberError) as exc:
        raise _refusal(exc) from None


def _needs(permission: Permission) -> Callable[..., Any]:
    async def dependency(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Caller:
        actor = None
        presented = credentials.credentials.strip() if credentials is not None else ""
        if presented:
            actor = await _web(request).run(lambda s: user_ops.token_actor(s, presented))
        if actor is None:
            raise HTTPException(401, "a valid API token is needed",
                                headers={"WWW-Authenticate": "Bearer"})
        if actor.regions == ():
            # Tokens of an account with no region must not fall through to "every region".
            raise HTTPException(403, "your account has no regions")
        if not actor.can(permission):
            raise HTTPException(403, f"role {actor.role} may not do this")
        return Caller(actor=actor, via="api", ip=client_ip(request),
                      user_agent=request.headers.get("user-agent"))
    return dependency


def _edition_out(e: Edition) -> EditionOut:
    return EditionOut(id=e.id, slug=e.slug, title=e.title, subject=e.subject, topic=e.topic,
                      regions=list(e.regions), status=e.status, created_by=e.created_by,
                      approval_requested_by=e.approval_requested_by, approved_by=e.approved_by,
                      scheduled_by=e.scheduled_by, scheduled_for=e.scheduled_for)


def _event_out(e: events.Event, today: dt.date) -> EventOut:
    return EventOut(id=e.id, slug=e.slug, name=e.name, starts_on=e.starts_on, ends_on=e.ends_on,
                    next_date=events.next_occurrence(e, today), yearly=e.yearly,
                    offsets=list(e.offsets or ()), send_time=e.send_time,
                    reminder_text=e.reminder_text, description=e.description, link=e.link,
                    topic=e.topic, weekend=e.weekend, segment=e.segment,
                    regions=list(e.regions or ()))


def _subscriber_out(s: Any, topics: list[str]) -> SubscriberOut:
    return SubscriberOut(id=s.id, email=s.email, name=s.name, organisation=s.organisation,
                         organisation_type=s.organisation_type, role=s.role, region=s.region,
                         status=s.status, topics=topics)


def _with_topics(session: Session, s: Any) -> SubscriberOut:
    return _subscriber_out(s, store.active_topics(session, s.id))


def _filter(caller: Caller, status: SubscriberStatus | None, region: str | None,
            role: str | None, topic: str | None, q: str | None) -> Any:
    try:
        return subscriber_ops.filter_for(caller, status=status, region=region, role=role,
                                         topic=topic, search=q)
    except (MailerError, SubscriberError) as exc:
        raise _refusal(exc) from None


async def _save(request: Request, caller: Caller, slug: str, source: str) -> EditionOut:
    settings = _web(request).settings
    return await _run(request, lambda s: _edition_out(
        edition_ops.save(s, caller, settings, slug, source)[0]))


def _routes(api: FastAPI) -> None:
    viewer = Depends(_needs(Permission.VIEW))

    @api.get("/me", response_model=Me)
    async def me(caller: Caller = viewer) -> Me:
        actor = caller.actor
        return Me(login=actor.login, name=actor.name, role=actor.role,
                  regions=list(actor.regions) if actor.regions is not None else None)

    @api.get("/counts", response_model=Counts)
    async def counts(request: Request, caller: Caller = viewer) -> Counts:
        c = await _run(request, lambda s: subscriber_ops.counts(s, caller))
        return Counts(**vars(c))

    @api.get("/subscribers", response_model=SubscriberPage)
    async def subscribers(
            request: Request, caller: Caller = viewer, q: Q = None,
            status: SubscriberStatus | None = None, region: Region = None, role: Word = None,
            topic: Word = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
            offset: Annotated[int, Query(ge=0, le=10**7)] = 0) -> SubscriberPage:
        flt = _filter(caller, status, region, role, topic, q)

        def work(session: Session) -> SubscriberPage:
            total, rows = subscriber_ops.page(session, caller, flt, limit=limit, offset=offset)
            return SubscriberPage(total=total, items=[_subscriber_out(r, []) for r in rows])

        return await _run(request, work)

    # Before /subscribers/{sid}, which would otherwise take "export" for an id.
    @api.get("/subscribers/export", response_class=Response, responses={200: {
        "content": {"text/csv": {"schema": {"type": "string"}}},
        "description": "The subscribers matching the filter, as the console's CSV export"}})
    async def subscribers_export(
            request: Request, caller: Caller = Depends(_needs(Permission.SUBSCRIBERS_EXPORT)),
            q: Q = None, status: SubscriberStatus | None = None, region: Region = None,
            role: Word = None, topic: Word = None) -> Response:
        flt = _filter(caller, status, region, role, topic, q)

        def work(session: Session) -> str:
            out = io.StringIO()
            subscriber_ops.export(session, caller, flt, out)
            return out.getvalue()

        body = await _run(request, work)
        stamp = utcnow().strftime("%Y%m%d-%H%M")
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="subscribers-{stamp}.csv"'})

    @api.post("/subscribers", response_model=SubscriberOut, status_code=201)
    async def subscriber_add(request: Request, data: SubscriberIn, caller: Caller = Depends(
            _needs(Permission.SUBSCRIBERS_EDIT))) -> SubscriberOut:
        rules = _web(request).rules

        def work(session: Session) -> SubscriberOut:
            s = subscriber_ops.add(session, caller, rules, email=data.email, topics=data.topics,
                                   lawful_basis=data.lawful_basis, name=data.name,
                                   organisation=data.organisation,
                                   organisation_type=data.organisation_type, role=data.role,
                                   region=data.region)
            return _with_topics(session, s)
        return await _run(request, work)

    @api.get("/subscribers/{sid}", response_model=SubscriberOut)
    async def subscriber(request: Request, sid: Id, caller: Caller = viewer) -> SubscriberOut:
        return await _run(request, lambda s: _with_topics(s, subscriber_ops.get(s, caller, sid)))

    @api.get("/subscribers/{sid}/history", response_model=SubscriberHistory)
    async def subscriber_history(request: Request, sid: Id, caller: Caller = viewer
                                 ) -> SubscriberHistory:
        def work(session: Session) -> SubscriberHistory:
            record = subscriber_ops.history(session, caller, sid)
            return SubscriberHistory(**{k: record[k] for k in SubscriberHistory.model_fields})
        return await _run(request, work)

    @api.patch("/subscribers/{sid}", response_model=SubscriberOut)
    async def subscriber_edit(request: Request, sid: Id, data: SubscriberChange,
                              caller: Caller = Depends(_needs(Permission.SUBSCRIBERS_EDIT))
                              ) -> SubscriberOut:
        rules = _web(request).rules
        fields = {k: getattr(data, k) for k in data.model_fields_set}

        def work(session: Session) -> SubscriberOut:
            subscriber_ops.edit(session, caller, rules, sid, fields)
            return _with_topics(session, subscriber_ops.get(session, caller, sid))
        return await _run(request, work)

    @api.delete("/subscribers/{sid}", response_model=Done)
    async def subscriber_erase(request: Request, sid: Id, caller: Caller = Depends(
            _needs(Permission.SUBSCRIBERS_ERASE))) -> Done:
        """Erase the person everywhere (UK GDPR Art. 17); their address stays suppressed."""
        def work(session: Session) -> Done:
            subscriber_ops.erase(session, caller, sid)
            return Done(changed=True)
        return await _run(request, work)

    @api.post("/subscribers/import", response_model=ImportOut, openapi_extra={
        "requestBody": {"required": True, "content": {"text/csv": {"schema": {
            "type": "string"}}}}})
    async def subscribers_import(
            request: Request, lawful_basis: LawfulBasis,
            apply: Annotated[bool, Query(description="False (the default) only reports what "
                                         "would happen")] = False,
            filename: Annotated[str, Query(max_length=200, description="The file's name, for "
                                           "the report and the audit log")] = "upload.csv",
            caller: Caller = Depends(_needs(Permission.SUBSCRIBERS_IMPORT))) -> ImportOut:
        w = _web(request)
        try:
            subscriber_ops.require_import(caller, w.rules)
        except MailerError as exc:
            raise _refusal(exc) from None
        data = await request.body()
        options = importer.Options(lawful_basis=lawful_basis,
                                   source=FilePath(filename).name or "upload.csv",
                                   actor=caller.actor.login)
        with tempfile.TemporaryDirectory() as tmp:
            path = FilePath(tmp) / "upload.csv"
            path.write_bytes(data)
            try:
                report = await run_in_threadpool(
                    lambda: subscriber_ops.import_file(w.sessions, caller, w.rules, path,
                                                       options, apply=apply))
            except (MailerError, SubscriberError) as exc:
                raise _invalid(str(exc), "body") from None

        def rows(problems: list[Any]) -> list[ImportRow]:
            return [ImportRow(line=p.line, field=p.field, message=p.message) for p in problems]
        return ImportOut(applied=report.applied, sha256=report.sha256, rows=report.rows,
                         new=report.new, existing=len(report.existing),
                         kept_out=rows(report.kept_out), errors=rows(report.errors),
                         warnings=report.warnings)

    def subscriber_change(name: str, act: Callable[[Session, Caller, int], bool]) -> None:
        @api.post(f"/subscribers/{{sid}}/{name}", response_model=Done, name=f"subscriber_{name}")
        async def change(request: Request, sid: Id,
                         caller: Caller = Depends(_needs(Permission.SUBSCRIBERS_EDIT))) -> Done:
            return await _run(request, lambda s: Done(changed=act(s, caller, sid)))

    settings = api.state.main.state.web.settings  # built before the API is mounted
    subscriber_change("approve", lambda s, c, sid: subscriber_ops.decide(
        s, c, settings, sid, approve=True))
    subscriber_change("reject", lambda s, c, sid: subscriber_ops.decide(
        s, c, settings, sid, approve=False))
    subscriber_change("unsubscribe", subscriber_ops.unsubscribe)

    @api.get("/editions", response_model=list[EditionOut])
    async def editions(request: Request, caller: Caller = viewer,
                       limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[EditionOut]:
        return await _run(request, lambda s: [_edition_out(e)
                                              for e in edition_ops.listing(s, caller, limit)])

    @api.post("/editions", response_model=EditionOut, status_code=201)
    async def edition_upload(request: Request, data: EditionIn, caller: Caller = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> EditionOut:
        """Upload a new edition, or a new version of the one with this slug (which withdraws
        its approval)."""
        return await _save(request, caller, data.slug, data.source)

    @api.get("/editions/{eid}", response_model=EditionOut)
    async def edition(request: Request, eid: Id, caller: Caller = viewer) -> EditionOut:
        return await _run(request, lambda s: _edition_out(edition_ops.get(s, caller, eid)))

    @api.put("/editions/{eid}/source", response_model=EditionOut)
    async def edition_edit(request: Request, eid: Id, data: SourceIn, caller: Caller = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> EditionOut:
        slug = await _run(request, lambda s: edition_ops.get(s, caller, eid).slug)
        return await _save(request, caller, slug, data.source)

    @api.get("/editions/{eid}/preview", response_model=PreviewOut)
    async def edition_preview(request: Request, eid: Id, caller: Caller = viewer
                              ) -> PreviewOut:
        """The HTML and plain-text parts as a reader would get them, and the preflight
        warnings. Its links are placeholders, never a real subscriber's."""
        settings = _web(request).settings

        def work(session: Session) -> PreviewOut:
            seen = edition_ops.preview(session, caller, settings, eid)
            return PreviewOut(html=seen.html, text=seen.text, warnings=seen.warnings,
                              audience=seen.audience, left_out=seen.left_out)
        return await _run(request, work)

    @api.post("/editions/{eid}/test-send", response_model=Done)
    async def edition_test_send(request: Request, eid: Id, data: TestSendIn | None = None,
                                caller: Caller = Depends(_needs(Permission.EDITIONS_EDIT))
                                ) -> Done:
        """One copy to the token's own user, or to each named colleague (console accounts
        with an address), through the real relay."""
        w = _web(request)
        try:
            sent = await run_in_threadpool(edition_ops.test_send, w.sessions, caller,
                                           w.settings, eid, data.colleagues if data else [])
        except (NotFound, NotAllowed, OutOfScope, RelayRefused) as exc:
            raise _refusal(exc) from None
        except MailerError as exc:  # no address, a colleague unknown, or a header refused
            raise HTTPException(409, f"the test message could not be sent: {exc}") from None
        return Done(changed=True, detail=f"sent to {', '.join(sent)}")

    @api.post("/editions/{eid}/resend-failed", response_model=Done)
    async def edition_resend_failed(request: Request, eid: Id, data: ResendIn | None = None,
                                    caller: Caller = Depends(_needs(Permission.EDITIONS_SEND))
                                    ) -> Done:
        """Queue the failed deliveries again (and, if asked, those that may have arrived)."""
        unknown = bool(data and data.include_unknown)
        queued = await _run(request, lambda s: edition_ops.resend_failed(
            s, caller, eid, include_unknown=unknown))
        return Done(changed=queued > 0, detail=f"{queued} queued")

    @api.post("/editions/{eid}/send-to-new", response_model=Done)
    async def edition_send_to_new(request: Request, eid: Id, caller: Caller = Depends(
            _needs(Permission.EDITIONS_SEND))) -> Done:
        """Send an edition that went out to the people who joined since."""
        queued = await _run(request, lambda s: edition_ops.send_to_new(s, caller, eid))
        return Done(changed=queued > 0, detail=f"{queued} queued")

    @api.get("/editions/{eid}/audience", response_model=EditionAudienceOut)
    async def edition_audience(request: Request, eid: Id, caller: Caller = viewer
                               ) -> EditionAudienceOut:
        """Who a send would reach: its segment, the audience in words and the count now."""
        def work(session: Session) -> EditionAudienceOut:
            shown = edition_ops.audience(session, caller, eid)
            return EditionAudienceOut(segment=shown.segment, audience=shown.words,
                                      topic=shown.topic, count=shown.count)
        return await _run(request, work)

    def _segment_out(shown: segment_ops.Counted) -> SegmentOut:
        g = shown.segment
        return SegmentOut(slug=g.slug, name=g.name, description=g.description,
                          regions=list(g.regions), roles=list(g.roles),
                          organisation_types=list(g.organisation_types), topics=list(g.topics),
                          audience=shown.fields.words(), count=shown.count)

    @api.get("/segments", response_model=list[SegmentOut])
    async def segment_list(request: Request, caller: Caller = viewer) -> list[SegmentOut]:
        """The saved segments this token's regions can see, each with its live count."""
        return await _run(request, lambda s: [
            _segment_out(segment_ops.counted(s, caller, g.slug))
            for g in segment_ops.listing(s, caller)])

    @api.get("/segments/{slug}", response_model=SegmentOut)
    async def segment_get(request: Request, slug: SegmentSlug, caller: Caller = viewer
                          ) -> SegmentOut:
        return await _run(request, lambda s: _segment_out(segment_ops.counted(s, caller, slug)))

    @api.post("/segments", response_model=SegmentOut, status_code=201)
    async def segment_add(request: Request, data: SegmentIn, caller: Caller = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> SegmentOut:
        """Save a segment; it may reach only regions this token's account covers."""
        def work(session: Session) -> SegmentOut:
            made = segment_ops.add(session, caller, settings, slug=data.slug, name=data.name,
                                   description=data.description, fields=data.fields())
            return _segment_out(segment_ops.counted(session, caller, made.slug))
        return await _run(request, work)

    @api.put("/segments/{slug}", response_model=SegmentOut)
    async def segment_edit(request: Request, slug: SegmentSlug, data: SegmentChange,
                           caller: Caller = Depends(_needs(Permission.EDITIONS_EDIT))
                           ) -> SegmentOut:
        """Change a segment. Editions and events already saved keep their audience."""
        def work(session: Session) -> SegmentOut:
            segment_ops.edit(session, caller, settings, slug, name=data.name,
                             description=data.description, fields=data.fields())
            return _segment_out(segment_ops.counted(session, caller, slug))
        return await _run(request, work)

    @api.delete("/segments/{slug}", response_model=Done)
    async def segment_remove(request: Request, slug: SegmentSlug, caller: Caller = Depends(
            _needs(Permission.EDITIONS_EDIT))) -> Done:
        def work(session: Session) -> Done:
            segment_ops.remove(session, caller, slug)
            return Done(changed=True, detail=f"removed segment '{slug}'")
        return await _run(request, work)

    @api.get("/editions/{eid}/progress", response_model=ProgressOut)
    async def edition_progress(request: Request, eid: Id, caller: Caller = viewer
                               ) -> ProgressOut:
        def work(session: Session) -> ProgressOut:
            p = edition_ops.progress(session, caller, eid)
            return ProgressOut(edition_id=p.edition_id, status=p.status, counts=p.counts,
                               ambiguous=p.ambiguous, taken_over=p.taken_over, once=p.once,
                               left_out=p.left_out, total=p.total, remaining=p.remaining)
        return await _run(request, work)

    def edition_step(name: str, permission: Permission,
                     step: Callable[[Session, Caller, int, Any], bool],
                     body: bool = False) -> None:
        needs = Depends(_needs(permission))

        async def perform(request: Request, eid: int, caller: Caller, data: Any) -> Done:
            return await _run(request, lambda s: Done(changed=step(s, caller, eid, data)))

        if body:
            @api.post(f"/editions/{{eid}}/{name}", response_model=Done, name=f"edition_{name}")
            async def with_body(request: Request, eid: Id, data: ScheduleIn,
                                caller: Caller = needs) -> Done:
                return await perform(request, eid, caller, data)
        else:
            @api.post(f"/editions/{{eid}}/{name}", response_model=Done, name=f"edition_{name}")
            async def without_body(request: Request, eid: Id, caller: Caller = needs) -> Done:
                return await perform(request, eid, caller, None)

    edition_step("request-approval", Permission.EDITIONS_EDIT,
                 lambda s, c, eid, _: edition_ops.request_approval(s, c, eid))
    edition_step("approve", Permission.EDITIONS_APPROVE,
                 lambda s, c, eid, _: edition_ops.approve(s, c, eid))
    edition_step("schedule", Permission.EDITIONS_SEND,
                 lambda s, c, eid, data: edition_ops.schedule(s, c, settings, eid,
                                                              data.at) is not None, body=True)
    edition_step("send", Permission.EDITIONS_SEND,
                 lambda s, c, eid, _: edition_ops.send(s, c, settings, eid) >= 0)
    def control(action: str) -> Callable[[Session, Caller, int, Any], bool]:
        return lambda s, c, eid, _: edition_ops.control(s, c, eid, action)

    for action in edition_ops.CONTROLS:
        edition_step(action, Permission.EDITIONS_SEND, control(action))

    @api.get("/events", response_model=Calendar)
    async def calendar(request: Request, caller: Caller = viewer,
                       days: Annotated[int, Query(ge=1, le=400)] = 400) -> Calendar:
        """Dates of interest with their next occurrence, and the reminders due in `days`
        with their "not after" times."""
        zone = _web(request).settings.timezone

        def work(session: Session) -> Calendar:
            now = utcnow()
            today = now.astimezone(ZoneInfo(zone)).date()
            return Calendar(
                events=[_event_out(e, today) for e in events.list_events(session)],
                reminders=[ReminderOut(event=e.slug, occurrence=r.occurrence,
                                       offset_days=r.offset_days, send_at=r.send_at,
                                       not_after=r.not_after, status=r.status)
                           for r, e in events.upcoming(session, now,
                                                       now + dt.timedelta(days=days))])
        return await _run(request, work)

    def today_uk() -> dt.date:
        return utcnow().astimezone(ZoneInfo(settings.timezone)).date()

    @api.post("/events", response_model=EventOut, status_code=201)
    async def event_add(request: Request, data: EventIn, caller: Caller = Depends(
            _needs(Permission.EDITIONS_SEND))) -> EventOut:
        """Add a date of interest; its reminders are planned at once."""
        return await _run(request, lambda s: _event_out(
            event_ops.add(s, caller, data.spec(), settings), today_uk()))

    @api.put("/events/{event_id}", response_model=EventOut)
    async def event_update(request: Request, event_id: Id, data: EventIn,
                           caller: Caller = Depends(_needs(Permission.EDITIONS_SEND))
                           ) -> EventOut:
        """Change an event (it keeps its slug); its unsent reminders are planned again."""
        return await _run(request, lambda s: _event_out(
            event_ops.update(s, caller, event_id, data.spec(), settings), today_uk()))

    @api.delete("/events/{event_id}", response_model=Done)
    async def event_remove(request: Request, event_id: Id, caller: Caller = Depends(
            _needs(Permission.EDITIONS_SEND))) -> Done:
        """Remove an event and its reminders not yet sent."""
        def work(session: Session) -> Done:
            name, dropped = event_ops.remove(session, caller, event_id)
            return Done(changed=True, detail=f"removed '{name}' and {dropped} planned "
                                             "reminder(s)")
        return await _run(request, work)

    @api.get("/bounce-alerts", response_model=list[BounceAlertOut])
    async def bounce_alerts(request: Request, caller: Caller = viewer
                            ) -> list[BounceAlertOut]:
        """The open bounce alerts. Every token sees them all (a domain and counts, nobody's
        address), as in the console; `can_resolve` says whether this one may close each."""
        every_region = tuple(_web(request).rules.regions)
        return await _run(request, lambda s: [
            BounceAlertOut(**{**vars(a), "regions": list(a.regions)})
            for a in alert_ops.open_bounce_alerts(s, caller, every_region)])

    @api.post("/bounce-alerts/{aid}/resolve", response_model=ResolvedOut, responses={
        503: {"model": Problem, "description": "The bounce settings are wrong"}})
    async def bounce_alert_resolve(request: Request, aid: Id, data: ResolveIn,
                                   caller: Caller = Depends(_needs(alert_ops.RESOLVE_ALERT))
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
            alert, changed = alert_ops.resolve_bounce_alert(
                session, caller, policy, aid, apply=data.apply, every_region=every_region)
            detail = (f"{changed} subscriber(s) at {alert.domain} marked bounced" if data.apply
                      else f"the held bounces from {alert.domain} change nobody")
            return ResolvedOut(id=aid, resolution="applied" if data.apply else "dismissed",
                               resolved_by=caller.actor.login, marked_bounced=changed,
                               detail=detail)
        try:
            return await _web(request).run(work)
        except OutOfScope as exc:
            raise HTTPException(403, f"{exc}; you can act only for "
                                f"{', '.join(caller.scope or ())}") from None
        except (MailerError, SubscriberError) as exc:
            raise _refusal(exc) from None

    @api.get("/alerts", response_model=list[CoordinatorAlertOut])
    async def coordinator_alerts(request: Request, caller: Caller = viewer,
                                 limit: Annotated[int, Query(ge=1, le=200)] = 50
                                 ) -> list[CoordinatorAlertOut]:
        """The latest alerts to the co-ordinators, newest first: for a co-ordinator, those
        about their regions and those about every region."""
        return await _run(request, lambda s: [
            CoordinatorAlertOut(**{**vars(a), "regions": list(a.regions)})
            for a in alert_ops.coordinator_alerts(s, caller, utcnow(), limit=limit)])

    @api.get("/audit", response_model=AuditPage)
    async def audit_log(request: Request,
                        caller: Caller = Depends(_needs(Permission.AUDIT_VIEW)),
                        who: Annotated[str | None, Query(alias="actor", max_length=100)] = None,
                        action: Annotated[str | None, Query(max_length=60)] = None,
                        target: Annotated[str | None, Query(max_length=160)] = None,
                        since: AwareDatetime | None = None, until: AwareDatetime | None = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 100,
                        offset: Annotated[int, Query(ge=0, le=10**7)] = 0) -> AuditPage:
        flt = audit.AuditFilter(actor=who, action=action, target=target, since=since,
                                until=until)

        def work(session: Session) -> AuditPage:
            total, rows = audit_ops.entries(session, caller, flt, limit=limit, offset=offset)
            return AuditPage(total=total, items=[AuditOut(**vars(r)) for r in rows])
        return await _run(request, work)
