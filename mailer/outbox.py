"""Every query on editions and deliveries: store, enqueue, claim, record, control, progress.

The outbox is the source of truth for who gets what. Enqueue is one set-based
`INSERT ... SELECT ... ON CONFLICT DO NOTHING` of the edition's segment, in the same transaction
that moves the edition to `sending`: running it twice (a double click, a scheduler firing twice,
`send-to-new`) adds only people who have no row yet. Workers claim small batches under a lease
(`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite one worker per file holds a lock instead) and
record each result with a guard on the row's state, so a worker whose lease was taken over
cannot overwrite what its successor recorded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    and_,
    bindparam,
    case,
    false,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from mailer import audience as audience_rule
from mailer.config import Settings
from mailer.deadline import too_late
from mailer.edition import Edition as ParsedEdition
from mailer.errors import Conflict, EditionError, MailerError, NotAllowed, NotFound
from mailer.marking import NOT_SECURE, ArchiveVisibility
from mailer.models import (
    DUE,
    FINAL,
    PERSONAL,
    STARTABLE,
    Delivery,
    DeliveryReason,
    DeliveryStatus,
    Edition,
    EditionKind,
    EditionStatus,
)
from mailer.render import CompiledEdition, compile_edition
from mailer.segments import AudienceFields
from subscribers import store
from subscribers.db import changed_rows, utcnow
from subscribers.models import Subscriber, Topic
from subscribers.regions import Scope, within
from subscribers.validation import in_domains


class EditionConflict(Conflict):
    """The request does not fit the edition's state (already sent, cancelled, ...)."""


# ---------------------------------------------------------------- editions

def store_edition(session: Session, *, slug: str, title: str, subject: str, topic: str,
                  regions: Sequence[str], roles: Sequence[str], source: str,
                  compiled: dict[str, Any], actor: str | None,
                  kind: EditionKind = EditionKind.NEWSLETTER,
                  not_after: datetime | None = None,
                  organisation_types: Sequence[str] = (),
                  audience_topics: Sequence[str] = (),
                  segment: str | None = None) -> tuple[Edition, bool]:
    """Record an edition, or find the one already recorded from the same source.

    Returns (edition, created). The same slug with the same source is the same edition, so
    sending a file twice never makes a second send. A changed source may replace a draft; once
    a send has started, a corrected edition needs a new slug.
    """
    store.get_topic(session, topic)  # refuses an unknown topic with the list of known ones
    digest = hashlib.sha256(source.encode()).hexdigest()
    existing = session.scalar(select(Edition).where(Edition.slug == slug))
    if existing is not None:
        if existing.source_sha256 == digest:
            return existing, False
        if existing.status not in STARTABLE:
            raise EditionConflict(
                f"edition '{slug}' is {existing.status} and its source has changed since",
                hint="give the corrected edition a new slug (file name), e.g. "
                     f"'{slug}-corrected'")
        edition = existing
    else:
        edition = Edition(slug=slug, created_by=actor)
        session.add(edition)
    edition.kind = kind
    edition.title, edition.subject, edition.topic = title, subject, topic
    edition.regions, edition.roles = list(regions), list(roles)
    edition.organisation_types = list(organisation_types)
    edition.audience_topics, edition.segment = list(audience_topics), segment
    edition.source, edition.source_sha256, edition.compiled = source, digest, compiled
    edition.not_after = not_after
    # Only a public edition is listed, in the feed and open to anyone (mailer.marking).
    edition.public = compiled.get("archive", ArchiveVisibility.PUBLIC) == ArchiveVisibility.PUBLIC
    session.flush()
    return edition, existing is None


def store_edition_file(session: Session, settings: Settings, path: Path,
                       actor: str | None) -> tuple[Edition, bool]:
    """`store_edition_source` for an edition file: its name is its slug, and problems are
    placed in it by its path."""
    try:
        source = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EditionError(f"cannot read it: {exc}", location=str(path),
                           hint="an edition is a UTF-8 text (.md) file") from None
    return store_edition_source(session, settings, path.stem, source, actor, where=str(path))


def get_edition(session: Session, ident: str | int, scope: Scope = None) -> Edition:
    """An edition by id or by slug, within a region scope (`subscribers.regions.within`: its
    audience shares a region with the scope, or is everyone); another is not found."""
    query = select(Edition).where(within(scope, Edition.regions))
    if isinstance(ident, int) or str(ident).isdigit():
        query = query.where(Edition.id == int(ident))
    else:
        query = query.where(Edition.slug == ident)
    edition = session.scalar(query)
    if edition is None:
        raise NotFound(f"no edition '{ident}'", hint="`mailer edition list` shows them")
    return edition


def edition_exists(session: Session, slug: str) -> bool:
    return session.scalar(select(Edition.id).where(Edition.slug == slug)) is not None


def list_editions(session: Session, limit: int = 50, scope: Scope = None) -> Sequence[Edition]:
    return session.scalars(select(Edition).where(within(scope, Edition.regions), _NOT_PERSONAL)
                           .order_by(Edition.id.desc()).limit(limit)).all()


# Welcome and declined mails are one delivery each, as many as sign-ups: kept out of the lists
# of sends, where they would bury the newsletters and reminders.
_NOT_PERSONAL = Edition.kind.not_in(sorted(PERSONAL))


def secure_domains(edition: Edition) -> list[str] | None:
    """The only domains an OFFICIAL-SENSITIVE edition may go to (as compiled, so as its
    approver saw them), or None: it may go to anyone in its audience."""
    domains = (edition.compiled or {}).get("secure_domains")
    return None if domains is None else [str(d) for d in domains]


def audience(edition: Edition, *, left_out: bool = False) -> Select[int]:
    """Who the edition goes to; with `left_out`, who its topic and segment name but its
    marking keeps it from (an address not on a secure domain). The one place the marking's
    rule meets the audience: the dry run, the approval screen, the enqueue and the status all
    count through here."""
    query = store.segment([edition.topic], edition.regions, edition.roles,
                          edition.organisation_types, also_topics=edition.audience_topics or ())
    domains = secure_domains(edition)
    if domains is None:
        return query.where(false()) if left_out else query
    secure = store.at_domains(domains)
    return query.where(~secure if left_out else secure)


