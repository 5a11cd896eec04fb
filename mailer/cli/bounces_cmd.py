"""`mailer bounces`: receive and read bounces, complaints and auto-replies, and act on them.

`serve` and `fetch` go through `_handle`, the one seam every transport goes through: each
message is kept and the policy applied (`mailer.bounce_policy`). `parse` only shows what a saved
message is and records nothing; `list` shows alerts and recent messages, `resolve` closes an
alert, `purge` applies the retention periods (which `serve` also does hourly, and `fetch` after
each read, so raw messages do not outlive them where nobody set up a cron job). A reader's
reply is kept and forwarded to the contact address (`mailer.replies`): at once, and again on
each settle pass while the relay refuses it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import typer
from rich.markup import escape

from mailer import bounce_policy, replies
from mailer.bounce_policy import BouncePolicy, Decision
from mailer.bounces import Kind, Verdict, classify_inbound
from mailer.cli.runtime import Runtime, console
from mailer.errors import MailerError
from mailer.inbound import InboundMessage, Receiver, open_source
from mailer.operations import alerts as alert_ops
from mailer.outbox import LONDON
from subscribers.db import utcnow

log = logging.getLogger(__name__)

app = typer.Typer(help="Receive, parse and list bounces and complaints.", no_args_is_help=True)

_COLOURS = {Kind.HARD: "red", Kind.SOFT: "yellow", Kind.COMPLAINT: "magenta",
            Kind.AUTO_REPLY: "dim", Kind.REPLY: "green", Kind.UNKNOWN: "dim"}


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
        f"edition {ref.edition_id or '(not named)'}, subscriber {ref.subscriber_id} "
        f"[dim](from {ref.source})[/]"
        if ref else "[dim]not identified[/]"))
    for note in verdict.notes:
        console.print(f"  [dim]note: {escape(note)}[/]")


_DECISION_COLOURS = {Decision.SUPPRESSED: "red", Decision.DISABLED: "red",
                     Decision.COMPLAINT: "magenta", Decision.HELD: "bold yellow",
                     Decision.ERROR: "bold red", Decision.UNMATCHED: "yellow"}


def _handle(message: InboundMessage, rt: Runtime,
            policy: BouncePolicy) -> bounce_policy.Outcome:
    """Classify one inbound message, keep it and apply the policy, in one transaction.

    A database failure raises, so the receiver answers 451 and the MTA keeps the bounce."""
    with rt.session() as session:
        outcome = bounce_policy.receive(session, policy, message, rt.settings.secret(),
                                        rules=rt.settings.rules(),
                                        token_keys=rt.settings.token_keys(),
                                        own_addresses=replies.own_addresses(rt.settings))
    if outcome.decision is Decision.REPLY:
        # Recorded and committed: forwarding now is a courtesy, the next pass retries it, so
        # a relay that is down must not make the MTA deliver the reply again.
        _forward(rt)
    if outcome.duplicate:  # one line: a mailbox read again is mostly messages seen before
        console.print(f"[dim]{escape(message.origin)}: already received as "
                      f"#{outcome.inbound_id} ({outcome.decision})[/]")
        return outcome
    show(outcome.verdict, message.origin)
    colour = _DECISION_COLOURS.get(outcome.decision, "dim")
    console.print(f"  decision:  [{colour}]{outcome.decision}[/] ({escape(outcome.summary())})"
                  f" [dim]#{outcome.inbound_id}[/]")
    return outcome


def _forward(rt: Runtime) -> int:
    try:
        done = replies.forward_pending(rt.sessions(), rt.settings)
    except Exception:  # the database away for a moment: the next pass forwards it
        log.exception("could not forward readers' replies")
        return 0
    if done:
        console.print(f"{done} reader's reply(ies) forwarded to "
                      f"{escape(rt.settings.contact_address)}")
    return done


def _settle(rt: Runtime, policy: BouncePolicy) -> int:
    with rt.session() as session:
        done = bounce_policy.settle(session, policy)
    for item in done:
        colour = _DECISION_COLOURS.get(item.decision, "dim")
        console.print(f"settled bounce {item.event_id} (subscriber {item.subscriber_id}): "
                      f"[{colour}]{item.decision}[/] ({escape(item.detail)})")
    return len(done)


#: How often `serve` applies the retention periods: they are in days, so hourly is plenty.
PURGE_EVERY = 3600.0


def _purge(rt: Runtime, policy: BouncePolicy, *, quiet: bool = False) -> bounce_policy.Purged:
    with rt.session() as session:
        done = bounce_policy.purge(session, policy)
    if not quiet or done.raw_cleared or done.records_deleted or done.alerts_deleted:
        console.print(f"raw messages cleared: {done.raw_cleared}; records deleted: "
                      f"{done.records_deleted}; resolved alerts deleted: {done.alerts_deleted}")
    return done


@app.command()
def parse(ctx: typer.Context, files: list[Path] = typer.Argument(..., exists=True,
                                                                 dir_okay=False),
          rcpt: str | None = typer.Option(None, "--rcpt",
                                          help="The envelope recipient, if known")) -> None:
    """Show what each saved message (.eml) is. Example: `mailer bounces parse bounce.eml`."""
    rt: Runtime = ctx.obj
    secret = rt.settings.secret()
    for path in files:
        verdict = classify_inbound(path.read_bytes(), secret, [rcpt] if rcpt else [],
                                   token_keys=rt.settings.token_keys())
        show(verdict, str(path))


@app.command()
def serve(ctx: typer.Context,
          host: str = typer.Option("127.0.0.1", help="Address to listen on"),
          port: int = typer.Option(8024, help="Port to listen on"),
          lmtp: bool = typer.Option(True, "--lmtp/--smtp",
                                    help="Speak LMTP (for an MTA's transport) or SMTP"),
          settle_every: float = typer.Option(60.0, min=0.1,
                                             help="Seconds between settling held bounces"),
          ) -> None:
    """Receive bounces from the MTA, keep each and apply the bounce policy.

    Example: `mailer bounces serve --port 8024`.

    Point Postfix at it with, for the bounce address, `transport_maps` entry
    `bounces@news.example.police.uk lmtp:inet:127.0.0.1:8024` (and `recipient_delimiter = +`).
    """
    rt: Runtime = ctx.obj
    policy = BouncePolicy.from_settings(rt.settings)
    rt.sessions()  # check the schema once, before any message is accepted
    receiver = Receiver(lambda message: _handle(message, rt, policy), host, port, lmtp=lmtp)
    receiver.start()
    console.print(f"[green]listening[/] for {'LMTP' if lmtp else 'SMTP'} on {host}:"
                  f"{receiver.port} (Ctrl-C or SIGTERM stops); held bounces are settled every "
                  f"{settle_every:g} s")
    stop = threading.Event()
    # SIGTERM (systemd's stop) as Ctrl-C: stop listening, let what is being recorded finish.
    # A non-interactive shell starts background jobs with SIGINT ignored, so SIGTERM is the
    # one an init system or `kill` relies on.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    purged_at: float | None = None
    try:
        # Bounces wait out the hold period before they are acted on: settle them even when no
        # new message arrives to do it. The retention periods are applied on the way.
        while True:
            if purged_at is None or time.monotonic() - purged_at >= PURGE_EVERY:
                try:
                    _purge(rt, policy, quiet=True)
                    purged_at = time.monotonic()
                except Exception:  # the database away for a moment: try again next time
                    log.exception("could not apply the bounce retention periods")
            if stop.wait(settle_every):
                break
            try:
                _settle(rt, policy)
            except Exception:  # the database away for a moment: try again next time
                log.exception("could not settle held bounces")
            _forward(rt)  # replies the relay could not take before
    finally:
        receiver.stop()
    console.print("stopped")


@app.command()
def fetch(ctx: typer.Context,
          source: str = typer.Argument(..., help="maildir:PATH, mbox:PATH or imaps://user@host/"),
          since: int = typer.Option(30, min=1, help="Only messages that arrived in the last "
                                                    "DAYS days", metavar="DAYS"),
          password: str | None = typer.Option(None, envvar="MAILER_IMAP_PASSWORD",
                                              hidden=True)) -> None:
    """Read a bounce mailbox, keep each message and apply the bounce policy.

    Nothing in the mailbox is moved or deleted; a message read before is recognised and not
    counted again, and only the last --since days are read (30 by default), so a mailbox that
    is never emptied is not read whole each time. Example: `mailer bounces fetch
    imaps://bounces@mail.example.police.uk/INBOX` (password in MAILER_IMAP_PASSWORD), or
    `mailer bounces fetch maildir:/var/mail/bounces`.
    """
    rt: Runtime = ctx.obj
    policy = BouncePolicy.from_settings(rt.settings)
    if since > policy.record_retention.days:
        # A message is recognised as read before only while its record is kept.
        raise MailerError(f"--since {since} is longer than the {policy.record_retention.days} "
                          "days inbound records are kept: older messages would be acted on "
                          "again", hint="raise MAILER_BOUNCE_RECORD_RETENTION_DAYS, or read "
                                        "fewer days")
    count = new = 0
    for message in open_source(source, password, since=utcnow() - timedelta(days=since)):
        new += not _handle(message, rt, policy).duplicate
        count += 1
    settled = _settle(rt, policy)
    _forward(rt)
    console.print(f"{count} message(s) read, {new} new" + (
        f", {settled} held bounce(s) settled" if settled else ""))
    _purge(rt, policy, quiet=True)


@app.command("list")
def list_(ctx: typer.Context,
          limit: int = typer.Option(20, min=1, help="How many recent messages"),
          subscriber: int | None = typer.Option(None, help="Only those about this subscriber"),
          bounces_only: bool = typer.Option(False, "--bounces-only",
                                            help="Leave out auto-replies and unknown mail"),
          ) -> None:
    """Open alerts, then recent inbound messages with what was decided about each.

    Example: `mailer bounces list --limit 50`.
    """
    rt: Runtime = ctx.obj
    kinds = ("hard", "soft", "complaint") if bounces_only else ()
    with rt.session() as session:
        alerts = bounce_policy.open_alerts(session)
        rows = bounce_policy.recent(session, limit, subscriber_id=subscriber, kinds=kinds)
        events = bounce_policy.events_for(session, subscriber) if subscriber else []
    if alerts:
        console.print(f"[bold red]{len(alerts)} open alert(s)[/] "
                      "(`mailer bounces resolve ID --apply` or `--dismiss`):")
        for a in alerts:
            console.print(f"  alert {a.id} [{a.kind}] edition {a.edition_id}, {escape(a.domain)}"
                          f": {escape(a.detail)}")
    else:
        console.print("no open alerts")
    if not rows:
        console.print("no inbound messages")
    for r in rows:
        colour = _DECISION_COLOURS.get(Decision(r.decision), "dim")
        who = (f"edition {r.edition_id}, subscriber {r.subscriber_id}"
               if r.subscriber_id is not None else "not identified")
        console.print(f"#{r.id} {_local(r.received_at)} {r.kind}"
                      f"{' ' + r.status if r.status else ''} [{colour}]{r.decision}[/] {who}"
                      f"{'' if r.raw_kept else ' [dim](raw purged)[/]'}")
        console.print(f"    {escape(r.detail)}")
    for e in events:
        console.print(f"bounce {e.id} {_local(e.occurred_at)} {e.kind} "
                      f"{e.status or ''} edition {e.edition_id}: {e.action}"
                      f"{' (counted)' if e.counted else ''}")


def _local(at: datetime) -> str:
    """UK time, as co-ordinators read it (the database holds UTC)."""
    return at.astimezone(LONDON).strftime("%Y-%m-%d %H:%M %Z")


@app.command()
def resolve(ctx: typer.Context, alert: int = typer.Argument(..., help="The alert's id"),
            apply: bool = typer.Option(..., "--apply/--dismiss",
                                       help="--apply: the bounces are real, act on them; "
                                            "--dismiss: leave those subscribers alone"),
            ) -> None:
    """Close a bounce alert. Example: `mailer bounces resolve 3 --dismiss`."""
    rt: Runtime = ctx.obj
    policy = BouncePolicy.from_settings(rt.settings)
    with rt.session() as session:
        _alert, changed = alert_ops.resolve_bounce_alert(
            session, rt.caller, policy, alert, apply=apply,
            every_region=tuple(rt.settings.regions))
    console.print(f"alert {alert} {'applied' if apply else 'dismissed'}; "
                  f"{changed} subscriber(s) marked bounced")


@app.command()
def purge(ctx: typer.Context) -> None:
    """Apply the retention periods (bounce_raw_retention_days, bounce_record_retention_days).

    `serve` does this hourly and `fetch` after each read; run it daily from cron where neither
    runs: `mailer bounces purge`.
    """
    rt: Runtime = ctx.obj
    _purge(rt, BouncePolicy.from_settings(rt.settings))
