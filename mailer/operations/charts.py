"""The console's charts: their figures within the caller's regions (`mailer.figures`).

Reads only: anyone signed in may see them (the viewer's permission), each counted in the
caller's regions, and an edition's only when its audience reaches them (`editions.get`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from mailer import figures
from mailer.accounts import Permission
from mailer.charts import Chart
from mailer.config import Settings
from mailer.errors import NotFound
from mailer.labels import Labels
from mailer.operations import Caller
from mailer.operations import editions as edition_ops

# The dashboard's charts in the order shown; their keys name their routes.
DASHBOARD = ("readers-by-region", "readers-by-organisation-type", "sends", "reminders")


def chart(session: Session, caller: Caller, settings: Settings, key: str, now: datetime
          ) -> Chart:
    """One of the dashboard's charts by its key."""
    caller.require(Permission.VIEW)
    words = Labels(settings).one
    if key == "readers-by-region":
        return figures.readers(session, caller.scope, now, "region", words)
    if key == "readers-by-organisation-type":
        return figures.readers(session, caller.scope, now, "organisation_type", words)
    if key == "sends":
        return figures.sends(session, caller.scope)
    if key == "reminders":
        return figures.reminders(session, now)
    raise NotFound(f"there is no chart called {key!r}")


def dashboard(session: Session, caller: Caller, settings: Settings, now: datetime
              ) -> list[Chart]:
    return [chart(session, caller, settings, key, now) for key in DASHBOARD]


def edition(session: Session, caller: Caller, ident: int | str) -> Chart:
    """What became of one send, counted among the caller's regions' readers."""
    caller.require(Permission.VIEW)
    return figures.edition_chart(session, edition_ops.get(session, caller, ident), caller.scope)
