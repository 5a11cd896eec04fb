"""Sign-in with the force's directory (issue 18): who a console account is in the directory.

Two empty columns on `console_user`, the issuer and the subject (Entra's `oid`) of an account
made at its first directory sign-in, unique together. Local accounts keep both empty.

Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "uq_console_user_directory"


def upgrade() -> None:
    # ALTER TABLE ... ADD COLUMN on both backends: no copy of the table on SQLite.
    op.add_column("console_user", sa.Column("directory_issuer", sa.String(300), nullable=True))
    op.add_column("console_user", sa.Column("directory_subject", sa.String(255), nullable=True))
    op.create_index(_INDEX, "console_user", ["directory_issuer", "directory_subject"],
                    unique=True)


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="console_user")
    if op.get_bind().dialect.name == "sqlite":
        for name in ("directory_subject", "directory_issuer"):  # SQLite 3.35+: in place
            op.execute(f"ALTER TABLE console_user DROP COLUMN {name}")
        return
    op.drop_column("console_user", "directory_subject")
    op.drop_column("console_user", "directory_issuer")