def left_out(session: Session, edition: Edition) -> int:
    """How many in the audience the edition may not go to: recorded by the send once it is
    queued, counted live before."""
    if secure_domains(edition) is None:
        return 0
    recorded = session.scalar(select(func.count()).select_from(Delivery).where(
        Delivery.edition_id == edition.id, Delivery.reason == DeliveryReason.NOT_SECURE)) or 0
    if edition.started_at is not None:
        return recorded
    return session.scalar(select(func.count()).select_from(
        audience(edition, left_out=True).subquery())) or 0


def audience_fields(edition: Edition) -> AudienceFields:
    return AudienceFields(list(edition.regions), list(edition.roles),
                          list(edition.organisation_types), list(edition.audience_topics or ()))


def audience_count(session: Session, edition: Edition) -> int:
    """How many readers a send of this edition would queue now (before any are queued)."""
    return session.scalar(select(func.count()).select_from(audience(edition).subquery())) or 0


def audience_breakdown(session: Session, edition: Edition) -> dict[str, dict[str, int]]:
    """Who a send would reach, by region and by role: what a dry run prints."""
    ids = audience(edition).subquery()
    out: dict[str, dict[str, int]] = {}
    for label, column in (("region", Subscriber.region), ("role", Subscriber.role)):
        rows = session.execute(select(column, func.count()).join(ids, ids.c.id == Subscriber.id)
                               .group_by(column).order_by(func.count().desc())).all()
        out[label] = {value or "(not given)": n for value, n in rows}
    return out


def _insert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Delivery.__table__)


_ROW = ["edition_id", "subscriber_id", "status", "attempts", "ambiguous", "queued_at",
        "next_attempt_at", "reason", "last_reply"]
# Rows that are messages: a left-out reader's row records a decision, not a send.
_NOT_LEFT_OUT = or_(Delivery.reason.is_(None), Delivery.reason != DeliveryReason.NOT_SECURE)


def _rows(edition: Edition, who: Select[int], now: datetime, status: DeliveryStatus,
          reason: DeliveryReason | None = None, reply: str | None = None) -> Select[Any]:
    ids = who.subquery()
    # literal(True) in the WHERE: SQLite's upsert needs one to tell ON CONFLICT from a join.
    return select(literal(edition.id), ids.c.id, literal(status.value), literal(0),
                  literal(False), literal(now), literal(now),
                  literal(reason.value if reason else None, String()),
                  literal(reply, String())).select_from(ids).where(literal(True))


def enqueue(session: Session, edition: Edition, *, now: datetime | None = None) -> int:
    """Queue one delivery per person in the edition's audience who has none yet; start the send.

    One `INSERT ... SELECT`, so memory stays flat however large the list. Returns how many
    messages were queued (0 when run again: the unique key absorbs repeats). An
    OFFICIAL-SENSITIVE edition's readers off its secure domains get a skipped row saying so.
    """
    if edition.status not in STARTABLE and edition.status != EditionStatus.SENDING:
        raise EditionConflict(f"edition '{edition.slug}' is {edition.status}; it cannot be sent",
                              hint="`mailer edition resume` continues a paused send")
    now = now or utcnow()
    statements = [_insert(session).from_select(_ROW, _rows(edition, audience(edition), now,
                                                           DeliveryStatus.QUEUED))
                  .on_conflict_do_nothing()]
    if secure_domains(edition) is not None:
        # Left out, and recorded as such: the status counts them from the outbox, and their
        # row keeps a later send-to-new from queueing them.
        statements.append(_insert(session).from_select(_ROW, _rows(
            edition, audience(edition, left_out=True), now, DeliveryStatus.SKIPPED,
            DeliveryReason.NOT_SECURE, f"not sent: {NOT_SECURE}")).on_conflict_do_nothing())
    # rowcount of INSERT ... SELECT is not reported by every driver (psycopg gives -1 here):
    # the edition's row count before and after is, and costs one index scan each.
    def rows() -> int:
        return session.scalar(select(func.count()).select_from(Delivery)
                              .where(Delivery.edition_id == edition.id, _NOT_LEFT_OUT)) or 0
    before = rows()
    for stmt in statements:
        session.execute(stmt)
    added = rows() - before
    if added >= 1000 and session.get_bind().dialect.name == "postgresql":
        # The claims that follow read index ranges that the planner only picks once it
        # knows the table grew; autovacuum would tell it minutes later. The send-time
        # re-check reads the subscriber tables: without statistics (rows loaded outside an
        # import) PostgreSQL walked the whole topic for each claim, 733 ms instead of 0.6 ms.
        session.execute(text("ANALYZE delivery"))
        store.refresh_statistics(session)
    if edition.status != EditionStatus.SENDING:
        edition.status = EditionStatus.SENDING
        edition.started_at = edition.started_at or now
        edition.finished_at = None
    session.flush()
    return added


def enqueue_one(session: Session, edition: Edition, subscriber_id: int, *,
                now: datetime | None = None) -> None:
    """Queue a mail to one person (a welcome, a declined notice) and start its send: the
    worker's claim re-checks it at send time like any other delivery."""
    now = now or utcnow()
    session.add(Delivery(edition_id=edition.id, subscriber_id=subscriber_id,
                         status=DeliveryStatus.QUEUED, queued_at=now, next_attempt_at=now))
    edition.status, edition.started_at = EditionStatus.SENDING, now
    session.flush()


