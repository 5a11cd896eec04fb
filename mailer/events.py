"""The events calendar: dates of interest and their reminder plans (tables and queries).

An `Event` is a date of interest (yearly, like Anti-Slavery Day on 18 October, or one-off, like
an Operation Aidant week) with reminder offsets ("14 and 1 days before"). Each reminder that
is due for one occurrence gets a `Reminder` row *before* its time comes (planning looks a year
ahead), so what should happen is in the database, not in a scheduler's memory: a reminder that
could not go out before its `not_after` time is marked missed, never sent late.

Times: people give a local date and a wall-clock time in Europe/London; the rows hold UTC.
Arithmetic is done on local *dates* and then localised (an aware datetime plus a timedelta is
wall-clock arithmetic in Python, and goes wrong across the clock change).

The weekend rule: a reminder whose day falls on a Saturday or Sunday goes on the Friday
before (our readers are at work on weekdays and a Monday-morning reminder for a Sunday event
is too late); `weekend="as_scheduled"` on an event keeps the exact day.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from mailer import alerts, segments
from mailer.config import Settings
from mailer.errors import MailerError, yaml_problem
from mailer.segments import AudienceFields
from subscribers import store
from subscribers.db import Base, UTCDateTime, changed_rows, utcnow
from subscribers.models import _check_in
from subscribers.rules import slug_of

LONDON = "Europe/London"
DEFAULT_OFFSETS = (14, 1)
DEFAULT_SEND_TIME = "09:00"
PLAN_HORIZON_DAYS = 400  # plan a little over a year ahead, so yearly events always have rows


class EventError(MailerError):
    """An event or an events file that cannot be used; the message names where and why."""


class ReminderStatus(StrEnum):
    PLANNED = "planned"  # its time has not come (or the scheduler has not reached it yet)
    ENQUEUED = "enqueued"  # a reminder edition was built and queued in the outbox
    MISSED = "missed"  # could not go out before not_after: never sent, co-ordinators told
    CANCELLED = "cancelled"  # the event changed or was removed before it was due


class WeekendRule(StrEnum):
    FRIDAY = "friday"  # a Saturday or Sunday send moves to the Friday before
    AS_SCHEDULED = "as_scheduled"


class Event(Base):
    __tablename__ = "event"
    __table_args__ = (CheckConstraint(_check_in("weekend", WeekendRule), name="weekend"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # For a yearly event the year of `starts_on` is the first year it counts from.
    starts_on: Mapped[date] = mapped_column(Date)
    ends_on: Mapped[date | None] = mapped_column(Date)  # last day of a multi-day event (a week)
    yearly: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    link: Mapped[str | None] = mapped_column(String(500))
    offsets: Mapped[list[int]] = mapped_column(JSON, default=lambda: list(DEFAULT_OFFSETS))
    send_time: Mapped[str] = mapped_column(String(5), default=DEFAULT_SEND_TIME)  # local HH:MM
    timezone: Mapped[str] = mapped_column(String(40), default=LONDON)
    reminder_text: Mapped[str] = mapped_column(Text, default="")
    topic: Mapped[str] = mapped_column(String(40), default="reminders")
    weekend: Mapped[str] = mapped_column(String(20), default=WeekendRule.FRIDAY)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Who its reminders reach (empty lists: everyone on `topic`, as before audiences), resolved
    # from `segment` when the event is stored, like an edition's (mailer.segments).
    segment: Mapped[str | None] = mapped_column(String(60))
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    organisation_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    audience_topics: Mapped[list[str]] = mapped_column(JSON, default=list)


class Reminder(Base):
    """One planned reminder: (event, occurrence, offset) is unique, so planning twice adds
    nothing and two schedulers can never both own one."""

    __tablename__ = "reminder"
    __table_args__ = (
        CheckConstraint(_check_in("status", ReminderStatus), name="status"),
        Index("uq_reminder_occurrence", "event_id", "occurrence", "offset_days", unique=True),
        Index("ix_reminder_due", "status", "send_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("event.id", ondelete="CASCADE"))
    occurrence: Mapped[date] = mapped_column(Date)  # the event's date this reminder is for
    offset_days: Mapped[int] = mapped_column(Integer)
    send_at: Mapped[datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(20), default=ReminderStatus.PLANNED)
    edition_id: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ScheduleNotice(Base):
    """Something the co-ordinators must be told (a missed reminder, no edition approved in
    time): logged when written, and listed by `mailer schedule list`. `key` makes it once."""

    __tablename__ = "schedule_notice"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# ---------------------------------------------------------------- validation

_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def check_send_time(value: str, where: str = "send time") -> time:
    """A local HH:MM outside 01:00-02:59, the hours the clock change repeats or skips."""
    match = _HHMM.fullmatch(value.strip())
    if match is None:
        raise EventError(f"{where}: {value!r} is not a time like 09:00 (24-hour HH:MM)")
    at = time(int(match[1]), int(match[2]))
    if 1 <= at.hour <= 2:
        raise EventError(f"{where}: {value} is between 01:00 and 02:59, which the clock change "
                         "skips or repeats in the UK", hint="choose a time from 03:00 on")
    return at


def check_timezone(value: str, where: str = "timezone") -> ZoneInfo:
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise EventError(f"{where}: {value!r} is not a known time zone (e.g. Europe/London)"
                         ) from None


def check_offsets(values: Iterable[Any], where: str = "offsets") -> list[int]:
    out: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 366:
            raise EventError(f"{where}: {value!r} is not a whole number of days from 0 to 366")
        out.append(value)
    if not out:
        raise EventError(f"{where}: give at least one, e.g. [14, 1]")
    return sorted(set(out), reverse=True)


# ---------------------------------------------------------------- times

def occurrence_in(event: Event, year: int) -> date | None:
    """The event's date in `year`; 29 February falls on 28 February in other years."""
    if not event.yearly:
        return event.starts_on if event.starts_on.year == year else None
    if year < event.starts_on.year:
        return None
    try:
        return event.starts_on.replace(year=year)
    except ValueError:  # 29 February in a year that has none
        return date(year, 2, 28)


