"""Subscribers: find, list, add, change, unsubscribe, approve, erase, import and export."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session, sessionmaker

from mailer import bounce_policy, outbox, privacy, welcome
from mailer.accounts import Permission
from mailer.config import Settings
from mailer.errors import OutOfScope
from mailer.operations import Caller
from mailer.spreadsheet import write_csv
from subscribers import importer, store
from subscribers.db import utcnow
from subscribers.errors import InvalidInput
from subscribers.models import Subscriber, SubscriberStatus
from subscribers.rules import Rules

LAWFUL_BASES = {"public_task": "Public task", "legitimate_interests": "Legitimate interests",
                "consent": "Consent"}
PROFILE = ("name", "organisation", "organisation_type", "role", "region")
EXPORT_FORMATS = ("csv", "json")


# ---------------------------------------------------------------- reads

def get(session: Session, caller: Caller, sid: int) -> Subscriber:
    """A subscriber in the caller's regions; anyone else is not found."""
    return store.get(session, sid, caller.scope)


def resolve(session: Session, caller: Caller, rules: Rules, ident: str) -> Subscriber:
    """A subscriber named by id or address, in the caller's regions."""
    return store.resolve(session, rules, ident, caller.scope)


def filter_for(caller: Caller, *, status: str | None = None, region: str | None = None,
               role: str | None = None, topic: str | None = None,
               search: str | None = None) -> store.Filter:
    """A list's or export's filter, always inside the caller's regions: all of theirs by
    default, or one of them; another region is refused."""
    if status is not None and status not in {s.value for s in SubscriberStatus}:
        raise InvalidInput("status", "choose a status from the list")
    if region is not None and caller.scope is not None and region not in caller.scope:
        raise OutOfScope(f"region {region} is outside your regions",
                         hint=f"you can see {', '.join(caller.scope)} only")
    return store.Filter(status=status, region=region, role=role, topic=topic,
                        search=search or None, scope=caller.scope)


def page(session: Session, caller: Caller, flt: store.Filter, *, limit: int,
         offset: int = 0, sort: str = "added", descending: bool = False
         ) -> tuple[int, Sequence[Subscriber]]:
    caller.require(Permission.VIEW)
    return store.list_subscribers(session, _scoped(caller, flt), limit=limit, offset=offset,
                                  sort=sort, descending=descending)


def counts(session: Session, caller: Caller) -> store.Counts:
    return store.counts(session, caller.scope)


def reconfirmation(session: Session, caller: Caller, settings: Settings
                   ) -> store.ReconfirmCounts | None:
    """The yearly reconfirmation's figures (due, asked, answered, lapsed) in the caller's
    regions, for those who look after the list (admins and co-ordinators); None for a viewer,
    whose dashboard simply leaves them out."""
    if not caller.actor.can(Permission.SUBSCRIBERS_EDIT):
        return None
    return store.reconfirm_counts(session, utcnow(),
                                  timedelta(days=settings.reconfirm_after_days), caller.scope)


def history(session: Session, caller: Caller, sid: int) -> dict[str, Any]:
    """Everything held on one person (UK GDPR Art. 15), for who may see them."""
    return privacy.subject_access(session, get(session, caller, sid))


def bounce_events(session: Session, caller: Caller, sid: int) -> list[Any]:
    return bounce_policy.events_for(session, get(session, caller, sid).id)


def deliveries(session: Session, caller: Caller, sid: int) -> list[dict[str, Any]]:
    return outbox.deliveries_for(session, get(session, caller, sid).id)


def _scoped(caller: Caller, flt: store.Filter) -> store.Filter:
    # A filter made by hand (not by `filter_for`) still never reaches past the caller.
    if flt.scope == caller.scope:
        return flt
    return store.Filter(**{**vars(flt), "scope": caller.scope})


# ---------------------------------------------------------------- changes

def add_topic(session: Session, caller: Caller, slug: str, name: str, description: str = ""
              ) -> str:
    """A new topic people can subscribe to; returns its slug."""
    caller.require(Permission.USERS_MANAGE)
    topic = store.add_topic(session, slug, name, description)
    caller.record(session, "topic.add", f"topic:{topic.slug}")
    return topic.slug


def check_lawful_basis(basis: str) -> str:
    if basis not in LAWFUL_BASES:
        raise InvalidInput("lawful_basis", "say on what lawful basis this person is added")
    return basis


def add(session: Session, caller: Caller, rules: Rules, *, email: str, topics: Sequence[str],
        lawful_basis: str, source: str | None = None, **profile: str | None) -> Subscriber:
    """Add someone as active at once, on a recorded lawful basis."""
    caller.require(Permission.SUBSCRIBERS_EDIT)
    fields = {k: profile.get(k) for k in PROFILE}
    checked = store.profile_from(rules, email=email, **fields)
    caller.require_region(checked.region)
    check_lawful_basis(lawful_basis)
    chosen = store.topics_by_slug(session, list(topics))
    subscriber = store.add_active(
        session, rules, checked, chosen,
        caller.context(lawful_basis=lawful_basis,
                       detail={"source": source} if source else None))
    caller.record(session, "subscriber.add", f"subscriber:{subscriber.id}",
                  region=checked.region, lawful_basis=lawful_basis)
    return subscriber


