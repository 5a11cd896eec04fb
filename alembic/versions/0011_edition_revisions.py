"""edition revisions: each saved source kept, with who put it forward and who approved it

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "edition_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("edition_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("source_sha256", sa.String(length=64), nullable=False),
        sa.Column("saved_by", sa.String(length=100), nullable=True),
        sa.Column("saved_at", subscribers.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("put_forward_by", sa.String(length=100), nullable=True),
        sa.Column("approved_by", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(["edition_id"], ["edition.id"],
                                name=op.f("fk_edition_revision_edition_id_edition"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_edition_revision")),
    )
    op.create_index("uq_edition_revision_number", "edition_revision", ["edition_id", "number"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("uq_edition_revision_number", table_name="edition_revision")
    op.drop_table("edition_revision")
