"""stage_nodes: the nodes (workers) of a multi-node train stage's attempt

A run asking for N nodes trains on N workers at once; each claims a node rank here, rank 0
publishes torchrun's rendezvous address, and every node's heartbeat shows which one is
missing when the stage fails. Runs of one node write no rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_nodes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("stage_id", sa.Integer(), sa.ForeignKey("stages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_rank", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("address", sa.String(300), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("stage_id", "attempt", "node_rank", name="uq_stage_node_rank"),
    )
    op.create_index("ix_stage_nodes_stage_id", "stage_nodes", ["stage_id"])


def downgrade() -> None:
    op.drop_index("ix_stage_nodes_stage_id", table_name="stage_nodes")
    op.drop_table("stage_nodes")
