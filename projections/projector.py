"""Apply events to the view tables, exactly once.

Each batch of notifications is applied in one database transaction together
with the projection's position row, so a crash anywhere leaves either the whole
batch applied and the position moved, or neither. Reading the position inside
that transaction (locked on PostgreSQL) means two catch-up runners cannot apply
the same notification twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Recording
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.engine import Engine

from events.ledger import Ledger
from projections import tables as t

log = logging.getLogger(__name__)

PROJECTION = "views"
#: How an install row's ``last_error`` starts while its node is lost.
NODE_LOST = "node lost: "

#: Public, dotted names of the events, as the audit log and the SDK show them.
EVENT_NAMES: dict[str, str] = {
    "EngineInstance.Registered": "engine.registered",
    "EngineInstance.ConfigUpdated": "engine.config.updated",
    "EngineInstance.Renamed": "engine.renamed",
    "EngineInstance.InstallRequested": "engine.install.requested",
    "EngineInstance.InstallCompleted": "engine.install.completed",
    "EngineInstance.InstallFailed": "engine.install.failed",
    "EngineInstance.Activated": "engine.activated",
    "EngineInstance.Deactivated": "engine.deactivated",
    "EngineInstance.Removed": "engine.removed",
    "NameClaim.Claimed": "name.claimed",
    "NameClaim.Reclaimed": "name.claimed",
    "NameClaim.Released": "name.released",
    "NodeInstall.Queued": "node.install.queued",
    "NodeInstall.Requeued": "node.install.queued",
    "NodeInstall.Started": "node.install.started",
    "NodeInstall.Progressed": "node.install.progressed",
    "NodeInstall.Succeeded": "node.install.succeeded",
    "NodeInstall.Failed": "node.install.failed",
    "Node.Joined": "node.joined",
    "Node.FactsUpdated": "node.facts.updated",
    "Node.Lost": "node.lost",
    "Node.Rejoined": "node.rejoined",
    "ModelRegistration.Registered": "model.registered",
    "ModelRegistration.Updated": "model.updated",
    "ModelRegistration.ArtifactStored": "model.artifact.stored",
    "ModelRegistration.Removed": "model.removed",
    "ModelRuntime.LoadRequested": "model.load.requested",
    "ModelRuntime.ReloadRequested": "model.load.requested",
    "ModelRuntime.Loaded": "model.loaded",
    "ModelRuntime.Restarted": "model.restarted",
    "ModelRuntime.LoadFailed": "model.load.failed",
    "ModelRuntime.Unloaded": "model.unloaded",
}

_POSITION = select(t.positions.c.position).where(t.positions.c.name == PROJECTION)
_POSITION_FOR_UPDATE = _POSITION.with_for_update()
_SET_POSITION = update(t.positions).where(t.positions.c.name == PROJECTION).values(
    position=bindparam("position"))

_ENVELOPE = {"originator_id", "originator_version", "originator_topic", "timestamp"}


def event_name(event: object) -> str:
    qualname = type(event).__qualname__
    return EVENT_NAMES.get(qualname, qualname)


def event_data(event: object) -> dict[str, Any]:
    return {k: v for k, v in vars(event).items() if k not in _ENVELOPE}


def _org(value: Any) -> str | None:
    return None if value is None else str(value)


class Projector:
    """Turns domain events into view rows. One instance per views database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # aggregate id -> owning row ids, filled as rows are created (and on demand).
        self._engine_rows: dict[str, int] = {}
        self._model_rows: dict[str, int] = {}
        self._install_keys: dict[str, tuple[int, str]] = {}
        self._runtime_keys: dict[str, tuple[int, int, str]] = {}
        self._inserts: dict[str, Any] = {}
        self._updates: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._audit_rows: list[dict[str, Any]] = []
        self._pending_stmt: Any = None
        self._pending_params: list[dict[str, Any]] = []
        self._handlers: dict[str, Callable[[Connection, Any, str], None]] = {
            "EngineInstance.Registered": self._engine_registered,
            "EngineInstance.ConfigUpdated": self._engine_config_updated,
            "EngineInstance.Renamed": self._engine_renamed,
            "EngineInstance.InstallRequested": self._engine_install_requested,
            "EngineInstance.InstallCompleted": self._engine_status("installed"),
            "EngineInstance.InstallFailed": self._engine_install_failed,
            "EngineInstance.Activated": self._engine_activated,
            "EngineInstance.Deactivated": self._engine_status("installed"),
            "EngineInstance.Removed": self._engine_status("removed"),
            "NodeInstall.Queued": self._install_queued,
            "NodeInstall.Requeued": self._install_requeued,
            "NodeInstall.Started": self._install_started,
            "NodeInstall.Progressed": self._install_progressed,
            "NodeInstall.Succeeded": self._install_succeeded,
            "NodeInstall.Failed": self._install_failed,
            "Node.Joined": self._node_joined,
            "Node.FactsUpdated": self._node_facts,
            "Node.Rejoined": self._node_rejoined,
            "Node.Lost": self._node_lost,
            "ModelRegistration.Registered": self._model_registered,
            "ModelRegistration.Updated": self._model_updated,
            "ModelRegistration.ArtifactStored": self._model_artifact,
            "ModelRegistration.Removed": self._model_removed,
            "ModelRuntime.LoadRequested": self._runtime_requested,
            "ModelRuntime.ReloadRequested": self._runtime_rerequested,
            "ModelRuntime.Loaded": self._runtime_loaded,
            "ModelRuntime.Restarted": self._runtime_restarted,
            "ModelRuntime.LoadFailed": self._runtime_failed,
            "ModelRuntime.Unloaded": self._runtime_unloaded,
        }

    # -- statements ------------------------------------------------------------------------
    # Statements are built once and executed with parameters: building SQLAlchemy
    # statements with literal values per event costs more than executing them.
    def _insert(self, conn: Connection, table: Any, values: dict[str, Any]) -> None:
        stmt = self._inserts.get(table.name)
        if stmt is None:
            stmt = self._inserts[table.name] = insert(table)
        self._queue(conn, stmt, values)

    def _update_where(self, conn: Connection, table: Any, agg: str,
                      values: dict[str, Any]) -> None:
        key = (table.name, tuple(sorted(values)))
        stmt = self._updates.get(key)
        if stmt is None:
            stmt = self._updates[key] = (
                update(table)
                .where(table.c.aggregate_id == bindparam("_agg"))
                .values({k: bindparam(k) for k in values})
            )
        self._queue(conn, stmt, {"_agg": agg, **values})

    def _queue(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> None:
        """Execute in order, batching runs of the same statement into one executemany."""
        if stmt is not self._pending_stmt:
            self._drain(conn)
            self._pending_stmt = stmt
        self._pending_params.append(params)

    def _reset_batch(self) -> None:
        self._audit_rows = []
        self._pending_stmt = None
        self._pending_params = []

    def _drain(self, conn: Connection) -> None:
        """Execute queued statements; called before anything reads the view tables."""
        if self._pending_params:
            conn.execute(self._pending_stmt, self._pending_params)
        self._pending_stmt = None
        self._pending_params = []

    # -- running ---------------------------------------------------------------------------
    def position(self) -> int:
        with self.engine.connect() as conn:
            return self._read_position(conn, lock=False)

    def _read_position(self, conn: Connection, *, lock: bool) -> int:
        locked = lock and conn.dialect.name == "postgresql"
        value = conn.execute(_POSITION_FOR_UPDATE if locked else _POSITION).scalar()
        if value is None:
            conn.execute(insert(t.positions).values(name=PROJECTION, position=0))
            return 0
        return int(value)

    def catch_up(self, ledger: Ledger, batch: int = 1000,
                 stop_after: int | None = None) -> int:
        """Apply every notification past the stored position; return how many were applied.

        ``stop_after`` (tests only) applies at most that many and then stops, as a crash would.
        """
        applied = 0
        while True:
            with self.engine.connect() as conn, \
                    conn.execution_options(sqlite_immediate=True).begin():
                start = self._read_position(conn, lock=True)
                notifications = ledger.notifications(after=start, limit=batch)
                if stop_after is not None:
                    notifications = notifications[: max(0, stop_after - applied)]
                if not notifications:
                    return applied
                self._reset_batch()
                for notification in notifications:
                    self.apply(conn, notification.id, ledger.mapper.to_domain_event(notification))
                self.flush(conn)
                conn.execute(_SET_POSITION, {"position": notifications[-1].id})
                applied += len(notifications)
            if len(notifications) < batch:
                return applied

    def apply_recorded(self, ledger: Ledger, recordings: Sequence[Recording[Any]]) -> int:
        """Project events this process just saved, without reading them back from the log.

        Falls back to ``catch_up`` when the log holds events the views have not seen
        before these (another writer, or a crash before the last projection).
        """
        if not recordings:
            return 0
        first = recordings[0].notification.id
        with self.engine.connect() as conn, \
                conn.execution_options(sqlite_immediate=True).begin():
            if self._read_position(conn, lock=True) == first - 1:
                self._reset_batch()
                for recording in recordings:
                    self.apply(conn, recording.notification.id, recording.domain_event)
                self.flush(conn)
                conn.execute(_SET_POSITION, {"position": recordings[-1].notification.id})
                return len(recordings)
        return self.catch_up(ledger)

    def flush(self, conn: Connection) -> None:
        """Write the audit rows collected by ``apply`` (one multi-row insert per batch)."""
        self._drain(conn)
        if self._audit_rows:
            conn.execute(insert(t.audit_log), self._audit_rows)
            self._audit_rows = []

    def apply(self, conn: Connection, position: int, event: DomainEventProtocol[Any]) -> None:
        """Apply one event to the view rows; its audit row is written by the next ``flush``."""
        qualname = type(event).__qualname__
        when = event.timestamp.isoformat()  # type: ignore[attr-defined]
        handler = self._handlers.get(qualname)
        if handler is not None:
            handler(conn, event, when)
        self._audit(conn, position, event, qualname, when)

    # -- audit -----------------------------------------------------------------------------
    def _audit(self, conn: Connection, position: int, event: Any, qualname: str,
               when: str) -> None:
        data = event_data(event)
        agg = str(event.originator_id)
        kind = qualname.split(".", 1)[0]
        engine_row = model_row = None
        node = data.get("node_id")
        if kind == "EngineInstance":
            engine_row = self._engine_row(conn, agg)
        elif kind == "ModelRegistration":
            model_row = self._model_row(conn, agg)
        elif kind == "NodeInstall":
            engine_row, node = self._install_key(conn, agg)
        elif kind == "ModelRuntime":
            engine_row, model_row, node = self._runtime_key(conn, agg)
        elif kind == "Node":
            node = data.get("node_id") or self._node_of(conn, agg)
        requested_by = data.get("requested_by") or {}
        self._audit_rows.append(dict(
                position=position,
                event_name=EVENT_NAMES.get(qualname, qualname),
                aggregate_id=agg,
                aggregate_version=event.originator_version,
                engine_row_id=engine_row,
                model_row_id=model_row,
                node_id=node,
                user_id=_org(requested_by.get("user_id")),
                organization_id=_org(requested_by.get("organization_id")),
                task_id=data.get("task_id"),
                timestamp=when,
                data=data,
            )
        )

    def _lookup(self, conn: Connection, cache: dict[str, Any], agg: str,
                query: Callable[[], Any]) -> Any:
        if agg not in cache:
            self._drain(conn)
            row = conn.execute(query()).first()
            if row is None:
                return None
            cache[agg] = tuple(row) if len(row) > 1 else row[0]
        return cache[agg]

    def _engine_row(self, conn: Connection, agg: str) -> int | None:
        def q() -> Any:
            return select(t.engines.c.row_id).where(t.engines.c.aggregate_id == agg)

        return self._lookup(conn, self._engine_rows, agg, q)

    def _model_row(self, conn: Connection, agg: str) -> int | None:
        def q() -> Any:
            return select(t.models.c.row_id).where(t.models.c.aggregate_id == agg)

        return self._lookup(conn, self._model_rows, agg, q)

    def _install_key(self, conn: Connection, agg: str) -> tuple[int | None, str | None]:
        def q() -> Any:
            c = t.node_installs.c
            return select(c.engine_row_id, c.node_id).where(c.aggregate_id == agg)

        return self._lookup(conn, self._install_keys, agg, q) or (None, None)

    def _runtime_key(self, conn: Connection, agg: str) -> tuple[Any, Any, Any]:
        def q() -> Any:
            c = t.runtimes.c
            return select(c.engine_row_id, c.model_row_id, c.node_id).where(
                c.aggregate_id == agg)

        return self._lookup(conn, self._runtime_keys, agg, q) or (None, None, None)

    def _node_of(self, conn: Connection, agg: str) -> str | None:
        self._drain(conn)
        return conn.execute(
            select(t.nodes.c.node_id).where(t.nodes.c.aggregate_id == agg)
        ).scalar()

    # -- engines ---------------------------------------------------------------------------
    def _engine_registered(self, conn: Connection, e: Any, when: str) -> None:
        agg = str(e.originator_id)
        self._insert(conn, t.engines, dict(
                row_id=e.row_id, aggregate_id=agg, provider=e.provider, name=e.name,
                config=e.config, organization_id=_org(e.organization_id),
                status="registered", supported=False, last_install_event_id=None,
                install_error="", created_at=when, updated_at=when,
                created_by=e.requested_by,
            )
        )
        self._engine_rows[agg] = e.row_id

    def _update_engine(self, conn: Connection, e: Any, when: str, **values: Any) -> None:
        self._update_where(conn, t.engines, str(e.originator_id),
                           {"updated_at": when, **values})

    def _engine_config_updated(self, conn: Connection, e: Any, when: str) -> None:
        self._update_engine(conn, e, when, config=e.config)

    def _engine_renamed(self, conn: Connection, e: Any, when: str) -> None:
        self._update_engine(conn, e, when, name=e.name)

    def _engine_install_requested(self, conn: Connection, e: Any, when: str) -> None:
        self._drain(conn)
        current = conn.execute(
            select(t.engines.c.status).where(t.engines.c.aggregate_id == str(e.originator_id))
        ).scalar()
        values: dict[str, Any] = {"last_install_event_id": e.event_id, "install_error": ""}
        if current != "active":
            values["status"] = "installing"
        self._update_engine(conn, e, when, **values)

    def _engine_install_failed(self, conn: Connection, e: Any, when: str) -> None:
        self._update_engine(conn, e, when, status="error", install_error=e.error)

    def _engine_activated(self, conn: Connection, e: Any, when: str) -> None:
        self._update_engine(conn, e, when, status="active", supported=True)

    def _engine_status(self, status: str) -> Callable[[Connection, Any, str], None]:
        def handle(conn: Connection, e: Any, when: str) -> None:
            self._update_engine(conn, e, when, status=status)

        return handle

    # -- node installs ---------------------------------------------------------------------
    def _install_queued(self, conn: Connection, e: Any, when: str) -> None:
        agg = str(e.originator_id)
        self._insert(conn, t.node_installs, dict(
                engine_row_id=e.engine_row_id, node_id=e.node_id, aggregate_id=agg,
                status="pending", last_event_id=e.request_event_id, last_error="",
                engine_version="", fraction=0.0, message="", plan=None, record=None,
                updated_at=when,
            )
        )
        self._install_keys[agg] = (e.engine_row_id, e.node_id)

    def _update_install(self, conn: Connection, e: Any, when: str, **values: Any) -> None:
        self._update_where(conn, t.node_installs, str(e.originator_id),
                           {"updated_at": when, **values})

    def _install_requeued(self, conn: Connection, e: Any, when: str) -> None:
        self._update_install(conn, e, when, status="pending", last_event_id=e.request_event_id,
                             last_error="", fraction=0.0, message="")

    def _install_started(self, conn: Connection, e: Any, when: str) -> None:
        self._update_install(conn, e, when, status="installing", plan=e.plan)

    def _install_progressed(self, conn: Connection, e: Any, when: str) -> None:
        self._update_install(conn, e, when, fraction=e.fraction, message=e.message)

    def _install_succeeded(self, conn: Connection, e: Any, when: str) -> None:
        self._update_install(conn, e, when, status="installed", engine_version=e.engine_version,
                             record=e.record, fraction=1.0, last_error="")

    def _install_failed(self, conn: Connection, e: Any, when: str) -> None:
        self._update_install(conn, e, when, status="error", last_error=e.error)

    # -- nodes -----------------------------------------------------------------------------
    def _node_joined(self, conn: Connection, e: Any, when: str) -> None:
        self._insert(conn, t.nodes, dict(
                node_id=e.node_id, aggregate_id=str(e.originator_id), alive=True,
                facts=e.facts, lost_reason="", joined_at=when, updated_at=when,
            )
        )

    def _update_node(self, conn: Connection, e: Any, when: str, **values: Any) -> None:
        self._update_where(conn, t.nodes, str(e.originator_id),
                           {"updated_at": when, **values})

    def _node_facts(self, conn: Connection, e: Any, when: str) -> None:
        self._update_node(conn, e, when, facts=e.facts)

    def _node_rejoined(self, conn: Connection, e: Any, when: str) -> None:
        self._update_node(conn, e, when, facts=e.facts, alive=True, lost_reason="",
                          joined_at=when)
        node = self._node_of(conn, str(e.originator_id))
        conn.execute(
            update(t.node_installs)
            .where(t.node_installs.c.node_id == node)
            .where(t.node_installs.c.last_error.startswith(NODE_LOST))
            .values(last_error="", updated_at=when)
        )

    def _node_lost(self, conn: Connection, e: Any, when: str) -> None:
        self._update_node(conn, e, when, alive=False, lost_reason=e.reason)
        node = self._node_of(conn, str(e.originator_id))
        # Every install row of the node says so (a failed install keeps its own error).
        self._drain(conn)
        conn.execute(
            update(t.node_installs)
            .where(t.node_installs.c.node_id == node)
            .where(t.node_installs.c.status != "error")
            .values(last_error=f"{NODE_LOST}{e.reason}", updated_at=when)
        )

    # -- models ----------------------------------------------------------------------------
    def _model_registered(self, conn: Connection, e: Any, when: str) -> None:
        agg = str(e.originator_id)
        self._insert(conn, t.models, dict(
                row_id=e.row_id, aggregate_id=agg, name=e.name, display_name=e.display_name,
                source=e.source, format=e.format, engine_kinds=e.engine_kinds, artifact=None,
                keep_alive_s=getattr(e, "keep_alive_s", None),
                removed=False, created_at=when, updated_at=when,
            )
        )
        self._model_rows[agg] = e.row_id

    def _update_model(self, conn: Connection, e: Any, when: str, **values: Any) -> None:
        self._update_where(conn, t.models, str(e.originator_id),
                           {"updated_at": when, **values})

    def _model_updated(self, conn: Connection, e: Any, when: str) -> None:
        self._update_model(conn, e, when, **e.fields)

    def _model_artifact(self, conn: Connection, e: Any, when: str) -> None:
        self._update_model(conn, e, when, artifact=e.artifact)

    def _model_removed(self, conn: Connection, e: Any, when: str) -> None:
        self._update_model(conn, e, when, removed=True)

    # -- runtimes --------------------------------------------------------------------------
    def _runtime_requested(self, conn: Connection, e: Any, when: str) -> None:
        agg = str(e.originator_id)
        self._insert(conn, t.runtimes, dict(
                aggregate_id=agg, engine_row_id=e.engine_row_id, model_row_id=e.model_row_id,
                node_id=e.node_id, status="loading", pid=None, model_path=None,
                memory_bytes=None, url=None, app_name=None, restarts=0, error="",
                unload_reason=None,
                requested_at=when, loaded_at=None, updated_at=when,
            )
        )
        self._runtime_keys[agg] = (e.engine_row_id, e.model_row_id, e.node_id)

    def _update_runtime(self, conn: Connection, e: Any, when: str, **values: Any) -> None:
        self._update_where(conn, t.runtimes, str(e.originator_id),
                           {"updated_at": when, **values})

    def _runtime_rerequested(self, conn: Connection, e: Any, when: str) -> None:
        self._update_runtime(conn, e, when, status="loading", pid=None, error="", restarts=0,
                             unload_reason=None, requested_at=when, loaded_at=None)

    def _runtime_loaded(self, conn: Connection, e: Any, when: str) -> None:
        self._update_runtime(conn, e, when, status="loaded", pid=e.pid, model_path=e.model_path,
                             memory_bytes=e.memory_bytes, url=e.url, app_name=e.app_name,
                             loaded_at=when)

    def _runtime_restarted(self, conn: Connection, e: Any, when: str) -> None:
        self._drain(conn)
        restarts = conn.execute(
            select(t.runtimes.c.restarts).where(t.runtimes.c.aggregate_id == str(e.originator_id))
        ).scalar() or 0
        self._update_runtime(conn, e, when, pid=e.pid, restarts=restarts + 1)

    def _runtime_failed(self, conn: Connection, e: Any, when: str) -> None:
        self._update_runtime(conn, e, when, status="failed", error=e.error)

    def _runtime_unloaded(self, conn: Connection, e: Any, when: str) -> None:
        self._update_runtime(conn, e, when, status="unloaded", unload_reason=e.reason, pid=None)
