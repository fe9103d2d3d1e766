"""The read-side tables. Every value in them is derived from events alone (never the clock),
so replaying the log rebuilds identical rows."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

#: Where each projection has got to in the notification log.
positions = Table(
    "rh_positions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
)

engines = Table(
    "rh_engines",
    metadata,
    Column("row_id", Integer, primary_key=True, autoincrement=False),
    Column("aggregate_id", String(36), nullable=False, unique=True),
    Column("provider", String(64), nullable=False),
    Column("name", String(255), nullable=False),
    Column("config", JSON, nullable=False),
    Column("organization_id", String(64)),
    Column("status", String(16), nullable=False),
    Column("supported", Boolean, nullable=False),
    Column("last_install_event_id", String(36)),
    Column("install_error", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    Column("created_by", JSON, nullable=False),
)

node_installs = Table(
    "rh_node_installs",
    metadata,
    Column("engine_row_id", Integer, primary_key=True, autoincrement=False),
    Column("node_id", String(128), primary_key=True),
    Column("aggregate_id", String(36), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("last_event_id", String(36), nullable=False),
    Column("last_error", Text, nullable=False),
    Column("engine_version", String(255), nullable=False),
    Column("fraction", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("plan", JSON),
    Column("record", JSON),
    Column("updated_at", String(40), nullable=False),
)

models = Table(
    "rh_models",
    metadata,
    Column("row_id", Integer, primary_key=True, autoincrement=False),
    Column("aggregate_id", String(36), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("display_name", String(255), nullable=False),
    Column("source", JSON, nullable=False),
    Column("format", String(32), nullable=False),
    Column("engine_kinds", JSON, nullable=False),
    Column("artifact", JSON),
    Column("keep_alive_s", Integer),
    Column("removed", Boolean, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

runtimes = Table(
    "rh_runtimes",
    metadata,
    Column("aggregate_id", String(36), primary_key=True),
    Column("engine_row_id", Integer, nullable=False),
    Column("model_row_id", Integer, nullable=False),
    Column("node_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("pid", Integer),
    Column("model_path", Text),
    Column("memory_bytes", Integer),
    Column("url", Text),
    Column("app_name", String(255)),
    Column("restarts", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("unload_reason", String(32)),
    Column("requested_at", String(40), nullable=False),
    Column("loaded_at", String(40)),
    Column("updated_at", String(40), nullable=False),
)
Index("rh_runtimes_engine", runtimes.c.engine_row_id, runtimes.c.model_row_id)

nodes = Table(
    "rh_nodes",
    metadata,
    Column("node_id", String(128), primary_key=True),
    Column("aggregate_id", String(36), nullable=False, unique=True),
    Column("alive", Boolean, nullable=False),
    Column("facts", JSON, nullable=False),
    Column("lost_reason", Text, nullable=False),
    Column("joined_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

#: One row per event: the audit trail, filterable by engine, model, node, user and time.
audit_log = Table(
    "rh_audit_log",
    metadata,
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("event_name", String(64), nullable=False),
    Column("aggregate_id", String(36), nullable=False),
    Column("aggregate_version", Integer, nullable=False),
    Column("engine_row_id", Integer),
    Column("model_row_id", Integer),
    Column("node_id", String(128)),
    Column("user_id", String(64)),
    Column("organization_id", String(64)),
    Column("task_id", String(128)),
    Column("timestamp", String(40), nullable=False),
    Column("data", JSON, nullable=False),
)
Index("rh_audit_engine", audit_log.c.engine_row_id)
Index("rh_audit_model", audit_log.c.model_row_id)
Index("rh_audit_user", audit_log.c.user_id)

VIEW_TABLES = [engines, node_installs, models, runtimes, nodes, audit_log]
