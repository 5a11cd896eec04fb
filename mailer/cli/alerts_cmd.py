"""`mailer alerts`: what the co-ordinators have been told (a halted send, a missed reminder, no
edition approved in time, a domain's bounces held back), and mailing what is still waiting."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import typer
from rich.markup import escape
from rich.table import Table

from mailer import alerts
from mailer.cli.runtime import Runtime, console

app = typer.Typer(help="Alerts mailed to the admins and co-ordinators.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context,
          limit: int = typer.Option(20, min=1, help="How many recent alerts")) -> None:
    """Recent alerts, newest first, with whom each was mailed to (times in UK time)."""
    rt: Runtime = ctx.obj
    zone = ZoneInfo(rt.settings.timezone)
    with rt.session() as session:
        rows = alerts.recent(session, limit)
        table = Table("id", "when", "kind", "about", "mailed")
        for a in rows:
            mailed = (f"to {len(a.mailed_to)}" if a.mailed_at else
                      f"[red]not yet[/] ({escape(a.last_error or 'waiting for the scheduler')})")
            table.add_row(str(a.id), a.created_at.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z"),
                          a.kind, escape(a.subject), mailed)
    console.print(table if rows else "no alerts")


@app.command()
def send(ctx: typer.Context) -> None:
    """Mail the alerts not yet mailed now (the scheduler does it on every pass)."""
    rt: Runtime = ctx.obj
    done = alerts.mail_pending(rt.sessions(), rt.settings)
    console.print(f"{done} alert(s) mailed to everyone they are for")
