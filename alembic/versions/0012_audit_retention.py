"""The audit log's retention: entries over a year old may be deleted (issue 17).

Migration 0005 made the audit table refuse every UPDATE and DELETE. The retention purge
(`mailer.retention`, `retention_audit_years`, at least 1) must delete entries older than its
period, so DELETE is now let through for entries more than 365 days old by the database's own
clock, and refused for younger ones as before: the last year of the log stays out of reach of
any code, whatever the settings say. UPDATE is refused as before.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSAL = "the audit log is append-only: only entries over a year old may be deleted"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE OR REPLACE FUNCTION audit_entry_append_only() RETURNS trigger "
                   "LANGUAGE plpgsql AS $$ BEGIN "
                   "IF TG_OP = 'DELETE' AND OLD.at < now() - interval '365 days' THEN "
                   "RETURN OLD; END IF; "
                   f"RAISE EXCEPTION '{REFUSAL}'; END $$")
    else:
        # SQLite keeps these columns as 'YYYY-MM-DD HH:MM:SS[.ffffff]' UTC text, which
        # compares in time order with datetime()'s own text.
        op.execute("DROP TRIGGER audit_entry_no_delete")
        op.execute("CREATE TRIGGER audit_entry_no_delete BEFORE DELETE ON audit_entry "
                   "WHEN NOT (OLD.at < datetime('now', '-365 days')) "
                   f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE OR REPLACE FUNCTION audit_entry_append_only() RETURNS trigger "
                   "LANGUAGE plpgsql "
                   "AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$")
    else:
        op.execute("DROP TRIGGER audit_entry_no_delete")
        op.execute("CREATE TRIGGER audit_entry_no_delete BEFORE DELETE ON audit_entry "
                   "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")
