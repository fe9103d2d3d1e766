"""Query functions over the view tables, returning the SDK's payload shapes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from projections import tables as t


def _org_value(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def engine_payload(row: Any) -> dict[str, Any]:
    return {
        "id": row.row_id,
        "provider": row.provider,
        "name": row.name,
        "config": row.config,
        "organization_id": _org_value(row.organization_id),
        "status": row.status,
        "supported": row.supported,
        "last_install_event_id": row.last_install_event_id,
        "install_error": row.install_error,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


_ENGINE_BY_ID = select(t.engines).where(t.engines.c.row_id == bindparam("row_id"))


def engine_row(conn: Connection, row_id: int) -> Any | None:
    """The engine's view row, removed rows included; None if the id was never used."""
    return conn.execute(_ENGINE_BY_ID, {"row_id": row_id}).first()


def list_engines(conn: Connection, provider: str | None = None,
                 organization_id: int | str | None = None) -> list[dict[str, Any]]:
    query = select(t.engines).where(t.engines.c.status != "removed")
    if provider is not None:
        query = query.where(t.engines.c.provider == provider)
    if organization_id is not None:
        query = query.where(t.engines.c.organization_id == str(organization_id))
    return [engine_payload(r) for r in conn.execute(query.order_by(t.engines.c.row_id))]


def max_engine_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(t.engines.c.row_id))).scalar() or 0)


def max_model_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(t.models.c.row_id))).scalar() or 0)


def install_rows(conn: Connection, engine_row_id: int) -> list[Any]:
    """Install rows for one engine joined with whether their node is alive, by node id."""
    query = (
        select(t.node_installs, t.nodes.c.alive)
        .join(t.nodes, t.nodes.c.node_id == t.node_installs.c.node_id, isouter=True)
        .where(t.node_installs.c.engine_row_id == engine_row_id)
        .order_by(t.node_installs.c.node_id)
    )
    return list(conn.execute(query))


def install_node_payload(row: Any) -> dict[str, Any]:
    return {
        "node_id": row.node_id,
        "status": row.status,
        "last_event_id": row.last_event_id,
        "last_error": row.last_error,
        "engine_version": row.engine_version,
        "progress": row.fraction,
        "message": row.message,
        "alive": row.alive is not False,
        "updated_at": row.updated_at,
    }


def alive_nodes(conn: Connection) -> list[Any]:
    return list(conn.execute(
        select(t.nodes).where(t.nodes.c.alive.is_(True)).order_by(t.nodes.c.node_id)
    ))


def node_payload(row: Any) -> dict[str, Any]:
    return {
        "node_id": row.node_id,
        "alive": row.alive,
        "facts": row.facts,
        "lost_reason": row.lost_reason,
        "joined_at": row.joined_at,
        "updated_at": row.updated_at,
    }


def list_nodes(conn: Connection) -> list[dict[str, Any]]:
    return [node_payload(r) for r in conn.execute(select(t.nodes).order_by(t.nodes.c.node_id))]


def model_payload(row: Any) -> dict[str, Any]:
    return {
        "id": row.row_id,
        "name": row.name,
        "display_name": row.display_name,
        "source": row.source,
        "format": row.format,
        "engine_kinds": row.engine_kinds,
        "artifact": row.artifact,
        "keep_alive_s": row.keep_alive_s,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def model_row(conn: Connection, row_id: int) -> Any | None:
    return conn.execute(select(t.models).where(t.models.c.row_id == row_id)).first()


def model_by_name(conn: Connection, name: str) -> Any | None:
    return conn.execute(
        select(t.models).where(t.models.c.name == name).where(t.models.c.removed.is_(False))
    ).first()


def list_models(conn: Connection) -> list[dict[str, Any]]:
    query = select(t.models).where(t.models.c.removed.is_(False)).order_by(t.models.c.row_id)
    return [model_payload(r) for r in conn.execute(query)]


def runtime_rows(conn: Connection, engine_row_id: int | None = None,
                 statuses: tuple[str, ...] = ("loading", "loaded")) -> list[Any]:
    query = (
        select(t.runtimes, t.engines.c.provider, t.models.c.name.label("model_name"),
               t.models.c.display_name.label("model_display_name"))
        .join(t.engines, t.engines.c.row_id == t.runtimes.c.engine_row_id)
        .join(t.models, t.models.c.row_id == t.runtimes.c.model_row_id)
        .where(t.runtimes.c.status.in_(statuses))
        .order_by(t.runtimes.c.engine_row_id, t.runtimes.c.model_row_id, t.runtimes.c.node_id)
    )
    if engine_row_id is not None:
        query = query.where(t.runtimes.c.engine_row_id == engine_row_id)
    return list(conn.execute(query))


def latest_event(conn: Connection, engine_registry_id: int, event_name: str) -> Any | None:
    """The newest audit row of one event kind for one engine, or None."""
    a = t.audit_log
    return conn.execute(
        select(a).where(a.c.engine_row_id == engine_registry_id)
        .where(a.c.event_name == event_name).order_by(a.c.position.desc()).limit(1)
    ).first()


def audit_events(conn: Connection, *, engine_registry_id: int | None = None,
                 model_registry_id: int | None = None, user_id: int | str | None = None,
                 organization_id: int | str | None = None, node_id: str | None = None,
                 event_name: str | None = None, since: str | None = None,
                 until: str | None = None, after_position: int = 0,
                 limit: int = 1000) -> list[dict[str, Any]]:
    a = t.audit_log
    query = select(a).where(a.c.position > after_position)
    if engine_registry_id is not None:
        query = query.where(a.c.engine_row_id == engine_registry_id)
    if model_registry_id is not None:
        query = query.where(a.c.model_row_id == model_registry_id)
    if user_id is not None:
        query = query.where(a.c.user_id == str(user_id))
    if organization_id is not None:
        query = query.where(a.c.organization_id == str(organization_id))
    if node_id is not None:
        query = query.where(a.c.node_id == node_id)
    if event_name is not None:
        query = query.where(a.c.event_name == event_name)
    if since is not None:
        query = query.where(a.c.timestamp >= since)
    if until is not None:
        query = query.where(a.c.timestamp <= until)
    rows = conn.execute(query.order_by(a.c.position).limit(limit))
    return [
        {
            "position": r.position,
            "event_name": r.event_name,
            "aggregate_id": r.aggregate_id,
            "aggregate_version": r.aggregate_version,
            "engine_registry_id": r.engine_row_id,
            "model_registry_id": r.model_row_id,
            "node_id": r.node_id,
            "requested_by": r.data.get("requested_by"),
            "task_id": r.task_id,
            "timestamp": r.timestamp,
            "data": r.data,
        }
        for r in rows
    ]
