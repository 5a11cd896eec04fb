"""The events calendar: reminder times in UK time across clock changes and leap days, the
weekend rule, planning, and YAML / iCalendar import with every bad input named."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from mailer import events
from mailer.cli import run
from mailer.cli.runtime import console
from mailer.config import Settings
from mailer.events import Event, EventError, EventSpec, Reminder, ReminderStatus


def _event(**kw: object) -> Event:
    spec = EventSpec(**{"name": "Test day", "starts_on": date(2026, 10, 18), **kw}).checked()
    values = {k: getattr(spec, k) for k in (
        "slug", "name", "starts_on", "ends_on", "yearly", "offsets", "send_time", "timezone",
        "weekend", "topic")}
    return Event(**values, created_at=datetime(2020, 1, 1, tzinfo=UTC))


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("occurrence", "offset", "send_at"), [
    # 29 March 2026: the clocks go forward at 01:00 GMT; 09:00 that day is BST (08:00 UTC)
    (date(2026, 3, 30), 1, _utc(2026, 3, 29, 8, 0)),
    (date(2026, 3, 29), 1, _utc(2026, 3, 28, 9, 0)),  # the Saturday before: still GMT
    (date(2026, 4, 12), 14, _utc(2026, 3, 29, 8, 0)),
    # 25 October 2026: the clocks go back at 02:00 BST; 09:00 that day is GMT again
    (date(2026, 10, 26), 1, _utc(2026, 10, 25, 9, 0)),
    (date(2026, 10, 25), 1, _utc(2026, 10, 24, 8, 0)),  # the Saturday before: still BST
    (date(2026, 11, 8), 14, _utc(2026, 10, 25, 9, 0)),
    # 29 February 2028 (a Tuesday, GMT)
    (date(2028, 3, 1), 1, _utc(2028, 2, 29, 9, 0)),
    (date(2028, 3, 14), 14, _utc(2028, 2, 29, 9, 0)),
])
def test_reminders_go_at_nine_uk_time_across_clock_changes_and_the_leap_day(
        occurrence: date, offset: int, send_at: datetime) -> None:
    event = _event(weekend="as_scheduled", offsets=[offset])
    got, not_after = events.reminder_times(event, occurrence, offset)
    assert got == send_at
    assert got.astimezone(events.ZoneInfo("Europe/London")).hour == 9
    # never after the event's day has begun, never more than a day late
    start_of_day = datetime.combine(occurrence, datetime.min.time(),
                                    tzinfo=events.ZoneInfo("Europe/London"))
    assert not_after <= start_of_day
    assert (not_after - got).total_seconds() <= 86400


def test_a_yearly_29_february_falls_on_28_february_in_other_years() -> None:
    event = _event(starts_on=date(2028, 2, 29), yearly=True)
    assert events.occurrence_in(event, 2028) == date(2028, 2, 29)
    assert events.occurrence_in(event, 2029) == date(2029, 2, 28)
    assert events.occurrence_in(event, 2027) is None  # before it was first held


def test_a_reminder_due_on_a_weekend_goes_on_the_friday_before() -> None:
    # Anti-Slavery Day 2026 is a Sunday: the day-before reminder would be a Saturday.
    event = _event(starts_on=date(2010, 10, 18), yearly=True)
    day = events.occurrence_in(event, 2026)
    assert day == date(2026, 10, 18) and day.weekday() == 6
    send_at, not_after = events.reminder_times(event, day, 1)
    assert send_at == _utc(2026, 10, 16, 8, 0)  # Friday 09:00 BST
    assert not_after == _utc(2026, 10, 17, 8, 0)  # a day later at most
    fourteen, _ = events.reminder_times(event, day, 14)  # Sunday 4 October -> Friday 2nd
    assert fourteen == _utc(2026, 10, 2, 8, 0)
    kept = _event(starts_on=date(2010, 10, 18), yearly=True, weekend="as_scheduled")
    assert events.reminder_times(kept, day, 1)[0] == _utc(2026, 10, 17, 8, 0)


def test_two_reminders_the_weekend_rule_puts_on_one_morning_go_once(session: Session) -> None:
    session.execute(delete(Event))
    now = _utc(2027, 9, 1, 12, 0)
    # Sunday 10 October 2027: 2 days before is Friday, 1 day before is Saturday -> Friday too
    event, _ = events.add_event(session, EventSpec(name="Vigil", starts_on=date(2027, 10, 10),
                                                   offsets=[7, 2, 1]), now=now)
    assert events.plan_reminders(session, now) == 2
    rows = events.reminders_for(session, event.id)
    assert [(r.offset_days, r.send_at) for r in rows] == [
        (7, _utc(2027, 10, 1, 8, 0)), (1, _utc(2027, 10, 8, 8, 0))]  # the nearer one stays
    assert events.plan_reminders(session, now) == 0


def test_an_on_the_day_reminder_may_go_until_the_day_ends() -> None:
    event = _event(offsets=[0])
    send_at, not_after = events.reminder_times(event, date(2026, 12, 2), 0)
    assert send_at == _utc(2026, 12, 2, 9, 0)
    assert not_after == _utc(2026, 12, 3, 0, 0)


@pytest.mark.parametrize(("value", "problem"), [
    ("01:30", "between 01:00 and 02:59"), ("02:59", "between 01:00 and 02:59"),
    ("9am", "not a time"), ("25:00", "not a time"),
])
def test_send_times_the_clock_change_repeats_or_skips_are_refused(value: str,
                                                                  problem: str) -> None:
    with pytest.raises(EventError, match=problem):
        events.check_send_time(value)


def test_migration_seeds_the_three_default_dates(session: Session) -> None:
    seeded = {e.slug: e for e in events.list_events(session)}
    assert set(seeded) == {"anti-slavery-day", "international-day-for-the-abolition-of-slavery",
                           "operation-aidant-week-2027-03"}
    assert seeded["anti-slavery-day"].yearly and seeded["anti-slavery-day"].starts_on.month == 10
    assert seeded["anti-slavery-day"].starts_on.day == 18
    assert (seeded["international-day-for-the-abolition-of-slavery"].starts_on.timetuple()[1:3]
            == (12, 2))
    aidant = seeded["operation-aidant-week-2027-03"]
    assert not aidant.yearly and aidant.ends_on is not None and aidant.ends_on > aidant.starts_on
    assert all(e.offsets == [14, 1] and e.send_time == "09:00" for e in seeded.values())


def test_planning_twice_adds_nothing_and_skips_what_was_past_when_added(
        session: Session) -> None:
    session.execute(delete(Event))
    event, _ = events.add_event(session, EventSpec(name="Harvest week", starts_on=date(2027, 9, 6),
                                                   offsets=[14, 1]),
                                now=_utc(2027, 8, 30, 12, 0))  # 14 days before has gone
    first = events.plan_reminders(session, _utc(2027, 8, 30, 12, 0))
    again = events.plan_reminders(session, _utc(2027, 8, 31, 12, 0))
    rows = events.reminders_for(session, event.id)
    assert (first, again) == (1, 0)
    assert [(r.offset_days, r.status) for r in rows] == [(1, ReminderStatus.PLANNED)]
    assert rows[0].send_at == _utc(2027, 9, 3, 8, 0)  # Sunday 5th -> Friday 3rd, 09:00 BST


def test_replacing_an_event_replans_its_reminders_and_removing_drops_them(
        session: Session) -> None:
    now = _utc(2027, 1, 1, 12, 0)
    event, _ = events.add_event(session, EventSpec(name="Open day", starts_on=date(2027, 6, 10)),
                                now=now)
    events.plan_reminders(session, now)
    with pytest.raises(EventError, match="already an event 'open-day'"):
        events.add_event(session, EventSpec(name="Open day", starts_on=date(2027, 6, 11)))
    events.add_event(session, EventSpec(name="Open day", starts_on=date(2027, 6, 17),
                                        offsets=[7]), replace=True, now=now)
    events.plan_reminders(session, now)
    assert [(r.occurrence, r.offset_days) for r in events.reminders_for(session, event.id)] == [
        (date(2027, 6, 17), 7)]
    assert events.remove_event(session, event) == 1
    assert session.scalar(select(func.count()).select_from(Reminder)
                          .where(Reminder.event_id == event.id)) == 0


def test_yaml_import(tmp_path: Path, session: Session) -> None:
    path = tmp_path / "dates.yaml"
    path.write_text(
        "events:\n"
        "  - name: Safeguarding Adults Week\n    date: 2027-11-15\n    until: 2027-11-21\n"
        "    offsets: [7]\n    send_time: '08:30'\n    reminder_text: Book the training.\n"
        "  - name: Human Rights Day\n    date: 1950-12-10\n    yearly: true\n"
        "    link: https://www.un.org/en/observances/human-rights-day\n", encoding="utf-8")
    specs = events.load_file(path)
    assert [(s.slug, s.yearly, s.offsets, s.send_time) for s in specs] == [
        ("safeguarding-adults-week", False, [7], "08:30"),
        ("human-rights-day", True, [14, 1], "09:00")]
    assert events.import_events(session, specs) == (2, 0)
    assert events.get_event(session, "safeguarding-adults-week").ends_on == date(2027, 11, 21)


@pytest.mark.parametrize(("content", "message"), [
    ("events:\n  - name: A\n    date: [unclosed\n", r"dates\.yaml:\d+: not valid YAML"),
    ("- name: A\n  date: [2027-10-18\n  offsets: [1]\n",
     r"dates\.yaml:3: not valid YAML: expected ',' or '\]', but got ':', in the list in \[ \] "
     "that starts on line 2"),
    ("- name: A\n", "event 1: needs at least 'name' and 'date'"),
    ("- name: A\n  date: 18 October\n", r"event 1 \(A\): '18 October' is not a date"),
    ("- name: A\n  date: 2027-10-18\n  send_time: '01:30'\n", "between 01:00 and 02:59"),
    ("- name: A\n  date: 2027-10-18\n  offsets: [-3]\n", "-3 is not a whole number of days"),
    ("- name: A\n  date: 2027-10-18\n  colour: red\n", "unknown field"),
    ("name: A\n", "expected a list of events"),
    ("events: []\n", "has no events"),
])
def test_a_bad_yaml_file_is_refused_naming_where_and_why(tmp_path: Path, content: str,
                                                         message: str) -> None:
    path = tmp_path / "dates.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EventError, match=message) as info:
        events.load_file(path)
    assert str(path) in str(info.value)


ICS = """BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//test//EN\r
BEGIN:VEVENT\r
UID:1@test\r
DTSTAMP:20260101T000000Z\r
SUMMARY:Anti-Slavery Day\r
DTSTART;VALUE=DATE:20101018\r
DTEND;VALUE=DATE:20101019\r
RRULE:FREQ=YEARLY\r
URL:https://example.org/asd\r
BEGIN:VALARM\r
ACTION:DISPLAY\r
DESCRIPTION:soon\r
TRIGGER:-P7D\r
END:VALARM\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:2@test\r
DTSTAMP:20260101T000000Z\r
SUMMARY:Operation Aidant week\r
DTSTART;VALUE=DATE:20270315\r
DTEND;VALUE=DATE:20270322\r
BEGIN:VALARM\r
ACTION:DISPLAY\r
DESCRIPTION:soon\r
TRIGGER:-PT12H\r
END:VALARM\r
END:VEVENT\r
END:VCALENDAR\r
"""


def test_icalendar_import(tmp_path: Path) -> None:
    path = tmp_path / "dates.ics"
    path.write_text(ICS, encoding="utf-8")
    first, second = events.load_file(path)
    assert (first.name, first.starts_on, first.yearly, first.offsets, first.link) == (
        "Anti-Slavery Day", date(2010, 10, 18), True, [7], "https://example.org/asd")
    assert first.ends_on is None  # a one-day all-day event
    assert (second.starts_on, second.ends_on, second.yearly, second.offsets) == (
        date(2027, 3, 15), date(2027, 3, 21), False, [1])  # 12 hours before: the day before


@pytest.mark.parametrize(("content", "message"), [
    ("BEGIN:VCALENDAR\r\nnot ical at all\r\n", "not a valid iCalendar file"),
    ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nEND:VCALENDAR\r\n", "has no VEVENT"),
    (ICS.replace("SUMMARY:Operation Aidant week\r\n", ""), "VEVENT 2: has no SUMMARY"),
    (ICS.replace("FREQ=YEARLY", "FREQ=WEEKLY"), "only yearly repeats"),
])
def test_a_bad_icalendar_file_is_refused_naming_where_and_why(tmp_path: Path, content: str,
                                                              message: str) -> None:
    path = tmp_path / "dates.ics"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EventError, match=message) as info:
        events.load_file(path)
    assert str(path) in str(info.value)


def test_events_from_the_command_line(settings: Settings, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 200)  # tables unwrapped, as on a wide terminal
    def mailer(*args: str) -> tuple[int, str, str]:
        code = run(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    # A Monday about half a year ahead, within the planning horizon whenever this runs.
    today = date.today()
    monday = today + timedelta(days=182 - today.weekday())
    code, out, _ = mailer("events", "add", "Safeguarding Adults Week", "--date",
                          monday.isoformat(), "--until", (monday + timedelta(days=6)).isoformat(),
                          "--offsets", "7,1", "--at", "08:30", "--text", "Book the training.")
    assert code == 0 and "added event 'safeguarding-adults-week'; 2 reminder(s) planned" in out
    code, out, _ = mailer("events", "list")
    assert code == 0 and "safeguarding-adults-week" in out and "anti-slavery-day" in out
    code, out, _ = mailer("events", "show", "safeguarding-adults-week")
    # a week before is the Monday before; the day before is a Sunday: the Friday instead
    days = [(monday - timedelta(days=d)).strftime("%a %d %b %Y 08:30") for d in (7, 3)]
    assert code == 0 and all(d in out for d in days) and "planned" in out
    far = today + timedelta(days=events.PLAN_HORIZON_DAYS + 60)
    code, out, _ = mailer("events", "add", "Far day", "--date", far.isoformat())
    assert code == 0 and f"0 reminder(s) planned (next date {far:%d %b %Y}:" in out
    code, out, _ = mailer("events", "add", "Gone day", "--date", "2020-01-06")
    assert code == 0 and "0 reminder(s) planned (its date has passed)" in out
    code, _, err = mailer("events", "add", "Night", "--date", "2099-01-01", "--at", "01:30")
    assert code == 1 and "between 01:00 and 02:59" in " ".join(err.split())
    assert err.count("error:") == 1 and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: X\n  date: nope\n", encoding="utf-8")
    code, _, err = mailer("events", "import", str(bad))
    assert code == 1 and f"{bad}: event 1 (X): 'nope' is not a date" in " ".join(err.split())
    code, out, _ = mailer("events", "remove", "safeguarding-adults-week", "--yes")
    assert code == 0 and "2 planned reminder(s)" in out
    code, _, err = mailer("events", "show", "safeguarding-adults-week")
    assert code == 1 and "no event 'safeguarding-adults-week'" in err


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_processes_planning_at_once_plan_each_reminder_once(db_url: str, backend: str) -> None:
    """The scheduler's pass and `mailer schedule list` both plan: the second waits on the
    unique key, then adds nothing instead of failing."""
    import threading

    from subscribers.db import make_engine, session_factory
    from tests.waiting import a_session_waits_on_a_lock

    engine = make_engine(db_url)
    sessions = session_factory(engine)
    now = _utc(2027, 1, 1, 12, 0)
    with sessions() as s:
        s.execute(delete(Event))
        events.add_event(s, EventSpec(name="Open day", starts_on=date(2027, 6, 10)), now=now)
        s.commit()
    results: list[int | Exception] = []
    first, second = sessions(), sessions()

    def plan() -> None:
        try:
            results.append(events.plan_reminders(second, now))
            second.commit()
        except Exception as exc:  # reported below, on the test's thread
            results.append(exc)
            second.rollback()
    thread = threading.Thread(target=plan, daemon=True)
    try:
        assert events.plan_reminders(first, now) == 2  # not committed yet
        thread.start()
        waited = a_session_waits_on_a_lock(db_url)  # the second really waits on the first's rows
        first.commit()
    finally:
        first.close()  # before anything else: the second thread waits on its rows
        thread.join(30)
        second.close()
    assert waited, "the second planner never waited on the first"
    assert results == [0]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Reminder)) == 2
    engine.dispose()
