"""The control-plane actor: ``roundhouse-control`` in namespace ``roundhouse``.

One named, detached actor on the head node, restarted by Ray without limit. It
wraps ``ControlPlane`` (ledger + projections + providers) and is the single
writer of the event store: every SDK call arrives as ``call(method, args,
kwargs)``. After a restart Ray reruns the constructor, which reopens the store
and catches the projections up; nothing is rebuilt by hand.

Besides forwarding, it:

- watches the Ray cluster (every ``node_watch_interval_s``): starts a node agent
  on every alive node that has none, and records nodes that left as lost
  (their install rows say so) and removes their agents;
- after each command tells every agent to ``reconcile`` (not after the agents'
  own install reports, which would only echo);
- forwards every change ``(kind, detail)`` to subscribed actors
  (``subscribe(actor_name, namespace)`` → ``handle.notify.remote(kind, detail)``);
- answers the cluster-wide questions the SDK adds: ``check_ready`` (asks every
  agent), ``is_supported`` (from the facts each node reported) and
  ``sync_runtime`` (every agent reconciles now).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.control_plane import ControlPlane
from actors.errors import BadInput
from actors.handles import CONTROL_NAME, NAMESPACE, agent_handle, agent_name, unwrap
from actors.node_agent import NodeAgent
from actors.node_install import aggregate_ready, support_by_node
from events.settings import Settings

log = logging.getLogger("roundhouse.control")

#: Resource that only the head node has (Ray sets it on every head).
HEAD_RESOURCE = "node:__internal_head__"
#: ControlPlane methods that are not reachable through ``call``.
PRIVATE_METHODS = {"close", "add_listener"}
#: Methods of this actor reachable through ``call`` (the SDK's cluster-wide questions).
CLUSTER_METHODS = {"check_ready", "is_supported", "sync_runtime", "agents"}
#: Seconds to wait for the agents' answers to a cluster-wide question.
AGENT_TIMEOUT_S = 120.0


def start_agent(node_id: str, resources: dict[str, float]) -> ActorHandle:
    """The agent of ``node_id``, created (pinned to that node, detached, restarted
    without limit) unless it exists."""
    actor_class: Any = ray.remote(NodeAgent)
    return (
        actor_class
        .options(
            name=agent_name(node_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
            max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(node_id, resources)
    )


def start_control_plane(settings: Settings) -> ActorHandle:
    """The control-plane actor, created on the head node unless it exists (then
    ``settings`` are ignored: the running one keeps its store)."""
    actor_class: Any = ray.remote(ControlPlaneActor)
    return (
        actor_class
        .options(
            name=CONTROL_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
            resources={HEAD_RESOURCE: 0.001},
            max_concurrency=32,
        )
        .remote(settings)
    )


class ControlPlaneActor:
    """The actor class (made remote by ``start_control_plane``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = ray.get_runtime_context().get_node_id()
        self._cp_lock = threading.RLock()
        self.cp = ControlPlane(settings, node_id=self.node_id)
        self.cp.add_listener(self._on_change)
        self._agents: dict[str, ActorHandle] = {}
        self._subscribers: dict[tuple[str, str], ActorHandle] = {}
        self._load_subscribers()
        self._stopping = threading.Event()
        self._watch_lock = threading.Lock()
        self.watch_once()
        self._watcher = threading.Thread(target=self._watch, name="node-watch", daemon=True)
        self._watcher.start()

    # -- forwarding ---------------------------------------------------------------------
    def call(self, method: str, args: tuple[Any, ...] | list[Any] = (),
             kwargs: dict[str, Any] | None = None) -> Any:
        """Run ``ControlPlane.<method>(*args, **kwargs)`` (or one of ``CLUSTER_METHODS``)
        and return its result; its errors are raised unchanged."""
        if method in CLUSTER_METHODS:
            return getattr(self, method)(*args, **(kwargs or {}))
        target = getattr(self.cp, method, None) if isinstance(method, str) else None
        if (target is None or not callable(target) or method.startswith("_")
                or method in PRIVATE_METHODS):
            raise BadInput(f"the control plane has no method {method!r}; see cluster.client "
                           "for the SDK's methods")
        with self._cp_lock:
            return target(*args, **(kwargs or {}))

    def ping(self) -> dict[str, Any]:
        """``{node_id, pid, agents}``: proves the actor is up."""
        return {"node_id": self.node_id, "pid": os.getpid(), "agents": sorted(self._agents)}

    # -- notifications ------------------------------------------------------------------
    def _on_change(self, kind: str, detail: dict[str, Any]) -> None:
        if not kind.startswith("node.install."):
            for handle in list(self._agents.values()):
                handle.reconcile.remote()
        for key, handle in list(self._subscribers.items()):
            try:
                handle.notify.remote(kind, detail)
            except Exception:
                log.warning("subscriber %s/%s is gone; dropping it", key[1], key[0])
                self._subscribers.pop(key, None)
                self._save_subscribers()

    def subscribe(self, actor_name: str, namespace: str = NAMESPACE) -> bool:
        """Call ``notify(kind, detail)`` on the named actor after every change (kept
        across restarts of this actor). Refuses an actor that does not exist."""
        try:
            handle = ray.get_actor(actor_name, namespace=namespace)
        except ValueError:
            raise BadInput(f"no actor named {actor_name!r} in namespace {namespace!r}; "
                           "create it before subscribing") from None
        self._subscribers[(actor_name, namespace)] = handle
        self._save_subscribers()
        return True

    def unsubscribe(self, actor_name: str, namespace: str = NAMESPACE) -> bool:
        """Stop notifying the named actor; False when it was not subscribed."""
        found = self._subscribers.pop((actor_name, namespace), None) is not None
        self._save_subscribers()
        return found

    def _subscribers_file(self) -> Any:
        return self.settings.home / "control" / "subscribers.json"

    def _save_subscribers(self) -> None:
        path = self._subscribers_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sorted(self._subscribers)), encoding="utf-8")

    def _load_subscribers(self) -> None:
        try:
            names = json.loads(self._subscribers_file().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for name, namespace in names:
            try:
                self._subscribers[(name, namespace)] = ray.get_actor(name, namespace=namespace)
            except ValueError:
                log.info("subscriber %s/%s no longer exists", namespace, name)

    # -- the cluster watch --------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.wait(max(0.1, self.settings.node_watch_interval_s)):
            try:
                self.watch_once()
            except Exception:
                log.exception("node watch failed")

    def watch_once(self) -> dict[str, list[str]]:
        """Start agents on alive nodes that have none; record departed nodes as lost.
        Returns ``{started, lost}`` (node ids)."""
        with self._watch_lock:
            alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
            started, lost = [], []
            for node_id, node in alive.items():
                if node_id not in self._agents:
                    self._agents[node_id] = start_agent(node_id, dict(node.get("Resources", {})))
                    started.append(node_id)
            for node_id in [n for n in self._agents if n not in alive]:
                handle = self._agents.pop(node_id)
                try:
                    ray.kill(handle, no_restart=True)  # frees the name; its node is gone
                except Exception:
                    log.info("agent of lost node %s already gone", node_id)
            with self._cp_lock:
                recorded = [n["node_id"] for n in self.cp.list_nodes() if n["alive"]]
                for node_id in recorded:
                    if node_id not in alive:
                        self.cp.record_node_lost(node_id, "the node left the Ray cluster")
                        lost.append(node_id)
            return {"started": started, "lost": lost}

    def agents(self) -> list[str]:
        """Node ids that have an agent."""
        return sorted(self._agents)

    # -- cluster-wide questions ---------------------------------------------------------
    def _ask_agents(self, method: str, *args: Any) -> list[tuple[str, Any]]:
        handles = dict(self._agents)
        refs = {node_id: getattr(h, method).remote(*args) for node_id, h in handles.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=AGENT_TIMEOUT_S)
        done = set(ready)
        out: list[tuple[str, Any]] = []
        for node_id, ref in refs.items():
            if ref not in done:
                out.append((node_id, TimeoutError(f"no answer within {AGENT_TIMEOUT_S:.0f}s")))
                continue
            try:
                out.append((node_id, ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:
                out.append((node_id, unwrap(exc)))
            except ray.exceptions.RayError as exc:
                out.append((node_id, exc))
        return out

    def check_ready(self, engine_registry_id: Any) -> dict[str, Any]:
        """Readiness of an engine row on every node, by looking at each node's install:
        ``{engine_registry_id, engine_id, ready, nodes: [{node_id, ready, missing_*}]}``.
        A node whose agent does not answer counts as not ready, with the reason."""
        with self._cp_lock:
            engine = self.cp.get_engine(engine_registry_id)
        nodes: list[dict[str, Any]] = []
        for node_id, answer in self._ask_agents("check_ready", engine["id"]):
            if isinstance(answer, BaseException):
                nodes.append({"node_id": node_id, "ready": False, "missing_shared": [],
                              "missing_local": [{"dependency_key": "agent",
                                                 "label": "node agent",
                                                 "reason": f"the node agent did not answer: "
                                                           f"{_short(answer)}"}],
                              "engine_version": None})
            else:
                nodes.append(answer)
        nodes.sort(key=lambda n: n["node_id"])
        return aggregate_ready(engine, nodes)

    def is_supported(self, engine_registry_id: Any) -> dict[str, Any]:
        """Whether each alive node can run the row's provider (from reported facts)."""
        with self._cp_lock:
            engine = self.cp.get_engine(engine_registry_id)
            nodes = self.cp.list_nodes()
        return support_by_node(engine, nodes)

    def sync_runtime(self) -> dict[str, Any]:
        """Pick up new nodes, then make every agent reconcile now. Starts installs that
        are due; never loads a model. Returns ``{nodes: [{node_id, started, running}]}``."""
        self.watch_once()
        nodes: list[dict[str, Any]] = []
        for node_id, answer in self._ask_agents("reconcile"):
            if isinstance(answer, BaseException):
                nodes.append({"node_id": node_id, "error": _short(answer)})
            else:
                nodes.append(answer)
        return {"nodes": sorted(nodes, key=lambda n: n["node_id"])}

    def shutdown(self) -> dict[str, Any]:
        """Stop the watch and remove every agent (``roundhouse down``); the caller then
        kills this actor. The store is left as it is."""
        self._stopping.set()
        removed = []
        for node_id in list(self._agents):
            handle = self._agents.pop(node_id)
            try:
                ray.kill(handle, no_restart=True)
                removed.append(node_id)
            except Exception:
                log.info("agent of %s already gone", node_id)
        for node in ray.nodes():
            leftover = agent_handle(node["NodeID"]) if node.get("Alive") else None
            if leftover is not None:
                ray.kill(leftover, no_restart=True)
        with self._cp_lock:
            self.cp.close()
        return {"agents_removed": removed}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def wait_until_ready(handle: ActorHandle, timeout_s: float = 60.0) -> dict[str, Any]:
    """Block until the actor answers ``ping``; raise TimeoutError naming the actor."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return dict(ray.get(handle.ping.remote(),
                                timeout=max(1.0, deadline - time.monotonic())))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{CONTROL_NAME} did not start within {timeout_s:.0f}s: "
                                   f"{_short(exc)}; see its log with `ray logs`") from None
            time.sleep(0.2)