def edit(session: Session, caller: Caller, rules: Rules, sid: int,
         fields: dict[str, str | None]) -> bool:
    """Change profile fields (only those given; None clears one); whether anything changed."""
    caller.require(Permission.SUBSCRIBERS_EDIT)
    unknown = set(fields) - set(PROFILE)
    if unknown:
        raise InvalidInput(sorted(unknown)[0], "this field cannot be changed here")
    subscriber = get(session, caller, sid)
    if "region" in fields:
        caller.require_region(fields["region"])
    before = {k: getattr(subscriber, k) for k in fields}
    if not fields or not store.update_profile(session, rules, subscriber, caller.context(),
                                              **fields):
        return False
    # A form sends every field; the record names those that changed.
    caller.record(session, "subscriber.edit", f"subscriber:{sid}",
                  fields=sorted(k for k in fields if getattr(subscriber, k) != before[k]))
    return True


def unsubscribe(session: Session, caller: Caller, sid: int, topic: str | None = None) -> bool:
    """Unsubscribe someone from one topic or from everything, as if they had asked."""
    caller.require(Permission.SUBSCRIBERS_EDIT)
    subscriber = get(session, caller, sid)
    chosen = store.get_topic(session, topic) if topic else None
    changed = store.unsubscribe(session, subscriber, caller.context(), topic=chosen)
    if changed:
        caller.record(session, "subscriber.unsubscribe", f"subscriber:{sid}",
                      **({"topic": topic} if topic else {}))
    return changed


def decide(session: Session, caller: Caller, settings: Settings, sid: int, *,
           approve: bool) -> bool:
    """Approve or turn down a confirmed sign-up from an untrusted domain. The reader is
    welcomed, or told kindly, in the same transaction (`mailer.welcome`); a decision made
    again changes nothing and mails nothing."""
    caller.require(Permission.SUBSCRIBERS_EDIT)
    subscriber = get(session, caller, sid)
    act = store.approve if approve else store.reject
    changed = act(session, subscriber, caller.context())
    if changed:
        caller.record(session, f"subscriber.{'approve' if approve else 'reject'}",
                      f"subscriber:{sid}")
        if approve:
            welcome.queue_welcome(session, settings, subscriber, approved=True)
        else:
            welcome.queue_declined(session, settings, subscriber)
    return changed


def erase(session: Session, caller: Caller, sid: int) -> None:
    """Erase a person everywhere (UK GDPR Art. 17); their address stays suppressed."""
    caller.require(Permission.SUBSCRIBERS_ERASE)
    privacy.erase(session, get(session, caller, sid), caller.context())
    caller.record(session, "subscriber.erase", f"subscriber:{sid}")


def export(session: Session, caller: Caller, flt: store.Filter, out: IO[str],
           fmt: str = "csv") -> int:
    """Write the subscribers matching `flt` (CSV, formula-safe, or JSON); how many. Who took a
    copy of the list, and which part, is in the audit log."""
    caller.require(Permission.SUBSCRIBERS_EXPORT)
    if fmt not in EXPORT_FORMATS:
        raise InvalidInput("format", f"choose one of {', '.join(EXPORT_FORMATS)}")
    flt = _scoped(caller, flt)
    rows = store.iter_export(session, flt)
    n = 0
    if fmt == "json":
        out.write("[")
        for n, row in enumerate(rows, 1):
            out.write(("," if n > 1 else "") + "\n  " + json.dumps(row, ensure_ascii=False))
        out.write("\n]\n")
    else:
        n = write_csv(out, rows)
    caller.record(session, "subscribers.export", None, rows=n, format=fmt,
                  filter={k: list(v) if isinstance(v, tuple) else str(v)
                          for k, v in vars(flt).items() if v})
    return n


def require_import(caller: Caller, rules: Rules) -> None:
    """A CSV can add people in any region, and its report does not say which: only who covers
    every region may import (a Kent co-ordinator cannot add Essex people this way)."""
    caller.require(Permission.SUBSCRIBERS_IMPORT)
    if not caller.actor.covers(rules.regions):
        raise OutOfScope("importing needs every region: a CSV can add people in any region, "
                         "so only an administrator or a co-ordinator for every region can "
                         "import", hint="add people one at a time, or ask an administrator")


def import_file(sessions: sessionmaker[Session], caller: Caller, rules: Rules, path: Path,
                options: importer.Options, *, apply: bool,
                progress: Callable[[int, int], None] | None = None
                ) -> importer.ImportReport:
    """Check (and with `apply`, import) a CSV: all or nothing, with its audit entry in the
    import's own transaction."""
    require_import(caller, rules)
    check_lawful_basis(options.lawful_basis)

    def audited(session: Session, report: importer.ImportReport) -> None:
        caller.record(session, "subscribers.import", None, file=report.source,
                      sha256=report.sha256, added=report.new,
                      lawful_basis=options.lawful_basis)

    return importer.import_file(sessions, rules, path, options, apply=apply,
                                progress=progress, on_apply=audited)