def send_day(event: Event, occurrence: date, offset: int) -> date:
    day = occurrence - timedelta(days=offset)
    if event.weekend == WeekendRule.FRIDAY and day.weekday() >= 5:
        day -= timedelta(days=day.weekday() - 4)
    return day


def local_at(day: date, at: time, zone: ZoneInfo) -> datetime:
    """A local wall-clock time on a local date, as UTC (fold=0: the first of a repeated hour)."""
    return datetime.combine(day, at, tzinfo=zone).astimezone(UTC)


def reminder_times(event: Event, occurrence: date, offset: int) -> tuple[datetime, datetime]:
    """(send_at, not_after) in UTC.

    Not after: the start of the event's day (a reminder that arrives on the day or later is
    worse than none), and at most a day after its send time so a long outage never produces a
    burst of stale reminders. An on-the-day reminder (offset 0) may go until the day ends.
    """
    zone = ZoneInfo(event.timezone)
    send_at = local_at(send_day(event, occurrence, offset), check_send_time(event.send_time),
                       zone)
    day_start = local_at(occurrence, time(0, 0), zone)
    if offset == 0:
        day_start = local_at(occurrence + timedelta(days=1), time(0, 0), zone)
    return send_at, min(send_at + timedelta(days=1), day_start)


# ---------------------------------------------------------------- events

@dataclass
class EventSpec:
    """An event as typed or imported, before it is stored."""

    name: str
    starts_on: date
    yearly: bool = False
    ends_on: date | None = None
    description: str = ""
    link: str | None = None
    offsets: list[int] = field(default_factory=lambda: list(DEFAULT_OFFSETS))
    send_time: str = DEFAULT_SEND_TIME
    timezone: str = LONDON
    reminder_text: str = ""
    topic: str = "reminders"
    weekend: str = WeekendRule.FRIDAY
    slug: str | None = None
    segment: str | None = None  # a saved segment's slug, or the fields inline:
    audience: AudienceFields = field(default_factory=AudienceFields)

    def checked(self, where: str = "event") -> EventSpec:
        if not self.name or not self.name.strip():
            raise EventError(f"{where}: the name is empty")
        if len(self.name) > 200:
            raise EventError(f"{where}: the name is longer than 200 characters")
        check_send_time(self.send_time, f"{where}: send_time")
        check_timezone(self.timezone, f"{where}: timezone")
        self.offsets = check_offsets(self.offsets, f"{where}: offsets")
        if self.ends_on is not None and self.ends_on < self.starts_on:
            raise EventError(f"{where}: it ends ({self.ends_on}) before it starts "
                             f"({self.starts_on})")
        if self.weekend not in {w.value for w in WeekendRule}:
            raise EventError(f"{where}: weekend must be 'friday' or 'as_scheduled', "
                             f"not {self.weekend!r}")
        if self.link is not None and not re.match(r"https?://\S+$", self.link):
            raise EventError(f"{where}: link {self.link!r} is not an http(s) URL")
        self.slug = slug_of(self.slug or self.name).replace("_", "-")[:80]
        if not self.slug:
            raise EventError(f"{where}: the name gives no usable slug")
        if self.segment is not None and self.audience != AudienceFields():
            raise EventError(f"{where}: give either 'segment' or 'audience', not both")
        return self


