"""delivery reason not_secure: an OFFICIAL-SENSITIVE edition's reader whose address is not on a
secure domain is recorded as left out (skipped, with this reason) when the send is queued, so
the status counts them from the outbox like every other outcome

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("too_late", "date_passed", "gave_up", "suppressed", "cancelled", "not_built")
AFTER = (*BEFORE, "not_secure")


def _reasons(reasons: Sequence[str]) -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_delivery_reason"), type_="check")
        batch_op.create_check_constraint(
            op.f("ck_delivery_reason"),
            "reason IN (" + ", ".join(f"'{r}'" for r in reasons) + ")")


def upgrade() -> None:
    _reasons(AFTER)


def downgrade() -> None:
    # A left-out row was never a message: without its reason it would read as a send that
    # was skipped for an unknown cause, so a downgrade forgets it.
    op.execute("DELETE FROM delivery WHERE reason = 'not_secure'")
    _reasons(BEFORE)