def set_status(session: Session, edition: Edition, status: EditionStatus,
               reason: str | None = None) -> bool:
    """Pause, resume or cancel; guarded, idempotent. Returns whether anything changed."""
    allowed = {
        EditionStatus.PAUSED: {EditionStatus.SENDING},
        EditionStatus.SENDING: {EditionStatus.PAUSED},
        EditionStatus.CANCELLED: {*STARTABLE, EditionStatus.SENDING, EditionStatus.PAUSED},
    }[status]
    if edition.status == status:
        return False
    if (status == EditionStatus.SENDING and edition.status == EditionStatus.PAUSED
            and edition.started_at is None and edition.scheduled_for is not None):
        status = EditionStatus.SCHEDULED  # paused before it started (a restore): rescheduled
    if edition.status not in allowed:
        raise EditionConflict(f"edition '{edition.slug}' is {edition.status}; cannot make it "
                              f"{status}")
    edition.status = status
    edition.paused_reason = reason if status == EditionStatus.PAUSED else None
    if status == EditionStatus.CANCELLED:
        session.execute(update(Delivery).where(Delivery.edition_id == edition.id,
                                               Delivery.status.in_(list(DUE)))
                        .values(status=DeliveryStatus.SKIPPED, last_reply="cancelled",
                                reason=DeliveryReason.CANCELLED))
        edition.finished_at = utcnow()
    session.flush()
    return True


def pause_all(session: Session, reason: str) -> list[str]:
    """Pause every send that is going out or scheduled (after a restore: nothing goes out until
    a co-ordinator has checked and resumed it). Returns the slugs paused."""
    paused = list(session.scalars(
        update(Edition).where(Edition.status.in_([EditionStatus.SENDING,
                                                   EditionStatus.SCHEDULED]))
        .values(status=EditionStatus.PAUSED, paused_reason=reason[:500])
        .returning(Edition.slug)))
    session.flush()
    return sorted(paused)


def halt(session: Session, edition_id: int, reason: str) -> bool:
    """Stop a send because our side is broken (the relay refused us): pause it with the reason.
    True for the one caller that stopped it (several sessions may see the refusal at once)."""
    return changed_rows(session.execute(update(Edition).where(Edition.id == edition_id,
                                                 Edition.status == EditionStatus.SENDING)
                           .values(status=EditionStatus.PAUSED, paused_reason=reason[:500])
                           )) == 1


def requeue_failed(session: Session, edition: Edition, include_unknown: bool = False) -> int:
    """Give failed (and optionally unknown) deliveries another go; the send resumes."""
    statuses = [DeliveryStatus.FAILED] + ([DeliveryStatus.UNKNOWN] if include_unknown else [])
    moved = changed_rows(session.execute(
        update(Delivery).where(Delivery.edition_id == edition.id,
                               Delivery.status.in_(statuses))
        .values(status=DeliveryStatus.QUEUED, next_attempt_at=utcnow(), attempts=0,
                reason=None)))
    if moved and edition.status in (EditionStatus.SENT, EditionStatus.PAUSED):
        edition.status = EditionStatus.SENDING
        edition.finished_at = None
    session.flush()
    return moved or 0


def forget_subscriber(session: Session, subscriber_id: int) -> None:
    """Part of an erase: relay replies can quote the address, so they go too."""
    session.execute(update(Delivery).where(Delivery.subscriber_id == subscriber_id)
                    .values(last_reply=None))


def reply_clock() -> Any:
    """When a delivery's reply came: its last attempt (or, never tried, its queueing)."""
    return func.coalesce(Delivery.last_attempt_at, Delivery.queued_at)


def replies_before(cutoff: datetime | None = None) -> Any:
    """Finished deliveries with a relay reply (it can quote the address), with `cutoff` one
    from before it: the reply goes, the row, its status and its reason stay for the counts."""
    held = Delivery.status.in_(sorted(s.value for s in FINAL)) & Delivery.last_reply.is_not(None)
    return held if cutoff is None else held & (reply_clock() < cutoff)


def forget_replies(session: Session, cutoff: datetime, limit: int) -> int:
    """Clear up to `limit` replies older than `cutoff` (`replies_before`); returns how many."""
    ids = list(session.scalars(select(Delivery.id).where(replies_before(cutoff))
                               .order_by(Delivery.id).limit(limit)))
    if not ids:
        return 0
    return changed_rows(session.execute(
        update(Delivery).where(Delivery.id.in_(ids)).values(last_reply=None)
        .execution_options(synchronize_session=False)))


# ---------------------------------------------------------------- claim and record

@dataclass(frozen=True)
class Claim:
    delivery_id: int
    edition_id: int
    subscriber_id: int
    email: str
    name: str | None
    attempts: int  # including this one
    ambiguous: bool  # a copy may already have arrived (the previous holder died mid-send)
    queued_at: datetime
    lease_until: datetime | None = None  # after this another worker may take the row over


def release_orphans(session: Session, now: datetime | None = None) -> int:
    """Make every claimed delivery claimable now. Only for SQLite, where the worker holds the
    file lock and so knows that no other worker is alive to own them."""
    return changed_rows(session.execute(
        update(Delivery).where(Delivery.status == DeliveryStatus.SENDING)
        .values(lease_until=(now or utcnow()) - timedelta(seconds=1))))


def _due(status: DeliveryStatus) -> Select[Any]:
    column = Delivery.lease_until if status == DeliveryStatus.SENDING else Delivery.next_attempt_at
    due = column < bindparam("now") if status == DeliveryStatus.SENDING else \
        column <= bindparam("now")
    return (select(Delivery.id)
            .where(Delivery.edition_id == bindparam("edition"), Delivery.status == status, due)
            .order_by(column).limit(bindparam("limit")).with_for_update(skip_locked=True))


# The claim's statements, built once: the worker runs them for every batch, and building a
# statement costs more than SQLite takes to run it.
_SENDING_EDITIONS = select(Edition.id).where(
    Edition.status == EditionStatus.SENDING).order_by(Edition.id)
# Retries first (they have waited), then the queue, then rows whose holder died.
_DUE = [_due(DeliveryStatus.RETRY), _due(DeliveryStatus.QUEUED), _due(DeliveryStatus.SENDING)]
_CLAIMED_ROWS = (
    select(Delivery.id, Delivery.edition_id, Delivery.subscriber_id, Delivery.status,
           Delivery.attempts, Delivery.ambiguous, Delivery.dot_at, Delivery.queued_at,
           Edition.topic, Edition.kind,
           Edition.not_after, Subscriber.email, Subscriber.name)
    .join(Edition, Edition.id == Delivery.edition_id)
    .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
    .where(Delivery.id.in_(bindparam("ids", expanding=True))).order_by(Delivery.id))
