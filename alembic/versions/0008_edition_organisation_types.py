"""an edition's audience by organisation type too (empty: every type)

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing editions went to every organisation type: '[]' says so. The default is only
    # for them; the model writes the value itself, as it does for regions and roles.
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.add_column(sa.Column("organisation_types", sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.alter_column("organisation_types", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.drop_column("organisation_types")
