"""`mailer db`: the schema's version."""

from __future__ import annotations

import typer

from mailer import migrations
from mailer.cli.runtime import Runtime, console

app = typer.Typer(help="Create and migrate the database.", no_args_is_help=True)


@app.command()
def upgrade(ctx: typer.Context, revision: str = typer.Argument("head")) -> None:
    """Migrate the database to REVISION (default: the newest). Example: `mailer db upgrade`."""
    rt: Runtime = ctx.obj
    engine = rt.engine  # creates var/ for the embedded SQLite file
    migrations.upgrade(rt.settings.database, revision)
    state = migrations.schema_state(engine)
    console.print(f"database schema at {state.current} (newest: {state.head})")


@app.command()
def downgrade(ctx: typer.Context, revision: str = typer.Argument(...)) -> None:
    """Migrate back to REVISION; `base` removes every table. Example: `mailer db downgrade base`."""
    rt: Runtime = ctx.obj
    migrations.downgrade(rt.settings.database, revision)
    console.print(f"database schema at {migrations.schema_state(rt.engine).current or 'base'}")


@app.command()
def status(ctx: typer.Context) -> None:
    """Show the schema version of the database and of the code; exit 1 if they differ."""
    rt: Runtime = ctx.obj
    state = migrations.schema_state(rt.engine)
    console.print(f"database: {state.current or '(empty)'}\ncode:     {state.head}")
    if not state.up_to_date:
        console.print("[yellow]not up to date:[/] run `mailer db upgrade`")
        raise typer.Exit(1)
    console.print("[green]up to date[/]")
