"""Times a test chooses instead of reading the wall clock for them.

"now + 1 day" lands between 01:00 and 02:59 UK time when the suite runs at night, and the
schedule refuses that window (the clocks change in it): a test that schedules a send picks
its hour itself.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

LONDON = ZoneInfo("Europe/London")


def uk_noon_in(days: int) -> dt.datetime:
    """Noon UK time `days` days after today's UK date, in UTC: in the future for any
    `days` >= 1 at any hour the suite runs, and never in the clock-change window."""
    day = dt.datetime.now(LONDON).date() + dt.timedelta(days=days)
    return dt.datetime.combine(day, dt.time(12, 0), tzinfo=LONDON).astimezone(dt.UTC)
