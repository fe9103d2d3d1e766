"""The embedded store: eventsourcing's SQLite recorder with a chosen `synchronous` pragma.

eventsourcing opens SQLite files in WAL mode with SQLite's default
``synchronous=FULL``. In WAL mode ``NORMAL`` is still safe against a crash of
the process (only a power loss can drop the last commits) and roughly triples
write throughput, so the embedded default is NORMAL; ``ROUNDHOUSE_SQLITE_SYNCHRONOUS``
chooses.
"""

from __future__ import annotations

from eventsourcing.sqlite import (
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
    SQLiteFactory,
)
from eventsourcing.utils import Environment, EnvType

SYNCHRONOUS = "SQLITE_SYNCHRONOUS"
_ALLOWED = {"OFF", "NORMAL", "FULL", "EXTRA"}


class _Pool(SQLiteConnectionPool):
    synchronous = "NORMAL"

    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()
        connection._sqlite_conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return connection


class RoundhouseSQLiteFactory(SQLiteFactory):
    def __init__(self, env: Environment | EnvType | None):
        super().__init__(env)
        synchronous = (self.env.get(SYNCHRONOUS) or "NORMAL").upper()
        if synchronous not in _ALLOWED:
            raise OSError(
                f"ROUNDHOUSE_SQLITE_SYNCHRONOUS must be one of {sorted(_ALLOWED)}, "
                f"got {synchronous!r}"
            )
        old: SQLiteDatastore = self.datastore
        pool = _Pool(db_name=old.pool.db_name, lock_timeout=old.pool.lock_timeout)
        pool.synchronous = synchronous
        old.pool.close()
        old.pool = pool
