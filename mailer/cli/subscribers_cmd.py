"""`mailer subscribers`: add, list, show, import, export, unsubscribe, approve, erase."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import IO

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from mailer.cli.runtime import Runtime, console
from mailer.operations import subscribers as subscriber_ops
from subscribers import importer
from subscribers.models import SubscriberStatus

app = typer.Typer(help="Manage subscribers.", no_args_is_help=True)


class LawfulBasis(StrEnum):
    PUBLIC_TASK = "public_task"
    LEGITIMATE_INTERESTS = "legitimate_interests"
    CONSENT = "consent"


class ExportFormat(StrEnum):
    CSV = "csv"
    JSON = "json"




TopicsOpt = typer.Option("newsletter", "--topics", help="Comma-separated topic slugs")


@app.command()
def add(
    ctx: typer.Context,
    email: str,
    lawful_basis: LawfulBasis = typer.Option(..., help="Why we may mail this person"),
    name: str | None = typer.Option(None),
    organisation: str | None = typer.Option(None),
    organisation_type: str | None = typer.Option(None, help="police, local_authority, ngo, ..."),
    role: str | None = typer.Option(None),
    region: str | None = typer.Option(None, help="kent, essex, ..."),
    topics: str = TopicsOpt,
    source: str | None = typer.Option(None, help="Where the address came from"),
) -> None:
    """Add one subscriber as active, on a recorded lawful basis.

    Example: `mailer subscribers add jo.bloggs@kent.police.uk --lawful-basis public_task
    --region kent --role first_responder`
    """
    rt: Runtime = ctx.obj
    with rt.session() as session:
        subscriber = subscriber_ops.add(
            session, rt.caller, rt.settings.rules(), email=email, topics=_split(topics),
            lawful_basis=str(lawful_basis), source=source or "cli", name=name,
            organisation=organisation, organisation_type=organisation_type, role=role,
            region=region)
        sid, added = subscriber.id, subscriber.email or email
    console.print(f"added subscriber {sid} ({escape(added)})")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command("list")
def list_(
    ctx: typer.Context,
    status: SubscriberStatus | None = typer.Option(None),
    region: str | None = typer.Option(None),
    role: str | None = typer.Option(None),
    topic: str | None = typer.Option(None),
    search: str | None = typer.Option(None, help="Part of the address, name or organisation"),
    limit: int = typer.Option(50, min=1, max=10_000),
    offset: int = typer.Option(0, min=0),
) -> None:
    """List subscribers, newest last. Example: `mailer subscribers list --region kent`."""
    rt: Runtime = ctx.obj
    flt = subscriber_ops.filter_for(rt.caller, status=status, region=region, role=role,
                                    topic=topic, search=search)
    with rt.session() as session:
        total, rows = subscriber_ops.page(session, rt.caller, flt, limit=limit, offset=offset)
        table = Table("id", "email", "name", "organisation", "region", "role", "status",
                      title=f"{total} subscriber(s)" + (f", showing {len(rows)}"
                                                        if len(rows) < total else ""))
        for s in rows:
            table.add_row(str(s.id), s.email, s.name, s.organisation, s.region, s.role, s.status)
    console.print(table)


@app.command()
def show(ctx: typer.Context, subscriber: str = typer.Argument(..., help="Address or id"),
         as_json: bool = typer.Option(
             False, "--json", help="The subject-access export: everything we hold")) -> None:
    """Show one subscriber with their subscriptions and consent history."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = subscriber_ops.resolve(session, rt.caller, rt.settings.rules(), subscriber)
        export = subscriber_ops.history(session, rt.caller, found.id)
    if as_json:
        sys.stdout.write(json.dumps(export, indent=2, ensure_ascii=False) + "\n")
        return
    profile = export["profile"]
    for key, value in profile.items():
        console.print(f"[bold]{key}:[/] {escape(str(value)) if value is not None else '-'}")
    console.print("[bold]topics:[/] " + (", ".join(
        f"{s['topic']} ({s['status']})" for s in export["subscriptions"]) or "-"))
    table = Table("when (UTC)", "action", "channel", "topic", "by", "consent version",
                  title="consent history")
    for e in export["consent_history"]:
        table.add_row(e["at"][:19], e["action"], e["channel"], e["topic"], e["by"],
                      e["consent_version"])
    console.print(table)


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    lawful_basis: LawfulBasis = typer.Option(..., help="Why we may mail these people"),
    apply: bool = typer.Option(False, "--apply", help="Write it (default: a dry run)"),
    topics: str = typer.Option("newsletter", "--topics",
                               help="Topics for rows whose topics cell is empty"),
    source: str | None = typer.Option(None, help="Where the list came from (default: file name)"),
    encoding: str | None = typer.Option(None, help="Force an encoding, e.g. cp1252"),
) -> None:
    """Import subscribers from a CSV file: a dry run unless --apply; all or nothing.

    Columns (header row, any order): email, name, organisation, organisation_type, role,
    region, topics. UTF-8 (with or without BOM) or Windows-1252; ',' ';' or tab.

    Example: `mailer subscribers import kent-training.csv --lawful-basis public_task --apply`
    """
    rt: Runtime = ctx.obj
    options = importer.Options(lawful_basis=str(lawful_basis), default_topics=_split(topics),
                               source=source, actor=rt.caller.actor.login, encoding=encoding)
    progress = Progress(TextColumn("checking" if not apply else "importing"), BarColumn(),
                        TaskProgressColumn(), console=console, transient=True,
                        disable=file.stat().st_size < 500_000)
    with progress:
        task = progress.add_task("rows", total=None)
        report = subscriber_ops.import_file(
            rt.sessions(), rt.caller, rt.settings.rules(), file, options, apply=apply,
            progress=lambda done, total: progress.update(task, completed=done, total=total))
    _print_report(report, apply)
    if not report.ok:
        raise typer.Exit(1)


