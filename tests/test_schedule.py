"""The scheduler: reminders and scheduled editions go once, on time in UK time, across clock
changes and restarts; too late means missed, never sent; one leader per database."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import icalendar
import pytest
import time_machine
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from mailer import events, outbox, schedule
from mailer.cli import run
from mailer.cli.runtime import console
from mailer.config import Settings
from mailer.devsink import DevSink
from mailer.events import Event, EventSpec, Reminder, ReminderStatus, ScheduleNotice
from mailer.models import Delivery, Edition, EditionKind, EditionStatus
from mailer.schedule import LONDON, ScheduleError
from mailer.worker import Summary, Worker
from subscribers import store
from subscribers.db import session_factory, utcnow
from subscribers.models import Channel
from subscribers.rules import Rules
from tests.waiting import wait_for

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
PEOPLE = 12


@pytest.fixture
def sessions(engine) -> sessionmaker[Session]:
    factory = session_factory(engine)
    with factory() as s:  # the migration's default dates would fall due in these tests too
        s.execute(delete(Event))
        s.commit()
    return factory


def _people(sessions: sessionmaker[Session], rules: Rules, n: int = PEOPLE) -> list[str]:
    emails = [f"reader{i}@kent.police.uk" for i in range(n)]
    with sessions() as s:
        topics = store.topics_by_slug(s, ["newsletter", "reminders"])
        store.bulk_add_active(s, rules, [
            (store.profile_from(rules, email=e, name=f"Reader {i}", region="kent"), topics)
            for i, e in enumerate(emails)], store.Context(channel=Channel.IMPORT))
        s.commit()
    return emails


def _event(sessions: sessionmaker[Session], on: date, offsets: list[int],
           weekend: str = "as_scheduled") -> int:
    with sessions() as s:
        event, _ = events.add_event(s, EventSpec(name="Test day", starts_on=on, offsets=offsets,
                                                 weekend=weekend, reminder_text="Be ready."))
        s.commit()
        return event.id


def _pass(sessions: sessionmaker[Session], settings: Settings,
          now: datetime | None = None) -> schedule.CatchUp:
    with sessions() as s:
        report = schedule.catch_up(s, settings, now)
        s.commit()
    return report


def _deliveries(sessions: sessionmaker[Session], edition_id: int | None = None) -> int:
    with sessions() as s:
        query = select(func.count()).select_from(Delivery)
        if edition_id is not None:
            query = query.where(Delivery.edition_id == edition_id)
        return s.scalar(query) or 0


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# ---------------------------------------------------------------- times people type

@pytest.mark.parametrize(("typed", "expected"), [
    ("2027-01-11 09:00", _utc(2027, 1, 11, 9, 0)),  # GMT
    ("2027-07-12 09:00", _utc(2027, 7, 12, 8, 0)),  # BST
    ("2027-07-12T09:00+00:00", _utc(2027, 7, 12, 9, 0)),  # an explicit offset wins
    ("2027-07-12 08:00Z", _utc(2027, 7, 12, 8, 0)),
])
def test_at_is_uk_time_unless_an_offset_is_given(typed: str, expected: datetime) -> None:
    assert schedule.parse_at(typed, now=_utc(2026, 12, 1)) == expected


@pytest.mark.parametrize(("typed", "problem"), [
    ("2027-03-28 01:30", "between 01:00 and 02:59"),  # skipped by the spring change
    ("2027-10-31 01:30", "between 01:00 and 02:59"),  # repeated by the autumn change
    ("2027-10-31 00:30Z", "between 01:00 and 02:59"),  # 01:30 BST given in UTC
    ("2026-11-30 09:00", "has already passed"),
    ("next Monday", "not a date and time"),
    ("2027-02-30 09:00", "not a date and time"),
    ("2027-01-11", "not a date and time"),  # a bare date would mean midnight
])
def test_unsafe_or_past_or_malformed_times_are_refused(typed: str, problem: str) -> None:
    with pytest.raises(ScheduleError, match=problem) as info:
        schedule.parse_at(typed, now=_utc(2026, 12, 1))
    assert typed in str(info.value)


@pytest.mark.parametrize(("typed", "said"), [
    # the hour as typed, not as converted (01:30 on 28 March 2027 does not exist: 02:30 BST)
    ("2027-03-28 01:30", "01:30 UK time is between 01:00 and 02:59, which the clock change "
                         "skips or repeats (on Sunday 28 March 2027 the clocks go forward)"),
    ("2027-10-31 01:30", "(on Sunday 31 October 2027 the clocks go back)"),
    ("2027-06-01 02:45", "02:45 UK time is between 01:00 and 02:59, which the clock change "
                         "skips or repeats"),
])
def test_a_refused_clock_change_time_is_named_as_it_was_typed(typed: str, said: str) -> None:
    with pytest.raises(ScheduleError) as info:
        schedule.parse_at(typed, now=_utc(2026, 12, 1))
    assert said in str(info.value) and info.value.hint == "choose 03:00 or later"


# ---------------------------------------------------------------- reminders on time

@pytest.mark.parametrize(("on", "due"), [
    (date(2026, 3, 30), _utc(2026, 3, 29, 8, 0)),  # 29 March 2026, 09:00 BST
    (date(2026, 10, 26), _utc(2026, 10, 25, 9, 0)),  # 25 October 2026, 09:00 GMT
    (date(2028, 3, 1), _utc(2028, 2, 29, 9, 0)),  # 29 February 2028
])
def test_a_reminder_goes_at_nine_uk_time_not_a_minute_before(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, on: date,
        due: datetime) -> None:
    _people(sessions, rules)
    with time_machine.travel(due - timedelta(days=3), tick=False):
        event_id = _event(sessions, on, [1])
        assert _pass(sessions, settings).reminders == []
    with time_machine.travel(due - timedelta(minutes=1), tick=False):
        assert _pass(sessions, settings).reminders == []
    with time_machine.travel(due, tick=False):
        report = _pass(sessions, settings)
    assert report.reminders == [f"reminder-test-day-{on.isoformat()}-1d"]
    with sessions() as s:
        edition = s.scalar(select(Edition).where(Edition.event_id == event_id))
        assert edition is not None and edition.kind == EditionKind.REMINDER
        assert edition.scheduled_for == due
        assert edition.scheduled_for.astimezone(LONDON).hour == 9
        assert edition.occurrence == on and not edition.public
        assert _deliveries(sessions, edition.id) == PEOPLE


def test_an_event_on_a_sunday_is_reminded_on_the_friday(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules)
    with time_machine.travel(_utc(2026, 10, 1), tick=False):
        _event(sessions, date(2026, 10, 18), [1], weekend="friday")  # a Sunday
    with time_machine.travel(_utc(2026, 10, 16, 7, 59), tick=False):
        assert _pass(sessions, settings).reminders == []
    with time_machine.travel(_utc(2026, 10, 16, 8, 0), tick=False):  # Friday 09:00 BST
        assert len(_pass(sessions, settings).reminders) == 1


def test_the_scheduler_down_across_the_send_time_sends_once_after_restart(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules) -> None:
    _people(sessions, rules)
    due = _utc(2027, 5, 13, 8, 0)  # Thursday 09:00 BST, for Friday 14 May
    with time_machine.travel(due - timedelta(days=2), tick=False):
        _event(sessions, date(2027, 5, 14), [1])
        _pass(sessions, settings)  # planned; then nothing runs until after the send time
    with time_machine.travel(due + timedelta(hours=5), tick=False):
        first = _pass(sessions, settings)
        second = _pass(sessions, settings)
    assert len(first.reminders) == 1 and first.queued == PEOPLE
    assert second.reminders == [] and second.queued == 0
    assert _deliveries(sessions) == PEOPLE


def test_a_reminder_past_its_not_after_time_is_missed_told_and_never_sent(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _people(sessions, rules)
    due = _utc(2027, 5, 13, 8, 0)
    with time_machine.travel(due - timedelta(days=2), tick=False):
        event_id = _event(sessions, date(2027, 5, 14), [1])
        _pass(sessions, settings)
    caplog.set_level(logging.WARNING, logger="mailer.schedule")
    with time_machine.travel(_utc(2027, 5, 13, 23, 0), tick=False):  # midnight BST: event day
        report = _pass(sessions, settings)
        again = _pass(sessions, settings)
        monkeypatch.setattr(console, "width", 200)
        code = run(["schedule", "list", "--days", "7"])
        out = capsys.readouterr().out
    assert len(report.missed) == 1 and report.reminders == [] and again.missed == []
    assert any("co-ordinators: reminder for Test day" in r.message and "missed" in r.message
               for r in caplog.records)
    with sessions() as s:
        reminder = s.scalar(select(Reminder).where(Reminder.event_id == event_id))
        assert reminder is not None and reminder.status == ReminderStatus.MISSED
        assert s.scalar(select(func.count()).select_from(ScheduleNotice)) == 1
        assert s.scalar(select(Edition).where(Edition.event_id == event_id)) is None
    assert _deliveries(sessions) == 0
    assert code == 0 and "missed" in out and "Thu 13 May 2027 09:00 BST" in out
    assert "2027-05-13 08:00Z" in out


def test_reminder_mail_has_the_ics_and_the_unsubscribe_headers(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        tmp_path: Path) -> None:
    emails = _people(sessions, rules, 3)
    with time_machine.travel(_utc(2027, 10, 1), tick=False), sessions() as s:
        events.add_event(s, EventSpec(name="Anti-Slavery Day", starts_on=date(2010, 10, 18),
                                      yearly=True, offsets=[14],
                                      link="https://www.gov.uk/modern-slavery"))
        s.commit()
    with time_machine.travel(_utc(2027, 10, 4, 8, 0), tick=False):
        assert len(_pass(sessions, settings).reminders) == 1
    with DevSink(tmp_path / "sink", port=0) as sink:
        sending = settings.model_copy(update={"smtp_url": type(settings.smtp_url)(sink.url),
                                              "rate_per_minute": 0, "rate_per_day": 0})
        # not_after is 5 October 08:00 UTC; the worker's own clock says "on time"
        summary = asyncio.run(Worker(sending, sessions, poll=0.05,
                                     clock=lambda: _utc(2027, 10, 4, 8, 1)).run(drain=True))
        raws = [sink.raw(m.key) for m in sink.messages()]
    assert summary.sent == 3 and len(raws) == 3
    message = email.message_from_bytes(raws[0], policy=email.policy.default)
    assert message["Subject"] == "Reminder: Anti-Slavery Day, Monday 18 October (in 14 days)"
    assert message["List-Unsubscribe"].startswith(f"<{settings.base_url}/u/")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["To"].split("<")[-1].rstrip(">") in emails
    assert "Dear Reader" in message.get_body(("plain",)).get_content()
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_content_type() == "text/calendar"
    calendar = icalendar.Calendar.from_ical(attachment.get_content())
    (vevent,) = calendar.walk("VEVENT")
    assert vevent.get("DTSTART").dt == date(2027, 10, 18)
    assert str(vevent.get("SUMMARY")) == "Anti-Slavery Day"


def test_the_ics_of_a_week_long_event_is_valid_icalendar_and_reads_back_in(
        settings: Settings, tmp_path: Path) -> None:
    event = Event(slug="operation-aidant-week", name="Operation Aidant week",
                  starts_on=date(2027, 3, 15), ends_on=date(2027, 3, 21), yearly=False,
                  description="A national week of action, led by the NCA.",
                  link="https://www.nationalcrimeagency.gov.uk/", offsets=[14, 1],
                  send_time="09:00", timezone="Europe/London", topic="reminders")
    raw = events.occurrence_ics(event, date(2027, 3, 15), settings, _utc(2027, 3, 1, 9, 0))
    assert raw.startswith(b"BEGIN:VCALENDAR\r\n") and raw.endswith(b"END:VCALENDAR\r\n")
    assert all(len(line) <= 75 for line in raw.split(b"\r\n"))  # RFC 5545 3.1 folding
    calendar = icalendar.Calendar.from_ical(raw)
    assert (str(calendar["VERSION"]), str(calendar["METHOD"])) == ("2.0", "PUBLISH")
    assert str(calendar["PRODID"])
    (vevent,) = calendar.walk("VEVENT")
    # RFC 5545 3.6.1: UID and DTSTAMP (UTC) are required; an all-day DTEND is exclusive
    assert str(vevent["UID"]) == f"operation-aidant-week-2027-03-15@{settings.list_id}"
    assert vevent["DTSTAMP"].dt == _utc(2027, 3, 1, 9, 0)
    assert b"DTSTAMP:20270301T090000Z" in raw
    assert vevent["DTSTART"].dt == date(2027, 3, 15) and b"DTSTART;VALUE=DATE:20270315" in raw
    assert vevent["DTEND"].dt == date(2027, 3, 22)
    assert str(vevent["URL"]) == "https://www.nationalcrimeagency.gov.uk/"
    assert str(vevent["TRANSP"]) == "TRANSPARENT"  # a reader is not shown as busy all week
    # what we send, we read: the attachment imports as the same event
    path = tmp_path / "reminder.ics"
    path.write_bytes(raw)
    (spec,) = events.load_file(path)
    assert (spec.name, spec.starts_on, spec.ends_on, spec.yearly, spec.link) == (
        "Operation Aidant week", date(2027, 3, 15), date(2027, 3, 21), False,
        "https://www.nationalcrimeagency.gov.uk/")


# ---------------------------------------------------------------- a real scheduler, restarted

def _sink_settings(settings: Settings, sink: DevSink) -> Settings:
    return settings.model_copy(update={"smtp_url": type(settings.smtp_url)(sink.url),
                                       "rate_per_minute": 0, "rate_per_day": 0})


def _run_scheduler(settings: Settings, sessions: sessionmaker[Session],
                   at: datetime) -> schedule.CatchUp:
    """Start a real Scheduler whose clock says `at`, let its start pass run, and stop it: one
    process lifetime. Catch-up only hourly, so the start pass is the only pass."""
    reports: list[schedule.CatchUp] = []
    passed = threading.Event()

    def on_pass(report: schedule.CatchUp) -> None:
        reports.append(report)
        passed.set()
    scheduler = schedule.Scheduler(settings, sessions, catch_up_seconds=3600,
                                   heartbeat_seconds=0.05, standby_seconds=0.05,
                                   clock=lambda: at, on_pass=on_pass)
    thread, stop = _start(scheduler)
    try:
        assert passed.wait(30), "the start pass never ran"
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and len(reports) == 1
    return reports[0]


def _drain(settings: Settings, sessions: sessionmaker[Session], at: datetime) -> Summary:
    return asyncio.run(Worker(settings, sessions, poll=0.05, clock=lambda: at).run(drain=True))


def test_a_scheduler_down_across_the_send_time_sends_once_when_it_comes_back(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        tmp_path: Path) -> None:
    emails = _people(sessions, rules)
    due = _utc(2027, 5, 13, 8, 0)  # Thursday 09:00 BST, for Friday 14 May
    with time_machine.travel(due - timedelta(days=2), tick=False):
        _event(sessions, date(2027, 5, 14), [1])
    with DevSink(tmp_path / "sink", port=0) as sink:
        sending = _sink_settings(settings, sink)
        before = _run_scheduler(sending, sessions, due - timedelta(days=1))
        # stopped at 09:00 the day before; nothing runs across the send time
        back = _run_scheduler(sending, sessions, due + timedelta(hours=5))
        restarted = _run_scheduler(sending, sessions, due + timedelta(hours=5, minutes=10))
        summary = _drain(sending, sessions, due + timedelta(hours=5, minutes=11))
        received = sorted(rcpt for m in sink.messages() for rcpt in m.rcpt_to)
    assert (before.planned, before.reminders, before.queued) == (1, [], 0)
    assert back.reminders == ["reminder-test-day-2027-05-14-1d"] and back.queued == PEOPLE
    assert (restarted.reminders, restarted.queued, restarted.missed) == ([], 0, [])
    assert summary.sent == PEOPLE
    assert received == sorted(emails)  # every reader, once


def test_a_scheduler_back_after_the_not_after_time_marks_it_missed_and_mails_the_coordinators(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        tmp_path: Path) -> None:
    from mailer import accounts

    _people(sessions, rules)
    with sessions() as s:
        for login, role, mail, off in (("ann", "coordinator", "ann@kent.police.uk", False),
                                       ("bob", "admin", "Bob@essex.police.uk", False),
                                       ("bob2", "coordinator", "bob@essex.police.uk", False),
                                       ("cy", "viewer", "cy@kent.police.uk", False),
                                       ("di", "coordinator", "di@kent.police.uk", True),
                                       ("ed", "coordinator", None, False)):
            user = accounts.add_user(s, login=login, display_name=login.title(), role=role,
                                     password="correct horse battery staple", regions=["kent"],
                                     known_regions=["kent", "essex"], email=mail)
            user.disabled = off
        s.commit()
    due = _utc(2027, 5, 13, 8, 0)
    with time_machine.travel(due - timedelta(days=2), tick=False):
        event_id = _event(sessions, date(2027, 5, 14), [1])
    with DevSink(tmp_path / "sink", port=0) as sink:
        sending = _sink_settings(settings, sink)
        _run_scheduler(sending, sessions, due - timedelta(days=1))
        # back at midnight BST on the event's day: too late for "the day before"
        late = _run_scheduler(sending, sessions, _utc(2027, 5, 13, 23, 0))
        again = _run_scheduler(sending, sessions, _utc(2027, 5, 13, 23, 30))
        summary = _drain(sending, sessions, _utc(2027, 5, 13, 23, 31))
        mails = [(m.rcpt_to, sink.raw(m.key)) for m in sink.messages()]
    assert late.missed == ["Test day (2027-05-14, 1 day(s) before)"] and late.reminders == []
    assert len(late.told) == 1 and again.missed == [] and again.told == []
    assert summary.sent == 0 and _deliveries(sessions) == 0
    with sessions() as s:
        reminder = s.scalar(select(Reminder).where(Reminder.event_id == event_id))
        assert reminder is not None and reminder.status == ReminderStatus.MISSED
        assert s.scalar(select(Edition).where(Edition.event_id == event_id)) is None
    # the enabled admins and co-ordinators with an address, once each (case aside)
    assert sorted(rcpt for rcpt, _ in mails) == [("Bob@essex.police.uk",),
                                                  ("ann@kent.police.uk",)]
    message = email.message_from_bytes(mails[0][1], policy=email.policy.default)
    assert "Scheduling: Reminder for Test day (2027-05-14" in message["Subject"]
    assert message["Auto-Submitted"] == "auto-generated" and message["List-Id"] is None
    body = " ".join(message.get_content().split())
    assert "due Thu 13 May 2027 09:00 BST" in body and "not sent" in body


@pytest.mark.parametrize("worker_first", [True, False], ids=["worker-back-late", "no-worker"])
def test_a_reminder_queued_in_time_but_undelivered_by_its_not_after_is_never_sent_and_told(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, tmp_path: Path,
        worker_first: bool) -> None:
    _people(sessions, rules)
    due = _utc(2027, 5, 13, 8, 0)
    with time_machine.travel(due - timedelta(days=2), tick=False):
        _event(sessions, date(2027, 5, 14), [1])
    assert len(_pass(sessions, settings, due).reminders) == 1  # queued on time
    late = _utc(2027, 5, 13, 23, 30)  # not after was midnight BST; no worker ran till now
    with DevSink(tmp_path / "sink", port=0) as sink:
        sending = _sink_settings(settings, sink)
        assert _pass(sessions, settings, _utc(2027, 5, 13, 23, 1)).told == []  # still settling
        summary = _drain(sending, sessions, late) if worker_first else None
        report = _pass(sessions, settings, late)
        summary = summary or _drain(sending, sessions, late)
        again = _pass(sessions, settings, late + timedelta(minutes=10))
        received = sink.messages()
    assert summary.sent == 0 and received == []  # never sent late
    (told,) = report.told
    assert (f"{PEOPLE} of {PEOPLE} could not be delivered before Fri 14 May 2027 00:00 BST "
            "and were not sent (0 were)") in told
    assert again.told == []  # once
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)
                        .where(Delivery.status == "sent")) == 0


def test_with_no_coordinator_accounts_the_contact_address_is_told(
        session: Session, settings: Settings) -> None:
    from mailer import alerts

    assert alerts.recipients(session, [], settings.contact_address) == [
        settings.contact_address]


# ---------------------------------------------------------------- scheduled editions

def _scheduled(sessions: sessionmaker[Session], settings: Settings, at: datetime) -> int:
    with sessions() as s:
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        outbox.request_approval(s, edition, "tester")
        outbox.approve(s, edition, "second.pair.of.eyes")
        schedule.schedule_edition(s, edition, at, "tester", now=at - timedelta(days=1))
        s.commit()
        return edition.id


def test_a_scheduled_edition_fires_once_even_when_fired_twice(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        backend: str) -> None:
    _people(sessions, rules)
    at = _utc(2027, 1, 11, 9, 0)
    edition_id = _scheduled(sessions, settings, at)
    with time_machine.travel(at - timedelta(seconds=1), tick=False):
        assert _pass(sessions, settings).editions == []
    reports: list[schedule.CatchUp] = []
    with time_machine.travel(at + timedelta(seconds=1), tick=False):
        if backend == "postgresql":  # truly at once: two passes race for the row
            barrier = threading.Barrier(2)

            def fire() -> None:
                barrier.wait(timeout=10)
                reports.append(_pass(sessions, settings))
            threads = [threading.Thread(target=fire) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
        else:  # SQLite has one scheduler and one pass at a time: fire twice in a row
            reports += [_pass(sessions, settings), _pass(sessions, settings)]
    assert sorted(len(r.editions) for r in reports) == [0, 1]
    assert sum(r.queued for r in reports) == PEOPLE
    assert _deliveries(sessions, edition_id) == PEOPLE
    with sessions() as s:
        assert s.get(Edition, edition_id).status == EditionStatus.SENDING


def test_schedule_unschedule_and_reschedule_from_the_command_line(
        settings: Settings, sessions: sessionmaker[Session],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 200)

    def mailer(*args: str) -> tuple[int, str, str]:
        code = run(list(args))
        out, err = capsys.readouterr()
        return code, out, " ".join(err.split())

    day = (utcnow().astimezone(LONDON) + timedelta(days=40)).date()
    at = f"{day.isoformat()} 09:00"
    code, _, err = mailer("edition", "schedule", str(SAMPLE), "--at", at)
    assert code == 1 and "only an approved edition" in err  # the scheduler must not bypass it
    monkeypatch.setenv("MAILER_REQUIRE_APPROVAL", "false")
    code, out, _ = mailer("edition", "schedule", str(SAMPLE), "--at", at)
    local = datetime.combine(day, datetime.min.time().replace(hour=9), tzinfo=LONDON)
    assert code == 0 and schedule.uk_time(local) in out and schedule.utc_time(local) in out
    code, out, _ = mailer("schedule", "list", "--days", "60")
    assert code == 0 and "2020-q3-kent-essex" in out and schedule.utc_time(local) in out
    code, out, _ = mailer("edition", "reschedule", "2020-q3-kent-essex", "--at",
                          f"{day.isoformat()} 10:15")
    assert code == 0 and "10:15" in out
    code, _, err = mailer("edition", "reschedule", "2020-q3-kent-essex", "--at",
                          f"{day.isoformat()} 02:15")
    assert code == 1 and "between 01:00 and 02:59" in err and err.count("error:") == 1
    code, _, err = mailer("edition", "schedule", "2020-q3-kent-essex", "--at", "2020-01-06 09:00")
    assert code == 1 and "has already passed" in err
    code, _, err = mailer("edition", "schedule", "2020-q3-kent-essex", "--at", "soon")
    assert code == 1 and '--at "soon": not a date and time' in err
    code, out, _ = mailer("edition", "unschedule", "2020-q3-kent-essex")
    assert code == 0 and "unscheduled" in out
    with sessions() as s:
        edition = outbox.get_edition(s, "2020-q3-kent-essex")
        assert edition.status == EditionStatus.DRAFT and edition.scheduled_for is None
    code, out, _ = mailer("scheduler", "--once")
    assert code == 0 and "editions started: 0" in out


def test_the_quarterly_nudge_comes_three_weeks_before_once_and_not_when_one_is_approved(
        sessions: sessionmaker[Session], settings: Settings) -> None:
    # The usual send date is the first Monday of the quarter: 5 April 2027.
    assert schedule.quarter_send_date(2027, 4) == date(2027, 4, 5)
    with sessions() as s:
        assert schedule.check_quarter(s, _utc(2027, 3, 14, 12)) is None  # 22 days before
        message = schedule.check_quarter(s, _utc(2027, 3, 15, 12))
        assert message is not None and "Monday 5 April 2027" in message
        assert schedule.check_quarter(s, _utc(2027, 3, 16, 12)) is None  # told once
        assert [i.kind for i in schedule.agenda(s, _utc(2027, 3, 16, 12), days=30)] == ["notice"]
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "tester")
        edition.status = EditionStatus.APPROVED
        s.flush()
        assert schedule.check_quarter(s, _utc(2027, 6, 20, 12)) is None  # July: one is ready
        s.commit()


# ---------------------------------------------------------------- the clock and the leader

def _start(scheduler: schedule.Scheduler) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_the_clock_wakes_at_the_due_time_and_a_second_scheduler_stands_by(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules, backend: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailer.schedule")
    _people(sessions, rules)
    with sessions() as s:
        outbox.store_edition_file(s, settings, SAMPLE, "tester")  # compiled before the clock
        s.commit()
    at = utcnow() + timedelta(seconds=10)  # later than the start pass, even on a busy machine
    # People may not choose 01:00-02:59 UK time (check_send_at); the clock must still wake at
    # whatever hour the suite runs, so a legal time is chosen and the row then moved to `at`.
    edition_id = _scheduled(sessions, settings, _utc(2030, 1, 7, 9))
    with sessions() as s:
        s.execute(update(Edition).where(Edition.id == edition_id).values(scheduled_for=at))
        s.commit()
    # catch-up only hourly: the send at `at` can only come from the wake-up job
    first = schedule.Scheduler(settings, sessions, catch_up_seconds=3600,
                               heartbeat_seconds=0.05, standby_seconds=0.05)
    second = schedule.Scheduler(settings, sessions, catch_up_seconds=3600,
                                heartbeat_seconds=0.05, standby_seconds=0.05)
    passed_at: list[datetime] = []
    first.on_pass = lambda _report: passed_at.append(utcnow())
    t1, stop1 = _start(first)
    assert first.leading.wait(10)
    job = first._aps.get_job("catch-up")  # type: ignore[attr-defined]
    # not APScheduler's defaults: a 1 s grace would drop a wake-up that came late
    assert job.misfire_grace_time == schedule.MISFIRE_GRACE_SECONDS and job.coalesce
    assert str(first._aps.timezone) == "Europe/London"  # type: ignore[attr-defined]
    t2, stop2 = _start(second)
    try:
        assert wait_for(lambda: any("standby" in r.message for r in caplog.records), 10)
        assert not second.leading.is_set()
        assert wait_for(lambda: _deliveries(sessions, edition_id) == PEOPLE, 20)
        assert passed_at[0] < at, "the start pass came after the due time: no wake-up tested"
        # The wake-up pass counts itself after its commit: wait for it, not just for its rows.
        assert wait_for(lambda: len(passed_at) >= 2, 10)
        assert passed_at[1] >= at  # the wake-up, at the due time
        stop1.set()
        t1.join(10)
        assert second.leading.wait(10)  # the standby takes over when the leader stops
    finally:
        stop1.set()
        stop2.set()
        t1.join(10)
        t2.join(10)
    assert _deliveries(sessions, edition_id) == PEOPLE


PG_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])


@PG_ONLY
def test_losing_the_advisory_lock_stops_scheduling(
        db_url: str, sessions: sessionmaker[Session], settings: Settings, backend: str,
        engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailer.schedule")
    scheduler = schedule.Scheduler(settings, sessions, catch_up_seconds=3600,
                                   heartbeat_seconds=0.05, standby_seconds=0.05)
    thread, stop = _start(scheduler)
    try:
        assert scheduler.leading.wait(10)
        # What a network cut or a DBA would do to it. Advisory locks are per database: only
        # this test's (other tests' schedulers on the same server hold the same key).
        with engine.connect() as conn:
            killed = conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = :a AND objid = :b AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"),
                {"a": schedule.ADVISORY_KEY[0], "b": schedule.ADVISORY_KEY[1]}).all()
        assert killed == [(True,)]
        assert wait_for(lambda: any("lost the leader lock" in r.message
                                    for r in caplog.records), 10)
        assert wait_for(scheduler.leading.is_set, 10)  # and it competes again, and wins
    finally:
        stop.set()
        thread.join(10)


class _Process:
    """A `mailer scheduler` subprocess whose log lines are read as they come."""

    def __init__(self, settings: Settings, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        env.update(MAILER_DATABASE_URL=settings.database, MAILER_VAR_DIR=str(settings.var_dir),
                   MAILER_SECRET_KEY="s" * 40, MAILER_SUPPRESSION_KEY="k" * 40,
                   MAILER_CONFIG=str(settings.var_dir / "absent.toml"))
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailer", "scheduler", "--catch-up-seconds", "0.3",
             "--heartbeat-seconds", "0.1", "--standby-seconds", "0.1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def said(self, fragment: str) -> bool:
        return any(fragment in line for line in self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _due_now(sessions: sessionmaker[Session], slug: str) -> int:
    with sessions() as s:
        edition, _ = outbox.store_edition(
            s, slug=slug, title="T", subject=f"Subject {slug}", topic="newsletter", regions=[],
            roles=[], source=slug, compiled={}, actor="tester")
        edition.status = EditionStatus.SCHEDULED
        edition.scheduled_for = utcnow() - timedelta(minutes=1)  # due while nobody ran
        s.commit()
        return edition.id


def _reminder_due_now(sessions: sessionmaker[Session], name: str) -> int:
    """An event whose reminder was planned while nobody ran and fell due a minute ago."""
    now = utcnow()
    with sessions() as s:
        event, _ = events.add_event(s, EventSpec(name=name, starts_on=(now + timedelta(days=3))
                                                 .date(), offsets=[1]),
                                    now=now - timedelta(days=30))
        s.add(Reminder(event_id=event.id, occurrence=event.starts_on, offset_days=1,
                       send_at=now - timedelta(minutes=1), not_after=now + timedelta(hours=12),
                       status=ReminderStatus.PLANNED, updated_at=now))
        s.commit()  # the event and its reminder at once: a pass sees both or neither
        return event.id


def _reminder_deliveries(sessions: sessionmaker[Session], event_id: int) -> int:
    with sessions() as s:
        edition_id = s.scalar(select(Edition.id).where(Edition.event_id == event_id))
    return 0 if edition_id is None else _deliveries(sessions, edition_id)


@PG_ONLY
def test_two_scheduler_processes_one_leads_each_item_once_and_killing_it_hands_over(
        sessions: sessionmaker[Session], settings: Settings, rules: Rules,
        backend: str) -> None:
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    _people(sessions, rules)
    procs = [_Process(settings, "a"), _Process(settings, "b")]
    try:
        assert wait_for(lambda: sum(p.said("scheduler: leading") for p in procs) == 1
                        and sum(p.said("standby") for p in procs) == 1, 60), \
            [p.lines for p in procs]
        leader = next(p for p in procs if p.said("scheduler: leading"))
        standby = next(p for p in procs if p is not leader)
        first = _due_now(sessions, "due-first")
        first_day = _reminder_due_now(sessions, "First day")
        assert wait_for(lambda: _deliveries(sessions, first) == PEOPLE
                        and _reminder_deliveries(sessions, first_day) == PEOPLE, 60), \
            [p.lines for p in procs]
        leader.proc.kill()  # kill -9: no goodbye, the server frees its lock
        leader.proc.wait(10)
        second = _due_now(sessions, "due-second")
        second_day = _reminder_due_now(sessions, "Second day")
        assert wait_for(lambda: standby.said("scheduler: leading"), 30), standby.lines
        assert wait_for(lambda: _deliveries(sessions, second) == PEOPLE
                        and _reminder_deliveries(sessions, second_day) == PEOPLE, 60), \
            standby.lines
    finally:
        for p in procs:
            p.stop()
    logs = [line for p in procs for line in p.lines]
    for slug, edition_id in (("due-first", first), ("due-second", second)):
        assert sum(f"'{slug}' due" in line for line in logs) == 1, logs  # enqueued once
        assert _deliveries(sessions, edition_id) == PEOPLE
    for name, event_id in (("First day", first_day), ("Second day", second_day)):
        assert sum(f"reminder for {name} (" in line and "queued" in line
                   for line in logs) == 1, logs
        assert _reminder_deliveries(sessions, event_id) == PEOPLE
    assert sum("'due-second' due" in line for line in standby.lines) == 1
    assert sum("reminder for Second day (" in line for line in standby.lines) == 1
    assert not any("Traceback" in line or "ERROR" in line for line in logs), logs


def test_each_pass_forgets_rate_events_no_window_reads_any_more(
        sessions: sessionmaker[Session], settings: Settings) -> None:
    from subscribers.models import RateEvent

    now = _utc(2027, 3, 1, 12, 0)
    with sessions() as s:
        s.add_all([RateEvent(bucket="signup:old", occurred_at=now - timedelta(days=32)),
                   RateEvent(bucket="signup:month", occurred_at=now - timedelta(days=29)),
                   RateEvent(bucket="post:now", occurred_at=now - timedelta(minutes=5))])
        s.commit()
    assert _pass(sessions, settings, now).pruned == 1
    with sessions() as s:  # the month's sign-up mails still count against the cap
        assert sorted(s.scalars(select(RateEvent.bucket))) == ["post:now", "signup:month"]
    assert _pass(sessions, settings, now).pruned == 0
