"""Ledger benchmark: commands/s, projection lag and rebuild rate, on SQLite and PostgreSQL.

    python scripts/bench_ledger.py [--commands 3000] [--rebuild-events 100000]
                                   [--postgres-url postgresql://postgres@127.0.0.1:5432/test]

Every figure comes from the same run on this machine:
- commands/s: full control-plane commands (validate, load aggregate, save, project the
  new events before returning), one at a time;
- projection lag: from an event's creation (its timestamp) to the moment the command
  that made it returned with the event projected (read-your-writes);
- rebuild: empty the views and replay a log of the given size into them.
Targets (issue 2): ≥ 1,000 commands/s, lag p99 ≤ 20 ms, rebuild ≥ 20,000 events/s.
The PostgreSQL run uses ``--postgres-url`` or ROUNDHOUSE_TEST_POSTGRES_URL, in a scratch
schema that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from actors.control_plane import ControlPlane
from events.common import SYSTEM_ACTOR
from events.install import NodeInstall
from events.settings import Settings
from projections import tables as t
from projections.store import rebuild


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timestamps(plane: ControlPlane, positions: list[int]) -> dict[int, str]:
    with plane.views.connect() as conn:
        rows = conn.execute(select(t.audit_log.c.position, t.audit_log.c.timestamp)
                            .where(t.audit_log.c.position.in_(positions)))
        return {int(p): str(ts) for p, ts in rows}


def bench_commands(plane: ControlPlane, n: int) -> dict[str, float]:
    """Run n commands of each kind; return rates and lag percentiles (ms)."""
    plane.record_node_joined("bench-node", {"cpu_count": 2})
    results: dict[str, float] = {}
    lags: list[float] = []
    kinds: list[tuple[str, Callable[[int], object]]] = []
    engine = plane.create_engine("llamacpp", f"bench-{uuid.uuid4().hex[:6]}")
    request = plane.begin_install(engine["id"])["event"]["event_id"]
    plane.record_install_started(engine["id"], "bench-node", request)

    kinds.append(("create_engine", lambda i: plane.create_engine("llamacpp", f"c{i}")))
    kinds.append(("update_engine", lambda i: plane.update_engine(
        engine["id"], {"config": {"ctx_size": 512 + i}})))
    kinds.append(("install_progress", lambda i: plane.record_install_progress(
        engine["id"], "bench-node", request, (i % 1000) / 1000, f"step {i}")))

    for name, command in kinds:
        start = time.perf_counter()
        for i in range(n):
            command(i)
        elapsed = time.perf_counter() - start
        results[f"{name}_per_s"] = n / elapsed
        # Lag, in a separate pass so that reading positions does not slow the rate above.
        returned: list[tuple[float, int]] = []
        for i in range(n, n + min(n, 500)):
            command(i)
            returned.append((time.time(), plane.projector.position()))
        stamps = _timestamps(plane, [pos for _, pos in returned])
        for done_at, pos in returned:
            lags.append((done_at - datetime.fromisoformat(stamps[pos]).timestamp()) * 1000)
    results["lag_p50_ms"] = statistics.median(lags)
    results["lag_p99_ms"] = _pct(lags, 0.99)
    return results


def bench_rebuild(plane: ControlPlane, events: int) -> dict[str, float]:
    """Grow the log to ``events`` events (installs with progress), then time a rebuild."""
    per_install = 100
    missing = max(0, events - plane.ledger.last_position())
    batch: list[NodeInstall] = []
    made = 0
    while made < missing:
        install = NodeInstall(engine_row_id=10_000 + made, node_id="bench",
                              request_event_id=str(uuid.uuid4()), force=False,
                              requested_by=SYSTEM_ACTOR, task_id=None)
        install.start(install.request_event_id, {})
        for step in range(per_install - 2):
            install.progress(install.request_event_id, step / per_install, "")
        batch.append(install)
        made += len(install.pending_events)
        if len(batch) == 50:
            plane.ledger.save_all(*batch)
            batch = []
    if batch:
        plane.ledger.save_all(*batch)
    total = plane.ledger.last_position()
    start = time.perf_counter()
    applied = rebuild(plane.views, plane.ledger)
    elapsed = time.perf_counter() - start
    assert applied == total, (applied, total)
    return {"rebuild_events": float(total), "rebuild_events_per_s": total / elapsed}


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    dsn = (f"host={parsed.host} port={parsed.port or 5432} user={parsed.username} "
           f"dbname={parsed.database}" + (f" password={parsed.password}"
                                          if parsed.password else ""))
    schema = f"rh_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield parsed.update_query_dict({"schema": schema}).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def run(label: str, settings: Settings, commands: int, rebuild_events: int) -> None:
    plane = ControlPlane(settings, node_id="bench")
    try:
        figures = bench_commands(plane, commands)
        figures.update(bench_rebuild(plane, rebuild_events))
    finally:
        plane.close()
    print(f"\n== {label} ==")
    for name in ("create_engine", "update_engine", "install_progress"):
        rate = figures[f"{name}_per_s"]
        print(f"  {name:<18} {rate:9.0f} commands/s   ({rate / 1000:.2f}x the 1,000/s target)")
    print(f"  projection lag     p50 {figures['lag_p50_ms']:.2f} ms   "
          f"p99 {figures['lag_p99_ms']:.2f} ms   (p99 / 20 ms target = "
          f"{figures['lag_p99_ms'] / 20:.2f})")
    print(f"  rebuild            {figures['rebuild_events']:.0f} events at "
          f"{figures['rebuild_events_per_s']:.0f} events/s   "
          f"({figures['rebuild_events_per_s'] / 20000:.2f}x the 20,000/s target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=3000)
    parser.add_argument("--rebuild-events", type=int, default=100_000)
    parser.add_argument("--postgres-url", default=os.environ.get("ROUNDHOUSE_TEST_POSTGRES_URL"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        run("SQLite file (embedded default, synchronous=NORMAL)",
            Settings(home=Path(home)), args.commands, args.rebuild_events)
    if args.postgres_url:
        with postgres_schema(args.postgres_url) as url:
            run("PostgreSQL", Settings(home=Path(tempfile.gettempdir()), database_url=url),
                args.commands, args.rebuild_events)
    else:
        print("\n(PostgreSQL skipped: pass --postgres-url or set ROUNDHOUSE_TEST_POSTGRES_URL)")


if __name__ == "__main__":
    main()
