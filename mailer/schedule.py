"""When things go out: scheduled editions, reminders before dates of interest, the quarterly nudge.

APScheduler (3.11, timezone Europe/London, in-memory job store) is used only as a clock that
wakes us up. What is due lives in our tables (`edition.scheduled_for`, `reminder.send_at`), so a
restart loses nothing: a catch-up pass at start, every few minutes and at the next due time
enqueues whatever is due and not yet enqueued. Jobs have explicit ids with `replace_existing`,
a misfire grace of hours and `coalesce` (APScheduler's default grace of one second silently
drops a job that was due while the process was busy or down).

Each due item is taken with a guarded UPDATE (`... WHERE status = 'scheduled'`), and the outbox
key (edition, subscriber) absorbs any repeat, so a double fire (two passes, two schedulers in a
split second) enqueues once. A reminder past its "not after" time is marked missed and the
co-ordinators are told (logged, listed by `mailer schedule list`, and mailed after the pass by
`mailer.alerts`, which also mails halts and bounce alerts); it is never sent late.

After each pass the leader runs the daily retention purge (`mailer.retention.run_due`): in
its own small transactions, asking the leader lock before each batch, so a big first purge
neither holds a long transaction nor outlives the leadership. Then it runs the yearly
reconfirmation (`mailer.reconfirm.run`): readers out of time lapse, and the day's share of the
requests due is mailed, likewise stopping once the lock goes.

Exactly one scheduler works per database: it holds a PostgreSQL advisory lock on a connection
of its own (checked every few seconds; losing it stops scheduling at once), or a lock file next
to a SQLite database. Any other scheduler waits as a standby and takes over when the lock frees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from mailer import alerts, audit, backup, events, outbox, reconfirm, replies, retention
from mailer.config import Settings
from mailer.deadline import too_late
from mailer.errors import MailerError
from mailer.events import Event, Reminder, ReminderStatus
from mailer.models import (
    Delivery,
    DeliveryReason,
    DeliveryStatus,
    Edition,
    EditionKind,
    EditionStatus,
)
from mailer.outbox import LONDON, ScheduleError, check_send_at, uk_time, utc_time
from mailer.render import Attachment, compile_list_email
from mailer.web import ratelimit
from subscribers.db import changed_rows, normalise_url, session_scope, utcnow

log = logging.getLogger(__name__)

CATCH_UP_SECONDS = 300  # the catch-up pass runs at least this often
MISFIRE_GRACE_SECONDS = 6 * 3600  # a late wake-up still runs (the tables decide what is due)
QUARTER_MONTHS = (1, 4, 7, 10)  # the newsletter's usual send date: first Monday of these
NUDGE_DAYS = 21  # three weeks before it, nothing approved -> tell the co-ordinators
SCHEDULABLE = frozenset({EditionStatus.DRAFT, EditionStatus.APPROVED, EditionStatus.SCHEDULED})
BACKUP_CHECK_SECONDS = 900  # how often the leader asks whether a backup is due
ADVISORY_KEY = (0x4D534854, 6)  # "MSHT", issue 6: the two-int advisory lock key


# ---------------------------------------------------------------- times people type

def parse_at(value: str, *, now: datetime | None = None, zone: ZoneInfo = LONDON,
             what: str = "--at") -> datetime:
    """'2027-01-11 09:00' (UK time unless an offset such as +00:00 or Z is given) -> UTC.

    Refused: anything unparseable, a local time between 01:00 and 02:59 (the clock change
    skips or repeats it), and a time that has passed.
    """
    raw = value.strip()
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        parsed = None
    if parsed is None or len(raw) <= 10:  # a bare date would silently mean midnight
        raise ScheduleError(f'{what} "{value}": not a date and time like "2027-01-11 09:00"',
                            hint="UK time is assumed; add +00:00 or Z for UTC")
    if parsed.tzinfo is None:
        # Checked as typed: converted first, a time the spring change skips (01:30 on its
        # day) would be reported an hour on, as a time the person never wrote.
        if 1 <= parsed.hour <= 2:
            raise ScheduleError(
                f'{what} "{value}": {parsed:%H:%M} UK time is between 01:00 and 02:59, which '
                f"the clock change skips or repeats{_change_on(parsed.date(), zone)}",
                hint="choose 03:00 or later")
        parsed = parsed.replace(tzinfo=zone)
    return check_send_at(parsed.astimezone(UTC), now=now, what=f'{what} "{value}"')


def _change_on(day: date, zone: ZoneInfo) -> str:
    """' (on Sunday 28 March 2027 the clocks go forward)' when `day` has a clock change."""
    before = datetime.combine(day, time(0), tzinfo=zone).utcoffset()
    after = datetime.combine(day, time(23, 59), tzinfo=zone).utcoffset()
    if before is None or after is None or before == after:
        return ""
    return f" (on {_day_text(day)} the clocks go {'forward' if after > before else 'back'})"


# ---------------------------------------------------------------- editions

def schedule_edition(session: Session, edition: Edition, at: datetime, actor: str | None,
                     *, now: datetime | None = None, require_approval: bool = True) -> Edition:
    """Send `edition` at `at` (checked: not past, not in the clock-change hours). Rescheduling
    a scheduled one moves it. Needs an approved edition unless approval is not required."""
    outbox.schedule(session, edition, actor or "cli", at, now=now,
                    require_approval=require_approval)
    log.info("edition %s '%s' scheduled for %s (%s) by %s", edition.id, edition.slug,
             uk_time(at), utc_time(at), actor)
    return edition


def _start_scheduled(session: Session, edition: Edition, now: datetime) -> int | None:
    """Enqueue a due scheduled edition once: the guarded UPDATE is the one-winner step."""
    won = changed_rows(session.execute(update(Edition).where(Edition.id == edition.id,
                                                Edition.status == EditionStatus.SCHEDULED)
                          .values(status=EditionStatus.SENDING, started_at=now)))
    if not won:
        return None
    session.refresh(edition)
    queued = outbox.enqueue(session, edition, now=now)
    # The audit log follows the edition from the person who scheduled it to its start.
    audit.record(session, actor="scheduler", via="scheduler", action="edition.start",
                 target=f"edition:{edition.id}",
                 detail={"queued": queued, "scheduled_by": edition.scheduled_by})
    return queued


# ---------------------------------------------------------------- reminders

def _countdown(days: int) -> str:
    return {0: "today", 1: "tomorrow"}.get(days, f"in {days} days")


def _day_text(day: date) -> str:
    return f"{day:%A} {day.day} {day:%B %Y}"


def build_reminder(session: Session, settings: Settings, reminder: Reminder, event: Event,
                   now: datetime) -> Edition:
    """The reminder as an edition of kind reminder, compiled once, with its `.ics`."""
    occurrence = reminder.occurrence
    sent_on = reminder.send_at.astimezone(ZoneInfo(event.timezone)).date()
    countdown = _countdown((occurrence - sent_on).days)
    when = events.when_text(event, occurrence)
    subject = f"Reminder: {event.name}, {occurrence:%A} {occurrence.day} {occurrence:%B}"
    subject += f" ({countdown})"
    ics_name = events.ics_name(event, occurrence)
    compiled = compile_list_email(
        "reminder",
        {"event_name": event.name, "when_text": when, "countdown": countdown,
         "reminder_text": event.reminder_text, "description": event.description,
         "link": event.link, "ics_name": ics_name},
        settings, subject=subject, title=f"{event.name} reminder",
        preheader=f"{event.name}: {when}",
        attachments=[Attachment(ics_name, "text/calendar; charset=utf-8; method=PUBLISH",
                                events.occurrence_ics(event, occurrence, settings, now))],
        now=now)
    # The source records what the reminder said; the same reminder has the same source.
    source = (f"reminder {reminder.id}: event {event.id} '{event.slug}', occurrence "
              f"{occurrence}, {reminder.offset_days} day(s) before\nsubject: {subject}\n"
              f"text: {event.reminder_text}\n")
    slug = f"reminder-{event.slug[:60]}-{occurrence.isoformat()}-{reminder.offset_days}d"
    edition, _ = outbox.store_edition(
        session, slug=slug, title=f"{event.name} reminder", subject=subject, topic=event.topic,
        # The event's audience: a Kent-only activity's reminder reaches Kent readers only.
        regions=list(event.regions or ()), roles=list(event.roles or ()),
        organisation_types=list(event.organisation_types or ()),
        audience_topics=list(event.audience_topics or ()), segment=event.segment,
        source=source, compiled=compiled.to_dict(), actor="scheduler",
        kind=EditionKind.REMINDER, not_after=reminder.not_after)
    edition.event_id, edition.occurrence, edition.public = event.id, occurrence, False
    edition.scheduled_for, edition.scheduled_by = reminder.send_at, "scheduler"
    session.flush()
    return edition


# ---------------------------------------------------------------- reminders that ran out of time

_LATE = (DeliveryReason.TOO_LATE, DeliveryReason.DATE_PASSED)
LATE_LOOKBACK = timedelta(days=7)  # reminders whose time ran out this recently are checked
# ... once this long after it, when what was in flight at that time has settled
LATE_SETTLE = timedelta(minutes=15)


def check_late_reminders(session: Session, now: datetime) -> list[str]:
    """Reminders that were queued in time but not all delivered before their "not after"
    time (no worker ran, or it could not keep up): the rest are never sent, and the
    co-ordinators are told once per reminder."""
    told: list[str] = []
    for edition in session.scalars(select(Edition).where(
            Edition.kind == EditionKind.REMINDER, Edition.not_after.is_not(None),
            Edition.not_after <= now - LATE_SETTLE, Edition.not_after > now - LATE_LOOKBACK)):
        key = f"late-reminder-{edition.id}"
        if session.scalar(select(events.ScheduleNotice.id)
                          .where(events.ScheduleNotice.key == key)) is not None:
            continue
        counts = dict(session.execute(select(Delivery.status, func.count())
                                      .where(Delivery.edition_id == edition.id)
                                      .group_by(Delivery.status)).all())
        closed_late = session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.edition_id == edition.id, Delivery.status == DeliveryStatus.FAILED,
            Delivery.reason.in_(list(_LATE)))) or 0
        waiting = sum(counts.get(s, 0) for s in (DeliveryStatus.QUEUED, DeliveryStatus.RETRY,
                                                 DeliveryStatus.SENDING))
        if not waiting + closed_late:
            continue
        assert edition.not_after is not None
        message = (f"reminder '{edition.subject}': {waiting + closed_late} of "
                   f"{sum(counts.values())} could not be delivered before "
                   f"{uk_time(edition.not_after)} and were not sent "
                   f"({counts.get(DeliveryStatus.SENT, 0)} were); is `mailer worker` running?")
        if events.notify(session, key, "late-reminder", message, due_at=edition.scheduled_for,
                         now=now):
            log.warning("co-ordinators: %s", message)
            told.append(message)
    return told


# ---------------------------------------------------------------- the quarterly nudge

def quarter_send_date(year: int, month: int) -> date:
    """The newsletter's usual send date for the quarter starting in `month`: its first Monday."""
    first = date(year, month, 1)
    return first + timedelta(days=(7 - first.weekday()) % 7)


