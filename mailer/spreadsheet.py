"""Subscriber exports as spreadsheets open them: the columns, and formula-safe cells.

Shared by `mailer subscribers export` and the console's CSV export, so both escape alike.
"""

from __future__ import annotations

from typing import Any

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
