"""when a delivery's final dot was about to be written, and whether a claim on it was taken over

`dot_at` is set (and committed) before the worker writes the final dot of an attempt, so after
a crash a row still `sending` without it certainly reached nobody; `taken_over` says the row
was resent after its worker died. Together they make the duplicate figures honest (D4).

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dot_at", subscribers.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("taken_over", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_column("taken_over")
        batch_op.drop_column("dot_at")
