"""Co-ordinator accounts and API tokens (tables and queries)."""