def next_quarter_send_date(today: date) -> date:
    candidates = [quarter_send_date(y, m) for y in (today.year, today.year + 1)
                  for m in QUARTER_MONTHS]
    return min(d for d in candidates if d >= today)


def check_quarter(session: Session, now: datetime) -> str | None:
    """Tell the co-ordinators (once per quarter) when, three weeks before the usual send
    date, no newsletter is approved or scheduled, and none has gone out in that window."""
    today = now.astimezone(LONDON).date()
    due = next_quarter_send_date(today)
    if today < due - timedelta(days=NUDGE_DAYS):
        return None
    window = datetime.combine(due - timedelta(days=NUDGE_DAYS), time(0), tzinfo=LONDON)
    ready = session.scalar(select(func.count()).select_from(Edition).where(
        Edition.kind == EditionKind.NEWSLETTER,
        or_(Edition.status.in_([EditionStatus.APPROVED, EditionStatus.SCHEDULED]),
            Edition.started_at >= window.astimezone(UTC))))
    if ready:
        return None
    message = (f"no newsletter is approved for the quarter's usual send date, "
               f"{_day_text(due)}: three weeks to go")
    send_at = datetime.combine(due, time(9), tzinfo=LONDON).astimezone(UTC)
    if events.notify(session, f"quarter-nudge-{due.isoformat()}", "quarterly-nudge", message,
                     due_at=send_at, now=now):
        log.warning("co-ordinators: %s", message)
        return message
    return None


