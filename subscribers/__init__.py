"""The subscriber database. It knows nothing of email: `mailer` imports it, never the reverse."""
