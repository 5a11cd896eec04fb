"""`mailer events`, `mailer edition schedule|unschedule|reschedule`, `mailer schedule list`,
`mailer scheduler`, `mailer run` and `mailer demo`.

Times are typed and shown in UK time (Europe/London), with UTC beside them; the database holds
UTC.
"""

from __future__ import annotations

import logging
import threading
from datetime import date
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mailer import events, retention, schedule
from mailer.cli.edition import app as edition_app
from mailer.cli.edition import edition_of
from mailer.cli.runtime import Runtime, console
from mailer.events import EventSpec
from mailer.models import Edition
from mailer.operations import editions as edition_ops
from mailer.operations import events as event_ops

events_app = typer.Typer(help="The events calendar: dates of interest and their reminders.",
                         no_args_is_help=True)
schedule_app = typer.Typer(help="What goes out when: scheduled editions and reminders.",
                           no_args_is_help=True)




def _logging() -> None:
    from mailer.config import load_settings
    from mailer.logs import configure

    configure(load_settings().log_format)


# ---------------------------------------------------------------- events

def _date(value: str, what: str) -> date:
    return events.parse_date(value, what)


def _offsets(value: str) -> list[int]:
    return events.parse_offsets(value, "--offsets")


@events_app.command("add")
def events_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="What the day is called"),
    on: str = typer.Option(..., "--date", help="Its date, e.g. 2027-10-18"),
    yearly: bool = typer.Option(False, "--yearly", help="It comes back every year"),
    until: str | None = typer.Option(None, "--until", help="Last day of a multi-day event"),
    offsets: str = typer.Option("14,1", help="Reminders, in days before, e.g. 14,1"),
    at: str = typer.Option(events.DEFAULT_SEND_TIME, "--at", help="UK send time, HH:MM"),
    text: str = typer.Option("", "--text", help="The reminder's short text"),
    description: str = typer.Option("", help="What the day is"),
    link: str | None = typer.Option(None, help="A page about it (https://...)"),
    topic: str = typer.Option("reminders", help="Who gets the reminders"),
    weekend: str = typer.Option("friday",
                                help="A reminder due on a weekend: 'friday' (before) or "
                                     "'as_scheduled'"),
    segment: str | None = typer.Option(None, help="Only readers in this saved segment "
                                                  "(`mailer segments list`)"),
) -> None:
    """Add a date of interest; its reminders are planned at once.

    Example: `mailer events add "Anti-Slavery Day" --date 2027-10-18 --yearly --offsets 14,1`
    """
    rt: Runtime = ctx.obj
    spec = EventSpec(name=name, starts_on=_date(on, "--date"),
                     ends_on=_date(until, "--until") if until else None, yearly=yearly,
                     offsets=_offsets(offsets), send_time=at, reminder_text=text,
                     description=description, link=link, topic=topic, weekend=weekend,
                     segment=segment)
    with rt.session() as session:
        event = event_ops.add(session, rt.caller, spec, rt.settings)
        slug, planned = event.slug, len(events.reminders_for(session, event.id))
        upcoming = events.next_occurrence(event, schedule.utcnow().astimezone(
            schedule.LONDON).date())
    why = ""
    if not planned:  # say why, or it reads as a fault
        why = (" (its date has passed)" if upcoming is None else
               f" (next date {upcoming:%d %b %Y}: its reminder times have passed, or are more "
               f"than {events.PLAN_HORIZON_DAYS} days away and are planned nearer the time)")
    console.print(f"added event '{escape(slug)}'; {planned} reminder(s) planned{why}")


@events_app.command("list")
def events_list(ctx: typer.Context) -> None:
    """List the dates of interest and when each comes next."""
    rt: Runtime = ctx.obj
    today = schedule.utcnow().astimezone(schedule.LONDON).date()
    table = Table("id", "slug", "name", "date", "repeats", "next", "reminders (days before)",
                  "send (UK)")
    with rt.session() as session:
        for e in events.list_events(session):
            upcoming = events.next_occurrence(e, today)
            table.add_row(str(e.id), e.slug, e.name, e.starts_on.isoformat()
                          + (f" to {e.ends_on.isoformat()}" if e.ends_on else ""),
                          "yearly" if e.yearly else "once",
                          upcoming.isoformat() if upcoming else "(past)",
                          ", ".join(str(o) for o in e.offsets), e.send_time)
    console.print(table)


