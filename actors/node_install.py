"""One node's side of an install: plan it, run the provider's install, report events.

Plain Python and no Ray, so the node agent and the in-process SDK share it. The
reports go through ``report(method, *args)``, a callable that runs a
``ControlPlane`` method (in-process, or in the control-plane actor).

Reporting contract for one desired install (an item of
``ControlPlane.desired_installs``):

- ``record_install_started`` once, unless the row is already ``installing``
  (an agent that restarted mid-install carries on without a second start);
- ``record_install_progress`` on every stage change, and within a stage at most
  every ``PROGRESS_INTERVAL_S``;
- then exactly one of ``record_install_succeeded`` (with the install record)
  or ``record_install_failed`` (with the error's message).

A report the control plane refuses as stale (a newer request superseded this
one) ends the attempt quietly: the caller reconciles again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from actors.errors import Conflict, RoundhouseError
from engines.base import EngineProvider, NodeFacts
from engines.node import Node
from engines.plan import InstallProgress
from engines.registry import get_provider

log = logging.getLogger("roundhouse.agent")

#: Minimum seconds between two progress reports of the same stage.
PROGRESS_INTERVAL_S = 0.5

Report = Callable[..., Any]


class ProgressThrottle:
    """Turns the provider's progress callbacks into throttled progress reports."""

    def __init__(self, send: Callable[[float, str], None],
                 interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self._send = send
        self._interval = interval_s
        self._stage = ""
        self._last = 0.0
        self._fraction = 0.0
        self._lock = threading.Lock()

    def __call__(self, progress: InstallProgress) -> None:
        with self._lock:
            if progress.fraction is not None:
                self._fraction = max(self._fraction, float(progress.fraction))
            now = time.monotonic()
            if progress.stage == self._stage and now - self._last < self._interval:
                return
            self._stage, self._last = progress.stage, now
            fraction = self._fraction
        try:
            self._send(fraction, f"{progress.stage}: {progress.message}")
        except RoundhouseError as exc:  # superseded, settled or unreachable: the final
            log.info("progress report dropped: %s", exc)  # report decides


def run_install(item: dict[str, Any], node: Node, report: Report) -> str:
    """Carry out one desired install on ``node`` and report it; return the outcome
    (``installed``, ``error`` or ``superseded``). Never raises for install failures."""
    rid, node_id = item["engine_registry_id"], node.facts.node_id
    request = item["request_event_id"]
    provider: EngineProvider = get_provider(item["provider"])
    try:
        plan = provider.plan_install(item["config"], node)
    except Exception as exc:  # config, GPU or policy refusal: the row says why
        return _fail(report, rid, node_id, request, f"cannot plan the install: {exc}")
    if item.get("state") in (None, "pending"):
        try:
            report("record_install_started", rid, node_id, request, plan.model_dump(mode="json"))
        except Conflict as exc:
            log.info("install of engine %s on %s superseded: %s", rid, node_id, exc)
            return "superseded"

    def send(fraction: float, message: str) -> None:
        report("record_install_progress", rid, node_id, request, fraction, message)

    try:
        record = provider.install(plan, ProgressThrottle(send), force=bool(item.get("force")),
                                  settings=node.settings)
    except Exception as exc:
        return _fail(report, rid, node_id, request, str(exc) or type(exc).__name__)
    try:
        report("record_install_succeeded", rid, node_id, request, record.engine_version,
               record.model_dump(mode="json"))
    except Conflict as exc:
        log.info("success of engine %s on %s not recorded: %s", rid, node_id, exc)
        return "superseded"
    return "installed"


def _fail(report: Report, rid: int, node_id: str, request: str, error: str) -> str:
    try:
        report("record_install_failed", rid, node_id, request, error)
    except Conflict as exc:
        log.info("failure of engine %s on %s not recorded: %s", rid, node_id, exc)
        return "superseded"
    return "error"


def check_ready_on(node: Node, engine: dict[str, Any]) -> dict[str, Any]:
    """The provider's readiness check of ``engine`` (a registry row) on ``node``, as a
    payload ``{node_id, ready, missing_shared, missing_local, engine_version}``."""
    provider = get_provider(engine["provider"])
    report = provider.check_ready(node, engine["config"])
    return {"node_id": node.facts.node_id, **report.payload()}


def aggregate_ready(engine: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Readiness over nodes: ready when every node that answered is ready (and one did)."""
    return {
        "engine_registry_id": engine["id"],
        "engine_id": engine["provider"],
        "ready": bool(nodes) and all(n["ready"] for n in nodes),
        "nodes": nodes,
    }


def support_by_node(engine: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether each alive node (``list_nodes`` payloads) can run ``engine``'s provider,
    judged from the facts the node reported: ``{engine_registry_id, supported, nodes}``."""
    provider = get_provider(engine["provider"])
    out = []
    for n in nodes:
        if not n["alive"]:
            continue
        facts = NodeFacts.model_validate({**(n["facts"] or {}), "node_id": n["node_id"]})
        support = provider.is_supported(facts)
        out.append({"node_id": n["node_id"], "supported": support.supported,
                    "reason": support.reason})
    return {
        "engine_registry_id": engine["id"],
        "engine_id": engine["provider"],
        "supported": any(n["supported"] for n in out),
        "nodes": out,
    }
