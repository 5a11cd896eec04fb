"""`mailer config`: the effective settings."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mailer.cli.runtime import Runtime, console

app = typer.Typer(help="Show the settings in force.", no_args_is_help=True)


@app.command()
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the effective settings (environment over mailer.toml over defaults), secrets masked."""
    rt: Runtime = ctx.obj
    shown = rt.settings.shown()
    if as_json:
        console.print_json(json.dumps(shown))
        return
    table = Table("setting", "value", "environment variable")
    for name, value in shown.items():
        table.add_row(name, str(value), f"MAILER_{name.upper()}")
    console.print(table)