# ---------------------------------------------------------------- the catch-up pass

@dataclass
class CatchUp:
    """What one pass did (for logs, `mailer scheduler --once` and the tests)."""

    planned: int = 0
    editions: list[str] = field(default_factory=list)  # slugs enqueued
    reminders: list[str] = field(default_factory=list)  # reminder edition slugs enqueued
    missed: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    queued: int = 0  # deliveries added
    told: list[str] = field(default_factory=list)  # new notices: mail them after the commit
    pruned: int = 0  # rate events forgotten
    purged: retention.Purged | None = None  # the day's retention purge, when this pass ran it
    reconfirm: reconfirm.Ran | None = None  # the yearly reconfirmation's lapses and requests


def catch_up(session: Session, settings: Settings, now: datetime | None = None) -> CatchUp:
    """Enqueue everything due and not yet enqueued; mark what is too late as missed.

    Safe to run any number of times, from any number of processes: each item is taken by a
    guarded UPDATE, and the outbox's unique key absorbs a repeat enqueue. Commit after.
    """
    now = now or utcnow()
    report = CatchUp(planned=events.plan_reminders(session, now))
    due = session.scalars(select(Edition).where(Edition.status == EditionStatus.SCHEDULED,
                                                Edition.scheduled_for <= now)
                          .order_by(Edition.scheduled_for)).all()
    for edition in due:
        try:
            with session.begin_nested():
                added = _start_scheduled(session, edition, now)
        except MailerError as exc:
            log.error("scheduled edition %s '%s' could not start: %s", edition.id, edition.slug,
                      exc)
            continue
        if added is not None:
            report.editions.append(edition.slug)
            report.queued += added
            late = now - (edition.scheduled_for or now)
            log.info("edition %s '%s' due %s: queued %s message(s)%s", edition.id,
                     edition.slug, uk_time(edition.scheduled_for or now), added,
                     f", {late} late" if late > timedelta(minutes=1) else "")
    for reminder in events.due_reminders(session, now):
        event = session.get(Event, reminder.event_id)
        assert event is not None
        label = f"{event.name} ({reminder.occurrence}, {reminder.offset_days} day(s) before)"
        if too_late(reminder.not_after, now):
            note = (f"missed: due {uk_time(reminder.send_at)}, and too late after "
                    f"{uk_time(reminder.not_after)}; not sent")
            if events.take_reminder(session, reminder, ReminderStatus.MISSED, now, note):
                told = f"reminder for {label} was {note}"
                if events.notify(session, f"missed-reminder-{reminder.id}", "missed-reminder",
                                 told, due_at=reminder.send_at, now=now):
                    report.told.append(told)
                log.warning("co-ordinators: reminder for %s was %s", label, note)
                report.missed.append(label)
            continue
        try:
            with session.begin_nested():
                if not events.take_reminder(session, reminder, ReminderStatus.ENQUEUED, now):
                    continue
                edition = build_reminder(session, settings, reminder, event, now)
                added = outbox.enqueue(session, edition, now=now)
                reminder.edition_id = edition.id
                session.flush()
        except Exception:  # one broken reminder must not hold the others back
            log.exception("reminder for %s could not be built; it stays planned", label)
            continue
        report.reminders.append(edition.slug)
        report.queued += added
        log.info("reminder for %s: queued %s message(s)", label, added)
    for notice in check_late_reminders(session, now):
        report.notices.append(notice)
        report.told.append(notice)
    message = check_quarter(session, now)
    if message:
        report.notices.append(message)
        report.told.append(message)
    # Housekeeping that nothing else does: the web's rate events grow with every request.
    report.pruned = ratelimit.prune_events(session, now - ratelimit.KEPT)
    return report


