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

from mailer.cli.runtime import Runtime, err_console
from mailer.errors import MailerError
from subscribers.errors import SubscriberError

# name -> (module, attribute, a group or one command, modules that add to it). Only what the
# command line names is imported: `mailer worker` need not load the bounce parser, the
# scheduler or the web app, which were a third of its start-up (0.85 s, now 0.55).
_PARTS: dict[str, tuple[str, str, bool, tuple[str, ...]]] = {
    "db": ("db", "app", True, ()),
    "config": ("config_cmd", "app", True, ()),
    "topics": ("topics", "app", True, ()),
    "segments": ("segments_cmd", "app", True, ()),
    "subscribers": ("subscribers_cmd", "app", True, ()),
    "edition": ("edition", "app", True, ("sending", "schedule_cmd")),
    "bounces": ("bounces_cmd", "app", True, ()),
    "alerts": ("alerts_cmd", "app", True, ()),
    "users": ("users_cmd", "app", True, ()),
    "backup": ("backup_cmd", "app", True, ()),
    "privacy": ("privacy_cmd", "app", True, ()),
    "dev-sink": ("dev_sink", "dev_sink", False, ()),
    "worker": ("sending", "worker", False, ()),
    "web": ("web_cmd", "web", False, ()),
    "events": ("schedule_cmd", "events_app", True, ()),
    "schedule": ("schedule_cmd", "schedule_app", True, ()),
    "scheduler": ("schedule_cmd", "scheduler", False, ()),
    "run": ("schedule_cmd", "run", False, ()),
    "demo": ("schedule_cmd", "demo", False, ()),
    "dkim": ("deploy_cmd", "dkim_app", True, ()),
    "doctor": ("deploy_cmd", "doctor", False, ()),
}


def _root(ctx: typer.Context) -> None:
    ctx.obj = Runtime.load()
    ctx.call_on_close(ctx.obj.close)


def build(names: list[str] | None = None) -> typer.Typer:
    """The `mailer` app with these commands (all of them by default)."""
    import importlib

    built = typer.Typer(
        name="mailer",
        help="The Kent & Essex MSHT newsletter: subscribers, editions, sending and scheduling.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    built.callback()(_root)
    for name in names or list(_PARTS):
        module, attribute, group, extra = _PARTS[name]
        for other in extra:
            importlib.import_module(f"mailer.cli.{other}")
        part = getattr(importlib.import_module(f"mailer.cli.{module}"), attribute)
        if group:
            built.add_typer(part, name=name)
        else:
            built.command(name)(part)
    return built


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # every command: for the docs check and anything that lists them
        return build()
    raise AttributeError(name)


def _error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}")


def run(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code; never lets a traceback reach the user."""
    args = sys.argv[1:] if argv is None else argv
    first = next((a for a in args if not a.startswith("-")), None)
    only = [first] if first in _PARTS and "--help" not in args[:args.index(first)] else None
    command = typer.main.get_command(build(only))
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
