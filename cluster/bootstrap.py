"""Bring Roundhouse up on Ray: the embedded single-node cluster, or attach to one.

``start(address=None)`` is what ``roundhouse up`` and ``cluster.connect`` run:

- ``address=None``: start an embedded single-node Ray in this process (small,
  quiet defaults, dashboard off); the store lives in ``ROUNDHOUSE_HOME``. The
  cluster lives as long as this process (``stop()`` or ``SDK.close()`` ends it).
- ``address="auto"`` or a Ray address (``host:port``, ``ray://…``): attach to a
  running cluster and create the control-plane actor only if it is not there.

Either way the control-plane actor then starts one node agent per alive node
and keeps doing so for nodes that join later. Later layers (the serving
gateway) extend ``start`` by taking the returned ``Cluster``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.control_actor import start_control_plane, wait_until_ready
from actors.handles import CONTROL_NAME, NAMESPACE
from cluster.client import SDK
from cluster.ray_backend import RayBackend
from events.settings import Settings

log = logging.getLogger("roundhouse.cluster")

#: CPUs of the embedded cluster when not given (the actors themselves take none).
EMBEDDED_CPUS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class Cluster:
    """A running Roundhouse on Ray: the control-plane actor and how we got there."""

    control: ActorHandle
    settings: Settings
    address: str
    #: True when ``start`` started Ray in this process (``stop`` then shuts it down).
    embedded: bool
    info: dict[str, Any] = field(default_factory=dict)

    def sdk(self) -> SDK:
        """The SDK backed by the control-plane actor; when the gateway runs, with
        ``sdk.ai`` and the runtime methods of ``sdk.engines`` (``list_loaded_models``,
        ``unload_loaded_model``, ``stop_engine``, ``list_active_jobs``, ``sync_runtime``)
        reaching it through its Serve handle."""
        sdk = SDK(RayBackend(self.control, owns_ray=self.embedded))
        from cluster.serve_gateway import GatewayServing, gateway_running
        from cluster.serve_sdk import attach_serving

        if gateway_running():
            attach_serving(sdk, GatewayServing())
        return sdk


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect this process to Ray; return True when it started an embedded cluster."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                             "namespace": NAMESPACE}
    if address is None:
        ray.init(num_cpus=num_cpus or EMBEDDED_CPUS, include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        raise ConnectionError(
            f"could not reach a Ray cluster at {address!r} ({exc}); start one with "
            "`ray start --head` (or `roundhouse up`), or leave the address out to run an "
            "embedded cluster"
        ) from None
    return False


def start(address: str | None = None, settings: Settings | None = None, *,
          num_cpus: int | None = None, timeout_s: float = 120.0) -> Cluster:
    """Connect to (or start) Ray and make sure the control plane runs; return the
    ``Cluster``. ``settings`` (default: from ``ROUNDHOUSE_*``) are used only when the
    control-plane actor is created here. Raises ConnectionError when ``address``
    cannot be reached, TimeoutError when the control plane does not come up."""
    embedded = _init_ray(address, num_cpus)
    cfg = settings or Settings.from_env()
    handle = start_control_plane(cfg)
    info = wait_until_ready(handle, timeout_s)
    ctx = ray.get_runtime_context()
    return Cluster(control=handle, settings=cfg, address=ctx.gcs_address, embedded=embedded,
                   info=info)


def connect(address: str | None = None, settings: Settings | None = None, *,
            num_cpus: int | None = None) -> SDK:
    """The same SDK as ``cluster.client.open_local``, backed by the actors (plus the serving
    methods when the gateway runs: see ``Cluster.sdk``).

    With no address an embedded single-node Ray is started (closing the SDK shuts it
    down); with ``"auto"`` or a Ray address the running cluster is used and the
    control plane is created only if it is not there.
    """
    return start(address, settings, num_cpus=num_cpus).sdk()


def stop(cluster: Cluster | None = None, *, remove_control_plane: bool = False) -> None:
    """Stop what ``start`` began: with ``remove_control_plane`` remove the agents and
    the control-plane actor (the store is kept); shut down an embedded Ray."""
    if not ray.is_initialized():
        return
    if remove_control_plane:
        try:
            handle = ray.get_actor(CONTROL_NAME, namespace=NAMESPACE)
        except ValueError:
            handle = None
        if handle is not None:
            ray.get(handle.shutdown.remote(), timeout=60)
            ray.kill(handle, no_restart=True)
    if cluster is None or cluster.embedded:
        ray.shutdown()
