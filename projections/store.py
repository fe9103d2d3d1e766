"""Where the views live, and the operations on them as a whole: open, rebuild, verify.

Embedded default: ``views.sqlite`` beside the event store in ``ROUNDHOUSE_HOME``.
PostgreSQL: the same database as the events (tables prefixed ``rh_``; the schema
from the URL's ``?schema=`` when given).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, delete, event, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from events.ledger import Ledger
from events.settings import Settings
from projections import tables as t
from projections.projector import PROJECTION, Projector


def _sqlite_pragmas(engine: Engine, synchronous: str) -> None:
    """WAL and the chosen durability; and transactions we begin ourselves, so that a
    projection batch can take SQLite's write lock *before* reading its position."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()


def postgres_url(database_url: str) -> tuple[URL, str | None]:
    """The SQLAlchemy URL (psycopg 3 driver) and the schema named by ``?schema=``."""
    url = make_url(database_url)
    schema = url.query.get("schema") if url.query else None
    url = url.difference_update_query(["schema"])
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url, schema if isinstance(schema, str) else None


def open_views(settings: Settings) -> Engine:
    """An engine on the views database for these settings, with the tables created."""
    if settings.database_url:
        url, schema = postgres_url(settings.database_url)
        engine = create_engine(url, pool_recycle=3600)

        @event.listens_for(engine, "connect")
        def _async_commit(dbapi_conn: Any, _record: Any) -> None:
            # Views are rebuildable from the (durable) log, and a view batch commits
            # atomically with its position: losing the last few batches in a server
            # crash only means replaying them. So view commits need not wait for fsync.
            with dbapi_conn.cursor() as cur:
                cur.execute("SET synchronous_commit TO off")
            dbapi_conn.commit()

        if schema:
            engine = engine.execution_options(schema_translate_map={None: schema})
    else:
        settings.home.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{settings.home / 'views.sqlite'}")
        _sqlite_pragmas(engine, settings.sqlite_synchronous)
    t.metadata.create_all(engine)
    return engine


def scratch_views() -> Engine:
    """An empty in-memory views database (for verify)."""
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    t.metadata.create_all(engine)
    return engine


def rebuild(engine: Engine, ledger: Ledger) -> int:
    """Empty every view table and replay the whole log into them; return events applied."""
    with engine.begin() as conn:
        for table in reversed(t.VIEW_TABLES):
            conn.execute(delete(table))
        conn.execute(delete(t.positions).where(t.positions.c.name == PROJECTION))
    return Projector(engine).catch_up(ledger, batch=5000)


def _rows(engine: Engine, table: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = [c.name for c in table.primary_key.columns]
    with engine.connect() as conn:
        result = conn.execute(select(table))
        rows = {}
        for row in result.mappings():
            data = dict(row)
            rows[tuple(data[k] for k in keys)] = data
    return rows


def diff_views(live: Engine, expected: Engine) -> list[dict[str, Any]]:
    """Every difference between two views databases, row by row and column by column."""
    differences: list[dict[str, Any]] = []
    for table in t.VIEW_TABLES:
        have, want = _rows(live, table), _rows(expected, table)
        for key in sorted(set(have) | set(want), key=repr):
            if key not in have:
                differences.append({"table": table.name, "key": list(key), "problem": "missing",
                                    "expected": want[key]})
            elif key not in want:
                differences.append({"table": table.name, "key": list(key), "problem": "extra",
                                    "live": have[key]})
            else:
                for column, value in want[key].items():
                    if have[key][column] != value:
                        differences.append({
                            "table": table.name, "key": list(key), "problem": "differs",
                            "column": column, "live": have[key][column], "expected": value,
                        })
    return differences


def verify(live: Engine, ledger: Ledger) -> dict[str, Any]:
    """Rebuild the views from the log into a scratch database and diff them with the live ones.

    Returns ``{events, tables: {name: rows}, differences: [...]}``; an empty
    ``differences`` list means the live views are exactly what the log implies.
    The live views are caught up first, so events saved but not yet projected
    do not count as differences.
    """
    Projector(live).catch_up(ledger)
    scratch = scratch_views()
    events = Projector(scratch).catch_up(ledger, batch=5000)
    differences = diff_views(live, scratch)
    tables = {table.name: len(_rows(scratch, table)) for table in t.VIEW_TABLES}
    scratch.dispose()
    return {"events": events, "tables": tables, "differences": differences}
