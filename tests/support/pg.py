"""A PostgreSQL database for the run-store tests: one database per test session, named after
the session's process (`spec_test_<pid>`), created at the first use and dropped at the end,
and one fresh schema per test inside it (its URL's search_path), so tests never see each
other's rows and nobody else's data is touched.

The server is the one CI and these machines run (127.0.0.1:5432, trust auth), reached through
the maintenance database in SPEC_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test)."""

from __future__ import annotations

import itertools
import os
from urllib.parse import quote, urlsplit, urlunsplit

ADMIN_URL = os.environ.get("SPEC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _with_database(url: str, database: str, query: str = "") -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, query, ""))


class SessionDatabase:
    """`spec_test_<pid>` on the test server; `fresh_url()` gives each test its own schema."""

    def __init__(self, admin_url: str = ADMIN_URL) -> None:
        import psycopg

        self.admin_url = admin_url
        self.name = f"spec_test_{os.getpid()}"
        self._n = itertools.count()
        with psycopg.connect(admin_url, autocommit=True) as con:
            # a leftover of a crashed session with this very pid is ours to replace
            con.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            con.execute(f'CREATE DATABASE "{self.name}"')
        self.url = _with_database(admin_url, self.name)

    def fresh_url(self) -> str:
        import psycopg

        schema = f"t{next(self._n)}"
        with psycopg.connect(self.url, autocommit=True) as con:
            con.execute(f'CREATE SCHEMA "{schema}"')
        return _with_database(self.admin_url, self.name, "options=" + quote(f"-csearch_path={schema}"))

    def drop(self) -> None:
        import psycopg

        from runstore import db

        for url in [u for u in db._FACTORIES if self.name in u]:
            db._FACTORIES.pop(url).kw["bind"].dispose()
        with psycopg.connect(self.admin_url, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