_table = Delivery.__table__
# SET reads the old row, so a row still `sending` (an orphan) is taken over, and turns
# ambiguous only if its final dot may have been written (`dot_at`), as its Claim says; the new
# attempt starts without a dot. One set-based statement instead of parameters per row.
_ORPHAN = _table.c.status == DeliveryStatus.SENDING
_MARK_CLAIMED = update(_table).where(_table.c.id.in_(bindparam("ids", expanding=True))).values(
    status=DeliveryStatus.SENDING, worker=bindparam("worker"), lease_until=bindparam("lease"),
    attempts=_table.c.attempts + 1,
    ambiguous=or_(_table.c.ambiguous, and_(_ORPHAN, _table.c.dot_at.is_not(None))),
    taken_over=or_(_table.c.taken_over, _ORPHAN), dot_at=None,
    last_attempt_at=bindparam("now"))
_MARK_DOTTED = update(_table).where(_table.c.id.in_(bindparam("ids", expanding=True)),
                                    _table.c.status == DeliveryStatus.SENDING,
                                    _table.c.worker == bindparam("d_worker")).values(
    dot_at=bindparam("d_now"))
_CLOSE_UNSENT = update(_table).where(_table.c.id.in_(bindparam("ids", expanding=True))).values(
    status=bindparam("status"), last_reply=bindparam("reply"), reason=bindparam("reason"),
    lease_until=None)


# What a delivery closed unsent because its edition's "not after" time came says to people,
# from the claim (it came due after the time: DeliveryReason.TOO_LATE) and from the worker (a
# retry the time cut short: DATE_PASSED). Code reads the row's `reason`, never these words.
TOO_LATE = "too late, past the edition's 'not after' time"
DATE_PASSED = "the date has passed"


def claim_due(session: Session, worker: str, limit: int, lease: timedelta,
              now: datetime | None = None) -> list[Claim]:
    """Take up to `limit` deliveries that are due, under a lease; commit straight after.

    Due means queued or retrying with its time come, or claimed by a worker whose lease ran
    out (it died mid-send: those are resent, marked ambiguous). Each row is re-checked here,
    at send time: one whose subscriber has left the topic or been suppressed, or whose
    reminder is past its "not after" time, is closed as skipped instead of sent.
    """
    now = now or utcnow()
    # One index range per (sending edition, state), read in index order and cut at `limit`:
    # the claim costs the same with ten rows queued or a million.
    ids: list[int] = []
    for edition_id in list(session.scalars(_SENDING_EDITIONS)):
        for due in _DUE:
            if len(ids) >= limit:
                break
            ids.extend(session.scalars(due, {"edition": edition_id, "now": now,
                                             "limit": limit - len(ids)}))
    if not ids:
        return []
    rows = session.execute(_CLAIMED_ROWS, {"ids": ids}).all()
    sendable: set[tuple[int, str]] = set()
    listed = [r for r in rows if r.kind != EditionKind.DECLINED]
    for topic in {r.topic for r in listed}:
        members = [r.subscriber_id for r in listed if r.topic == topic]
        sendable.update((sid, topic) for sid in store.sendable_among(session, members, topic))
    # A declined notice goes to someone on no topic any more: its re-check is that they are
    # still as the refusal left them.
    told = [r.subscriber_id for r in rows if r.kind == EditionKind.DECLINED]
    declined = store.declined_among(session, told) if told else set()
    # An address changed to one off the secure domains since the send was queued: the
    # marking's rule holds at send time too (the Python twin of the enqueue's SQL).
    restricted: dict[int, list[str]] = {}
    for marked, domains in session.execute(
            select(Edition.id, Edition.compiled["secure_domains"])
            .where(Edition.id.in_({r.edition_id for r in rows}))):
        if isinstance(domains, list):
            restricted[cast(int, marked)] = [str(d) for d in domains]
    claims, skipped, late, unsafe = [], [], [], []
    for r in rows:
        if too_late(r.not_after, now):
            late.append(r.id)
        elif r.edition_id in restricted and not in_domains(r.email or "",
                                                           restricted[r.edition_id]):
            unsafe.append(r.id)
        elif not (r.subscriber_id in declined if r.kind == EditionKind.DECLINED
                  else (r.subscriber_id, r.topic) in sendable):
            skipped.append(r.id)
        else:
            dotted_orphan = r.status == DeliveryStatus.SENDING and r.dot_at is not None
            claims.append(Claim(r.id, r.edition_id, r.subscriber_id, r.email or "", r.name,
                                r.attempts + 1, r.ambiguous or dotted_orphan, r.queued_at,
                                now + lease))
    if claims:
        session.execute(_MARK_CLAIMED, {"ids": [c.delivery_id for c in claims],
                                        "worker": worker, "lease": now + lease, "now": now})
    for ids_, reply, status, reason in (
            (skipped, "not sent: unsubscribed or suppressed before its turn",
             DeliveryStatus.SKIPPED, DeliveryReason.SUPPRESSED),
            (late, f"not sent: {TOO_LATE}", DeliveryStatus.FAILED, DeliveryReason.TOO_LATE),
            (unsafe, f"not sent: {NOT_SECURE}", DeliveryStatus.SKIPPED,
             DeliveryReason.NOT_SECURE)):
        if ids_:
            session.execute(_CLOSE_UNSENT, {"ids": ids_, "status": status, "reply": reply,
                                            "reason": reason})
    return claims


