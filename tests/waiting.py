"""Bounded waits for the tests: poll a condition, never a bare sleep for timing."""

from __future__ import annotations

import subprocess
import threading
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> bool:
    """Whether `condition` became true within `timeout` seconds (checked every 20 ms)."""
    gate = threading.Event()
    deadline = datetime.now(UTC) + timedelta(seconds=timeout)
    while datetime.now(UTC) < deadline:
        if condition():
            return True
        gate.wait(0.02)
    return bool(condition())


def answering(base: str, proc: subprocess.Popen[str]) -> Callable[[], bool]:
    """A condition for `wait_for`: the app under `base` answers /healthz, or `proc`, which
    serves it, has died (no use waiting longer)."""
    def check() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:  # noqa: S310
                return response.status == 200
        except OSError:
            return proc.poll() is not None
    return check


def a_session_waits_on_a_lock(db_url: str, timeout: float = 10.0) -> bool:
    """Whether some session of this PostgreSQL database comes to wait on a lock: a race test
    sees the interleaving it needs rather than assuming it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from subscribers.db import normalise_url

    # Autocommit: PostgreSQL keeps one snapshot of pg_stat_activity per transaction, so polls
    # inside one transaction would see the first poll's answer for ever.
    watcher = create_engine(normalise_url(db_url), poolclass=NullPool,
                            isolation_level="AUTOCOMMIT")
    query = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                 "AND datname = current_database()")
    try:
        with watcher.connect() as conn:
            return wait_for(lambda: conn.execute(query).scalar(), timeout)
    finally:
        watcher.dispose()
