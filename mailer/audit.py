"""The append-only audit log (table and queries)."""