@events_app.command("show")
def events_show(ctx: typer.Context, event: str = typer.Argument(..., help="Id or slug")) -> None:
    """Show one event and each of its reminders with its state."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        events.plan_reminders(session)
        e = events.get_event(session, event)
        when = (f"every year on {e.starts_on:%d %B}" if e.yearly
                else e.starts_on.isoformat())
        console.print(f"[bold]{escape(e.name)}[/] ({escape(e.slug)}), {when}"
                      f"{' to ' + e.ends_on.isoformat() if e.ends_on else ''}")
        for label, value in (("description", e.description), ("link", e.link or ""),
                             ("reminder text", e.reminder_text), ("topic", e.topic),
                             ("weekend rule", e.weekend),
                             ("send time", f"{e.send_time} {e.timezone}")):
            if value:
                console.print(f"  {label}: {escape(value)}")
        table = Table("occurrence", "days before", "send (UK)", "send (UTC)", "not after (UK)",
                      "state", "note")
        for r in events.reminders_for(session, e.id):
            table.add_row(r.occurrence.isoformat(), str(r.offset_days),
                          schedule.uk_time(r.send_at), schedule.utc_time(r.send_at),
                          schedule.uk_time(r.not_after), r.status, r.note or "")
    console.print(table)


@events_app.command("remove")
def events_remove(ctx: typer.Context, event: str = typer.Argument(..., help="Id or slug"),
                  yes: bool = typer.Option(False, "--yes")) -> None:
    """Remove an event and its reminders not yet sent."""
    if not yes and not typer.confirm(f"Remove event {event} and its planned reminders?"):
        raise typer.Abort()
    rt: Runtime = ctx.obj
    with rt.session() as session:
        name, dropped = event_ops.remove(session, rt.caller, event)
    console.print(f"removed '{escape(name)}' and {dropped} planned reminder(s)")


@events_app.command("import")
def events_import(ctx: typer.Context,
                  file: Path = typer.Argument(..., help="A .yaml or .ics file"),
                  replace: bool = typer.Option(False, "--replace",
                                               help="Update events that already exist")) -> None:
    """Import events from YAML or iCalendar, all or nothing.

    YAML: a list of {name, date, yearly, until, offsets, send_time, reminder_text,
    description, link, topic, weekend}. iCalendar: each VEVENT's SUMMARY, DTSTART, DTEND,
    DESCRIPTION, URL; RRULE:FREQ=YEARLY for yearly; VALARM triggers as offsets.
    Example: `mailer events import dates.yaml`
    """
    rt: Runtime = ctx.obj
    specs = events.load_file(file)
    with rt.session() as session:
        added, updated, planned = event_ops.import_file(session, rt.caller, file, specs,
                                                        replace=replace, settings=rt.settings)
    console.print(f"imported {escape(str(file))}: {added} added, {updated} updated; "
                  f"{planned} reminder(s) planned")


# ---------------------------------------------------------------- scheduled editions

def _say_scheduled(edition: Edition) -> None:
    assert edition.scheduled_for is not None
    console.print(f"edition {edition.id} '{escape(edition.slug)}' scheduled for "
                  f"{schedule.uk_time(edition.scheduled_for)} "
                  f"({schedule.utc_time(edition.scheduled_for)}); `mailer scheduler` (or "
                  "`mailer run`) sends it")


@edition_app.command("schedule")
def edition_schedule(ctx: typer.Context,
                     target: str = typer.Argument(..., help="An edition file, id or slug"),
                     at: str = typer.Option(..., "--at", help='UK time, "2027-01-11 09:00"')
                     ) -> None:
    """Schedule an edition to go out at a time (UK time unless an offset is given).

    Refused between 01:00 and 02:59 (the clock change) and in the past.
    Example: `mailer edition schedule editions/2020-q3-kent-essex.md --at "2027-01-11 09:00"`
    """
    rt: Runtime = ctx.obj
    when = schedule.parse_at(at)
    with rt.session() as session:
        found = edition_of(rt, session, target)
        edition = edition_ops.schedule(session, rt.caller, rt.settings, found.id, when)
    _say_scheduled(edition)


@edition_app.command("reschedule")
def edition_reschedule(ctx: typer.Context,
                       target: str = typer.Argument(..., help="Edition id or slug"),
                       at: str = typer.Option(..., "--at", help='UK time, "2027-01-11 09:00"')
                       ) -> None:
    """Move a scheduled edition to another time. Example: `mailer edition reschedule 3 --at
    "2027-01-12 09:00"`"""
    rt: Runtime = ctx.obj
    when = schedule.parse_at(at)
    with rt.session() as session:
        edition = edition_ops.schedule(session, rt.caller, rt.settings, target, when,
                                       move=True)
    _say_scheduled(edition)


@edition_app.command("unschedule")
def edition_unschedule(ctx: typer.Context,
                       target: str = typer.Argument(..., help="Edition id or slug")) -> None:
    """Take an edition off the schedule; it is not sent until scheduled or sent again."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        changed = edition_ops.unschedule(session, rt.caller, target)
        status = edition_ops.get(session, rt.caller, target).status
    console.print("unscheduled; it is " + status if changed
                  else f"nothing to do: it is {status}, not scheduled")


