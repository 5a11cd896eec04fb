"""How the long-running commands log: text for people, or one JSON object a line
(MAILER_LOG_FORMAT=json) for log collectors (journald's, Loki's, Elastic's shippers).

The JSON comes from python-json-logger; each line has `time` (UTC, ISO 8601 with Z), `level`,
`logger` and `message`, plus `exc_info` when there is a traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
QUIET = ("apscheduler", "alembic")  # their INFO lines say nothing an operator needs


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests swap it), as the logging
    module's own last-resort handler does."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    formatter = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    return formatter


def configure(log_format: str, level: int = logging.INFO, *, force: bool = False) -> None:
    """Log at `level` and above to stderr, as text or JSON. Like `logging.basicConfig`, it
    leaves handlers someone else installed (a test runner, an embedding program) alone unless
    `force`, and then only sets the level."""
    root = logging.getLogger()
    if root.handlers and not force:
        root.setLevel(level)
        return
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(json_formatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