# ---------------------------------------------------------------- telling the co-ordinators

def tell_coordinators(settings: Settings, sessions: sessionmaker[Session],
                      now: datetime | None = None) -> int:
    """Mail what waits for the co-ordinators, after the pass has committed: this pass's
    notices (a missed reminder, no edition approved in time) and anything else recorded
    meanwhile (a send halted by the relay, a bounce alert). Each goes once to each person; one
    that could not be mailed is tried again on the next pass (`mailer.alerts`). Returns how
    many alerts are now mailed to everyone they are for.

    Readers' replies the bounce receiver could not forward (the relay was down) go here too:
    the receiver may have stopped since."""
    told = alerts.mail_pending(sessions, settings, now)
    try:
        replies.forward_pending(sessions, settings, now)
    except Exception:  # they stay pending; the alerts above are mailed and recorded
        log.exception("scheduler: could not forward readers' replies")
    return told


def next_wake(session: Session) -> datetime | None:
    """The next time anything falls due (a scheduled edition or a planned reminder)."""
    edition = session.scalar(select(func.min(Edition.scheduled_for))
                             .where(Edition.status == EditionStatus.SCHEDULED))
    reminder = events.next_reminder_at(session)
    return min((t for t in (edition, reminder) if t is not None), default=None)


# ---------------------------------------------------------------- what is coming

