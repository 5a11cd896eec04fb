"""Reading the audit log: what each reader may see of it.

A co-ordinator or viewer sees the entries about their regions' subscribers and editions, those
about neither (sign-ins, users, events) and their own; an administrator sees everything. IP
addresses are personal data of the other users: only administrators see them, whatever the face.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from mailer import audit
from mailer.accounts import Permission, Role
from mailer.operations import Caller


def sees_ip_addresses(caller: Caller) -> bool:
    return caller.actor.role == Role.ADMIN


def entries(session: Session, caller: Caller, flt: audit.AuditFilter, limit: int = 100,
            offset: int = 0) -> tuple[int, list[audit.AuditView]]:
    """The matching entries the caller may read, newest first, and how many there are."""
    caller.require(Permission.AUDIT_VIEW)
    total, rows = audit.entries(session, flt, limit=limit, offset=offset, scope=caller.scope,
                                own=caller.actor.login)
    with_ip = sees_ip_addresses(caller)
    return total, [audit.view(r, with_ip) for r in rows]
