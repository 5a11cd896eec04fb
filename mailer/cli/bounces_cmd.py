"""`mailer bounces`: receive and read bounces, complaints and auto-replies.

For now every command prints what was decided about each message. Recording it (delivery rows,
subscriber state, suppression) will hang off `_handle`, the one seam every transport goes
through.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from mailer.bounces import Kind, Verdict, classify_inbound
from mailer.cli.runtime import Runtime, console
from mailer.inbound import InboundMessage, Receiver, open_source

app = typer.Typer(help="Receive, parse and list bounces and complaints.", no_args_is_help=True)

_COLOURS = {Kind.HARD: "red", Kind.SOFT: "yellow", Kind.COMPLAINT: "magenta",
            Kind.AUTO_REPLY: "dim", Kind.UNKNOWN: "dim"}


def show(verdict: Verdict, origin: str) -> None:
    colour = _COLOURS[verdict.kind]
    ref = verdict.reference
    console.print(f"[bold]{escape(origin)}[/]")
    console.print(f"  kind:      [{colour}]{verdict.kind}[/]  ({escape(verdict.reason)})")
    for failure in verdict.failures:
        extra = f" {failure.status}" if failure.status else ""
        extra += f" [dim]({failure.status_source})[/]" if failure.status_source else ""
        console.print(f"  recipient: {escape(failure.recipient)} {failure.kind}{extra}")
    console.print("  delivery:  " + (
        f"edition {ref.edition_id}, subscriber {ref.subscriber_id} [dim](from {ref.source})[/]"
        if ref else "[dim]not identified[/]"))
    for note in verdict.notes:
        console.print(f"  [dim]note: {escape(note)}[/]")


def _handle(message: InboundMessage, secret: bytes) -> Verdict:
    """Classify one inbound message and act on it. The store update goes here, later."""
    verdict = classify_inbound(message.raw, secret, message.rcpt_tos)
    show(verdict, message.origin)
    return verdict


@app.command()
def parse(ctx: typer.Context, files: list[Path] = typer.Argument(..., exists=True,
                                                                 dir_okay=False),
          rcpt: str | None = typer.Option(None, "--rcpt",
                                          help="The envelope recipient, if known")) -> None:
    """Show what each saved message (.eml) is. Example: `mailer bounces parse bounce.eml`."""
    rt: Runtime = ctx.obj
    secret = rt.settings.secret()
    for path in files:
        verdict = classify_inbound(path.read_bytes(), secret, [rcpt] if rcpt else [])
        show(verdict, str(path))


@app.command()
def serve(ctx: typer.Context,
          host: str = typer.Option("127.0.0.1", help="Address to listen on"),
          port: int = typer.Option(8024, help="Port to listen on"),
          lmtp: bool = typer.Option(True, "--lmtp/--smtp",
                                    help="Speak LMTP (for an MTA's transport) or SMTP")) -> None:
    """Receive bounces from the MTA and show each. Example: `mailer bounces serve --port 8024`.

    Point Postfix at it with, for the bounce address, `transport_maps` entry
    `bounces@news.example.police.uk lmtp:inet:127.0.0.1:8024` (and `recipient_delimiter = +`).
    """
    rt: Runtime = ctx.obj
    secret = rt.settings.secret()
    receiver = Receiver(lambda message: _handle(message, secret), host, port, lmtp=lmtp)
    console.print(f"[green]listening[/] for {'LMTP' if lmtp else 'SMTP'} on {host}:{port}"
                  " (Ctrl-C stops)")
    receiver.serve_forever()


@app.command()
def fetch(ctx: typer.Context,
          source: str = typer.Argument(..., help="maildir:PATH, mbox:PATH or imaps://user@host/"),
          password: str | None = typer.Option(None, envvar="MAILER_IMAP_PASSWORD",
                                              hidden=True)) -> None:
    """Read a bounce mailbox and show each message; nothing is moved or deleted.

    Example: `mailer bounces fetch imaps://bounces@mail.example.police.uk/INBOX` (password in
    MAILER_IMAP_PASSWORD), or `mailer bounces fetch maildir:/var/mail/bounces`.
    """
    rt: Runtime = ctx.obj
    secret = rt.settings.secret()
    count = 0
    for message in open_source(source, password):
        _handle(message, secret)
        count += 1
    console.print(f"{count} message(s) read")
