"""`mailer users`: console accounts (add, list, disable, enable, reset-password, totp) and
API tokens (token, tokens, revoke). Every change is written to the audit log as `cli:<user>`."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from rich.table import Table

from mailer import accounts
from mailer.accounts import Role
from mailer.cli.runtime import Runtime, console
from mailer.operations import users as user_ops

app = typer.Typer(help="Console users and API tokens.", no_args_is_help=True)


def _password(stdin: bool) -> str:
    """From stdin (one line, for scripts) or typed twice without echo."""
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@app.command()
def add(ctx: typer.Context, login: str,
        name: str = typer.Option(..., "--name", help="The person's name, as others see it"),
        role: Role = typer.Option(Role.COORDINATOR),
        region: list[str] = typer.Option([], "--region", help="Repeat for each region"),
        email: str | None = typer.Option(None, help="Where their test sends go"),
        password_stdin: bool = typer.Option(False, "--password-stdin",
                                            help="Read the password from stdin")) -> None:
    """Add a console user. Example: `mailer users add jsmith --name "Jo Smith" --region kent
    --email jo.smith@kent.police.uk`."""
    rt: Runtime = ctx.obj
    password = _password(password_stdin)
    with rt.session() as session:
        user = user_ops.add(session, rt.caller, login=login, name=name, role=role,
                            regions=region, known_regions=list(rt.settings.regions),
                            password=password, email=email)
        console.print(f"added {escape(user.login)} ({role}"
                      f"{': ' + ', '.join(user.regions) if user.regions else ''})")


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List console users."""
    rt: Runtime = ctx.obj
    table = Table("login", "name", "role", "regions", "2FA", "state", "last sign-in")
    with rt.session() as session:
        for u in user_ops.listing(session, rt.caller):
            table.add_row(escape(u.login), escape(u.display_name), u.role,
                          ", ".join(u.regions) or "all", "yes" if u.totp_secret else "no",
                          "disabled" if u.disabled else "active",
                          u.last_login_at.isoformat(timespec="minutes") if u.last_login_at
                          else "")
    console.print(table)


@app.command()
def disable(ctx: typer.Context, login: str) -> None:
    """Stop a user signing in; ends their sessions and revokes their API tokens at once."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        changed = user_ops.set_disabled(session, rt.caller, login, True)
    console.print(f"disabled {escape(login)}" if changed else f"{escape(login)} was already "
                  "disabled (sessions and tokens ended again)")


@app.command()
def enable(ctx: typer.Context, login: str) -> None:
    """Let a disabled user sign in again."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        changed = user_ops.set_disabled(session, rt.caller, login, False)
    console.print(f"enabled {escape(login)}" if changed else "nothing to do")


@app.command("reset-password")
def reset_password(ctx: typer.Context, login: str,
                   password_stdin: bool = typer.Option(False, "--password-stdin")) -> None:
    """Set a new password; unlocks the account and signs out its sessions."""
    rt: Runtime = ctx.obj
    password = _password(password_stdin)
    with rt.session() as session:
        user_ops.reset_password(session, rt.caller, login, password)
    console.print(f"new password set for {escape(login)}")


@app.command()
def totp(ctx: typer.Context, login: str,
         off: bool = typer.Option(False, "--off", help="Remove the second factor")) -> None:
    """Turn on (or --off) the authenticator-app second factor; prints the secret to enrol."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        enrolment = user_ops.second_factor(session, rt.caller, login, on=not off)
    if enrolment is None:
        console.print(f"two-factor sign-in is off for {escape(login)}")
        return
    secret, uri = enrolment
    # soft_wrap: the URI is copied into an app, so it must stay on one line however narrow
    # the terminal.
    console.print(f"secret: {secret}\nURI for the authenticator app: {escape(uri)}",
                  soft_wrap=True)


@app.command()
def token(ctx: typer.Context, login: str,
          name: str = typer.Option(..., "--name", help="What the token is for"),
          role: Role | None = typer.Option(None, help="At most the user's role"),
          days: int = typer.Option(365, min=1, max=3650)) -> None:
    """Make an API token for /api/v1. It is shown once; only its hash is kept."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        _row, plain = user_ops.create_token(session, rt.caller, login, name=name, role=role,
                                            days=days)
    console.print(plain, soft_wrap=True)


@app.command()
def tokens(ctx: typer.Context) -> None:
    """List API tokens (never their secrets)."""
    rt: Runtime = ctx.obj
    table = Table("prefix", "user", "name", "role", "expires", "last used", "state")
    with rt.session() as session:
        names = {u.id: u.login for u in accounts.list_users(session)}
        for t in accounts.list_tokens(session):
            table.add_row(t.prefix, escape(names.get(t.user_id, "?")), escape(t.name), t.role,
                          t.expires_at.date().isoformat() if t.expires_at else "never",
                          t.last_used_at.isoformat(timespec="minutes") if t.last_used_at
                          else "", "revoked" if t.revoked_at else "active")
    console.print(table)


@app.command()
def revoke(ctx: typer.Context, prefix: str) -> None:
    """Revoke an API token by its prefix (see `mailer users tokens`)."""
    rt: Runtime = ctx.obj
    with rt.session() as session:
        changed = user_ops.revoke_token(session, rt.caller, prefix)
    console.print("revoked" if changed else "already revoked")
