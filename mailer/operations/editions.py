"""Editions: read, save, put forward, approve (four eyes), schedule, send, control, preview and
test-send. Acting on an edition needs every region of its audience; seeing one needs one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from mailer import accounts, marking, outbox, revisions
from mailer.accounts import Permission
from mailer.config import Settings
from mailer.errors import Conflict, MailerError
from mailer.links import Links
from mailer.models import Edition, EditionStatus
from mailer.operations import Caller
from mailer.render import CompiledEdition, Recipient, personalise, preflight
from mailer.smtp import SendResult
from subscribers.db import session_scope

PREVIEW_READER = Recipient(email="reader@example.org", name="Preview Reader")
CONTROLS = {"pause": EditionStatus.PAUSED, "resume": EditionStatus.SENDING,
            "cancel": EditionStatus.CANCELLED}


def _target(edition: Edition) -> str:
    return f"edition:{edition.id}"


# ---------------------------------------------------------------- reads

def get(session: Session, caller: Caller, ident: int | str) -> Edition:
    """An edition whose audience reaches one of the caller's regions (or everyone)."""
    return outbox.get_edition(session, ident, caller.scope)


def listing(session: Session, caller: Caller, limit: int = 50) -> Sequence[Edition]:
    return outbox.list_editions(session, limit, caller.scope)


def upcoming(session: Session, caller: Caller, limit: int = 10) -> Sequence[Edition]:
    return outbox.upcoming_editions(session, limit, caller.scope)


def recent_sends(session: Session, caller: Caller, limit: int = 10) -> list[outbox.Progress]:
    return outbox.recent_sends(session, limit, caller.scope)


def progress(session: Session, caller: Caller, ident: int | str) -> outbox.Progress:
    return outbox.progress(session, get(session, caller, ident))


@dataclass(frozen=True)
class Preview:
    """An edition as a reader gets it, with placeholder links, and what preflight found."""

    edition: Edition
    html: str
    text: str
    warnings: list[str]
    audience: dict[str, dict[str, int]]
    left_out: int = 0  # OFFICIAL-SENSITIVE: in the audience, not on a secure domain


def preview(session: Session, caller: Caller, settings: Settings, ident: int | str
            ) -> Preview:
    edition = get(session, caller, ident)
    compiled = CompiledEdition.from_dict(edition.compiled)
    page = personalise(compiled, PREVIEW_READER, Links(settings).preview(edition.slug))
    left = outbox.left_out(session, edition)
    warnings = preflight(compiled) + ([marking.left_out_warning(left)] if left else [])
    return Preview(edition, page.html, page.text, warnings,
                   outbox.audience_breakdown(session, edition), left)


@dataclass(frozen=True)
class AudienceShown:
    """Who a send of the edition reaches, as the approver and the dry run see it: the saved
    segment it was stored from (if any), its fields in words, its topic and the count now."""

    segment: str | None
    words: str
    topic: str
    count: int


def audience(session: Session, caller: Caller, ident: int | str) -> AudienceShown:
    edition = get(session, caller, ident)
    return AudienceShown(edition.segment, outbox.audience_fields(edition).words(),
                         edition.topic, outbox.audience_count(session, edition))


@dataclass(frozen=True)
class Changes:
    """What changed in an edition since the text last approved (or put forward)."""

    baseline: revisions.EditionRevision | None
    current: revisions.EditionRevision | None
    rows: list[revisions.DiffRow]


def changes(session: Session, caller: Caller, ident: int | str) -> Changes:
    edition = get(session, caller, ident)
    base = revisions.baseline(session, edition)
    now = revisions.current(session, edition)
    rows = revisions.side_by_side(base.source, edition.source) if base is not None else []
    return Changes(base, now, rows)


def history(session: Session, caller: Caller, ident: int | str
            ) -> Sequence[revisions.EditionRevision]:
    return revisions.listing(session, get(session, caller, ident))


@dataclass(frozen=True)
class Draft:
    """Edition text as it would go out, not stored: the editor's live preview."""

    html: str
    text: str
    warnings: list[str]


