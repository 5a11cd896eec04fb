"""`mailer privacy`: what we hold about people, since when, and when it goes."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from mailer.cli.runtime import Runtime, console
from mailer.operations import retention as retention_ops
from mailer.outbox import uk_time
from subscribers.db import utcnow

app = typer.Typer(help="Data protection: the records held and their retention.",
                  no_args_is_help=True)


@app.command("report")
def report(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="JSON instead of a table")
           ) -> None:
    """Per category of record: how many are held, the oldest, and the next purge date under
    the current settings (times in UK time): the figures a DPIA asks for.

    Example: `mailer privacy report`, or `mailer privacy report --json > dpia-figures.json`
    """
    rt: Runtime = ctx.obj
    with rt.session() as session:
        rows = retention_ops.privacy_report(session, rt.caller, rt.settings)
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in rows]))
        return
    now = utcnow()
    table = Table(title="Records held and their retention")
    table.add_column("records", no_wrap=True)  # a status cut short reads as another one
    for heading in ("held", "oldest (UK)", "next purge (UK)", "retention"):
        table.add_column(heading)
    for r in rows:
        if r.next_purge is None:
            next_purge = "-"
        elif r.next_purge <= now:
            next_purge = "due: the scheduler's next daily purge"
        else:
            next_purge = uk_time(r.next_purge)
        table.add_row(escape(r.label), str(r.held), uk_time(r.oldest) if r.oldest else "-",
                      next_purge, escape(r.rule))
    console.print(table)