def dot_marker(engine: Engine) -> Connection:
    """The connection a worker writes its dot marks on (`mark_dotted`): in autocommit, so a
    mark is one round trip, and on PostgreSQL without waiting for the WAL flush
    (`synchronous_commit` off). A mark is there for a crash of the worker, which it survives
    either way; a crash of the database server itself may lose the last marks before it (up to
    three times `wal_writer_delay`, 0.6 s by default), and those rows are then reported as
    resent after a crash instead of as possibly sent twice (docs/design.md, crash policy)."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET synchronous_commit TO OFF")
    return conn


def mark_dotted(db: Session | Connection, worker: str, ids: Sequence[int],
                now: datetime) -> None:
    """Record that these deliveries' final dots may soon be written; the caller has this
    committed before writing them, so a crash after this can be told from one before it."""
    if ids:
        db.execute(_MARK_DOTTED, {"ids": list(ids), "d_worker": worker, "d_now": now})


@dataclass(frozen=True)
class Result:
    """What a worker learned about one claimed delivery."""

    delivery_id: int
    status: DeliveryStatus
    code: int | None = None
    reply: str = ""
    next_attempt_at: datetime | None = None
    ambiguous: bool = False
    reason: DeliveryReason | None = None  # why it ended unsent, when it did


def record(session: Session, worker: str, results: Sequence[Result],
           now: datetime | None = None) -> int:
    """Write results; only rows this worker still holds change. Returns how many did.

    `last_attempt_at` moves on to when the result came: the rate limits count a message from
    then, as a relay does, and not only from its claim. Counted from the claim alone, a batch
    claimed a minute after the last one could reach the relay while that one's later messages
    were still inside its minute, and a relay that counts (Microsoft 365: 30 a minute) would
    throttle every batch."""
    if not results:
        return 0
    now = now or utcnow()
    params = [{"b_id": r.delivery_id, "b_status": r.status, "b_code": r.code,
               "b_reply": r.reply[:500], "b_next": r.next_attempt_at or now,
               "b_sent": now if r.status == DeliveryStatus.SENT else None,
               "b_ambiguous": r.ambiguous, "b_worker": worker, "b_now": now,
               "b_reason": r.reason} for r in results]
    return changed_rows(session.execute(_RECORD, params)) or 0


_RECORD = (update(_table)
           .where(_table.c.id == bindparam("b_id"), _table.c.status == DeliveryStatus.SENDING,
                  _table.c.worker == bindparam("b_worker"))
           .values(status=bindparam("b_status"), last_code=bindparam("b_code"),
                   last_reply=bindparam("b_reply"), next_attempt_at=bindparam("b_next"),
                   sent_at=bindparam("b_sent"), ambiguous=bindparam("b_ambiguous"),
                   last_attempt_at=bindparam("b_now"), reason=bindparam("b_reason"),
                   lease_until=None))


def finish_done(session: Session, now: datetime | None = None) -> list[int]:
    """Mark sending editions whose every delivery is final as sent; returns their ids."""
    open_rows = (select(Delivery.id).where(Delivery.edition_id == Edition.id,
                                           Delivery.status.not_in(list(FINAL))).exists())
    done = list(session.scalars(select(Edition.id).where(Edition.status == EditionStatus.SENDING,
                                                         ~open_rows)))
    if done:
        session.execute(update(Edition).where(Edition.id.in_(done))
                        .values(status=EditionStatus.SENT, finished_at=now or utcnow()))
    return done


def next_due_at(session: Session) -> tuple[datetime | None, datetime | None]:
    """When the next queued or retrying delivery of a sending edition falls due, and when
    the first lease on a claimed one ends (None for either if there is none). A claimed row
    whose holder has not written its result when its lease ends is due then: its worker
    died, and another takes it over."""
    sending = Edition.status == EditionStatus.SENDING
    return (session.scalar(select(func.min(Delivery.next_attempt_at)).join(Edition)
                           .where(sending, Delivery.status.in_(list(DUE)))),
            session.scalar(select(func.min(Delivery.lease_until)).join(Edition)
                           .where(sending, Delivery.status == DeliveryStatus.SENDING)))


def attempts_since(session: Session, since: datetime) -> int:
    """Messages claimed or answered since `since`, over every edition: what the relay's
    limits count (`record` moves a message's time on to its result)."""
    return session.scalar(select(func.count()).select_from(Delivery)
                          .where(Delivery.last_attempt_at >= since)) or 0


def oldest_attempt_since(session: Session, since: datetime) -> datetime | None:
    return session.scalar(select(func.min(Delivery.last_attempt_at))
                          .where(Delivery.last_attempt_at >= since))


# ---------------------------------------------------------------- progress

@dataclass
class Progress:
    edition_id: int
    slug: str
    status: str
    paused_reason: str | None
    counts: dict[str, int]
    ambiguous: int  # "may have been sent twice": a copy may have arrived before the one sent
    total: int
    taken_over: int = 0  # "resent after a crash": claims taken over from a worker that died
    once: int = 0  # "certainly sent once": accepted by the relay, and no copy before it
    left_out: int = 0  # OFFICIAL-SENSITIVE: "left out: address not on a secure domain"

    @property
    def remaining(self) -> int:
        return sum(self.counts.get(s, 0) for s in (DeliveryStatus.QUEUED, DeliveryStatus.RETRY,
                                                    DeliveryStatus.SENDING))


def progress(session: Session, edition: Edition) -> Progress:
    # Left-out readers (OFFICIAL-SENSITIVE, not on a secure domain) are not messages: counted
    # on their own, so "sent N of M" is of the messages the edition may send.
    counts = dict(session.execute(
        select(Delivery.status, func.count()).where(Delivery.edition_id == edition.id,
                                                    _NOT_LEFT_OUT)
        .group_by(Delivery.status)).all())
    ambiguous, taken_over, once, left = session.execute(
        select(func.count().filter(Delivery.ambiguous.is_(True)),
               func.count().filter(Delivery.taken_over.is_(True)),
               func.count().filter(and_(Delivery.status == DeliveryStatus.SENT,
                                        Delivery.ambiguous.is_not(True))),
               func.count().filter(Delivery.reason == DeliveryReason.NOT_SECURE))
        .where(Delivery.edition_id == edition.id)).one()
    return Progress(edition.id, edition.slug, edition.status, edition.paused_reason,
                    {s.value: counts.get(s.value, 0) for s in DeliveryStatus}, ambiguous or 0,
                    sum(counts.values()), taken_over or 0, once or 0, left or 0)


def deliveries_for(session: Session, subscriber_id: int) -> list[dict[str, Any]]:
    """A person's delivery history, for their subject-access export and the console."""
    rows = session.execute(
        select(Edition.slug, Edition.title, Edition.subject, Delivery.status, Delivery.sent_at,
               Delivery.attempts, Delivery.last_code)
        .join(Edition).where(Delivery.subscriber_id == subscriber_id).order_by(Delivery.id))
    return [{"edition": slug, "title": title, "subject": subject, "status": status,
             "sent_at": sent.isoformat() if sent else None, "attempts": attempts, "code": code}
            for slug, title, subject, status, sent, attempts, code in rows]


def topic_id(session: Session, slug: str) -> int:
    return session.scalar(select(Topic.id).where(Topic.slug == slug)) or 0


# ---------------------------------------------------------------- bounces after the fact
# Used by `mailer.bounce_policy`: a bounce or complaint that arrives after the relay accepted
# the message.

def delivery_of(session: Session, edition_id: int, subscriber_id: int) -> Delivery | None:
    """The delivery a signed reference names, or None (a restored database, a deleted edition)."""
    return session.scalar(select(Delivery).where(Delivery.edition_id == edition_id,
                                                 Delivery.subscriber_id == subscriber_id))


def handed_to_relay() -> ColumnElement[bool]:
    """Deliveries the relay took (sent, unknown, bounced) or may already hold: one still
    `sending` whose final dot has been marked. A relay that bounces at once can report before
    the worker has written its reply, so a bounce must find such a row too."""
    taken = Delivery.status.in_([DeliveryStatus.SENT, DeliveryStatus.UNKNOWN,
                                 DeliveryStatus.BOUNCED])
    return or_(taken, and_(Delivery.status == DeliveryStatus.SENDING,
                           Delivery.dot_at.is_not(None)))


def latest_delivery_to(session: Session, subscriber_id: int) -> Delivery | None:
    """The last delivery handed to the relay for this person: for a bounce without a reference."""
    return session.scalar(
        select(Delivery).where(Delivery.subscriber_id == subscriber_id, handed_to_relay())
        .order_by(Delivery.id.desc()).limit(1))


def note_bounce(session: Session, delivery_id: int, reply: str, *, bounced: bool,
                code: int | None = None) -> bool:
    """Record a later report on a delivery: its reply text, and `bounced` when the message did
    not arrive after all. Only deliveries `handed_to_relay` change; the worker's reply, coming
    later, must not turn a bounce back into `sent`: a bounced row leaves its worker's hands (the
    worker's result then finds no `sending` row and changes nothing). A row queued, or sending
    before its dot, is the worker's: a resend would overwrite this anyway."""
    values: dict[str, Any] = {"last_reply": reply[:500]}
    if bounced:
        values.update(status=DeliveryStatus.BOUNCED, lease_until=None)
    if code is not None:
        values["last_code"] = code
    return bool(changed_rows(session.execute(
        update(Delivery).where(Delivery.id == delivery_id, handed_to_relay())
        .values(**values))))


def recipients_at_domain(session: Session, edition_id: int, domain: str) -> int:
    """How many people at `domain` one send went (or is going) to: the denominator of the
    domain alert. Skipped rows were never sent, so they do not count."""
    escaped = domain.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return session.scalar(
        select(func.count()).select_from(Delivery)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.edition_id == edition_id, Delivery.status != DeliveryStatus.SKIPPED,
               func.lower(Subscriber.email_key).like(f"%@{escaped}", escape="\\"))) or 0


