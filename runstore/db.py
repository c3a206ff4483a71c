"""Engine and session factory on a migrated SQLite database (WAL mode)."""

from __future__ import annotations

import fcntl
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        return Path(url[len(prefix):])
    return None


def make_engine(url: str) -> Engine:
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            # WAL lets the dashboard read while a worker writes metrics.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_database(url: str, revision: str = "head") -> None:
    """Run `alembic upgrade` programmatically. A file lock keeps two processes that start at
    once (dashboard and worker) from migrating the same file together."""
    import logging

    from alembic import command

    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per plugin at INFO otherwise
    path = _sqlite_path(url)
    cfg = alembic_config(url)
    if path is None:
        command.upgrade(cfg, revision)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            command.upgrade(cfg, revision)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


_FACTORIES: dict[str, sessionmaker[Session]] = {}


def open_store(url: str, migrate: bool = True) -> sessionmaker[Session]:
    """Session factory for `url`, migrated to head once per process."""
    if url not in _FACTORIES:
        if migrate:
            upgrade_database(url)
        _FACTORIES[url] = sessionmaker(make_engine(url), expire_on_commit=False)
    return _FACTORIES[url]
