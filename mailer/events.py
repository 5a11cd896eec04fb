"""The events calendar: dates of interest and their reminder plans (tables and queries)."""