def parse_date(value: str, where: str) -> date:
    """A date typed by a person (YYYY-MM-DD), or an error naming the field."""
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise EventError(f'{where} "{value}": not a date like 2027-10-18') from None


def parse_offsets(value: str, where: str) -> list[int]:
    """Reminder offsets typed as "14, 1" (days before), or an error naming the field."""
    try:
        return [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise EventError(f'{where} "{value}": give days before as numbers, e.g. 14,1'
                         ) from None


def add_event(session: Session, spec: EventSpec, *, replace: bool = False,
              now: datetime | None = None) -> tuple[Event, bool]:
    """Store an event (validated); returns (event, created). With `replace`, an event of the
    same slug is updated and its reminders not yet sent are planned again."""
    spec.checked()
    store.get_topic(session, spec.topic)  # an unknown topic is refused with the known ones
    if spec.segment is not None:
        known = segments.slugs(session)
        if spec.segment not in known:
            raise EventError(f"event '{spec.name}': unknown segment '{spec.segment}'; known: "
                             f"{', '.join(known) or '(none yet)'}",
                             hint="`mailer segments add` makes a new one")
        fields = AudienceFields.of(segments.get_segment(session, spec.segment))
    else:
        fields = spec.audience
    existing = session.scalar(select(Event).where(Event.slug == spec.slug))
    if existing is not None and not replace:
        raise EventError(f"there is already an event '{spec.slug}'",
                         hint="remove it first, or import with --replace")
    event = existing or Event(slug=spec.slug, created_at=now or utcnow())
    for name in ("name", "starts_on", "ends_on", "yearly", "description", "link", "offsets",
                 "send_time", "timezone", "reminder_text", "topic", "weekend", "segment"):
        setattr(event, name, getattr(spec, name))
    event.regions, event.roles = list(fields.regions), list(fields.roles)
    event.organisation_types, event.audience_topics = (list(fields.organisation_types),
                                                       list(fields.topics))
    if existing is None:
        session.add(event)
    else:
        # A changed event is planned again from now on: its unsent reminders go.
        session.execute(delete(Reminder).where(Reminder.event_id == event.id,
                                               Reminder.status == ReminderStatus.PLANNED))
        event.created_at = now or utcnow()
    session.flush()
    return event, existing is None


def get_event(session: Session, ident: str | int) -> Event:
    query = select(Event)
    if isinstance(ident, int) or str(ident).isdigit():
        query = query.where(Event.id == int(ident))
    else:
        query = query.where(Event.slug == ident)
    event = session.scalar(query)
    if event is None:
        raise EventError(f"no event '{ident}'", hint="`mailer events list` shows them")
    return event


def list_events(session: Session) -> Sequence[Event]:
    return session.scalars(select(Event).order_by(Event.starts_on, Event.id)).all()


def remove_event(session: Session, event: Event) -> int:
    """Delete an event and its reminders not yet sent; returns how many planned ones went.
    Reminders already sent stay in the outbox as editions (who got what is kept)."""
    planned = session.scalar(select(func.count()).select_from(Reminder).where(
        Reminder.event_id == event.id, Reminder.status == ReminderStatus.PLANNED)) or 0
    session.delete(event)
    session.flush()
    return planned


def next_occurrence(event: Event, today: date) -> date | None:
    for year in (today.year, today.year + 1):
        day = occurrence_in(event, year)
        if day is not None and day >= today:
            return day
    return event.starts_on if not event.yearly and event.starts_on >= today else None


def next_dates(session: Session, today: date, limit: int = 3) -> list[tuple[Event, date]]:
    """The next `limit` dates of interest from `today` (a local date) on, soonest first."""
    found = [(day, event.id, event) for event in list_events(session)
             if (day := next_occurrence(event, today)) is not None]
    return [(event, day) for day, _, event in sorted(found, key=lambda f: f[:2])[:limit]]


def when_text(event: Event, occurrence: date) -> str:
    """The occurrence as people read it: "Sunday 18 October 2026", or a first and last day."""
    def day_text(day: date) -> str:
        return f"{day:%A} {day.day} {day:%B %Y}"
    when = day_text(occurrence)
    if event.ends_on and event.ends_on > event.starts_on:
        when = f"{when} to {day_text(occurrence + (event.ends_on - event.starts_on))}"
    return when


def ics_name(event: Event, occurrence: date) -> str:
    """The file name of an occurrence's `.ics` attachment."""
    return f"{event.slug[:60]}-{occurrence.isoformat()}.ics"


def occurrence_ics(event: Event, occurrence: date, settings: Settings, now: datetime) -> bytes:
    """The occurrence as an all-day iCalendar event a reader can add to their calendar: the one
    builder for every mail that carries a date (reminders, the welcome mail)."""
    import icalendar

    span = (event.ends_on - event.starts_on) if event.ends_on else timedelta(0)
    cal = icalendar.Calendar()
    cal.add("prodid", f"-//{settings.from_name}//mailer//EN")
    cal.add("version", "2.0")
    cal.add("method", "PUBLISH")
    item = icalendar.Event()
    item.add("uid", f"{event.slug}-{occurrence.isoformat()}@{settings.list_id}")
    item.add("dtstamp", now)
    item.add("dtstart", occurrence)
    item.add("dtend", occurrence + span + timedelta(days=1))  # exclusive, as RFC 5545 says
    item.add("summary", event.name)
    if event.description:
        item.add("description", event.description)
    if event.link:
        item.add("url", event.link)
    item.add("transp", "TRANSPARENT")
    cal.add_component(item)
    data: bytes = cal.to_ical()
    return data


def reminders_for(session: Session, event_id: int) -> Sequence[Reminder]:
    return session.scalars(select(Reminder).where(Reminder.event_id == event_id)
                           .order_by(Reminder.send_at)).all()


# ---------------------------------------------------------------- planning

def plan_reminders(session: Session, now: datetime | None = None,
                   horizon_days: int = PLAN_HORIZON_DAYS) -> int:
    """Create the reminder rows due from each event's creation up to `horizon_days` ahead.

    A reminder whose time had already passed when its event was added is not planned (it
    never could have gone). One whose time passed while nothing ran is planned, and the
    catch-up pass then sends it or marks it missed. Returns how many rows were added.
    Safe beside another process planning the same rows (the scheduler, `mailer schedule
    list`): the unique key decides, and the loser adds nothing.
    """
    now = now or utcnow()
    end = now + timedelta(days=horizon_days)
    added = 0
    for event in session.scalars(select(Event)):
        have = {(r.occurrence, r.offset_days) for r in session.execute(
            select(Reminder.occurrence, Reminder.offset_days)
            .where(Reminder.event_id == event.id))}
        first_year = event.created_at.year - 1
        for year in range(first_year, end.year + 2):
            occurrence = occurrence_in(event, year)
            if occurrence is None:
                continue
            times = {offset: reminder_times(event, occurrence, offset) for offset in event.offsets}
            # Two offsets the weekend rule moves onto the same morning (2 and 1 days before a
            # Sunday: both the Friday) would mail every reader twice: the nearer one goes.
            nearest: dict[datetime, int] = {}
            for offset, (send_at, _) in times.items():
                nearest[send_at] = min(offset, nearest.get(send_at, offset))
            for offset in event.offsets:
                if (occurrence, offset) in have:
                    continue
                send_at, not_after = times[offset]
                if nearest[send_at] != offset:
                    continue
                if send_at < event.created_at or send_at > end:
                    continue
                have.add((occurrence, offset))
                try:
                    with session.begin_nested():
                        session.add(Reminder(event_id=event.id, occurrence=occurrence,
                                             offset_days=offset, send_at=send_at,
                                             not_after=not_after,
                                             status=ReminderStatus.PLANNED, updated_at=now))
                except IntegrityError:  # planned a moment ago by another process: the same row
                    continue
                added += 1
    session.flush()
    return added


def due_reminders(session: Session, now: datetime) -> Sequence[Reminder]:
    return session.scalars(select(Reminder).where(Reminder.status == ReminderStatus.PLANNED,
                                                  Reminder.send_at <= now)
                           .order_by(Reminder.send_at)).all()


def take_reminder(session: Session, reminder: Reminder, status: ReminderStatus,
                  now: datetime, note: str | None = None, edition_id: int | None = None) -> bool:
    """Move a planned reminder on, guarded: only one caller (one scheduler, one pass) wins.

    On PostgreSQL a concurrent second UPDATE waits for the first and then finds the row no
    longer planned, so it changes nothing and returns False.
    """
    values: dict[str, Any] = {"status": status, "updated_at": now, "note": note}
    if edition_id is not None:
        values["edition_id"] = edition_id
    changed = changed_rows(session.execute(update(Reminder).where(
        Reminder.id == reminder.id, Reminder.status == ReminderStatus.PLANNED).values(**values)
    ))
    if changed:
        session.refresh(reminder)
    return bool(changed)


def next_reminder_at(session: Session) -> datetime | None:
    return session.scalar(select(func.min(Reminder.send_at))
                          .where(Reminder.status == ReminderStatus.PLANNED))


def upcoming(session: Session, start: datetime, end: datetime) -> list[tuple[Reminder, Event]]:
    """Reminders whose send time is in [start, end), and those missed since `start`."""
    rows = session.execute(select(Reminder, Event).join(Event, Event.id == Reminder.event_id)
                           .where(Reminder.send_at >= start, Reminder.send_at < end)
                           .order_by(Reminder.send_at)).all()
    return [(r, e) for r, e in rows]


# ---------------------------------------------------------------- notices

def notify(session: Session, key: str, kind: str, message: str,
           due_at: datetime | None = None, now: datetime | None = None) -> bool:
    """Record a notice once per key, and an alert for the co-ordinators to be mailed; returns
    True when it is new (the caller logs it)."""
    if session.scalar(select(ScheduleNotice.id).where(ScheduleNotice.key == key)) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(ScheduleNotice(key=key, kind=kind, message=message, due_at=due_at,
                                       created_at=now or utcnow()))
    except IntegrityError:  # written a moment ago by another process (`scheduler --once`)
        return False
    text = message[:1].upper() + message[1:]
    subject = f"Scheduling: {text}"
    alerts.raise_alert(
        session, f"notice:{key}", kind, subject if len(subject) <= 150 else subject[:147] + "...",
        f"{text}.\n\nA reminder that missed its time is never sent late. `mailer schedule "
        "list` shows what is due and what was missed; editions are approved in the console.",
        now=now)
    return True


def notices(session: Session, since: datetime) -> Sequence[ScheduleNotice]:
    return session.scalars(select(ScheduleNotice).where(ScheduleNotice.created_at >= since)
                           .order_by(ScheduleNotice.created_at)).all()


# ---------------------------------------------------------------- files in

_FIELDS = {"name", "date", "on", "until", "yearly", "description", "link", "offsets",
           "send_time", "timezone", "reminder_text", "topic", "weekend", "slug",
           "segment", "audience"}


def _as_date(value: Any, where: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise EventError(f"{where}: {value!r} is not a date like 2027-10-18")


def _audience(value: Any, where: str) -> AudienceFields:
    """An event's inline audience: a mapping of regions, roles, organisation_types, topics."""
    if value is None:
        return AudienceFields()
    if not isinstance(value, dict):
        raise EventError(f"{where}: audience must be a mapping such as {{regions: [kent]}}")
    unknown = set(value) - {"regions", "roles", "organisation_types", "topics"}
    if unknown:
        raise EventError(f"{where}: audience: unknown field(s) {', '.join(sorted(unknown))}")
    lists = {}
    for key in ("regions", "roles", "organisation_types", "topics"):
        items = value.get(key) or []
        if not isinstance(items, list):
            raise EventError(f"{where}: audience: {key} must be a list such as [kent]")
        lists[key] = [str(v) for v in items]
    return AudienceFields(**lists)


def load_yaml(path: Path) -> list[EventSpec]:
    """Events from a YAML file: a list of mappings, or {events: [...]}; every problem named
    with the file and the entry."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EventError(f"{path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        problem, line = yaml_problem(exc)
        raise EventError(f"{path}{f':{line}' if line else ''}: not valid YAML: {problem}"
                         ) from None
    if isinstance(data, dict) and "events" in data:
        data = data["events"]
    if not isinstance(data, list):
        raise EventError(f"{path}: expected a list of events (or 'events:' with a list)")
    if not data:
        raise EventError(f"{path}: has no events")
    specs = []
    for number, item in enumerate(data, 1):
        where = f"{path}: event {number}"
        if not isinstance(item, dict):
            raise EventError(f"{where}: expected a mapping with name and date")
        unknown = set(item) - _FIELDS
        if unknown:
            raise EventError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if "name" not in item or ("date" not in item and "on" not in item):
            raise EventError(f"{where}: needs at least 'name' and 'date'")
        where = f"{path}: event {number} ({item['name']})"
        try:
            spec = EventSpec(
                name=str(item["name"]),
                starts_on=_as_date(item.get("date", item.get("on")), where),
                ends_on=_as_date(item["until"], where) if item.get("until") else None,
                yearly=bool(item.get("yearly", False)),
                description=str(item.get("description") or ""),
                link=str(item["link"]) if item.get("link") else None,
                offsets=list(item.get("offsets", DEFAULT_OFFSETS)),
                send_time=str(item.get("send_time", DEFAULT_SEND_TIME)),
                timezone=str(item.get("timezone", LONDON)),
                reminder_text=str(item.get("reminder_text") or ""),
                topic=str(item.get("topic", "reminders")),
                weekend=str(item.get("weekend", WeekendRule.FRIDAY)), slug=item.get("slug"),
                segment=str(item["segment"]) if item.get("segment") else None,
                audience=_audience(item.get("audience"), where))
        except TypeError:
            raise EventError(f"{where}: offsets must be a list such as [14, 1]") from None
        specs.append(spec.checked(where))
    return specs


def load_ics(path: Path) -> list[EventSpec]:
    """Events from an iCalendar file: each VEVENT's SUMMARY, DTSTART (a date), DTEND,
    DESCRIPTION, URL; RRULE FREQ=YEARLY makes it yearly; VALARM triggers become offsets."""
    import icalendar

    try:
        calendar = icalendar.Calendar.from_ical(path.read_bytes())
    except OSError as exc:
        raise EventError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise EventError(f"{path}: not a valid iCalendar file: {exc}") from None
    specs = []
    for number, component in enumerate(calendar.walk("VEVENT"), 1):
        summary = str(component.get("SUMMARY") or "").strip()
        where = f"{path}: VEVENT {number}" + (f" ({summary})" if summary else "")
        if not summary:
            raise EventError(f"{where}: has no SUMMARY")
        start = component.get("DTSTART")
        if start is None:
            raise EventError(f"{where}: has no DTSTART")
        on = _as_date(start.dt, where)
        until = None
        end = component.get("DTEND")
        if end is not None:
            last = _as_date(end.dt, where)
            # DTEND of an all-day event is exclusive (the day after)
            if not isinstance(end.dt, datetime):
                last -= timedelta(days=1)
            until = last if last > on else None
        rrule = component.get("RRULE")
        yearly = bool(rrule) and [str(f).upper() for f in rrule.get("FREQ", [])] == ["YEARLY"]
        if rrule and not yearly:
            raise EventError(f"{where}: only yearly repeats (RRULE:FREQ=YEARLY) are supported")
        offsets: list[int] = []
        for alarm in component.walk("VALARM"):
            trigger = alarm.get("TRIGGER")
            if trigger is not None and isinstance(trigger.dt, timedelta) and trigger.dt <= \
                    timedelta(0):
                # before the (all-day) start, in whole days, rounded up: -PT12H is the day before
                offsets.append(-(trigger.dt // timedelta(days=1)))
        url = component.get("URL")
        spec = EventSpec(name=summary, starts_on=on, ends_on=until, yearly=yearly,
                         description=str(component.get("DESCRIPTION") or ""),
                         link=str(url) if url else None,
                         offsets=offsets or list(DEFAULT_OFFSETS))
        specs.append(spec.checked(where))
    if not specs:
        raise EventError(f"{path}: has no VEVENT")
    return specs


def load_file(path: Path) -> list[EventSpec]:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return load_yaml(path)
    if suffix in (".ics", ".ical", ".ifb"):
        return load_ics(path)
    raise EventError(f"{path}: give a .yaml, .yml or .ics file")


def import_events(session: Session, specs: Sequence[EventSpec], *, replace: bool = False,
                  now: datetime | None = None) -> tuple[int, int]:
    """All or nothing (the caller's transaction): returns (added, updated)."""
    slugs = [s.slug for s in specs]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1 and s})
    if duplicates:
        raise EventError(f"the file names the same event twice: {', '.join(duplicates)}")
    added = updated = 0
    for spec in specs:
        _, created = add_event(session, spec, replace=replace, now=now)
        added += created
        updated += not created
    return added, updated