@dataclass(frozen=True)
class AgendaItem:
    kind: str  # edition | reminder | notice
    what: str
    at: datetime | None
    status: str
    note: str = ""


def agenda(session: Session, now: datetime | None = None, days: int = 30) -> list[AgendaItem]:
    """Everything due in the next `days` days, anything overdue, and the last 30 days'
    missed reminders and notices: what `mailer schedule list` shows."""
    now = now or utcnow()
    end = now + timedelta(days=days)
    items: list[AgendaItem] = []
    for e in session.scalars(select(Edition).where(Edition.status == EditionStatus.SCHEDULED,
                                                   Edition.scheduled_for < end)):
        overdue = e.scheduled_for is not None and e.scheduled_for < now
        items.append(AgendaItem("edition", f"{e.id} {e.slug}", e.scheduled_for, e.status,
                                "overdue: is `mailer scheduler` running?" if overdue
                                else f"by {e.scheduled_by or '?'}"))
    events.plan_reminders(session, now)
    for reminder, event in events.upcoming(session, now - timedelta(days=30), end):
        if reminder.send_at < now and reminder.status == ReminderStatus.ENQUEUED:
            continue  # sent already: `mailer edition list` has it
        items.append(AgendaItem(
            "reminder", f"{event.name}, {reminder.occurrence:%d %b %Y} "
                        f"(-{reminder.offset_days}d)", reminder.send_at, reminder.status,
            reminder.note or ("overdue: is `mailer scheduler` running?"
                              if reminder.send_at < now else
                              f"not after {uk_time(reminder.not_after)}")))
    for notice in events.notices(session, now - timedelta(days=30)):
        if notice.kind == "missed-reminder":
            continue  # its reminder row is listed above
        items.append(AgendaItem("notice", notice.message, notice.due_at, notice.kind))
    items.sort(key=lambda i: i.at or now)
    return items


# ---------------------------------------------------------------- one leader per database

class LeaderLock(Protocol):
    def acquire(self) -> bool: ...
    def check(self) -> bool: ...
    def release(self) -> None: ...


