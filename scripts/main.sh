#!/usr/bin/env bash
# The README's main-job command: sets up .venv, then runs Roundhouse on the embedded
# default (local store in ROUNDHOUSE_HOME, the bundled SmolLM2 model on llama.cpp).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python scripts/walkthrough.py "$@"
