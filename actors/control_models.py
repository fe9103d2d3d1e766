"""Model commands of the control plane: the model registry, artifacts, resource
estimates and runtime plans, and the loaded runtimes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eventsourcing.domain import Aggregate

from actors.control_core import (
    ControlCore,
    _check_int_id,
    _check_json_object,
    _check_name,
)
from actors.errors import BadInput, Conflict, NotFound
from engines.artifacts import ArtifactError, DirectoryArtifactStore, ProgressCallback
from engines.gguf_meta import ModelMetadataError, read_model_meta
from engines.planning import ModelNotFound, PlanRefused, RuntimeConfig
from engines.planning import plan as plan_runtime
from engines.planning import resolve as resolve_reference
from engines.resources import EstimateError, fits
from engines.resources import estimate as estimate_resources
from events.common import (
    DomainError,
    runtime_id,
)
from events.model import ModelRegistration, ModelRuntime, RuntimeState
from projections import views

MODEL_FORMATS = ("gguf", "safetensors")
SOURCE_TYPES = ("huggingface", "local", "url")


def _check_keep_alive(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise BadInput(f"keep_alive_s must be seconds (>= 0), 0 to unload after each request, "
                       f"-1 to never unload, or null for the default; got {value!r}")
    return value


class ModelCommands(ControlCore):
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

