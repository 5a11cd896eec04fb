"""Run the test suite as if it were another time of day: the proof that no test depends on the
hour it runs at (issue 13). Python imports this module at start-up when this folder is on
PYTHONPATH, in the test process and in every Python process it starts (workers, the CLI, the
scheduler), so they all share one moved clock:

    TESTS_NOW=2026-03-28T01:30:00+00:00 PYTHONPATH=tests/moved_clock bash .ci/test

Every process's wall clock (`time.time`, `datetime.now`) reads TESTS_NOW plus however long
ago the first process started, and runs on from there; the monotonic clock is never moved, and
neither is the clock of anything not written in Python (OpenSSL's, PostgreSQL's, Chromium's).
Without TESTS_NOW this does nothing.
"""

import os
import time


def _travel(wanted: str) -> None:
    try:
        import time_machine
    except ImportError:  # a Python without the project installed (.ci/setup's pip, say)
        return
    import datetime

    # The first process fixes the offset; its children inherit it, so a worker started ten
    # minutes into the run sees the same moved time as the test that started it.
    offset = os.environ.setdefault(
        "TESTS_CLOCK_OFFSET",
        repr(datetime.datetime.fromisoformat(wanted).timestamp() - time.time()))
    time_machine.travel(time.time() + float(offset), tick=True).start()


if os.environ.get("TESTS_NOW"):
    _travel(os.environ["TESTS_NOW"])
