"""The Ledger: the event-store application every lifecycle change is saved through.

Persistence is chosen by environment, never by branches in domain code:
an embedded SQLite file in ``ROUNDHOUSE_HOME`` by default, PostgreSQL when
``ROUNDHOUSE_DATABASE_URL`` names one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

from eventsourcing.application import AggregateNotFoundError, Application, LRUCache
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, Notification, Recording
from sqlalchemy.engine import make_url

from events.engine import EngineInstance, NameClaim
from events.install import NodeInstall
from events.model import ModelRegistration, ModelRuntime
from events.node import Node
from events.settings import Settings

A = TypeVar("A", bound=Aggregate)


class StoreConfigError(ValueError):
    """ROUNDHOUSE_DATABASE_URL names something the ledger cannot use."""


class ConcurrentWrite(Exception):
    """Another writer saved the same aggregate first; retry the command."""


def persistence_env(settings: Settings) -> dict[str, str]:
    """The eventsourcing environment for the configured store."""
    if not settings.database_url:
        settings.home.mkdir(parents=True, exist_ok=True)
        return {
            "PERSISTENCE_MODULE": "events.sqlite_store:RoundhouseSQLiteFactory",
            "SQLITE_DBNAME": str(settings.home / "events.sqlite"),
            "SQLITE_SYNCHRONOUS": settings.sqlite_synchronous,
            "SQLITE_LOCK_TIMEOUT": "30",
        }
    try:
        url = make_url(settings.database_url)
    except Exception:
        raise StoreConfigError(
            f"ROUNDHOUSE_DATABASE_URL is not a database URL: {settings.database_url!r}; "
            "use postgresql://user@host:5432/dbname"
        ) from None
    if url.get_backend_name() != "postgresql":
        raise StoreConfigError(
            f"ROUNDHOUSE_DATABASE_URL must name a PostgreSQL database, got "
            f"{url.get_backend_name()!r}; leave it empty for the embedded SQLite store"
        )
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": url.database or "postgres",
        "POSTGRES_HOST": url.host or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_PASSWORD": url.password or "",
        "POSTGRES_SCHEMA": str(url.query.get("schema") or "public"),
        "POSTGRES_CONNECT_TIMEOUT": "10",
        "POSTGRES_POOL_SIZE": "5",
    }


class Ledger(Application[uuid.UUID]):
    """Saves aggregates and reads the notification log. Holds no views.

    Aggregates are cached in memory (fast-forwarded from the store on every get, so
    another writer's events are never missed) and snapshotted every 200 events, so
    that a long-lived aggregate (an install reporting progress) loads in constant time.
    """

    name = "roundhouse"
    snapshotting_intervals: ClassVar[dict[Any, int]] = {
        EngineInstance: 200, NodeInstall: 200, Node: 200, ModelRegistration: 200,
        ModelRuntime: 200, NameClaim: 200,
    }

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Environment given explicitly so unrelated process variables cannot steer it.
        super().__init__(env=persistence_env(settings))

    def construct_env(self, name: str, env: Any = None) -> Any:
        from eventsourcing.utils import Environment

        values = {
            "AGGREGATE_CACHE_MAXSIZE": "10000",
            "IS_SNAPSHOTTING_ENABLED": "y",
            # The writer hands out cached aggregates without copying them; a command
            # that fails after changing one calls forget_cached() (see ControlPlane).
            "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
        }
        values.update(env or {})
        return Environment(name, values)

    def load(self, aggregate_id: uuid.UUID, kind: type[A]) -> A | None:
        """The aggregate with this id, or None if it was never saved."""
        try:
            agg: Aggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        assert isinstance(agg, kind), f"{aggregate_id} is a {type(agg).__name__}"
        return agg

    def save_all(self, *aggregates: Aggregate) -> list[Recording[uuid.UUID]]:
        """Save in one transaction and return the recordings (events with their positions);
        raise ConcurrentWrite if another writer got there first."""
        try:
            return self.save(*aggregates)
        except IntegrityError as exc:
            self.forget_cached()
            raise ConcurrentWrite(str(exc)) from None

    def forget_cached(self) -> None:
        """Drop every cached aggregate (after a command failed half-way through)."""
        cache = self.repository.cache
        if isinstance(cache, LRUCache):
            self.repository.cache = LRUCache(maxsize=cache.maxsize)

    def notifications(self, after: int, limit: int = 1000) -> Sequence[Notification]:
        return self.recorder.select_notifications(
            start=after, limit=limit, inclusive_of_start=False
        )

    def last_position(self) -> int:
        return self.recorder.max_notification_id() or 0