# ---------------------------------------------------------------- four eyes and schedule
# The console's path to a send: draft -> approval requested -> approved (by someone else) ->
# scheduled or sent now. Each step refuses unless the edition is in the state it expects, so a
# double click or two co-ordinators at once cannot skip a step or repeat one.

class ApprovalRefused(NotAllowed):
    """The approver is the author or the person who asked for approval (four eyes)."""


SLUG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def check_slug(slug: str) -> str:
    slug = slug.strip().lower()
    if not slug or len(slug) > 120 or not set(slug) <= SLUG_CHARS or slug[0] in "-_":
        raise MailerError(f"'{slug[:40]}' cannot name an edition",
                          hint="use lower-case letters, digits and '-', e.g. 2026-q1-kent-essex")
    return slug


def compile_source(session: Session, settings: Settings, source: str, where: str
                   ) -> tuple[ParsedEdition, CompiledEdition]:
    """Validate and compile edition text without storing it (what a save would store, and the
    editor's preview). Raises `EditionError` (each problem with its line)."""
    from mailer.edition import parse_edition

    parsed = parse_edition(source, where=where)
    audience_rule.check(parsed, audience_rule.known(session, settings))
    return parsed, compile_edition(parsed, settings)


def store_edition_source(session: Session, settings: Settings, slug: str, source: str,
                         actor: str | None, where: str | None = None) -> tuple[Edition, bool]:
    """Validate, compile and record edition text (an upload or an edit in the console).

    Returns (edition, changed). A changed source withdraws any approval request, approval and
    schedule: what was approved is exactly the text that goes out, never a later edit.
    Raises `EditionError` (each problem with its line) for text that does not validate.
    """
    slug = check_slug(slug)
    parsed, compiled = compile_source(session, settings, source, where or f"{slug}.md")
    meta = parsed.meta
    before = session.scalar(select(Edition.source_sha256).where(Edition.slug == slug))
    given = meta.audience
    fields = audience_rule.resolve(session, meta.segment, AudienceFields(
        list(given.regions), list(given.roles), list(given.organisation_types),
        list(given.topics)))
    edition, _created = store_edition(
        session, slug=slug, title=meta.title, subject=meta.subject, topic=meta.topic,
        regions=fields.regions, roles=fields.roles,
        organisation_types=fields.organisation_types, audience_topics=fields.topics,
        segment=meta.segment, source=source, compiled=compiled.to_dict(), actor=actor)
    changed = before != edition.source_sha256
    if changed and before is not None:
        edition.approval_requested_by = edition.approval_requested_at = None
        edition.approved_by = edition.approved_at = None
        edition.scheduled_by = edition.scheduled_for = None
        edition.status = EditionStatus.DRAFT
        session.flush()
    return edition, changed


