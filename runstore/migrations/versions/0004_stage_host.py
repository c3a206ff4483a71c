"""stages.host: the machine a stage ran on

With workers on several hosts the dashboard says which host runs what; the Celery node name
in stages.worker need not name the machine. Old rows keep NULL (shown as unknown).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("host", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("host")