# ---------------------------------------------------------------- the schedule

@schedule_app.command("list")
def schedule_list(ctx: typer.Context,
                  days: int = typer.Option(30, "--days", min=1, max=800,
                                           help="How far ahead to look")) -> None:
    """Everything due in the next N days (editions, reminders) in UK time and UTC, with
    missed reminders and notices for the co-ordinators from the last 30 days."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        items = schedule.agenda(session, days=days)
    table = Table("kind", "what", "UK time", "UTC", "state", "note",
                  title=f"the next {days} day(s)")
    for item in items:
        table.add_row(item.kind, item.what, schedule.uk_time(item.at) if item.at else "",
                      schedule.utc_time(item.at) if item.at else "", item.status, item.note)
    console.print(table if items else f"nothing due in the next {days} day(s)")


# ---------------------------------------------------------------- processes

def scheduler(ctx: typer.Context,
              once: bool = typer.Option(False, "--once",
                                        help="Run one catch-up pass and exit (cron, scripts)"),
              catch_up_seconds: float = typer.Option(schedule.CATCH_UP_SECONDS, hidden=True),
              heartbeat_seconds: float = typer.Option(10.0, hidden=True),
              standby_seconds: float = typer.Option(15.0, hidden=True)) -> None:
    """Run the scheduler alone: it leads (one per database) or waits as a standby.

    Example: `mailer scheduler` beside `mailer web` and any number of `mailer worker`s.
    """
    import signal

    rt: Runtime = ctx.obj
    _logging()
    if once:
        with rt.session() as session:
            report = schedule.catch_up(session, rt.settings)
        purged = retention.run_due(rt.sessions(), retention.Periods.from_settings(rt.settings))
        told = schedule.tell_coordinators(rt.settings, rt.sessions())
        console.print(f"editions started: {len(report.editions)}, reminders queued: "
                      f"{len(report.reminders)}, missed: {len(report.missed)}, "
                      f"messages queued: {report.queued}")
        if purged is not None:
            console.print("retention purge: " + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in purged.counts().items()))
        for notice in report.told:
            console.print(f"[yellow]co-ordinators:[/] {escape(notice)}")
        if told:
            console.print(f"{told} alert(s) mailed to the co-ordinators (`mailer alerts list`)")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    schedule.Scheduler(rt.settings, rt.sessions(), catch_up_seconds=catch_up_seconds,
                       heartbeat_seconds=heartbeat_seconds,
                       standby_seconds=standby_seconds).run(stop)


def run(ctx: typer.Context,
        host: str = typer.Option("127.0.0.1", help="Address to listen on"),
        port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on")) -> None:
    """Web, scheduler and worker in one process: the single-host setup.

    Example: `mailer run --host 0.0.0.0`. For scale-out run `mailer web`, `mailer scheduler`
    and `mailer worker` apart, against one PostgreSQL.
    """
    from mailer.demo import run_all_in_one
    from mailer.web.app import create_app

    rt: Runtime = ctx.obj
    _logging()
    app = create_app(rt.settings)
    console.print(f"serving {rt.settings.base_url} on http://{host}:{port}, with the scheduler "
                  "and a worker")
    run_all_in_one(rt.settings, app, host, port, console=console)


def demo(ctx: typer.Context,
         no_serve: bool = typer.Option(False, "--no-serve",
                                       help="Stop after the send and print the summary"),
         host: str = typer.Option("127.0.0.1", help="Address to serve the demo on"),
         port: int = typer.Option(8000, min=1, max=65535, help="Port to serve the demo on"),
         directory: Path = typer.Option(Path("var/demo"), hidden=True),
         count: int = typer.Option(200, min=1, max=5000, hidden=True)) -> None:
    """The whole system in one command: a fresh demo database, ~200 generated first
    responders, the sample edition sent to a local dev inbox, then the web app.

    Example: `mailer demo`, then open http://127.0.0.1:8000/dev/inbox
    """
    from mailer.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    result = run_demo(console, directory=directory, serve=not no_serve, host=host, port=port,
                      count=count)
    if result.in_inbox != result.queued:
        console.print(f"[red]only {result.in_inbox} of {result.queued} arrived[/]")
        raise typer.Exit(1)
