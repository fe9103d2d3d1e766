"""State machines: invalid transitions name the state and the allowed commands, and no
command ever emits an event that changes nothing."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from events.common import DomainError, InvalidTransition
from events.engine import EngineInstance, EngineStatus
from events.install import NodeInstall, StaleInstallReport
from events.model import ModelRuntime
from events.node import Node

WHO: dict[str, Any] = {"user_id": 1, "organization_id": 1, "actor": "user"}


def _state(agg: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(agg).items()
            if k not in {"_id", "_version", "_created_on", "_modified_on", "_pending_events"}}


def _engine() -> EngineInstance:
    return EngineInstance(row_id=1, provider="llamacpp", name="e", config={},
                          organization_id=None, requested_by=WHO, task_id=None)


def test_invalid_transition_names_state_and_allowed_commands() -> None:
    engine = _engine()
    with pytest.raises(InvalidTransition) as err:
        engine.deactivate(WHO)
    message = str(err.value)
    assert "it is registered" in message
    assert "activate" in message and "request_install" in message
    assert err.value.allowed == ["activate", "remove", "rename", "request_install",
                                 "update_config"]
    engine.remove(WHO)
    with pytest.raises(InvalidTransition, match="commands allowed while removed: none"):
        engine.activate(WHO)


def test_install_report_for_old_request_is_stale() -> None:
    install = NodeInstall(engine_row_id=1, node_id="a", request_event_id="r1", force=False,
                          requested_by=WHO, task_id=None)
    install.queue("r2", force=False, requested_by=WHO)
    with pytest.raises(StaleInstallReport, match="current request is r2"):
        install.start("r1", {})


def _engine_commands(engine: EngineInstance, rng: random.Random) -> Callable[[], Any]:
    options: list[Callable[[], Any]] = [
        lambda: engine.update_config(rng.choice([{}, {"ctx_size": 512}]), WHO),
        lambda: engine.rename(rng.choice(["e", "f"]), WHO),
        lambda: engine.request_install(f"r{rng.randint(0, 2)}", False, 1, "v", "n", WHO, None),
        lambda: engine.complete_install(engine.last_install_event_id or "", WHO),
        lambda: engine.fail_install(engine.last_install_event_id or "", "boom", WHO),
        lambda: engine.activate(WHO),
        lambda: engine.deactivate(WHO),
        lambda: engine.remove(WHO) if rng.random() < 0.05 else None,
    ]
    return rng.choice(options)


def _install_commands(install: NodeInstall, rng: random.Random) -> Callable[[], Any]:
    request = install.request_event_id
    options: list[Callable[[], Any]] = [
        lambda: install.queue(rng.choice([request, "r-new"]), False, WHO),
        lambda: install.start(request, {}),
        lambda: install.progress(request, rng.choice([0.0, 0.5, 1.0]), rng.choice(["", "x"])),
        lambda: install.succeed(request, "v", {}),
        lambda: install.fail(request, "e"),
    ]
    return rng.choice(options)


def _node_commands(node: Node, rng: random.Random) -> Callable[[], Any]:
    options: list[Callable[[], Any]] = [
        lambda: node.update_facts(rng.choice([{}, {"cpu_count": 2}])),
        lambda: node.mark_lost("gone", WHO),
        lambda: node.rejoin(rng.choice([{}, {"cpu_count": 2}])),
    ]
    return rng.choice(options)


def _runtime_commands(runtime: ModelRuntime, rng: random.Random) -> Callable[[], Any]:
    options: list[Callable[[], Any]] = [
        lambda: runtime.request_load(WHO),
        lambda: runtime.mark_loaded(1, "/m", 1, "http://x", "app"),
        lambda: runtime.fail_load("oom"),
        lambda: runtime.restarted(rng.choice([1, 2]), "crashed"),
        lambda: runtime.unload(rng.choice(["user", "idle", "crashed"]), WHO),
    ]
    return rng.choice(options)


@pytest.mark.parametrize("seed", range(20))
def test_no_command_emits_a_no_op_event(seed: int) -> None:
    rng = random.Random(seed)
    aggregates: list[tuple[Any, Callable[[Any, random.Random], Callable[[], Any]]]] = [
        (_engine(), _engine_commands),
        (NodeInstall(engine_row_id=1, node_id="a", request_event_id="r0", force=False,
                     requested_by=WHO, task_id=None),
         _install_commands),
        (Node(node_id="a", facts={}, requested_by=WHO), _node_commands),
        (ModelRuntime(engine_row_id=1, model_row_id=1, node_id="a", requested_by=WHO,
                      task_id=None), _runtime_commands),
    ]
    emitted = 0
    for agg, commands in aggregates:
        for _ in range(200):
            before, events_before = _state(agg), len(agg.pending_events)
            try:
                commands(agg, rng)()
            except DomainError:
                assert len(agg.pending_events) == events_before  # a refusal records nothing
                continue
            new_events = len(agg.pending_events) - events_before
            if new_events:
                emitted += new_events
                # Every event changes state, except progress/facts events, which change data.
                assert _state(agg) != before, type(agg.pending_events[-1]).__qualname__
    assert emitted > 50


def test_engine_status_walk() -> None:
    engine = _engine()
    engine.request_install("r1", False, 1, "v", "n", WHO, None)
    assert engine.status is EngineStatus.INSTALLING
    engine.complete_install("r1", WHO)
    engine.activate(WHO)
    engine.request_install("r2", True, 1, "v", "n", WHO, None)
    assert engine.status is EngineStatus.ACTIVE  # a reinstall does not take it offline
    engine.deactivate(WHO)
    assert engine.status is EngineStatus.INSTALLED
