"""The ``roundhouse`` command.

    roundhouse up [--address ADDR] [--port N]   start a Ray head here (or attach), the control
                                        plane and the gateway; prints its URL and admin token
    roundhouse down [--address ADDR]    unload runtimes, remove the gateway and the control
                                        plane; stop a head `up` started
    roundhouse status                   the control plane and the nodes
    roundhouse engines list|create|show|activate
    roundhouse install ID [--force] [--wait]   with a live per-node progress table

Commands other than ``up`` find the cluster in this order: ``--address``,
``RAY_ADDRESS``, the head recorded by ``roundhouse up`` in ``ROUNDHOUSE_HOME``.
Exit codes: 0 ok, 1 the operation failed (e.g. an install error), 2 bad input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import typer

from actors.errors import RoundhouseError
from cluster.client import SDK
from events.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Roundhouse: LLM inference engines on Ray.")
engines_app = typer.Typer(no_args_is_help=True, help="Configured engine rows.")
app.add_typer(engines_app, name="engines")

AddressOption = typer.Option(None, "--address", help="Ray address (host:port or auto).")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"roundhouse: {message}", err=True)
    raise typer.Exit(code)


def _address(address: str | None) -> str:
    """The cluster to attach to, or exit saying how to start one."""
    from cluster.head import Head

    found = address or os.environ.get("RAY_ADDRESS")
    if found:
        return found
    head = Head.load(Settings.from_env().home)
    if head is None:
        _fail("no cluster to talk to; start one with `roundhouse up` or pass --address")
    assert head is not None
    return head.address


def _with_sdk(address: str | None, work: Callable[[SDK], Coroutine[Any, Any, Any]]) -> Any:
    from cluster.bootstrap import connect

    try:
        sdk = connect(_address(address))
    except (ConnectionError, TimeoutError) as exc:
        _fail(str(exc), 1)

    async def run() -> Any:
        try:
            return await work(sdk)
        finally:
            await sdk.close()

    try:
        return asyncio.run(run())
    except RoundhouseError as exc:
        _fail(str(exc), 2 if exc.code in ("bad_request", "not_found", "conflict") else 1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


@app.command()
def up(address: str | None = AddressOption,
       num_cpus: int | None = typer.Option(None, help="CPUs of the head started here."),
       num_gpus: int | None = typer.Option(None, help="GPUs of the head started here."),
       port: int | None = typer.Option(
           None, help="Gateway port (default: ROUNDHOUSE_GATEWAY_PORT, 8765)."),
       host: str | None = typer.Option(
           None, help="Gateway address (default: ROUNDHOUSE_GATEWAY_HOST, 127.0.0.1)."),
       gateway: bool = typer.Option(True, help="Start the HTTP gateway too."),
       ray_port: int | None = typer.Option(
           None, help="GCS port of the head started here (default: a free one)."),
       dashboard_port: int | None = typer.Option(
           None, help="Dashboard/job-submission port of the head (default: a free one)."),
       ) -> None:
    """Start a Ray head on this machine (or attach to ADDRESS), the control plane and the
    gateway; print the gateway URL and the admin token (generated once, kept in
    ROUNDHOUSE_HOME/api_token)."""
    from cluster.bootstrap import start
    from cluster.head import Head, start_head, stop_head

    settings = Settings.from_env()
    updates: dict[str, Any] = {}
    if port is not None:
        updates["gateway_port"] = port
    if host is not None:
        updates["gateway_host"] = host
    settings = settings.model_copy(update=updates)
    head = None
    if address is None:
        existing = Head.load(settings.home)
        if existing is not None:
            address = existing.address
        else:
            try:
                head = start_head(num_cpus=num_cpus, num_gpus=num_gpus, port=ray_port,
                                  dashboard_port=dashboard_port)
            except (RuntimeError, FileNotFoundError) as exc:
                _fail(str(exc), 1)
            assert head is not None
            head.save(settings.home)
            address = head.address

    def undo() -> None:
        if head is not None:
            stop_head(head)
            (settings.home / "cluster.json").unlink(missing_ok=True)

    try:
        cluster = start(address, settings)
    except (ConnectionError, TimeoutError) as exc:
        undo()
        _fail(str(exc), 1)
    recorded = head or Head.load(settings.home)
    typer.echo(f"control plane up on node {cluster.info['node_id']} at {address}; "
               f"store in {settings.home}")
    if recorded is not None:
        typer.echo(f"submit jobs with: ray job submit --address {recorded.dashboard_url} "
                   "--working-dir . -- python scripts/install_engine_job.py ...")
    if gateway:
        from cluster.gateway_auth import TOKEN_FILE, admin_token
        from cluster.serve_gateway import start_gateway

        token = admin_token(settings, create=True)
        try:
            url = start_gateway(settings)
        except Exception as exc:  # Serve's errors vary; the user needs the message
            undo()
            _fail(f"the gateway did not start on {settings.gateway_host}:"
                  f"{settings.gateway_port} ({exc}); pick another port with --port", 1)
        typer.echo(f"gateway: {url}  (OpenAI API under {url}/v1, admin API under {url}/api)")
        if settings.api_token:
            typer.echo("admin token: the value of ROUNDHOUSE_API_TOKEN")
        else:
            typer.echo(f"admin token: {token}  (kept in {settings.home / TOKEN_FILE})")


@app.command()
def down(address: str | None = AddressOption) -> None:
    """Unload every runtime (reason ``stop_engine``), remove the gateway, the control plane and
    the node agents (the store is kept); stop the Ray head that `roundhouse up` started
    here."""
    import ray

    from cluster.bootstrap import stop
    from cluster.head import Head, stop_head
    from cluster.serve_gateway import stop_gateway

    settings = Settings.from_env()
    head = Head.load(settings.home)
    target = address or os.environ.get("RAY_ADDRESS") or (head.address if head else None)
    if target is None:
        _fail("nothing to stop: no --address and no head recorded by `roundhouse up`")
    assert target is not None
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
        stop_gateway()
        stop(None, remove_control_plane=True)
    except ConnectionError as exc:
        typer.echo(f"roundhouse: the cluster at {target} does not answer ({exc})", err=True)
    if head is not None and head.address == target:
        count = stop_head(head)
        (settings.home / "cluster.json").unlink(missing_ok=True)
        typer.echo(f"stopped the Ray head at {head.address} ({count} processes)")
    typer.echo("control plane removed")


@app.command()
def status(address: str | None = AddressOption) -> None:
    """The nodes the control plane knows, with their facts."""
    _print_json(_with_sdk(address, lambda sdk: sdk.nodes.list()))


@engines_app.command("list")
def engines_list(address: str | None = AddressOption,
                 provider: str | None = typer.Option(None)) -> None:
    """Configured engine rows, as JSON."""
    _print_json(_with_sdk(address, lambda sdk: sdk.models.engine_registry.list(provider)))


@engines_app.command("create")
def engines_create(provider: str, name: str,
                   config: str = typer.Option("{}", help="Provider config as JSON."),
                   address: str | None = AddressOption) -> None:
    """Register an engine row; prints it (with its id)."""
    try:
        cfg = json.loads(config)
    except json.JSONDecodeError as exc:
        _fail(f"--config is not valid JSON: {exc}")
        return
    _print_json(_with_sdk(address,
                          lambda sdk: sdk.models.engine_registry.create(provider, name, cfg)))


@engines_app.command("show")
def engines_show(engine_id: int, address: str | None = AddressOption) -> None:
    """One engine row with its install status per node."""
    async def work(sdk: SDK) -> dict[str, Any]:
        row = await sdk.models.engine_registry.get(engine_id)
        row["install"] = await sdk.engines.install_status(engine_id)
        return row

    _print_json(_with_sdk(address, work))


@engines_app.command("activate")
def engines_activate(engine_id: int, address: str | None = AddressOption) -> None:
    """Activate an installed row (prints why not when it is not ready)."""
    result = _with_sdk(address, lambda sdk: sdk.engines.activate_instance(engine_id))
    _print_json(result)
    if not result.get("ready"):
        raise typer.Exit(1)


def progress_table(status: dict[str, Any]) -> str:
    """The per-node install table as text: node, status, progress, message or error."""
    lines = [f"engine {status['engine_registry_id']} ({status['engine_id']}): "
             f"{status['status']}  " + " ".join(f"{k}={v}" for k, v in status["summary"].items()),
             f"{'node':<14} {'status':<11} {'progress':>8}  detail"]
    for node in status["nodes"]:
        detail = node["last_error"] or node["message"] or node["engine_version"] or ""
        if not node["alive"]:
            detail = f"(lost) {detail}"
        lines.append(f"{node['node_id'][:12]:<14} {node['status']:<11} "
                     f"{node['progress'] * 100:>7.0f}%  {detail.splitlines()[0] if detail else ''}")
    return "\n".join(lines)


@app.command()
def install(engine_id: int, force: bool = typer.Option(False, help="Reinstall."),
            wait: bool = typer.Option(False, help="Wait, showing per-node progress."),
            timeout: float = typer.Option(1800.0, help="Seconds to wait at most."),
            address: str | None = AddressOption) -> None:
    """Request an install of an engine row on every node."""
    async def work(sdk: SDK) -> dict[str, Any]:
        result = await sdk.engines.begin_install(engine_id, force=force)
        status = result["status"]
        if not wait:
            return status
        deadline = time.monotonic() + timeout
        shown = ""
        while True:
            table = progress_table(status)
            if table != shown:
                typer.echo(("\n" if shown else "") + table)
                shown = table
            if status["status"] in ("installed", "error") and status["nodes"]:
                return status
            if time.monotonic() > deadline:
                _fail(f"install still {status['status']} after {timeout:.0f}s", 1)
            await asyncio.sleep(0.5)
            status = await sdk.engines.install_status(engine_id)

    status = _with_sdk(address, work)
    if not wait:
        _print_json(status)
    elif status["status"] == "error":
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``roundhouse`` script."""
    app()


if __name__ == "__main__":
    main()