def request_approval(session: Session, edition: Edition, actor: str,
                     now: datetime | None = None) -> bool:
    """Ask for a second person's approval. Idempotent; returns whether anything changed."""
    if edition.status != EditionStatus.DRAFT:
        raise EditionConflict(f"edition '{edition.slug}' is {edition.status}; only a draft "
                              "can be put forward for approval")
    if edition.approval_requested_by:
        return False
    edition.approval_requested_by = actor
    edition.approval_requested_at = now or utcnow()
    session.flush()
    return True


def second_pair_of_eyes(edition: Edition, login: str) -> bool:
    """Whether this person may approve the edition: neither its author nor whoever put it
    forward (four eyes). The console offers "Approve" only to those who may."""
    return login not in {edition.approval_requested_by, edition.created_by}


def approve(session: Session, edition: Edition, approver: str,
            now: datetime | None = None) -> bool:
    """Approve an edition someone else wrote and put forward; returns whether it changed."""
    if edition.status == EditionStatus.APPROVED and edition.approved_by == approver:
        return False
    if edition.status != EditionStatus.DRAFT:
        raise EditionConflict(f"edition '{edition.slug}' is {edition.status}; it cannot be "
                              "approved now")
    if not edition.approval_requested_by:
        raise EditionConflict(f"nobody has asked for edition '{edition.slug}' to be approved",
                              hint="its author asks for approval first")
    if not second_pair_of_eyes(edition, approver):
        raise ApprovalRefused(
            "you wrote or put forward this edition, so you cannot approve it",
            hint="another co-ordinator must approve it: that is the point of a second pair "
                 "of eyes")
    edition.approved_by, edition.approved_at = approver, now or utcnow()
    edition.status = EditionStatus.APPROVED
    session.flush()
    return True


def eta_text(settings: Settings, remaining: int) -> str:
    """How long the rate limits make the rest of a send take (no limit: as fast as the relay)."""
    if remaining <= 0:
        return "done"
    minutes = []
    if settings.rate_per_minute:
        minutes.append(remaining / settings.rate_per_minute)
    if settings.rate_per_day:
        minutes.append((remaining // settings.rate_per_day) * 24 * 60)
    if not minutes:
        return "no rate limit: as fast as the relay accepts"
    total = timedelta(minutes=max(minutes))
    hours, rest = divmod(int(total.total_seconds()), 3600)
    return f"about {hours} h {rest // 60} min at the configured rate limits" if hours else \
        f"about {max(1, rest // 60)} min at the configured rate limits"


def time_left_text(settings: Settings, p: Progress) -> str:
    """The progress page's "time left": what is left of a send, in words that fit where the
    send is (a send not yet started is not "done", nor is one a co-ordinator paused)."""
    if p.status in STARTABLE:
        return "not started yet"
    if p.status == EditionStatus.CANCELLED:
        return "none: the send was cancelled"
    if p.status == EditionStatus.PAUSED and p.remaining:
        return f"paused, with {p.remaining} message(s) waiting"
    return eta_text(settings, p.remaining)


def _require_approved(edition: Edition) -> None:
    if edition.status not in (EditionStatus.APPROVED, EditionStatus.SCHEDULED) \
            or not edition.approved_by:
        raise EditionConflict(f"edition '{edition.slug}' is {edition.status}; only an approved "
                              "edition can be scheduled or sent",
                              hint="ask for approval, and have another co-ordinator approve it")


class ScheduleError(MailerError):
    """A schedule request that cannot be met (bad or unsafe time, wrong edition state)."""


LONDON = ZoneInfo("Europe/London")  # the time people mean, whatever the server's zone


def uk_time(at: datetime) -> str:
    return at.astimezone(LONDON).strftime("%a %d %b %Y %H:%M %Z")


def utc_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")


def check_send_at(at: datetime, *, now: datetime | None = None,
                  what: str = "the send time") -> datetime:
    """A send time people may choose: aware, in the future, and not 01:00-02:59 UK time, which
    the clock changes skip (March) or repeat (October). Returned in UTC."""
    if at.tzinfo is None:
        raise ScheduleError(f"{what} needs its time zone")
    local = at.astimezone(LONDON)
    if 1 <= local.hour <= 2:
        raise ScheduleError(f"{what}: {local:%H:%M} UK time is between 01:00 and 02:59, which "
                            "the clock change skips or repeats", hint="choose 03:00 or later")
    if at <= (now or utcnow()):
        raise ScheduleError(f"{what}: {uk_time(at)} has already passed")
    return at.astimezone(UTC)


def schedule(session: Session, edition: Edition, actor: str, when: datetime,
             now: datetime | None = None, *, require_approval: bool = True) -> None:
    """Set when an edition goes out; the scheduler (mailer.schedule) fires it. Every face
    schedules through here, so the approval rule and the time rules hold for all of them."""
    if require_approval:
        _require_approved(edition)
    elif edition.status not in STARTABLE:
        raise ScheduleError(f"edition '{edition.slug}' is {edition.status}; it cannot be "
                            "scheduled", hint="only a draft or approved edition can be")
    when = check_send_at(when, now=now)
    if too_late(edition.not_after, when):
        raise ScheduleError("that is after the edition's 'not after' time")
    edition.scheduled_for, edition.scheduled_by = when, actor
    edition.status = EditionStatus.SCHEDULED
    session.flush()


def reschedule(session: Session, edition: Edition, actor: str, when: datetime,
               now: datetime | None = None, *, require_approval: bool = True) -> None:
    """Move a scheduled edition to another time."""
    if edition.status != EditionStatus.SCHEDULED:
        raise ScheduleError(f"edition '{edition.slug}' is {edition.status}, not scheduled",
                            hint="schedule it for a first time instead")
    schedule(session, edition, actor, when, now, require_approval=require_approval)


def unschedule(session: Session, edition: Edition) -> bool:
    """Take a scheduled edition off the schedule (back to approved or draft)."""
    if edition.status != EditionStatus.SCHEDULED:
        return False
    edition.status = EditionStatus.APPROVED if edition.approved_by else EditionStatus.DRAFT
    edition.scheduled_for = None
    session.flush()
    return True


def send_to_new(session: Session, edition: Edition) -> int:
    """Send an edition that went out to the people who joined since and have not had it."""
    if edition.status not in (EditionStatus.SENT, EditionStatus.SENDING, EditionStatus.PAUSED):
        raise EditionConflict(f"edition '{edition.slug}' is {edition.status}; only one that "
                              "has been sent can go to people who joined since")
    if edition.status == EditionStatus.SENT:
        edition.status = EditionStatus.SENDING
    return enqueue(session, edition)


def send_approved(session: Session, edition: Edition, actor: str,
                  now: datetime | None = None) -> int:
    """Start sending an approved (or scheduled) edition now; returns deliveries queued."""
    _require_approved(edition)
    now = now or utcnow()
    edition.scheduled_by, edition.scheduled_for = actor, now
    return enqueue(session, edition, now=now)


def upcoming_editions(session: Session, limit: int = 10, scope: Scope = None
                      ) -> Sequence[Edition]:
    """Editions waiting to go: scheduled (soonest first), then approved, then put forward."""
    waiting = [EditionStatus.SCHEDULED, EditionStatus.APPROVED, EditionStatus.DRAFT]
    rows = session.scalars(select(Edition).where(Edition.status.in_(waiting),
                                                 within(scope, Edition.regions))
                           .order_by(Edition.scheduled_for, Edition.id.desc())
                           .limit(limit * 3)).all()
    order = {s: i for i, s in enumerate(waiting)}
    return sorted(rows, key=lambda e: order[EditionStatus(e.status)])[:limit]


@dataclass(frozen=True)
class Figures:
    """The whole outbox in counts, for monitoring."""

    deliveries: dict[str, int]  # by status
    editions: dict[str, int]  # by status
    replies: dict[str, int]  # deliveries by the class of their last SMTP reply: 2xx ... none


def figures(session: Session) -> Figures:
    code = Delivery.last_code
    reply_class = case((code.is_(None), "none"), (code < 300, "2xx"), (code < 400, "3xx"),
                       (code < 500, "4xx"), else_="5xx")

    def counted(column: Any) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).group_by(column)).all()
        return {str(row[0]): int(row[1]) for row in rows}

    return Figures(deliveries=counted(Delivery.status), editions=counted(Edition.status),
                   replies=counted(reply_class))


