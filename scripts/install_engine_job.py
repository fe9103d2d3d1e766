"""A Ray job: install an engine on every node of the cluster and activate it.

Submit it to a running cluster (the control plane is created if it is not there):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python scripts/install_engine_job.py --provider llamacpp --name llamacpp-main

It reuses the engine row of that name when there is one, requests an install,
prints the per-node progress until every node is done, activates the row and
prints the final row as one JSON line prefixed ``RESULT``. Exits 1 when the
install fails or the row cannot be activated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from cluster import connect
from cluster.cli import progress_table


async def run(args: argparse.Namespace) -> int:
    sdk = connect(address=args.address)
    try:
        config = json.loads(args.config)
        rows = await sdk.models.engine_registry.list(provider=args.provider)
        row = next((r for r in rows if r["name"] == args.name), None)
        if row is None:
            row = await sdk.models.engine_registry.create(args.provider, args.name, config)
        rid = row["id"]
        await sdk.engines.begin_install(rid, force=args.force)
        deadline = time.monotonic() + args.timeout
        status: dict[str, Any] = await sdk.engines.install_status(rid)
        shown = ""
        while status["status"] not in ("installed", "error") or not status["nodes"]:
            if time.monotonic() > deadline:
                print(f"install still {status['status']} after {args.timeout:.0f}s",
                      file=sys.stderr)
                return 1
            table = progress_table(status)
            if table != shown:
                print(table, flush=True)
                shown = table
            await asyncio.sleep(0.5)
            status = await sdk.engines.install_status(rid)
        print(progress_table(status), flush=True)
        if status["status"] == "error":
            return 1
        activated = await sdk.engines.activate_instance(rid)
        final = await sdk.models.engine_registry.get(rid)
        print("RESULT " + json.dumps({"engine": final, "activation": activated}, default=str),
              flush=True)
        return 0 if activated["ready"] else 1
    finally:
        await sdk.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="Ray address (default: auto)")
    parser.add_argument("--provider", default="llamacpp")
    parser.add_argument("--name", default="llamacpp-main")
    parser.add_argument("--config", default="{}", help="provider config as JSON")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800.0)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
