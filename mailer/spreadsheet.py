"""Subscriber exports as spreadsheets open them: the columns, and formula-safe cells.

Shared by `mailer subscribers export`, the console and the API, so all three escape alike.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import IO, Any

EXPORT_FIELDS = ["id", "email", "name", "organisation", "organisation_type", "role", "region",
                 "status", "lawful_basis", "source", "created_at", "confirmed_at", "left_at",
                 "topics"]
_FORMULA = ("=", "+", "-", "@", "\t", "\r", "\0")


def csv_cell(value: Any) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula (OWASP/ASVS)."""
    if value is None:
        return ""
    text = "|".join(value) if isinstance(value, list) else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def write_csv(handle: IO[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """The export's header and rows (from `store.iter_export`), every cell formula-safe;
    returns how many rows were written."""
    writer = csv.DictWriter(handle, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    n = 0
    for n, row in enumerate(rows, 1):  # noqa: B007 (n is the count returned)
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return n
