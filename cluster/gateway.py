"""The HTTP gateway: OpenAI-compatible ``/v1`` and the admin REST API under ``/api``.

``build_app(serving, auth)`` returns the FastAPI application. Its hot path has one
hop: the gateway holds the orchestrator in-process and forwards the request body
straight to the engine process's URL (SSE bytes are passed through as they
arrive), so a streamed token costs one proxy hop over calling the engine directly.

Routes::

    GET  /v1/models                       registered models (OpenAI list shape)
    POST /v1/chat/completions             streamed (SSE) or not, usage counted
    POST /v1/completions
    /api/...                              admin, bearer token (401 without, 403 other org)

Errors on ``/v1`` are OpenAI-shaped: ``{"error": {"message", "type", "code", "param"}}``;
a full queue answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from actors.errors import RoundhouseError
from cluster.gateway_auth import GatewayAuth, Principal
from cluster.orchestrator import Job, OrchestratorError, QueueFull
from cluster.orchestrator_service import Serving

log = logging.getLogger("roundhouse.gateway")

_ADMIN_STATUS = {"bad_request": 400, "not_found": 404, "conflict": 409, "unavailable": 503}


def openai_error(status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None
                 ) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": code,
                                   "param": param}}, status_code=status, headers=headers)


def _from_orchestrator(exc: OrchestratorError) -> JSONResponse:
    headers = None
    if isinstance(exc, QueueFull):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return openai_error(exc.status, str(exc), exc.code, exc.kind, headers=headers)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


class _SSECounter:
    """Counts streamed completion tokens from SSE ``data:`` events without delaying them."""

    def __init__(self) -> None:
        self.buffer = b""
        self.tokens = 0
        self.usage_tokens: int | None = None
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if "error" in event:
                self.error = str(event["error"])
            usage = event.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                self.usage_tokens = int(usage["completion_tokens"])
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or choice.get("text"):
                    self.tokens += 1

    @property
    def total(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.tokens


def build_app(serving: Serving, auth: GatewayAuth, *,
              http: httpx.AsyncClient | None = None, manage_lifecycle: bool = True) -> FastAPI:
    """The gateway application over ``serving``.

    With ``manage_lifecycle`` the app starts the orchestrator's sweeper on startup and
    closes its HTTP client on shutdown (runtimes are unloaded by whoever owns ``serving``).
    """
    client = http or httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=10.0),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=128))
    orch = serving.orchestrator

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            serving.start()
        try:
            yield
        finally:
            if http is None:
                await client.aclose()

    app = FastAPI(title="Roundhouse gateway", lifespan=lifespan)
    app.state.serving = serving

    # --- /v1 --------------------------------------------------------------------------------
    def v1_refused(request: Request) -> JSONResponse | None:
        if auth.api_key_ok(_bearer(request)):
            return None
        return openai_error(401, "a valid API key is required: send 'Authorization: Bearer "
                            "<key>' with one of the keys in ROUNDHOUSE_API_KEYS",
                            "invalid_api_key")

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        refused = v1_refused(request)
        if refused is not None:
            return refused
        rows = await serving.call("list_models")
        return JSONResponse({"object": "list", "data": [
            {"id": r["name"], "object": "model", "created": 0, "owned_by": "roundhouse",
             "display_name": r.get("display_name")} for r in rows]})

    async def proxy(request: Request, path: str) -> Response:
        refused = v1_refused(request)
        if refused is not None:
            return refused
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return openai_error(400, "the request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return openai_error(400, "'model' is required: name a model from GET /v1/models",
                                "missing_model", param="model")
        stream = bool(body.get("stream"))
        key = _bearer(request)
        who = {"api_key": key[:6] + "…"} if key and auth.api_keys else {}
        try:
            job = orch.submit(body["model"], stream=stream, requested_by=who)
        except OrchestratorError as exc:
            return _from_orchestrator(exc)
        try:
            runtime = await orch.acquire(job)
        except OrchestratorError as exc:
            return _from_orchestrator(exc)
        except asyncio.CancelledError:
            raise
        url = runtime.url + path
        if not stream:
            return await _batch(job, url, raw)
        return await _stream(job, url, raw)

    async def _batch(job: Job, url: str, raw: bytes) -> Response:
        try:
            resp = await client.post(url, content=raw,
                                     headers={"content-type": "application/json"})
        except asyncio.CancelledError:
            orch.cancelling(job)
            orch.finish(job, error=asyncio.CancelledError())
            raise
        except httpx.HTTPError as exc:
            orch.engine_failed(job)
            orch.finish(job, error=exc)
            return openai_error(502, f"the engine serving {job.model!r} failed while answering "
                                f"({type(exc).__name__}); retry the request",
                                "engine_unavailable", "server_error")
        tokens = 0
        if resp.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                tokens = int(resp.json().get("usage", {}).get("completion_tokens") or 0)
            orch.finish(job, tokens_out=tokens)
        else:
            orch.finish(job, error=f"engine answered {resp.status_code}")
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    async def _stream(job: Job, url: str, raw: bytes) -> Response:
        req = client.build_request("POST", url, content=raw,
                                   headers={"content-type": "application/json"})
        try:
            upstream = await client.send(req, stream=True)
        except asyncio.CancelledError:
            orch.cancelling(job)
            orch.finish(job, error=asyncio.CancelledError())
            raise
        except httpx.HTTPError as exc:
            orch.engine_failed(job)
            orch.finish(job, error=exc)
            return openai_error(502, f"the engine serving {job.model!r} is not answering "
                                f"({type(exc).__name__}); retry the request",
                                "engine_unavailable", "server_error")
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            orch.finish(job, error=f"engine answered {upstream.status_code}")
            return Response(content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type",
                                                            "application/json"))

        async def relay() -> AsyncIterator[bytes]:
            counter = _SSECounter()
            error: BaseException | None = None
            try:
                async for chunk in upstream.aiter_raw():
                    counter.feed(chunk)
                    job.tokens_out = counter.total
                    yield chunk
                    if job.cancel_requested.is_set():
                        error = asyncio.CancelledError()
                        break
            except (asyncio.CancelledError, GeneratorExit):
                orch.cancelling(job)
                error = asyncio.CancelledError()
                raise
            except httpx.HTTPError as exc:
                error = exc
                orch.engine_failed(job)
                message = (f"the engine serving {job.model!r} broke off the stream "
                           f"({type(exc).__name__}); retry the request")
                yield ("data: " + json.dumps({"error": {
                    "message": message, "type": "server_error",
                    "code": "engine_unavailable", "param": None}}) + "\n\n").encode()
            finally:
                await upstream.aclose()
                orch.finish(job, tokens_out=counter.total, error=error)

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    # --- /api -------------------------------------------------------------------------------
    def admin_refused(request: Request) -> tuple[JSONResponse | None, Principal]:
        token = _bearer(request)
        principal = auth.admin(token)
        if principal is None:
            why = ("no admin token was sent" if not token else "the admin token is not valid")
            return JSONResponse({"error": {"code": "unauthorized", "message": (
                f"{why}: send 'Authorization: Bearer <token>' with ROUNDHOUSE_API_TOKEN or "
                "the token `roundhouse up` printed (stored in the Roundhouse home as "
                "api_token)")}}, status_code=401,
                headers={"WWW-Authenticate": "Bearer"}), Principal()
        if not auth.same_organization(principal):
            return JSONResponse({"error": {"code": "forbidden", "message": (
                f"this token belongs to organization {principal.organization_id!r}, not to "
                f"{auth.organization_id!r} that this gateway serves; use a token of "
                "this organization")}}, status_code=403), principal
        return None, principal

    def admin_route(method: str, path: str,
                    handler: Callable[[Principal, Request, dict[str, Any]], Awaitable[Any]],
                    ) -> None:
        async def endpoint(request: Request) -> Response:
            refused, principal = admin_refused(request)
            if refused is not None:
                return refused
            body: dict[str, Any] = {}
            if method in ("POST", "PATCH", "PUT"):
                raw = await request.body()
                if raw:
                    try:
                        parsed = json.loads(raw)
                    except ValueError:
                        return JSONResponse({"error": {"code": "bad_request", "message":
                                             "the request body is not valid JSON"}}, 400)
                    if not isinstance(parsed, dict):
                        return JSONResponse({"error": {"code": "bad_request", "message":
                                             "the request body must be a JSON object"}}, 400)
                    body = parsed
            try:
                result = await handler(principal, request, body)
            except RoundhouseError as exc:
                return JSONResponse({"error": {"code": exc.code, "message": str(exc)}},
                                    _ADMIN_STATUS.get(exc.code, 500))
            except (ValueError, TypeError, KeyError) as exc:
                return JSONResponse({"error": {"code": "bad_request", "message": str(exc)}},
                                    400)
            return JSONResponse(result)

        app.add_api_route(path, endpoint, methods=[method])

    def pid(request: Request, name: str) -> int:
        try:
            return int(request.path_params[name])
        except ValueError:
            raise ValueError(f"{name} must be an integer id") from None

    async def r_engines(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("list_engines", r.query_params.get("provider"))

    async def r_engine_create(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("create_engine", b.get("provider"), b.get("name"),
                                  b.get("config"), requested_by=p.requested_by())

    async def r_engine(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("get_engine", pid(r, "eid"))

    async def r_install(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("begin_install", pid(r, "eid"), force=bool(b.get("force")),
                                  requested_by=p.requested_by())

    async def r_install_status(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("install_status", pid(r, "eid"))

    async def r_activate(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.activate_instance(pid(r, "eid"), p.requested_by())

    async def r_deactivate(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.deactivate_instance(pid(r, "eid"), p.requested_by())

    async def r_stop(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.stop_engine(pid(r, "eid"), p.requested_by())

    async def r_models(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("list_models")

    async def r_model_create(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("create_model", b.get("name"), b.get("display_name"),
                                  b.get("source"), b.get("format", "gguf"),
                                  b.get("engine_kinds"), requested_by=p.requested_by())

    async def r_model(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.call("get_model", pid(r, "mid"))

    async def r_warmup(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.warmup(pid(r, "mid"), wait=bool(b.get("wait", True)),
                                    requested_by=p.requested_by())

    async def r_loaded(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        eid = r.query_params.get("engine_registry_id")
        return await serving.list_loaded_models(int(eid) if eid else None)

    async def r_unload(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.unload_loaded_model(pid(r, "eid"), pid(r, "mid"),
                                                 p.requested_by())

    async def r_jobs(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.list_active_jobs()

    async def r_cancel(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.cancel_job(str(r.path_params["job_id"]))

    async def r_sync(p: Principal, r: Request, b: dict[str, Any]) -> Any:
        return await serving.sync_runtime()

    admin_route("GET", "/api/engines", r_engines)
    admin_route("POST", "/api/engines", r_engine_create)
    admin_route("GET", "/api/engines/{eid}", r_engine)
    admin_route("POST", "/api/engines/{eid}/install", r_install)
    admin_route("GET", "/api/engines/{eid}/install", r_install_status)
    admin_route("POST", "/api/engines/{eid}/activate", r_activate)
    admin_route("POST", "/api/engines/{eid}/deactivate", r_deactivate)
    admin_route("POST", "/api/engines/{eid}/stop", r_stop)
    admin_route("GET", "/api/models", r_models)
    admin_route("POST", "/api/models", r_model_create)
    admin_route("GET", "/api/models/{mid}", r_model)
    admin_route("POST", "/api/models/{mid}/warmup", r_warmup)
    admin_route("GET", "/api/loaded-models", r_loaded)
    admin_route("DELETE", "/api/loaded-models/{eid}/{mid}", r_unload)
    admin_route("GET", "/api/jobs", r_jobs)
    admin_route("DELETE", "/api/jobs/{job_id}", r_cancel)
    admin_route("POST", "/api/sync-runtime", r_sync)
    return app
