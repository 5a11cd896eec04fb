"""`mailer topics`: what people can subscribe to."""

from __future__ import annotations

import typer
from rich.table import Table

from mailer.cli.runtime import Runtime, console
from mailer.operations import subscribers as subscriber_ops
from subscribers import store

app = typer.Typer(help="List and add topics (the newsletter, reminders, ...).",
                  no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List the topics with their active subscriber counts."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        counts = store.counts(session).by_topic
        table = Table("slug", "name", "active subscribers", "description")
        for topic in store.list_topics(session):
            table.add_row(topic.slug, topic.name, str(counts.get(topic.slug, 0)),
                          topic.description)
    console.print(table)


@app.command()
def add(ctx: typer.Context, slug: str, name: str,
        description: str = typer.Option("", help="One line shown on the preferences page")) -> None:
    """Add a topic. Example: `mailer topics add op-aidant "Operation Aidant alerts"`."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        added = subscriber_ops.add_topic(session, rt.caller, slug, name, description)
    console.print(f"added topic {added}")
