"""`mailer segments`: saved audiences that editions and events name by slug."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from mailer.cli.runtime import Runtime, console
from mailer.operations import segments as segment_ops
from mailer.segments import AudienceFields

app = typer.Typer(help="List, add, edit and remove saved segments (named audiences).",
                  no_args_is_help=True)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


_REGIONS = typer.Option(None, "--regions", help="Comma-separated regions (none: every region)")
_ROLES = typer.Option(None, "--roles", help="Comma-separated roles (none: every role)")
_ORGS = typer.Option(None, "--organisation-types",
                     help="Comma-separated organisation types (none: every type)")
_TOPICS = typer.Option(None, "--topics",
                       help="Readers must also be on one of these topics (none: no such rule)")


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List the saved segments with how many active readers each reaches now."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        table = Table("slug", "name", "audience", "readers now")
        for segment in segment_ops.listing(session, rt.caller):
            shown = segment_ops.counted(session, rt.caller, segment.slug)
            table.add_row(segment.slug, segment.name, shown.fields.words(), str(shown.count))
    console.print(table)


@app.command()
def add(ctx: typer.Context, slug: str, name: str,
        description: str = typer.Option("", help="What it is for"),
        regions: str | None = _REGIONS, roles: str | None = _ROLES,
        organisation_types: str | None = _ORGS, topics: str | None = _TOPICS) -> None:
    """Add a segment. Example: `mailer segments add kent-police "Kent police" --regions kent
    --roles police`; then `segment: kent-police` in an edition's front matter."""
    rt: Runtime = ctx.obj
    fields = AudienceFields(_split(regions), _split(roles), _split(organisation_types),
                            _split(topics))
    with rt.session() as session:
        segment = segment_ops.add(session, rt.caller, rt.settings, slug=slug, name=name,
                                  description=description, fields=fields)
        shown = segment_ops.counted(session, rt.caller, segment.slug)
    console.print(f"added segment '{escape(shown.segment.slug)}' ({escape(shown.fields.words())})"
                  f": {shown.count} reader(s) now")


@app.command()
def edit(ctx: typer.Context, slug: str,
         name: str | None = typer.Option(None, help="A new name"),
         description: str | None = typer.Option(None, help="A new description"),
         regions: str | None = _REGIONS, roles: str | None = _ROLES,
         organisation_types: str | None = _ORGS, topics: str | None = _TOPICS) -> None:
    """Change a segment; each list given replaces the one it had (give "" to clear it).
    Editions and events already saved keep the audience they were saved with."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        current = segment_ops.get(session, rt.caller, slug)
        before = AudienceFields.of(current)
        fields = AudienceFields(
            before.regions if regions is None else _split(regions),
            before.roles if roles is None else _split(roles),
            before.organisation_types if organisation_types is None
            else _split(organisation_types),
            before.topics if topics is None else _split(topics))
        segment_ops.edit(session, rt.caller, rt.settings, slug,
                         name=current.name if name is None else name,
                         description=current.description if description is None
                         else description, fields=fields)
        shown = segment_ops.counted(session, rt.caller, slug)
    console.print(f"changed segment '{escape(slug)}' ({escape(shown.fields.words())}): "
                  f"{shown.count} reader(s) now")


@app.command()
def remove(ctx: typer.Context, slug: str) -> None:
    """Remove a segment. Editions and events saved with it keep their audience."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        segment_ops.remove(session, rt.caller, slug)
    console.print(f"removed segment '{escape(slug)}'")
