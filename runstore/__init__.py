"""Run store: the SQLite database behind the dashboard and the workers.

`open_store()` returns a session factory on a migrated database (Alembic
`upgrade head` runs at startup, so an upgrade keeps old runs). The functions that read
and change it are split by concern: `runs`, `stages`, `metrics`, `deployments`, `outbox`
(statuses in `models`, refusals in `errors`); callers never write SQL themselves.
"""

from runstore.db import open_store, upgrade_database
from runstore.settings import Settings

__all__ = ["Settings", "open_store", "upgrade_database"]
