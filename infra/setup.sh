#!/usr/bin/env bash
# Creates or refreshes .venv from requirements.lock (exact pins), then installs ampo itself (editable).
# Quick when nothing changed: a stamp holds the hash of the lock, pyproject.toml and this script.
# Packages are compiled to bytecode at install: with PYTHONDONTWRITEBYTECODE set (as on these machines) Python
# never writes .pyc files itself, and every process then compiles torch, transformers and vLLM from source again
# (import vllm: 17 s without, 8 s with; about a minute once, at install).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${AMPO_PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${AMPO_VENV:-.venv}
want=$(cat requirements.lock pyproject.toml infra/setup.sh | sha256sum | cut -d' ' -f1)
stamp="$VENV/.ampo-lock-sha"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$VENV/bin/ampo" ]]; then
  exit 0
fi

"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"ampo needs Python 3.11, found {sys.version.split()[0]}"'
echo "[setup] installing the locked environment into $VENV (about two minutes on a fresh machine)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"

# The CPU build of torch is pinned as 2.13.0+cpu; it comes from pip's find-links folder where this machine
# has one, or from the PyTorch CPU index named in UV_EXTRA_INDEX_URL elsewhere.
links=()
for d in $("$PY" -m pip config get global.find-links 2>/dev/null || true) ${AMPO_FIND_LINKS:-}; do
  [[ -d "${d#file://}" ]] && links+=(--find-links "${d#file://}")
done
"$VENV/bin/uv" pip sync -q --compile-bytecode --python "$VENV/bin/python" "${links[@]}" requirements.lock
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done" >&2