def draft_preview(session: Session, caller: Caller, settings: Settings, slug: str,
                  source: str) -> Draft:
    """Validate and render text the author has not saved yet (raises the edition's errors)."""
    caller.require(Permission.EDITIONS_EDIT)
    _parsed, compiled = outbox.compile_source(session, settings, source.replace("\r\n", "\n"),
                                              f"{slug or 'new-edition'}.md")
    page = personalise(compiled, PREVIEW_READER, Links(settings).preview(slug or "preview"))
    return Draft(page.html, page.text, compiled.warnings)


def last_source(session: Session, caller: Caller) -> str | None:
    """The newest newsletter the caller can see: the start of the next one."""
    for edition in outbox.list_editions(session, 20, caller.scope):
        if edition.kind == "newsletter":
            return edition.source
    return None


# ---------------------------------------------------------------- writing and approval

def save(session: Session, caller: Caller, settings: Settings, slug: str, source: str
         ) -> tuple[Edition, bool]:
    """Validate, compile and store an edition's source (new, or a new version of the one with
    this slug, which withdraws its approval). Returns (edition, changed)."""
    caller.require(Permission.EDITIONS_EDIT)
    return _saved(session, caller, *outbox.store_edition_source(
        session, settings, slug, source.replace("\r\n", "\n"), caller.actor.login))


def save_file(session: Session, caller: Caller, settings: Settings, path: Path
              ) -> tuple[Edition, bool]:
    """`save` for an edition file: its name (without .md) is its slug."""
    caller.require(Permission.EDITIONS_EDIT)
    return _saved(session, caller, *outbox.store_edition_file(session, settings, path,
                                                              caller.actor.login))


def _saved(session: Session, caller: Caller, edition: Edition, changed: bool
           ) -> tuple[Edition, bool]:
    caller.require_cover(edition.regions)
    if changed:
        revision = revisions.keep(session, edition, caller.actor.login)
        caller.record(session, "edition.save", _target(edition), slug=edition.slug,
                      sha256=edition.source_sha256, revision=revision.number)
    return edition, changed


def request_approval(session: Session, caller: Caller, ident: int | str) -> bool:
    caller.require(Permission.EDITIONS_EDIT)
    edition = _acting_on(session, caller, ident)
    changed = outbox.request_approval(session, edition, caller.actor.login)
    if changed:
        revisions.mark(session, edition, put_forward_by=caller.actor.login)
        caller.record(session, "edition.request_approval", _target(edition),
                      sha256=edition.source_sha256)
    return changed


def approve(session: Session, caller: Caller, ident: int | str) -> bool:
    """Approve an edition someone else wrote and put forward. A refusal by the four-eyes rule
    is a step of the edition's history too: it is recorded on its own, since the attempt's
    transaction is rolled back, and then raised."""
    caller.require(Permission.EDITIONS_APPROVE)
    edition = _acting_on(session, caller, ident)
    try:
        changed = outbox.approve(session, edition, caller.actor.login)
    except outbox.ApprovalRefused as exc:
        with Session(session.get_bind()) as apart, apart.begin():
            caller.record(apart, "edition.approve_refused", _target(edition),
                          reason=str(exc))
        raise
    if changed:
        revisions.mark(session, edition, approved_by=caller.actor.login)
        caller.record(session, "edition.approve", _target(edition),
                      sha256=edition.source_sha256, author=edition.created_by,
                      requested_by=edition.approval_requested_by)
    return changed


# ---------------------------------------------------------------- sending

def schedule(session: Session, caller: Caller, settings: Settings, ident: int | str,
             when: datetime, *, move: bool = False) -> Edition:
    """Send at `when` (not past, not in the clock-change hours); `move`: a scheduled one only,
    to another time."""
    caller.require(Permission.EDITIONS_SEND)
    edition = _acting_on(session, caller, ident)
    at = when.astimezone(UTC)
    place = outbox.reschedule if move else outbox.schedule
    place(session, edition, caller.actor.login, at, require_approval=settings.require_approval)
    caller.record(session, "edition.reschedule" if move else "edition.schedule",
                  _target(edition), at=at.isoformat())
    return edition


def unschedule(session: Session, caller: Caller, ident: int | str) -> bool:
    caller.require(Permission.EDITIONS_SEND)
    edition = _acting_on(session, caller, ident)
    changed = outbox.unschedule(session, edition)
    if changed:
        caller.record(session, "edition.unschedule", _target(edition))
    return changed