def _print_report(report: importer.ImportReport, apply: bool) -> None:
    console.print(f"{escape(report.source)}: {report.rows} row(s), read as {report.encoding}, "
                  f"delimiter {report.delimiter!r}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if report.errors:
        table = Table("line", "field", "problem", title=f"{len(report.errors)} bad row(s)")
        for p in report.errors:
            table.add_row(str(p.line), p.field, escape(p.message))
        console.print(table)
    if report.kept_out:
        table = Table("line", "why it is not imported",
                      title=f"{len(report.kept_out)} row(s) kept out")
        for p in report.kept_out:
            table.add_row(str(p.line), escape(p.message))
        console.print(table)
    console.print(f"new: {report.new}   already subscribers (unchanged): {len(report.existing)}"
                  f"   kept out: {len(report.kept_out)}   bad: {len(report.errors)}")
    if report.errors:
        console.print("[red]nothing was written:[/] fix or remove the bad rows and run again")
    elif report.applied:
        console.print(f"[green]imported {report.new} subscriber(s)[/]")
    elif not apply:
        console.print("dry run: nothing was written; run again with --apply to import")


@app.command()
def export(
    ctx: typer.Context,
    output: Path | None = typer.Option(None, "--output", "-o", help="File (default: stdout)"),
    fmt: ExportFormat = typer.Option(ExportFormat.CSV, "--format"),
    status: SubscriberStatus | None = typer.Option(None),
    region: str | None = typer.Option(None),
    role: str | None = typer.Option(None),
    topic: str | None = typer.Option(None),
) -> None:
    """Export subscribers as CSV (formula-safe) or JSON. Example: `mailer subscribers export -o
    kent.csv --region kent`."""
    rt: Runtime = ctx.obj
    flt = subscriber_ops.filter_for(rt.caller, status=status, region=region, role=role,
                                    topic=topic)
    handle: IO[str] = output.open("w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        with rt.session() as session:
            n = subscriber_ops.export(session, rt.caller, flt, handle, fmt.value)
    finally:
        if output:
            handle.close()
    if output:
        console.print(f"wrote {n} subscriber(s) to {output}")


@app.command()
def edit(ctx: typer.Context, subscriber: str = typer.Argument(..., help="Address or id"),
         name: str | None = typer.Option(None), organisation: str | None = typer.Option(None),
         organisation_type: str | None = typer.Option(None), role: str | None = typer.Option(None),
         region: str | None = typer.Option(None)) -> None:
    """Change someone's profile: only the fields given (an empty value clears one).

    Example: `mailer subscribers edit jo.bloggs@kent.police.uk --role spoc`
    """
    rt: Runtime = ctx.obj
    given = {"name": name, "organisation": organisation, "organisation_type": organisation_type,
             "role": role, "region": region}
    fields = {k: v or None for k, v in given.items() if v is not None}
    with rt.session() as session:
        found = subscriber_ops.resolve(session, rt.caller, rt.settings.rules(), subscriber)
        changed = subscriber_ops.edit(session, rt.caller, rt.settings.rules(), found.id, fields)
    console.print("saved" if changed else "nothing had changed")


@app.command()
def unsubscribe(ctx: typer.Context, subscriber: str = typer.Argument(..., help="Address or id"),
                topic: str | None = typer.Option(None, help="Only this topic")) -> None:
    """Unsubscribe someone from one topic or from everything (as if they had asked)."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = subscriber_ops.resolve(session, rt.caller, rt.settings.rules(), subscriber)
        changed = subscriber_ops.unsubscribe(session, rt.caller, found.id, topic)
    what = f"from {topic}" if topic else "from everything"
    console.print(f"unsubscribed {what}" if changed else f"already unsubscribed {what}")


@app.command()
def approve(ctx: typer.Context, subscriber: str = typer.Argument(..., help="Address or id"),
            reject: bool = typer.Option(False, "--reject", help="Turn the sign-up down")) -> None:
    """Approve (or --reject) a confirmed sign-up from an untrusted domain."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = subscriber_ops.resolve(session, rt.caller, rt.settings.rules(), subscriber)
        changed = subscriber_ops.decide(session, rt.caller, rt.settings, found.id,
                                        approve=not reject)
        status = found.status
    if not changed:
        console.print(f"nothing to do: the subscriber is {status}")
        raise typer.Exit(1)
    console.print("rejected: they will be told kindly" if reject
                  else "approved: a welcome is queued, and they will receive the next send")


@app.command()
def erase(ctx: typer.Context, subscriber: str = typer.Argument(..., help="Address or id"),
          yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation")) -> None:
    """Erase someone's personal data for good (UK GDPR Art. 17).

    Keeps only a keyed hash of the address, so that no import can add them again, and an
    anonymous record of what happened when.
    """
    rt: Runtime = ctx.obj
    with rt.session() as session:
        found = subscriber_ops.resolve(session, rt.caller, rt.settings.rules(), subscriber)
        label = f"{found.id} ({found.email})"
        if not yes and not typer.confirm(f"Erase subscriber {label}? This cannot be undone"):
            raise typer.Abort()
        subscriber_ops.erase(session, rt.caller, found.id)
    console.print(f"erased subscriber {escape(label)}")
