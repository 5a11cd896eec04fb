"""`mailer dev-sink`: a local SMTP server that keeps what it receives, in a Maildir."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mailer.cli.runtime import Runtime, console
from mailer.devsink import DevSink, SinkMessage
from mailer.errors import ConfigError


def dev_sink(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (keep it loopback)"),
    port: int = typer.Option(8025, help="Port; the default MAILER_SMTP_URL sends to 8025"),
    directory: Path | None = typer.Option(
        None, "--dir", help="Maildir to store into [default: <var_dir>/devsink]"),
    list_only: bool = typer.Option(False, "--list", help="List what is stored and exit"),
    clear: bool = typer.Option(False, "--clear", help="Delete what is stored and exit"),
) -> None:
    """Run the development mail sink, or list what it holds.

    It accepts every message and stores it in a Maildir that any mail client can open.
    Example: `mailer dev-sink` in one terminal, then `mailer dev-sink --list`.
    """
    rt: Runtime = ctx.obj
    sink = DevSink(directory or rt.settings.var_dir / "devsink", host=host, port=port,
                   on_message=_print_arrival)
    if list_only:
        _print_list(sink.messages(), sink.directory)
        return
    if clear:
        console.print(f"deleted {sink.clear()} message(s) from {sink.directory}")
        return
    try:
        sink.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          hint="is another dev-sink running? try --port") from None
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    console.print(f"dev-sink listening on smtp://{host}:{sink.port}?tls=none, "
                  f"storing into {sink.directory}; Ctrl-C stops it")
    try:
        while not stopping.wait(0.5):  # a timed wait lets Ctrl-C and SIGTERM through promptly
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    console.print("dev-sink stopped")


def _print_arrival(message: SinkMessage) -> None:
    console.print(f"{escape(message.received)}  {escape(message.mail_from)} -> "
                  f"{escape(', '.join(message.rcpt_to))}  {escape(message.subject)}")


def _print_list(messages: list[SinkMessage], directory: Path) -> None:
    if not messages:
        console.print(f"no messages in {directory}")
        return
    table = Table("received", "from", "to", "subject", "key")
    for m in messages:
        table.add_row(escape(m.received), escape(m.mail_from), escape(", ".join(m.rcpt_to)),
                      escape(m.subject), m.key)
    console.print(table)
    console.print(f"{len(messages)} message(s) in {directory}")
