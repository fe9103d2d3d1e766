"""The control plane: the single writer of the ledger and the owner of the views.

Plain Python, no Ray: the in-process SDK (``cluster.client.open_local``) calls
it directly and the control-plane actor wraps it. Every command validates its
input, changes aggregates, saves them in one transaction and catches the views
up before returning (read-your-writes), then tells its listeners (node agents,
the runtime manager) that something changed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from actors.errors import BadInput, Conflict, DuplicateName, LifecycleFieldRefused, NotFound
from engines.artifacts import ArtifactError, DirectoryArtifactStore, ProgressCallback
from engines.base import ConfigError, EngineProvider, NodeFacts
from engines.gguf_meta import ModelMetadataError, read_model_meta
from engines.planning import ModelNotFound, PlanRefused, RuntimeConfig
from engines.planning import plan as plan_runtime
from engines.planning import resolve as resolve_reference
from engines.registry import UnknownProvider, get_provider, list_providers
from engines.resources import EstimateError, fits
from engines.resources import estimate as estimate_resources
from events.common import (
    SYSTEM_ACTOR,
    BadRequester,
    DomainError,
    engine_id,
    model_id,
    name_claim_id,
    node_id_of,
    node_install_id,
    requested_by_payload,
    runtime_id,
)
from events.engine import EngineInstance, EngineStatus, NameClaim
from events.install import InstallState, NodeInstall, aggregate_install_status
from events.ledger import ConcurrentWrite, Ledger
from events.model import ModelRegistration, ModelRuntime, RuntimeState
from events.node import Node
from events.settings import Settings
from projections import views
from projections.projector import Projector
from projections.store import open_views, rebuild, verify

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
MODEL_FORMATS = ("gguf", "safetensors")
SOURCE_TYPES = ("huggingface", "local", "url")
MAX_ID_RETRIES = 50

Listener = Callable[[str, dict[str, Any]], None]


def _check_int_id(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise BadInput(f"{what} must be an integer id, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise BadInput(f"{what} must be an integer id, got {value!r}")


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > 255:
        raise BadInput(f"{what} is {len(value)} characters long; the limit is 255")
    return value.strip()


def _check_json_object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadInput(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        # Round-trip so that only plain JSON values are ever stored in events.
        result = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{what} must hold only JSON values (str, number, bool, null, "
                       f"list, object): {exc}") from None
    assert isinstance(result, dict)
    return result


def _check_keep_alive(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise BadInput(f"keep_alive_s must be seconds (>= 0), 0 to unload after each request, "
                       f"-1 to never unload, or null for the default; got {value!r}")
    return value


def _iso(value: str | datetime | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.isoformat()


class ControlPlane:
    """Ledger + projections + providers. Thread-safe: commands run one at a time."""

    def __init__(self, settings: Settings | None = None, node_id: str | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.ledger = Ledger(self.settings)
        self.views = open_views(self.settings)
        self.projector = Projector(self.views)
        self.source_node_id = node_id or socket.gethostname()
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._last_ids: dict[str, int] = {}
        self._artifacts: DirectoryArtifactStore | None = None
        self._poller: tuple[threading.Thread, threading.Event] | None = None
        self.catch_up()

    def close(self) -> None:
        if self._poller is not None:
            thread, stop = self._poller
            stop.set()
            thread.join(timeout=5)
            self._poller = None
        self.views.dispose()
        self.ledger.close()

    # -- plumbing ----------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(kind, detail)`` after every command that changed something."""
        self._listeners.append(listener)

    def _notify(self, kind: str, detail: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, detail)
            except Exception:  # a listener must never undo a saved command
                log.exception("listener %r failed on %s", listener, kind)

    def catch_up(self) -> int:
        """Project every saved event not yet in the views; return how many."""
        return self.projector.catch_up(self.ledger)

    def start_polling(self, interval_s: float | None = None) -> None:
        """Catch the views up every ``interval_s`` seconds in a background thread (default
        ``ROUNDHOUSE_PROJECTION_POLL_INTERVAL_S``), for events that other writers save (a
        second control plane on PostgreSQL, a writer that crashed before projecting).
        Stopped by ``close()``."""
        if self._poller is not None:
            return
        interval = interval_s or self.settings.projection_poll_interval_s
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(interval):
                try:
                    with self._lock:
                        self.catch_up()
                except Exception:  # keep polling; the next round retries
                    log.exception("projection catch-up failed; retrying in %.1fs", interval)

        thread = threading.Thread(target=poll, name="roundhouse-projection-poll", daemon=True)
        self._poller = (thread, stop)
        thread.start()

    def _save(self, *aggregates: Aggregate) -> None:
        self.projector.apply_recorded(self.ledger, self.ledger.save_all(*aggregates))

    @contextmanager
    def _command(self) -> Iterator[None]:
        """One command at a time; a command that fails forgets the aggregates it may have
        changed in memory before failing (the ledger hands out cached aggregates)."""
        with self._lock:
            try:
                yield
            except BaseException:
                self.ledger.forget_cached()
                raise

    def _who(self, requested_by: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            return requested_by_payload(requested_by)
        except BadRequester as exc:
            raise BadInput(str(exc)) from None

    def _provider(self, provider_id: Any) -> EngineProvider:
        try:
            return get_provider(provider_id)
        except UnknownProvider as exc:
            raise BadInput(str(exc)) from None

    def _engine(self, row_id: Any) -> EngineInstance:
        rid = _check_int_id(row_id, "engine_registry_id")
        agg = self.ledger.load(engine_id(rid), EngineInstance)
        if agg is None or agg.status is EngineStatus.REMOVED:
            raise NotFound(
                f"engine registry row {rid} does not exist; list rows with "
                "sdk.models.engine_registry.list()"
            )
        return agg

    def _model(self, row_id: Any) -> ModelRegistration:
        rid = _check_int_id(row_id, "model_registry_id")
        agg = self.ledger.load(model_id(rid), ModelRegistration)
        if agg is None or agg.removed:
            raise NotFound(
                f"model registry row {rid} does not exist; list rows with "
                "sdk.models.model_registry.list()"
            )
        return agg

    def _engine_payload(self, row_id: int) -> dict[str, Any]:
        with self.views.connect() as conn:
            row = views.engine_row(conn, row_id)
        assert row is not None, f"engine {row_id} saved but not projected"
        return views.engine_payload(row)

    def _claim(self, kind: str, name: str, owner: int,
               requested_by: dict[str, Any] | None = None) -> NameClaim:
        claim = self.ledger.load(name_claim_id(kind, name), NameClaim)
        if claim is None:
            return NameClaim(kind=kind, name=name, owner_row_id=owner,
                             requested_by=requested_by)
        if claim.owner_row_id is not None:
            raise DuplicateName(
                f"{kind} name {name!r} is already used by {kind} {claim.owner_row_id}; "
                "choose another name or delete that row first"
            )
        claim.reclaim(owner, requested_by)
        return claim

    def _release(self, kind: str, name: str,
                 requested_by: dict[str, Any] | None = None) -> NameClaim:
        claim = self.ledger.load(name_claim_id(kind, name), NameClaim)
        assert claim is not None, f"{kind} name {name!r} has no claim"
        claim.release(requested_by)
        return claim

    def _create_with_new_id(self, kind: str, name: str, next_id: Callable[[], int],
                            build: Callable[[int], Aggregate],
                            requested_by: dict[str, Any]) -> int:
        """Allocate the next integer id and claim the name without races.

        Optimistic: the save creates a fresh name claim; if it conflicts, the stored
        claim says whether the name is taken (refused), was released (reclaimed), or
        whether it was the id that another writer took (retry with the next id).
        """
        row_id = max(next_id(), self._last_ids.get(kind, 0) + 1)
        claim: NameClaim | None = None
        for _ in range(MAX_ID_RETRIES):
            if claim is None:
                claim = NameClaim(kind=kind, name=name, owner_row_id=row_id,
                                  requested_by=requested_by)
            try:
                recordings = self.ledger.save_all(build(row_id), claim)
            except ConcurrentWrite:
                stored = self.ledger.load(name_claim_id(kind, name), NameClaim)
                if stored is not None and stored.owner_row_id is not None:
                    raise DuplicateName(
                        f"{kind} name {name!r} is already used by {kind} "
                        f"{stored.owner_row_id}; choose another name or delete that row first"
                    ) from None
                if stored is not None and claim.version == 1:
                    claim = stored  # the name was released: take it over at this id
                    claim.reclaim(row_id, requested_by)
                else:
                    row_id += 1  # another writer took this id
                    claim = None
                continue
            self.projector.apply_recorded(self.ledger, recordings)
            self._last_ids[kind] = row_id
            return row_id
        raise Conflict(f"could not allocate a {kind} id after {MAX_ID_RETRIES} tries; retry")

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
    def _check_source(self, source: Any) -> dict[str, Any]:
        src = _check_json_object(source, "source")
        kind = src.get("type")
        if kind not in SOURCE_TYPES:
            raise BadInput(f"source.type must be one of {', '.join(SOURCE_TYPES)}, got {kind!r}")
        required = {"huggingface": ["repo"], "local": ["path"], "url": ["url", "sha256"]}[kind]
        missing = [k for k in required if not src.get(k)]
        if missing:
            raise BadInput(f"a {kind} source needs {', '.join(missing)}")
        return src

    def create_model(self, name: Any, display_name: Any = None, source: Any = None,
                     format: Any = "gguf", engine_kinds: Any = None,
                     requested_by: Mapping[str, Any] | None = None,
                     task_id: str | None = None, keep_alive_s: Any = None) -> dict[str, Any]:
        """Register a model (records events; downloads nothing); return the row with its id."""
        with self._command():
            name = _check_name(name, "name")
            display = _check_name(display_name, "display_name") if display_name else name
            src = self._check_source(source)
            if format not in MODEL_FORMATS:
                raise BadInput(f"format must be one of {', '.join(MODEL_FORMATS)}, got {format!r}")
            kinds = engine_kinds
            if kinds is None:
                kinds = ["llamacpp"] if format == "gguf" else ["vllm"]
            if not isinstance(kinds, list) or not kinds:
                raise BadInput("engine_kinds must be a non-empty list of provider ids")
            for kind in kinds:
                self._provider(kind)
            who = self._who(requested_by)
            keep = _check_keep_alive(keep_alive_s)

            def next_id() -> int:
                with self.views.connect() as conn:
                    return views.max_model_id(conn) + 1

            row_id = self._create_with_new_id(
                "model", name, next_id,
                lambda rid: ModelRegistration(row_id=rid, name=name, display_name=display,
                                              source=src, format=format,
                                              engine_kinds=list(kinds), requested_by=who,
                                              task_id=task_id, keep_alive_s=keep),
                who,
            )
            self._notify("model.registered", {"model_registry_id": row_id})
            return self.get_model(row_id)

    def get_model(self, row_id: Any) -> dict[str, Any]:
        rid = _check_int_id(row_id, "model_registry_id")
        with self.views.connect() as conn:
            row = views.model_row(conn, rid)
        if row is None or row.removed:
            raise NotFound(f"model registry row {rid} does not exist; list rows with "
                           "sdk.models.model_registry.list()")
        return views.model_payload(row)

    def find_model(self, name: str) -> dict[str, Any]:
        with self.views.connect() as conn:
            row = views.model_by_name(conn, name)
        if row is None:
            raise NotFound(f"no model is registered under the name {name!r}; register it with "
                           "sdk.models.model_registry.create(name=..., source=...)")
        return views.model_payload(row)

    def list_models(self) -> list[dict[str, Any]]:
        with self.views.connect() as conn:
            return views.list_models(conn)

    def update_model(self, row_id: Any, fields: Mapping[str, Any],
                     requested_by: Mapping[str, Any] | None = None,
                     task_id: str | None = None) -> dict[str, Any]:
        with self._command():
            allowed = {"name", "display_name", "source", "format", "engine_kinds",
                       "keep_alive_s"}
            unknown = sorted(set(fields) - allowed)
            if unknown:
                raise BadInput(f"unknown model fields {unknown}; updatable fields are "
                               f"{sorted(allowed)}")
            model = self._model(row_id)
            who = self._who(requested_by)
            clean: dict[str, Any] = {}
            changed: list[Aggregate] = [model]
            if "display_name" in fields:
                clean["display_name"] = _check_name(fields["display_name"], "display_name")
            if "keep_alive_s" in fields:
                clean["keep_alive_s"] = _check_keep_alive(fields["keep_alive_s"])
            if "source" in fields:
                clean["source"] = self._check_source(fields["source"])
            if "format" in fields:
                if fields["format"] not in MODEL_FORMATS:
                    raise BadInput(f"format must be one of {', '.join(MODEL_FORMATS)}")
                clean["format"] = fields["format"]
            if "engine_kinds" in fields:
                kinds = fields["engine_kinds"]
                if not isinstance(kinds, list) or not kinds:
                    raise BadInput("engine_kinds must be a non-empty list of provider ids")
                for kind in kinds:
                    self._provider(kind)
                clean["engine_kinds"] = list(kinds)
            if "name" in fields:
                new_name = _check_name(fields["name"], "name")
                if new_name != model.name:
                    changed.append(self._claim("model", new_name, model.row_id, who))
                    changed.append(self._release("model", model.name, who))
                    clean["name"] = new_name
            if model.update(clean, who, task_id):
                self._save(*changed)
            return self.get_model(model.row_id)

    def delete_model(self, row_id: Any, requested_by: Mapping[str, Any] | None = None,
                     task_id: str | None = None) -> dict[str, Any]:
        with self._command():
            model = self._model(row_id)
            with self.views.connect() as conn:
                resident = [r for r in views.runtime_rows(conn) if r.model_row_id == model.row_id]
            if resident:
                raise Conflict(f"model {model.row_id} is loaded on engine "
                               f"{resident[0].engine_row_id}; unload it with "
                               "sdk.engines.unload_loaded_model first")
            who = self._who(requested_by)
            model.remove(who, task_id)
            self._save(model, self._release("model", model.name, who))
            return {"status": "ok", "id": model.row_id, "deleted": True}

    def record_artifact_stored(self, model_registry_id: Any, artifact: Mapping[str, Any],
                               requested_by: Mapping[str, Any] | None = None,
                               task_id: str | None = None) -> dict[str, Any]:
        with self._command():
            model = self._model(model_registry_id)
            if model.store_artifact(_check_json_object(artifact, "artifact"),
                                    self._who(requested_by), task_id):
                self._save(model)
            return self.get_model(model.row_id)

    # -- media and resources -----------------------------------------------------------------
    def artifact_store(self) -> DirectoryArtifactStore:
        """The shared artifact store (``ROUNDHOUSE_ARTIFACT_STORE``, default in the home)."""
        if self._artifacts is None:
            self._artifacts = DirectoryArtifactStore.from_settings(self.settings)
        return self._artifacts

    def add_model_from_source(self, name: Any, source: Any,
                              progress: ProgressCallback | None = None,
                              display_name: str | None = None, format: str | None = None,
                              engine_kinds: list[str] | None = None,
                              requested_by: Mapping[str, Any] | None = None,
                              task_id: str | None = None) -> str:
        """Materialize a source into the shared artifact store and record it; return its ref.

        The download happens first and nothing is recorded unless it completes and
        verifies. The artifact is recorded on the model registered under ``name``;
        if there is none, one is registered (format inferred from the files).
        """
        name = _check_name(name, "name")
        src = self._check_source(source)
        who = self._who(requested_by)
        try:
            manifest = self.artifact_store().add_from_source(name, src, progress)
        except ArtifactError as exc:
            raise BadInput(f"could not store {name!r}: {exc}") from None
        artifact = manifest.to_dict()
        with self._command():
            with self.views.connect() as conn:
                existing = views.model_by_name(conn, name)
            if existing is None:
                guessed = "gguf" if manifest.primary_path.endswith(".gguf") else "safetensors"
                row = self.create_model(name, display_name, manifest.source, format or guessed,
                                        engine_kinds, requested_by=who, task_id=task_id)
                model_row_id = row["id"]
            else:
                model_row_id = existing.row_id
            self.record_artifact_stored(model_row_id, artifact, requested_by=who,
                                        task_id=task_id)
        return manifest.ref

    def model_path(self, model_registry_id: Any) -> str:
        """Where the model's weights are on this machine: its stored artifact (file or
        directory), else its ``local`` source path. Refuses models with neither."""
        model = self.get_model(model_registry_id)
        artifact = model.get("artifact")
        if artifact:
            root = self.artifact_store().local_path(artifact["ref"])
            if artifact.get("kind") == "file":
                return str(root / artifact["files"][0]["path"])
            return str(root)
        if model["source"].get("type") == "local":
            return str(model["source"]["path"])
        raise Conflict(
            f"model {model['id']} ({model['name']}) has no stored artifact yet; fetch it with "
            f"sdk.media.add_model_from_source({model['name']!r}, source=...)"
        )

    def _alive_facts(self) -> list[NodeFacts]:
        with self.views.connect() as conn:
            return [NodeFacts.model_validate({**n.facts, "node_id": n.node_id})
                    for n in views.alive_nodes(conn)]

    def evaluate_model_resources(self, model_registry_id: Any, context_length: Any,
                                 runtime_overrides: Mapping[str, Any] | None = None,
                                 provider: str | None = None) -> dict[str, Any]:
        """Estimate weights, KV cache and compute buffers at ``context_length``, split into
        VRAM and RAM, and say for every alive node whether it fits."""
        if isinstance(context_length, bool) or not isinstance(context_length, int) \
                or context_length < 1:
            raise BadInput(f"context_length must be a positive integer, got {context_length!r}")
        model = self.get_model(model_registry_id)
        engine = provider or model["engine_kinds"][0]
        self._provider(engine)
        overrides = _check_json_object(runtime_overrides, "runtime_overrides")
        try:
            meta = read_model_meta(self.model_path(model["id"]))
            estimate = estimate_resources(meta, context_length, engine, overrides)
        except (ModelMetadataError, EstimateError, ValueError) as exc:
            raise BadInput(f"cannot estimate model {model['id']}: {exc}") from None
        payload = estimate.to_dict()
        payload["model_registry_id"] = model["id"]
        payload["nodes"] = [fits(estimate, node).to_dict() for node in self._alive_facts()]
        return payload

    def resolve_model(self, model_reference: Any) -> dict[str, Any]:
        """Resolved metadata of a model without loading it: a registered name or id, or a
        path / artifact ref under the node's models directory."""
        reference = model_reference
        if isinstance(reference, int) or (isinstance(reference, str) and reference.isdigit()):
            reference = self.model_path(reference)
        elif isinstance(reference, str):
            with self.views.connect() as conn:
                row = views.model_by_name(conn, reference)
            if row is not None:
                reference = self.model_path(row.row_id)
        else:
            raise BadInput(f"model_reference must be a name, id or path, got {reference!r}")
        try:
            return resolve_reference(str(reference), self.settings.home / "models").to_dict()
        except (ModelNotFound, ModelMetadataError) as exc:
            raise NotFound(str(exc)) from None

    def plan_runtime(self, model_registry_id: Any, engine: str = "llamacpp",
                     context_length: int | None = None, device: str = "auto",
                     gpu_layers: int | None = None, kv_cache_type: str = "f16",
                     node_id: str | None = None, allow_cpu_fallback: bool = True,
                     overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The runtime plan for a registered model (engine, node, device, GPU layers,
        context, KV type and any fallback with its reason) without loading anything."""
        self._provider(engine)
        config = RuntimeConfig(
            model=self.model_path(model_registry_id), engine=engine,  # type: ignore[arg-type]
            context_length=context_length, device=device,  # type: ignore[arg-type]
            gpu_layers=gpu_layers, kv_cache_type=kv_cache_type, node_id=node_id,
            allow_cpu_fallback=allow_cpu_fallback, nodes=self._alive_facts(),
            overrides=_check_json_object(overrides, "overrides"),
        )
        try:
            return plan_runtime(config).to_dict()
        except PlanRefused as exc:
            raise Conflict(str(exc)) from None
        except (ModelNotFound, ModelMetadataError, EstimateError, ValueError) as exc:
            raise BadInput(str(exc)) from None

    # -- runtimes ----------------------------------------------------------------------------
    def _runtime(self, engine_row_id: int, model_row_id: int, node: str) -> ModelRuntime | None:
        return self.ledger.load(runtime_id(engine_row_id, model_row_id, node), ModelRuntime)

    def record_load_requested(self, engine_registry_id: Any, model_registry_id: Any,
                              node_id: str, requested_by: Mapping[str, Any] | None = None,
                              task_id: str | None = None) -> None:
        with self._command():
            engine, model = self._engine(engine_registry_id), self._model(model_registry_id)
            who = self._who(requested_by)
            runtime = self._runtime(engine.row_id, model.row_id, node_id)
            if runtime is None:
                runtime = ModelRuntime(engine_row_id=engine.row_id, model_row_id=model.row_id,
                                       node_id=node_id, requested_by=who, task_id=task_id)
            elif runtime.state in (RuntimeState.LOADING, RuntimeState.LOADED):
                return
            else:
                runtime.request_load(who, task_id)
            self._save(runtime)

    def record_loaded(self, engine_registry_id: int, model_registry_id: int, node_id: str,
                      pid: int, model_path: str, memory_bytes: int, url: str,
                      app_name: str) -> None:
        with self._command():
            runtime = self._existing_runtime(engine_registry_id, model_registry_id, node_id)
            runtime.mark_loaded(pid, model_path, memory_bytes, url, app_name)
            self._save(runtime)

    def record_load_failed(self, engine_registry_id: int, model_registry_id: int,
                           node_id: str, error: str) -> None:
        with self._command():
            runtime = self._existing_runtime(engine_registry_id, model_registry_id, node_id)
            runtime.fail_load(error)
            self._save(runtime)

    def record_runtime_restarted(self, engine_registry_id: int, model_registry_id: int,
                                 node_id: str, pid: int, reason: str = "crashed") -> bool:
        """The supervisor restarted a loaded runtime's engine process under a new pid."""
        with self._command():
            runtime = self._existing_runtime(engine_registry_id, model_registry_id, node_id)
            if runtime.state is not RuntimeState.LOADED or not runtime.restarted(pid, reason):
                return False
            self._save(runtime)
            return True

    def record_unloaded(self, engine_registry_id: int, model_registry_id: int, node_id: str,
                        reason: str, requested_by: Mapping[str, Any] | None = None) -> bool:
        with self._command():
            runtime = self._existing_runtime(engine_registry_id, model_registry_id, node_id)
            if runtime.state not in (RuntimeState.LOADING, RuntimeState.LOADED):
                return False
            try:
                runtime.unload(reason, self._who(requested_by))
            except DomainError as exc:
                raise BadInput(str(exc)) from None
            self._save(runtime)
            return True

    def _existing_runtime(self, engine_row_id: int, model_row_id: int,
                          node: str) -> ModelRuntime:
        runtime = self._runtime(engine_row_id, model_row_id, node)
        if runtime is None:
            raise NotFound(f"model {model_row_id} was never loaded on engine {engine_row_id} "
                           f"at node {node}")
        return runtime

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

    def list_loaded_models(self, engine_registry_id: Any = None) -> list[dict[str, Any]]:
        """Runtimes that are loading or loaded, shaped as the module SDK's loaded-model rows."""
        rid = None if engine_registry_id is None else _check_int_id(engine_registry_id,
                                                                     "engine_registry_id")
        with self.views.connect() as conn:
            rows = views.runtime_rows(conn, rid)
        return [
            {
                "engine_row_id": r.engine_row_id,
                "engine_id": r.provider,
                "status": r.status,
                "pid": r.pid,
                "model": r.model_name,
                "model_path": r.model_path,
                "model_registry_id": r.model_row_id,
                "model_registry_name": r.model_name,
                "model_display_name": r.model_display_name,
                "node_id": r.node_id,
                "memory_bytes": r.memory_bytes,
                "url": r.url,
                "app_name": r.app_name,
                "requested_at": r.requested_at,
                "loaded_at": r.loaded_at,
            }
            for r in rows
        ]

    # -- audit -------------------------------------------------------------------------------
    def audit_events(self, engine_registry_id: Any = None, model_registry_id: Any = None,
                     user_id: int | str | None = None,
                     organization_id: int | str | None = None, node_id: str | None = None,
                     event_name: str | None = None, since: str | datetime | None = None,
                     until: str | datetime | None = None, after_position: int = 0,
                     limit: int = 1000) -> list[dict[str, Any]]:
        """The event log, oldest first, filtered by any of the arguments."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadInput(f"limit must be a positive integer, got {limit!r}")
        with self.views.connect() as conn:
            return views.audit_events(
                conn,
                engine_registry_id=None if engine_registry_id is None
                else _check_int_id(engine_registry_id, "engine_registry_id"),
                model_registry_id=None if model_registry_id is None
                else _check_int_id(model_registry_id, "model_registry_id"),
                user_id=user_id, organization_id=organization_id, node_id=node_id,
                event_name=event_name, since=_iso(since), until=_iso(until),
                after_position=after_position, limit=limit,
            )

    def verify(self) -> dict[str, Any]:
        """Rebuild the views from the log in a scratch database and diff with the live ones."""
        with self._command():
            return verify(self.views, self.ledger)

    def rebuild(self) -> int:
        """Drop the view rows and replay the whole log into them; return events applied."""
        with self._command():
            self.projector = Projector(self.views)
            applied = rebuild(self.views, self.ledger)
            return applied
