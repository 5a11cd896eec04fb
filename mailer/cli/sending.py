"""`mailer edition send|list|status|pause|resume|cancel|resend-failed|send-to-new` and
`mailer worker`. They add to the `edition` group defined in `mailer.cli.edition`."""

from __future__ import annotations

import logging
import time

import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from mailer import marking, outbox
from mailer.cli.edition import app as edition_app
from mailer.cli.edition import edition_of
from mailer.cli.runtime import Runtime, console
from mailer.config import Settings
from mailer.logs import configure as configure_logs
from mailer.models import EditionStatus
from mailer.operations import editions as edition_ops
from mailer.worker import run_worker


@edition_app.command()
def send(ctx: typer.Context,
         edition: str = typer.Argument(..., help="An edition file (.md), id or slug"),
         confirm: bool = typer.Option(False, "--confirm", help="Really send (default: dry run)"),
         ) -> None:
    """Send an edition to its audience: a dry run that prints who it would reach, unless
    --confirm. Sending the same edition again only reaches people who have not had it.

    Example: `mailer edition send editions/2020-q3-kent-essex.md --confirm`
    """
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = edition_of(rt, session, edition)
        breakdown = outbox.audience_breakdown(session, found)
        total = sum(breakdown["region"].values())
        for label, counts in breakdown.items():
            table = Table(label, "recipients", title=f"by {label}")
            for value, n in counts.items():
                table.add_row(value, str(n))
            console.print(table)
        eta = outbox.eta_text(rt.settings, total)
        shown = edition_ops.audience(session, rt.caller, found.id)
        named = f"segment '{escape(shown.segment)}': " if shown.segment else ""
        console.print(f"audience: {named}{escape(shown.words)}; topic {escape(shown.topic)}; "
                      f"{shown.count} reader(s) now")
        console.print(f"edition '{escape(found.slug)}' ({found.status}): "
                      f"{total} recipient(s) in its audience; {eta}")
        left = outbox.left_out(session, found)
        if left:
            console.print(f"[yellow]{escape(marking.left_out_text(left))}[/]")
        if not confirm:
            session.rollback()  # a dry run stores nothing, not even the edition file
            console.print("dry run: nothing was sent or stored; add --confirm to queue it "
                          "for sending")
            return
        added = edition_ops.send(session, rt.caller, rt.settings, found.id)
        slug = found.slug
    console.print(f"[green]queued {added} message(s)[/] for '{escape(slug)}'; "
                  "`mailer worker` sends them, `mailer edition status` follows them")


@edition_app.command("list")
def list_(ctx: typer.Context) -> None:
    """List editions, newest first."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        table = Table("id", "slug", "subject", "topic", "status", "sent", "of")
        for e in edition_ops.listing(session, rt.caller):
            p = outbox.progress(session, e)
            table.add_row(str(e.id), e.slug, e.subject, e.topic, e.status,
                          str(p.counts["sent"]), str(p.total))
    console.print(table)


def _status_table(p: outbox.Progress, settings: Settings) -> Table:
    table = Table("state", "messages", title=f"edition {p.edition_id} '{p.slug}': {p.status}"
                  + (f" ({p.paused_reason})" if p.paused_reason else ""))
    for name in ("sent", "queued", "sending", "retry", "failed", "bounced", "unknown",
                 "skipped"):
        table.add_row(name, str(p.counts[name]))
    table.add_row("certainly sent once", str(p.once))
    table.add_row("may have been sent twice", str(p.ambiguous))
    table.add_row("resent after a crash", str(p.taken_over))
    if p.left_out:
        table.add_row(f"left out ({marking.NOT_SECURE})", str(p.left_out))
    table.add_row("ETA", outbox.time_left_text(settings, p))
    return table


@edition_app.command()
def status(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug"),
           watch: bool = typer.Option(False, "--watch", help="Follow it until it finishes")
           ) -> None:
    """Show how far a send has got: sent, queued, retrying, failed, bounced, unknown, ETA."""
    rt: Runtime = ctx.obj

    def read() -> outbox.Progress:
        with rt.session() as session:
            return edition_ops.progress(session, rt.caller, edition)

    p = read()
    if not watch:
        console.print(_status_table(p, rt.settings))
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.completed}/{task.total}"), console=console)
    task = bar.add_task(p.slug, total=p.total)
    with Live(bar, console=console, refresh_per_second=4):
        while True:
            bar.update(task, completed=p.total - p.remaining, total=p.total)
            if p.remaining == 0 or p.status in (EditionStatus.PAUSED, EditionStatus.CANCELLED):
                break
            time.sleep(1)
            p = read()
    console.print(_status_table(p, rt.settings))


def _control(ctx: typer.Context, edition: str, done: str, action: str) -> None:
    rt: Runtime = ctx.obj
    with rt.session() as session:
        changed = edition_ops.control(session, rt.caller, edition, action)
    console.print(done if changed else
                  f"nothing to do: it is already {edition_ops.CONTROLS[action]}")


@edition_app.command()
def pause(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug")) -> None:
    """Pause a send: nothing more goes out until `resume` (messages in flight finish)."""
    _control(ctx, edition, "paused", "pause")


@edition_app.command()
def resume(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug")) -> None:
    """Resume a paused (or halted) send where it stopped: nobody gets it twice."""
    _control(ctx, edition, "resumed", "resume")


@edition_app.command()
def cancel(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug"),
           yes: bool = typer.Option(False, "--yes")) -> None:
    """Cancel a send for good: what has not gone out is not sent."""
    if not yes and not typer.confirm(f"Cancel edition {edition}? What is queued is dropped"):
        raise typer.Abort()
    _control(ctx, edition, "cancelled", "cancel")


@edition_app.command("resend-failed")
def resend_failed(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug"),
                  include_unknown: bool = typer.Option(
                      False, help="Also resend messages whose fate is unknown (may duplicate)"),
                  ) -> None:
    """Queue the failed deliveries of an edition again (after fixing what made them fail)."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        moved = edition_ops.resend_failed(session, rt.caller, edition, include_unknown)
    console.print(f"queued {moved} message(s) again")


@edition_app.command("send-to-new")
def send_to_new(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug")
                ) -> None:
    """Send an edition to subscribers who joined since it went out and have not had it."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        added = edition_ops.send_to_new(session, rt.caller, edition)
    console.print(f"queued {added} message(s) for people who have not had it")


def worker(ctx: typer.Context,
           drain: bool = typer.Option(False, "--drain",
                                      help="Exit when nothing is due (for scripts and CI)"),
           name: str | None = typer.Option(None, help="This worker's name in the outbox"),
           ) -> None:
    """Send what is due, until stopped (SIGTERM finishes what is in flight, then exits)."""
    rt: Runtime = ctx.obj
    configure_logs(rt.settings.log_format, logging.WARNING)
    summary = run_worker(rt.settings, rt.sessions(), name=name, drain=drain)
    console.print(f"sent {summary.sent}, retrying {summary.retry}, bounced {summary.bounced}, "
                  f"failed {summary.failed}, unknown {summary.unknown}")
    for reason in summary.halted:
        console.print(f"[red]{escape(reason)}[/]")
    if summary.halted:
        raise typer.Exit(2)
