"""outbox.run_id with the (run_id, kind, sent_at) index; metrics.total_steps

The reconciler's due-run query finds a run's run_stages messages by the indexed column
instead of reading every message's JSON payload; a train metric row keeps its record's
total_steps so the store hands the dashboard whole records. Existing rows are filled in.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("run_id", sa.String(32), nullable=True))
        batch.create_index("ix_outbox_run_kind_sent", ["run_id", "kind", "sent_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE outbox SET run_id = payload->>'run_id' WHERE kind = 'run_stages'")
    else:
        op.execute("UPDATE outbox SET run_id = json_extract(payload, '$.run_id') WHERE kind = 'run_stages'")
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("total_steps", sa.Integer(), nullable=True))
    # the train stage's count is the one its train records carried (ingest wrote both)
    op.execute("UPDATE metrics SET total_steps = COALESCE((SELECT stages.total_steps FROM stages "
               "WHERE stages.run_id = metrics.run_id AND stages.name = 'train'), metrics.step) "
               "WHERE type = 'train'")


def downgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("total_steps")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_run_kind_sent")
        batch.drop_column("run_id")
