"""Engine commands of the control plane: the registry, installs, nodes, activation and
the providers' facts."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from eventsourcing.domain import Aggregate

from actors.control_core import (
    ControlCore,
    _check_int_id,
    _check_json_object,
    _check_name,
)
from actors.errors import BadInput, Conflict, DuplicateName, LifecycleFieldRefused, NotFound
from engines.base import ConfigError, EngineProvider, NodeFacts
from engines.registry import list_providers
from events.common import (
    SYSTEM_ACTOR,
    DomainError,
    node_id_of,
    node_install_id,
)
from events.engine import EngineInstance, EngineStatus
from events.install import InstallState, NodeInstall, aggregate_install_status
from events.ledger import ConcurrentWrite
from events.node import Node
from projections import views

log = logging.getLogger(__name__)

#: Fields of an engine row that `engine_registry.update` may change.
CONFIG_FIELDS = {"name", "config"}
#: Lifecycle fields, and the method that owns each.
LIFECYCLE_FIELDS = {
    "status": "sdk.engines.begin_install / activate_instance / deactivate_instance",
    "supported": "sdk.engines.activation_requirements (it is derived from the nodes)",
    "install_status": "sdk.engines.begin_install",
    "install_error": "sdk.engines.begin_install",
    "last_install_event_id": "sdk.engines.begin_install",
    "active": "sdk.engines.activate_instance / deactivate_instance",
    "provider": "engine_registry.create (a row's provider never changes; create a new row)",
    "id": "nothing (ids are allocated by the registry)",
}


class EngineCommands(ControlCore):
    # -- engine registry ---------------------------------------------------------------------
    def create_engine(self, provider: Any, name: Any, config: Any = None,
                      requested_by: Mapping[str, Any] | None = None,
                      organization_id: int | str | None = None,
                      task_id: str | None = None) -> dict[str, Any]:
        """Register a configured engine row; return it with its integer ``id``."""
        with self._command():
            prov = self._provider(provider)
            name = _check_name(name, "name")
            cfg = _check_json_object(config, "config")
            try:
                prov.parse_config(cfg)
            except ConfigError as exc:
                raise BadInput(str(exc)) from None
            who = self._who(requested_by)
            org = organization_id if organization_id is not None else who["organization_id"]

            def next_id() -> int:
                with self.views.connect() as conn:
                    return views.max_engine_id(conn) + 1

            row_id = self._create_with_new_id(
                "engine", name, next_id,
                lambda rid: EngineInstance(row_id=rid, provider=prov.id, name=name, config=cfg,
                                           organization_id=org, requested_by=who,
                                           task_id=task_id),
                who,
            )
            self._notify("engine.registered", {"engine_registry_id": row_id})
            return self._engine_payload(row_id)

    def get_engine(self, row_id: Any) -> dict[str, Any]:
        rid = _check_int_id(row_id, "engine_registry_id")
        with self.views.connect() as conn:
            row = views.engine_row(conn, rid)
        if row is None or row.status == EngineStatus.REMOVED:
            raise NotFound(f"engine registry row {rid} does not exist; list rows with "
                           "sdk.models.engine_registry.list()")
        return views.engine_payload(row)

    def list_engines(self, provider: str | None = None,
                     organization_id: int | str | None = None) -> list[dict[str, Any]]:
        with self.views.connect() as conn:
            return views.list_engines(conn, provider, organization_id)

    def update_engine(self, row_id: Any, fields: Mapping[str, Any],
                      requested_by: Mapping[str, Any] | None = None,
                      task_id: str | None = None) -> dict[str, Any]:
        """Change configuration fields (``name``, ``config``); lifecycle fields are refused."""
        with self._command():
            lifecycle = sorted(set(fields) & set(LIFECYCLE_FIELDS))
            if lifecycle:
                hints = "; ".join(f"{f}: use {LIFECYCLE_FIELDS[f]}" for f in lifecycle)
                raise LifecycleFieldRefused(
                    "engine_registry.update changes configuration fields only "
                    f"({', '.join(sorted(CONFIG_FIELDS))}); "
                    f"refused {', '.join(lifecycle)} — {hints}"
                )
            unknown = sorted(set(fields) - CONFIG_FIELDS)
            if unknown:
                raise BadInput(f"unknown engine fields {unknown}; updatable fields are "
                               f"{sorted(CONFIG_FIELDS)}")
            engine = self._engine(row_id)
            who = self._who(requested_by)
            changed: list[Aggregate] = [engine]
            if "config" in fields:
                cfg = _check_json_object(fields["config"], "config")
                try:
                    self._provider(engine.provider).parse_config(cfg)
                except ConfigError as exc:
                    raise BadInput(str(exc)) from None
                engine.update_config(cfg, who, task_id)
            if "name" in fields:
                new_name = _check_name(fields["name"], "name")
                if new_name != engine.name:
                    changed.append(self._claim("engine", new_name, engine.row_id, who))
                    changed.append(self._release("engine", engine.name, who))
                    engine.rename(new_name, who, task_id)
            if engine.pending_events:
                try:
                    self._save(*changed)
                except ConcurrentWrite:
                    raise DuplicateName(f"engine name {fields.get('name')!r} was just taken; "
                                        "choose another name") from None
                self._notify("engine.updated", {"engine_registry_id": engine.row_id})
            return self._engine_payload(engine.row_id)

    def delete_engine(self, row_id: Any, requested_by: Mapping[str, Any] | None = None,
                      task_id: str | None = None) -> dict[str, Any]:
        """Remove a row (its name becomes free). An active row must be deactivated first."""
        with self._command():
            engine = self._engine(row_id)
            if engine.status is EngineStatus.ACTIVE:
                raise Conflict(f"engine {engine.row_id} is active; deactivate it with "
                               "sdk.engines.deactivate_instance before deleting it")
            who = self._who(requested_by)
            engine.remove(who, task_id)
            self._save(engine, self._release("engine", engine.name, who))
            self._notify("engine.removed", {"engine_registry_id": engine.row_id})
            return {"status": "ok", "id": engine.row_id, "deleted": True}

    # -- installs ----------------------------------------------------------------------------
    def begin_install(self, engine_registry_id: Any, force: bool = False,
                      requested_by: Mapping[str, Any] | None = None,
                      task_id: str | None = None) -> dict[str, Any]:
        """Publish an install request for a configured row; return it with the install status."""
        with self._command():
            event = self._request_install(self._engine(engine_registry_id), force,
                                          requested_by, task_id)
            rid = event["engine_registry_id"]
            return {
                "engine_registry_id": rid,
                "provider": event["engine_id"],
                "event": event,
                "status": self.install_status(rid),
            }

    def request_install(self, engine_id: Any, force: bool = False,
                        requested_by: Mapping[str, Any] | None = None,
                        task_id: str | None = None) -> dict[str, Any]:
        """Publish an install request at provider level and return the event payload.

        ``engine_id`` is a provider id (``"llamacpp"``): every configured row of
        that provider gets the request (their ids are in ``engine_registry_ids``).
        """
        with self._command():
            prov = self._provider(engine_id)
            rows = self.list_engines(provider=prov.id)
            if not rows:
                raise NotFound(
                    f"no engine of provider {prov.id!r} is configured; create one with "
                    f"sdk.models.engine_registry.create(provider={prov.id!r}, name=..., config=...)"
                )
            events = [self._request_install(self._engine(r["id"]), force, requested_by, task_id)
                      for r in rows]
            first = dict(events[0])
            first["engine_registry_ids"] = [e["engine_registry_id"] for e in events]
            return first

    def _request_install(self, engine: EngineInstance, force: Any,
                         requested_by: Mapping[str, Any] | None,
                         task_id: str | None) -> dict[str, Any]:
        if not isinstance(force, bool):
            raise BadInput(f"force must be true or false, got {force!r}")
        if task_id is not None and not isinstance(task_id, str):
            raise BadInput(f"task_id must be a string, got {task_id!r}")
        who = self._who(requested_by)
        prov = self._provider(engine.provider)
        manifest = prov.manifest()
        try:
            version = getattr(prov.parse_config(engine.config), "version", None)
        except ConfigError:
            version = None
        event_id = str(uuid.uuid4())
        engine.request_install(
            event_id=event_id, force=force, manifest_version=manifest["manifest_version"],
            engine_version=version or manifest["engine_version"],
            source_node_id=self.source_node_id, requested_by=who, task_id=task_id,
        )
        with self.views.connect() as conn:
            nodes = [r.node_id for r in views.alive_nodes(conn)]
        installs = [self._queue_install(engine.row_id, node, event_id, force, who, task_id)
                    for node in nodes]
        self._save(engine, *[i for i in installs if i.pending_events])
        payload = self.install_event(engine.row_id)
        self._notify("engine.install.requested", payload)
        return payload

    def install_event(self, engine_registry_id: Any) -> dict[str, Any]:
        """The latest ``engine.install.requested`` event of a row, as a payload."""
        rid = _check_int_id(engine_registry_id, "engine_registry_id")
        with self.views.connect() as conn:
            last = views.latest_event(conn, rid, "engine.install.requested")
        if last is None:
            raise NotFound(f"engine {rid} has no install request; start one with "
                           "sdk.engines.begin_install")
        data = last.data
        return {
            "event_id": data["event_id"],
            "event_name": "engine.install.requested",
            "engine_id": self.get_engine(rid)["provider"],
            "engine_registry_id": rid,
            "manifest_version": data["manifest_version"],
            "engine_version": data["engine_version"],
            "force": data["force"],
            "source_node_id": data["source_node_id"],
            "requested_by": data["requested_by"],
            "requested_at": last.timestamp,
            "task_id": data["task_id"],
        }

    def _queue_install(self, engine_row_id: int, node: str, event_id: str, force: bool,
                       requested_by: dict[str, Any], task_id: str | None) -> NodeInstall:
        install = self.ledger.load(node_install_id(engine_row_id, node), NodeInstall)
        if install is None:
            return NodeInstall(engine_row_id=engine_row_id, node_id=node,
                               request_event_id=event_id, force=force,
                               requested_by=requested_by, task_id=task_id)
        install.queue(event_id, force, requested_by, task_id)
        return install

    def install_status(self, engine_registry_id: Any) -> dict[str, Any]:
        """Per-node install rows and their aggregate (see ``aggregate_install_status``).

        Rows of lost nodes are listed (their ``last_error`` says so) but do not
        count in ``status`` or ``summary``.
        """
        engine = self.get_engine(engine_registry_id)
        with self.views.connect() as conn:
            rows = views.install_rows(conn, engine["id"])
            alive = views.alive_nodes(conn)
        counted = [r.status for r in rows if r.alive is not False]
        summary = {s.value: counted.count(s.value) for s in InstallState}
        return {
            "engine_id": engine["provider"],
            "engine_registry_id": engine["id"],
            "status": aggregate_install_status(counted),
            "supported": self._supported(self._provider(engine["provider"]), alive)[0],
            "nodes": [views.install_node_payload(r) for r in rows],
            "summary": summary,
        }

    def _install_for_report(self, engine_registry_id: Any, node_id: str,
                            request_event_id: str) -> tuple[EngineInstance, NodeInstall]:
        engine = self._engine(engine_registry_id)
        if not isinstance(node_id, str) or not node_id:
            raise BadInput(f"node_id must be a non-empty string, got {node_id!r}")
        install = self.ledger.load(node_install_id(engine.row_id, node_id), NodeInstall)
        if install is None:
            if request_event_id != engine.last_install_event_id:
                raise Conflict(f"install request {request_event_id} is not the latest for "
                               f"engine {engine.row_id}; reconcile against "
                               f"{engine.last_install_event_id}")
            install = NodeInstall(engine_row_id=engine.row_id, node_id=node_id,
                                  request_event_id=request_event_id, force=False,
                                  requested_by=SYSTEM_ACTOR, task_id=None)
        return engine, install

    def _report(self, engine: EngineInstance, install: NodeInstall, kind: str) -> None:
        """Save a node's report and settle the engine's lifecycle in the same transaction."""
        if not install.pending_events:
            return
        if install.state not in (InstallState.INSTALLED, InstallState.ERROR):
            self._save(install)
            self._notify(kind, {"engine_registry_id": engine.row_id, "node_id": install.node_id})
            return
        with self.views.connect() as conn:
            rows = views.install_rows(conn, engine.row_id)
        states = [
            (install.state.value if r.node_id == install.node_id else r.status)
            for r in rows if r.alive is not False
        ]
        if install.node_id not in {r.node_id for r in rows}:
            states.append(install.state.value)
        settled = aggregate_install_status(states)
        request = engine.last_install_event_id or ""
        if engine.status is EngineStatus.INSTALLING and install.request_event_id == request:
            if settled == InstallState.INSTALLED:
                engine.complete_install(request, install.agent, install.task_id)
            elif settled == InstallState.ERROR:
                engine.fail_install(request, f"node {install.node_id}: {install.last_error}",
                                    install.agent, install.task_id)
        self._save(install, engine)
        self._notify(kind, {"engine_registry_id": engine.row_id, "node_id": install.node_id})

    def record_install_started(self, engine_registry_id: Any, node_id: str,
                               request_event_id: str,
                               plan: Mapping[str, Any] | None = None) -> None:
        with self._command():
            engine, install = self._install_for_report(engine_registry_id, node_id,
                                                       request_event_id)
            try:
                install.start(request_event_id, _check_json_object(plan, "plan"))
            except DomainError as exc:
                raise Conflict(str(exc)) from None
            self._report(engine, install, "node.install.started")

    def record_install_progress(self, engine_registry_id: Any, node_id: str,
                                request_event_id: str, fraction: float,
                                message: str = "") -> None:
        with self._command():
            engine, install = self._install_for_report(engine_registry_id, node_id,
                                                       request_event_id)
            try:
                install.progress(request_event_id, float(fraction), str(message))
            except DomainError as exc:
                raise Conflict(str(exc)) from None
            self._report(engine, install, "node.install.progressed")

    def record_install_succeeded(self, engine_registry_id: Any, node_id: str,
                                 request_event_id: str, engine_version: str,
                                 record: Mapping[str, Any] | None = None) -> None:
        with self._command():
            engine, install = self._install_for_report(engine_registry_id, node_id,
                                                       request_event_id)
            try:
                install.succeed(request_event_id, str(engine_version),
                                _check_json_object(record, "record"))
            except DomainError as exc:
                raise Conflict(str(exc)) from None
            self._report(engine, install, "node.install.succeeded")

    def record_install_failed(self, engine_registry_id: Any, node_id: str,
                              request_event_id: str, error: str) -> None:
        with self._command():
            engine, install = self._install_for_report(engine_registry_id, node_id,
                                                       request_event_id)
            try:
                install.fail(request_event_id, str(error) or "install failed")
            except DomainError as exc:
                raise Conflict(str(exc)) from None
            self._report(engine, install, "node.install.failed")

    def installed_nodes(self, engine_registry_id: Any) -> list[dict[str, Any]]:
        """Alive nodes where the row's latest install succeeded, with the install record
        (install dir, engine python/bin) and the node's facts: where a runtime may go."""
        engine = self.get_engine(engine_registry_id)
        with self.views.connect() as conn:
            rows = views.install_rows(conn, engine["id"])
            facts = {n.node_id: n.facts for n in views.alive_nodes(conn)}
        return [
            {"node_id": r.node_id, "engine_version": r.engine_version, "record": r.record or {},
             "facts": facts[r.node_id]}
            for r in rows
            if r.status == InstallState.INSTALLED and r.node_id in facts
            and r.last_event_id == engine["last_install_event_id"]
        ]

    def desired_installs(self, node_id: str) -> list[dict[str, Any]]:
        """What a node agent should install: each live engine's latest request lacking a
        terminal row for this node (level-triggered reconcile input)."""
        out = []
        for engine in self.list_engines():
            request = engine["last_install_event_id"]
            if not request:
                continue
            install = self.ledger.load(node_install_id(engine["id"], node_id), NodeInstall)
            if install is not None and install.request_event_id == request and install.state in (
                InstallState.INSTALLED, InstallState.ERROR
            ):
                continue
            out.append({
                "engine_registry_id": engine["id"],
                "provider": engine["provider"],
                "config": engine["config"],
                "request_event_id": request,
                "force": bool(install.force) if install is not None else False,
                "state": install.state.value if install is not None else None,
            })
        return out

    # -- nodes -------------------------------------------------------------------------------
    def record_node_joined(self, node_id: str, facts: Mapping[str, Any] | None = None) -> bool:
        """Record that a node is alive with these facts; queue it for every engine's latest
        install request. Returns True if anything was recorded."""
        with self._command():
            if not isinstance(node_id, str) or not node_id:
                raise BadInput(f"node_id must be a non-empty string, got {node_id!r}")
            clean = _check_json_object(facts, "facts")
            clean.setdefault("node_id", node_id)
            try:
                NodeFacts.model_validate(clean)
            except ValueError as exc:
                raise BadInput(f"node facts are malformed: {exc}") from None
            node = self.ledger.load(node_id_of(node_id), Node)
            changed: list[Aggregate] = []
            arriving = node is None or not node.alive
            if node is None:
                node = Node(node_id=node_id, facts=clean,
                            requested_by={**SYSTEM_ACTOR, "actor": f"node:{node_id}"})
            elif not node.alive:
                node.rejoin(clean)
            else:
                node.update_facts(clean)
            if node.pending_events:
                changed.append(node)
            if arriving:
                for engine in self.list_engines():
                    request = engine["last_install_event_id"]
                    if request:
                        # The late node answers the same request, on behalf of who made it.
                        asked = self.install_event(engine["id"])
                        install = self._queue_install(engine["id"], node_id, request,
                                                      asked["force"], asked["requested_by"],
                                                      asked["task_id"])
                        if install.pending_events:
                            changed.append(install)
            if not changed:
                return False
            self._save(*changed)
            self._notify("node.joined", {"node_id": node_id})
            return True

    def record_node_lost(self, node_id: str, reason: str = "node died") -> bool:
        with self._command():
            node = self.ledger.load(node_id_of(node_id), Node)
            if node is None:
                raise NotFound(f"node {node_id!r} never joined; list nodes with sdk.nodes()")
            if not node.alive:
                return False
            node.mark_lost(reason, SYSTEM_ACTOR)
            self._save(node)
            self._notify("node.lost", {"node_id": node_id})
            return True

    def list_nodes(self) -> list[dict[str, Any]]:
        with self.views.connect() as conn:
            return views.list_nodes(conn)

    # -- activation --------------------------------------------------------------------------
    def _supported(self, prov: EngineProvider, alive: list[Any]) -> tuple[bool, str]:
        if not alive:
            return True, ""
        reasons = []
        for node in alive:
            facts = NodeFacts.model_validate({**node.facts, "node_id": node.node_id})
            support = prov.is_supported(facts)
            if support.supported:
                return True, ""
            reasons.append(support.reason)
        return False, "; ".join(reasons)

    def activation_requirements(self, engine_registry_id: Any) -> dict[str, Any]:
        """Server-derived readiness of a row: provider support, config, installed dependencies.

        ``reason`` is the first unmet requirement in the order ``unsupported``,
        ``missing_config``, ``missing_dependencies`` (or None when ready).
        Dependencies count as installed when at least one alive node has an
        ``installed`` row for the row's latest install request.
        """
        engine = self.get_engine(engine_registry_id)
        prov = self._provider(engine["provider"])
        with self.views.connect() as conn:
            alive = views.alive_nodes(conn)
            rows = views.install_rows(conn, engine["id"])
        supported, why_not = self._supported(prov, alive)
        check = prov.validate_config_local(engine["config"])
        installed = any(r.status == InstallState.INSTALLED and r.alive is not False
                        and r.last_event_id == engine["last_install_event_id"] for r in rows)
        missing = [] if installed else [d.payload() for d in prov.dependencies()]
        reason = None
        message = ""
        if not supported:
            reason, message = "unsupported", why_not
        elif not check["ready"]:
            reason, message = "missing_config", check["message"]
        elif missing:
            reason = "missing_dependencies"
            message = (f"{prov.label} is not installed on any node; install it with "
                       f"sdk.engines.begin_install(engine_registry_id={engine['id']})")
        return {
            "ready": reason is None,
            "reason": reason,
            "engine_registry_id": engine["id"],
            "provider": prov.id,
            "provider_label": prov.label,
            "supported": supported,
            "requires_config": not check["ready"],
            "missing_dependencies": missing,
            "activation_message": message,
        }

    def _status_payload(self, reqs: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "ready": reqs["ready"],
            "reason": reqs["reason"],
            "engine_registry_id": reqs["engine_registry_id"],
            "provider": reqs["provider"],
            "status": status,
            "supported": reqs["supported"],
            "activation_ready": reqs["ready"],
            "activation_message": reqs["activation_message"],
            "missing_dependencies": reqs["missing_dependencies"],
        }

    def activate_instance(self, engine_registry_id: Any,
                          requested_by: Mapping[str, Any] | None = None,
                          task_id: str | None = None) -> dict[str, Any]:
        """Activate a ready row; with unmet requirements return ``ready: False``, change nothing."""
        with self._command():
            engine = self._engine(engine_registry_id)
            reqs = self.activation_requirements(engine.row_id)
            if not reqs["ready"] or engine.status is EngineStatus.ACTIVE:
                return self._status_payload(reqs, engine.status.value)
            engine.activate(self._who(requested_by), task_id)
            self._save(engine)
            self._notify("engine.activated", {"engine_registry_id": engine.row_id})
            payload = self._status_payload(reqs, EngineStatus.ACTIVE.value)
            payload["supported"] = True
            return payload

    def deactivate_instance(self, engine_registry_id: Any,
                            requested_by: Mapping[str, Any] | None = None,
                            task_id: str | None = None) -> dict[str, Any]:
        """Deactivate an active row (status becomes ``installed``); other rows are unchanged."""
        with self._command():
            engine = self._engine(engine_registry_id)
            changed = engine.status is EngineStatus.ACTIVE
            if changed:
                engine.deactivate(self._who(requested_by), task_id)
                self._save(engine)
                self._notify("engine.deactivated", {"engine_registry_id": engine.row_id})
            reqs = self.activation_requirements(engine.row_id)
            payload = self._status_payload(reqs, engine.status.value)
            payload["deactivated"] = changed
            return payload

    # -- providers ---------------------------------------------------------------------------
    def check_runtime_config(self, engine_id: Any,
                             config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        prov = self._provider(engine_id)
        result = prov.validate_config_local(
            dict(config) if isinstance(config, Mapping) else config
        )
        return {"engine_id": prov.id, "ready": result["ready"], "message": result["message"]}

    def provider_requirements(self, engine_id: Any) -> dict[str, Any]:
        prov = self._provider(engine_id)
        with self.views.connect() as conn:
            alive = views.alive_nodes(conn)
        supported, why_not = self._supported(prov, alive)
        described = prov.describe()
        return {
            "engine_id": prov.id,
            "provider_label": prov.label,
            "manifest": described["manifest"],
            "requires_config": prov.requires_config,
            "dependencies": described["dependencies"],
            "config_schema": described["config_schema"],
            "supported": supported,
            "unsupported_reason": why_not,
        }

    def list_providers(self) -> list[dict[str, Any]]:
        return [p.describe() for p in list_providers()]

    # -- models ------------------------------------------------------------------------------
