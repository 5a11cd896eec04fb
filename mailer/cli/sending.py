"""`mailer edition send|list|status|pause|resume|cancel|resend-failed|send-to-new` and
`mailer worker`. They add to the `edition` group defined in `mailer.cli.edition`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from mailer import outbox
from mailer.cli.edition import app as edition_app
from mailer.cli.runtime import Runtime, audited, console, operator
from mailer.config import Settings
from mailer.logs import configure as configure_logs
from mailer.models import Edition, EditionStatus
from mailer.worker import run_worker


def _edition(rt: Runtime, session, ident: str) -> Edition:  # type: ignore[no-untyped-def]
    path = Path(ident)
    if path.suffix == ".md" and path.exists():
        edition, _ = outbox.store_edition_file(session, rt.settings, path, operator())
        return edition
    return outbox.get_edition(session, ident)


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
        found = _edition(rt, session, edition)
        breakdown = outbox.audience_breakdown(session, found)
        total = sum(breakdown["region"].values())
        for label, counts in breakdown.items():
            table = Table(label, "recipients", title=f"by {label}")
            for value, n in counts.items():
                table.add_row(value, str(n))
            console.print(table)
        eta = outbox.eta_text(rt.settings, total)
        console.print(f"edition {found.id} '{escape(found.slug)}' ({found.status}): "
                      f"{total} recipient(s) in its audience; {eta}")
        if not confirm:
            console.print("dry run: nothing was sent; add --confirm to queue it for sending")
            return
        if rt.settings.require_approval:
            added = outbox.send_approved(session, found, operator())
        else:
            added = outbox.enqueue(session, found)
        slug = found.slug
        audited(session, "edition.send", f"edition:{found.id}", queued=added)
    console.print(f"[green]queued {added} message(s)[/] for '{escape(slug)}'; "
                  "`mailer worker` sends them, `mailer edition status` follows them")


@edition_app.command("list")
def list_(ctx: typer.Context) -> None:
    """List editions, newest first."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        table = Table("id", "slug", "subject", "topic", "status", "sent", "of")
        for e in outbox.list_editions(session):
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
    table.add_row("possible duplicates", str(p.ambiguous))
    table.add_row("ETA", outbox.eta_text(settings, p.remaining))
    return table


@edition_app.command()
def status(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug"),
           watch: bool = typer.Option(False, "--watch", help="Follow it until it finishes")
           ) -> None:
    """Show how far a send has got: sent, queued, retrying, failed, bounced, unknown, ETA."""
    rt: Runtime = ctx.obj

    def read() -> outbox.Progress:
        with rt.session() as session:
            return outbox.progress(session, outbox.get_edition(session, edition))

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


def _control(ctx: typer.Context, edition: str, target: EditionStatus, done: str,
             action: str) -> None:
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = outbox.get_edition(session, edition)
        changed = outbox.set_status(session, found, target,
                                    reason=f"paused by {operator()}" if target ==
                                    EditionStatus.PAUSED else None)
        if changed:
            audited(session, f"edition.{action}", f"edition:{found.id}")
    console.print(done if changed else f"nothing to do: it is already {target}")


@edition_app.command()
def pause(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug")) -> None:
    """Pause a send: nothing more goes out until `resume` (messages in flight finish)."""
    _control(ctx, edition, EditionStatus.PAUSED, "paused", "pause")


@edition_app.command()
def resume(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug")) -> None:
    """Resume a paused (or halted) send where it stopped: nobody gets it twice."""
    _control(ctx, edition, EditionStatus.SENDING, "resumed", "resume")


@edition_app.command()
def cancel(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug"),
           yes: bool = typer.Option(False, "--yes")) -> None:
    """Cancel a send for good: what has not gone out is not sent."""
    if not yes and not typer.confirm(f"Cancel edition {edition}? What is queued is dropped"):
        raise typer.Abort()
    _control(ctx, edition, EditionStatus.CANCELLED, "cancelled", "cancel")


@edition_app.command("resend-failed")
def resend_failed(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug"),
                  include_unknown: bool = typer.Option(
                      False, help="Also resend messages whose fate is unknown (may duplicate)"),
                  ) -> None:
    """Queue the failed deliveries of an edition again (after fixing what made them fail)."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = outbox.get_edition(session, edition)
        moved = outbox.requeue_failed(session, found, include_unknown)
        audited(session, "edition.resend_failed", f"edition:{found.id}", queued=moved)
    console.print(f"queued {moved} message(s) again")


@edition_app.command("send-to-new")
def send_to_new(ctx: typer.Context, edition: str = typer.Argument(..., help="Id or slug")
                ) -> None:
    """Send an edition to subscribers who joined since it went out and have not had it."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = outbox.get_edition(session, edition)
        if found.status == EditionStatus.SENT:
            found.status = EditionStatus.SENDING
        added = outbox.enqueue(session, found)
        audited(session, "edition.send_to_new", f"edition:{found.id}", queued=added)
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
