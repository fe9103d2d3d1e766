"""The node agent: one per alive Ray node, pinned to it, restarted by Ray without limit.

It reports its node's facts (``record_node_joined`` when it starts, again when
they change) and provisions engines, level-triggered: ``reconcile()`` asks the
control plane for ``desired_installs(node_id)`` — every engine whose latest
install request has no terminal row for this node — and runs each one that is
not already running here (see ``actors.node_install.run_install``). A missed
notification, a restart mid-install or a node that joins late all converge the
same way; a periodic resync is the safety net.

Created by the control-plane actor (``actors.control_actor``) as
``roundhouse-agent-<node id>`` in namespace ``roundhouse``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import ray

from actors.handles import call_control, control_plane_handle
from actors.node_install import check_ready_on, run_install
from engines.base import NodeFacts
from engines.installers import installed_record
from engines.node import Node, detect_node_facts
from engines.registry import get_provider
from events.settings import Settings

log = logging.getLogger("roundhouse.agent")

#: Volatile facts are rounded down to this many bytes, so that refreshing them records
#: an event only when something changed materially.
FACT_GRANULARITY = 1 << 30


def agent_settings(node_id: str, settings: Settings | None = None) -> Settings:
    """This node's settings (from its environment), with the engine root made per node
    when ``ROUNDHOUSE_ENGINE_ROOT_PER_NODE`` is set."""
    s = settings or Settings.from_env()
    if s.engine_root_per_node:
        s = s.model_copy(update={"engine_root": str(s.engine_root_path / node_id)})
    return s


def node_facts(node_id: str, settings: Settings) -> NodeFacts:
    """The facts an agent reports: detected hardware (GPUs with model and memory, CPUs,
    RAM, free disk under the engine root, OS, Python), volatile numbers rounded down."""
    root = settings.engine_root_path
    probe = root if root.exists() else (settings.home if settings.home.exists() else Path.cwd())
    facts = detect_node_facts(node_id, probe)
    update: dict[str, Any] = {
        "disk_free_bytes": facts.disk_free_bytes // FACT_GRANULARITY * FACT_GRANULARITY,
    }
    if facts.free_memory_bytes is not None:
        update["free_memory_bytes"] = (facts.free_memory_bytes // FACT_GRANULARITY
                                       * FACT_GRANULARITY)
    return facts.model_copy(update=update)


def facts_payload(facts: NodeFacts, ray_resources: dict[str, float] | None) -> dict[str, Any]:
    """The facts as stored in node events, with the node's Ray resources (``CPU``,
    ``GPU``, custom ones) under ``ray_resources`` so that placement can read them."""
    payload = facts.model_dump(mode="json")
    if ray_resources is not None:
        payload["ray_resources"] = ray_resources
    return payload


class NodeAgent:
    """The actor class (made remote by ``actors.control_actor.start_agent``).

    Methods: ``reconcile()``, ``check_ready(engine_registry_id)``, ``facts()``,
    ``install_records()``, ``info()``, ``stop()``.
    """

    def __init__(self, node_id: str, ray_resources: dict[str, float] | None = None) -> None:
        self.node_id = node_id
        self.settings = agent_settings(node_id)
        self.ray_resources = {k: v for k, v in (ray_resources or {}).items()
                              if not k.startswith("node:")}
        self._lock = threading.Lock()
        #: engine_registry_id -> request_event_id of the install running here.
        self._running: dict[int, str] = {}
        self._again = threading.Event()
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._loop = threading.Thread(target=self._run, name="agent-loop", daemon=True)
        self._loop.start()

    # -- plumbing ---------------------------------------------------------------------
    def _control(self, method: str, *args: Any) -> Any:
        return call_control(control_plane_handle(), method, *args)

    def _node(self) -> Node:
        return Node(facts=node_facts(self.node_id, self.settings), settings=self.settings)

    def _report_facts(self) -> bool:
        facts = node_facts(self.node_id, self.settings)
        return bool(self._control("record_node_joined", self.node_id,
                                  facts_payload(facts, self.ray_resources)))

    def _run(self) -> None:
        """Join, reconcile, then resync and refresh facts periodically until stopped."""
        while not self._stopping.is_set():
            try:
                self._report_facts()
                break
            except Exception:
                log.exception("agent %s could not report its facts; retrying", self.node_id)
                self._stopping.wait(1.0)
        self._joined.set()
        since_facts = 0.0
        interval = max(0.1, self.settings.node_resync_interval_s)
        while not self._stopping.is_set():
            try:
                self.reconcile()
            except Exception:
                log.exception("agent %s reconcile failed", self.node_id)
            woke = self._again.wait(interval)
            self._again.clear()
            if not woke:
                since_facts += interval
            if since_facts >= self.settings.node_facts_refresh_s:
                since_facts = 0.0
                try:
                    self._report_facts()
                except Exception:
                    log.exception("agent %s could not refresh its facts", self.node_id)

    # -- the actor's methods ----------------------------------------------------------
    def reconcile(self) -> dict[str, Any]:
        """Start every desired install not already running on this node; return
        ``{node_id, started, running}`` (engine ids). Returns at once: installs run in
        the background and report their own events."""
        self._joined.wait(30.0)
        desired = self._control("desired_installs", self.node_id)
        started = []
        for item in desired:
            rid = item["engine_registry_id"]
            with self._lock:
                if rid in self._running:
                    continue  # single flight per engine; a newer request runs after it
                self._running[rid] = item["request_event_id"]
            started.append(rid)
            threading.Thread(target=self._install, args=(item,), name=f"install-{rid}",
                             daemon=True).start()
        with self._lock:
            running = sorted(self._running)
        return {"node_id": self.node_id, "started": started, "running": running}

    def _install(self, item: dict[str, Any]) -> None:
        rid = item["engine_registry_id"]
        try:
            outcome = run_install(item, self._node(), self._control)
            log.info("engine %s on %s: %s", rid, self.node_id, outcome)
        except Exception:
            log.exception("install of engine %s on %s could not report", rid, self.node_id)
        finally:
            with self._lock:
                self._running.pop(rid, None)
            self._again.set()  # a request that arrived meanwhile is picked up now

    def check_ready(self, engine_registry_id: int) -> dict[str, Any]:
        """The provider's readiness check of the engine on this node, by looking at
        the installed engine: ``{node_id, ready, missing_shared, missing_local, ...}``."""
        engine = self._control("get_engine", engine_registry_id)
        return check_ready_on(self._node(), engine)

    def facts(self) -> dict[str, Any]:
        """This node's facts as reported (freshly detected)."""
        return facts_payload(node_facts(self.node_id, self.settings), self.ray_resources)

    def install_records(self) -> dict[int, dict[str, Any]]:
        """Install records on this node's disk, by engine row, for every engine whose
        current config is installed here (``engines.plan.InstallRecord`` payloads)."""
        node = self._node()
        out: dict[int, dict[str, Any]] = {}
        for engine in self._control("list_engines"):
            try:
                plan = get_provider(engine["provider"]).plan_install(
                    engine["config"], node, enforce_policy=False)
            except Exception:
                continue
            record = installed_record(plan)
            if record is not None:
                out[engine["id"]] = record.model_dump(mode="json")
        return out

    def info(self) -> dict[str, Any]:
        """``{node_id, pid, engine_root, running}``: who and where this agent is."""
        with self._lock:
            running = dict(self._running)
        return {"node_id": self.node_id, "pid": os.getpid(),
                "engine_root": str(self.settings.engine_root_path),
                "ray_node_id": ray.get_runtime_context().get_node_id(),
                "running": running}

    def stop(self) -> None:
        """Stop the background loop (before the actor is killed)."""
        self._stopping.set()
        self._again.set()
