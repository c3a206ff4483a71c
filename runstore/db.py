"""Engine and session factory on a migrated run store: SQLite (WAL mode, the embedded
default) or PostgreSQL (`SPEC_DB_URL=postgresql://...`, for installations with more than one
host). Both run the same models and the same Alembic migrations."""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from runstore.errors import StoreUnreachable

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# one number for every installation: pg_advisory_lock serialises two processes migrating at once
_MIGRATE_LOCK_KEY = 0x5EC0DB
T = TypeVar("T")
log = logging.getLogger(__name__)


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        return Path(url[len(prefix):])
    return None


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for a SPEC_DB_URL: `postgresql://` (and `postgres://`) use psycopg 3,
    the driver the `app` extra installs; any other URL is used as written."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def shown_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def make_engine(url: str) -> Engine:
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if is_postgres(url):
        # pre_ping: a connection the server dropped (restart, failover) is replaced, not handed out
        return create_engine(engine_url(url), pool_pre_ping=True, connect_args={"connect_timeout": 5})
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
    """Run `alembic upgrade` programmatically. Two processes that start at once (dashboard
    and worker, or workers on several hosts) never migrate together: a file lock beside a
    SQLite file, a PostgreSQL advisory lock held on the migrating connection."""
    from alembic import command

    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per plugin at INFO otherwise
    cfg = alembic_config(url)
    if is_postgres(url):
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATE_LOCK_KEY})
                conn.commit()
                try:
                    cfg.attributes["connection"] = conn  # env.py migrates on this connection
                    command.upgrade(cfg, revision)
                    conn.commit()
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATE_LOCK_KEY})
                    conn.commit()
        finally:
            engine.dispose()
        return
    path = _sqlite_path(url)
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


_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o")


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached (server down, refused, dropped; a
    SQLite file locked or not openable), as opposed to a statement the database refused.
    sqlite3 reports a missing table with the same class as a locked file, so its message decides."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    import sqlite3

    if isinstance(exc.orig, sqlite3.OperationalError):
        return any(word in str(exc.orig).lower() for word in _SQLITE_UNAVAILABLE)
    return True


def unreachable_message(url: str, exc: BaseException) -> str:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"the run store SPEC_DB_URL={shown_url(url)} is unreachable ({reason}); "
            "start the database or fix SPEC_DB_URL (this process retries until it answers)")


def check_reachable(url: str) -> None:
    """Connect once; StoreUnreachable (naming SPEC_DB_URL) when the database does not answer."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        if unreachable(exc):
            raise StoreUnreachable(unreachable_message(url, exc)) from exc
        raise
    finally:
        engine.dispose()


def backoff_delays(first_s: float = 1.0, max_s: float = 30.0):
    """1, 2, 4, ... seconds, capped at `max_s`, forever."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


def retry_unreachable(call: Callable[[], T], url: str, *, first_s: float = 1.0, max_s: float = 30.0,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, repeated with a growing pause (logged, naming SPEC_DB_URL) while the database
    cannot be reached; any other error propagates. A worker waits this way instead of failing
    the stage it runs, so nothing it was about to record is lost."""
    delays = backoff_delays(first_s, max_s)
    while True:
        try:
            return call()
        except StoreUnreachable as exc:
            message = str(exc)
        except Exception as exc:
            if not unreachable(exc):
                raise
            message = unreachable_message(url, exc)
        pause = next(delays)
        log.warning("%s; retrying in %.0f s", message, pause)
        sleep(pause)


_FACTORIES: dict[str, sessionmaker[Session]] = {}


def open_store(url: str, migrate: bool = True) -> sessionmaker[Session]:
    """Session factory for `url`, migrated to head once per process. A database that does not
    answer raises StoreUnreachable, whose message names SPEC_DB_URL."""
    if url not in _FACTORIES:
        if migrate:
            try:
                upgrade_database(url)
            except Exception as exc:
                if unreachable(exc):
                    raise StoreUnreachable(unreachable_message(url, exc)) from exc
                raise
        _FACTORIES[url] = sessionmaker(make_engine(url), expire_on_commit=False)
    return _FACTORIES[url]


def wait_for_store(url: str, *, migrate: bool = True, first_s: float = 1.0, max_s: float = 30.0,
                   sleep: Callable[[float], None] = time.sleep) -> sessionmaker[Session]:
    """`open_store`, waiting (with backoff, each wait logged) until the database answers."""
    return retry_unreachable(lambda: open_store(url, migrate=migrate), url, first_s=first_s, max_s=max_s,
                             sleep=sleep)