def send(session: Session, caller: Caller, settings: Settings, ident: int | str) -> int:
    """Start sending now; how many messages were queued. Needs an approved edition unless the
    install does not require approval."""
    caller.require(Permission.EDITIONS_SEND)
    edition = _acting_on(session, caller, ident)
    if settings.require_approval:
        queued = outbox.send_approved(session, edition, caller.actor.login)
    else:
        queued = outbox.enqueue(session, edition)
    caller.record(session, "edition.send", _target(edition), queued=queued,
                  left_out=outbox.left_out(session, edition))
    return queued


def control(session: Session, caller: Caller, ident: int | str, action: str) -> bool:
    """Pause, resume or cancel a send; whether anything changed."""
    caller.require(Permission.EDITIONS_SEND)
    edition = _acting_on(session, caller, ident)
    target = CONTROLS[action]
    changed = outbox.set_status(session, edition, target,
                                reason=f"by {caller.actor.login}"
                                if target == EditionStatus.PAUSED else None)
    if changed:
        caller.record(session, f"edition.{action}", _target(edition))
    return changed


def resend_failed(session: Session, caller: Caller, ident: int | str,
                  include_unknown: bool = False) -> int:
    caller.require(Permission.EDITIONS_SEND)
    edition = _acting_on(session, caller, ident)
    queued = outbox.requeue_failed(session, edition, include_unknown)
    caller.record(session, "edition.resend_failed", _target(edition), queued=queued)
    return queued


def send_to_new(session: Session, caller: Caller, ident: int | str) -> int:
    caller.require(Permission.EDITIONS_SEND)
    edition = _acting_on(session, caller, ident)
    queued = outbox.send_to_new(session, edition)
    caller.record(session, "edition.send_to_new", _target(edition), queued=queued)
    return queued


def test_send(sessions: sessionmaker[Session], caller: Caller, settings: Settings,
              ident: int | str, colleagues: Sequence[str] = ()) -> list[str]:
    """A copy to the caller's own address, or to each named colleague's (console accounts
    only: never an address typed in), through the real relay; returns the addresses it went
    to. Each message is built and sent outside any transaction (a relay may take a while), and
    recorded, sent or refused, after; the first refusal stops the rest."""
    from mailer.outgoing import not_sent, send_now
    from mailer.reference import message_id
    from mailer.render import build_message

    caller.require(Permission.EDITIONS_EDIT)
    with session_scope(sessions) as session:
        edition = get(session, caller, ident)
        eid, slug, compiled = edition.id, edition.slug, edition.compiled
        readers = ([(caller.actor.email, caller.actor.name)] if not colleagues else
                   [(u.email, u.display_name)
                    for u in accounts.colleagues(session, colleagues)])
    if not all(to for to, _name in readers):
        raise Conflict("your account has no email address for test sends",
                       hint="ask an administrator to add one, or send it to colleagues")
    target, sent = f"edition:{eid}", []
    # Once for all the copies: the edition, its preview links and its test Message-ID.
    edition_once = CompiledEdition.from_dict(compiled)
    urls = Links(settings).preview(slug)
    test_id = message_id(settings.secret(), eid, 0, settings.from_address.rpartition("@")[2])
    for to, name in readers:
        assert to is not None
        try:
            data = build_message(edition_once, Recipient(email=to, name=name), urls,
                                 message_id=test_id)
            result: SendResult = send_now(settings, to, data)
        except MailerError as exc:  # a header refused, or the relay's address is wrong
            with session_scope(sessions) as session:
                caller.record(session, "edition.test_send", target, to=to, outcome="refused",
                              reason=str(exc))
            raise
        with session_scope(sessions) as session:
            caller.record(session, "edition.test_send", target, to=to,
                          outcome=str(result.outcome), code=result.code)
        if str(result.outcome) != "sent":
            raise not_sent(settings, result)
        sent.append(to)
    return sent


def _acting_on(session: Session, caller: Caller, ident: int | str) -> Edition:
    """An edition the caller may act on: they cover every region of its audience."""
    edition = get(session, caller, ident)
    caller.require_cover(edition.regions)
    return edition
