"""Command line for one node: install an engine, check it, run it supervised.

    python -m engines install PROVIDER [--mode M] [--version V] [--root DIR] [--force]
    python -m engines check   PROVIDER [--root DIR]
    python -m engines run     PROVIDER --root DIR --model PATH [--port N] [-- ENGINE FLAGS]

``install`` prints the install record as JSON on stdout, progress on stderr.
``run`` prints the handoff payload once the engine is ready and stops it
cleanly (whole process group) on SIGINT or SIGTERM. ``--config`` takes the
provider config as JSON or ``@file.json``. Exit codes: 0 ok, 1 engine failed,
2 bad input or refused.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from engines.base import ConfigError
from engines.errors import ProvisionError
from engines.launch import ModelRef
from engines.node import Node
from engines.plan import InstallProgress
from engines.registry import UnknownProvider, get_provider
from engines.supervisor import EngineState, Supervisor, SupervisorEvent
from events.settings import Settings, SettingsError


def _config(raw: str | None, version: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if raw:
        text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config is not valid JSON ({exc}); pass an object") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--config must be a JSON object")
        config.update(loaded)
    if version:
        config["version"] = version
    return config


def _node(root: str | None) -> Node:
    settings = Settings.from_env(engine_root=root) if root else Settings.from_env()
    return Node.local(settings)


def _progress(p: InstallProgress) -> None:
    frac = f" {p.fraction:.0%}" if p.fraction is not None else ""
    print(f"[{p.stage}{frac}] {p.message}", file=sys.stderr, flush=True)


def cmd_install(args: argparse.Namespace) -> int:
    provider = get_provider(args.provider)
    node = _node(args.root)
    config = _config(args.config, args.version)
    plan = provider.plan_install(config, node, mode=args.mode)
    print(f"plan: {plan.summary()}", file=sys.stderr)
    record = provider.install(plan, _progress, force=args.force, settings=node.settings)
    print(record.model_dump_json(indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    provider = get_provider(args.provider)
    report = provider.check_ready(_node(args.root), _config(args.config, args.version))
    print(report.model_dump_json(indent=2))
    return 0 if report.ready else 1


def cmd_run(args: argparse.Namespace, engine_flags: list[str]) -> int:
    provider = get_provider(args.provider)
    node = _node(args.root)
    config = _config(args.config, args.version)
    model = ModelRef.from_path(args.model, args.model_id)
    prepared = provider.prepare(model, config, node, port=args.port, extra_flags=engine_flags)
    done = threading.Event()

    def on_event(event: SupervisorEvent) -> None:
        extra = f" ({event.message})" if event.message else ""
        print(f"[engine] {event.previous} -> {event.state}{extra}", file=sys.stderr, flush=True)
        if event.state is EngineState.FAILED:
            done.set()

    timeout = args.ready_timeout or node.settings.engine_ready_timeout_s
    supervisor = Supervisor(prepared, node.runtime_dir, ready_timeout_s=timeout, on_event=on_event)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        handoff = supervisor.start()
        print(json.dumps(handoff, indent=2), flush=True)
        done.wait()
    finally:
        supervisor.stop()
    return 1 if supervisor.state is EngineState.FAILED else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("provider", help="engine kind: llamacpp, vllm or openai")
        p.add_argument("--root", help="engine root (default: ROUNDHOUSE_ENGINE_ROOT)")
        p.add_argument("--config", help="provider config as JSON or @file.json")
        p.add_argument("--version", help="engine version to install (package mode)")

    install = sub.add_parser("install", help="install an engine; prints the install record")
    common(install)
    install.add_argument("--mode", help="install mode (package, binary, source, container)")
    install.add_argument("--force", action="store_true", help="reinstall even if present")
    check = sub.add_parser("check", help="is the engine installed and usable here?")
    common(check)
    run = sub.add_parser("run", help="run the engine supervised until SIGINT/SIGTERM")
    common(run)
    run.add_argument("--model", required=True, help="path of the model file or directory")
    run.add_argument("--model-id", help="model id clients ask for (default: file stem)")
    run.add_argument("--port", type=int, help="port to serve on (default: a free port)")
    run.add_argument("--ready-timeout", type=float, help="seconds to wait for readiness")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    engine_flags: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, engine_flags = args_in[:cut], args_in[cut + 1 :]
    args = build_parser().parse_args(args_in)
    try:
        if args.command == "install":
            return cmd_install(args)
        if args.command == "check":
            return cmd_check(args)
        return cmd_run(args, engine_flags)
    except (ConfigError, UnknownProvider, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if args.command != "run" else 1


if __name__ == "__main__":
    sys.exit(main())
