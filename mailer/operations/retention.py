"""The privacy report: what we hold, since when, and when it goes (issue 17).

Administrators only: its figures cover every region at once, which a region-scoped
co-ordinator does not see.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from mailer import retention
from mailer.accounts import Permission
from mailer.config import Settings
from mailer.operations import Caller


def privacy_report(session: Session, caller: Caller,
                   settings: Settings) -> list[retention.Holding]:
    """Per category: records held, the oldest, and the next purge date under `settings`."""
    caller.require(Permission.PRIVACY_REPORT)
    return retention.report(session, retention.Periods.from_settings(settings))
