"""The one rule for "too late": a reminder's "not after" time.

The claim (`outbox.claim_due`), the worker's retry policy (`worker.Policy.decide`), the
scheduler's catch-up (`schedule.catch_up`) and scheduling (`outbox.schedule`) all ask here, so
they cannot disagree at the boundary.
"""

from __future__ import annotations

from datetime import datetime


def too_late(not_after: datetime | None, at: datetime) -> bool:
    """Whether doing something at `at` is too late for a `not_after` time (None: never).

    At `not_after` exactly is too late: "not after 00:00" means the last moment to act is
    before 00:00, which is also how a reminder's `not_after` is planned (the start of the day
    it is no longer useful). So a delivery claimed at that instant is closed, a retry due then
    is given up, the scheduler marks a reminder due then missed, and a send cannot be
    scheduled for it.
    """
    return not_after is not None and at >= not_after
