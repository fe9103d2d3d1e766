#!/usr/bin/env bash
# The README's main-job command: sets up .venv, then serves SmolLM2 through llama.cpp on the
# embedded default (local Ray + control plane + gateway, store in ROUNDHOUSE_HOME) in the
# foreground until Ctrl-C. `--walkthrough` runs the in-process engine-lifecycle walk-through
# (scripts/walkthrough.py) instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "${1:-}" = "--walkthrough" ]; then
  shift
  exec python scripts/walkthrough.py "$@"
fi
exec python scripts/serve_main.py "$@"
