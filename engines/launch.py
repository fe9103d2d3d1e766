"""What it takes to start an engine process: ``PreparedEngine`` and llama.cpp flag handling.

``prepare()`` on a provider returns a ``PreparedEngine`` (executable, argv,
environment, port, working directory, and how to probe the running server);
the supervisor starts it. Flags are written llama.cpp style (``--n-gpu-layers
8``); ``normalize_llamacpp_flags`` turns aliases into the canonical spelling and
``llamacpp_python_args`` maps them to the option names of llama-cpp-python's
server, which differ.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import ConfigError

# --- the model an engine serves -------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model as an engine sees it: an id (what clients ask for) and a local path."""

    id: str
    path: Path | None = None

    @classmethod
    def from_path(cls, path: str | Path, model_id: str | None = None) -> ModelRef:
        """A model at ``path`` (made absolute: engines run in their own workdir)."""
        p = Path(path).absolute()
        return cls(id=model_id or p.stem, path=p)

    def payload(self) -> dict[str, str | None]:
        return {"id": self.id, "path": str(self.path) if self.path else None}


# --- the prepared process ---------------------------------------------------------------


@dataclass
class PreparedEngine:
    """Everything needed to start and probe one engine process; no side effects yet.

    ``bin`` and ``args`` form the argv (no shell). ``env`` is the complete,
    already sanitized environment. ``health_path`` answers 200 once the model
    is loaded (503 means still loading); ``metrics_path`` is validated after
    readiness when set; ``version_path``/``version_field`` read the engine
    version from the running server (dotted path into its JSON answer).
    ``flags`` are the engine flags recorded in the handoff file.
    """

    engine: str
    bin: str
    args: list[str]
    env: dict[str, str]
    port: int
    workdir: str
    provisioning_mode: str
    engine_version: str
    model: ModelRef
    flags: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    health_path: str = "/health"
    metrics_path: str | None = None
    version_path: str | None = None
    version_field: str | None = None
    #: Unprivileged user the process runs as (None = as the service).
    user: str | None = None
    #: GPU indices made visible to the engine (empty = none / CPU).
    gpu_ids: list[int] = field(default_factory=list)
    cpu_fallback: bool = False
    notes: list[str] = field(default_factory=list)
    #: Command that stops the engine besides signalling the process (container mode).
    stop_argv: list[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        return [self.bin, *self.args]

    def describe(self) -> dict[str, Any]:
        """A loggable view; the environment is reduced to its variable names."""
        return {
            "engine": self.engine,
            "argv": self.argv,
            "env_keys": sorted(self.env),
            "port": self.port,
            "workdir": self.workdir,
            "provisioning_mode": self.provisioning_mode,
            "engine_version": self.engine_version,
            "model": self.model.payload(),
            "cpu_fallback": self.cpu_fallback,
            "notes": self.notes,
        }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_threads(cpu_count: int) -> int:
    """One decode thread less than the cores (all cores gives erratic speeds), at least 1."""
    return max(1, cpu_count - 1)


# --- llama.cpp flags ----------------------------------------------------------------------

#: Alias -> canonical llama.cpp spelling.
LLAMACPP_ALIASES: dict[str, str] = {
    "--ngl": "--n-gpu-layers",
    "-ngl": "--n-gpu-layers",
    "--gpu-layers": "--n-gpu-layers",
    "-c": "--ctx-size",
    "-t": "--threads",
    "-tb": "--threads-batch",
    "-b": "--batch-size",
    "-ub": "--ubatch-size",
    "-a": "--alias",
    "-fa": "--flash-attn",
    "-s": "--seed",
    "-np": "--parallel",
    "-cb": "--cont-batching",
    "-nocb": "--no-cont-batching",
    "-m": "--model",
    "-v": "--verbose",
}

#: Flags Roundhouse sets itself; passing them is an error that says what to use instead.
RESERVED_FLAGS: dict[str, str] = {
    "--model": "the model path comes from the model; pass model=",
    "--host": "the host is chosen by the supervisor (127.0.0.1)",
    "--port": "the port is chosen by Roundhouse; pass port= (CLI: --port)",
}

_NEGATIVE_NUMBER = re.compile(r"^-\d+(\.\d+)?$")

FlagList = list[tuple[str, str | None]]


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not _NEGATIVE_NUMBER.match(token)


def parse_flags(flags: Sequence[str]) -> FlagList:
    """Split a flag list into ``(flag, value-or-None)`` pairs, accepting ``--flag=value``.

    Raises ConfigError for a stray value with no flag before it.
    """
    out: FlagList = []
    i = 0
    tokens = list(flags)
    while i < len(tokens):
        tok = tokens[i]
        if not _is_flag(tok):
            raise ConfigError(
                f"engine flag value {tok!r} has no flag before it; write flags as "
                "['--name', 'value'] or ['--name=value']"
            )
        if tok.startswith("--") and "=" in tok:
            name, value = tok.split("=", 1)
            out.append((name, value))
            i += 1
            continue
        if i + 1 < len(tokens) and not _is_flag(tokens[i + 1]):
            out.append((tok, tokens[i + 1]))
            i += 2
        else:
            out.append((tok, None))
            i += 1
    return out


def _flatten(pairs: FlagList) -> list[str]:
    out: list[str] = []
    for name, value in pairs:
        out.append(name)
        if value is not None:
            out.append(value)
    return out


def normalize_llamacpp_flags(flags: Sequence[str]) -> list[str]:
    """Canonical llama.cpp flags: aliases rewritten (``--ngl``/``--gpu-layers`` ->
    ``--n-gpu-layers``), ``--flag=value`` split, a repeated flag keeps its last value.

    Raises ConfigError for flags Roundhouse owns (``--model``, ``--host``, ``--port``).
    """
    merged: dict[str, str | None] = {}
    for name, value in parse_flags(flags):
        canonical = LLAMACPP_ALIASES.get(name, name)
        if canonical in RESERVED_FLAGS:
            raise ConfigError(f"engine flag {name} is not allowed: {RESERVED_FLAGS[canonical]}")
        merged.pop(canonical, None)
        merged[canonical] = value
    return _flatten(list(merged.items()))


def flag_value(flags: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in normalized ``flags`` (None when absent or valueless)."""
    for flag, value in parse_flags(flags):
        if flag == name:
            return value
    return None


def has_flag(flags: Sequence[str], name: str) -> bool:
    return any(flag == name for flag, _ in parse_flags(flags))


def with_llamacpp_defaults(
    flags: Sequence[str], *, n_gpu_layers: int, ctx_size: int, threads: int, alias: str
) -> list[str]:
    """Normalized flags plus defaults for what the user did not set: GPU layers, context
    size, threads, alias, metrics on and no web UI. User flags win over defaults."""
    user = normalize_llamacpp_flags(flags)
    defaults: list[tuple[str, str | None]] = [
        ("--n-gpu-layers", str(n_gpu_layers)),
        ("--ctx-size", str(ctx_size)),
        ("--threads", str(threads)),
        ("--alias", alias),
        ("--metrics", None),
    ]
    present = {name for name, _ in parse_flags(user)}
    if "--webui" not in present:
        defaults.append(("--no-webui", None))
    extra = [(n, v) for n, v in defaults if n not in present]
    return _flatten(extra) + user


def force_cpu(flags: Sequence[str]) -> list[str]:
    """``flags`` with ``--n-gpu-layers 0`` (used for a CPU fallback)."""
    pairs = [(n, v) for n, v in parse_flags(flags) if n != "--n-gpu-layers"]
    return _flatten([("--n-gpu-layers", "0"), *pairs])


#: llama.cpp flag -> llama-cpp-python server option (value passed through).
_PY_OPTION: dict[str, str] = {
    "--n-gpu-layers": "--n_gpu_layers",
    "--ctx-size": "--n_ctx",
    "--threads": "--n_threads",
    "--threads-batch": "--n_threads_batch",
    "--batch-size": "--n_batch",
    "--ubatch-size": "--n_ubatch",
    "--alias": "--model_alias",
    "--api-key": "--api_key",
    "--seed": "--seed",
    "--rope-freq-base": "--rope_freq_base",
    "--rope-freq-scale": "--rope_freq_scale",
    "--main-gpu": "--main_gpu",
    "--lora": "--lora_path",
    "--mmproj": "--clip_model_path",
    "--chat-format": "--chat_format",
}
#: llama.cpp boolean flag -> (llama-cpp-python option, value).
_PY_BOOL: dict[str, tuple[str, str]] = {
    "--no-mmap": ("--use_mmap", "false"),
    "--mlock": ("--use_mlock", "true"),
    "--verbose": ("--verbose", "true"),
    "--embedding": ("--embedding", "true"),
}
#: llama.cpp server features llama-cpp-python's server does not have; dropped with a note.
_PY_UNSUPPORTED: dict[str, str] = {
    "--metrics": "it has no /metrics endpoint",
    "--no-webui": "it has no web UI",
    "--webui": "it has no web UI",
    "--parallel": "it serves one request at a time",
    "--cont-batching": "it has no continuous batching",
    "--no-cont-batching": "it has no continuous batching",
}


def llamacpp_python_args(flags: Sequence[str]) -> tuple[list[str], list[str]]:
    """Map normalized llama.cpp flags to llama-cpp-python server options.

    Returns ``(args, notes)``: notes name each flag dropped because that server
    lacks the feature. Options already in the server's own spelling
    (``--n_batch``) pass through. Raises ConfigError for a flag it cannot map.
    """
    args: list[str] = []
    notes: list[str] = []
    for name, value in parse_flags(flags):
        if name in _PY_OPTION:
            if value is None:
                raise ConfigError(f"engine flag {name} needs a value, e.g. {name} 8")
            args += [_PY_OPTION[name], value]
        elif name in _PY_BOOL:
            option, val = _PY_BOOL[name]
            args += [option, val if value is None else value]
        elif name == "--flash-attn":
            on = value is None or value.lower() in {"on", "true", "1", "yes"}
            args += ["--flash_attn", "true" if on else "false"]
        elif name == "--tensor-split":
            args += ["--tensor_split", *(value or "").replace(",", " ").split()]
        elif name in _PY_UNSUPPORTED:
            why = _PY_UNSUPPORTED[name]
            notes.append(f"dropped {name}: llama-cpp-python's server ignores it ({why})")
        elif name.startswith("--") and "_" in name:
            args += [name] if value is None else [name, value]
        else:
            known = ", ".join(sorted([*_PY_OPTION, *_PY_BOOL, "--flash-attn", "--tensor-split"]))
            raise ConfigError(
                f"engine flag {name} has no equivalent in llama-cpp-python's server; use one "
                f"of {known}, or the server's own option names (e.g. --n_batch 512)"
            )
    return args, notes