class FileLeaderLock:
    """SQLite: a lock file beside the database (one host shares it)."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        self.path = path
        self._lock = FileLock(str(path), is_singleton=False, thread_local=False)

    def acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def check(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)


class PgLeaderLock:
    """PostgreSQL: a session advisory lock on a dedicated connection (never a pooled one).

    The server frees it when that connection ends, however it ends, so a killed leader hands
    over. `check` asks the server whether this very connection still holds it; any failure
    counts as lost, and the scheduler stops at once (fencing). Not through PgBouncer in
    transaction mode, which breaks session locks.

    The heartbeat (the scheduler's thread) and the fencing check (APScheduler's) share the
    connection, and a SQLAlchemy Connection is not safe across threads: a mutex serialises it.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self._engine = create_engine(
            normalise_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 5, "application_name": "mailer scheduler",
                          "options": "-c statement_timeout=5000",
                          "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                          "keepalives_count": 2})
        self._conn = None
        self._mutex = threading.RLock()

    def acquire(self) -> bool:
        with self._mutex:
            return self._acquire()

    def _acquire(self) -> bool:
        conn = self._engine.connect()
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                               {"a": ADVISORY_KEY[0], "b": ADVISORY_KEY[1]}).scalar()
        except DBAPIError:
            conn.close()
            raise
        if got:
            self._conn = conn  # type: ignore[assignment]
            return True
        conn.close()
        return False

    def check(self) -> bool:
        with self._mutex:
            return self._check()

    def _check(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            held = conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid = :a AND objid = :b AND objsubid = 2"),
                {"a": ADVISORY_KEY[0], "b": ADVISORY_KEY[1]}).scalar()
        except DBAPIError:
            held = 0
        if not held:
            self._drop()
        return bool(held)

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # it is already broken
                self._conn.close()
            self._conn = None

    def release(self) -> None:
        with self._mutex:
            self._release()

    def _release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(DBAPIError):
                self._conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"),
                                   {"a": ADVISORY_KEY[0], "b": ADVISORY_KEY[1]})
            self._drop()
        self._engine.dispose()


