"""`mailer`: every co-ordinator task from the command line.

Each command group lives in its own module and only parses arguments, calls the library and
prints. Errors from the library are caught once, here, and shown as one line with a hint.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape
from sqlalchemy.exc import OperationalError

from mailer.cli import (
    alerts_cmd,
    bounces_cmd,
    config_cmd,
    db,
    dev_sink,
    edition,
    schedule_cmd,
    sending,
    subscribers_cmd,
    topics,
    users_cmd,
    web_cmd,
)
from mailer.cli.runtime import Runtime, err_console
from mailer.errors import MailerError
from subscribers.errors import SubscriberError

app = typer.Typer(
    name="mailer",
    help="The Kent & Essex MSHT newsletter: subscribers, editions, sending and scheduling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(db.app, name="db")
app.add_typer(config_cmd.app, name="config")
app.add_typer(topics.app, name="topics")
app.add_typer(subscribers_cmd.app, name="subscribers")
app.add_typer(edition.app, name="edition")
app.add_typer(bounces_cmd.app, name="bounces")
app.add_typer(alerts_cmd.app, name="alerts")
app.add_typer(users_cmd.app, name="users")
app.command("dev-sink")(dev_sink.dev_sink)
app.command("worker")(sending.worker)
app.command("web")(web_cmd.web)
app.add_typer(schedule_cmd.events_app, name="events")
app.add_typer(schedule_cmd.schedule_app, name="schedule")
app.command("scheduler")(schedule_cmd.scheduler)
app.command("run")(schedule_cmd.run)
app.command("demo")(schedule_cmd.demo)


@app.callback()
def _root(ctx: typer.Context) -> None:
    ctx.obj = Runtime.load()
    ctx.call_on_close(ctx.obj.close)


def _error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}")


def run(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code; never lets a traceback reach the user."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="mailer", standalone_mode=False)
    except typer.Abort:
        _error("aborted: nothing was changed")
        return 130
    except typer.TyperException as exc:  # usage errors: typer's own (vendored) click
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(exc, "exit_code", 2))
    except MailerError as exc:
        _error(str(exc), exc.hint)
        return 1
    except SubscriberError as exc:
        _error(str(exc))
        return 1
    except OperationalError as exc:
        _error(f"the database could not be used: {str(exc.orig).strip()}",
               "check MAILER_DATABASE_URL and that the database server is running")
        return 1
    except Exception as exc:  # a bug: say so plainly; the traceback only on request
        if os.environ.get("MAILER_DEBUG"):
            raise
        _error(f"internal error ({type(exc).__name__}): {exc}",
               "this is a bug; run again with MAILER_DEBUG=1 to see the traceback")
        return 70
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())
