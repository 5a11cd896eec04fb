"""`mailer edition`: validate, preview and screenshot editions (being written)."""

import typer

app = typer.Typer(help="Write, check and preview editions.", no_args_is_help=True)