def recent_sends(session: Session, limit: int = 10, scope: Scope = None) -> list[Progress]:
    """The latest sends that have started, with their delivery figures."""
    started = [EditionStatus.SENDING, EditionStatus.PAUSED, EditionStatus.SENT,
               EditionStatus.CANCELLED]
    rows = session.scalars(select(Edition).where(Edition.status.in_(started),
                                                 within(scope, Edition.regions),
                                                 Edition.started_at.is_not(None), _NOT_PERSONAL)
                           .order_by(Edition.started_at.desc()).limit(limit)).all()
    return [progress(session, e) for e in rows]


# ---------------------------------------------------------------- the public archive

@dataclass(frozen=True)
class Published:
    """A newsletter that has gone out and is shown in the public archive."""

    id: int
    slug: str
    subject: str
    preheader: str | None
    started_at: datetime
    compiled_at: str
    issue_date: str | None  # ISO 8601; None for an edition compiled before it was kept


def _published() -> Select[int, str, str, str, datetime, str, str]:
    return select(Edition.id, Edition.slug, Edition.subject,
                  Edition.compiled["preheader"].as_string(), Edition.started_at,
                  Edition.compiled["compiled_at"].as_string(),
                  Edition.compiled["issue_date"].as_string()).where(
        Edition.public.is_(True), Edition.kind == EditionKind.NEWSLETTER,
        Edition.started_at.is_not(None))


def published(session: Session) -> list[Published]:
    """Newsletters that have started going out (their view-online links are in people's
    inboxes, so one that was cancelled half-way stays), newest first."""
    return [Published(*row) for row in session.execute(
        _published().order_by(Edition.started_at.desc(), Edition.id.desc()))]


def published_compiled(session: Session, slug: str) -> tuple[Published, dict[str, Any]] | None:
    row = session.execute(_published().add_columns(Edition.compiled)
                          .where(Edition.slug == slug)).first()
    return None if row is None else (Published(*row[:7]), row[7])


def own_copy(session: Session, edition_id: int, subscriber_id: int
             ) -> tuple[Published, dict[str, Any]] | None:
    """A newsletter kept out of the public archive (`archive: subscribers`) as one reader may
    open it from their copy: only an edition that went to them (a reader left out of an
    OFFICIAL-SENSITIVE send had no copy, so has no page), and never one kept off the web."""
    row = session.execute(
        select(Edition.id, Edition.slug, Edition.subject,
               Edition.compiled["preheader"].as_string(), Edition.started_at,
               Edition.compiled["compiled_at"].as_string(),
               Edition.compiled["issue_date"].as_string(), Edition.compiled)
        .join(Delivery, Delivery.edition_id == Edition.id)
        .where(Edition.id == edition_id, Delivery.subscriber_id == subscriber_id,
               _NOT_LEFT_OUT, Edition.kind == EditionKind.NEWSLETTER,
               Edition.started_at.is_not(None))).first()
    if row is None or row[7].get("archive", ArchiveVisibility.PUBLIC) == ArchiveVisibility.NONE:
        return None
    return Published(*row[:7]), row[7]


def own_copies(session: Session, subscriber_id: int) -> list[Published]:
    """The newsletters kept out of the public archive that went to this reader, newest
    first: what their preferences page (the /manage magic link) offers to open."""
    rows = session.execute(
        select(Edition.id, Edition.slug, Edition.subject,
               Edition.compiled["preheader"].as_string(), Edition.started_at,
               Edition.compiled["compiled_at"].as_string(),
               Edition.compiled["issue_date"].as_string(),
               Edition.compiled["archive"].as_string())
        .join(Delivery, Delivery.edition_id == Edition.id)
        .where(Delivery.subscriber_id == subscriber_id, _NOT_LEFT_OUT,
               Edition.public.is_(False), Edition.kind == EditionKind.NEWSLETTER,
               Edition.started_at.is_not(None))
        .order_by(Edition.started_at.desc(), Edition.id.desc())).all()
    return [Published(*r[:7]) for r in rows if r[7] == ArchiveVisibility.SUBSCRIBERS]