def leader_lock(url: str) -> LeaderLock:
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() == "postgresql":
        return PgLeaderLock(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return FileLeaderLock(Path(str(parsed.database) + ".scheduler.lock"))
    raise ScheduleError(f"the scheduler needs PostgreSQL or a SQLite file, not {parsed}")


def leader_present(engine: Engine) -> bool:
    """Whether some scheduler leads this database now (for /metrics and `mailer doctor`).

    PostgreSQL: the advisory lock is granted to some session. SQLite: the lock file is locked;
    the probe takes the lock for an instant when nobody holds it, so a scheduler starting at
    that very instant waits one standby period (15 s) more.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            return bool(conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND classid = :a AND objid = :b AND objsubid = 2"),
                {"a": ADVISORY_KEY[0], "b": ADVISORY_KEY[1]}).scalar())
    import fcntl

    database = engine.url.database
    path = Path(str(database) + ".scheduler.lock")
    if not database or not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got one
    return False


# ---------------------------------------------------------------- the clock

class Scheduler:
    """Waits as a standby until it holds the leader lock, then leads: APScheduler wakes the
    catch-up pass at start, every `catch_up_seconds` and at the next due time, while the lock
    is checked every `heartbeat_seconds`. Losing the lock stops the clock at once; the
    scheduler then goes back to standby."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 lock: LeaderLock | None = None, catch_up_seconds: float = CATCH_UP_SECONDS,
                 heartbeat_seconds: float = 10.0, standby_seconds: float = 15.0,
                 clock: Callable[[], datetime] = utcnow,
                 on_pass: Callable[[CatchUp], None] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.lock = lock or leader_lock(settings.database)
        self.catch_up_seconds = catch_up_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.standby_seconds = standby_seconds
        self.clock = clock
        self.on_pass = on_pass
        self.leading = threading.Event()
        self.passes = 0
        self._aps: object | None = None

    def run(self, stop: threading.Event) -> None:
        """Block until `stop` is set: standby, lead, and back to standby if the lock is lost."""
        standby_logged = False
        try:
            while not stop.is_set():
                try:
                    got = self.lock.acquire()
                except DBAPIError as exc:
                    log.error("scheduler: cannot reach the database for the leader lock: %s",
                              str(exc.orig).strip())
                    got = False
                if not got:
                    if not standby_logged:
                        log.info("scheduler: standby (another scheduler leads this database)")
                        standby_logged = True
                    stop.wait(self.standby_seconds)
                    continue
                standby_logged = False
                log.info("scheduler: leading (catch-up every %ss)", self.catch_up_seconds)
                try:
                    self._lead(stop)
                finally:
                    self.leading.clear()
                    self.lock.release()
        finally:
            self.lock.release()

    def _lead(self, stop: threading.Event) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        aps = BackgroundScheduler(
            timezone=LONDON, jobstores={"default": MemoryJobStore()},
            # Passes never overlap; a long backup runs beside them, never delaying one.
            executors={"default": ThreadPoolExecutor(1), "backup": ThreadPoolExecutor(1)},
            job_defaults={"misfire_grace_time": MISFIRE_GRACE_SECONDS, "coalesce": True,
                          "max_instances": 1})
        self._aps = aps
        aps.add_job(self._pass, IntervalTrigger(seconds=self.catch_up_seconds, timezone=LONDON),
                    id="catch-up", name="catch-up pass", replace_existing=True,
                    next_run_time=datetime.now(LONDON))
        if self.settings.backup_every_hours and self.settings.backup_key_file is not None:
            aps.add_job(self._backup, IntervalTrigger(seconds=BACKUP_CHECK_SECONDS,
                                                      timezone=LONDON),
                        id="backup", name="scheduled backup", replace_existing=True,
                        executor="backup", next_run_time=datetime.now(LONDON))
        elif self.settings.backup_every_hours:
            log.warning("scheduler: no scheduled backups: MAILER_BACKUP_KEY_FILE is not set")
        aps.start()
        self.leading.set()
        try:
            while not stop.wait(self.heartbeat_seconds):
                if not self.lock.check():
                    log.error("scheduler: lost the leader lock; stopped scheduling")
                    return
        finally:
            aps.shutdown(wait=True)
            self._aps = None

    def _pass(self) -> None:
        # Fencing: a leader whose lock went since the last heartbeat does nothing.
        if not self.lock.check():
            log.error("scheduler: the leader lock is gone; this pass does nothing")
            return
        now = self.clock()
        try:
            with session_scope(self.sessions) as session:
                report = catch_up(session, self.settings, now)
            with session_scope(self.sessions) as session:
                wake = next_wake(session)
        except Exception:
            log.exception("scheduler: the catch-up pass failed; the next one tries again")
            return
        report.purged = self._retention(now)
        report.reconfirm = self._reconfirm(now)
        self.passes += 1
        if wake is not None and wake > now:
            self._wake_at(wake)
        try:
            tell_coordinators(self.settings, self.sessions, now)
        except Exception:  # the alerts stay pending; the pass's own work is committed
            log.exception("scheduler: could not tell the co-ordinators")
        if self.on_pass is not None:
            self.on_pass(report)

    def _retention(self, now: datetime) -> retention.Purged | None:
        """The daily retention purge, after the pass has committed: leader-only (it stops
        between batches once the lock goes), and in its own transactions."""
        try:
            purged = retention.run_due(self.sessions, retention.Periods.from_settings(
                self.settings), now, keep_going=self.lock.check)
        except Exception:  # the pass's own work is committed; tomorrow's run tries again
            log.exception("scheduler: the retention purge failed; the next pass tries again")
            return None
        if purged is not None:
            log.info("scheduler: retention purge: %s", ", ".join(
                f"{k} {v}" for k, v in purged.counts().items()))
        return purged

    def _reconfirm(self, now: datetime) -> reconfirm.Ran | None:
        """Lapse the readers out of time and ask today's share of those due: leader-only (it
        stops between requests once the lock goes), each step its own transaction."""
        try:
            ran = reconfirm.run(self.settings, self.sessions, now, keep_going=self.lock.check)
        except Exception:  # nothing half-done: each request is recorded only once sent
            log.exception("scheduler: the reconfirmation step failed; the next pass tries again")
            return None
        if ran.lapsed or ran.asked or ran.failed:
            log.info("scheduler: reconfirmation: %s lapsed, %s asked, %s not sent",
                     ran.lapsed, ran.asked, ran.failed)
        return ran

    def _backup(self) -> None:
        """Back up when the last backup is older than the interval; keep the newest N."""
        if not self.lock.check():
            return
        try:
            made = backup.take_scheduled(self.settings, self.clock())
        except Exception:  # pg_dump missing, disk full: said every check until it is fixed
            log.exception("scheduler: the scheduled backup failed; the next check tries again")
            return
        if made is not None:
            log.info("scheduler: backed up to %s (%s bytes)", made.path, made.size)

    def _wake_at(self, when: datetime) -> None:
        from apscheduler.triggers.date import DateTrigger

        aps = self._aps
        if aps is None:
            return
        aps.add_job(self._pass, DateTrigger(run_date=when, timezone=LONDON),  # type: ignore[attr-defined]
                    id="next-due", name="next due item", replace_existing=True)
