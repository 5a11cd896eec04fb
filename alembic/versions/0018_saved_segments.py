"""saved segments; an edition's segment and extra topics; an event's audience

Revision ID: 0018
Revises: 0017
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import subscribers.db

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_LISTS = ("regions", "roles", "organisation_types", "audience_topics")


def upgrade() -> None:
    op.create_table(
        "saved_segment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(length=60), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("organisation_types", sa.JSON(), nullable=False),
        sa.Column("topics", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.Column("created_at", subscribers.db.UTCDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=100), nullable=True),
        sa.Column("updated_at", subscribers.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_saved_segment")),
        sa.UniqueConstraint("slug", name=op.f("uq_saved_segment_slug")),
    )
    # Existing editions and events reach everyone they reached before: '[]' says so. The
    # defaults are only for them; the models write the values themselves.
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.add_column(sa.Column("audience_topics", sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))
        batch_op.add_column(sa.Column("segment", sa.String(length=60), nullable=True))
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.alter_column("audience_topics", server_default=None)
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.add_column(sa.Column("segment", sa.String(length=60), nullable=True))
        for name in _EVENT_LISTS:
            batch_op.add_column(sa.Column(name, sa.JSON(), nullable=False,
                                          server_default=sa.text("'[]'")))
    with op.batch_alter_table("event", schema=None) as batch_op:
        for name in _EVENT_LISTS:
            batch_op.alter_column(name, server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("event", schema=None) as batch_op:
        for name in (*_EVENT_LISTS, "segment"):
            batch_op.drop_column(name)
    with op.batch_alter_table("edition", schema=None) as batch_op:
        batch_op.drop_column("segment")
        batch_op.drop_column("audience_topics")
    op.drop_table("saved_segment")
