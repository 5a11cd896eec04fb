"""`mailer dkim keygen` and `mailer doctor`: setting up and checking a deployment."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from mailer import dkim
from mailer.cli.runtime import Runtime, console

dkim_app = typer.Typer(help="DKIM keys for signing our mail.", no_args_is_help=True)
_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


@dkim_app.command()
def keygen(
    ctx: typer.Context,
    selector: str = typer.Option(None, help="The DNS selector; default mailer + this month"),
    domain: str = typer.Option(None, help="The signing domain; default MAILER_DKIM_DOMAIN "
                                          "or From's domain"),
    ed25519: bool = typer.Option(False, "--ed25519", help="An Ed25519 key (RFC 8463), to "
                                 "co-sign beside RSA"),
    out: Path = typer.Option(None, help="The key file; default <var_dir>/dkim/<selector>.pem"),
) -> None:
    """Write a new private key (mode 0600; never overwrites) and print its DNS TXT record.

    Example: `mailer dkim keygen --selector mailer2027 --domain news.kent.police.uk`
    """
    from datetime import UTC, datetime

    rt: Runtime = ctx.obj
    selector = selector or f"mailer{datetime.now(UTC):%Y%m}"
    domain = (domain or rt.settings.dkim_signing_domain).lower().rstrip(".")
    if not (dkim.SELECTOR.fullmatch(selector) and dkim.SELECTOR.fullmatch(domain)):
        raise typer.BadParameter("selector and domain: letters, digits, dots and hyphens")
    path = out or rt.settings.var_dir / "dkim" / f"{selector}.pem"
    pem = dkim.generate_key(path, ed25519=ed25519)
    strings = dkim.txt_strings(dkim.txt_value(pem))
    console.print(f"wrote {escape(str(path))} (mode 0600)")
    console.print("publish this TXT record:")
    console.print(f"  name:  {selector}._domainkey.{domain}", soft_wrap=True)
    console.print("  value: " + " ".join(f'"{s}"' for s in strings), soft_wrap=True)
    setting = ("MAILER_DKIM_EXTRA_KEYS='[\"" + f"{selector}={path}" + "\"]'" if ed25519 else
               f"MAILER_DKIM_KEY_FILE={path} MAILER_DKIM_SELECTOR={selector}")
    console.print(f"then, once it resolves (`mailer doctor` checks): {escape(setting)}",
                  soft_wrap=True)


def doctor(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="One JSON object, for "
                                                              "monitoring")) -> None:
    """Check the deployment: SPF, DKIM, DMARC, MX, the relay's TLS and login, the base URL,
    secrets, backups, the scheduler and the schema. Exits 1 if any check FAILs.

    Example: `mailer doctor --json`
    """
    from mailer.doctor import FAIL, run_checks

    rt: Runtime = ctx.obj
    checks = run_checks(rt.settings)
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [c.to_dict() for c in checks]}))
    else:
        for check in checks:
            style = _STYLE[check.status]
            console.print(f"[{style}]{check.status}[/] {check.name:<14} {escape(check.detail)}",
                          soft_wrap=True)
            if check.fix:
                console.print(f"     {'':<14} fix: {escape(check.fix)}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)
