"""edition kinds welcome and declined: the mail to one reader whose sign-up became active, or was
turned down, goes through the outbox as an edition of one delivery

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("newsletter", "reminder")
AFTER = (*BEFORE, "welcome", "declined")


def _kinds(kinds: Sequence[str]) -> None:
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_edition_kind"), type_="check")
        batch_op.create_check_constraint(
            op.f("ck_edition_kind"), "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")")


def upgrade() -> None:
    _kinds(AFTER)


def downgrade() -> None:
    # Welcome and declined mails are a record of what one person was sent; they cannot be
    # kept under the older kinds, so a downgrade forgets them (their deliveries cascade).
    op.execute("DELETE FROM delivery WHERE edition_id IN "
               "(SELECT id FROM edition WHERE kind IN ('welcome', 'declined'))")
    op.execute("DELETE FROM edition WHERE kind IN ('welcome', 'declined')")
    _kinds(BEFORE)
