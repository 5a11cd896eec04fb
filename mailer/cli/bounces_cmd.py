"""`mailer bounces`: receive and read bounces (being written)."""

import typer

app = typer.Typer(help="Receive, parse and list bounces and complaints.", no_args_is_help=True)
